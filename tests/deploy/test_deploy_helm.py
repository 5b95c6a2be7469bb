"""The Helm chart, with the real helm (lint, template) and the rendered manifests validated
against Kubernetes' OpenAPI schemas (kubernetes-validate, strict)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "e8vllm"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "e8vllm.json"
K8S_VERSION = "1.33.0"


def _helm(helm_bin: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([str(helm_bin), *args], capture_output=True, text=True, timeout=120)
    if check:
        assert p.returncode == 0, f"helm {' '.join(args)}:\n{p.stdout}\n{p.stderr}"
    return p


def _render(helm_bin: Path, *args: str) -> dict[str, dict]:
    out = _helm(helm_bin, "template", "demo", str(CHART), "--namespace", "llm", *args).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    by_kind = {}
    for d in docs:
        assert d["kind"] not in by_kind, f"two {d['kind']} objects"
        by_kind[d["kind"]] = d
    return by_kind


def test_helm_lint_strict(helm_bin):
    p = _helm(helm_bin, "lint", str(CHART), "--strict")
    assert "0 chart(s) failed" in p.stdout
    p = _helm(helm_bin, "lint", str(CHART), "--strict", "--set", "tensorParallelSize=4,replicaCount=3,persistence.enabled=true")
    assert "0 chart(s) failed" in p.stdout


def test_defaults_render_valid_manifests(helm_bin):
    objs = _render(helm_bin)
    # without the Prometheus Operator API there is no ServiceMonitor
    assert set(objs) == {"Deployment", "Service", "ConfigMap"}
    for d in objs.values():
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    c = objs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1" and c["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert c["args"] == ["--kv-cache-dtype", "e8_k4v4", "--tensor-parallel-size", "1"], "no model: the embedded default"
    assert "env" not in c, "no environment by default (no literal secrets)"


def _gpu_entrypoint() -> list[str]:
    from deploy_checks import exec_form, parse_dockerfile

    (entry,) = [i for i in parse_dockerfile((ROOT / "Dockerfile").read_text()) if i.keyword == "ENTRYPOINT"]
    return exec_form(entry.args)


def test_scaled_out_render(helm_bin, serve_config):
    objs = _render(helm_bin, "--api-versions", "monitoring.coreos.com/v1",
                   "--set", "model=meta-llama/Llama-3.1-8B-Instruct,tensorParallelSize=4,pipelineParallelSize=2",
                   "--set", "replicaCount=3,maxModelLen=32768,gpuMemoryUtilization=0.9",
                   "--set", "apiKey.existingSecret=e8vllm-api-key,persistence.enabled=true")
    assert set(objs) == {"Deployment", "Service", "ConfigMap", "ServiceMonitor", "PersistentVolumeClaim"}
    for kind, d in objs.items():
        if kind != "ServiceMonitor":  # a CRD: no schema in Kubernetes' OpenAPI
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    dep = objs["Deployment"]
    assert dep["spec"]["replicas"] == 3
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    args = c["args"]
    assert args[0] == "meta-llama/Llama-3.1-8B-Instruct"
    flags = dict(zip(args[1::2], args[2::2]))
    assert flags == {"--kv-cache-dtype": "e8_k4v4", "--tensor-parallel-size": "4",
                     "--engine-arg": "pipeline_parallel_size=2", "--max-model-len": "32768",
                     "--gpu-memory-utilization": "0.9"}
    # the GPU image's entrypoint + these args, through the real `e8vllm serve` CLI
    cfg = serve_config(_gpu_entrypoint()[1:] + args)
    assert (cfg.model, cfg.tensor_parallel_size, cfg.max_model_len, cfg.gpu_memory_utilization) == (
        "meta-llama/Llama-3.1-8B-Instruct", 4, 32768, 0.9)
    assert cfg.engine_args == {"attention_config": {"backend": "CUSTOM"}, "pipeline_parallel_size": 2}
    # GPUs per pod = TP x PP
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
    # the API key only from a Secret
    (key,) = [e for e in c["env"] if e["name"] == "VLLM_API_KEY"]  # what `e8vllm serve` reads
    assert key["valueFrom"]["secretKeyRef"] == {"name": "e8vllm-api-key", "key": "api-key"}
    # probes on /health, with a start-up window for model loading
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    s = c["startupProbe"]
    assert s["failureThreshold"] * s["periodSeconds"] >= 600
    (port,) = c["ports"]
    assert port == {"name": "http", "containerPort": 8000, "protocol": "TCP"}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
    assert vols["cache"]["persistentVolumeClaim"]["claimName"] == objs["PersistentVolumeClaim"]["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    # Kubernetes waits longer than the server's drain on SIGTERM before it kills the pod
    assert pod["terminationGracePeriodSeconds"] > cfg.shutdown_timeout_s

    # Service -> pods, ServiceMonitor -> Service
    svc = objs["Service"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in svc["spec"]["selector"].items())
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    sm = objs["ServiceMonitor"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert all(svc["metadata"]["labels"][k] == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    assert sm["spec"]["namespaceSelector"]["matchNames"] == ["llm"]
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] == "http" and ep["path"] == "/metrics"


def test_dashboard_configmap_is_the_dashboard(helm_bin):
    cm = _render(helm_bin)["ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"]["e8vllm.json"] == DASHBOARD.read_text().rstrip("\n")


@pytest.mark.parametrize("bad", ["tensorParallelSize=0", "pipelineParallelSize=0"])
def test_bad_parallel_size_is_refused(helm_bin, bad):
    p = _helm(helm_bin, "template", "demo", str(CHART), "--set", bad, check=False)
    assert p.returncode != 0 and "must be >= 1" in p.stderr


def test_kubernetes_validate_is_live():
    """The schema check rejects what Kubernetes would reject."""
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
           "spec": {"ports": [{"port": "eighty"}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
