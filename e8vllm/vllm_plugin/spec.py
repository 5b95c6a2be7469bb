r"""E8 kv-cache dtypes: names, page sizing, and what a model must not use to be served by them.

Dtype names
-----------
``e8_k{K}v{V}`` with K, V the bits per value of the K and V codecs (by default ``e8s-{b}bit``,
4-bit keys ``e8c-4bit``, from :mod:`e8vllm.codecs`; ``$E8VLLM_ENCODER`` picks other variants of the
same size): :data:`E8_DTYPES`. One (token, kv-head) slot holds ``[K code | V code]``, i.e.
``D*K/8 + 2 + D*V/8 + 2`` bytes (head size D; 2 bytes per vector of scale and table-set bits):
68 B for ``e8_k4v4`` at D = 64 against 256 B for bf16 (3.76x).

Page sizing hooks (how vLLM learns the packed page size)
--------------------------------------------------------
* **vLLM >= 0.32** (``AttentionBackend.customize_spec`` exists): the runner passes every
  layer's ``AttentionSpec`` through the backend's ``customize_spec``; ours (:func:`customize_spec`)
  returns ``replace(spec, state_content_bytes=slot_bytes)``. The allocator then sizes pages from
  it and the CPU backend receives ``uint8 [num_blocks, H_kv, block_size, slot_bytes]`` views
  (``KVCacheLayout.LBHNC``). The classmethod cannot see the layer, so the active e8 dtype is
  recorded per process by our attention impl's ``__init__`` (:func:`set_active_dtype`), which runs
  at model construction, before the runner collects the specs; the current vLLM config is the
  fallback.
* **vLLM 0.26** (no ``customize_spec``): :func:`install_legacy_spec_hook` wraps
  ``Attention.get_kv_cache_spec`` so that layers served by our backend return an
  :class:`E8FullAttentionSpec` (a ``FullAttentionSpec`` with ``real_page_size_bytes`` and
  ``merge`` overridden); the backend's ``get_kv_cache_shape`` returns
  ``(num_blocks, H_kv, block_size, slot_bytes)`` whatever ``cache_dtype_str`` it is given (0.26
  runners pass ``"auto"`` for non-quant-mode dtypes). Written from the 0.26 sources; only importable
  (not exercised) on 0.32.

A start-up self-check in the impl (:func:`e8vllm.kernels.reference.check_cache_layout`) fails
loudly if either hook did not apply.

Serving constraints (no silent fallback)
----------------------------------------
:func:`config_unsupported_reasons` (model level, run in the front-end process when the engine
config is built) and :func:`layer_unsupported_reasons` (per attention layer, run by the impl)
list what the E8 path cannot serve: sliding windows, MLA, attention sinks, ALiBi,
encoder / cross attention, logits soft-capping, K/V head sizes that differ or that the
rotation / codecs do not support, hybrid (Mamba) models, per-layer dtype skips.
:class:`E8UnsupportedError` (a ``ValueError``) carries all reasons at once.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from e8vllm.kernels.reference import E8KVFormat

__all__ = [
    "E8_DTYPES", "E8UnsupportedError", "is_e8_dtype", "parse_e8_dtype", "encoder_variant", "kv_format",
    "slot_bytes", "set_active_dtype", "active_dtype", "customize_spec", "E8FullAttentionSpec",
    "install_legacy_spec_hook", "HAS_CUSTOMIZE_SPEC", "layer_unsupported_reasons",
    "config_unsupported_reasons", "raise_if_unsupported",
]

#: The registered kv-cache dtype names (K bits >= V bits: keys matter more for attention).
E8_DTYPES: tuple[str, ...] = ("e8_k4v4", "e8_k3v3", "e8_k2v2", "e8_k4v2", "e8_k4v3", "e8_k3v2")
_NAME = re.compile(r"^e8_k(\d)v(\d)$")

#: Environment variable picking the codecs of the e8 dtypes (the same bytes per token for all of them):
#:
#: * "cubic-keys" (the default since session 14): 4-bit keys in ``e8c-4bit`` (``e8s-4bit``'s format
#:   and encoder with level tables that are cubic fp16 polynomials of the field, which the H200 decode
#:   kernel computes with fp16 FMAs instead of looking them up), values and 2-/3-bit keys in
#:   ``e8s-{b}bit``. SmolLM2 perplexity against "switched": +0.11 % (t 0.46) on the benchmark text,
#:   -0.55 % (t -3.4) on the KV-side held-out text; H200 decode attention 64 x 8k 386.9 against 414.7 us
#:   (session 14).
#: * "switched" (the default of sessions 7-13): ``e8s-{b}bit`` for keys and values (two trained table
#:   sets with a switch bit per block and an 8-bit log scale).
#: * "cubic": ``e8c-4bit`` for the 4-bit values too: decode attention 364.6 us, but perplexity +0.79 %
#:   against "switched" (t 2.9; +0.22 % on the held-out text): the cost is in the values (session 13).
#: * "search" (``e8-{b}bit``: one table set, fp16 scale, best of 9 scales per vector; the format before
#:   e8s) or "rms" (``e8-{b}bit-rms``: the "search" format with one RMS scale, ~9x cheaper encode).
#:
#: Every process of one engine inherits the same environment.
ENCODER_ENV = "E8VLLM_ENCODER"
ENCODER_VARIANTS = ("cubic-keys", "switched", "cubic", "search", "rms")


class E8UnsupportedError(ValueError):
    """The model / config cannot be served with an e8 kv-cache dtype (message lists why)."""


def is_e8_dtype(name: Any) -> bool:
    """True for strings starting with ``e8_`` (our namespace; validity is :func:`parse_e8_dtype`)."""
    return isinstance(name, str) and name.startswith("e8_")


def parse_e8_dtype(name: str) -> tuple[int, int]:
    """``"e8_k4v2"`` -> ``(4, 2)``. ValueError for anything not in :data:`E8_DTYPES`."""
    m = _NAME.match(name) if isinstance(name, str) else None
    if m is None or name not in E8_DTYPES:
        raise ValueError(f"not an e8 kv-cache dtype: {name!r}; known: {', '.join(E8_DTYPES)}")
    return int(m.group(1)), int(m.group(2))


def encoder_variant() -> str:
    """'' (the default, "cubic-keys"), 'switched', 'cubic', 'search' or 'rms', from ``$E8VLLM_ENCODER``
    (ValueError on other values)."""
    v = os.environ.get(ENCODER_ENV, "cubic-keys").strip().lower()
    if v in ("", "cubic-keys"):
        return ""
    if v in ENCODER_VARIANTS:
        return v
    raise ValueError(f"{ENCODER_ENV} must be one of {', '.join(ENCODER_VARIANTS)}, got {v!r}")


#: Debug only: "KCODEC,VCODEC" registry names replacing the E8 codecs of every e8 dtype (e.g.
#: "int8,int8" to check the plumbing with a near-lossless codec). Changes the page size.
DEBUG_CODECS_ENV = "E8VLLM_DEBUG_CODECS"


@functools.lru_cache(maxsize=None)
def _kv_format(name: str, head_size: int, variant: str, debug: str) -> "E8KVFormat":
    from e8vllm.kernels.reference import E8KVFormat

    kb, vb = parse_e8_dtype(name)
    if debug:
        import e8vllm.codecs as codecs

        kn, vn = (s.strip() for s in debug.split(","))
        return E8KVFormat(head_size, codecs.get(kn, head_dim=head_size), codecs.get(vn, head_dim=head_size))
    return E8KVFormat.from_bits(head_size, kb, vb, variant)


def kv_format(name: str, head_size: int) -> "E8KVFormat":
    """The slot format of dtype ``name`` at ``head_size`` (cached). ValueError if unsupported."""
    return _kv_format(name, int(head_size), encoder_variant(), os.environ.get(DEBUG_CODECS_ENV, ""))


def slot_bytes(name: str, head_size: int) -> int:
    """Packed bytes per (token, kv-head) of dtype ``name``: K code + V code."""
    return kv_format(name, head_size).slot_bytes


# ---------------------------------------------------------------------------------------------
# The active dtype of this process (customize_spec cannot see the layer)
# ---------------------------------------------------------------------------------------------
_ACTIVE: dict[str, str | None] = {"dtype": None}


def set_active_dtype(name: str) -> None:
    """Record the e8 dtype of this process's engine. RuntimeError if a different one was set."""
    parse_e8_dtype(name)
    cur = _ACTIVE["dtype"]
    if cur is not None and cur != name:
        raise RuntimeError(f"e8vllm: two e8 kv-cache dtypes in one process ({cur!r} and {name!r})")
    _ACTIVE["dtype"] = name


