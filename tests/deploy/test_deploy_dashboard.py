"""The Grafana dashboard and the Prometheus config, checked with the real promtool
(Debian's prometheus package): `promtool check config`, and every dashboard query parsed by
Prometheus' own PromQL parser (as recording rules, `promtool check rules`). That the queries
name only metrics the server exports is checked against a real /metrics response in
test_deploy_prometheus_e2e.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy_checks import (dashboard_panels, dashboard_queries, load_dashboard, promql_metric_names,
                           substitute_grafana)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "e8vllm.json"
PROM_CONFIG = ROOT / "deploy" / "prometheus.yml"

#: what the issue asks the dashboard to show, as the metrics each topic needs
REQUIRED = {
    "bytes saved": {"e8kv_kv_cache_bytes_saved"},
    "compression ratio": {"e8kv_compression_ratio"},
    "bits per value": {"e8kv_bits_per_value"},
    "KV capacity vs model dtype": {"e8kv_kv_cache_capacity_tokens", "e8kv_kv_cache_bytes",
                                   "e8kv_kv_cache_model_dtype_bytes"},
    "maximum concurrency": {"e8kv_max_concurrency"},
    "SNR": {"e8kv_quant_signal_energy_total", "e8kv_quant_squared_error_total"},
    "cosine distribution": {"e8kv_quant_cosine_similarity_bucket"},
    "MSE": {"e8kv_quant_squared_error_total", "e8kv_quant_sampled_vectors_total"},
    "TTFT": {"e8kv_time_to_first_token_seconds_bucket"},
    "ITL": {"e8kv_inter_token_latency_seconds_bucket"},
    "vLLM KV usage": {"vllm:kv_cache_usage_perc"},
    "preemptions": {"vllm:num_preemptions_total"},
    "waiting requests": {"e8kv_requests_waiting", "vllm:num_requests_waiting"},
}


def _promtool(prometheus_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(prometheus_dir / "promtool"), *args], capture_output=True, text=True, timeout=120)


def test_promtool_accepts_the_prometheus_config(prometheus_dir):
    p = _promtool(prometheus_dir, "check", "config", str(PROM_CONFIG))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SUCCESS" in p.stdout + p.stderr


def test_promtool_rejects_a_broken_config(prometheus_dir, tmp_path):
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    cfg["global"]["scrape_timeout"] = "30s"  # longer than the scrape interval: invalid
    bad = tmp_path / "prometheus.yml"
    bad.write_text(yaml.safe_dump(cfg))
    assert _promtool(prometheus_dir, "check", "config", str(bad)).returncode != 0


def _rules_file(exprs: list[str], path: Path) -> Path:
    rules = [{"record": f"e8vllm:dashboard_query_{i}", "expr": e} for i, e in enumerate(exprs)]
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    return path


def test_every_dashboard_query_parses_as_promql(prometheus_dir, tmp_path):
    queries = dashboard_queries(load_dashboard(DASHBOARD))
    assert len(queries) >= 25
    exprs = [substitute_grafana(e) for _, e in queries]
    p = _promtool(prometheus_dir, "check", "rules", str(_rules_file(exprs, tmp_path / "rules.yml")))
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in p.stdout
    # and the parser is really used: a broken query fails
    p = _promtool(prometheus_dir, "check", "rules",
                  str(_rules_file(["sum(rate(e8kv_x[1m])", *exprs], tmp_path / "bad.yml")))
    assert p.returncode != 0


def test_dashboard_covers_the_issue():
    dash = load_dashboard(DASHBOARD)
    names = set().union(*(promql_metric_names(e) for _, e in dashboard_queries(dash)))
    missing = {topic: m - names for topic, m in REQUIRED.items() if m - names}
    assert not missing, missing
    text = DASHBOARD.read_text()
    for q in ("histogram_quantile(0.01,", "histogram_quantile(0.5,", "histogram_quantile(0.99,", "10 * log10("):
        assert q in text


def _tsc_check(tsc: Path, dash: dict, d: Path) -> subprocess.CompletedProcess:
    """Type-check the dashboard as a `Dashboard` object literal against @grafana/schema
    (excess-property and literal-type checks included)."""
    d.mkdir()
    (d / "node_modules").symlink_to(tsc.parents[1])
    (d / "tsconfig.json").write_text(json.dumps({
        "compilerOptions": {"strict": True, "noEmit": True, "module": "nodenext", "moduleResolution": "nodenext",
                            "target": "es2022", "skipLibCheck": True, "types": []}, "files": ["check.ts"]}))
    (d / "check.ts").write_text('import type { Dashboard } from "@grafana/schema";\n'
                                f"export const dashboard: Dashboard = {json.dumps(dash, indent=1)};\n")
    return subprocess.run([str(tsc), "-p", str(d / "tsconfig.json")], capture_output=True, text=True, timeout=300)


def test_dashboard_matches_grafana_schema(grafana_tsc, tmp_path):
    dash = load_dashboard(DASHBOARD)
    p = _tsc_check(grafana_tsc, dash, tmp_path / "ok")
    assert p.returncode == 0, p.stdout + p.stderr
    # the check is live: a string size, an unknown panel field are rejected
    for n, (field, value, message) in enumerate([("gridPos", {"h": "8", "w": 6, "x": 0, "y": 0}, "to type 'number'"),
                                                 ("colour", "red", "'\"colour\"' does not exist")]):
        bad = load_dashboard(DASHBOARD)
        next(p for p in bad["panels"] if p["type"] != "row")[field] = value
        p = _tsc_check(grafana_tsc, bad, tmp_path / f"bad{n}")
        assert p.returncode != 0 and message in p.stdout, p.stdout


def test_dashboard_structure():
    dash = load_dashboard(DASHBOARD)
    assert dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = []
    for p in dashboard_panels(dash):
        ids.append(p["id"])
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


@pytest.mark.parametrize("expr,names", [
    ('sum by (tensor) (rate(e8kv_quant_squared_error_total{job=~".*"}[1m]))', {"e8kv_quant_squared_error_total"}),
    ("histogram_quantile(0.01, sum by (le, tensor) (rate(e8kv_quant_cosine_similarity_bucket[5m])))",
     {"e8kv_quant_cosine_similarity_bucket"}),
    ('10 * log10(sum(rate(a_total[1m])) / sum(rate(b_total[1m]))) > 1e-3', {"a_total", "b_total"}),
    ('avg(vllm:kv_cache_usage_perc{instance="x:8000"}) and on (job) up', {"vllm:kv_cache_usage_perc", "up"}),
])
def test_metric_name_extraction(expr, names):
    assert promql_metric_names(expr) == names
