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


def _readme_invocations() -> list[tuple[str, list[str]]]:
    """(line, tokens after the program) of every ``e8vllm`` command line the README shows."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text().replace("\\\n", " ")
    out = []
    for m in re.finditer(r"(?:scripts/e8vllm\.sh|python -m e8vllm|(?<![\w/.-])e8vllm)[ \t]+([a-z][^`\n#|)]*)", text):
        out.append((m.group(0), m.group(1).split()))
    return out


def test_readme_commands_use_real_options() -> None:
    """Every subcommand and --option the README shows exists in the CLI (the README is the manual)."""
    import typer

    root = typer.main.get_command(app)  # typer's own click (vendored in newer typer): duck-typed below
    checked = 0
    for line, toks in _readme_invocations():
        if toks[0] == "test":  # scripts/e8vllm.sh's own command: pytest's options
            continue
        cmd = root
        ctx_args = list(toks)
        while ctx_args and ctx_args[0] in getattr(cmd, "commands", {}):
            cmd = cmd.commands[ctx_args.pop(0)]
        if cmd is root:
            continue  # prose that mentions the package, not a command
        opts = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
        for t in ctx_args:
            if t.startswith("--"):
                assert t.split("=")[0] in opts, f"README: {line!r}: {cmd.name} has no option {t.split('=')[0]}"
        checked += 1
    assert checked >= 8, checked
