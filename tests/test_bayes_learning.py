"""Learning from users (issue 12): quarantine feedback through mailflow_learn, the
bayes plugin's learn_model, and `mailflow learn --maildir` on a user's Junk folder.

Real config files, real model files, the real CLI (click's CliRunner): a message's
probability is read back from the model file the command wrote.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from click.testing import CliRunner
from mailflow_plugins.bayes import BayesPlugin, BayesSettings, shipped_model_path
from mailflow_plugins.bayes.features import Hasher, extract_tokens
from mailflow_plugins.bayes.learning import STATE_FILE, read_state
from mailflow_plugins.bayes.model import Model
from pydantic import ValidationError

from mailflow.cli import main
from mailflow.delivery.spool import Spool
from mailflow.testing import config_for, running_server, send
from tests.bayes_support import corpus_files

SHIPPED = shipped_model_path()


def probability(model_path: Path, raw: bytes) -> float:
    model = Model.load(model_path)
    return model.probability(Hasher(model.n_features, model.seed).index(extract_tokens(raw)))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def spammy() -> bytes:
    """A corpus spam message the shipped model is sure about (well above 0.5)."""
    for path in corpus_files("spam"):
        raw = path.read_bytes()
        if probability(SHIPPED, raw) > 0.9:
            return raw
    raise AssertionError("no confident spam in the corpus slice")


def hammy() -> bytes:
    for path in corpus_files("ham"):
        raw = path.read_bytes()
        if probability(SHIPPED, raw) < 0.1:
            return raw
    raise AssertionError("no confident ham in the corpus slice")


class Site:
    """A config file with quarantine and spool under tmp_path, and a way to quarantine."""

    def __init__(self, tmp_path: Path, yaml_text: str) -> None:
        self.tmp = tmp_path
        self.config = config_for(tmp_path, yaml_text)
        self.file = tmp_path / "mailflow.yaml"
        self.file.write_text(yaml.safe_dump(self.config.model_dump(mode="json")))
        self.quarantine = Path(self.config.quarantine.directory)
        self.count = 0

    def quarantined(self, raw: bytes) -> str:
        self.count += 1
        queue_id = f"Q{self.count:08d}"
        self.quarantine.mkdir(parents=True, exist_ok=True)
        (self.quarantine / f"{queue_id}.eml").write_bytes(raw)
        meta = {"id": queue_id, "sender": "a@example.org", "recipients": ["bob@example.com"]}
        (self.quarantine / f"{queue_id}.json").write_text(json.dumps(meta))
        return queue_id

    def cli(self, *args: str):
        return CliRunner().invoke(main, [*args, "-c", str(self.file)])

    def gone(self, queue_id: str) -> bool:
        return not (self.quarantine / f"{queue_id}.eml").exists()

    def spooled(self) -> list[str]:
        spool = Spool(Path(self.config.queue.directory), self.config.storage.sync)
        return [entry.id for entry in spool.entries()]


def bayes(settings: dict[str, object], quarantine: str = "") -> str:
    text = yaml.safe_dump({"plugins": [{"name": "bayes", "settings": settings}]})
    return text + quarantine


# --- quarantine feedback ------------------------------------------------------------------


def test_release_learns_ham_into_learn_model(tmp_path):
    learned = tmp_path / "var" / "learned.npz"
    site = Site(tmp_path, bayes({"learn_model": str(learned)}))
    raw = spammy()
    before = probability(SHIPPED, raw)
    shipped = digest(SHIPPED)
    queue_id = site.quarantined(raw)

    result = site.cli("quarantine", "release", queue_id)

    assert result.exit_code == 0, result.output
    assert f"released {queue_id} to bob@example.com" in result.stdout
    assert site.gone(queue_id) and site.spooled() == [queue_id]
    assert "bayes: learned ham (quarantine-release)" in result.stderr
    # Started from the shipped model (left untouched) and moved towards ham.
    assert probability(learned, raw) < before
    assert digest(SHIPPED) == shipped
    model = Model.load(learned)
    assert model.class_counts[0] == Model.load(SHIPPED).class_counts[0] + 1


def test_delete_spam_learns_spam_into_the_model_setting(tmp_path):
    own = tmp_path / "own.npz"
    own.write_bytes(SHIPPED.read_bytes())  # an admin's own model: `model` set, learned into
    site = Site(tmp_path, bayes({"model": str(own)}))
    raw = hammy()
    before = probability(own, raw)
    first, second = site.quarantined(raw), site.quarantined(raw)

    result = site.cli("quarantine", "delete", "--spam", first, second)

    assert result.exit_code == 0, result.output
    assert f"deleted {first}" in result.stdout and f"deleted {second}" in result.stdout
    assert site.gone(first) and site.gone(second) and site.spooled() == []
    assert result.stderr.count("bayes: learned spam (quarantine-delete)") == 2
    assert probability(own, raw) > before


def test_delete_spam_with_model_and_learn_model_the_same_file(tmp_path):
    own = tmp_path / "own.npz"
    own.write_bytes(SHIPPED.read_bytes())
    site = Site(tmp_path, bayes({"model": str(own), "learn_model": str(own)}))
    raw = hammy()
    before = probability(own, raw)
    result = site.cli("quarantine", "delete", "--spam", site.quarantined(raw))
    assert result.exit_code == 0, result.output
    assert probability(own, raw) > before


@pytest.mark.parametrize(
    "quarantine_config, args",
    [
        ("", ["release", "--no-learn"]),
        ("quarantine: {learn_on_release: false}\n", ["release"]),
        ("", ["delete", "--spam", "--no-learn"]),
        ("quarantine: {learn_on_delete_spam: false}\n", ["delete", "--spam"]),
        ("", ["delete"]),  # a plain delete says nothing about the message
    ],
)
def test_no_learn_and_config_off_learn_nothing(tmp_path, quarantine_config, args):
    learned = tmp_path / "learned.npz"
    site = Site(tmp_path, bayes({"learn_model": str(learned)}, quarantine_config))
    queue_id = site.quarantined(spammy())

    result = site.cli("quarantine", *args, queue_id)

    assert result.exit_code == 0, result.output
    assert site.gone(queue_id)
    assert not learned.exists()
    assert "learn" not in result.stderr


def test_learning_not_configured_warns_once_and_the_release_goes_through(tmp_path):
    site = Site(tmp_path, bayes({}))  # the shipped model only: read-only
    shipped = digest(SHIPPED)
    ids = [site.quarantined(spammy()), site.quarantined(hammy())]

    result = site.cli("quarantine", "release", *ids)

    assert result.exit_code == 0, result.output
    assert all(site.gone(i) for i in ids) and sorted(site.spooled()) == ids
    assert result.stderr.count("bayes: not learning from feedback") == 1
    assert "learn_model" in result.stderr
    assert digest(SHIPPED) == shipped
    assert not list(SHIPPED.parent.glob("*.lock"))


def test_a_learning_failure_is_reported_and_the_operation_stands(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    site = Site(tmp_path, bayes({"learn_model": str(blocker / "learned.npz")}))
    queue_id = site.quarantined(spammy())
    missing = "Q99999999"

    result = site.cli("quarantine", "delete", "--spam", queue_id, missing)

    assert site.gone(queue_id)
    assert f"deleted {queue_id}" in result.stdout
    assert f"learning from {queue_id} failed in plugin bayes" in result.stderr
    # The exit status is about the deletion: 1 because one id was not quarantined.
    assert result.exit_code == 1
    assert f"no quarantined message {missing}" in result.stderr


def test_a_plugin_config_learning_refuses_does_not_block_the_release(tmp_path):
    site = Site(
        tmp_path,
        bayes({"model": str(SHIPPED), "learn_model": str(tmp_path / "other.npz")}),
    )
    queue_id = site.quarantined(spammy())
    result = site.cli("quarantine", "release", queue_id)
    assert result.exit_code == 0, result.output
    assert site.gone(queue_id) and site.spooled() == [queue_id]
    assert f"not learned from {queue_id} (as ham)" in result.stderr
    assert "learn_model" in result.stderr and not (tmp_path / "other.npz").exists()


# --- the plugin's settings and model file -------------------------------------------------


def test_learn_model_must_be_the_model_that_is_scored(tmp_path):
    with pytest.raises(ValidationError, match="would never be scored"):
        BayesSettings(model=tmp_path / "a.npz", learn_model=tmp_path / "b.npz")
    same = BayesSettings(model=tmp_path / "a.npz", learn_model=tmp_path / "x" / ".." / "a.npz")
    assert same.learning_target() == tmp_path / "x" / ".." / "a.npz"
    assert BayesSettings(model=tmp_path / "a.npz").learning_target() == tmp_path / "a.npz"
    assert BayesSettings().learning_target() is None


def test_the_plugin_scores_with_learn_model_once_learning_created_it(tmp_path):
    learned = tmp_path / "learned.npz"
    plugin = BayesPlugin(BayesSettings(learn_model=learned, reload_interval=0.01))
    plugin.mailflow_startup(SimpleNamespace(config=config_for(tmp_path)))
    assert plugin.holder is not None and plugin.holder.loaded_from == SHIPPED
    raw = spammy()
    before = plugin.classify(raw)["probability"]

    plugin.mailflow_learn(raw, "ham", "quarantine-release")
    plugin.mailflow_learn(raw, "ham", "quarantine-release")

    time.sleep(0.02)
    after = plugin.classify(raw)["probability"]  # reloads: the file has appeared
    assert plugin.holder.loaded_from == learned and plugin.holder.reloads == 1
    assert after < before
    assert Model.load(learned).class_counts[0] == Model.load(SHIPPED).class_counts[0] + 2
    with pytest.raises(ValueError, match="neither 'spam' nor 'ham'"):
        plugin.mailflow_learn(raw, "junk", "test")


# --- learn --maildir ----------------------------------------------------------------------

YES = b"X-Spam-Status: Yes, score=9.00 probability=0.9500\n"
NO = b"X-Spam-Status: No, score=-1.80 probability=0.0500\n"


def filed(status: bytes, path: Path) -> bytes:
    """A corpus message as mailflow delivered it: its status field on top (the corpus'
    mbox "From " line dropped, or the field would end the header block)."""
    raw = path.read_bytes()
    if raw.startswith(b"From "):
        raw = raw.split(b"\n", 1)[1]
    return status + raw


def deliver(folder: Path, name: str, raw: bytes, sub: str = "cur") -> Path:
    for d in ("cur", "new", "tmp"):
        (folder / d).mkdir(parents=True, exist_ok=True)
    path = folder / sub / name
    path.write_bytes(raw)
    return path


def by_probability(label: str) -> list[Path]:
    return sorted(corpus_files(label), key=lambda p: probability(SHIPPED, p.read_bytes()))


@pytest.fixture(scope="module")
def corpus_order() -> tuple[list[Path], list[Path]]:
    return by_probability("spam"), by_probability("ham")


@pytest.fixture
def mailbox(tmp_path, corpus_order):
    """A user's Maildir as mailflow left it, plus what the user changed since."""
    root = tmp_path / "Maildir"
    junk = root / ".Junk"
    spam, ham = corpus_order  # least spammy first
    m = SimpleNamespace(root=root, junk=junk)
    # Where mailflow put them: skipped.
    deliver(root, "1700000001.M1P1.mx:2,S", filed(NO, ham[0]))
    deliver(root, "1700000002.M2P2.mx", filed(NO, ham[1]), "new")
    deliver(junk, "1700000003.M3P3.mx:2,", filed(YES, spam[-1]))
    deliver(root, "1700000004.M4P4.mx:2,S", filed(b"", ham[2]))  # no status: not ours
    # What the user moved: the mail the model was least sure about.
    m.moved_in = filed(NO, spam[0])  # we said No, the user put it in .Junk
    m.moved_in_path = deliver(junk, "1700000005.M5P5.mx:2,S", m.moved_in)
    m.unscored_in = filed(b"", spam[1])  # no status (before mailflow) in .Junk: spam
    deliver(junk, "1700000006.M6P6.mx:2,S", m.unscored_in, "new")
    m.moved_out = filed(YES, ham[-1])  # we said Yes, the user took it out of .Junk
    deliver(root, "1700000007.M7P7.mx:2,RS", m.moved_out)
    return m


