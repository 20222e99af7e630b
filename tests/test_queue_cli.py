"""`mailflow queue list|show|flush|delete` on a spool holding a deferred message."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailflow.cli import main
from mailflow.delivery.queue import FLUSH_TRIGGER
from mailflow.delivery.spool import QueueEntry, RecipientState, Spool, new_queue_id


@pytest.fixture
def deferred(tmp_path: Path) -> tuple[Path, Spool, str]:
    """A config file and its spool with one message deferred for bob, delivered to carol."""
    spool_dir = tmp_path / "spool"
    config = tmp_path / "mailflow.yaml"
    config.write_text(f"queue:\n  directory: {spool_dir}\n")
    spool = Spool(spool_dir)
    queue_id = new_queue_id()
    entry = QueueEntry(
        queue_id,
        "alice@example.org",
        [
            RecipientState(
                "bob@remote.test",
                {"kind": "relay", "target": "up"},
                attempts=3,
                next_attempt=time.time() + 600,
                last_reply="451 4.4.1 connection refused",
            ),
            RecipientState("carol@remote.test", {"kind": "relay"}, status="delivered"),
        ],
        created=time.time() - 120,
        size=42,
    )
    spool.store_sync(entry, b"Subject: stuck\r\n\r\nbody\r\n")
    return config, spool, queue_id


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_list_shows_the_deferred_recipient_and_why(deferred):
    config, _, queue_id = deferred
    code, out = run("queue", "list", "-c", str(config))
    assert code == 0
    assert queue_id in out and "<alice@example.org>" in out
    assert "<bob@remote.test> attempts=3" in out and "451 4.4.1 connection refused" in out
    assert "carol@remote.test" not in out  # delivered recipients are not pending
    assert "1 message(s)" in out


def test_list_json_is_machine_readable(deferred):
    config, _, queue_id = deferred
    code, out = run("queue", "list", "-c", str(config), "--json")
    assert code == 0
    [row] = json.loads(out)
    assert row["id"] == queue_id
    [pending] = row["pending"]
    assert pending["rcpt"] == "bob@remote.test"
    assert 500 < pending["next_attempt_in_s"] <= 600


def test_list_on_an_empty_queue(tmp_path):
    config = tmp_path / "mailflow.yaml"
    config.write_text(f"queue:\n  directory: {tmp_path / 'spool'}\n")
    code, out = run("queue", "list", "-c", str(config))
    assert code == 0 and "queue is empty" in out


def test_show_prints_state_and_optionally_the_message(deferred):
    config, _, queue_id = deferred
    code, out = run("queue", "show", queue_id, "-c", str(config))
    assert code == 0
    shown = json.loads(out)
    assert shown["sender"] == "alice@example.org"
    assert [r["status"] for r in shown["recipients"]] == ["pending", "delivered"]
    code, out = run("queue", "show", queue_id, "-c", str(config), "--body")
    assert code == 0 and "Subject: stuck" in out


def test_show_unknown_id_fails_clearly(deferred):
    config, _, _ = deferred
    code, out = run("queue", "show", "NOPE", "-c", str(config))
    assert code == 1 and "no queued message NOPE" in out


def test_flush_makes_everything_due_and_pokes_the_server(deferred):
    config, spool, queue_id = deferred
    code, out = run("queue", "flush", "-c", str(config))
    assert code == 0 and "flush requested" in out
    assert (spool.root / FLUSH_TRIGGER).exists()
    bob = spool.load(queue_id).recipients[0]
    assert bob.next_attempt == 0
    assert bob.attempts == 3  # flushing is not an attempt


def test_delete_removes_message_and_state(deferred):
    config, spool, queue_id = deferred
    code, out = run("queue", "delete", queue_id, "-c", str(config))
    assert code == 0 and f"deleted {queue_id}" in out
    assert spool.ids() == []
    assert not spool.message_path(queue_id).exists()


def test_delete_unknown_id_fails_but_deletes_the_others(deferred):
    config, spool, queue_id = deferred
    code, out = run("queue", "delete", "NOPE", queue_id, "-c", str(config))
    assert code == 1
    assert "no queued message NOPE" in out
    assert spool.ids() == []


def test_ids_that_are_paths_never_leave_the_spool(deferred, tmp_path):
    config, spool, queue_id = deferred
    victim = spool.queue_dir.parent / "victim.json"
    victim.write_text("{}")
    code, out = run("queue", "delete", "../victim", "-c", str(config))
    assert code == 1 and "no queued message ../victim" in out
    assert victim.exists()
    code, out = run("queue", "show", "../victim", "-c", str(config))
    assert code == 1 and "no queued message" in out
    assert spool.ids() == [queue_id]