def active_dtype() -> str | None:
    """The e8 dtype recorded by :func:`set_active_dtype`, else the current vLLM config's, else None."""
    if _ACTIVE["dtype"] is not None:
        return _ACTIVE["dtype"]
    try:
        from vllm.config.vllm import get_current_vllm_config_or_none
    except ImportError:  # pragma: no cover - older layout
        return None
    cfg = get_current_vllm_config_or_none()
    cd = getattr(getattr(cfg, "cache_config", None), "cache_dtype", None)
    return cd if is_e8_dtype(cd) else None


def _reset_active_dtype() -> None:
    """Tests only."""
    _ACTIVE["dtype"] = None


# ---------------------------------------------------------------------------------------------
# vLLM >= 0.32: AttentionBackend.customize_spec
# ---------------------------------------------------------------------------------------------
def _has_customize_spec() -> bool:
    try:
        from vllm.v1.attention.backend import AttentionBackend
    except ImportError:  # pragma: no cover
        return False
    return hasattr(AttentionBackend, "customize_spec")


HAS_CUSTOMIZE_SPEC: bool = _has_customize_spec()


def customize_spec(spec: Any) -> Any:
    """Packed page for e8 layers: ``state_content_bytes = slot_bytes`` (vLLM >= 0.32).

    Applies when an e8 dtype is active in this process and the spec is the one vLLM builds for it
    (uint8 storage, no vLLM quant mode, dense content); any other spec is returned unchanged.
    Raises E8UnsupportedError for head_size != head_size_v.
    """
    name = active_dtype()
    if name is None or getattr(spec, "state_content_bytes", None) is not None:
        return spec
    if getattr(spec, "dtype", None) != torch.uint8:
        return spec
    mode = getattr(spec, "kv_quant_mode", None)
    if mode is not None and getattr(mode, "name", "NONE") != "NONE":
        return spec
    if spec.head_size_v != spec.head_size:
        raise E8UnsupportedError(f"e8vllm: {name} needs equal K and V head sizes, got "
                                 f"{spec.head_size} and {spec.head_size_v}")
    return replace(spec, state_content_bytes=slot_bytes(name, spec.head_size))


