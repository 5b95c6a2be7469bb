"""Attention kernels over the packed E8 KV cache.

``reference``: vectorized PyTorch (CPU or any device torch runs on) write path and paged
attention, plus a float64 loop reference used by the tests. No vLLM import here: the kernels
take plain tensors (cache view, slot mapping, block table, ...), so they are testable alone.
"""

from .reference import (E8KVFormat, check_cache_layout, gather_dequantized, paged_attention,
                        reference_attention, unpack_fields, write_kv_cache)

__all__ = ["E8KVFormat", "check_cache_layout", "gather_dequantized", "paged_attention",
           "reference_attention", "unpack_fields", "write_kv_cache"]
