"""Statistical spam scoring: logistic regression over hashed, email-aware features.

The plugin loads its model once at start-up (the one shipped in ``data/`` unless
``model`` names another file), scores every message at end of DATA in a worker
thread, adds ``X-Spam-Score`` / ``X-Spam-Status`` headers and contributes a score
to the message total, which the core's ``actions`` thresholds turn into an
action. Optional thresholds of its own (on the spam probability) can junk,
quarantine or reject directly. See docs/plugins/bayes.md.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import itertools
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from mailflow_plugins.bayes.features import Hasher, extract_tokens
from mailflow_plugins.bayes.model import Model, ModelError, logistic, score_from_probability
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mailflow.api import (
    AddHeader,
    App,
    MessageContext,
    RemoveHeader,
    Result,
    Route,
    RouteKind,
    SetRoute,
    hookimpl,
    mime,
)

log = logging.getLogger("mailflow.bayes")

SHIPPED_MODEL = "data/model.npz"
JUNK_FOLDER = ".Junk"
# Scoring a typical message takes ~0.3-0.5 ms but a 512 KB one takes tens of ms:
# below this size the thread hand-off would cost more than it saves.
INLINE_MAX_BYTES = 8 * 1024
_HEADER_CACHE_MAX = 4096  # distinct probabilities whose header fields are kept


def shipped_model_path() -> Path:
    """The model trained on the project's corpus that ships inside the package."""
    return Path(str(importlib.resources.files("mailflow_plugins.bayes").joinpath(SHIPPED_MODEL)))


Probability = float  # 0..1


