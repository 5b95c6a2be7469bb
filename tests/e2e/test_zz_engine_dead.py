"""A dead engine: kill the e8 server's vLLM engine-core process; /health and /v1 answer 503 with the
envelope (code ``engine_dead``) instead of hanging or 500, and SIGTERM still stops the server.

The file name sorts last on purpose: it breaks the session's shared server (run alone, it starts
its own)."""

from __future__ import annotations

import signal
import time

import httpx
import psutil
import pytest

from .conftest import MODEL

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_dead_engine_gives_503(e8_server) -> None:
    procs = psutil.Process(e8_server.proc.pid).children(recursive=True)
    core = [p for p in procs if "EngineCore" in " ".join(p.cmdline() or [p.name()]) or "EngineCore" in p.name()]
    assert core, [(p.pid, p.name(), p.cmdline()) for p in procs]
    for p in core:
        p.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        h = httpx.get(e8_server.url + "/health", timeout=10)
        if h.status_code == 503:
            break
        time.sleep(0.5)
    assert h.status_code == 503 and h.json()["error"]["code"] == "engine_dead", h.text
    r = httpx.post(e8_server.url + "/v1/completions", headers=e8_server.headers, timeout=30,
                   json={"model": MODEL, "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
    assert httpx.get(e8_server.url + "/metrics", timeout=10).status_code == 200
    e8_server.proc.send_signal(signal.SIGTERM)
    e8_server.proc.wait(90)
