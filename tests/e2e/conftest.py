"""The real server process for the end-to-end tests.

``e8_server`` (session): ``python -m e8vllm serve`` on CPU with SmolLM2-135M-Instruct, the
``e8_k4v4`` KV cache, an API key, a 64 KiB body cap and telemetry sampling every 8th write call.
``ServerProcess`` also starts the ``auto`` server of ``test_auto_server.py`` (no key, SIGTERM test).
Each server logs to a file; a failed start prints the log's tail.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "e2e-test-key-0123456789"
MODEL = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 1024
KV_GIB = 1
START_TIMEOUT_S = 420.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m e8vllm serve ...`` in a subprocess (its own process group)."""

    def __init__(self, tmp: Path, name: str, args: list[str], api_key: str | None,
                 max_model_len: int = MAX_MODEL_LEN) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_path = tmp / f"{name}.log"
        env = dict(os.environ)
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        env["VLLM_PLUGINS"] = "e8vllm"
        env.pop("VLLM_API_KEY", None)
        cmd = [sys.executable, "-m", "e8vllm", "serve", "--port", str(self.port), "--kv-cache-space-gib",
               str(KV_GIB), "--max-model-len", str(max_model_len), *args]
        if api_key:
            cmd += ["--api-key", api_key]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.wait_ready()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"

    def wait_ready(self) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < START_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    self.start_s = time.monotonic() - t0
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"server not healthy after {START_TIMEOUT_S} s:\n{self.log_tail()}")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kw: object):
        import openai

        kw.setdefault("api_key", self.api_key or "unused")
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=120, **kw)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def e8_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = ServerProcess(tmp_path_factory.mktemp("e8srv"), "e8_k4v4",
                      ["--kv-cache-dtype", "e8_k4v4", "--max-request-bytes", "65536",
                       "--telemetry-sample-every", "8", "--shutdown-timeout", "5"], API_KEY)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from e8vllm.models import prepare_model

    return AutoTokenizer.from_pretrained(str(prepare_model()))
