"""Fused Triton kernels for the packed E8 KV cache (write path and paged attention).

See :mod:`e8vllm.kernels.triton.e8_kv` for the math and the kernels; the PyTorch reference they are
tested against is :mod:`e8vllm.kernels.reference`.
"""

from .e8_kv import (TritonE8Format, fp16_operand_reference, prepare_device_constants, supported,
                    triton_paged_attention, triton_write_kv_cache, warm_attention_paths, warm_write_paths)

__all__ = ["TritonE8Format", "fp16_operand_reference", "prepare_device_constants", "supported", "triton_paged_attention",
           "triton_write_kv_cache", "warm_attention_paths", "warm_write_paths"]
