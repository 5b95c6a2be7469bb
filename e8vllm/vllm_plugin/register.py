r"""The ``vllm.general_plugins`` entry point: e8 kv-cache dtypes, the CPU backend, start-up checks.

``register()`` runs in every vLLM process (front end, engine core, each worker), before any
config, model or KV cache is built; it is idempotent. Every hook is chosen by **feature
detection**, never by version strings:

=====================  ==========================================  ======================================
what                   vLLM 0.33+ (``register_kv_cache_dtype``)    vLLM 0.26 / 0.32 (no such function)
=====================  ==========================================  ======================================
dtype names            one handler per name: uint8 storage,        extend the ``CacheDType`` Literal (CLI
                       ``KVQuantMode.NONE``, not "quantized"       choices, pydantic field, selector
                                                                   assert) + ``STR_DTYPE_TO_TORCH_DTYPE``
page size              ``customize_spec`` (0.32+, spec.py)         0.26: ``Attention.get_kv_cache_spec``
                                                                   wrapper + spec subclass (spec.py)
backend (CPU)          ``register_backend(CPU_ATTN, ...)``         same (all versions)
start-up check         wrap ``EngineArgs.create_engine_config``    same (all versions)
=====================  ==========================================  ======================================

The start-up check runs in the process that builds the engine config (``LLM``, ``AsyncLLM``,
the API server): a model the E8 path cannot serve (sliding window, MLA, sinks, ALiBi,
encoder/cross attention, soft-capping, unsupported head size, hybrid) or a non-CPU platform
raises :class:`~.spec.E8UnsupportedError` before any engine process starts. The attention impl
repeats the per-layer check in the worker (authoritative), and the impl self-checks the cache
page layout on first use.

Nothing here imports torch-heavy e8vllm modules: workers load the codecs when the first e8
attention layer is built.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Literal, get_args

from .spec import E8_DTYPES, HAS_CUSTOMIZE_SPEC, config_unsupported_reasons, install_legacy_spec_hook
from .spec import E8UnsupportedError, is_e8_dtype, raise_if_unsupported

__all__ = ["register", "register_dtypes", "has_dtype_api", "BACKEND_PATH", "state"]

logger = logging.getLogger("e8vllm.vllm_plugin")

#: Class path registered over ``AttentionBackendEnum.CPU_ATTN``.
BACKEND_PATH = "e8vllm.vllm_plugin.cpu.E8CPUAttentionBackend"
#: Class path registered in ``AttentionBackendEnum.CUSTOM`` on CUDA.
GPU_BACKEND_PATH = "e8vllm.vllm_plugin.gpu.E8TritonBackend"

_STATE: dict[str, Any] = {"registered": False, "dtypes": None, "backend": None, "check": False,
                          "legacy_spec": False}


def state() -> dict[str, Any]:
    """What :func:`register` did in this process (for logs and tests)."""
    return dict(_STATE)


def has_dtype_api() -> bool:
    """vLLM >= 0.33: ``vllm.config.cache.register_kv_cache_dtype`` exists."""
    try:
        import vllm.config.cache as cc
    except ImportError:  # pragma: no cover
        return False
    return hasattr(cc, "register_kv_cache_dtype")


# ---------------------------------------------------------------------------------------------
# dtype names
# ---------------------------------------------------------------------------------------------
def _register_with_api(names: tuple[str, ...]) -> None:
    """0.33+: one ``KVCacheDTypeHandler`` per name."""
    import torch
    import vllm.config.cache as cc
    from vllm.v1.kv_cache_interface import KVQuantMode

    known = getattr(cc, "KV_CACHE_DTYPES", None)
    for name in names:
        if known is not None and name in known:
            continue

        class _Handler:
            # KVQuantMode.NONE: 0.33's CUSTOM member aliases OCTAVE_K3V4 (same value), so do not use it
            def __init__(self, _n: str = name) -> None:
                self.name = _n

            def torch_dtype(self) -> torch.dtype:
                return torch.uint8

            def is_quantized(self) -> bool:
                return False  # keeps vLLM's fp8-only code paths (CPU ISA choice, scales) away

            def quant_mode(self) -> KVQuantMode:
                return KVQuantMode.NONE

            def supports_platform(self, platform: Any) -> bool:  # the CPU_ATTN override, CUDA's CUSTOM slot
                return any(bool(getattr(platform, f, lambda: False)()) for f in ("is_cpu", "is_cuda"))

        _Handler.__name__ = _Handler.__qualname__ = f"E8Handler_{name}"
        cc.register_kv_cache_dtype(name)(_Handler)


def _patch_literal(names: tuple[str, ...]) -> None:
    """0.26 / 0.32: extend the ``CacheDType`` Literal everywhere it is checked.

    1. ``vllm.config.cache.CacheDType`` and the copy imported by ``vllm.v1.attention.selector``
       (``get_attn_backend`` asserts membership at call time);
    2. the ``CacheConfig.cache_dtype`` dataclass field type / annotation -> argparse choices
       (``_compute_kwargs`` is lru-cached: cleared);
    3. the pydantic field annotation, then ``rebuild_dataclass(force=True)`` -> validation;
    4. ``STR_DTYPE_TO_TORCH_DTYPE[name] = torch.uint8``.
    """
    import torch
    import vllm.config.cache as cc
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    cur = get_args(cc.CacheDType)
    missing = tuple(n for n in names if n not in cur)
    if missing:
        new = Literal[(*cur, *missing)]  # type: ignore[valid-type]
        cc.CacheDType = new  # type: ignore[misc]
        try:
            import vllm.v1.attention.selector as sel

            sel.CacheDType = new  # type: ignore[attr-defined]
        except ImportError:  # pragma: no cover
            pass
        klass = cc.CacheConfig
        klass.__dataclass_fields__["cache_dtype"].type = new  # type: ignore[attr-defined]
        klass.__annotations__["cache_dtype"] = new
        pyd = getattr(klass, "__pydantic_fields__", None)
        if pyd is not None and "cache_dtype" in pyd:
            pyd["cache_dtype"].annotation = new
            from pydantic.dataclasses import rebuild_dataclass

            rebuild_dataclass(klass, force=True)
        try:
            import vllm.engine.arg_utils as au

            au._compute_kwargs.cache_clear()
        except (ImportError, AttributeError):  # pragma: no cover
            pass
    for n in names:
        STR_DTYPE_TO_TORCH_DTYPE[n] = torch.uint8


def register_dtypes(names: tuple[str, ...] = E8_DTYPES) -> str:
    """Make ``names`` valid ``kv_cache_dtype`` values. Returns the mechanism used ("api"/"literal")."""
    if has_dtype_api():
        _register_with_api(names)
        return "api"
    _patch_literal(names)
    return "literal"


# ---------------------------------------------------------------------------------------------
# backend and start-up check
# ---------------------------------------------------------------------------------------------
def _is_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _is_cuda() -> bool:
    from vllm.platforms import current_platform

    return bool(getattr(current_platform, "is_cuda", lambda: False)())


def _register_cpu_backend() -> str | None:
    """Register our backend: over ``CPU_ATTN`` on CPU, in the ``CUSTOM`` slot on CUDA.

    Returns the class path, or None on other platforms.
    """
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if _is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)
        return BACKEND_PATH
    if _is_cuda():
        register_backend(AttentionBackendEnum.CUSTOM, GPU_BACKEND_PATH)
        return GPU_BACKEND_PATH
    return None


def _selected_backend(vllm_config: Any) -> str | None:
    ac = getattr(vllm_config, "attention_config", None)
    backend = getattr(ac, "backend", None)
    return None if backend is None else str(getattr(backend, "name", backend))


def check_engine_config(vllm_config: Any) -> None:
    """Raise E8UnsupportedError if ``vllm_config`` asks for an e8 dtype it cannot get."""
    cc = getattr(vllm_config, "cache_config", None)
    name = getattr(cc, "cache_dtype", None)
    if not is_e8_dtype(name):
        return
    reasons = config_unsupported_reasons(vllm_config)
    if not _is_cuda() and not _is_cpu():
        from vllm.platforms import current_platform

        reasons.append(f"no e8 attention backend for the {current_platform.device_name!r} platform "
                       "(e8vllm serves e8 dtypes on CPU and CUDA)")
    raise_if_unsupported(name, reasons, "start-up check")
    if _is_cuda() and (backend := _selected_backend(vllm_config)) != "CUSTOM":
        # the model is fine: only the backend choice is wrong (not a case for kv_cache_dtype='auto')
        raise E8UnsupportedError(
            f"e8vllm: kv_cache_dtype={name!r} on CUDA is served by vLLM's CUSTOM attention backend, "
            f"which vLLM never picks by itself (selected: {backend or 'none, vLLM chooses'}): pass "
            "--attention-backend CUSTOM to vLLM's server, attention_config={'backend': 'CUSTOM'} to "
            "LLM / EngineArgs (e8vllm serve sets it itself)")


def _install_config_check() -> bool:
    """Wrap ``EngineArgs.create_engine_config`` with :func:`check_engine_config` (idempotent)."""
    from vllm.engine.arg_utils import EngineArgs

    orig = EngineArgs.create_engine_config
    if getattr(orig, "_e8vllm_wrapped", False):
        return True

    @functools.wraps(orig)
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        cfg = orig(self, *args, **kwargs)
        check_engine_config(cfg)
        return cfg

    create_engine_config._e8vllm_wrapped = True  # type: ignore[attr-defined]
    EngineArgs.create_engine_config = create_engine_config  # type: ignore[method-assign]
    return True


def register() -> None:
    """The ``vllm.general_plugins`` entry point (idempotent, cheap, every vLLM process).

    Set ``E8VLLM_PLUGIN_DISABLE=1`` to make it a no-op (e.g. to compare against stock vLLM).
    """
    if _STATE["registered"]:
        return
    _STATE["registered"] = True
    if os.environ.get("E8VLLM_PLUGIN_DISABLE", "") not in ("", "0"):
        logger.info("e8vllm plugin disabled by E8VLLM_PLUGIN_DISABLE")
        return
    _STATE["dtypes"] = register_dtypes(E8_DTYPES)
    _STATE["backend"] = _register_cpu_backend()
    _STATE["check"] = _install_config_check()
    if not HAS_CUSTOMIZE_SPEC:
        _STATE["legacy_spec"] = install_legacy_spec_hook()
    logger.debug("e8vllm registered in pid %d: %s", os.getpid(), _STATE)
