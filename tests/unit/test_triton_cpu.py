"""Runs the Triton-interpreter tests (``test_triton_e8.py``, ``test_triton_wiring.py``) on CPU.

Triton chooses between its compiler and its interpreter when it is first imported, and the
pytest process has usually imported it already (through vLLM): so the interpreter tests run in
a child pytest with ``TRITON_INTERPRET=1``; its failures fail this test (with its output).
Skipped where CUDA is present (there the two modules run compiled, directly) or TRITON_INTERPRET
is already set (they then run in this process).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="the interpreter tests run directly here")
def test_triton_interpreter_suite():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(HERE / "test_triton_e8.py"), str(HERE / "test_triton_wiring.py")],
                       env=env, cwd=HERE.parents[1], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout[-2000:]
