r"""Prometheus metrics (prefix ``e8kv_``, base units), next to vLLM's own ``vllm:*`` series.

``GET /metrics`` = vLLM's registry (its ``PrometheusStatLogger`` series: ``vllm:num_requests_running``,
``vllm:kv_cache_usage_perc``, ``vllm:num_preemptions_total``, ...) followed by this server's registry:

KV savings (gauges, from vLLM's block count and the slot sizes, see :func:`engine.kv_summary`)
    ``e8kv_kv_cache_bytes``                       bytes the (compressed) cache occupies
    ``e8kv_kv_cache_model_dtype_bytes``           bytes the same tokens need at the model dtype
    ``e8kv_kv_cache_bytes_saved``                 the difference
    ``e8kv_compression_ratio``                    model-dtype bytes / cache bytes (1 for ``auto``)
    ``e8kv_kv_cache_capacity_tokens{cache}``      tokens the cache holds: ``e8`` (running dtype) and
                                                  ``model_dtype`` (same bytes at the model dtype)
    ``e8kv_max_concurrency{cache}``               capacity / max_model_len
    ``e8kv_bits_per_value{tensor}``               stored bits per K / V value, scales included
    ``e8kv_config_info{kv_cache_dtype,codec_key,codec_value,bits_key,bits_value,rotation,model,kv_centering}`` = 1
Live quantization error (counters; measured in the engine processes, :mod:`e8vllm.telemetry`)
    ``e8kv_quant_squared_error_total{tensor}``    Σ‖x − x̂‖² over sampled (token, kv-head) vectors
    ``e8kv_quant_signal_energy_total{tensor}``    Σ‖x‖²
    ``e8kv_quant_sampled_vectors_total{tensor}``  number of sampled vectors
    ``e8kv_quant_cosine_similarity{tensor}``      histogram of cos(x, x̂), buckets near 1
  SNR over a window: ``10*log10(rate(signal_energy) / rate(squared_error))``; MSE per value:
  ``rate(squared_error) / (rate(sampled_vectors) * head_size)``.
Requests (measured in the server)
    ``e8kv_time_to_first_token_seconds``, ``e8kv_inter_token_latency_seconds``,
    ``e8kv_e2e_request_latency_seconds`` (histograms), ``e8kv_prompt_tokens_total``,
    ``e8kv_generation_tokens_total``, ``e8kv_requests_running`` / ``e8kv_requests_waiting``
    (vLLM's scheduler counts, from its stat-logger callback).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from e8vllm import telemetry

__all__ = ["ServerMetrics", "KVCollector", "telemetry_summary", "render"]

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 240.0, 480.0, 960.0)


def telemetry_summary(snap: telemetry.Snapshot | None, head_size: int) -> dict[str, Any]:
    """MSE per value, SNR (dB) and mean cosine per tensor since start (JSON-able)."""
    out: dict[str, Any] = {}
    for t in telemetry.TENSORS:
        s = snap.stats[t] if snap is not None else telemetry.TensorStats()
        out[t] = {"sampled_vectors": int(s.vectors), "squared_error": s.squared_error,
                  "signal_energy": s.signal_energy,
                  "mse_per_value": (s.squared_error / (s.vectors * head_size)) if s.vectors else None,
                  "snr_db": s.snr_db, "mean_cosine": (s.cosine_sum / s.vectors) if s.vectors else None}
    return out


class KVCollector(Collector):
    """Collects the KV gauges and the error counters at scrape time."""

    def __init__(self, kv: Callable[[], dict[str, Any] | None], snap: Callable[[], telemetry.Snapshot | None]) -> None:
        self._kv, self._snap = kv, snap

    def collect(self) -> Iterator[Any]:
        kv = self._kv()
        if kv is None:
            return
        g = GaugeMetricFamily
        yield g("e8kv_kv_cache_bytes", "Bytes the KV cache occupies (all layers, KV heads, ranks).",
                value=kv["kv_cache_bytes"])
        yield g("e8kv_kv_cache_model_dtype_bytes", "Bytes the same number of tokens needs at the model dtype.",
                value=kv["model_dtype_bytes"])
        yield g("e8kv_kv_cache_bytes_saved", "Model-dtype bytes minus cache bytes.", value=kv["bytes_saved"])
        yield g("e8kv_compression_ratio", "Model-dtype bytes / cache bytes (1 = no compression).",
                value=kv["compression_ratio"])
        cap = g("e8kv_kv_cache_capacity_tokens", "KV cache capacity in tokens: the running dtype (cache=e8) and "
                "the model dtype in the same bytes (cache=model_dtype).", labels=["cache"])
        conc = g("e8kv_max_concurrency", "Capacity in requests of max_model_len tokens.", labels=["cache"])
        for c in ("e8", "model_dtype"):
            cap.add_metric([c], kv["capacity_tokens"][c])
            conc.add_metric([c], kv["max_concurrency"][c])
        yield cap
        yield conc
        bits = g("e8kv_bits_per_value", "Stored bits per cached value, scales included.", labels=["tensor"])
        bits.add_metric(["key"], kv["bits_key"])
        bits.add_metric(["value"], kv["bits_value"])
        yield bits
        names = ["kv_cache_dtype", "codec_key", "codec_value", "bits_key", "bits_value", "rotation", "model",
                 "kv_centering"]
        info = g("e8kv_config_info", "The KV format actually running (value 1).", labels=names)
        centering = bool(kv.get("kv_calibration", {}).get("kv_centering"))
        info.add_metric([kv["kv_cache_dtype"], kv["codec_key"], kv["codec_value"], f"{kv['bits_key']:g}",
                         f"{kv['bits_value']:g}", kv["rotation"], kv["model"], str(centering).lower()], 1.0)
        yield info

        snap = self._snap()
        err = CounterMetricFamily("e8kv_quant_squared_error", "Sum of squared quantization error over sampled "
                                  "K/V vectors (original domain).", labels=["tensor"])
        sig = CounterMetricFamily("e8kv_quant_signal_energy", "Sum of squared norms of the sampled K/V vectors.",
                                  labels=["tensor"])
        cnt = CounterMetricFamily("e8kv_quant_sampled_vectors", "Number of sampled (token, kv-head) vectors.",
                                  labels=["tensor"])
        cos = HistogramMetricFamily("e8kv_quant_cosine_similarity", "Cosine similarity of sampled K/V vectors "
                                    "with their reconstruction from the cache.", labels=["tensor"])
        for t in telemetry.TENSORS:
            s = snap.stats[t] if snap is not None else telemetry.TensorStats()
            err.add_metric([t], s.squared_error)
            sig.add_metric([t], s.signal_energy)
            cnt.add_metric([t], s.vectors)
            cum, buckets = 0.0, []
            for ub, c in zip((*telemetry.COSINE_BUCKETS, float("inf")), s.buckets):
                cum += c
                buckets.append(("+Inf" if ub == float("inf") else repr(ub), cum))
            cos.add_metric([t], buckets, sum_value=s.cosine_sum)
        yield err
        yield sig
        yield cnt
        yield cos


class ServerMetrics:
    """This server's registry: the KV collector and the request metrics."""

    def __init__(self, kv: Callable[[], dict[str, Any] | None], snap: Callable[[], telemetry.Snapshot | None],
                 counts: Callable[[], tuple[int, int] | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(KVCollector(kv, snap))
        self.registry.register(_SchedulerCollector(counts))
        self.ttft = Histogram("e8kv_time_to_first_token_seconds", "Time from request arrival to its first token.",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("e8kv_inter_token_latency_seconds", "Time between successive output tokens of a choice (a chunk of k tokens: k samples of gap / k).",
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("e8kv_e2e_request_latency_seconds", "Time from request arrival to its last token (requests whose choices all finished; aborted ones are left out).",
                             buckets=E2E_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("e8kv_prompt_tokens", "Prompt tokens processed.", registry=self.registry)
        self.generation_tokens = Counter("e8kv_generation_tokens", "Tokens generated.", registry=self.registry)


class _SchedulerCollector(Collector):
    def __init__(self, counts: Callable[[], tuple[int, int] | None]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Any]:
        c = self._counts()
        if c is None:
            return
        yield GaugeMetricFamily("e8kv_requests_running", "Requests the vLLM scheduler is running.", value=c[0])
        yield GaugeMetricFamily("e8kv_requests_waiting", "Requests waiting in the vLLM scheduler.", value=c[1])


def render(*registries: Any) -> bytes:
    """Text exposition of several registries, concatenated."""
    return b"".join(generate_latest(r) for r in registries)
