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
def prometheus_dir() -> Path:
    """Directory holding Debian's ``prometheus`` and ``promtool`` binaries."""
    return deploy_tools.prometheus()
