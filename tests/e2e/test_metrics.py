"""``/metrics`` and ``/v1/kv_cache`` of the real e8_k4v4 server, parsed with prometheus_client.

Checked: every ``e8kv_*`` metric of the contract exists beside vLLM's ``vllm:*`` series; bytes and
capacity agree with vLLM's own ``vllm:cache_config_info`` (blocks x block size, the memory budget);
the error counters grow with traffic and give an SNR in the range the codec benchmark measured for
``e8s-4bit`` on SmolLM2's K/V (about 23 dB; window 17-32 dB); the cosine histogram counts every sampled
vector; request counters move by exactly the usage the responses reported."""

from __future__ import annotations

import math
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import KV_GIB, MAX_MODEL_LEN, MODEL

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

E8KV = ["e8kv_kv_cache_bytes", "e8kv_kv_cache_model_dtype_bytes", "e8kv_kv_cache_bytes_saved",
        "e8kv_compression_ratio", "e8kv_kv_cache_capacity_tokens", "e8kv_max_concurrency", "e8kv_bits_per_value",
        "e8kv_config_info", "e8kv_quant_squared_error", "e8kv_quant_signal_energy", "e8kv_quant_sampled_vectors",
        "e8kv_quant_cosine_similarity", "e8kv_time_to_first_token_seconds", "e8kv_inter_token_latency_seconds",
        "e8kv_e2e_request_latency_seconds", "e8kv_prompt_tokens", "e8kv_generation_tokens",
        "e8kv_requests_running", "e8kv_requests_waiting"]
