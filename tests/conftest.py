"""Shared fixtures: real servers on 127.0.0.1 in the test's own event loop."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailflow.testing import config_for

TESTS = Path(__file__).parent
MESSAGES = TESTS / "messages"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate and key for 127.0.0.1 (STARTTLS tests)."""
    from tests.smtp_support import self_signed_cert

    return self_signed_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def messages_dir() -> Path:
    return MESSAGES


@pytest.fixture
def make_config(tmp_path: Path):
    """make_config(yaml_text) -> Config rooted in tmp_path (listen on port 0)."""

    def build(yaml_text: str = ""):
        return config_for(tmp_path, yaml_text)

    return build
