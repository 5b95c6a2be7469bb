r"""The GPU backend (vLLM's ``CUSTOM`` slot): Triton attention, plus the E8 packed-cache path.

How it is wired (vLLM 0.26 / 0.32 / 0.33 on CUDA): :func:`e8vllm.vllm_plugin.register.register`
calls ``register_backend(AttentionBackendEnum.CUSTOM, "e8vllm.vllm_plugin.gpu.E8TritonBackend")``
and users select it with ``--attention-backend CUSTOM`` (``attention_config={"backend": "CUSTOM"}``)
next to ``--kv-cache-dtype e8_k4v4``: CUDA's automatic choice never picks the CUSTOM slot.
``get_name()`` returns ``"CUSTOM"`` because ``Attention.__init__`` resolves
``AttentionBackendEnum[backend.get_name()]``.

For non-e8 dtypes every class delegates to vLLM's Triton backend unchanged. For ``e8_*``:

* page size: 0.32+ through :meth:`E8TritonBackend.customize_spec`; 0.26 through the
  ``Attention.get_kv_cache_spec`` wrapper of :mod:`.spec` (it looks for ``E8_CAPABLE``), with
  :meth:`get_kv_cache_shape` returning ``(num_blocks, H_kv, block_size, slot_bytes)`` uint8 and an
  identity stride order. The shape depends on the process's active e8 dtype, never on
  ``cache_dtype_str`` (runners pass ``"auto"`` while profiling);
* writes and attention use the fused Triton kernels of :mod:`e8vllm.kernels.triton` on CUDA
  (write: rotate + E8 encode + pack + scatter in one kernel per K/V; attention: codes decoded in
  registers, split-KV grid for decode batches) when the format is supported there (E8 codecs,
  head size 64 or 128); otherwise, or with ``E8VLLM_GPU_KERNELS=torch``, the PyTorch path of
  :mod:`e8vllm.kernels.reference` (correct, slow, host syncs).
* the kernels plug into the mixin's hooks ``_e8_write_codes`` / ``_e8_attend`` (so KV calibration
  and telemetry of :mod:`.impl` apply unchanged around them).
* CUDA graphs: ``UNIFORM_SINGLE_TOKEN_DECODE`` with the Triton kernels (the decode grid depends
  only on tensor shapes and reads lengths / tables / slots on the device; no host sync in write or
  forward), also with the telemetry sampler on (it skips calls made during a capture, so graph-replayed
  decode steps go unsampled and eager steps, prefill and mixed batches, carry the samples), ``NEVER``
  on the PyTorch path. Non-e8 dtypes keep vLLM's Triton level.
"""

from __future__ import annotations

import logging
import os
from typing import Any, ClassVar

import torch

from vllm.v1.attention.backends.triton_attn import (TritonAttentionBackend, TritonAttentionImpl,
                                                    TritonAttentionMetadataBuilder)

from e8vllm import calibration
from e8vllm.kernels.triton import (prepare_device_constants, triton_paged_attention, triton_write_kv_cache,
                                   warm_attention_paths, warm_write_paths)

from . import spec as e8spec
from .impl import E8ImplMixin

try:  # the enum lives in vllm.v1.attention.backend (0.32+) or the backends' utils (0.26)
    from vllm.v1.attention.backend import AttentionCGSupport
except ImportError:  # pragma: no cover - version dependent
    from vllm.v1.attention.backends.utils import AttentionCGSupport  # type: ignore[no-redef]

logger = logging.getLogger(__name__)

__all__ = ["E8TritonBackend", "E8TritonMetadataBuilder", "E8TritonImpl", "KERNELS_ENV", "use_triton_kernels"]

#: ``triton`` (default) or ``torch``: which implementation serves e8 dtypes on CUDA.
KERNELS_ENV = "E8VLLM_GPU_KERNELS"
#: calls per path in this process (``triton_write``, ``triton_attn``, ``torch_write``, ``torch_attn``,
#: ``write_skipped``): lets a check confirm which implementation really ran.
CALLS: dict[str, int] = {}


def _count(key: str) -> None:
    CALLS[key] = CALLS.get(key, 0) + 1


def use_triton_kernels(name: str, head_size: int) -> bool:
    """True when e8 dtype ``name`` at ``head_size`` runs on the fused Triton kernels."""
    choice = os.environ.get(KERNELS_ENV, "triton").strip().lower()
    if choice not in ("triton", "torch"):
        raise ValueError(f"{KERNELS_ENV} must be 'triton' or 'torch', got {choice!r}")
    if choice == "torch":
        return False
    try:
        from e8vllm.kernels.triton import supported
    except ImportError:  # pragma: no cover - no triton
        return False
    return supported(e8spec.kv_format(name, head_size))


