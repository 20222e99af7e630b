"""The bayes plugin in the pipeline: scores, headers, thresholds, reloads, real SMTP."""

from __future__ import annotations

import asyncio
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest
from mailflow_plugins.bayes import BayesPlugin, Settings, shipped_model_path
from mailflow_plugins.bayes.features import Hasher, extract_tokens
from mailflow_plugins.bayes.model import Model
from mailflow_plugins.bayes.training import featurize, train

from mailflow.app import App
from mailflow.check import check_message, report
from mailflow.config import ConfigError, load_config
from mailflow.message import Connection, Envelope, MessageContext
from mailflow.testing import make_message, running_server, send
from tests.bayes_support import corpus_files, label_of, train_model

SPAM_TEXT = (
    "Dear friend, CLICK HERE to claim your FREE prize! Lowest mortgage rates, "
    "guaranteed income, act now, limited time offer, no credit check. "
    "Earn extra cash from home, work only two hours a day and make thousands of "
    "dollars every week. Our amazing program has helped millions of people get out "
    "of debt, lose weight, and save money on insurance, vacations and prescription "
    "drugs. This is a one time opportunity: order today and receive a bonus gift, "
    "absolutely risk free with our money back guarantee. Call our toll free number "
    "or visit our website now, satisfaction guaranteed, unbelievable savings, "
    "special promotion for selected customers only, confidential offer. "
    "To be removed from our mailing list reply with REMOVE. "
    '<a href="http://cheap-meds.example.biz/">order now</a>'
)
HAM_TEXT = (
    "Hi Bob,\r\nthe patch for the build script is in CVS now; could you run the test "
    "suite on your Debian box and tell me whether the kernel module still loads?\r\n"
    "Thanks, Alice\r\n"
)


@pytest.fixture(scope="module")
def slice_model_path(tmp_path_factory):
    """A model trained on the test slice (not the shipped one) in a temp file."""
    path = tmp_path_factory.mktemp("bayes") / "model.npz"
    train_model(corpus_files("ham") + corpus_files("spam")).save(path)
    return path


def bayes_config(make_config, path, **settings):
    items = ", ".join(f"{k}: {v}" for k, v in {"model": path, **settings}.items())
    return make_config(f"plugins: [{{name: bayes, settings: {{{items}}}}}]\n")


async def _check(config, raw):
    app = App(config)
    await app.startup()
    try:
        return report(await check_message(app, raw))
    finally:
        await app.shutdown()


async def test_check_report_has_probability_score_tokens_and_headers(make_config, slice_model_path):
    config = bayes_config(make_config, slice_model_path)
    spam = await _check(config, make_message(subject="FREE money!!!", body=SPAM_TEXT))
    ham = await _check(config, make_message(subject="build script patch", body=HAM_TEXT))
    info = spam["plugins"]["bayes"]
    assert info["probability"] > 0.9 > ham["plugins"]["bayes"]["probability"]
    assert spam["score"] > 5 and ham["score"] <= 0
    assert spam["score"] == info["score"]
    assert info["tokens"] and all({"token", "weight"} <= set(t) for t in info["tokens"])
    assert max(t["weight"] for t in info["tokens"]) > 0  # the spammy words pushed it up
    headers = dict(spam["headers_added"])
    assert headers["X-Spam-Status"].startswith("Yes, score=")
    assert float(headers["X-Spam-Score"]) == pytest.approx(spam["score"], abs=0.01)
    assert dict(ham["headers_added"])["X-Spam-Status"].startswith("No, ")
    assert spam["action"] == ham["action"] == "accept"  # no thresholds configured


async def test_header_names_are_configurable(make_config, slice_model_path):
    config = bayes_config(
        make_config, slice_model_path, score_header="X-Bayes-Score", status_header="X-Bayes"
    )
    result = await _check(config, make_message(body=SPAM_TEXT))
    names = [name for name, _ in result["headers_added"]]
    assert "X-Bayes-Score" in names and "X-Bayes" in names and "X-Spam-Score" not in names


