"""``mailflow train``, ``mailflow learn`` and ``mailflow evaluate``.

Progress bars and notes go to stderr, so ``evaluate --json`` prints exactly one
JSON object on stdout.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np
from click.core import ParameterSource
from mailflow_plugins.bayes import JUNK_FOLDER
from mailflow_plugins.bayes.features import Hasher
from mailflow_plugins.bayes.model import (
    DEFAULT_C,
    HAM,
    SPAM,
    Model,
    ModelError,
    design_matrix,
    now,
)
from mailflow_plugins.bayes.sources import SourceError, count_messages, iter_messages
from mailflow_plugins.bayes.training import (
    CV_FOLDS,
    calibration,
    compute_metrics,
    featurize,
    folds_for,
    format_calibration,
    format_report,
    plot,
    train,
)

DEFAULT_MODEL = "bayes-model.npz"
MODEL_HELP = "Model file to {}"
SOURCE_HELP = "{}: a directory of .eml files, an mbox file or a Maildir (repeatable)."


def _fail(message: str) -> None:
    click.echo(f"mailflow: {message}", err=True)
    sys.exit(2)


def _read(paths: tuple[str, ...], label: str, hasher: Hasher) -> list[np.ndarray]:
    """Featurize every message under ``paths`` with a progress bar on stderr."""
    try:
        total = count_messages(list(paths))
    except SourceError as exc:
        _fail(str(exc))
    rows: list[np.ndarray] = []

    def messages() -> Iterator[bytes]:
        for path in paths:
            found = 0
            for raw in iter_messages(path):
                if not raw.strip():
                    _fail(f"{path}: an empty message (nothing to learn from)")
                found += 1
                yield raw
            if not found:
                _fail(f"{path}: no messages found")

    with click.progressbar(
        length=total, label=f"reading {label:<4}", file=sys.stderr, show_pos=True
    ) as bar:
        rows = featurize(messages(), hasher, bar.update)
    return rows


def _load_model(path: Path) -> Model:
    try:
        return Model.load(path)
    except ModelError as exc:
        _fail(str(exc))
        raise  # unreachable; keeps type checkers calm


@click.command("train")
@click.option("--spam", "spam", multiple=True, required=True, help=SOURCE_HELP.format("Spam"))
@click.option("--ham", "ham", multiple=True, required=True, help=SOURCE_HELP.format("Ham"))
@click.option(
    "--model",
    "-o",
    "model_path",
    type=click.Path(dir_okay=False),
    default=DEFAULT_MODEL,
    show_default=True,
    help=MODEL_HELP.format("write (atomically)."),
)
@click.option(
    "--folds",
    default=CV_FOLDS,
    show_default=True,
    help="Cross-validation folds, which also calibrate the model; 0 skips both.",
)
@click.option(
    "--C",
    "C",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_C,
    show_default=True,
    help="Inverse regularisation strength of the logistic regression.",
)
def train_command(
    spam: tuple[str, ...], ham: tuple[str, ...], model_path: str, folds: int, C: float
) -> None:
    """Train a new spam model from labelled mail and report its cross-validated accuracy."""
    hasher = Hasher()
    ham_rows = _read(ham, "ham", hasher)
    spam_rows = _read(spam, "spam", hasher)
    click.echo(f"messages: {len(ham_rows)} ham, {len(spam_rows)} spam")
    if not ham_rows or not spam_rows:
        _fail("training needs at least one ham and one spam message")
    rows = ham_rows + spam_rows
    labels = np.array([HAM] * len(ham_rows) + [SPAM] * len(spam_rows))
    model, metrics = train(rows, labels, C=C, folds=folds)
    if metrics is not None:
        used = folds_for(labels, folds)
        click.echo(format_report(metrics, f"{used}-fold cross-validation (calibrated):"))
    else:
        click.echo("not calibrated: too few messages for cross-validation", err=True)
    model.info = {"trained": now(), "sources": {"ham": list(ham), "spam": list(spam)}}
    model.save(model_path)
    click.echo(f"wrote {model_path}; enable it with the bayes plugin setting `model: {model_path}`")


@click.command("learn")
@click.option("--spam", "spam", multiple=True, help=SOURCE_HELP.format("Spam"))
@click.option("--ham", "ham", multiple=True, help=SOURCE_HELP.format("Ham"))
@click.option(
    "--maildir",
    "maildirs",
    multiple=True,
    type=click.Path(file_okay=False),
    help="A user's Maildir: learn what the user moved into or out of its .Junk folder "
    "since the last run (repeatable).",
)
@click.option(
    "--status-header",
    default="X-Spam-Status",
    show_default=True,
    help="With --maildir: the plugin's status_header, which says whether mailflow "
    "itself filed a message as spam.",
)
@click.option(
    "--model",
    "model_path",
    type=click.Path(dir_okay=False),
    default=DEFAULT_MODEL,
    show_default=True,
    help=MODEL_HELP.format("update; created from the shipped model if missing."),
)
def learn_command(
    spam: tuple[str, ...],
    ham: tuple[str, ...],
    maildirs: tuple[str, ...],
    status_header: str,
    model_path: str,
) -> None:
    """Teach the model that some mail is spam and some is ham, as `train` takes them.

    Like sa-learn: run it on folders users move misclassified mail into. Every path
    must hold at least one non-empty message. A running `mailflow serve` whose
    `model` (or `learn_model`) setting names the same file picks up the change.

    --maildir ROOT (from cron) learns a user's own corrections only: a message in
    ROOT/.Junk that mailflow did not mark spam (the status header does not say Yes:
    the user moved it in) as spam, a message in the inbox that mailflow marked spam
    (the user moved it out of .Junk) as ham; everything else is where mailflow put
    it and is skipped. Only messages not seen at the last run are looked at (kept
    in ROOT/mailflow-learned), so a second run with no changes learns nothing.
    """
    from mailflow_plugins.bayes.learning import (
        STATE_FILE,
        check_maildir,
        model_lock,
        read_state,
        scan_maildir,
        write_state,
    )

    if not spam and not ham and not maildirs:
        _fail("say what to learn: --spam PATH, --ham PATH and/or --maildir ROOT")
    ctx = click.get_current_context()
    if maildirs and ctx.get_parameter_source("model_path") is ParameterSource.DEFAULT:
        # From cron a default file in the current directory would be learned into
        # and never scored with: say which file, the plugin's learn_model.
        _fail("--maildir needs --model: the file the bayes plugin's learn_model names")
    roots = [Path(root) for root in maildirs]
    for root in roots:
        problem = check_maildir(root)
        if problem:
            _fail(problem)
    path = Path(model_path)
    failed = False
    with model_lock(path):  # another learner (quarantine feedback) waits for this one
        if path.exists():
            model = _load_model(path)
        else:
            from mailflow_plugins.bayes import shipped_model_path

            model = _load_model(shipped_model_path())
            click.echo(f"{path} does not exist: starting from the shipped model", err=True)
        hasher = Hasher(model.n_features, model.seed)
        ham_rows = _read(ham, "ham", hasher) if ham else []
        spam_rows = _read(spam, "spam", hasher) if spam else []
        scans = []
        for root in roots:
            found = scan_maildir(root, status_header, read_state(root), hasher)
            scans.append(found)
            unreadable = f", {found.unreadable} unreadable" if found.unreadable else ""
            click.echo(
                f"{found.root}: {found.new} new message(s): {len(found.spam)} moved into "
                f"{JUNK_FOLDER} (spam), {len(found.ham)} moved out of it (ham), "
                f"{found.skipped} where mailflow put them (skipped){unreadable}"
            )
            spam_rows += found.spam
            ham_rows += found.ham
        if ham_rows or spam_rows:  # else the file is left alone (no needless reload)
            model.learn(ham_rows + spam_rows, [HAM] * len(ham_rows) + [SPAM] * len(spam_rows))
            model.info = {**model.info, "updated": now()}
            model.save(path)
        # Once the model is saved, and before the lock is released (a run that starts
        # meanwhile must see what this one learned). A state that cannot be written
        # is reported; those messages are looked at again next run, where learning
        # one that is already on the right side changes (almost) nothing.
        for found in scans:
            try:
                write_state(found.root, found.present)
            except OSError as exc:
                click.echo(
                    f"mailflow: {found.root / STATE_FILE}: cannot write it ({exc}); "
                    "its messages will be looked at again",
                    err=True,
                )
                failed = True
    if not ham_rows and not spam_rows:
        click.echo(f"learned 0 ham and 0 spam message(s); {path} left as it was")
    else:
        total_ham, total_spam = (int(c) for c in model.class_counts)
        click.echo(
            f"learned {len(ham_rows)} ham and {len(spam_rows)} spam message(s); "
            f"{path} has now seen {total_ham} ham, {total_spam} spam"
        )
    if failed:
        sys.exit(1)


@click.command("evaluate")
@click.option("--spam", "spam", multiple=True, required=True, help=SOURCE_HELP.format("Spam"))
@click.option("--ham", "ham", multiple=True, required=True, help=SOURCE_HELP.format("Ham"))
@click.option(
    "--model",
    "model_path",
    type=click.Path(dir_okay=False),
    default=None,
    help=MODEL_HELP.format("evaluate (default: the shipped model)."),
)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a PNG.")
@click.option(
    "--threshold",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Probability at which a message counts as spam (0.9: the default Junk threshold).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate_command(
    spam: tuple[str, ...],
    ham: tuple[str, ...],
    model_path: str | None,
    plot_path: str | None,
    threshold: float,
    as_json: bool,
) -> None:
    """Score labelled mail with a model: metrics, confusion matrix, calibration, plot."""
    from mailflow_plugins.bayes import shipped_model_path

    path = Path(model_path) if model_path else shipped_model_path()
    model = _load_model(path)
    hasher = Hasher(model.n_features, model.seed)
    ham_rows = _read(ham, "ham", hasher)
    spam_rows = _read(spam, "spam", hasher)
    rows = ham_rows + spam_rows
    labels = np.array([HAM] * len(ham_rows) + [SPAM] * len(spam_rows), dtype=np.int64)
    if not rows:
        _fail("no messages found")
    probabilities = model.probabilities(design_matrix(rows, model.n_features))
    metrics = compute_metrics(labels, probabilities, threshold)
    table = calibration(labels, probabilities)
    if plot_path:
        try:
            plot(labels, probabilities, plot_path)
        except RuntimeError as exc:
            _fail(str(exc))
        click.echo(f"wrote {plot_path}", err=True)
    if as_json:
        out: dict[str, Any] = {"model": str(path), **metrics.as_dict(), "calibration": table}
        click.echo(json.dumps(out))
    else:
        click.echo(format_report(metrics, f"model {path}, spam at probability >= {threshold}:"))
        click.echo(format_calibration(table))


def register(cli: click.Group) -> None:
    for command in (train_command, learn_command, evaluate_command):
        cli.add_command(command)
