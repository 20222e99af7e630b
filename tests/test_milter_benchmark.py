"""Smoke tests for the Postfix + milter benchmark (benchmarks/milter_load.py), so it cannot
silently rot: counts only, never speed (that is measured in benchmarks/, not here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from benchmarks import milter_stacks
from benchmarks.nx_dns import NxDns, nxdomain

REPO = Path(__file__).resolve().parent.parent
HARNESS_TIMEOUT = 300  # seconds: Postfix, rspamd and mailflow start; 90 tiny messages


def test_nx_dns_answers_every_query_with_nxdomain_at_once():
    server = NxDns()
    server.start()
    try:
        for name, rdtype in (("example.com", "A"), ("7.2.0.192.zen.spamhaus.org", "TXT")):
            query = dns.message.make_query(name, rdtype)
            answer = dns.query.udp(query, "127.0.0.1", port=server.port, timeout=5)
            assert answer.id == query.id
            assert answer.rcode() == dns.rcode.NXDOMAIN
            assert [str(q.name) for q in answer.question] == [name + "."]
        assert server.answered == 2
    finally:
        server.stop()


def test_nx_dns_ignores_what_is_not_a_query():
    query = dns.message.make_query("example.com", "A").to_wire()
    assert nxdomain(query[:5]) is None  # shorter than a header
    assert nxdomain(query[:-3]) is None  # question cut short
    response = bytearray(query)
    response[2] |= 0x80  # QR set: an answer, not a question
    assert nxdomain(bytes(response)) is None


@pytest.mark.slow
@pytest.mark.postfix
def test_milter_load_passes_every_message_through_all_three_stacks(tmp_path: Path):
    why = milter_stacks.usable()
    if why is not None:
        pytest.skip(why)
    args = ["-n", "10", "-k", "2", "--repeat", "1", "--plugins", "none", "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.milter_load", *args, "--workdir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HARNESS_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    runs = {r["stack"]: r for r in report["runs"]}
    assert set(runs) == {"postfix", "postfix+mailflow", "postfix+rspamd"}
    for run in runs.values():
        assert (run["sent"], run["failed"], run["concurrency"]) == (10, 0, 2), run
    # Each milter really filtered: mailflow logged every message, rspamd scanned them.
    serve_log = (tmp_path / "mailflow" / "serve.log").read_text()
    assert serve_log.count("delivery=milter") >= 10
    rspamd_log = (tmp_path / "rspamd" / "log" / "rspamd.log").read_text()
    assert rspamd_log.count("rspamd_task_write_log") >= 10
    assert runs["postfix+mailflow"]["milter_cpu_ms"] is not None
