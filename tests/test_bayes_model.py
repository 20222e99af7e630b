"""The model: training on the corpus slice, metrics floors, learning, the file format."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from mailflow_plugins.bayes import shipped_model_path
from mailflow_plugins.bayes.features import Hasher, extract_tokens
from mailflow_plugins.bayes.model import (
    HAM,
    SPAM,
    Model,
    ModelError,
    design_matrix,
    score_from_probability,
)
from mailflow_plugins.bayes.training import compute_metrics, featurize, train

from tests.bayes_support import corpus_files, label_of, split, train_model


@pytest.fixture(scope="module")
def held_out():
    train, test = split()
    return train_model(train), test


def _probabilities(model: Model, files) -> np.ndarray:
    rows = featurize((p.read_bytes() for p in files), Hasher())
    return model.probabilities(design_matrix(rows, model.n_features))


def test_model_trained_on_the_slice_classifies_held_out_mail(held_out):
    model, test = held_out
    labels = np.array([label_of(p) for p in test])
    probs = _probabilities(model, test)
    m = compute_metrics(labels, probs)
    # 240 training messages only; the full corpus does far better (docs/performance.md).
    assert m.accuracy >= 0.93
    assert m.false_positive_rate <= 0.07
    assert m.recall >= 0.85
    assert m.ham == m.spam == 30
    # At the Junk threshold (probability 0.9, score 8) at most one ham of 30.
    assert compute_metrics(labels, probs, 0.9).false_positive_rate <= 0.04


def test_cross_validation_report_on_the_slice():
    files = corpus_files("ham") + corpus_files("spam")
    rows = featurize((p.read_bytes() for p in files), Hasher())
    labels = np.array([label_of(p) for p in files])
    model, metrics = train(rows, labels, folds=3)
    assert metrics is not None
    assert metrics.ham == 150 and metrics.spam == 150
    assert metrics.accuracy >= 0.93 and metrics.f1 >= 0.9
    assert model.scale > 0 and model.scale != 1.0  # calibrated on the out-of-fold scores
    _, uncalibrated = train(rows, labels, folds=0)
    assert uncalibrated is None


def test_shipped_model_loads_and_separates_the_slice():
    model = Model.load(shipped_model_path())
    assert model.class_counts[HAM] > 1000 and model.class_counts[SPAM] > 500
    files = corpus_files("ham") + corpus_files("spam")
    m = compute_metrics(np.array([label_of(p) for p in files]), _probabilities(model, files))
    assert m.accuracy >= 0.97  # the slice is part of its training data: a sanity check


def test_scores_match_scikit_learn_and_each_other(held_out):
    from sklearn.linear_model import LogisticRegression

    model, test = held_out
    rows = featurize((p.read_bytes() for p in test), Hasher())
    X = design_matrix(rows, model.n_features)
    ours = model.probabilities(X)
    # The same weights in a scikit-learn estimator give the same probabilities.
    lr = LogisticRegression()
    lr.classes_ = np.array([HAM, SPAM])
    lr.coef_ = model.scale * model.weights.astype(np.float64)[None, :]
    lr.intercept_ = np.array([model.scale * model.bias])
    np.testing.assert_allclose(ours, lr.predict_proba(X)[:, SPAM], rtol=1e-6, atol=1e-9)
    one = model.probability(rows[0])
    assert one == pytest.approx(ours[0], rel=1e-6, abs=1e-9)
    hasher = Hasher()
    tokens = extract_tokens(test[0].read_bytes())
    log_odds, top = model.score(tokens, hasher.column_array(tokens), 10_000)
    assert log_odds == pytest.approx(model.log_odds(rows[0]))
    # The listed contributions and the bias add up to the log-odds.
    assert model.scale * model.bias + sum(t["weight"] for t in top) == pytest.approx(
        log_odds, abs=0.01
    )


def test_no_evidence_scores_near_one_half(held_out):
    model, _ = held_out
    assert model.probability(np.zeros(0, dtype=np.int64)) == pytest.approx(0.5, abs=0.1)


def test_learning_a_message_moves_its_score_the_right_way(held_out):
    base, test = held_out
    model = Model(base.weights.copy(), base.bias, base.scale, base.class_counts.copy())
    ham = next(p for p in test if label_of(p) == HAM)
    spam = next(p for p in test if label_of(p) == SPAM)
    hasher = Hasher()
    ham_x, spam_x = (hasher.index(extract_tokens(p.read_bytes())) for p in (ham, spam))
    ham_before, spam_before = model.log_odds(ham_x), model.log_odds(spam_x)
    assert ham_before < 0 < spam_before
    model.learn([ham_x], [SPAM])
    model.learn([spam_x], [HAM])
    # Taught the other way, each message crosses to the other side.
    assert model.log_odds(ham_x) > 0
    assert model.log_odds(spam_x) < 0
    assert model.class_counts.sum() == base.class_counts.sum() + 2


def test_score_scale():
    assert score_from_probability(0.5) == 0
    assert score_from_probability(1.0) == 10
    assert score_from_probability(0.0) == -2
    assert score_from_probability(0.9) == pytest.approx(8)


def test_save_and_load_round_trip(tmp_path, held_out):
    model, _ = held_out
    path = tmp_path / "sub" / "model.npz"
    model.info = {"note": "round trip"}
    model.save(path)
    loaded = Model.load(path)
    np.testing.assert_array_equal(loaded.weights, model.weights)
    assert (loaded.bias, loaded.scale, loaded.C) == (model.bias, model.scale, model.C)
    np.testing.assert_array_equal(loaded.class_counts, model.class_counts)
    assert loaded.info == {"note": "round trip"}
    assert not list(path.parent.glob(".*tmp"))  # the temp file was renamed away
    assert path.stat().st_mode & 0o777 == 0o644


def _rewrite(path, **changes):
    """Rewrite a model file with some arrays replaced (as a tamperer would)."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays.update(changes)
    np.savez(path, **arrays)