class BayesSettings(BaseModel):
    """``plugins: [{name: bayes, settings: {...}}]`` in mailflow.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Path | None = None  # None: the model shipped with mailflow
    # Where feedback (hook mailflow_learn) is learned into. None: into `model` when
    # that is set; with neither, nothing is learned (the shipped model is read-only).
    # With `model` unset the plugin scores with this file as soon as it exists (until
    # then with the shipped model, which learning starts from); with `model` set it
    # must name the same file, so what is learned is what is scored with.
    learn_model: Path | None = None
    reload_interval: float = Field(
        default=5.0, ge=0
    )  # seconds between mtime checks; 0: never reload
    score_header: str = "X-Spam-Score"
    status_header: str = "X-Spam-Status"
    # Probability at which X-Spam-Status says "Yes" (the tag). 0.9 is score 8, where the
    # embedded default's `actions.junk` files mail into .Junk, so the header agrees with
    # what happened to the message. The plugin's own actions below are off by default:
    # the central `actions` thresholds decide from the score.
    spam_threshold: Probability = Field(default=0.9, ge=0, le=1)
    junk: Probability | None = Field(default=None, ge=0, le=1)
    quarantine: Probability | None = Field(default=None, ge=0, le=1)
    reject: Probability | None = Field(default=None, ge=0, le=1)
    top_tokens: int = Field(default=10, ge=0, le=100)

    @model_validator(mode="after")
    def _learn_model_is_scored(self) -> BayesSettings:
        model, learn = self.model, self.learn_model
        if model is not None and learn is not None and model.resolve() != learn.resolve():
            raise ValueError(
                f"learn_model ({learn}) is not model ({model}): what is learned would never "
                "be scored with; set model to the same file, or only one of the two"
            )
        return self

    def learning_target(self) -> Path | None:
        """The model file feedback is learned into; None: learning is not configured."""
        return self.learn_model or self.model

    @model_validator(mode="after")
    def _ordered(self) -> BayesSettings:
        levels = [("junk", self.junk), ("quarantine", self.quarantine), ("reject", self.reject)]
        given = [(name, value) for name, value in levels if value is not None]
        for (lo_name, lo), (hi_name, hi) in itertools.pairwise(given):
            if lo > hi:
                raise ValueError(f"{lo_name} ({lo}) must not be above {hi_name} ({hi})")
        return self


Settings = BayesSettings  # the name the plugin docs and tests use


class ModelHolder:
    """The current model and where it came from; reloads when the file changes.

    A reload that fails (a half-copied or corrupt file) is logged and the last good
    model stays in service, so a bad file never stops mail.
    """

    def __init__(self, path: Path, reload_interval: float, fallback: Path | None = None) -> None:
        """``fallback``: the model to score with while ``path`` does not exist (the
        shipped one, until learning creates ``learn_model``); then ``path`` is loaded
        as soon as it appears, like a changed file."""
        self.path = path
        self.reload_interval = reload_interval
        self.loaded_from = path
        if fallback is not None and not path.exists():
            self.loaded_from = fallback
        # At start-up a bad model is an error, not a warning.
        self.model = Model.load(self.loaded_from)
        self._stamp = self._file_stamp()
        self._checked = time.monotonic()
        self._lock = threading.Lock()
        self.reloads = 0
        self.last_error = ""

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def due(self) -> bool:
        """True when the next ``maybe_reload`` would look at the file (no I/O)."""
        return bool(self.reload_interval) and (
            time.monotonic() - self._checked >= self.reload_interval
        )

    def maybe_reload(self) -> None:
        """Reload if the file changed; cheap (one stat at most every reload_interval)."""
        if not self.due():
            return
        now = time.monotonic()
        with self._lock:
            self._checked = now
            stamp = self._file_stamp()
            if stamp is None or stamp == self._stamp:
                return
            self._stamp = stamp
            try:
                model = Model.load(self.path)
            except ModelError as exc:
                self.last_error = str(exc)
                log.error("bayes: keeping the previous model: %s", exc)
                return
            self.model = model
            self.loaded_from = self.path
            self.reloads += 1
            self.last_error = ""
            log.info("bayes: reloaded model %s", self.path)


class BayesPlugin:
    """The ``bayes`` plugin object (one per application)."""

    Settings = BayesSettings
    # Its data hook is CPU work on the message content, linear in the message size: a
    # large message is analysed in a content-analysis worker process, where it cannot
    # hold up the server and a timeout really stops it (docs/plugins.md, "Isolation").
    isolate = "large"

    def __init__(self, settings: BayesSettings | None = None) -> None:
        self.settings = settings or BayesSettings()
        self._hashers: dict[tuple[int, int], Hasher] = {}  # per (n_features, seed)
        self.holder: ModelHolder | None = None
        self.local_maildir: Any = None  # callable: recipient -> True when filed locally
        s = self.settings
        # Header mutations are immutable values: the removals are built once, the
        # additions once per distinct probability (see _status_headers).
        self._remove_headers = (RemoveHeader(s.score_header), RemoveHeader(s.status_header))
        self._headers_by_p: dict[float, tuple[float, AddHeader, AddHeader]] = {}
        self._warned_not_learning = False

    @hookimpl
    def mailflow_startup(self, app: App) -> None:
        s = self.settings
        fallback = shipped_model_path() if s.model is None and s.learn_model else None
        path = s.model or s.learn_model or shipped_model_path()
        try:
            self.holder = ModelHolder(Path(path), s.reload_interval, fallback)
        except ModelError as exc:
            raise ModelError(f"bayes: cannot load model: {exc}") from None
        path = self.holder.loaded_from
        config = app.config
        maildir = config.delivery.method == "maildir"

        def local_maildir(rcpt: str) -> bool:
            return maildir and config.is_local_domain(rcpt.rpartition("@")[2])

        self.local_maildir = local_maildir
        model = self.holder.model
        log.info(
            "bayes: model %s (%d ham, %d spam)",
            path,
            model.class_counts[0],
            model.class_counts[1],
        )

    def classify(self, message: bytes | mime.MessageView) -> dict[str, Any]:
        """Spam probability, log-odds and top tokens of one message (raw bytes or the
        shared view of a message in the pipeline; thread-safe)."""
        holder = self.holder
        if holder is None:
            raise RuntimeError("bayes: mailflow_startup has not run")
        holder.maybe_reload()
        return self._classify(message, holder.model)

    def _classify(self, message: bytes | mime.MessageView, model: Model) -> dict[str, Any]:
        """``classify`` with the model given (no reload check)."""
        tokens = extract_tokens(message)
        top = self.settings.top_tokens
        log_odds, contributions = model.score(tokens, self.hasher(model).column_array(tokens), top)
        details: dict[str, Any] = {
            "probability": round(logistic(log_odds), 6),
            "log_odds": round(log_odds, 3),
        }
        if top:
            details["tokens"] = contributions
        return details

    def hasher(self, model: Model) -> Hasher:
        """The token hasher of ``model``'s hashing parameters (a model file may have
        been trained with others than the defaults; its columns must match)."""
        key = (model.n_features, model.seed)
        hasher = self._hashers.get(key)
        if hasher is None:
            hasher = self._hashers[key] = Hasher(model.n_features, model.seed)
        return hasher

    @hookimpl
    async def mailflow_data(self, message: MessageContext) -> Result:
        holder = self.holder
        if holder is None:
            raise RuntimeError("bayes: mailflow_startup has not run")
        if holder.due():
            # Loading a model takes ~0.1 s: never on the event loop.
            await asyncio.to_thread(holder.maybe_reload)
        # The view is shared with the other plugins (rules): the message is walked and
        # its text decoded once, by whichever plugin asks first.
        view = mime.view(message)
        if view.size > INLINE_MAX_BYTES:
            details = await asyncio.to_thread(self._classify, view, holder.model)
        else:
            details = self._classify(view, holder.model)
        return self.result(details, message.envelope.rcpt_tos)

    def _status_headers(self, p: Probability) -> tuple[float, AddHeader, AddHeader]:
        """Score and the two header fields for probability ``p`` (memoised: most mail
        scores close to 0 or 1, so the same few values come back)."""
        cached = self._headers_by_p.get(p)
        if cached is None:
            s = self.settings
            score = score_from_probability(p)
            verdict = "Yes" if p >= s.spam_threshold else "No"
            status = f"{verdict}, score={score:.2f} probability={p:.4f}"
            cached = (
                score,
                AddHeader(s.score_header, f"{score:.2f}"),
                AddHeader(s.status_header, status),
            )
            if len(self._headers_by_p) >= _HEADER_CACHE_MAX:
                self._headers_by_p = {}
            self._headers_by_p[p] = cached
        return cached

    def result(self, details: dict[str, Any], recipients: list[str]) -> Result:
        """Headers, score and (when configured) a verdict for a classified message."""
        s = self.settings
        p = details["probability"]
        score, score_header, status_header = self._status_headers(p)
        result = Result(
            score=score,
            details=details,
            # A sender's own "X-Spam-Status: No" must not survive next to ours.
            mutations=[*self._remove_headers, score_header, status_header],
        )
        if s.reject is not None and p >= s.reject:
            verdict = Result.reject(f"Message looks like spam (probability {p:.3f})")
        elif s.quarantine is not None and p >= s.quarantine:
            verdict = Result.quarantine(f"bayes: spam probability {p:.3f} >= {s.quarantine}")
        else:
            verdict = None
            if s.junk is not None and p >= s.junk and self.local_maildir is not None:
                junk = Route(RouteKind.MAILDIR, folder=JUNK_FOLDER)
                result.mutations += [SetRoute(junk, r) for r in recipients if self.local_maildir(r)]
                result.reason = f"bayes: spam probability {p:.3f} >= junk {s.junk}"
        if verdict is not None:
            verdict.score, verdict.details, verdict.mutations = score, details, result.mutations
            return verdict
        return result

    @hookimpl
    def mailflow_learn(self, message: bytes, label: str, source: str) -> None:
        """Learn a message a person labelled into ``learning_target()`` (load, learn,
        save atomically, under the file's lock); a warning, once, when there is none."""
        target = self.settings.learning_target()
        if target is None:
            if not self._warned_not_learning:
                self._warned_not_learning = True
                log.warning(
                    "bayes: not learning from feedback: the shipped model is read-only; "
                    "set the bayes setting learn_model: PATH (scored with once it exists)"
                )
            return
        from mailflow_plugins.bayes.learning import LABELS, learn_messages

        if label not in LABELS:
            raise ValueError(f"label {label!r} is neither 'spam' nor 'ham'")
        start = self.holder.loaded_from if self.holder is not None else shipped_model_path()
        model = learn_messages(target, [message], [LABELS[label]], start)
        log.info(
            "bayes: learned %s (%s) into %s; it has now seen %d ham, %d spam",
            label,
            source,
            target,
            int(model.class_counts[0]),
            int(model.class_counts[1]),
        )

    @staticmethod
    @hookimpl
    def mailflow_register_commands(cli: Any) -> None:
        """Add ``train``, ``learn`` and ``evaluate`` to the ``mailflow`` command."""
        from mailflow_plugins.bayes.commands import register

        register(cli)


__all__ = ["BayesPlugin", "BayesSettings", "Model", "ModelError", "Settings", "shipped_model_path"]
