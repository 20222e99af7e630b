"""Quarantine review: list, show, release into delivery (with a running server), delete."""

from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner

from mailflow.cli import main
from mailflow.hookspecs import hookimpl
from mailflow.message import MessageContext
from mailflow.testing import make_message, running_server, send
from mailflow.verdict import Result


class QuarantineSuspicious:
    @hookimpl
    def mailflow_data(self, message: MessageContext) -> Result | None:
        if "suspicious" in message.header("Subject"):
            return Result.quarantine("subject looks suspicious")
        return None


def _cli(config_file: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, [*args, "-c", str(config_file)])
    return result.exit_code, result.output


async def test_quarantine_list_show_release_delete(make_config, tmp_path: Path):
    config = make_config("plugins: [{name: suspicious}]\n")
    config_file = tmp_path / "mailflow.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude={"plugins"})))
    async with running_server(config, extra_plugins={"suspicious": QuarantineSuspicious()}) as srv:
        await send(
            srv.port,
            "a@example.org",
            ["bob@example.com"],
            make_message(subject="suspicious invoice"),
        )
        await send(
            srv.port,
            "a@example.org",
            ["bob@example.com"],
            make_message(subject="another suspicious one"),
        )
        assert srv.delivered("bob@example.com") == []

        code, out = _cli(config_file, "quarantine", "list")
        assert code == 0, out
        assert "2 message(s)" in out and "subject looks suspicious" in out
        first, second = (row["id"] for row in srv.server.handler.quarantine.list())

        code, out = _cli(config_file, "quarantine", "show", first, "--body")
        assert code == 0 and '"decided_by": "suspicious"' in out
        assert "Subject: suspicious invoice" in out

        # Released while the server runs: it lands in the Maildir, plugins not re-run.
        code, out = _cli(config_file, "quarantine", "release", first)
        assert code == 0 and f"released {first} to bob@example.com" in out
        [raw] = await srv.wait_delivered("bob@example.com")
        assert b"Subject: suspicious invoice" in raw
        await srv.wait_queue_empty()

        code, out = _cli(config_file, "quarantine", "delete", second)
        assert code == 0 and f"deleted {second}" in out
        code, out = _cli(config_file, "quarantine", "list")
        assert "quarantine is empty" in out

        # Unknown ids and path-like ids are refused without touching anything.
        for bad in (first, "../spool"):
            code, out = _cli(config_file, "quarantine", "release", bad)
            assert code == 1 and f"no quarantined message {bad}" in out
            code, out = _cli(config_file, "quarantine", "show", bad)
            assert code == 1
