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
* writes and attention use the PyTorch path of :mod:`e8vllm.kernels.reference` on CUDA tensors
  (correct, **not fast**: it decodes the blocks a batch needs into a workspace). The fused Triton
  kernels are a later step; until then CUDA graphs are not supported (run ``enforce_eager``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from vllm.v1.attention.backends.triton_attn import (TritonAttentionBackend, TritonAttentionImpl,
                                                    TritonAttentionMetadataBuilder)

from . import spec as e8spec
from .impl import E8ImplMixin

try:  # the enum lives in vllm.v1.attention.backend (0.32+) or the backends' utils (0.26)
    from vllm.v1.attention.backend import AttentionCGSupport
except ImportError:  # pragma: no cover - version dependent
    from vllm.v1.attention.backends.utils import AttentionCGSupport  # type: ignore[no-redef]

__all__ = ["E8TritonBackend", "E8TritonMetadataBuilder", "E8TritonImpl"]


class E8TritonMetadataBuilder(TritonAttentionMetadataBuilder):
    """Triton's metadata (query_start_loc, seq_lens, block_table, ...); no CUDA graphs for e8."""

    _cudagraph_support: ClassVar[Any] = AttentionCGSupport.NEVER


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
    """Stock Triton impl for non-e8 dtypes; the E8 packed-cache path (PyTorch, on GPU) for ``e8_*``."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None, kv_cache_dtype: str,
                 logits_soft_cap: float | None = None, attn_type: Any = "decoder",
                 kv_sharing_target_layer_name: str | None = None, sinks: torch.Tensor | None = None,
                 **extra: Any) -> None:
        e8 = self._e8_check_layer(kv_cache_dtype, num_heads=num_heads, head_size=head_size,
                                  num_kv_heads=num_kv_heads, alibi_slopes=alibi_slopes,
                                  sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                                  attn_type=attn_type, sinks=sinks)
        # the stock constructor only knows vLLM's dtypes: build it as "auto", then restore ours
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         "auto" if e8 else kv_cache_dtype, logits_soft_cap, attn_type,
                         kv_sharing_target_layer_name, sinks, **extra)
        if e8:
            self.supports_quant_query_input = False
            self._e8_setup(kv_cache_dtype, head_size)

    def fused_output_quant_supported(self, quant_key: Any) -> bool:
        return False if self.e8 else super().fused_output_quant_supported(quant_key)

    def fused_rope_kvcache_supported(self) -> bool:
        return False if self.e8 else super().fused_rope_kvcache_supported()

    def do_kv_cache_update(self, layer: Any, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if not self.e8:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        return self._e8_write(key, value, kv_cache, slot_mapping)

    def forward(self, layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: Any, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if not self.e8:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        return self._e8_forward(query, kv_cache, attn_metadata, output, output_scale, output_block_scale)
