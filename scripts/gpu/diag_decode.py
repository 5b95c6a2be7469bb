"""Diagnostic (device): decode-kernel variants at 64 x 8192, e8_k4v4, one run: lookup paths, a
no-lookup timing diagnostic, pipeline stages. (Session 6's runs also timed the session-4 kernel,
e8vllm/kernels/triton/e8_kv.py at commit 817ab08, from a copy: results/gpu/diag_decode_s6_*.json.)"""
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
out_dir = os.environ.get("OUT", ".")
json.dump(res, open(os.path.join(out_dir, "diag_decode.json"), "w"), indent=1)
for v in sorted(res["variants"], key=lambda v: v.get("time_s", 9)):
    print(f"{v.get('time_s', float('nan')) * 1e6:8.1f} us  {json.dumps(v)[:200]}")
