"""Diagnostic (device): decode-kernel variants at 64 x 8192, e8_k4v4, one run: lookup paths, a
no-lookup timing diagnostic, pipeline stages, and the previous kernel (session 4) on the same shape."""
import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
from e8vllm.bench import gpu as G  # noqa: E402

torch.manual_seed(0)
cands = []
for k, n, w, st in (("pairs", 64, 4, 1), ("nolut", 64, 4, 1), ("pairs", 128, 4, 1), ("pairs", 32, 4, 1),
                    ("pairs", 128, 8, 1), ("pairs", 64, 8, 1), ("values", 64, 4, 1), ("pairs", 32, 2, 1),
                    ("pairs_l1", 64, 4, 1), ("nolut", 128, 4, 1)):
    cands.append({"kernel": k, "tile_n": n, "num_warps": w, "num_stages": st, "segs": int(os.environ.get("SEGS", 16))})
res = G._e8_case("e8_k4v4", 64, 8192, cands)
# the previous kernel (int16 loads, single-value L1 lookups) on the same shape, timing only
from e8vllm.kernels.reference import E8KVFormat  # noqa: E402
sys.path.insert(0, os.path.join(os.getcwd(), "scripts", "gpu"))
import _old_e8_kv as old  # noqa: E402  (the session-4 kernel, kept here for this comparison only)

fmt = E8KVFormat.from_bits(128, 4, 4)
bt, nblocks = G._block_tables(64, 8192, "cuda")
cache = torch.randint(0, 255, (nblocks, 8, 16, fmt.slot_bytes), dtype=torch.uint8, device="cuda")
cache.view(torch.int16)[..., 32] = 0x3C00  # K scale 1.0 (old layout)
cache.view(torch.int16)[..., 65] = 0x3C00
q = torch.randn(64, 32, 128, device="cuda", dtype=torch.bfloat16)
qsl = torch.arange(65, dtype=torch.int32, device="cuda")
sl = torch.full((64,), 8192, dtype=torch.int32, device="cuda")
out = torch.empty_like(q)
for dc in ({"kernel": "tile3", "tile_n": 32, "num_warps": 4}, {"kernel": "tile3g", "tile_n": 32, "num_warps": 4}):
    fn = lambda dc=dc: old.triton_paged_attention(q, cache, qsl, sl, bt, fmt, max_query_len=1, num_kv_heads=8,
                                                  scale=128 ** -0.5, out=out, decode=dc)
    t, g = G._time_graph(fn)
    res["variants"].append({**dc, "old_kernel": True, "time_s": t})
    print(json.dumps(res["variants"][-1]), flush=True)
out_dir = os.environ.get("OUT", ".")
json.dump(res, open(os.path.join(out_dir, "diag_decode.json"), "w"), indent=1)
for v in sorted(res["variants"], key=lambda v: v.get("time_s", 9)):
    print(f"{v.get('time_s', float('nan')) * 1e6:8.1f} us  {json.dumps(v)[:200]}")
