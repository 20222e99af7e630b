"""`mailflow train`, `learn`, `evaluate` and `check --json` with the bayes plugin."""

from __future__ import annotations

import importlib.util
import json
import mailbox
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from mailflow_plugins.bayes.features import Hasher, extract_tokens
from mailflow_plugins.bayes.model import Model

from mailflow.cli import main
from tests.bayes_support import CORPUS, corpus_files

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
EVALUATE = ["evaluate", "--ham", str(CORPUS / "ham"), "--spam", str(CORPUS / "spam")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`mailflow train` on the slice (ham as a Maildir, spam as an mbox + a directory)."""
    root = tmp_path_factory.mktemp("train")
    maildir = mailbox.Maildir(root / "ham-maildir", create=True)
    for p in corpus_files("ham"):
        maildir.add(p.read_bytes())
    spam_files = corpus_files("spam")
    mbox = mailbox.mbox(root / "spam.mbox", create=True)
    for p in spam_files[:75]:
        mbox.add(p.read_bytes())
    mbox.close()
    spam_dir = root / "spam-dir"
    spam_dir.mkdir()
    for p in spam_files[75:]:
        shutil.copy(p, spam_dir / p.name)
    model = root / "model.npz"
    result = CliRunner().invoke(
        main,
        [
            *("train", "--ham", str(root / "ham-maildir"), "--spam", str(root / "spam.mbox")),
            *("--spam", str(spam_dir), "--model", str(model), "--folds", "3"),
        ],
    )
    return result, model


def test_train_prints_counts_and_cross_validation_and_writes_the_model(trained):
    result, model = trained
    assert result.exit_code == 0, result.output
    assert "messages: 150 ham, 150 spam" in result.stdout
    assert "3-fold cross-validation" in result.stdout
    for label in ("accuracy", "precision", "recall", "F1", "false positives", "actual spam"):
        assert label in result.stdout
    assert "reading" in result.stderr  # the progress bar is on stderr
    loaded = Model.load(model)
    assert list(loaded.class_counts) == [150, 150]


def test_train_with_a_missing_path_fails_clearly(tmp_path):
    result = CliRunner().invoke(
        main, ["train", "--ham", str(tmp_path / "nope"), "--spam", str(CORPUS / "spam")]
    )
    assert result.exit_code == 2
    assert "nope: no such file or directory" in result.stderr


def test_evaluate_json_is_one_object_with_the_metrics(trained):
    _, model = trained
    result = CliRunner().invoke(
        main,
        [*EVALUATE, "--model", str(model), "--json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # exactly one JSON document on stdout
    for key in ("accuracy", "precision", "recall", "f1", "false_positive_rate"):
        assert 0.0 <= report[key] <= 1.0
    assert report["ham"] == report["spam"] == 150
    assert report["true_positives"] + report["false_negatives"] == 150
    assert report["accuracy"] >= 0.97  # evaluated on its own training data
    assert report["threshold"] == 0.5
    bands = report["calibration"]
    assert [b["band"] for b in bands][:2] == ["0.0-0.1", "0.1-0.2"] and len(bands) == 10
    assert sum(b["messages"] for b in bands) == 300
    assert bands[0]["spam_share"] < 0.5 < bands[-1]["spam_share"]


def test_evaluate_at_the_junk_threshold_counts_fewer_as_spam(trained):
    _, model = trained
    at = {}
    for threshold in ("0.5", "0.9"):
        result = CliRunner().invoke(
            main, [*EVALUATE, "--model", str(model), "--json", "--threshold", threshold]
        )
        assert result.exit_code == 0, result.output
        at[threshold] = json.loads(result.stdout)
    flagged = {t: r["true_positives"] + r["false_positives"] for t, r in at.items()}
    assert flagged["0.9"] <= flagged["0.5"]
    assert at["0.9"]["calibration"] == at["0.5"]["calibration"]  # the threshold changes counts only


def test_evaluate_table_and_confusion_matrix(trained):
    _, model = trained
    result = CliRunner().invoke(
        main,
        [*EVALUATE, "--model", str(model)],
    )
    assert result.exit_code == 0, result.output
    assert "confusion matrix" in result.stdout and "actual ham" in result.stdout
    assert "calibration" in result.stdout and "0.9-1.0" in result.stdout


def test_evaluate_plot_without_matplotlib_says_how_to_install_it(trained, tmp_path, monkeypatch):
    # Hide matplotlib even where it is installed: a None entry makes `import` fail.
    for name in ("matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)
    _, model = trained
    result = CliRunner().invoke(
        main,
        [*EVALUATE, "--model", str(model), "--plot", str(tmp_path / "roc.png")],
    )
    assert result.exit_code == 2
    assert "pip install 'mailflow[plot]'" in result.stderr


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is an optional extra")
def test_evaluate_plot_writes_a_png(trained, tmp_path):
    _, model = trained
    out = tmp_path / "roc.png"
    result = CliRunner().invoke(
        main,
        [*EVALUATE, "--model", str(model), "--plot", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_learn_from_a_maildir_moves_scores(trained, tmp_path):
    _, trained_model = trained
    model_path = tmp_path / "model.npz"
    shutil.copy(trained_model, model_path)
    ham = corpus_files("ham")[0]
    x = Hasher().index(extract_tokens(ham.read_bytes()))
    before = Model.load(model_path).log_odds(x)
    drag = mailbox.Maildir(tmp_path / ".Junk", create=True)  # where users drag spam
    drag.add(ham.read_bytes())
    result = CliRunner().invoke(
        main, ["learn", "--spam", str(tmp_path / ".Junk"), "--model", str(model_path)]
    )
    assert result.exit_code == 0, result.output
    assert "learned 0 ham and 1 spam message(s)" in result.stdout
    after = Model.load(model_path)
    assert after.log_odds(x) > before
    assert list(after.class_counts) == [150, 151]
    # and back: learning it as ham pulls it down again
    result = CliRunner().invoke(main, ["learn", "--ham", str(ham), "--model", str(model_path)])
    assert result.exit_code == 0, result.output
    assert Model.load(model_path).log_odds(x) < after.log_odds(x)


def test_learn_needs_a_label_and_starts_from_the_shipped_model(tmp_path):
    msg = corpus_files("spam")[0]
    result = CliRunner().invoke(main, ["learn", "--model", str(tmp_path / "m.npz")])
    assert result.exit_code == 2
    assert "--spam PATH, --ham PATH and/or --maildir ROOT" in result.stderr
    # Paths belong to the options: a bare path is an error, not a guess at its class.
    result = CliRunner().invoke(main, ["learn", str(msg), "--model", str(tmp_path / "m.npz")])
    assert result.exit_code == 2 and not (tmp_path / "m.npz").exists()
    result = CliRunner().invoke(
        main, ["learn", "--spam", str(msg), "--model", str(tmp_path / "m.npz")]
    )
    assert result.exit_code == 0, result.output
    assert "starting from the shipped model" in result.stderr
    assert Model.load(tmp_path / "m.npz").class_counts[1] > 1000


def test_learn_takes_spam_and_ham_at_once_like_train(trained, tmp_path):
    _, trained_model = trained
    model_path = tmp_path / "model.npz"
    shutil.copy(trained_model, model_path)
    ham, spam = corpus_files("ham")[0], corpus_files("spam")[0]
    before = Model.load(model_path)
    hasher = Hasher()
    x_ham, x_spam = (hasher.index(extract_tokens(p.read_bytes())) for p in (ham, spam))
    # Each taught as the other class, in one call: neither may be learned as the other's.
    result = CliRunner().invoke(
        main,
        ["learn", "--spam", str(ham), "--ham", str(spam), "--model", str(model_path)],
    )
    assert result.exit_code == 0, result.output
    assert "learned 1 ham and 1 spam message(s)" in result.stdout
    after = Model.load(model_path)
    assert after.log_odds(x_ham) > before.log_odds(x_ham)
    assert after.log_odds(x_spam) < before.log_odds(x_spam)
    assert list(after.class_counts) == [151, 151]


@pytest.mark.parametrize("empty", ["dev_null", "empty_file", "empty_dir", "blank_file"])
def test_learn_refuses_empty_input_and_leaves_the_model_alone(trained, tmp_path, empty):
    _, trained_model = trained
    model_path = tmp_path / "model.npz"
    shutil.copy(trained_model, model_path)
    original = model_path.read_bytes()
    paths = {
        "dev_null": Path("/dev/null"),
        "empty_file": tmp_path / "empty.eml",
        "empty_dir": tmp_path / "nothing",
        "blank_file": tmp_path / "blank.eml",
    }
    (tmp_path / "empty.eml").write_bytes(b"")
    (tmp_path / "nothing").mkdir()
    (tmp_path / "blank.eml").write_bytes(b"\r\n\n  \n")
    path = paths[empty]
    result = CliRunner().invoke(
        main,
        [
            "learn",
            "--ham",
            str(corpus_files("ham")[0]),
            "--ham",
            str(path),
            "--model",
            str(model_path),
        ],
    )
    assert result.exit_code == 2
    assert str(path) in result.stderr
    assert "empty message" in result.stderr or "no messages found" in result.stderr
    assert model_path.read_bytes() == original  # nothing half-learned was saved


def test_learn_refuses_a_corrupt_model_without_touching_it(tmp_path):
    bad = tmp_path / "m.npz"
    bad.write_bytes(b"not a model")
    result = CliRunner().invoke(
        main, ["learn", "--ham", str(corpus_files("ham")[0]), "--model", str(bad)]
    )
    assert result.exit_code == 2
    assert "corrupt" in result.stderr
    assert bad.read_bytes() == b"not a model"


def test_check_json_shows_score_and_bayes_probability(trained, tmp_path):
    _, model = trained
    config = tmp_path / "mailflow.yaml"
    config.write_text(f"plugins: [{{name: bayes, settings: {{model: {model}}}}}]\n")
    spam = corpus_files("spam")[3]
    result = CliRunner().invoke(main, ["check", "--json", "--config", str(config), str(spam)])
    report = json.loads(result.stdout)
    assert report["score"] == report["plugins"]["bayes"]["score"]
    assert report["plugins"]["bayes"]["probability"] > 0.5
    assert report["plugins"]["bayes"]["tokens"]
