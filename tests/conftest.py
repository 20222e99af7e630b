"""Shared fixtures: real servers on 127.0.0.1 in the test's own event loop."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailflow.testing import config_for

TESTS = Path(__file__).parent
MESSAGES = TESTS / "messages"


@pytest.fixture
def messages_dir() -> Path:
    return MESSAGES


@pytest.fixture
def make_config(tmp_path: Path):
    """make_config(yaml_text) -> Config rooted in tmp_path (listen on port 0)."""

    def build(yaml_text: str = ""):
        return config_for(tmp_path, yaml_text)

    return build