async def test_plugin_thresholds_junk_quarantine_reject(make_config, slice_model_path):
    spam = make_message(subject="FREE money!!!", body=SPAM_TEXT)
    junk = await _check(bayes_config(make_config, slice_model_path, junk=0.9), spam)
    assert junk["action"] == "accept"
    assert junk["route"]["bob@example.com"] == {"kind": "maildir", "folder": ".Junk"}
    quarantined = await _check(bayes_config(make_config, slice_model_path, quarantine=0.9), spam)
    assert quarantined["action"] == "quarantine" and quarantined["decided_by"] == "bayes"
    rejected = await _check(bayes_config(make_config, slice_model_path, reject=0.9), spam)
    assert rejected["action"] == "reject"
    assert rejected["smtp_reply"]["code"] == 550
    ham = await _check(
        bayes_config(make_config, slice_model_path, junk=0.9, reject=0.99),
        make_message(body=HAM_TEXT),
    )
    assert ham["action"] == "accept" and ham["route"]["bob@example.com"]["kind"] == "maildir"
    assert "folder" not in ham["route"]["bob@example.com"]


async def test_central_actions_use_the_score(make_config, slice_model_path):
    config = make_config(f"""
    actions: {{junk: 8}}
    plugins: [{{name: bayes, settings: {{model: {slice_model_path}}}}}]
    """)
    result = await _check(config, make_message(subject="FREE money!!!", body=SPAM_TEXT))
    assert result["route"]["bob@example.com"]["folder"] == ".Junk"


def test_bad_settings_are_config_errors(make_config, slice_model_path):
    with pytest.raises(ConfigError, match=r"plugins\[0\]\.settings\.treshold"):
        App(bayes_config(make_config, slice_model_path, treshold=0.5))
    with pytest.raises(ConfigError, match=r"junk .* must not be above reject"):
        App(bayes_config(make_config, slice_model_path, junk=0.9, reject=0.5))


