"""Diagnostic (device): wall time per call of the E8 attention op and write op in eager mode (host
launch overhead included) against the same op replayed from a CUDA graph, at 8 x 32k and 64 x 8k."""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from e8vllm.bench import gpu as G  # noqa: E402
from e8vllm.kernels.reference import E8KVFormat  # noqa: E402
from e8vllm.kernels.triton import triton_paged_attention, triton_write_kv_cache  # noqa: E402

fmt = E8KVFormat.from_bits(128, 4, 4)
rows = []
for batch, ctx in ((8, 32768), (64, 8192)):
    bt, nblocks = G._block_tables(batch, ctx, "cuda")
    cache = torch.randint(0, 255, (nblocks, 8, 16, fmt.slot_bytes), dtype=torch.uint8, device="cuda")
    q = torch.randn(batch, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, 8, 128, device="cuda", dtype=torch.bfloat16)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    sl = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    slots = (bt[:, -1].long() * 16 + 15).contiguous()
    out = torch.empty_like(q)
    ops = {"attention": lambda: triton_paged_attention(q, cache, qsl, sl, bt, fmt, max_query_len=1, num_kv_heads=8,
                                                       scale=128 ** -0.5, out=out),
           "write": lambda: triton_write_kv_cache(k, k, cache, slots, fmt)}
    for name, fn in ops.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        eager = (time.perf_counter() - t) / 50
        t = time.perf_counter()
        for _ in range(50):
            fn()
        cpu_only = (time.perf_counter() - t) / 50  # host time to issue (the GPU may still run)
        torch.cuda.synchronize()
        graph, _ = G._time_graph(fn)
        r = {"batch": batch, "context": ctx, "op": name, "eager_s": eager, "host_issue_s": cpu_only, "graph_s": graph}
        rows.append(r)
        print(json.dumps(r), flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "eager_overhead.json"), "w"), indent=1)