def test_corrupt_model_files_give_clear_errors(tmp_path, held_out):
    model, _ = held_out
    good = tmp_path / "good.npz"
    model.save(good)
    raw = good.read_bytes()

    cases = {}
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(raw[: len(raw) // 2])
    cases[truncated] = "corrupt"
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a model")
    cases[garbage] = "corrupt"
    tampered = tmp_path / "tampered.npz"
    tampered.write_bytes(raw)
    weights = model.weights.copy()
    weights[12345] += 1000
    _rewrite(tampered, weights=weights)
    cases[tampered] = "checksum mismatch"
    version = tmp_path / "version.npz"
    version.write_bytes(raw)
    with np.load(good) as data:
        header = json.loads(data["header"].tobytes())
    header["version"] = 99
    _rewrite(version, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))
    cases[version] = "version 99 is not supported"
    version1 = tmp_path / "v1.npz"  # the naive Bayes files of earlier releases
    version1.write_bytes(raw)
    header["version"] = 1
    _rewrite(version1, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))
    cases[version1] = "retrain with `mailflow train`"
    for name, change in {
        "seed": {"seed": "x"},
        "bigseed": {"seed": 2**40},
        "info": {"info": ["not", "an", "object"]},
    }.items():
        bad = tmp_path / f"{name}.npz"
        bad.write_bytes(raw)
        with np.load(good) as data:
            changed = {**json.loads(data["header"].tobytes()), **change}
        _rewrite(bad, header=np.frombuffer(json.dumps(changed).encode(), dtype=np.uint8))
        cases[bad] = "seed" if "seed" in name else "info is not an object"
    deep = tmp_path / "deep.npz"
    deep.write_bytes(raw)
    _rewrite(deep, header=np.frombuffer(b"[" * 100_000 + b"]" * 100_000, dtype=np.uint8))
    cases[deep] = "corrupt model header"
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, header=np.array([{"evil": True}], dtype=object))
    cases[pickled] = "corrupt"  # object arrays need pickle, which is refused
    missing = tmp_path / "missing.npz"
    cases[missing] = "no such model file"

    for path, expected in cases.items():
        with pytest.raises(ModelError) as info:
            Model.load(path)
        assert str(path) in str(info.value)
        assert expected in str(info.value)


def test_not_a_zip_with_model_name(tmp_path):
    path = tmp_path / "m.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("other.npy", b"")
    with pytest.raises(ModelError, match=r"corrupt|not a mailflow"):
        Model.load(path)
