"""Profiling target (device, under Nsight Compute): the E8 attention op or the write op on the
kernel benchmark's shapes, run a few times eagerly so that ``ncu --launch-skip`` can pick one launch.

    python scripts/gpu/ncu_decode.py decode [BATCH CTX]   # 64 x 8192 by default, e8_k4v4
    python scripts/gpu/ncu_decode.py write [TOKENS]       # 64 tokens by default

``scripts/gpu/ncu_run.sh`` wraps it in ``ncu`` and writes the reports under ``$OUT``.
"""
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
from e8vllm.bench import gpu as G  # noqa: E402
from e8vllm.kernels.triton import triton_paged_attention, triton_write_kv_cache  # noqa: E402

torch.manual_seed(0)
what = sys.argv[1] if len(sys.argv) > 1 else "decode"
fmt, _ = G._e8_format(os.environ.get("DTYPE", "e8_k4v4"))
reps = int(os.environ.get("REPS", 3))
if what == "decode":
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    ctx = int(sys.argv[3]) if len(sys.argv) > 3 else 8192
    cache, bt, q, qsl, sl = G.decode_inputs(fmt, batch, ctx)
    torch.cuda.synchronize()
    for _ in range(reps):
        triton_paged_attention(q, cache, qsl, sl, bt, fmt, max_query_len=1, num_kv_heads=G.H_KV, scale=G.D ** -0.5)
elif what == "write":
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    cache = torch.zeros(4096, G.H_KV, G.BS, fmt.slot_bytes, dtype=torch.uint8, device="cuda")
    k = torch.randn(n, G.H_KV, G.D, device="cuda", dtype=torch.bfloat16)
    slots = torch.randperm(4096 * G.BS, device="cuda")[:n]
    for _ in range(reps):
        triton_write_kv_cache(k, k * 0.5, cache, slots, fmt)
else:
    raise SystemExit(f"unknown target {what!r}: decode or write")
torch.cuda.synchronize()
print(f"ncu target {what} done", flush=True)
