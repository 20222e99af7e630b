"""The spam model: logistic regression over hashed features, and a safe file format.

A message is a binary vector of hashed feature tokens in two blocks: body words
(the lower half of the columns) and prefixed tokens (subject, sender, URLs,
structure: the upper half, see ``features.Hasher``). Each block is scaled to unit
length, so 400 words of poisoned filler weigh as much as 100 words and cannot
drown the few structural tokens that give spam away; a block shorter than its
floor (BODY_FLOOR, META_FLOOR) is scaled as if it had that many tokens, so a short
message is not judged on a handful of words as if they were certain.

The model is one weight per column and a bias, fitted by scikit-learn's
:class:`~sklearn.linear_model.LogisticRegression` (L2-regularised, classes
balanced, so a message with no evidence either way scores about 0.5), and a
``scale`` that calibrates the log-odds: fitted by Platt scaling, without an
intercept, on out-of-fold scores of the training mail (``training.train``).
Learning one more message (``learn``) is a few gradient steps on that message
alone, from the current weights.

File format (``.npz``, read with ``allow_pickle=False`` so loading can never run
code): a ``header`` array holding UTF-8 JSON (format name, version, hashing
parameters, bias, scale, message counts, provenance, and the SHA-256 of the
arrays) plus ``weights`` (float32, n_features) and ``class_counts`` (float64, 2:
ham and spam messages it was trained and taught on). A file whose digest does not
match is refused, so a truncated copy or a half-written file is never half-used.
Version 1 files (the naive Bayes model of earlier releases) are refused with a
message saying to retrain.
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from mailflow_plugins.bayes.features import HASH_SEED, N_FEATURES

FORMAT = "mailflow-bayes"
FORMAT_VERSION = 2
HAM, SPAM = 0, 1
# Inverse L2 regularisation strength of the logistic regression, chosen by the
# cross-origin figures (docs/plugins/bayes.md, "How the model was chosen").
DEFAULT_C = 3.0
# A block counts as at least this many tokens when it is scaled: a short message
# carries less evidence than a long one, so its few words must not weigh as much
# as a whole letter's (docs/plugins/bayes.md, "How the model was chosen").
BODY_FLOOR = 100
META_FLOOR = 30
# Learning one message: at most this many gradient steps of this size on it.
LEARN_STEPS = 8
LEARN_RATE = 0.5
MODEL_FILE_MODE = 0o644


class ModelError(Exception):
    """A model file is missing, corrupt, of another version, or not a model at all."""


def _digest(weights: np.ndarray, class_counts: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(weights).tobytes())
    h.update(np.ascontiguousarray(class_counts).tobytes())
    return h.hexdigest()


def block_factors(n_body: int, n_meta: int) -> tuple[float, float]:
    """The value of a body word and of a prefixed token in a message with these counts."""
    return 1.0 / math.sqrt(max(n_body, BODY_FLOOR)), 1.0 / math.sqrt(max(n_meta, META_FLOOR))


def block_values(cols: np.ndarray, half: int) -> np.ndarray:
    """The value of each of a message's sorted unique columns (see ``block_factors``)."""
    n_body = int(np.searchsorted(cols, half))
    body, meta = block_factors(n_body, len(cols) - n_body)
    values = np.empty(len(cols), dtype=np.float64)
    values[:n_body] = body
    values[n_body:] = meta
    return values


def design_matrix(rows: Sequence[np.ndarray], n_features: int) -> sp.csr_matrix:
    """The model's input: one row per message (sorted unique columns), blocks scaled."""
    half = n_features // 2
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=indptr[1:])
    if rows:
        indices = np.concatenate(rows).astype(np.int64, copy=False)
        data = np.concatenate([block_values(r, half) for r in rows])
    else:
        indices, data = np.zeros(0, dtype=np.int64), np.zeros(0)
    return sp.csr_matrix((data, indices, indptr), shape=(len(rows), n_features))