async def test_corrupt_model_at_startup_is_a_clear_error(make_config, tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage")
    app = App(bayes_config(make_config, bad))
    with pytest.raises(Exception, match=r"bayes: cannot load model: .*bad.npz: .*corrupt"):
        await app.startup()


def _touch_later(path):
    """Make sure a rewritten file's mtime differs even on coarse-grained file systems."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


class _App:
    def __init__(self, config):
        self.config = config


def test_hot_reload_keeps_the_last_good_model(tmp_path, make_config, slice_model_path):
    path = tmp_path / "live.npz"
    path.write_bytes(slice_model_path.read_bytes())
    plugin = BayesPlugin(Settings(model=path, reload_interval=0.001))
    plugin.mailflow_startup(_App(make_config()))
    raw = make_message(body=SPAM_TEXT)
    before = plugin.classify(raw)["probability"]

    path.write_bytes(b"half-written garbage")
    _touch_later(path)
    time.sleep(0.002)
    assert plugin.classify(raw)["probability"] == before  # still scoring, old model
    assert "corrupt" in plugin.holder.last_error
    assert plugin.holder.reloads == 0

    # A model that learned the opposite: the reload must take effect.
    flipped = Model.load(slice_model_path)
    flipped.weights = -flipped.weights
    flipped.bias = -flipped.bias
    flipped.save(path)
    _touch_later(path)
    time.sleep(0.002)
    after = plugin.classify(raw)["probability"]
    assert plugin.holder.reloads == 1 and plugin.holder.last_error == ""
    assert after < 0.5 < before


async def test_serve_keeps_delivering_when_the_model_file_turns_corrupt(
    make_config, slice_model_path, tmp_path
):
    path = tmp_path / "live.npz"
    path.write_bytes(slice_model_path.read_bytes())
    config = make_config(f"""
    plugins: [{{name: bayes, settings: {{model: {path}, reload_interval: 0.001}}}}]
    """)
    async with running_server(config) as srv:
        path.write_bytes(b"truncated")
        _touch_later(path)
        await asyncio.sleep(0.002)
        await send(srv.port, "a@example.org", ["bob@example.com"], make_message(body=SPAM_TEXT))
        [msg] = await srv.wait_delivered("bob@example.com")
        holder = srv.app.pipeline.pm.get_plugin("bayes").holder
    assert "corrupt" in holder.last_error  # the reload was tried and refused
    assert b"X-Spam-Status: Yes" in msg  # and scored with the last good model


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"garbage without headers \xff\xfe",
        b"Subject: \xe9t\xe9\r\nContent-Type: text/plain; charset=koi8-r\r\n\r\n\xf0\xd2\xc9",
        make_message(body="x" * (3 * 1024 * 1024)),
    ],
)
async def test_odd_messages_are_scored_without_error(raw, slice_model_path, make_config):
    plugin = BayesPlugin(Settings(model=slice_model_path))
    plugin.mailflow_startup(_App(make_config()))

    ctx = MessageContext(raw, Envelope("a@example.org", ["bob@example.com"]), Connection("::1"))
    result = await plugin.mailflow_data(ctx)
    assert 0.0 <= result.details["probability"] <= 1.0
    assert -2 <= result.score <= 10


async def test_spam_over_smtp_is_tagged_and_filed_into_junk(make_config, slice_model_path):
    config = make_config(f"""
    plugins: [{{name: bayes, settings: {{model: {slice_model_path}, junk: 0.9}}}}]
    """)
    async with running_server(config) as srv:
        await send(srv.port, "a@example.org", ["bob@example.com"], make_message(body=SPAM_TEXT))
        await send(srv.port, "a@example.org", ["bob@example.com"], make_message(body=HAM_TEXT))
        [junk] = await srv.wait_delivered("bob@example.com", folder=".Junk")
        [inbox] = await srv.wait_delivered("bob@example.com")
    assert b"X-Spam-Status: Yes" in junk
    assert b"X-Spam-Status: No" in inbox


async def test_headers_forged_by_the_sender_are_replaced(make_config, slice_model_path):
    config = bayes_config(make_config, slice_model_path)
    forged = make_message(
        body=SPAM_TEXT, extra_headers={"X-Spam-Status": "No, forged", "X-Spam-Score": "-50"}
    )
    async with running_server(config) as srv:
        await send(srv.port, "a@example.org", ["bob@example.com"], forged)
        [msg] = await srv.wait_delivered("bob@example.com")
    assert b"forged" not in msg and b"-50" not in msg
    assert msg.count(b"X-Spam-Status: Yes") == 1


async def test_embedded_default_config_scores_with_the_shipped_model_and_accepts():
    config = load_config(None)
    entry = next(p for p in config.plugins if p.name == "bayes")
    assert entry.enabled
    result = await _check(config, make_message(subject="FREE money!!!", body=SPAM_TEXT))
    assert result["action"] == "accept"  # the default never rejects
    assert result["plugins"]["bayes"]["probability"] > 0.5
    assert shipped_model_path().exists()


async def test_a_model_with_other_hashing_parameters_is_scored_with_them(make_config, tmp_path):
    """A model file trained with a smaller column space or another seed is valid: the
    plugin hashes tokens with the model's own parameters (not the defaults)."""
    files = corpus_files("ham") + corpus_files("spam")
    labels = np.array([label_of(p) for p in files])
    hasher = Hasher(n_features=2**12, seed=7)
    rows = featurize((p.read_bytes() for p in files), hasher)
    model, _ = train(rows, labels, folds=3, n_features=2**12)
    model.seed = 7
    path = tmp_path / "small.npz"
    model.save(path)
    result = await _check(
        bayes_config(make_config, path), make_message(subject="FREE money!!!", body=SPAM_TEXT)
    )
    details = result["plugins"]["bayes"]
    assert details["probability"] > 0.5
    raw = files[-1].read_bytes()  # a spam of the slice: the same score as the model's own
    plugin = BayesPlugin(Settings(model=path, reload_interval=0))
    plugin.mailflow_startup(SimpleNamespace(config=make_config("")))
    assert plugin.classify(raw)["probability"] == pytest.approx(
        model.probability(hasher.index(extract_tokens(raw))), abs=1e-6
    )
