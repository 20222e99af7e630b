"""The naive Bayes model: counts, scoring, and a safe, versioned file format.

The model keeps naive Bayes' sufficient statistics (how many ham and spam
messages contain each hashed feature, and how many messages of each class were
seen), so learning one more message is an addition and the file has a fixed size
whatever the vocabulary. scikit-learn's :class:`~sklearn.naive_bayes.MultinomialNB`
turns the counts into per-feature log probabilities; scoring then needs only one
weight per feature (the spam/ham log-likelihood ratio), a gather and a sum.

File format (``.npz``, read with ``allow_pickle=False`` so loading can never run
code): a ``header`` array holding UTF-8 JSON (format name, version, hashing
parameters, class counts, provenance, and the SHA-256 of the count arrays) plus
``feature_counts`` (float32, 2 x n_features) and ``class_counts`` (float64, 2).
A file whose digest does not match is refused, so a truncated copy or a
half-written file is never half-used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from mailflow_plugins.bayes.features import HASH_SEED, N_FEATURES
from sklearn.naive_bayes import MultinomialNB

FORMAT = "mailflow-bayes"
FORMAT_VERSION = 1
HAM, SPAM = 0, 1
# Additive smoothing. Small because the hashed space is large: with alpha=1 the
# 2**20 pseudo-counts would outweigh the real ones and every unseen feature would
# push towards whichever class has fewer tokens.
DEFAULT_ALPHA = 0.01
MODEL_FILE_MODE = 0o644


class ModelError(Exception):
    """A model file is missing, corrupt, of another version, or not a model at all."""


def _digest(feature_counts: np.ndarray, class_counts: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(feature_counts).tobytes())
    h.update(np.ascontiguousarray(class_counts).tobytes())
    return h.hexdigest()


@dataclass
class Model:
    """Per-class document frequencies of hashed features, and what follows from them."""

    feature_counts: np.ndarray  # float32 (2, n_features): messages of each class with a feature
    class_counts: np.ndarray  # float64 (2,): messages of each class
    n_features: int = N_FEATURES
    seed: int = HASH_SEED
    alpha: float = DEFAULT_ALPHA
    info: dict[str, Any] = field(default_factory=dict)  # provenance: corpus, dates, counts
    _weights: np.ndarray | None = field(default=None, repr=False)
    _bias: float = 0.0

    @classmethod
    def empty(cls, n_features: int = N_FEATURES, alpha: float = DEFAULT_ALPHA) -> Model:
        return cls(
            np.zeros((2, n_features), dtype=np.float32),
            np.zeros(2, dtype=np.float64),
            n_features=n_features,
            alpha=alpha,
        )

    # --- learning -------------------------------------------------------------------------

    def learn(self, rows: list[np.ndarray], labels: list[int] | np.ndarray) -> None:
        """Add messages (hashed feature indices, one array per message) to the counts.

        Uses ``MultinomialNB.partial_fit`` so the counting is scikit-learn's own.
        """
        if not rows:
            return
        X = matrix(rows, self.n_features)
        nb = MultinomialNB(alpha=self.alpha)
        nb.partial_fit(X, np.asarray(labels), classes=[HAM, SPAM])
        self.feature_counts += nb.feature_count_.astype(np.float32)
        self.class_counts += nb.class_count_
        self._weights = None

    def estimator(self) -> MultinomialNB:
        """A fitted scikit-learn MultinomialNB equivalent to this model.

        Rebuilt through the public ``partial_fit``: row c is class c's counts divided
        by its message count, weighted by that count, which reproduces both.
        """
        nb = MultinomialNB(alpha=self.alpha)
        counts = np.maximum(self.class_counts, 1.0)
        X = sp.csr_matrix(self.feature_counts.astype(np.float64) / counts[:, None])
        nb.partial_fit(X, [HAM, SPAM], classes=[HAM, SPAM], sample_weight=counts)
        return nb

    def weights(self) -> np.ndarray:
        """Per-feature spam/ham log-likelihood ratios (computed once, then cached)."""
        if self._weights is None:
            if min(self.class_counts) <= 0:
                raise ModelError("the model needs at least one ham and one spam message")
            nb = self.estimator()
            flp = nb.feature_log_prob_
            self._weights = (flp[SPAM] - flp[HAM]).astype(np.float32)
            self._bias = float(nb.class_log_prior_[SPAM] - nb.class_log_prior_[HAM])
        return self._weights

    # --- scoring --------------------------------------------------------------------------

    def log_odds(self, indices: np.ndarray) -> float:
        """log P(spam | x) / P(ham | x) for a binary feature vector given by its indices."""
        weights = self.weights()
        return self._bias + float(weights[indices].sum(dtype=np.float64))

    def log_odds_of_columns(self, columns: np.ndarray) -> float:
        """``log_odds(np.unique(columns))`` for hashed columns that may repeat, faster.

        Sorts a copy and drops repeats only when there are any (two tokens of one
        message rarely share a column), so the sum runs in the same order as
        ``log_odds`` over ``np.unique`` and gives the same float.
        """
        cols = np.sort(columns)
        if len(cols) > 1 and (cols[1:] == cols[:-1]).any():
            cols = np.unique(cols)
        return self.log_odds(cols)

    def probability(self, indices: np.ndarray) -> float:
        return logistic(self.log_odds(indices))

    def probabilities(self, X: sp.csr_matrix) -> np.ndarray:
        """Spam probability of each row of a (binary) feature matrix."""
        weights = self.weights()
        z = X @ weights.astype(np.float64) + self._bias
        return 1.0 / (1.0 + np.exp(-np.clip(z, -700, 700)))

    def contributions(
        self, tokens: list[str], columns: np.ndarray, top: int
    ) -> list[dict[str, Any]]:
        """The ``top`` tokens that moved the score most (positive: towards spam).

        ``columns[i]`` is the hashed column of ``tokens[i]`` (see ``Hasher.columns``).
        """
        return self.score(tokens, columns, top)[1]

    def score(
        self, tokens: list[str], columns: np.ndarray, top: int
    ) -> tuple[float, list[dict[str, Any]]]:
        """``log_odds_of_columns(columns)`` and ``contributions(tokens, columns, top)`` at once.

        The message's weights are gathered once, in column order: the log-odds sum runs
        over the sorted unique columns exactly as :meth:`log_odds` does over
        ``np.unique`` (same values, same order, so the same float), and the top tokens
        are the first ``top`` of a stable sort of the same array by ``-|weight|``, so
        tokens tied on ``|weight|`` come in column order (the same on every machine; a
        stable sort of a message's few hundred weights costs no more than a partial
        sort and a sort of the chosen ones).
        """
        weights = self.weights()
        n = len(columns)
        order = columns.argsort()
        cols = columns[order]
        w = weights[cols]  # float32, column order
        if n > 1 and np.count_nonzero(cols[1:] == cols[:-1]):
            # Two tokens of the message share a column (rare): the sum counts it once.
            keep = np.empty(n, dtype=bool)
            keep[0] = True
            np.not_equal(cols[1:], cols[:-1], out=keep[1:])
            total = np.add.reduce(w[keep], dtype=np.float64)
        else:
            total = np.add.reduce(w, dtype=np.float64)
        log_odds = self._bias + float(total)
        if top <= 0 or not n:
            return log_odds, []
        best = np.negative(np.abs(w)).argsort(kind="stable")[:top]
        return log_odds, [
            {"token": tokens[i], "weight": _round3(v)}
            for i, v in zip(order[best].tolist(), w[best].tolist(), strict=True)
        ]

    # --- files ----------------------------------------------------------------------------

    def header(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "n_features": self.n_features,
            "hash": "murmurhash3_32",
            "seed": self.seed,
            "alpha": self.alpha,
            "ham_messages": int(self.class_counts[HAM]),
            "spam_messages": int(self.class_counts[SPAM]),
            "sha256": _digest(self.feature_counts, self.class_counts),
            "info": self.info,
        }

    def save(self, path: str | Path) -> None:
        """Write atomically: a temp file in the same directory, fsync, then rename."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = json.dumps(self.header(), sort_keys=True).encode()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, MODEL_FILE_MODE)  # mkstemp makes 0600; the server may run as another user
            with os.fdopen(fd, "wb") as fh:
                np.savez_compressed(
                    fh,
                    header=np.frombuffer(header, dtype=np.uint8),
                    feature_counts=self.feature_counts,
                    class_counts=self.class_counts,
                )
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)

    @classmethod
    def load(cls, path: str | Path) -> Model:
        """Read and verify a model file; raise :class:`ModelError` saying what is wrong."""
        path = Path(path)
        try:
            # Open the file ourselves: np.load leaks its handle when the zip is corrupt.
            with path.open("rb") as fh, np.load(fh, allow_pickle=False) as data:
                arrays = {key: data[key] for key in ("header", "feature_counts", "class_counts")}
        except FileNotFoundError:
            raise ModelError(f"{path}: no such model file") from None
        except KeyError as exc:
            raise ModelError(f"{path}: not a mailflow bayes model (missing {exc})") from None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise ModelError(f"{path}: unreadable or corrupt model file ({exc})") from None
        try:
            header = json.loads(arrays["header"].tobytes().decode())
        except (UnicodeDecodeError, ValueError):
            raise ModelError(f"{path}: corrupt model header") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ModelError(f"{path}: not a mailflow bayes model")
        if header.get("version") != FORMAT_VERSION:
            raise ModelError(
                f"{path}: model format version {header.get('version')} is not supported "
                f"(this mailflow reads version {FORMAT_VERSION}); retrain with `mailflow train`"
            )
        fc, cc = arrays["feature_counts"], arrays["class_counts"]
        n = header.get("n_features")
        if not isinstance(n, int) or n <= 0:
            raise ModelError(f"{path}: model header has no valid n_features")
        shapes_ok = fc.shape == (2, n) and cc.shape == (2,)
        if not shapes_ok or fc.dtype != np.float32 or cc.dtype != np.float64:
            raise ModelError(f"{path}: model arrays have the wrong shape or type")
        if _digest(fc, cc) != header.get("sha256"):
            raise ModelError(f"{path}: checksum mismatch (corrupt or modified model file)")
        return cls(
            fc.copy(),
            cc.copy(),
            n_features=int(n),
            seed=int(header.get("seed", HASH_SEED)),
            alpha=float(header.get("alpha", DEFAULT_ALPHA)),
            info=dict(header.get("info") or {}),
        )