VLLM = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
        "vllm:num_preemptions", "vllm:cache_config_info"]


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}}."""
    text = httpx.get(url + "/metrics", timeout=30).text
    out: dict[str, dict[tuple, float]] = {}
    families = set()
    for fam in text_string_to_metric_families(text):
        families.add(fam.name)
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    out["__families__"] = {(f,): 1.0 for f in families}
    return out


def one(m: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    hits = [v for k, v in m[name].items() if want <= set(k)]
    assert len(hits) == 1, (name, labels, m.get(name))
    return hits[0]


def test_metrics_exist_and_match_vllm(e8_server) -> None:
    m = scrape(e8_server.url)
    fams = {k[0] for k in m["__families__"]}
    missing = [n for n in E8KV + VLLM if n not in fams]
    assert not missing, missing
    info = dict(next(iter(m["vllm:cache_config_info"])))
    blocks, bs = int(info["num_gpu_blocks"]), int(info["block_size"])
    assert info["cache_dtype"] == "e8_k4v4"
    cap = one(m, "e8kv_kv_cache_capacity_tokens", cache="e8")
    assert cap == blocks * bs == int(info["kv_cache_size_tokens"])
    # 30 layers x 3 KV heads x 68 B per token-head (K 34 + V 34) vs 256 B at bf16
    kv_bytes = one(m, "e8kv_kv_cache_bytes")
    assert kv_bytes == cap * 30 * 3 * 68
    budget = int(info["kv_cache_memory_bytes"])
    assert budget == KV_GIB * 2**30 and 0 <= budget - kv_bytes < bs * 30 * 3 * 68  # within one block
    model_bytes = one(m, "e8kv_kv_cache_model_dtype_bytes")
    assert model_bytes == cap * 30 * 3 * 256
    assert one(m, "e8kv_kv_cache_bytes_saved") == model_bytes - kv_bytes
    assert one(m, "e8kv_compression_ratio") == pytest.approx(256 / 68)
    # the model dtype's capacity in the same budget: what vLLM itself reports for kv_cache_dtype=auto
    # (README capacity table: 46,592 tokens at 1 GiB; test_auto_server.py checks it against a live engine)
    mcap = one(m, "e8kv_kv_cache_capacity_tokens", cache="model_dtype")
    assert mcap == (budget // (30 * 3 * 256)) // bs * bs
    assert one(m, "e8kv_max_concurrency", cache="e8") == pytest.approx(cap / MAX_MODEL_LEN)
    assert one(m, "e8kv_max_concurrency", cache="model_dtype") == pytest.approx(mcap / MAX_MODEL_LEN)
    assert float(info["kv_cache_max_concurrency"]) == pytest.approx(cap / MAX_MODEL_LEN)
    assert one(m, "e8kv_bits_per_value", tensor="key") == 4.25 == one(m, "e8kv_bits_per_value", tensor="value")
    (labels,) = m["e8kv_config_info"]
    d = dict(labels)
    assert d == {"kv_cache_dtype": "e8_k4v4", "codec_key": "e8c-4bit", "codec_value": "e8s-4bit", "bits_key": "4.25",
                 "bits_value": "4.25", "rotation": "hadamard(seed=0)", "model": MODEL, "kv_centering": "true"}
    calib = httpx.get(e8_server.url + "/v1/kv_cache", headers=e8_server.headers, timeout=30).json()["kv_calibration"]
    assert calib["kv_centering"] is True and calib["calibration_file"].endswith("e8vllm/kv_calibration.safetensors")
    # vLLM's own series carry the served model name
    assert dict(next(iter(m["vllm:num_requests_running"])))["model_name"] == MODEL


def test_error_counters_grow_with_traffic(e8_server) -> None:
    before = scrape(e8_server.url)
    c = e8_server.client()
    usage = [0, 0]
    n_req = 0
    for i in range(4):
        r = c.completions.create(model=MODEL, prompt=f"Write a list of {i + 3} animals:", max_tokens=24,
                                 temperature=0, extra_body={"ignore_eos": True})
        usage[0] += r.usage.prompt_tokens
        usage[1] += r.usage.completion_tokens
        n_req += 1
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count to five."}],
                                  max_tokens=16, temperature=0)
    usage[0] += r.usage.prompt_tokens
    usage[1] += r.usage.completion_tokens
    n_req += 1
    after = scrape(e8_server.url)

    def delta(name: str, **labels: str) -> float:
        return one(after, name, **labels) - (one(before, name, **labels) if name in before else 0.0)

    for t in ("key", "value"):
        err = delta("e8kv_quant_squared_error_total", tensor=t)
        sig = delta("e8kv_quant_signal_energy_total", tensor=t)
        n = delta("e8kv_quant_sampled_vectors_total", tensor=t)
        # (4 x (prefill + 23 decode steps) + chat) x 30 layers / 8 sampled calls, <= 8 tokens x 3 heads each
        assert n >= 100, (t, n)
        snr = 10 * math.log10(sig / err)
        assert 17.0 < snr < 32.0, (t, snr)
        assert delta("e8kv_quant_cosine_similarity_count", tensor=t) == n
        cos_mean = delta("e8kv_quant_cosine_similarity_sum", tensor=t) / n
        assert 0.98 < cos_mean <= 1.0
        assert one(after, "e8kv_quant_cosine_similarity_bucket", tensor=t, le="+Inf") == \
            one(after, "e8kv_quant_cosine_similarity_count", tensor=t)
        print(f"live {t}: {int(n)} vectors, SNR {snr:.2f} dB, mean cosine {cos_mean:.5f}")
    assert delta("e8kv_prompt_tokens_total") == usage[0]
    assert delta("e8kv_generation_tokens_total") == usage[1]
    assert delta("e8kv_time_to_first_token_seconds_count") == n_req
    assert delta("e8kv_e2e_request_latency_seconds_count") == n_req
    assert delta("e8kv_inter_token_latency_seconds_count") == usage[1] - n_req
    # vLLM's own counter: its stat logger may record the last step a moment after the response
    deadline = time.monotonic() + 10
    while delta("vllm:generation_tokens_total") != usage[1] and time.monotonic() < deadline:
        time.sleep(0.2)
        after = scrape(e8_server.url)
    assert delta("vllm:generation_tokens_total") == usage[1]

    kv = httpx.get(e8_server.url + "/v1/kv_cache", headers=e8_server.headers, timeout=30).json()
    assert kv["kv_cache_dtype"] == "e8_k4v4" and kv["telemetry"]["enabled"] is True
    assert kv["capacity_tokens"]["e8"] == one(after, "e8kv_kv_cache_capacity_tokens", cache="e8")
    (proc,) = kv["telemetry"]["reported_by_engine"]
    assert proc["codec_key"] == "e8c-4bit" and proc["rotation_key"] == "hadamard(seed=0)"
    for t in ("key", "value"):
        q = kv["quantization_error"][t]
        assert q["sampled_vectors"] >= one(after, "e8kv_quant_sampled_vectors_total", tensor=t)
        assert 17.0 < q["snr_db"] < 32.0
        print(f"/v1/kv_cache {t}: {q}")


def test_requests_gauges_settle(e8_server) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        m = scrape(e8_server.url)
        if one(m, "e8kv_requests_running") == 0 and one(m, "e8kv_requests_waiting") == 0:
            break
        time.sleep(0.5)
    assert one(m, "e8kv_requests_running") == 0 and one(m, "e8kv_requests_waiting") == 0
