"""Spam classifier benchmark: accuracy on a held-out split, speed, model size, memory.

    python -m benchmarks.bench_bayes [--corpus ../shared/corpus] [--json]
    python -m benchmarks.bench_bayes --cross-origin ../shared/corpus-b [--json]

* accuracy: train on a stratified 80% of the shared corpus, report accuracy,
  false-positive rate and spam recall on the other 20% (``random_state=0``);
* training speed: feature extraction + learning on that 80%, messages/s;
* scoring speed: the plugin's own ``classify`` (features, hashing, score, top
  tokens) on the corpus messages of 4-6 KB, one thread pinned to one core,
  measured in CPU time (``time.process_time``) so that time spent waiting for a
  core another process holds is not counted: several passes, the median pass is
  the figure checked against the target, the best and worst are shown beside it,
  and so is the first pass (every message new to the token cache); then the
  same for the same messages with CRLF line ends, as ``serve`` hands them over;
* model file size (the shipped model) and the resident memory of ``mailflow
  serve`` with and without the bayes plugin enabled;
* ``--cross-origin DIR``, instead of all the above: a model trained on the whole
  ``--corpus`` (as the shipped one is) scores a validation corpus of other origins
  (``../shared/corpus-b``, never trained on), reported per subset
  (:data:`CROSS_SUBSETS`): accuracy, false-positive rate and spam recall at
  probabilities 0.5-0.9 (0.9 is the default Junk threshold), ROC AUC, a calibration
  table, beside the same for the held-out 20% of ``--corpus`` (in distribution);
  the mixed-origin subset also with header features masked and body only (its ham
  and spam differ in origin, which header tokens give away: see the corpus
  README); then the reverse direction.

Targets (from the issue): accuracy >= 99%, FPR <= 0.5%, recall >= 97%, scoring
>= 2,000 msg/s (median pass), training >= 1,000 msg/s, model file <= 20 MB.
Results are recorded in docs/performance.md, with the machine description this
script prints (CPU model, cores, load average before and after).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from mailflow_plugins.bayes import BayesPlugin, Settings, shipped_model_path
from mailflow_plugins.bayes.features import Hasher
from mailflow_plugins.bayes.model import Model, design_matrix
from mailflow_plugins.bayes.training import calibration, compute_metrics, featurize, train
from sklearn.model_selection import train_test_split

from benchmarks.report import cpu_model
from mailflow.config import load_config

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO.parent / "shared" / "corpus"
# corpus-b's subsets by source_corpus (README there): one shared origin, one mixed.
CROSS_SUBSETS = {
    "csdmc2010": ("csdmc2010",),
    "modern (usrp-users + phishing_pot)": ("usrp-users", "phishing_pot"),
}
# 0.9: score 8, where the default config files into .Junk; the others show the choice.
CROSS_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
JUNK_THRESHOLD = 0.9
# Token prefixes that come from header fields (docs/plugins/bayes.md, Features).
HEADER_PREFIXES = ("s:", "fn:", "f:", "to:", "rt:", "h:", "xm:", "rcv:")
TYPICAL = (4 * 1024, 6 * 1024)  # "typical 5 KB messages"
SCORING_SECONDS = 8.0  # keep scoring for at least this long ...
SCORING_ROUNDS = 9  # ... and at least this many passes over the message set
WARMUP_MESSAGES = 200  # messages (outside the timed set) that warm the caches first
SERVE_TIMEOUT = 60.0
TARGETS = {
    "accuracy": (">=", 0.99),
    "false_positive_rate": ("<=", 0.005),
    "recall": (">=", 0.97),
    "scoring_msgs_per_s": (">=", 2000),
    "scoring_crlf_msgs_per_s": (">=", 2000),
    "training_msgs_per_s": (">=", 1000),
    "model_file_mb": ("<=", 20),
}


def load_corpus(root: Path) -> tuple[list[bytes], np.ndarray]:
    rows = _read_manifest(root)
    raws = [(root / r["path"]).read_bytes() for r in rows]
    labels = np.array([1 if r["label"] == "spam" else 0 for r in rows])
    return raws, labels


def accuracy_and_training(raws: list[bytes], labels: np.ndarray) -> dict[str, Any]:
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(idx, test_size=0.2, stratify=labels, random_state=0)
    start, cpu_start = time.perf_counter(), time.process_time()
    rows = featurize((raws[i] for i in train_idx), Hasher())
    model, _ = train(rows, labels[train_idx])
    train_s, train_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    test_rows = featurize((raws[i] for i in test_idx), Hasher())
    probs = model.probabilities(design_matrix(test_rows, model.n_features))
    m = compute_metrics(labels[test_idx], probs)
    at_junk = compute_metrics(labels[test_idx], probs, JUNK_THRESHOLD)
    return {
        "train_messages": len(train_idx),
        "test_messages": len(test_idx),
        "training_msgs_per_s": round(len(train_idx) / train_cpu),
        "training_msgs_per_s_wall": round(len(train_idx) / train_s),
        **{k: v for k, v in m.as_dict().items() if k != "threshold"},
        "false_positive_rate_at_0.9": at_junk.false_positive_rate,
        "recall_at_0.9": at_junk.recall,
    }


def _evaluate(model: Model, rows: list[np.ndarray], labels: np.ndarray) -> dict[str, Any]:
    probs = model.probabilities(design_matrix(rows, model.n_features))
    entry: dict[str, Any] = {}
    for threshold in CROSS_THRESHOLDS:
        m = compute_metrics(labels, probs, threshold)
        entry[f"at {threshold}"] = {
            "accuracy": round(m.accuracy, 4),
            "false_positive_rate": round(m.false_positive_rate, 4),
            "recall": round(m.recall, 4),
        }
        entry["ham"], entry["spam"], entry["roc_auc"] = m.ham, m.spam, m.roc_auc
    entry["calibration"] = calibration(labels, probs)
    return entry


def _read_manifest(root: Path) -> list[dict[str, str]]:
    with (root / "MANIFEST.tsv").open() as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _variants(tokens: list[str]) -> dict[str, list[str]]:
    """The token sets scored: all, header features masked, body only."""
    return {
        "all features": tokens,
        "header features masked": [t for t in tokens if not t.startswith(HEADER_PREFIXES)],
        "body only": [t for t in tokens if ":" not in t],
    }


def cross_origin(train_root: Path, test_root: Path) -> dict[str, Any]:
    """Train on all of ``train_root``; score ``test_root`` per subset of CROSS_SUBSETS.

    Then the reverse: a model trained on all of ``test_root`` with header features
    masked (the mixed-origin subset's headers give its labels away) scores
    ``train_root``, with header features masked too. It is never shipped.
    """
    from mailflow_plugins.bayes.features import extract_tokens

    raws, labels = load_corpus(train_root)
    hasher = Hasher()
    train_tokens = [extract_tokens(raw) for raw in raws]
    train_rows = [hasher.index(t) for t in train_tokens]
    model, _ = train(train_rows, labels)
    rows = _read_manifest(test_root)
    vectors: dict[str, list[np.ndarray]] = {}
    for row in rows:
        tokens = extract_tokens((test_root / row["path"]).read_bytes())
        for variant, picked in _variants(tokens).items():
            vectors.setdefault(variant, []).append(hasher.index(picked))
    test_labels = np.array([1 if r["label"] == "spam" else 0 for r in rows])
    sources = np.array([r["source_corpus"] for r in rows])
    out: dict[str, Any] = {"train": str(train_root), "test": str(test_root)}
    # Beside them, in distribution: the benchmark's 80/20 split of the training corpus.
    fit_idx, held_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0
    )
    split_model, _ = train([train_rows[i] for i in fit_idx], labels[fit_idx])
    out[f"held-out 20% of {train_root.name} (model trained on the other 80%)"] = _evaluate(
        split_model, [train_rows[i] for i in held_idx], labels[held_idx]
    )
    for name, members in CROSS_SUBSETS.items():
        pick = np.flatnonzero(np.isin(sources, members))
        variants = ["all features"]
        if len(members) > 1:
            variants += ["header features masked", "body only"]
        for variant in variants:
            out[f"{name}, {variant}"] = _evaluate(
                model, [vectors[variant][i] for i in pick], test_labels[pick]
            )
    masked = "header features masked"
    reverse, _ = train(vectors[masked], test_labels)
    out[f"reverse: trained on {test_root.name} ({masked}), scored {train_root.name}"] = _evaluate(
        reverse,
        [hasher.index(_variants(t)[masked]) for t in train_tokens],
        labels,
    )
    return out


def print_cross_origin(result: dict[str, Any]) -> None:
    print(f"trained on {result['train']}, scored {result['test']}")
    print(f"{'subset':78s} {'thr':>4s} {'accuracy':>9s} {'FPR':>7s} {'recall':>7s} {'AUC':>7s}")
    for name, entry in result.items():
        if not isinstance(entry, dict):
            continue
        for threshold in CROSS_THRESHOLDS:
            m = entry[f"at {threshold}"]
            label = f"{name} ({entry['ham']} ham, {entry['spam']} spam)"
            print(
                f"{label:78s} {threshold:>4} {m['accuracy']:>9.2%} "
                f"{m['false_positive_rate']:>7.2%} {m['recall']:>7.2%} {entry['roc_auc']:>7}"
            )
        bands = " ".join(
            f"{b['band']}:{b['messages']}/{b['spam_share'] if b['spam_share'] is not None else '-'}"
            for b in entry["calibration"]
        )
        print(f"    calibration (band: messages/share spam) {bands}")


def scoring(raws: list[bytes], crlf: bool = False) -> dict[str, Any]:
    typical = [r for r in raws if TYPICAL[0] <= len(r) <= TYPICAL[1]]
    others = [r for r in raws if not TYPICAL[0] <= len(r) <= TYPICAL[1]]
    if crlf:  # the corpus files have LF line ends; SMTP (and so `serve`) has CRLF
        typical = [r.replace(b"\n", b"\r\n") for r in typical]
        others = [r.replace(b"\n", b"\r\n") for r in others]
    plugin = BayesPlugin(Settings(reload_interval=0))

    class _App:  # the one attribute mailflow_startup reads
        config = load_config(None)

    plugin.mailflow_startup(_App())
    # Warm the caches as a running server's would be, with other messages, so the
    # first timed pass sees every typical message for the first time.
    for raw in others[:WARMUP_MESSAGES]:
        plugin.classify(raw)
    # Several passes over the set in CPU time: the median is the figure; the best
    # pass (as timeit reports) and the worst show how much other processes on the
    # shared machine disturbed it (they compete for caches and memory bandwidth,
    # which CPU time cannot exclude).
    rates: list[float] = []
    wall_rates: list[float] = []
    start = time.perf_counter()
    while len(rates) < SCORING_ROUNDS or time.perf_counter() - start < SCORING_SECONDS:
        t0, c0 = time.perf_counter(), time.process_time()
        for raw in typical:
            plugin.classify(raw)
        rates.append(len(typical) / (time.process_time() - c0))
        wall_rates.append(len(typical) / (time.perf_counter() - t0))
    median = float(np.median(rates))
    return {
        "typical_messages": len(typical),
        "typical_mean_bytes": round(sum(map(len, typical)) / len(typical)),
        # CPU time is what "on one core" means; wall time also counts other
        # processes sharing the core, so it is reported beside it.
        "scoring_msgs_per_s": round(median),
        "scoring_msgs_per_s_best": round(max(rates)),
        "scoring_msgs_per_s_worst": round(min(rates)),
        "scoring_msgs_per_s_first_pass": round(rates[0]),
        "scoring_msgs_per_s_wall_median": round(float(np.median(wall_rates))),
        "scoring_us_per_msg_median": round(1e6 / median, 1),
        "scoring_rounds": len(rates),
    }


def machine() -> dict[str, Any]:
    """What the figures were measured on, for the docs."""
    import sklearn

    return {
        "cpu_model": cpu_model() or "unknown",
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scikit_learn": sklearn.__version__,
        "command": " ".join(["python -m benchmarks.bench_bayes", *sys.argv[1:]]),
    }


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def rss_of_serve(enable_bayes: bool) -> int:
    """Resident set size (KiB) of a started `mailflow serve` on loopback."""
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "mailflow.yaml"
        plugins = "[{name: bayes}]" if enable_bayes else "[]"
        config.write_text(
            f"server: {{listen: ['127.0.0.1:0']}}\n"
            f"delivery: {{maildir: {{root: {tmp}/mail}}}}\n"
            f"queue: {{directory: {tmp}/spool}}\nplugins: {plugins}\n"
        )
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from mailflow.cli import main; main()",
                "serve",
                "-c",
                str(config),
            ],
            cwd=tmp,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        try:
            deadline = time.monotonic() + SERVE_TIMEOUT
            assert proc.stderr is not None
            while time.monotonic() < deadline:
                line = proc.stderr.readline()
                if "listening on" in line or not line:
                    break
            time.sleep(0.5)
            status = Path(f"/proc/{proc.pid}/status").read_text()
            m = re.search(r"VmRSS:\s+(\d+) kB", status)
            return int(m.group(1)) if m else -1
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def check(results: dict[str, Any]) -> dict[str, bool]:
    out = {}
    for key, (op, target) in TARGETS.items():
        if key not in results:
            continue  # not measured in this run (--scoring-only)
        value = results[key]
        out[key] = value >= target if op == ">=" else value <= target
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-serve", action="store_true", help="skip the serve memory test")
    parser.add_argument(
        "--scoring-only", action="store_true", help="only the scoring speed (no accuracy, serve)"
    )
    parser.add_argument(
        "--cross-origin",
        type=Path,
        metavar="DIR",
        help="only: train on --corpus, score this corpus of other origins per subset",
    )
    args = parser.parse_args()
    if args.cross_origin is not None:
        result = cross_origin(args.corpus, args.cross_origin)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print_cross_origin(result)
        return
    results: dict[str, Any] = machine()
    results["load_average_before"] = load_average()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the target says
    raws, labels = load_corpus(args.corpus)
    results.update({"corpus": str(args.corpus), "messages": len(raws)})
    if not args.scoring_only:
        results.update(accuracy_and_training(raws, labels))
    results.update(scoring(raws))
    crlf = scoring(raws, crlf=True)
    for key in ("scoring_msgs_per_s", "scoring_msgs_per_s_best", "scoring_msgs_per_s_worst"):
        results[key.replace("scoring_", "scoring_crlf_")] = crlf[key]
    results["model_file_mb"] = round(shipped_model_path().stat().st_size / 1e6, 3)
    if not args.no_serve and not args.scoring_only:
        results["serve_rss_mb_without_bayes"] = round(rss_of_serve(False) / 1024, 1)
        results["serve_rss_mb_with_bayes"] = round(rss_of_serve(True) / 1024, 1)
    results["load_average_after"] = load_average()
    results["targets_met"] = check(results)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for key, value in results.items():
        if key != "targets_met":
            print(f"{key:<30} {value}")
    for key, ok in results["targets_met"].items():
        op, target = TARGETS[key]
        print(f"target {key:<23} {op} {target:<7} {'met' if ok else 'NOT MET'}")


if __name__ == "__main__":
    main()