def matrix(rows: list[np.ndarray], n_features: int) -> sp.csr_matrix:
    """Binary CSR matrix from per-message feature index arrays."""
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=indptr[1:])
    indices = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    data = np.ones(len(indices), dtype=np.float64)
    return sp.csr_matrix((data, indices, indptr), shape=(len(rows), n_features))


_ROUNDED: dict[float, float] = {}
_ROUNDED_MAX = 8192  # distinct weights remembered (a dict of floats: well under 1 MB)


def _round3(value: float) -> float:
    """``round(value, 3)``, memoised: ``round`` with digits formats the float (slow), and
    a model has a limited set of distinct weights. Zero is not memoised (0.0 and -0.0 are
    one dict key but round to different floats)."""
    if not value:
        return round(value, 3)
    rounded = _ROUNDED.get(value)
    if rounded is None:
        if len(_ROUNDED) >= _ROUNDED_MAX:
            _ROUNDED.clear()
        rounded = _ROUNDED[value] = round(value, 3)
    return rounded


def logistic(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def score_from_probability(p: float) -> float:
    """Spam probability -> mailflow score: 0 at p=0.5, +10 at p=1, -2 at p=0.

    Asymmetric on purpose: a confident "ham" should not be able to cancel strong
    spam evidence from other plugins, while a confident "spam" is strong evidence.
    """
    return round(20.0 * (p - 0.5) if p >= 0.5 else 4.0 * (p - 0.5), 3)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
