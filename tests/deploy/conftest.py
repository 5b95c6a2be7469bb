"""Fixtures for the deployment tests: the real tools (installed on demand, see deploy_tools.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import deploy_tools  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def hadolint_bin() -> Path:
    return deploy_tools.hadolint()


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    return deploy_tools.helm()


@pytest.fixture(scope="session")
def compose_bin() -> Path:
    return deploy_tools.compose()


@pytest.fixture(scope="session")
def grafana_tsc() -> Path:
    return deploy_tools.grafana_schema_tsc()


@pytest.fixture(scope="session")
def prometheus_dir() -> Path:
    """Directory holding Debian's ``prometheus`` and ``promtool`` binaries."""
    return deploy_tools.prometheus()


@pytest.fixture
def serve_config(monkeypatch):
    """Parse `e8vllm serve` arguments with the real CLI and return the ServerConfig it would
    serve with (the server itself is not started)."""
    from typer.testing import CliRunner

    import e8vllm.server.app as server_app
    from e8vllm.cli import app

    captured = []
    monkeypatch.setattr(server_app, "serve", captured.append)

    def parse(args: list[str], env: dict[str, str] | None = None):
        captured.clear()
        assert args[:1] == ["serve"], args
        r = CliRunner().invoke(app, args, env=env or {"VLLM_API_KEY": ""}, catch_exceptions=False)
        assert r.exit_code == 0, f"e8vllm {' '.join(args)}:\n{r.output}"
        (cfg,) = captured
        return cfg

    return parse
