"""The E8 half of an attention impl, shared by the CPU (``CPU_ATTN``) and GPU (``CUSTOM``) backends.

:class:`E8ImplMixin` holds everything that does not depend on the platform: the per-layer
checks, the page-layout self-check, the write path and attention over the packed cache
(:mod:`e8vllm.kernels.reference`). A platform impl calls :meth:`_e8_setup` from ``__init__`` and
delegates ``do_kv_cache_update`` / ``forward`` to :meth:`_e8_write` / :meth:`_e8_forward` when
``self.e8`` is true, and to vLLM's stock impl otherwise.

Shapes (vLLM conventions): query [T, H_q, D], key/value [T, H_kv, D], output [T, H_q, D];
kv_cache uint8 [num_blocks, H_kv, block_size, slot_bytes].
"""

from __future__ import annotations

from typing import Any

import torch

from e8vllm.kernels.reference import check_cache_layout, paged_attention, write_kv_cache

from . import spec as e8spec

__all__ = ["E8ImplMixin"]


class E8ImplMixin:
    """Mixed into a vLLM ``AttentionImpl`` subclass (which provides num_heads, head_size, ...)."""

    e8: bool = False
    num_heads: int
    head_size: int
    num_kv_heads: int
    scale: float
    kv_cache_dtype: str

    def _e8_check_layer(self, kv_cache_dtype: str, *, num_heads: int, head_size: int, num_kv_heads: int,
                        alibi_slopes: Any, sliding_window: Any, logits_soft_cap: Any, attn_type: Any,
                        sinks: Any) -> bool:
        """True for an e8 dtype the layer can serve; E8UnsupportedError naming every reason otherwise."""
        self.e8 = e8spec.is_e8_dtype(kv_cache_dtype)
        if self.e8:
            e8spec.parse_e8_dtype(kv_cache_dtype)
            e8spec.raise_if_unsupported(kv_cache_dtype, e8spec.layer_unsupported_reasons(
                kv_cache_dtype, head_size=head_size, alibi_slopes=alibi_slopes,
                sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                attn_type=str(getattr(attn_type, "value", attn_type)), sinks=sinks,
                num_heads=num_heads, num_kv_heads=num_kv_heads), "attention layer")
        return self.e8

    def _e8_setup(self, kv_cache_dtype: str, head_size: int) -> None:
        """After the stock constructor: the packed format, and the process's active dtype."""
        self.kv_cache_dtype = kv_cache_dtype
        self.fmt = e8spec.kv_format(kv_cache_dtype, head_size)
        e8spec.set_active_dtype(kv_cache_dtype)
        self._layout_checked = False

    def _check_layout(self, kv_cache: torch.Tensor) -> None:
        if not self._layout_checked:
            check_cache_layout(kv_cache, self.num_kv_heads, self.fmt,
                               f"{self.kv_cache_dtype}, head_size {self.head_size}")
            self._layout_checked = True

    def _e8_write(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                  slot_mapping: torch.Tensor | None) -> None:
        """Encode key/value [T, H_kv, D] and scatter the codes by ``slot_mapping`` [T] (-1 skipped)."""
        if kv_cache.numel() == 0 or slot_mapping is None:
            return
        self._check_layout(kv_cache)
        write_kv_cache(key, value, kv_cache, slot_mapping, self.fmt)

    def _e8_forward(self, query: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: Any,
                    output: torch.Tensor, output_scale: Any = None, output_block_scale: Any = None) -> torch.Tensor:
        """Attention over the packed cache into ``output`` [T, H_q, D] (rows < num_actual_tokens)."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("e8vllm: fused output quantization is not supported")
        if attn_metadata is None or kv_cache.numel() == 0:  # profiling / warm-up
            return output
        self._check_layout(kv_cache)
        n = attn_metadata.num_actual_tokens
        q = query[:n].view(n, self.num_heads, self.head_size)
        out = output[:n].view(n, self.num_heads, self.head_size)
        paged_attention(q, kv_cache, attn_metadata.query_start_loc, attn_metadata.seq_lens,
                        attn_metadata.block_table, self.fmt, num_kv_heads=self.num_kv_heads,
                        scale=self.scale, out=out)
        return output
