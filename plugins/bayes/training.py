"""Training, cross-validation and evaluation: plain functions the CLI and tests share."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np
from mailflow_plugins.bayes.features import Hasher, extract_tokens
from mailflow_plugins.bayes.model import DEFAULT_ALPHA, HAM, SPAM, Model, matrix
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import StratifiedKFold

CV_FOLDS = 5
CV_SEED = 0  # fixed, so a report can be reproduced
SPAM_THRESHOLD = 0.5  # probability at which a message counts as spam in reports


def featurize(
    messages: Iterable[bytes], hasher: Hasher, progress: Callable[[int], None] | None = None
) -> list[np.ndarray]:
    """Hashed feature indices of each message (one array per message)."""
    rows = []
    for raw in messages:
        rows.append(hasher.index(extract_tokens(raw)))
        if progress is not None:
            progress(1)
    return rows


def train(rows: list[np.ndarray], labels: np.ndarray, alpha: float = DEFAULT_ALPHA) -> Model:
    model = Model.empty(alpha=alpha)
    model.learn(rows, labels)
    return model


@dataclass
class Metrics:
    """Binary classification figures; spam is the positive class."""

    accuracy: float
    precision: float
    recall: float
    f1: float
    false_positive_rate: float
    true_positives: int  # spam caught
    false_positives: int  # ham flagged as spam
    true_negatives: int
    false_negatives: int  # spam missed
    ham: int
    spam: int
    threshold: float
    roc_auc: float | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def compute_metrics(
    labels: np.ndarray, probabilities: np.ndarray, threshold: float = SPAM_THRESHOLD
) -> Metrics:
    labels = np.asarray(labels)
    pred = np.asarray(probabilities) >= threshold
    tp = int(np.sum(pred & (labels == SPAM)))
    fp = int(np.sum(pred & (labels == HAM)))
    tn = int(np.sum(~pred & (labels == HAM)))
    fn = int(np.sum(~pred & (labels == SPAM)))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    auc = None
    if 0 < labels.sum() < len(labels):
        auc = round(float(roc_auc_score(labels, probabilities)), 6)
    return Metrics(
        accuracy=_ratio(tp + tn, len(labels)),
        precision=precision,
        recall=recall,
        f1=2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        false_positive_rate=_ratio(fp, fp + tn),
        true_positives=tp,
        false_positives=fp,
        true_negatives=tn,
        false_negatives=fn,
        ham=int(np.sum(labels == HAM)),
        spam=int(np.sum(labels == SPAM)),
        threshold=threshold,
        roc_auc=auc,
    )


def cross_validate(
    rows: list[np.ndarray],
    labels: np.ndarray,
    alpha: float = DEFAULT_ALPHA,
    folds: int = CV_FOLDS,
    n_features: int | None = None,
) -> tuple[Metrics, np.ndarray]:
    """Stratified k-fold: each message is scored by a model that never saw it.

    Returns the pooled metrics and the out-of-fold probabilities.
    """
    labels = np.asarray(labels)
    folds = min(folds, int(np.bincount(labels, minlength=2).min()))
    if folds < 2:
        raise ValueError("cross-validation needs at least two messages of each class")
    probs = np.zeros(len(labels))
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=CV_SEED)
    for train_idx, test_idx in skf.split(np.zeros(len(labels)), labels):
        model = Model.empty(alpha=alpha, **({"n_features": n_features} if n_features else {}))
        model.learn([rows[i] for i in train_idx], labels[train_idx])
        probs[test_idx] = model.probabilities(matrix([rows[i] for i in test_idx], model.n_features))
    return compute_metrics(labels, probs), probs


def format_report(m: Metrics, title: str) -> str:
    """The metrics table and confusion matrix as aligned text."""
    auc = f"{m.roc_auc:.4f}" if m.roc_auc is not None else "n/a"
    lines = [
        title,
        f"  messages        {m.ham + m.spam:>7}  (ham {m.ham}, spam {m.spam})",
        f"  accuracy        {m.accuracy:>7.2%}",
        f"  precision       {m.precision:>7.2%}",
        f"  recall (spam)   {m.recall:>7.2%}",
        f"  F1              {m.f1:>7.4f}",
        f"  false positives {m.false_positive_rate:>7.2%}  (ham flagged as spam)",
        f"  ROC AUC         {auc:>7}",
        "",
        "  confusion matrix   predicted ham  predicted spam",
        f"    actual ham       {m.true_negatives:>13}  {m.false_positives:>14}",
        f"    actual spam      {m.false_negatives:>13}  {m.true_positives:>14}",
    ]
    return "\n".join(lines)


def plot(labels: np.ndarray, probabilities: np.ndarray, path: str) -> None:
    """Score histogram per class and ROC curve into one PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError(
            "--plot needs matplotlib: pip install 'mailflow[plot]' (or pip install matplotlib)"
        ) from None
    labels = np.asarray(labels)
    fig, (hist, roc) = plt.subplots(1, 2, figsize=(11, 4.5))
    bins = np.linspace(0, 1, 41)
    hist.hist(probabilities[labels == HAM], bins=bins, alpha=0.6, label="ham", log=True)
    hist.hist(probabilities[labels == SPAM], bins=bins, alpha=0.6, label="spam", log=True)
    hist.set_xlabel("spam probability")
    hist.set_ylabel("messages (log scale)")
    hist.legend()
    if 0 < labels.sum() < len(labels):
        fpr, tpr, _ = roc_curve(labels, probabilities)
        roc.plot(fpr, tpr)
    roc.set_xscale("symlog", linthresh=0.01)
    roc.set_xlabel("false positive rate")
    roc.set_ylabel("spam recall")
    roc.set_title("ROC")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