_REFERENCE_WARNED: set[tuple[str, int]] = set()


def _warn_reference_path(name: str, head_size: int, fmt: Any) -> None:
    """Once per (dtype, head size): the PyTorch path is correct but slow and rules out CUDA graphs."""
    if (name, head_size) in _REFERENCE_WARNED:
        return
    _REFERENCE_WARNED.add((name, head_size))
    chosen = os.environ.get(KERNELS_ENV, "triton").strip().lower() == "torch"
    why = (f"{KERNELS_ENV}=torch" if chosen else
           f"no fused CUDA kernels for head size {head_size} with codecs {fmt.k_codec.name} / "
           f"{fmt.v_codec.name} (they cover E8 codecs at head size 64 and 128)")
    (logger.info if chosen else logger.warning)(
        "e8vllm: %s runs on the PyTorch reference path: %s; correct, but several times slower than "
        "the fused kernels and without CUDA graphs", name, why)


class E8TritonMetadataBuilder(TritonAttentionMetadataBuilder):
    """Triton's metadata (query_start_loc, seq_lens, block_table, max_query_len, ...).

    CUDA graphs for e8: ``UNIFORM_SINGLE_TOKEN_DECODE`` on the Triton kernels, else ``NEVER``."""

    _cudagraph_support: ClassVar[Any] = AttentionCGSupport.NEVER

    @classmethod
    def get_cudagraph_support(cls, vllm_config: Any, kv_cache_spec: Any, *args: Any, **kw: Any) -> Any:
        name = e8spec.active_dtype()
        if name is None:
            return TritonAttentionMetadataBuilder.get_cudagraph_support.__func__(  # type: ignore[attr-defined]
                TritonAttentionMetadataBuilder, vllm_config, kv_cache_spec, *args, **kw)
        # the live-error telemetry sampler reads codes back on the host, but it skips calls made
        # while a CUDA graph is captured (e8vllm.telemetry): it does not rule graphs out (until
        # session 18 it did, so `e8vllm serve`, telemetry on by default, decoded without them)
        if use_triton_kernels(name, int(kv_cache_spec.head_size)):
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return AttentionCGSupport.NEVER


class E8TritonBackend(TritonAttentionBackend):
    """vLLM's Triton attention backend + the e8 kv-cache dtypes. ``get_name() == "CUSTOM"``."""

    E8_CAPABLE: ClassVar[bool] = True
    supported_kv_cache_dtypes: ClassVar[list[Any]] = [
        *TritonAttentionBackend.supported_kv_cache_dtypes, *e8spec.E8_DTYPES]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype: Any) -> bool:
        if e8spec.is_e8_dtype(kv_cache_dtype):
            return kv_cache_dtype in e8spec.E8_DTYPES
        return kv_cache_dtype in cls.supported_kv_cache_dtypes

    @classmethod
    def customize_spec(cls, spec: Any) -> Any:
        return e8spec.customize_spec(spec)

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        name = e8spec.active_dtype()
        if name is None and e8spec.is_e8_dtype(cache_dtype_str):
            name = cache_dtype_str
        if name is not None:
            return (num_blocks, num_kv_heads, block_size, e8spec.slot_bytes(name, head_size))
        return TritonAttentionBackend.get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size,
                                                         cache_dtype_str)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
        if e8spec.active_dtype() is not None:
            if include_num_layers_dimension:
                raise NotImplementedError("e8vllm: cross-layer KV layouts are not supported")
            return (0, 1, 2, 3)
        return TritonAttentionBackend.get_kv_cache_stride_order(include_num_layers_dimension)

    @staticmethod
    def get_impl_cls() -> type["E8TritonImpl"]:
        return E8TritonImpl

    @staticmethod
    def get_builder_cls() -> type["E8TritonMetadataBuilder"]:
        return E8TritonMetadataBuilder


