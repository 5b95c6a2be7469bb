"""End to end: a real Prometheus (Debian's package) with deploy/prometheus.yml, its target
pointed at a real `e8vllm serve` (vLLM CPU, SmolLM2-135M-Instruct, e8_k4v4) on loopback.

Checked: the scrape works (target up, the job and labels of our config); Prometheus' HTTP API
returns the `e8kv_*` series and vLLM's `vllm:*` series, with the values the server's /metrics
shows; every query of the Grafana dashboard names only metrics that a real /metrics response
contains, and each one evaluates in this Prometheus to data after some traffic.

The server and Prometheus are started once for the module and stopped at its end.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from deploy_checks import dashboard_queries, load_dashboard, promql_metric_names, substitute_grafana

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PROM_CONFIG = ROOT / "deploy" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "e8vllm.json"
SERVER_START_S = 600
#: the E8 series the server must export (the metrics contract of the server issue)
E8KV_SERIES = {
    "e8kv_kv_cache_bytes", "e8kv_kv_cache_model_dtype_bytes", "e8kv_kv_cache_bytes_saved", "e8kv_compression_ratio",
    "e8kv_kv_cache_capacity_tokens", "e8kv_max_concurrency", "e8kv_bits_per_value", "e8kv_config_info",
    "e8kv_quant_squared_error_total", "e8kv_quant_signal_energy_total", "e8kv_quant_sampled_vectors_total",
    "e8kv_quant_cosine_similarity_bucket", "e8kv_quant_cosine_similarity_count", "e8kv_quant_cosine_similarity_sum",
    "e8kv_time_to_first_token_seconds_bucket", "e8kv_inter_token_latency_seconds_bucket",
    "e8kv_e2e_request_latency_seconds_bucket", "e8kv_prompt_tokens_total", "e8kv_generation_tokens_total",
    "e8kv_requests_running", "e8kv_requests_waiting",
}
VLLM_SERIES = {"vllm:kv_cache_usage_perc", "vllm:num_preemptions_total", "vllm:num_requests_waiting",
               "vllm:num_requests_running"}
N_REQUESTS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _stop(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM the process group this test started, then SIGKILL if it does not exit."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `e8vllm serve` on 127.0.0.1 (CPU, the embedded SmolLM2, e8_k4v4, 1 GiB of KV cache)."""
    d = tmp_path_factory.mktemp("e8vllm-server")
    port = _free_port()
    log = d / "server.log"
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_PLUGINS="e8vllm", VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("VLLM_API_KEY", None)  # no auth: the test's requests carry no key
    cmd = [sys.executable, "-m", "e8vllm", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--kv-cache-dtype", "e8_k4v4", "--max-model-len", "2048",
           # the test's traffic is ~100 engine steps: sample each layer every 8 of its steps (default 64),
           # so the dashboard's 1-minute rate windows see error samples, as they do on a busy server
           "--telemetry-sample-every", "8"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=d, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"e8vllm serve exited with {proc.returncode}:\n{_tail(log)}")
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"e8vllm serve not healthy after {SERVER_START_S} s:\n{_tail(log)}")
            time.sleep(2)
        yield {"base": base, "port": port, "log": log}
    finally:
        _stop(proc)


def _config_for(port: int, path: Path) -> dict:
    """deploy/prometheus.yml with only its scrape target changed to the loopback server."""
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    (job,) = cfg["scrape_configs"]
    (sc,) = job["static_configs"]
    assert sc["targets"] == ["e8vllm:8000"]
    sc["targets"] = [f"127.0.0.1:{port}"]
    path.write_text(yaml.safe_dump(cfg))
    return cfg