# ---------------------------------------------------------------------------------------------
# vLLM 0.26: FullAttentionSpec subclass + Attention.get_kv_cache_spec wrapper
# ---------------------------------------------------------------------------------------------
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402  (present in 0.26..0.33)


@dataclass(frozen=True, kw_only=True)
class E8FullAttentionSpec(FullAttentionSpec):
    """A full-attention spec whose page holds ``e8_slot_bytes`` per (token, kv-head) (vLLM 0.26).

    ``real_page_size_bytes`` = block_size * num_kv_heads * e8_slot_bytes; ``merge`` keeps the
    field (the base ``merge`` rebuilds ``cls(...)`` from base fields only). Never registered in
    ``KVCacheSpecRegistry``: the manager lookup walks the MRO to ``FullAttentionSpec``.
    """

    e8_slot_bytes: int = 0

    @property
    def real_page_size_bytes(self) -> int:  # type: ignore[override]
        if self.e8_slot_bytes:
            return self.block_size * self.num_kv_heads * self.e8_slot_bytes
        return super().real_page_size_bytes

    @classmethod
    def merge(cls, specs: list[Any]) -> "E8FullAttentionSpec":  # type: ignore[override]
        sizes = {getattr(s, "e8_slot_bytes", 0) for s in specs}
        if len(sizes) != 1:
            raise ValueError(f"e8vllm: cannot merge KV specs with different e8 slot sizes {sizes}")
        merged = super().merge(specs)
        return replace(merged, e8_slot_bytes=sizes.pop())


