r"""The ``CPU_ATTN`` override: vLLM's CPU attention backend, plus the E8 packed-cache path.

How it is wired (vLLM 0.26 / 0.32 / 0.33 CPU): the CPU platform ignores ``--attention-backend``
and always returns ``AttentionBackendEnum.CPU_ATTN.get_path()``, which honours
``register_backend(AttentionBackendEnum.CPU_ATTN, "e8vllm.vllm_plugin.cpu.E8CPUAttentionBackend")``
(done by :func:`e8vllm.vllm_plugin.register.register`). ``Attention.__init__`` resolves
``AttentionBackendEnum[backend.get_name()]``, so :meth:`E8CPUAttentionBackend.get_name` must keep
returning ``"CPU_ATTN"``.

Every class here subclasses the stock CPU class and **delegates to it unchanged unless the
kv-cache dtype starts with ``e8_``**:

* :class:`E8CPUAttentionBackend`: accepts the e8 dtypes (``supported_kv_cache_dtypes``; 0.33 also
  asks ``supports_kv_cache_dtype``), sizes e8 pages (``customize_spec`` on >= 0.32,
  ``get_kv_cache_shape`` on 0.26), and hands out our builder / impl.
* :class:`E8CPUMetadataBuilder`: for e8 it skips the C++ scheduler metadata (our kernel does not
  use it, and the C++ op knows only auto/fp8 dtypes) and builds the stock ``CPUAttentionMetadata``.
* :class:`E8CPUAttentionImpl`: for e8 it checks the layer at construction (sliding window, ALiBi,
  sinks, soft-cap, encoder / cross attention, head size -> :class:`~.spec.E8UnsupportedError`),
  records the process's active dtype for ``customize_spec``, self-checks the cache view the first
  time it sees it, writes codes in ``do_kv_cache_update`` and attends with
  :func:`e8vllm.kernels.reference.paged_attention` in ``forward``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                 CPUAttentionMetadata, CPUAttentionMetadataBuilder)

from . import spec as e8spec
from .impl import E8ImplMixin

__all__ = ["E8CPUAttentionBackend", "E8CPUMetadataBuilder", "E8CPUAttentionImpl"]


class E8CPUAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU attention backend + the e8 kv-cache dtypes. ``get_name() == "CPU_ATTN"``."""

    #: marker read by the 0.26 ``Attention.get_kv_cache_spec`` wrapper
    E8_CAPABLE: ClassVar[bool] = True
    supported_kv_cache_dtypes: ClassVar[list[Any]] = [
        *CPUAttentionBackend.supported_kv_cache_dtypes, *e8spec.E8_DTYPES]

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"  # Attention.__init__ does AttentionBackendEnum[get_name()]

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype: Any) -> bool:
        if e8spec.is_e8_dtype(kv_cache_dtype):
            return kv_cache_dtype in e8spec.E8_DTYPES
        return super().supports_kv_cache_dtype(kv_cache_dtype)

    @classmethod
    def customize_spec(cls, spec: Any) -> Any:
        """vLLM >= 0.32: stock customization, then the packed e8 slot size for e8 layers."""
        base = getattr(super(), "customize_spec", None)
        if base is not None:
            spec = base(spec)
        return e8spec.customize_spec(spec)

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        """vLLM 0.26 only: ``(num_blocks, H_kv, block_size, slot_bytes)`` when an e8 dtype is active
        in this process (``cache_dtype_str`` is ignored: 0.26 runners pass "auto"), else stock."""
        name = e8spec.active_dtype()
        if name is not None:
            return (num_blocks, num_kv_heads, block_size, e8spec.slot_bytes(name, head_size))
        stock = getattr(CPUAttentionBackend, "get_kv_cache_shape", None)
        if stock is None:  # pragma: no cover - >= 0.32 never calls this
            raise NotImplementedError
        return stock(num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str)

    @staticmethod
    def get_impl_cls() -> type["E8CPUAttentionImpl"]:
        return E8CPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["E8CPUMetadataBuilder"]:
        return E8CPUMetadataBuilder


class E8CPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """Stock builder; for e8 dtypes the (unused) C++ scheduler metadata is skipped."""

    def build(self, common_prefix_len: int, common_attn_metadata: Any,
              fast_build: bool = False) -> CPUAttentionMetadata:
        if not e8spec.is_e8_dtype(self.kv_cache_dtype):
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        cm = common_attn_metadata
        if isinstance(cm.causal, torch.Tensor) or not cm.causal:
            raise e8spec.E8UnsupportedError(
                f"e8vllm: {self.kv_cache_dtype} supports causal decoder attention only "
                "(got non-causal / dynamic-causal metadata)")
        return CPUAttentionMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            max_query_len=cm.max_query_len,
            query_start_loc=cm.query_start_loc,
            max_seq_len=cm.max_seq_len,
            seq_lens=cm.seq_lens,
            block_table=cm.block_table_tensor,
            slot_mapping=cm.slot_mapping,
            scheduler_metadata=None,
            causal=True,
        )


class E8CPUAttentionImpl(E8ImplMixin, CPUAttentionBackendImpl):
    """Stock CPU impl for non-e8 dtypes; the E8 packed-cache path (:class:`.impl.E8ImplMixin`) for ``e8_*``."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None, kv_cache_dtype: str,
                 logits_soft_cap: float | None = None, attn_type: str = "decoder",
                 kv_sharing_target_layer_name: str | None = None, sinks: torch.Tensor | None = None,
                 **extra: Any) -> None:
        if self._e8_check_layer(kv_cache_dtype, num_heads=num_heads, head_size=head_size,
                                num_kv_heads=num_kv_heads, alibi_slopes=alibi_slopes,
                                sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                                attn_type=attn_type, sinks=sinks,
                                kv_sharing_target_layer_name=kv_sharing_target_layer_name) and extra:
            raise e8spec.E8UnsupportedError(
                f"e8vllm: {kv_cache_dtype}: unsupported attention options {sorted(extra)}")
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name,
                         sinks, **extra)
        if self.e8:
            self.is_fp8_kv_cache = False
            self._e8_setup(kv_cache_dtype, head_size)

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if not self.e8:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        return self._e8_write(key, value, kv_cache, slot_mapping, layer)

    def forward(self, layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: CPUAttentionMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if not self.e8:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        return self._e8_forward(query, kv_cache, attn_metadata, output, output_scale, output_block_scale, layer)
