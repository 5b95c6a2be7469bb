"""CUDA check of the PyTorch E8 paged-attention path (run on the device machine).

Writes K/V of two sequences into a packed cache on the GPU, runs ``paged_attention`` there and
compares with the float64 loop reference on CPU over the same codes; prints timings.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from e8vllm.kernels.reference import E8KVFormat, paged_attention, reference_attention, write_kv_cache  # noqa: E402


def main() -> None:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    h_kv, h_q, d, bs, nb = 8, 32, 128, 16, 64
    fmt = E8KVFormat.from_bits(d, 4, 4)
    lens = [300, 77]
    cache = torch.zeros(nb, h_kv, bs, fmt.slot_bytes, dtype=torch.uint8, device=dev)
    perm = torch.randperm(nb)
    bt = torch.stack([perm[:32], perm[32:]]).to(torch.int32).to(dev)
    k = torch.randn(sum(lens), h_kv, d, device=dev)
    v = torch.randn(sum(lens), h_kv, d, device=dev)
    slots = torch.cat([(bt[i, torch.arange(n, device=dev) // bs].long() * bs + torch.arange(n, device=dev) % bs)
                       for i, n in enumerate(lens)])
    torch.cuda.synchronize(); t = time.time()
    write_kv_cache(k, v, cache, slots, fmt)
    torch.cuda.synchronize(); tw = time.time() - t
    q = torch.randn(sum(lens), h_q, d, device=dev)
    qsl = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32, device=dev)
    sl = torch.tensor(lens, dtype=torch.int32, device=dev)
    torch.cuda.synchronize(); t = time.time()
    out = paged_attention(q, cache, qsl, sl, bt, fmt, num_kv_heads=h_kv)
    torch.cuda.synchronize(); ta = time.time() - t
    ref = reference_attention(q.cpu(), cache.cpu(), qsl.cpu(), sl.cpu(), bt.cpu(), fmt)
    err = (out.double().cpu() - ref).abs().max().item()
    print(f"cuda write {tw*1e3:.1f} ms ({k.shape[0]*h_kv*2} vectors), attention {ta*1e3:.1f} ms, "
          f"max |gpu - float64 reference| = {err:.2e} (|ref| max {ref.abs().max().item():.2f})")
    assert err < 1e-2, err


if __name__ == "__main__":
    main()