def to_legacy_spec(spec: Any, name: str) -> E8FullAttentionSpec:
    """Turn the plain ``FullAttentionSpec`` of an e8 layer into an :class:`E8FullAttentionSpec`."""
    if type(spec) is not FullAttentionSpec:
        raise E8UnsupportedError(f"e8vllm: {name} serves plain full attention only; this layer "
                                 f"has a {type(spec).__name__}")
    if getattr(spec, "sliding_window", None) is not None:
        raise E8UnsupportedError(f"e8vllm: {name} does not support sliding-window attention")
    kw = {f.name: getattr(spec, f.name) for f in fields(spec) if f.init}
    kw["dtype"] = torch.uint8
    return E8FullAttentionSpec(**kw, e8_slot_bytes=slot_bytes(name, spec.head_size))


_LEGACY_HOOK: dict[str, Any] = {}


def install_legacy_spec_hook() -> bool:
    """Wrap ``Attention.get_kv_cache_spec`` (vLLM without ``customize_spec``). Idempotent.

    Layers whose backend is ours and whose ``kv_cache_dtype`` is e8 get an
    :class:`E8FullAttentionSpec`. Returns True if the wrapper is (now) installed.
    """
    if _LEGACY_HOOK:
        return True
    try:
        from vllm.model_executor.layers.attention.attention import Attention
    except ImportError:
        try:
            from vllm.attention.layer import Attention  # type: ignore[no-redef]
        except ImportError:  # pragma: no cover
            return False
    orig = Attention.get_kv_cache_spec

    @functools.wraps(orig)
    def get_kv_cache_spec(self: Any, vllm_config: Any) -> Any:
        spec = orig(self, vllm_config)
        name = getattr(self, "kv_cache_dtype", None)
        if spec is None or not is_e8_dtype(name):
            return spec
        if not getattr(self.attn_backend, "E8_CAPABLE", False):
            raise E8UnsupportedError(f"e8vllm: layer uses backend {self.attn_backend.get_name()}, "
                                     f"which cannot serve {name}")
        return to_legacy_spec(spec, name)

    Attention.get_kv_cache_spec = get_kv_cache_spec  # type: ignore[method-assign]
    _LEGACY_HOOK["orig"] = orig
    return True


# ---------------------------------------------------------------------------------------------
# Serving constraints
# ---------------------------------------------------------------------------------------------
def check_settings() -> None:
    """ValueError naming the variable when ``$E8VLLM_ENCODER`` or ``$E8VLLM_DEBUG_CODECS`` is malformed
    (the user's configuration, not the model: never reported as a head-size problem)."""
    encoder_variant()
    debug = os.environ.get(DEBUG_CODECS_ENV, "")
    if debug:
        import e8vllm.codecs as codecs

        parts = [p.strip() for p in debug.split(",")]
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"{DEBUG_CODECS_ENV} must be 'KCODEC,VCODEC' (registry names), got {debug!r}")
        for p in parts:
            try:
                codecs.info(p)
            except ValueError as e:
                raise ValueError(f"{DEBUG_CODECS_ENV}: {e}") from None


def _head_size_reason(name: str, head_size: int) -> str | None:
    check_settings()
    try:
        kv_format(name, head_size)
    except ValueError as e:
        return f"head size {head_size} is not supported by the E8 rotation/codecs ({e})"
    return None


def layer_unsupported_reasons(name: str, *, head_size: int, alibi_slopes: Any = None,
                              sliding_window: int | None = None, logits_soft_cap: float | None = None,
                              attn_type: str = "decoder", sinks: Any = None,
                              num_heads: int = 1, num_kv_heads: int = 1,
                              kv_sharing_target_layer_name: str | None = None) -> list[str]:
    """Why one attention layer (impl constructor arguments) cannot use dtype ``name``; [] if it can."""
    out: list[str] = []
    if kv_sharing_target_layer_name:  # it would read the target's codes with its own calibration
        out.append(f"cross-layer KV sharing (this layer reads {kv_sharing_target_layer_name}'s cache)")
    if sliding_window is not None and sliding_window not in (-1, 0):
        out.append(f"sliding-window attention (window {sliding_window})")
    if alibi_slopes is not None:
        out.append("ALiBi position biases")
    if logits_soft_cap not in (None, 0, 0.0):
        out.append(f"attention logits soft-capping ({logits_soft_cap})")
    if str(getattr(attn_type, "value", attn_type)) != "decoder":
        out.append(f"{getattr(attn_type, 'value', attn_type)} attention (only decoder self-attention)")
    if sinks is not None:
        out.append("attention sinks")
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        out.append(f"{num_heads} query heads not a multiple of {num_kv_heads} kv heads")
    hr = _head_size_reason(name, head_size)
    if hr:
        out.append(hr)
    return out


