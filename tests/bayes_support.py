"""Shared helpers for the bayes plugin tests: the corpus slice and small models."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from mailflow_plugins.bayes.features import Hasher
from mailflow_plugins.bayes.model import HAM, SPAM, Model
from mailflow_plugins.bayes.training import featurize, train

CORPUS = Path(__file__).parent / "messages" / "corpus"


def corpus_files(label: str) -> list[Path]:
    return sorted((CORPUS / label).iterdir())


def split(seed: int = 0, test_fraction: float = 0.2) -> tuple[list[Path], list[Path]]:
    """A reproducible stratified train/test split of the slice (paths, label from dir)."""
    rng = random.Random(seed)
    train: list[Path] = []
    test: list[Path] = []
    for label in ("ham", "spam"):
        files = corpus_files(label)
        rng.shuffle(files)
        cut = int(len(files) * test_fraction)
        test += files[:cut]
        train += files[cut:]
    return train, test


def label_of(path: Path) -> int:
    return SPAM if path.parent.name == "spam" else HAM


def train_model(files: list[Path]) -> Model:
    rows = featurize((p.read_bytes() for p in files), Hasher())
    model, _ = train(rows, np.array([label_of(p) for p in files]), folds=3)
    return model


def mime_message(parts: list[tuple[str, bytes, dict[str, str]]], subject: str = "hello") -> bytes:
    """A multipart/mixed message from (content-type, already-encoded body, headers)."""
    boundary = "=_b0undary_="
    out = [
        b"From: Alice <alice@example.org>",
        b"To: bob@example.com",
        f"Subject: {subject}".encode(),
        b"MIME-Version: 1.0",
        f'Content-Type: multipart/mixed; boundary="{boundary}"'.encode(),
        b"",
        b"preamble",
    ]
    for ctype, body, headers in parts:
        out.append(f"--{boundary}".encode())
        out.append(f"Content-Type: {ctype}".encode())
        out += [f"{k}: {v}".encode() for k, v in headers.items()]
        out.append(b"")
        out.append(body)
    out.append(f"--{boundary}--".encode())
    out.append(b"epilogue")
    return b"\r\n".join(out) + b"\r\n"