@dataclass
class Model:
    """Per-column weights, bias and calibration scale; see the module docstring."""

    weights: np.ndarray  # float32 (n_features,)
    bias: float = 0.0
    scale: float = 1.0
    class_counts: np.ndarray = field(default_factory=lambda: np.zeros(2))  # messages seen
    n_features: int = N_FEATURES
    seed: int = HASH_SEED
    C: float = DEFAULT_C
    info: dict[str, Any] = field(default_factory=dict)  # provenance: corpus, dates, counts

    @property
    def half(self) -> int:
        return self.n_features // 2

    # --- learning -------------------------------------------------------------------------

    def learn(self, rows: Sequence[np.ndarray], labels: Sequence[int] | np.ndarray) -> None:
        """Teach the model these messages (sorted unique columns each), one at a time.

        Gradient steps of the logistic loss on each message alone, from the current
        weights, until it is on the right side with some margin (at most LEARN_STEPS).
        The bias is left alone, so teaching many messages of one class does not shift
        the verdict on everything else.
        """
        labels = np.asarray(labels)
        weights = self.weights.astype(np.float64)
        for cols, label in zip(rows, labels, strict=True):
            if not len(cols):
                continue
            values = block_values(cols, self.half)
            for _ in range(LEARN_STEPS):
                z = self.scale * (self.bias + float(weights[cols] @ values))
                error = logistic(z) - float(label)
                if abs(error) < 0.05:
                    break
                weights[cols] -= LEARN_RATE * error * values
            self.class_counts[int(label)] += 1
        self.weights = weights.astype(np.float32)

    # --- scoring --------------------------------------------------------------------------

    def log_odds(self, cols: np.ndarray) -> float:
        """Calibrated log P(spam | x) / P(ham | x) for sorted unique columns ``cols``."""
        values = block_values(cols, self.half)
        total = float(self.weights[cols].astype(np.float64) @ values)
        return self.scale * (self.bias + total)

    def probability(self, cols: np.ndarray) -> float:
        return logistic(self.log_odds(cols))

    def probabilities(self, X: sp.csr_matrix) -> np.ndarray:
        """Spam probability of each row of a ``design_matrix``."""
        z = self.scale * (X @ self.weights.astype(np.float64) + self.bias)
        return 1.0 / (1.0 + np.exp(-np.clip(z, -700, 700)))

    def score(
        self, tokens: list[str], columns: np.ndarray, top: int
    ) -> tuple[float, list[dict[str, Any]]]:
        """The calibrated log-odds and the ``top`` tokens' contributions to it.

        A token's ``weight`` is what it added to the log-odds: its column's weight
        times its block's scale times the calibration scale, so the listed weights
        and the bias add up to the log-odds. Two tokens of one message that share a
        column count once (the first one is listed). Ties on ``|weight|`` come in
        column order, so the list is the same on every run.
        """
        n = len(columns)
        order = columns.argsort(kind="stable")
        cols = columns[order]
        if n > 1 and np.count_nonzero(cols[1:] == cols[:-1]):
            keep = np.empty(n, dtype=bool)
            keep[0] = True
            np.not_equal(cols[1:], cols[:-1], out=keep[1:])
            cols, order = cols[keep], order[keep]
        w = self.weights[cols]  # float32, column order: body words first
        n = len(cols)
        n_body = int(cols.searchsorted(self.half))
        body_factor, meta_factor = block_factors(n_body, n - n_body)
        body_factor *= self.scale
        meta_factor *= self.scale
        log_odds = (
            self.scale * self.bias
            + body_factor * float(np.add.reduce(w[:n_body], dtype=np.float64))
            + meta_factor * float(np.add.reduce(w[n_body:], dtype=np.float64))
        )
        if top <= 0 or not n:
            return log_odds, []
        # Rank by |contribution| in float32 (cheap); the listed values are exact.
        magnitude = np.abs(w)
        magnitude[:n_body] *= body_factor
        magnitude[n_body:] *= meta_factor
        best = np.negative(magnitude).argsort(kind="stable")[:top]
        factors = np.where(best < n_body, body_factor, meta_factor)
        weights = np.round(w[best].astype(np.float64) * factors, 3).tolist()
        return log_odds, [
            {"token": tokens[i], "weight": v}
            for i, v in zip(order[best].tolist(), weights, strict=True)
        ]

    # --- files ----------------------------------------------------------------------------

    def header(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "kind": "logistic",
            "n_features": self.n_features,
            "hash": "murmurhash3_32",
            "seed": self.seed,
            "bias": self.bias,
            "scale": self.scale,
            "C": self.C,
            "body_floor": BODY_FLOOR,
            "meta_floor": META_FLOOR,
            "ham_messages": int(self.class_counts[HAM]),
            "spam_messages": int(self.class_counts[SPAM]),
            "sha256": _digest(self.weights, self.class_counts),
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
                    weights=self.weights,
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
                header_bytes = data["header"]
                try:
                    header = json.loads(header_bytes.tobytes().decode())
                except (UnicodeDecodeError, ValueError, RecursionError):
                    raise ModelError(f"{path}: corrupt model header") from None
                if not isinstance(header, dict) or header.get("format") != FORMAT:
                    raise ModelError(f"{path}: not a mailflow bayes model")
                if header.get("version") != FORMAT_VERSION:
                    raise ModelError(
                        f"{path}: model format version {header.get('version')} is not "
                        f"supported (this mailflow reads version {FORMAT_VERSION}); "
                        "retrain with `mailflow train`"
                    )
                arrays = {key: data[key] for key in ("weights", "class_counts")}
        except FileNotFoundError:
            raise ModelError(f"{path}: no such model file") from None
        except KeyError as exc:
            raise ModelError(f"{path}: not a mailflow bayes model (missing {exc})") from None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise ModelError(f"{path}: unreadable or corrupt model file ({exc})") from None
        weights, cc = arrays["weights"], arrays["class_counts"]
        n = header.get("n_features")
        if not isinstance(n, int) or n < 2 or n & (n - 1):
            raise ModelError(f"{path}: model header has no valid n_features")
        if weights.shape != (n,) or cc.shape != (2,):
            raise ModelError(f"{path}: model arrays have the wrong shape")
        if weights.dtype != np.float32 or cc.dtype != np.float64:
            raise ModelError(f"{path}: model arrays have the wrong type")
        if _digest(weights, cc) != header.get("sha256"):
            raise ModelError(f"{path}: checksum mismatch (corrupt or modified model file)")
        seed = header.get("seed", HASH_SEED)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
            raise ModelError(f"{path}: model header has no valid hash seed")
        if not isinstance(header.get("info", {}), dict):
            raise ModelError(f"{path}: model header's info is not an object")
        numbers = {key: header.get(key) for key in ("bias", "scale", "C")}
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in numbers.values()):
            raise ModelError(f"{path}: model header has no valid bias, scale and C")
        if (header.get("body_floor"), header.get("meta_floor")) != (BODY_FLOOR, META_FLOOR):
            raise ModelError(
                f"{path}: model was trained with other block floors than this mailflow "
                "uses; retrain with `mailflow train`"
            )
        if not np.isfinite(weights).all():
            raise ModelError(f"{path}: model weights are not all finite numbers")
        return cls(
            weights.copy(),
            bias=float(header["bias"]),
            scale=float(header["scale"]),
            class_counts=cc.copy(),
            n_features=n,
            seed=seed,
            C=float(header["C"]),
            info=dict(header.get("info") or {}),
        )


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