@pytest.fixture(scope="module")
def prometheus(server, prometheus_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("prometheus")
    cfg = _config_for(server["port"], d / "prometheus.yml")
    check = subprocess.run([str(prometheus_dir / "promtool"), "check", "config", str(d / "prometheus.yml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    port = _free_port()
    log = d / "prometheus.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([str(prometheus_dir / "prometheus"), f"--config.file={d / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={d / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=fh, stderr=subprocess.STDOUT, cwd=d, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited with {proc.returncode}:\n{_tail(log)}")
            try:
                if httpx.get(f"{base}/-/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready:\n{_tail(log)}")
            time.sleep(0.5)
        yield {"base": base, "config": cfg, "log": log}
    finally:
        _stop(proc)


def _query(prom: dict, expr: str) -> list[dict]:
    r = httpx.get(f"{prom['base']}/api/v1/query", params={"query": expr}, timeout=30)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {r.status_code} {body}"
    return body["data"]["result"]


def _wait_for(prom: dict, expr: str, ok, timeout: float = 90) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        res = _query(prom, expr)
        if ok(res):
            return res
        if time.monotonic() > deadline:
            pytest.fail(f"Prometheus: {expr} still {res} after {timeout} s\n{_tail(prom['log'], 20)}")
        time.sleep(2)


@pytest.fixture(scope="module")
def traffic(server, prometheus):
    """A few real chat completions, then wait until Prometheus has scraped their metrics twice."""
    base = server["base"]
    model = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
    for i in range(N_REQUESTS):
        r = httpx.post(f"{base}/v1/chat/completions", timeout=300, json={
            "model": model, "max_tokens": 24, "temperature": 0,
            "messages": [{"role": "user", "content": f"Name {i + 2} colours of the rainbow."}]})
        assert r.status_code == 200, r.text
    _wait_for(prometheus, "e8kv_time_to_first_token_seconds_count",
              lambda res: res and float(res[0]["value"][1]) >= N_REQUESTS)
    # two more scrapes, so that rate() over the dashboard's windows has points after the traffic
    time.sleep(2 * float(prometheus["config"]["global"]["scrape_interval"].rstrip("s")) + 1)
    return model


def test_scrape_target_is_up_with_our_job(server, prometheus, traffic):
    r = httpx.get(f"{prometheus['base']}/api/v1/targets", timeout=30).json()
    (t,) = r["data"]["activeTargets"]
    assert t["health"] == "up", t
    assert t["labels"]["job"] == "e8vllm" and t["labels"]["service"] == "e8vllm"
    assert t["scrapeUrl"] == f"http://127.0.0.1:{server['port']}/metrics"


def test_prometheus_has_the_e8kv_and_vllm_series(server, prometheus, traffic):
    names = {s["metric"]["__name__"] for s in _query(prometheus, '{__name__=~"e8kv_.+"}')}
    assert E8KV_SERIES <= names, f"missing in Prometheus: {sorted(E8KV_SERIES - names)}"
    vllm_names = {s["metric"]["__name__"] for s in _query(prometheus, '{__name__=~"vllm:.+"}')}
    assert VLLM_SERIES <= vllm_names, f"missing in Prometheus: {sorted(VLLM_SERIES - vllm_names)}"

    # the values Prometheus stored are the server's own
    text = httpx.get(f"{server['base']}/metrics", timeout=30).text
    direct = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in text_string_to_metric_families(text) for s in f.samples}
    for name in ("e8kv_compression_ratio", "e8kv_kv_cache_bytes", "e8kv_kv_cache_bytes_saved"):
        (res,) = _query(prometheus, name)
        assert float(res["value"][1]) == pytest.approx(direct[(name, ())], rel=1e-9), name
    ratio = direct[("e8kv_compression_ratio", ())]
    assert 3.5 < ratio < 4.0, f"e8_k4v4 at head size 64 stores 68 vs 256 bytes per token-head, got {ratio}"
    cap = {r["metric"]["cache"]: float(r["value"][1]) for r in _query(prometheus, "e8kv_kv_cache_capacity_tokens")}
    assert cap["e8"] / cap["model_dtype"] == pytest.approx(ratio, rel=0.02)
    (info,) = _query(prometheus, "e8kv_config_info")
    assert info["metric"]["kv_cache_dtype"] == "e8_k4v4"

    # the traffic shows up: latency histograms, tokens, sampled quantization error
    (gen,) = _query(prometheus, "e8kv_generation_tokens_total")
    assert float(gen["value"][1]) >= N_REQUESTS
    sampled = {r["metric"]["tensor"]: float(r["value"][1]) for r in _query(prometheus, "e8kv_quant_sampled_vectors_total")}
    assert set(sampled) == {"key", "value"} and min(sampled.values()) > 0, sampled


def test_dashboard_queries_name_only_exported_metrics(server):
    text = httpx.get(f"{server['base']}/metrics", timeout=30).text
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert len(exported) > 20
    unknown = {}
    for title, expr in dashboard_queries(load_dashboard(DASHBOARD)):
        missing = promql_metric_names(expr) - exported
        if missing:
            unknown[f"{title}: {expr}"] = sorted(missing)
    assert not unknown, "dashboard queries name metrics /metrics does not export:\n" + json.dumps(unknown, indent=1)


def test_dashboard_queries_return_data(prometheus, traffic):
    empty = []
    for title, expr in dashboard_queries(load_dashboard(DASHBOARD)):
        res = _query(prometheus, substitute_grafana(expr))
        if not res:
            empty.append(f"{title}: {expr}")
    assert not empty, "queries without data after traffic:\n" + "\n".join(empty)

    # the SNR panel's formula gives the codec's real SNR (e8s-4bit on SmolLM2 K/V: ~23 dB offline)
    snr_expr = next(e for t, e in dashboard_queries(load_dashboard(DASHBOARD)) if t == "K and V SNR over time")
    snr = {r["metric"]["tensor"]: float(r["value"][1]) for r in _query(prometheus, substitute_grafana(snr_expr))}
    assert set(snr) == {"key", "value"}
    assert all(15 < v < 35 and math.isfinite(v) for v in snr.values()), snr
    p1 = {r["metric"]["tensor"]: float(r["value"][1]) for r in _query(prometheus, substitute_grafana(
        "histogram_quantile(0.01, sum by (le, tensor) (rate(e8kv_quant_cosine_similarity_bucket[$__rate_interval])))"))}
    print(f"\n{len(dashboard_queries(load_dashboard(DASHBOARD)))} dashboard queries returned data; "
          f"SNR dB {snr}; p1 cosine {p1}")
