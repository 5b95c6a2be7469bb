"""Random paged-cache test cases shared by the CPU (interpreter) and H200 tests of the kernels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from e8vllm.kernels.reference import E8KVFormat, write_kv_cache

__all__ = ["PagedCase", "random_case"]


@dataclass
class PagedCase:
    """A filled packed cache plus one vLLM batch over it.

    query [T, H_q, D] float32; kv_cache uint8 [num_blocks, H_kv, bs, slot_bytes]; query_start_loc
    int32 [B + 1]; seq_lens int32 [B]; block_table int32 [B, max_blocks]; key / value float32
    [sum(seq_lens), H_kv, D] and slots int64 [sum(seq_lens)] as written.
    """

    fmt: E8KVFormat
    query: torch.Tensor
    kv_cache: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    slots: torch.Tensor

    @property
    def max_query_len(self) -> int:
        return int((self.query_start_loc[1:] - self.query_start_loc[:-1]).max())


def random_case(fmt: E8KVFormat, lens: list[int], qlens: list[int], *, h_q: int, h_kv: int, block_size: int = 16,
                seed: int = 0, device: str = "cpu", outliers: bool = True, write: bool = True) -> PagedCase:
    """Sequences of ``lens`` tokens (the last ``qlens`` of each are this batch's queries) in shuffled
    blocks of a cache with spare blocks; K/V Gaussian with a few outlier channels, written with the
    PyTorch reference writer when ``write``."""
    g = torch.Generator().manual_seed(seed)
    d = fmt.head_size
    nbl = [(n + block_size - 1) // block_size for n in lens]
    nb = sum(nbl) + 3
    perm = torch.randperm(nb, generator=g)
    bt = torch.zeros(len(lens), max(nbl), dtype=torch.int32)
    p = 0
    for i, n in enumerate(nbl):
        bt[i, :n] = perm[p:p + n]
        p += n
    total = sum(lens)
    k = torch.randn(total, h_kv, d, generator=g)
    v = torch.randn(total, h_kv, d, generator=g)
    if outliers:
        k[:, :, 3] *= 12.0
        v[: total // 3] *= 0.05
    slots = torch.cat([bt[i, torch.arange(n) // block_size].long() * block_size + torch.arange(n) % block_size
                       for i, n in enumerate(lens)])
    cache = torch.zeros(nb, h_kv, block_size, fmt.slot_bytes, dtype=torch.uint8)
    if write:
        write_kv_cache(k, v, cache, slots, fmt)
    qsl = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), h_q, d, generator=g) * 2.0
    dev = torch.device(device)
    return PagedCase(fmt, q.to(dev), cache.to(dev), qsl.to(dev), torch.tensor(lens, dtype=torch.int32).to(dev),
                     bt.to(dev), k.to(dev), v.to(dev), slots.to(dev))