def learn_maildir(root: Path, model: Path, *more: str):
    return CliRunner().invoke(main, ["learn", "--maildir", str(root), "--model", str(model), *more])


def test_learn_maildir_learns_what_the_user_moved_once(mailbox, tmp_path):
    model = tmp_path / "learned.npz"
    before_in = probability(SHIPPED, mailbox.moved_in)
    before_out = probability(SHIPPED, mailbox.moved_out)

    first = learn_maildir(mailbox.root, model)

    assert first.exit_code == 0, first.output
    assert (
        f"{mailbox.root}: 7 new message(s): 2 moved into .Junk (spam), 1 moved out of it "
        "(ham), 4 where mailflow put them (skipped)"
    ) in first.stdout
    assert "learned 1 ham and 2 spam message(s)" in first.stdout
    assert probability(model, mailbox.moved_in) > before_in
    assert probability(model, mailbox.unscored_in) > probability(SHIPPED, mailbox.unscored_in)
    assert probability(model, mailbox.moved_out) < before_out
    counts = list(Model.load(model).class_counts)
    state = read_state(mailbox.root)
    assert len(state) == 7 and "junk 1700000005.M5P5.mx" in state
    assert "inbox 1700000002.M2P2.mx" in state  # new/ and cur/ alike, no info part

    # Nothing changed: nothing learned, the model file is not rewritten.
    written = digest(model)
    second = learn_maildir(mailbox.root, model)
    assert second.exit_code == 0, second.output
    assert ": 0 new message(s)" in second.stdout
    assert "learned 0 ham and 0 spam message(s)" in second.stdout
    assert digest(model) == written

    # The user reads and answers the moved-in message (:2,S -> :2,RS) and mail moves from
    # new/ to cur/: the same messages, not learned again.
    mailbox.moved_in_path.rename(mailbox.moved_in_path.with_name("1700000005.M5P5.mx:2,RS"))
    (mailbox.root / "new" / "1700000002.M2P2.mx").rename(
        mailbox.root / "cur" / "1700000002.M2P2.mx:2,S"
    )
    third = learn_maildir(mailbox.root, model)
    assert "learned 0 ham and 0 spam message(s)" in third.stdout
    assert digest(model) == written and list(Model.load(model).class_counts) == counts

    # The user moves one more into .Junk (a new file name there) and deletes another:
    # only the new one is learned, and the state forgets the deleted one.
    ham_no = mailbox.root / "cur" / "1700000001.M1P1.mx:2,S"
    deliver(mailbox.junk, "1700000099.M9P9.mx:2,S", ham_no.read_bytes())
    ham_no.unlink()
    fourth = learn_maildir(mailbox.root, model)
    assert "1 new message(s): 1 moved into .Junk (spam), 0 moved out" in fourth.stdout
    assert "learned 0 ham and 1 spam message(s)" in fourth.stdout
    state = read_state(mailbox.root)
    assert "junk 1700000099.M9P9.mx" in state and "inbox 1700000001.M1P1.mx" not in state
    assert len(state) == 7
    assert (mailbox.root / STATE_FILE).read_text().startswith("# mailflow learn --maildir")


