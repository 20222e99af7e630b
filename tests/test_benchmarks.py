"""Smoke test for the SMTP benchmark harness, so it cannot silently rot.

Runs ``python -m benchmarks.smtp_load`` for real (subprocess servers on 127.0.0.1)
with tiny numbers and checks counts only; speed is measured in benchmarks/, never here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HARNESS_TIMEOUT = 120  # seconds; the run itself takes a few


def run_harness(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.smtp_load", *args, "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HARNESS_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_harness_counts_bare_and_maildir() -> None:
    report = run_harness("-n", "20", "-k", "2", "--targets", "bare,maildir")
    rows = {row["server"]: row for row in report["rows"]}
    assert set(rows) == {"bare aiosmtpd", "mailflow maildir"}
    bare, maildir = rows["bare aiosmtpd"], rows["mailflow maildir"]
    assert (bare["accepted"], bare["failed"], bare["concurrency"]) == (20, 0, 2)
    assert (maildir["accepted"], maildir["failed"]) == (20, 0)
    assert maildir["delivered"] == 20  # files in the Maildirs after the queue drained
    assert maildir["drain_s"] is not None
    assert maildir["ratio"] is not None and maildir["ratio"] > 0
    assert report["size"] > 4000  # a realistic multipart message, not a one-liner


def test_harness_with_the_pipelining_client() -> None:
    report = run_harness(
        "-n", "20", "-k", "2", "--targets", "bare,maildir", "--client", "python-pipelining"
    )
    rows = {row["server"]: row for row in report["rows"]}
    for row in rows.values():
        assert (row["accepted"], row["failed"]) == (20, 0), row
    assert rows["mailflow maildir"]["delivered"] == 20
    assert report["client"] == "python-pipelining"


async def test_pipelined_send_reports_a_refused_recipient_and_leaves_the_session_clean(
    make_config,
) -> None:
    import pytest

    from benchmarks.smtp_client import Connection, SMTPReplyError
    from mailflow.testing import make_message, running_server

    payload = make_message().replace(b"\n", b"\r\n") + b".\r\n"
    async with running_server(make_config("local_domains: [example.com]\n")) as srv:
        conn = await Connection.open("127.0.0.1", srv.port)
        with pytest.raises(SMTPReplyError, match="RCPT TO: 554"):
            await conn.send("a@example.org", ["x@elsewhere.test"], payload, pipelining=True)
        # Refused, partly refused and accepted transactions on the same connection.
        with pytest.raises(SMTPReplyError, match="RCPT TO: 554"):
            await conn.send("a@example.org", ["x@elsewhere.test", "bob@example.com"], payload, True)
        await conn.send("a@example.org", ["bob@example.com"], payload, pipelining=True)
        await conn.close()
        delivered = await srv.wait_delivered("bob@example.com", count=2)
        assert len(delivered) == 2  # the partly refused message went to bob as well


def test_paired_rounds_run_the_bare_server_before_each_target() -> None:
    report = run_harness("-n", "10", "-k", "2", "--repeat", "3", "--targets", "bare,maildir")
    rows = {row["server"]: row for row in report["rows"]}
    bare, maildir = rows["bare aiosmtpd"], rows["mailflow maildir"]
    assert bare["accepted"] == maildir["accepted"] == 30  # three pairs of runs
    assert maildir["ratio_low"] <= maildir["ratio"] <= maildir["ratio_high"]
    pairs = [(report["runs"][i], report["runs"][i + 1]) for i in range(0, len(report["runs"]), 2)]
    assert [(b["server"], t["server"]) for b, t in pairs] == [
        (bare["server"], maildir["server"])
    ] * 3
    ratios = sorted(t["rate"] / b["rate"] for b, t in pairs)
    assert abs(maildir["ratio"] - ratios[1]) < 0.01  # the median pair, not a ratio of medians


def test_compare_tree_runs_the_other_trees_code_in_the_same_rounds(tmp_path: Path) -> None:
    """--compare-tree: each mailflow target runs twice per round, once from this
    repository and once from the other tree, whose own mailflow and plugins load."""
    tree = tmp_path / "tree"
    for folder in ("mailflow", "plugins", "benchmarks"):
        shutil.copytree(REPO / folder, tree / folder, ignore=shutil.ignore_patterns("__pycache__"))
    init = tree / "mailflow" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', '__version__ = "9.9.9+'))
    work = tmp_path / "work"
    report = run_harness(
        "-n", "10", "-k", "1", "--targets", "bare,maildir+plugins", "--plugins", "bayes",
        "--compare-tree", str(tree), "--workdir", str(work),
    )  # fmt: skip
    rows = {row["server"]: row for row in report["rows"]}
    assert set(rows) == {
        "bare aiosmtpd",
        "mailflow maildir+plugins",
        "mailflow maildir+plugins @tree",
    }
    assert all(rows[name]["delivered"] == 10 for name in rows if name.startswith("mailflow"))
    here = (work / "mailflow-maildir-plugins" / "serve.log").read_text()
    there = (work / "mailflow-maildir-plugins-tree" / "serve.log").read_text()
    assert "mailflow 0.1" in here and "mailflow 9.9.9+0.1" in there  # "<version>: listening"
    models = [Path(re.search(r"bayes: model (\S+)", log)[1]).resolve() for log in (here, there)]
    assert models == [
        REPO / "plugins" / "bayes" / "data" / "model.npz",
        tree / "plugins" / "bayes" / "data" / "model.npz",
    ]
