"""The YAML of the deployment: yamllint, and the wiring of deploy/compose.yaml (server,
Prometheus scraping it, Grafana with the datasource and dashboard provisioned)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
VAR_REF = re.compile(r"\$\{[A-Z0-9_]+(:?[-?][^}]*)?\}")


def _yamllint(*paths: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "yamllint", "--strict", "-c", str(ROOT / ".yamllint"), *paths],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_yamllint_clean():
    p = _yamllint("deploy", ".yamllint", ".hadolint.yaml")
    assert p.returncode == 0, p.stdout + p.stderr
    # it really looked at the files (the helm templates, Go templates, are excluded by .yamllint)
    listed = subprocess.run([sys.executable, "-m", "yamllint", "--list-files", "-c", str(ROOT / ".yamllint"), "deploy"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60).stdout.split()
    assert {"deploy/compose.yaml", "deploy/prometheus.yml", "deploy/helm/e8vllm/values.yaml",
            "deploy/grafana/provisioning/datasources/prometheus.yaml"} <= set(listed)
    assert not any("/templates/" in f for f in listed)


def test_yamllint_catches_bad_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\na: 2\nb:   [1,2]\n")
    assert _yamllint(str(bad)).returncode != 0


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_services_and_profiles():
    c = _compose()
    svc = c["services"]
    assert set(svc) == {"e8vllm", "e8vllm-cpu", "prometheus", "grafana"}
    assert svc["e8vllm"]["profiles"] == ["gpu"] and svc["e8vllm-cpu"]["profiles"] == ["cpu"]
    assert "profiles" not in svc["prometheus"] and "profiles" not in svc["grafana"]
    gpu_dev = svc["e8vllm"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu_dev["driver"] == "nvidia" and gpu_dev["capabilities"] == ["gpu"]
    assert svc["e8vllm"]["ipc"] == "host"
    for name, dockerfile in (("e8vllm", "Dockerfile"), ("e8vllm-cpu", "deploy/Dockerfile.cpu")):
        b = svc[name]["build"]
        assert (DEPLOY / b["context"]).resolve() == ROOT and b["dockerfile"] == dockerfile
        assert (ROOT / dockerfile).is_file()
        assert svc[name]["ports"] == ["8000:8000"]
        assert "e8vllm-cache:/cache" in svc[name]["volumes"]
    # the CPU server answers to the name Prometheus scrapes
    assert "e8vllm" in svc["e8vllm-cpu"]["networks"]["default"]["aliases"]


def test_compose_has_no_secret_values():
    """Secrets only come from the environment: every env value is a ${VAR} reference."""
    for name, s in _compose()["services"].items():
        env = s.get("environment", {})
        assert isinstance(env, dict), f"{name}: use the mapping form"
        for k, v in env.items():
            if re.search(r"KEY|TOKEN|SECRET|PASSWORD", k):
                assert isinstance(v, str) and VAR_REF.fullmatch(v), f"{name}: {k}={v!r} is not a ${{VAR}} reference"


def test_compose_bind_mounts_exist_and_prometheus_scrapes_the_server():
    c = _compose()
    mounts = {}
    for name, s in c["services"].items():
        for v in s.get("volumes", []):
            src, dst = v.split(":")[:2]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name}: bind-mount source {src} missing"
                mounts[(name, dst)] = (DEPLOY / src).resolve()
    assert mounts[("prometheus", "/etc/prometheus/prometheus.yml")] == (DEPLOY / "prometheus.yml").resolve()
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["e8vllm:8000"]
    assert prom["scrape_configs"][0]["metrics_path"] == "/metrics"
    names = set(c["services"]) | {a for s in c["services"].values()
                                  for a in s.get("networks", {}).get("default", {}).get("aliases", [])}
    host, port = targets[0].split(":")
    assert host in names and port == "8000"


def test_grafana_provisioning_wiring():
    c = _compose()
    g = c["services"]["grafana"]
    vols = dict(v.split(":")[1::-1] for v in g["volumes"] if v.startswith("."))
    prov = DEPLOY / vols["/etc/grafana/provisioning"]
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert len(ds) == 1 and ds[0]["type"] == "prometheus" and ds[0]["isDefault"] is True
    assert ds[0]["url"] == "http://prometheus:9090" and "prometheus" in c["services"]
    assert "9090:9090" in c["services"]["prometheus"]["ports"]
    providers = yaml.safe_load((prov / "dashboards" / "e8vllm.yaml").read_text())["providers"]
    path = providers[0]["options"]["path"]
    host_dir = DEPLOY / vols[path]
    dashboards = sorted(host_dir.glob("*.json"))
    assert [d.name for d in dashboards] == ["e8vllm.json"]
    json.loads(dashboards[0].read_text())
    home = g["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/e8vllm.json"


def test_dashboard_copy_in_the_helm_chart_is_identical():
    a = (DEPLOY / "grafana" / "dashboards" / "e8vllm.json").read_bytes()
    b = (DEPLOY / "helm" / "e8vllm" / "dashboards" / "e8vllm.json").read_bytes()
    assert a == b, "deploy/helm/e8vllm/dashboards/e8vllm.json must be a copy of deploy/grafana/dashboards/e8vllm.json"


def _compose_config(compose_bin: Path, profile: str, **env: str) -> subprocess.CompletedProcess:
    """`docker compose config` (the real Compose v2, no daemon needed): resolved, validated."""
    base = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root")}
    return subprocess.run([str(compose_bin), "-f", str(DEPLOY / "compose.yaml"), "--profile", profile, "config",
                           "--format", "json"], capture_output=True, text=True, timeout=120, env={**base, **env})


def _entrypoint(dockerfile: str) -> list[str]:
    from deploy_checks import exec_form, parse_dockerfile

    (entry,) = [i for i in parse_dockerfile((ROOT / dockerfile).read_text()) if i.keyword == "ENTRYPOINT"]
    return exec_form(entry.args)


def test_docker_compose_resolves_both_profiles(compose_bin, serve_config):
    for profile, server, dockerfile in (("gpu", "e8vllm", "Dockerfile"), ("cpu", "e8vllm-cpu", "deploy/Dockerfile.cpu")):
        p = _compose_config(compose_bin, profile, GRAFANA_ADMIN_PASSWORD="pw")
        assert p.returncode == 0, p.stderr
        cfg = json.loads(p.stdout)
        assert set(cfg["services"]) == {server, "prometheus", "grafana"}
        s = cfg["services"][server]
        assert s["build"]["dockerfile"] == dockerfile and Path(s["build"]["context"]) == ROOT
        assert s["environment"] == {"VLLM_API_KEY": "", "HF_TOKEN": ""}
        # the default command, after the image's entrypoint, through the real `e8vllm serve` CLI
        c = serve_config(_entrypoint(dockerfile)[1:] + s["command"])
        assert (c.kv_cache_dtype, c.host, c.port, c.api_keys) == ("e8_k4v4", "0.0.0.0", 8000, ())
        # compose waits longer than the server's drain on SIGTERM before it kills the container
        assert int(re.fullmatch(r"(\d+)s", s["stop_grace_period"]).group(1)) > c.shutdown_timeout_s
        binds = [v for x in cfg["services"].values() for v in x.get("volumes", []) if v["type"] == "bind"]
        assert len(binds) == 3 and all(Path(v["source"]).exists() for v in binds)


def test_docker_compose_overrides_and_required_password(compose_bin, serve_config):
    p = _compose_config(compose_bin, "gpu", GRAFANA_ADMIN_PASSWORD="pw", E8VLLM_GPUS="2", VLLM_API_KEY="k1",
                        E8VLLM_ARGS="org/model --kv-cache-dtype e8_k3v3 --tensor-parallel-size 2")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)["services"]["e8vllm"]
    assert s["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 2
    assert s["environment"]["VLLM_API_KEY"] == "k1"
    c = serve_config(_entrypoint("Dockerfile")[1:] + s["command"], env={"VLLM_API_KEY": s["environment"]["VLLM_API_KEY"]})
    assert (c.model, c.kv_cache_dtype, c.tensor_parallel_size, c.api_keys) == ("org/model", "e8_k3v3", 2, ("k1",))
    # no Grafana admin password, no stack (none is baked in)
    p = _compose_config(compose_bin, "cpu")
    assert p.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in p.stderr