def test_learn_maildir_honours_another_status_header(mailbox, tmp_path):
    # With another header name, no message carries a status: everything in .Junk looks
    # moved in by the user, nothing in the inbox looks moved out.
    result = learn_maildir(mailbox.root, tmp_path / "m.npz", "--status-header", "X-Other-Status")
    assert result.exit_code == 0, result.output
    assert "learned 0 ham and 3 spam message(s)" in result.stdout


def test_learn_maildir_refuses_what_is_not_a_maildir(tmp_path):
    result = learn_maildir(tmp_path / "nope", tmp_path / "m.npz")
    assert result.exit_code == 2 and "no such directory" in result.stderr
    (tmp_path / "empty").mkdir()
    result = learn_maildir(tmp_path / "empty", tmp_path / "m.npz")
    assert result.exit_code == 2 and "not a Maildir" in result.stderr
    assert not (tmp_path / "m.npz").exists()


# --- with a running server ----------------------------------------------------------------


async def test_a_running_server_scores_with_what_a_release_taught(tmp_path):
    learned = tmp_path / "learned.npz"
    settings = {"learn_model": str(learned), "quarantine": 0.9, "reload_interval": 0.01}
    site = Site(tmp_path, bayes(settings))
    path = next(p for p in corpus_files("spam") if probability(SHIPPED, filed(b"", p)) > 0.95)
    raw = filed(b"", path)
    async with running_server(site.config) as srv:
        await send(srv.port, "a@example.org", ["bob@example.com"], raw)
        [meta] = srv.server.handler.quarantine.list()  # scored with the shipped model

        # The admin releases it (the CLI in this process: it learns in a thread of its own).
        result = site.cli("quarantine", "release", meta["id"])
        assert result.exit_code == 0, result.output
        assert "bayes: learned ham (quarantine-release)" in result.stderr
        [released] = await srv.wait_delivered("bob@example.com")
        assert b"X-Spam-Status: Yes" in released  # as it was quarantined

        # The server picks up the file learning created: the same mail is now delivered.
        await asyncio.sleep(0.02)
        await send(srv.port, "a@example.org", ["bob@example.com"], raw)
        delivered = await srv.wait_delivered("bob@example.com", count=2)
        holder = srv.app.pipeline.pm.get_plugin("bayes").holder
    assert holder.loaded_from == learned
    assert any(b"X-Spam-Status: No" in m for m in delivered)
    assert srv.server.handler.quarantine.list() == []


