"""Server settings: one frozen dataclass, validated on construction (ValueError), and the engine args
it implies. ``e8vllm serve`` builds it from the command line, :func:`ServerConfig.from_env` from
``E8VLLM_SERVE_*`` variables (for ``uvicorn --factory e8vllm.server.app:create_app``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["ServerConfig", "parse_engine_arg"]


def parse_engine_arg(item: str) -> tuple[str, Any]:
    """``"key=value"`` -> (key, value) with value parsed as JSON when it is JSON, else the string."""
    if "=" not in item:
        raise ValueError(f"--engine-arg must be KEY=VALUE, got {item!r}")
    k, v = item.split("=", 1)
    k = k.strip().replace("-", "_")
    if not k.isidentifier():
        raise ValueError(f"--engine-arg key must be an identifier, got {k!r}")
    try:
        return k, json.loads(v)
    except ValueError:
        return k, v


#: stock vLLM kv-cache dtypes the server accepts besides e8_*: one element per value, no scales,
#: so the KV gauges follow from the element size (auto = the model dtype; fp8 = 1 byte)
REPORTABLE_STOCK_DTYPES: tuple[str, ...] = ("auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2")


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``e8vllm serve`` needs.

    Attributes:
        model: model directory or Hugging Face id; None = the SmolLM2-135M-Instruct default
            (:func:`e8vllm.models.prepare_model`).
        served_model_name: the name clients send as ``model`` (default: ``model`` as given, as in
            vLLM; for the embedded default model its directory's name, ``SmolLM2-135M-Instruct``).
        kv_cache_dtype: ``e8_k4v4`` etc., or any stock vLLM dtype (``auto`` = the model dtype).
        host, port: where to listen.
        api_keys: accepted bearer tokens; empty = no auth.
        max_model_len, max_num_seqs, tensor_parallel_size, gpu_memory_utilization, dtype,
        enforce_eager, seed: passed to vLLM's ``AsyncEngineArgs`` (None = vLLM's default).
        kv_cache_space_gib: CPU only, sets ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache).
        engine_args: any other ``AsyncEngineArgs`` field (``--engine-arg key=value``).
        max_request_bytes: request bodies above this get 413.
        shutdown_timeout_s: on SIGTERM, in-flight requests may finish for this long, then are aborted.
        telemetry_sample_every: measure the quantization error on one write call in this many
            (0 = off).
        telemetry_max_tokens: tokens measured per sampled write call.
        max_logprobs: the largest ``logprobs`` / ``top_logprobs`` accepted.
    """

    model: str | None = None
    served_model_name: str | None = None
    kv_cache_dtype: str = "e8_k4v4"
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    dtype: str = "auto"
    enforce_eager: bool = True
    seed: int = 0
    kv_cache_space_gib: float | None = None
    engine_args: Mapping[str, Any] = field(default_factory=dict)
    max_request_bytes: int = 1 << 20
    shutdown_timeout_s: float = 30.0
    telemetry_sample_every: int = 64
    telemetry_max_tokens: int = 8
    max_logprobs: int = 20

    def __post_init__(self) -> None:
        if not (0 < self.port < 65536):
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if not isinstance(self.kv_cache_dtype, str) or not self.kv_cache_dtype:
            raise ValueError("kv_cache_dtype must be a non-empty string")
        if self.kv_cache_dtype.startswith("e8_"):
            from e8vllm.vllm_plugin.spec import parse_e8_dtype

            parse_e8_dtype(self.kv_cache_dtype)
        elif self.kv_cache_dtype not in REPORTABLE_STOCK_DTYPES:
            # packed stock formats (int4_per_token_head, nvfp4, turboquant_*) store scales and
            # sub-byte codes the KV gauges cannot size from the dtype name: refuse, never misreport
            raise ValueError(f"kv_cache_dtype {self.kv_cache_dtype!r}: e8vllm serve runs e8_* dtypes and, "
                             f"as baselines, {', '.join(REPORTABLE_STOCK_DTYPES)}; use vLLM's own server "
                             "for other stock KV formats")
        if any(not isinstance(k, str) or not k for k in self.api_keys):
            raise ValueError("api keys must be non-empty strings")
        for name in ("max_model_len", "max_num_seqs"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.gpu_memory_utilization is not None and not (0 < self.gpu_memory_utilization <= 1):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_space_gib is not None and self.kv_cache_space_gib <= 0:
            raise ValueError(f"kv_cache_space_gib must be > 0, got {self.kv_cache_space_gib}")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, got {self.max_request_bytes}")
        if self.shutdown_timeout_s < 0:
            raise ValueError(f"shutdown_timeout_s must be >= 0, got {self.shutdown_timeout_s}")
        if self.telemetry_sample_every < 0 or self.telemetry_max_tokens < 1:
            raise ValueError("telemetry_sample_every must be >= 0 and telemetry_max_tokens >= 1")
        if not (0 <= self.max_logprobs <= 20):
            raise ValueError(f"max_logprobs must be in 0..20, got {self.max_logprobs}")
        reserved = {"model", "kv_cache_dtype", "served_model_name"}
        bad = reserved & set(self.engine_args)
        if bad:
            raise ValueError(f"set {', '.join(sorted(bad))} with its own option, not --engine-arg")
        object.__setattr__(self, "api_keys", tuple(self.api_keys))
        object.__setattr__(self, "engine_args", dict(self.engine_args))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ServerConfig":
        """From ``E8VLLM_SERVE_MODEL``, ``_KV_CACHE_DTYPE``, ``_API_KEY`` (comma list),
        ``_MAX_MODEL_LEN``, ``_ENGINE_ARGS`` (a JSON object), ``_SHUTDOWN_TIMEOUT``,
        ``_MAX_REQUEST_BYTES``; and ``VLLM_API_KEY`` as in vLLM."""
        env = os.environ if env is None else env
        g = lambda k: env.get(f"E8VLLM_SERVE_{k}") or None  # noqa: E731
        keys = g("API_KEY") or env.get("VLLM_API_KEY") or ""
        kw: dict[str, Any] = {"model": g("MODEL"), "api_keys": tuple(k for k in keys.split(",") if k)}
        if g("KV_CACHE_DTYPE"):
            kw["kv_cache_dtype"] = g("KV_CACHE_DTYPE")
        if g("MAX_MODEL_LEN"):
            kw["max_model_len"] = int(g("MAX_MODEL_LEN"))  # type: ignore[arg-type]
        if g("ENGINE_ARGS"):
            kw["engine_args"] = json.loads(g("ENGINE_ARGS"))  # type: ignore[arg-type]
        if g("SHUTDOWN_TIMEOUT"):
            kw["shutdown_timeout_s"] = float(g("SHUTDOWN_TIMEOUT"))  # type: ignore[arg-type]
        if g("MAX_REQUEST_BYTES"):
            kw["max_request_bytes"] = int(g("MAX_REQUEST_BYTES"))  # type: ignore[arg-type]
        return cls(**kw)

    def engine_kwargs(self, model_path: str, *, cuda: bool = False) -> dict[str, Any]:
        """Keyword arguments for ``vllm.engine.arg_utils.AsyncEngineArgs``.

        ``cuda``: the engine runs on CUDA, where vLLM serves the e8 dtypes only from its CUSTOM
        attention backend and never picks that slot by itself: for an e8 dtype it is selected here
        unless ``engine_args`` names a backend (then vLLM's start-up check judges that choice)."""
        kw: dict[str, Any] = {"model": model_path, "kv_cache_dtype": self.kv_cache_dtype, "dtype": self.dtype,
                              "enforce_eager": self.enforce_eager, "seed": self.seed,
                              "tensor_parallel_size": self.tensor_parallel_size,
                              "max_logprobs": self.max_logprobs, "disable_log_stats": False}
        if self.max_model_len is not None:
            kw["max_model_len"] = self.max_model_len
        if self.max_num_seqs is not None:
            kw["max_num_seqs"] = self.max_num_seqs
        if self.gpu_memory_utilization is not None:
            kw["gpu_memory_utilization"] = self.gpu_memory_utilization
        kw.update(self.engine_args)
        if cuda and self.kv_cache_dtype.startswith("e8_") and kw.get("attention_backend") is None:
            ac = kw.get("attention_config")
            if ac is None or (isinstance(ac, Mapping) and ac.get("backend") is None):
                kw["attention_config"] = {**(ac or {}), "backend": "CUSTOM"}
        return kw
