"""``/health``, ``/version``, ``/metrics``, ``/v1/models``, ``/v1/kv_cache``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from e8vllm import telemetry

from ..errors import error_response
from ..metrics import render, telemetry_summary
from . import common

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Any:
    """200 with the running KV dtype; 503 while starting, shutting down, or with a dead engine."""
    ctx = common.context(request)
    h = ctx.handle
    if ctx.state.shutting_down:
        return error_response(503, "the server is shutting down", code="shutting_down")
    if h is None:
        return error_response(503, "the engine is not started", code="engine_not_ready")
    if h.dead:
        return error_response(503, "the inference engine is dead", code="engine_dead")
    return {"status": "ok", "model": h.model_name, "kv_cache_dtype": h.kv["kv_cache_dtype"],
            "requests_in_flight": ctx.state.inflight, "engine_unfinished_requests": h.unfinished(),
            "scheduler_running": h.counts.num_running, "scheduler_waiting": h.counts.num_waiting}


@router.get("/version")
async def version() -> dict:
    import e8vllm

    try:
        import vllm

        vv = getattr(vllm, "__version__", None)
    except Exception:  # noqa: BLE001
        vv = None
    return {"version": getattr(e8vllm, "__version__", "0.1.0"), "vllm_version": vv}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    ctx = common.context(request)
    regs = []
    try:
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        regs.append(get_prometheus_registry())
    except Exception:  # noqa: BLE001 - vLLM's metrics are optional here
        pass
    if ctx.metrics is not None:
        regs.append(ctx.metrics.registry)
    return Response(render(*regs), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(request: Request) -> dict:
    h = common.context(request).ready()
    return {"object": "list", "data": [{"id": h.model_name, "object": "model", "created": int(h.started_at),
                                        "owned_by": "e8vllm", "root": h.model_path,
                                        "max_model_len": h.max_model_len,
                                        "kv_cache_dtype": h.kv["kv_cache_dtype"]}]}


def kv_cache_report(ctx: common.AppContext) -> dict:
    h = ctx.ready()
    kv = dict(h.kv)
    snap = telemetry.read_dir(h.telemetry_dir) if h.telemetry_dir is not None else None
    kv["quantization_error"] = telemetry_summary(snap, kv["head_size"])
    if h.telemetry_dir is not None:
        kv["telemetry"] = {"enabled": True, "sample_every": ctx.config.telemetry_sample_every,
                           "max_tokens": ctx.config.telemetry_max_tokens, "processes": snap.files if snap else 0,
                           "reported_by_engine": snap.info if snap else []}
    elif not kv["quantized"]:
        kv["telemetry"] = {"enabled": False, "reason": f"kv_cache_dtype={kv['kv_cache_dtype']} stores the model "
                           "dtype: nothing is quantized, the error counters stay 0"}
    else:
        kv["telemetry"] = {"enabled": False, "reason": "error telemetry measures e8 dtypes only (or it was "
                           "turned off with --telemetry-sample-every 0)"}
    return kv


@router.get("/v1/kv_cache")
async def kv_cache(request: Request) -> JSONResponse:
    return JSONResponse(kv_cache_report(common.context(request)))