def test_learn_maildir_needs_the_model_named(mailbox):
    result = CliRunner().invoke(main, ["learn", "--maildir", str(mailbox.root)])
    assert result.exit_code == 2 and "--maildir needs --model" in result.stderr
    assert not (mailbox.root / STATE_FILE).exists()


def test_odd_file_names_are_remembered_exactly(mailbox, tmp_path):
    """Any byte may be in a Maildir file name: not UTF-8, a newline. Each is learned
    once and recognised at the next run."""
    model = tmp_path / "learned.npz"
    odd = [os.fsdecode(b"1700000010.\xff\xfe.mx:2,S"), "1700000011.a\nb.mx:2,S"]
    for name in odd:
        deliver(mailbox.junk, name, mailbox.moved_in)
    first = learn_maildir(mailbox.root, model)
    assert first.exit_code == 0, first.output
    assert "learned 1 ham and 4 spam message(s)" in first.stdout
    second = learn_maildir(mailbox.root, model)
    assert second.exit_code == 0, second.output
    assert ": 0 new message(s)" in second.stdout
    state = (mailbox.root / STATE_FILE).read_bytes()
    assert state.isascii() and len(state.splitlines()) == 1 + 9  # header + 9 messages


def test_links_fifos_and_unreadable_entries_are_skipped_not_fatal(mailbox, tmp_path):
    model = tmp_path / "learned.npz"
    secret = tmp_path / "not-mail.txt"
    secret.write_bytes(b"Subject: root's file\n\nmust never be read through a link\n")
    os.symlink(secret, mailbox.junk / "cur" / "1700000020.link.mx:2,S")
    os.mkfifo(mailbox.junk / "cur" / "1700000021.fifo.mx:2,S")  # a plain open() would block
    result = learn_maildir(mailbox.root, model)
    assert result.exit_code == 0, result.output
    # The link and the FIFO are not listed as messages (not regular files); the rest is.
    assert "learned 1 ham and 2 spam message(s)" in result.stdout