class E8TritonImpl(E8ImplMixin, TritonAttentionImpl):
    """Stock Triton impl for non-e8 dtypes; for ``e8_*`` the fused Triton kernels on CUDA (or the
    PyTorch path of the mixin where they do not apply)."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None, kv_cache_dtype: str,
                 logits_soft_cap: float | None = None, attn_type: Any = "decoder",
                 kv_sharing_target_layer_name: str | None = None, sinks: torch.Tensor | None = None,
                 **extra: Any) -> None:
        e8 = self._e8_check_layer(kv_cache_dtype, num_heads=num_heads, head_size=head_size,
                                  num_kv_heads=num_kv_heads, alibi_slopes=alibi_slopes,
                                  sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                                  attn_type=attn_type, sinks=sinks,
                                  kv_sharing_target_layer_name=kv_sharing_target_layer_name)
        # the stock constructor only knows vLLM's dtypes: build it as "auto", then restore ours
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         "auto" if e8 else kv_cache_dtype, logits_soft_cap, attn_type,
                         kv_sharing_target_layer_name, sinks, **extra)
        self._triton = False
        if e8:
            self.supports_quant_query_input = False
            self._e8_setup(kv_cache_dtype, head_size)
            self._triton = use_triton_kernels(kv_cache_dtype, head_size)
            if not self._triton and torch.cuda.is_available():
                _warn_reference_path(kv_cache_dtype, head_size, self.fmt)
            if self._triton and torch.cuda.is_available():
                # the kernels' device constants now, not at the first forward: that can be inside a
                # CUDA-graph capture, where copying host tensors to the device is not allowed
                dev = f"cuda:{torch.cuda.current_device()}"
                prepare_device_constants(self.fmt, dev, self.scale)
                dtype = self._e8_dtype or torch.get_default_dtype()  # the model's: vLLM's q, k, v
                # the write kernel's variants compile now, not inside the first prefill (vLLM's profile run
                # writes nothing: no cache yet); a failure here only moves that compile to first use
                try:  # K/V in the model's dtype; float32 after a KV calibration's centering (see _e8_write)
                    dtypes = [dtype]
                    if calibration.find_calibration(self._e8_model) is not None:
                        dtypes.append(torch.float32)
                    for dt in dict.fromkeys(dtypes):
                        warm_write_paths(self.fmt, dev, num_kv_heads, head_size, dt, block_size=self._e8_block_size)
                except Exception as e:  # noqa: BLE001 - logged; the write itself still runs (and raises) later
                    logger.warning("e8vllm: compiling the write kernel ahead of inference failed (%s: %s); "
                                   "it compiles at its first use", type(e).__name__, e)
                # likewise the prefill / mixed-batch attention variants (CUDA-graph capture runs decode
                # batches only); with a KV calibration the key-centered variants still compile at first use
                try:
                    warm_attention_paths(self.fmt, dev, num_heads, num_kv_heads, head_size, dtype, self.scale,
                                         block_size=self._e8_block_size, max_seqs=self._e8_max_seqs)
                except Exception as e:  # noqa: BLE001 - logged; attention itself still runs (and raises) later
                    logger.warning("e8vllm: compiling the attention kernels ahead of inference failed (%s: %s); "
                                   "they compile at their first use", type(e).__name__, e)

    def _use_kernels(self, kv_cache: torch.Tensor) -> bool:
        """Fused kernels for this call: CUDA tensors (or Triton's CPU interpreter, for tests)."""
        return self._triton and (kv_cache.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")

    # the mixin's kernel hooks: fused Triton kernels on CUDA, the PyTorch reference otherwise
    def _e8_write_codes(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> None:
        if self._use_kernels(kv_cache):
            _count("triton_write")
            triton_write_kv_cache(key, value, kv_cache, slot_mapping, self.fmt)
        else:
            _count("torch_write")
            super()._e8_write_codes(key, value, kv_cache, slot_mapping)

    def _e8_attend(self, q: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: Any, out: torch.Tensor,
                   key_bias: Any = None) -> None:
        if self._use_kernels(kv_cache):  # no host sync: max_query_len is a host int of the metadata
            _count("triton_attn")
            triton_paged_attention(q, kv_cache, attn_metadata.query_start_loc, attn_metadata.seq_lens,
                                   attn_metadata.block_table, self.fmt,
                                   max_query_len=int(attn_metadata.max_query_len),
                                   num_kv_heads=self.num_kv_heads, scale=self.scale, out=out,
                                   key_bias=key_bias)
        else:
            _count("torch_attn")
            super()._e8_attend(q, kv_cache, attn_metadata, out, key_bias)

    def fused_output_quant_supported(self, quant_key: Any) -> bool:
        return False if self.e8 else super().fused_output_quant_supported(quant_key)

    def fused_rope_kvcache_supported(self) -> bool:
        return False if self.e8 else super().fused_rope_kvcache_supported()

    def do_kv_cache_update(self, layer: Any, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if not self.e8:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        return self._e8_write(key, value, kv_cache, slot_mapping, layer)

    def forward(self, layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: Any, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if not self.e8:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        return self._e8_forward(query, kv_cache, attn_metadata, output, output_scale, output_block_scale, layer)
