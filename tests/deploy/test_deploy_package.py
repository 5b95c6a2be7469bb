"""What the images install: `pip install ./[...]` of the Docker build context is a regular
(non-editable) install, so the wheel built from exactly the files .dockerignore lets through
must carry every module and data file of the package (an editable dev install hides a miss)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _context_entries() -> list[str]:
    lines = [s.strip() for s in (ROOT / ".dockerignore").read_text().splitlines()
             if s.strip() and not s.startswith("#")]
    return [s[1:].rstrip("/") for s in lines if s.startswith("!")]


def test_wheel_from_the_build_context_has_every_package_file(tmp_path):
    ctx = tmp_path / "context"
    ctx.mkdir()
    for name in _context_entries():
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, ctx / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, ctx / name)
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "-w", str(tmp_path / "dist"), str(ctx)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    (whl,) = (tmp_path / "dist").glob("e8vllm-*.whl")
    in_wheel = set(zipfile.ZipFile(whl).namelist())

    tracked = subprocess.run(["git", "ls-files", "e8vllm"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert any(f.endswith(".json") for f in tracked), "expected the codec tables among the package files"
    missing = [f for f in tracked if f not in in_wheel]
    assert not missing, f"files of the package missing from the installed wheel: {missing}"
    entry = [n for n in in_wheel if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(whl).read(entry[0]).decode()
    assert "e8vllm = e8vllm.cli:main" in text and "e8vllm = e8vllm.vllm_plugin:register" in text