def test_a_symlink_swapped_in_after_listing_is_not_followed(mailbox, tmp_path, monkeypatch):
    from mailflow_plugins.bayes import learning

    secret = tmp_path / "not-mail.txt"
    secret.write_bytes(b"X-Spam-Status: No\n\nsecret\n")
    target = mailbox.moved_in_path
    listed = learning._messages

    def swap_after_listing(folder):
        for ident, path in listed(folder):
            if path == target:
                path.unlink()
                os.symlink(secret, path)  # the race the O_NOFOLLOW open closes
            yield ident, path

    monkeypatch.setattr(learning, "_messages", swap_after_listing)
    result = learn_maildir(mailbox.root, tmp_path / "learned.npz")
    assert result.exit_code == 0, result.output
    assert "1 unreadable" in result.stdout and "not learned from" in result.stderr
    assert "learned 1 ham and 1 spam message(s)" in result.stdout


def test_a_damaged_state_file_is_a_warning_not_a_crash(mailbox, tmp_path):
    (mailbox.root / STATE_FILE).write_bytes(b"\xff\xfe garbage\njunk \x80\x81\n")
    result = learn_maildir(mailbox.root, tmp_path / "learned.npz")
    assert result.exit_code == 0, result.output
    assert "learned 1 ham and 2 spam message(s)" in result.stdout
    assert len(read_state(mailbox.root)) == 7  # rewritten whole


def test_a_state_file_that_cannot_be_written_is_reported(mailbox, tmp_path):
    model = tmp_path / "learned.npz"
    (mailbox.root / STATE_FILE).mkdir()  # os.replace onto a directory fails, even for root
    result = learn_maildir(mailbox.root, model)
    assert result.exit_code == 1
    assert "cannot write it" in result.stderr
    assert "learned 1 ham and 2 spam message(s)" in result.stdout
    assert model.exists()  # what was learned is saved; those messages come back next run