def config_unsupported_reasons(vllm_config: Any) -> list[str]:
    """Why the model of ``vllm_config`` cannot be served with its e8 cache dtype; [] if it can.

    Model-level view from the HF config (the per-layer check in the impl is authoritative, this
    one fails fast in the front-end process with the same wording).
    """
    cc = vllm_config.cache_config
    name = cc.cache_dtype
    mc = vllm_config.model_config
    out: list[str] = []
    try:
        parse_e8_dtype(name)
    except ValueError as e:
        return [str(e)]
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        # pages handed to or from another engine carry no record of the codecs, encoder variant and
        # calibration that wrote them: an engine with other settings would decode them wrongly
        out.append("KV transfer connectors (kv_transfer_config): E8 pages do not record the codecs and "
                   "calibration that wrote them")
    if mc is None:
        return out
    hf = getattr(mc, "hf_text_config", None) or getattr(mc, "hf_config", None)

    def attr(obj: Any, key: str, default: Any = None) -> Any:
        try:
            return getattr(obj, key, default)
        except Exception:  # properties of exotic configs
            return default

    sw = attr(mc, "get_sliding_window", lambda: None)()
    use_sw = attr(hf, "use_sliding_window", True)
    layer_types = attr(hf, "layer_types", None) or []
    if (sw is not None and use_sw is not False) or any("sliding" in str(t) for t in layer_types):
        out.append(f"sliding-window attention (sliding_window={sw})")
    if getattr(cc, "sliding_window", None) is not None and sw is None:
        out.append(f"sliding-window attention (cache sliding_window={cc.sliding_window})")
    if attr(mc, "use_mla", False):
        out.append("multi-head latent attention (MLA)")
    if attr(mc, "uses_alibi", False):
        out.append("ALiBi position biases")
    if attr(mc, "is_encoder_decoder", False):
        out.append("encoder-decoder / cross attention")
    if attr(mc, "is_hybrid", False) or attr(mc, "is_attention_free", False):
        out.append("hybrid or attention-free (Mamba/linear-attention) layers")
    softcap = attr(hf, "attn_logit_softcapping", None)
    if softcap:
        out.append(f"attention logits soft-capping ({softcap})")
    if attr(hf, "model_type", "") in ("gpt_oss",) or attr(hf, "use_sink", False) or attr(hf, "sinks", None):
        out.append("attention sinks")
    if getattr(cc, "kv_cache_dtype_skip_layers", None):
        out.append("kv_cache_dtype_skip_layers (mixed page sizes)")
    head = attr(mc, "get_head_size", lambda: None)()
    if head is not None:
        hr = _head_size_reason(name, int(head))
        if hr:
            out.append(hr)
    head_v = attr(hf, "v_head_dim", None)
    if head_v is not None and head is not None and int(head_v) != int(head):
        out.append(f"different K and V head sizes ({head} / {head_v})")
    return out


def raise_if_unsupported(name: str, reasons: list[str], where: str = "") -> None:
    """Raise :class:`E8UnsupportedError` naming every reason (no-op for an empty list)."""
    if reasons:
        raise E8UnsupportedError(
            f"e8vllm: kv_cache_dtype={name!r} cannot serve this model{' (' + where + ')' if where else ''}: "
            + "; ".join(reasons)
            + ". The E8 attention path implements causal full attention of decoder layers only, "
              "and e8vllm never falls back silently: use kv_cache_dtype='auto' for this model.")
