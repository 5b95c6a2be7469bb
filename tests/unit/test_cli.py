"""Every ``e8vllm`` command's ``--help`` renders (typer + rich: markup in a docstring can break it)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from e8vllm.cli import app

COMMANDS = [[], ["serve"], ["calibrate"], ["prepare-model"], ["dump-kv"], ["bench"], ["bench", "quant"],
            ["bench", "quality"], ["bench", "capacity"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "e8vllm")
def test_help_renders(cmd: list[str]) -> None:
    r = CliRunner().invoke(app, [*cmd, "--help"])
    assert r.exit_code == 0, r.output
    assert "Usage" in r.output
