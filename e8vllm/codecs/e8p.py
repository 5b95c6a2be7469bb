r"""E8P: a ball-shaped 2-bit E8 codebook decoded from a 256-entry table (after QuIP#).

At 2 bits a box-truncated lattice wastes many points in the corners of the box. E8P (Tseng
et al., QuIP#, 2024) keeps 2^16 points of E8 + ¼·1 close to the origin instead, organized so that
a 256-entry table suffices:

* D8^ := D8 + ½·1 (all coordinates in Z + ½, even coordinate sum) is the half-integer coset of E8.
  Its points with norm² ≤ 10 have exactly 227 distinct *absolute-value patterns*
  a ∈ {½, 3/2, 5/2}^8; 29 patterns of norm² 12 complete a table A of 256 patterns
  (here: the first 29 of the 56 permutations of (3/2,3/2,3/2,3/2,3/2,½,½,½) in lexicographic order;
  QuIP# does not specify its choice beyond the count).
* For a pattern a, flipping the sign of a coordinate changes the coordinate sum by 2a_i (odd),
  so exactly half of the 2^8 sign vectors s give s⊙a ∈ D8^: 7 sign bits are free and the
  8th follows from the parity.
* A shift bit picks p = s⊙a ± ¼·1.

So 8 (pattern) + 7 (signs) + 1 (shift) = 16 bits code 2^16 points of (D8^ ± ¼): 2 bits per value.
Encoding is exact nearest-neighbour: for each shift and each of the 256 patterns, the best signs
are sign(z) with, if the parity is wrong, the coordinate of least |z_i|·a_i flipped (cost
+4|z_i|a_i); the best (shift, pattern) wins. Decoding is one table read per 8 values (the table
packs 8 two-bit magnitudes into 16 bits: 512 bytes), then a sign, a shift and the scale per value.

As the other E8 codecs, the vector is rotated first and one fp16 scale per vector is stored
(chosen among ``n_scales`` factors around α·RMS, α trained on Gaussian data).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

from . import register
from .base import Codec, DecodeCost, check_codes, check_head_dim, check_vectors, fp16_bytes
from .uniform import cached_rotation, fp16_round, read_fp16

__all__ = ["E8PCodec", "e8p_table", "e8p_encode_blocks", "e8p_decode_blocks"]

INF = float("inf")


@functools.lru_cache(maxsize=None)
def e8p_table() -> torch.Tensor:
    """float32 [256, 8]: the absolute-value patterns (227 of norm² <= 10, then 29 of norm² 12)."""
    vals = (0.5, 1.5, 2.5, 3.5)
    small, twelve = [], []
    for a in itertools.product(vals, repeat=8):
        n = sum(v * v for v in a)
        if n <= 10:
            small.append(a)
        elif n == 12 and sorted(a) == [0.5, 0.5, 0.5, 1.5, 1.5, 1.5, 1.5, 1.5]:
            twelve.append(a)
    assert len(small) == 227 and len(twelve) == 56, (len(small), len(twelve))
    return torch.tensor(sorted(small) + sorted(twelve)[:29], dtype=torch.float32)


def e8p_encode_blocks(u: torch.Tensor, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """u float32 [M, 8] -> (16-bit words int64 [M], squared error float32 [M]). Exact nearest point."""
    table = e8p_table().to(u.device)                                  # [256, 8]
    words = torch.empty(u.shape[0], dtype=torch.int64, device=u.device)
    errs = torch.empty(u.shape[0], dtype=torch.float32, device=u.device)
    for lo in range(0, u.shape[0], chunk):
        x = u[lo:lo + chunk]
        best_err = torch.full((x.shape[0],), INF, device=u.device)
        best_word = torch.zeros(x.shape[0], dtype=torch.int64, device=u.device)
        for shift_bit, shift in ((0, 0.25), (1, -0.25)):
            z = x - shift                                             # [m, 8]
            az = z.abs()
            neg = z < 0
            cost = (az[:, None, :] - table[None]).square().sum(-1)      # [m, 256]
            # parity of the coordinate sum of sign(z)⊙a: Σ a_i - 2 Σ_{neg} a_i; a_i ∈ Z+½
            ssum = table.sum(1)[None] - 2 * (neg.float() @ table.T)     # [m, 256]
            odd = (torch.remainder(ssum, 2.0) > 0.5)
            flip = (az[:, None, :] * table[None]).amin(-1) * 4          # [m, 256]
            total = cost + torch.where(odd, flip, 0.0)
            err, j = total.min(1)
            # signs: sign(z), with the least-cost coordinate flipped where the parity was odd
            a = table[j]                                              # [m, 8]
            sneg = neg.clone()
            fix = odd.gather(1, j[:, None]).squeeze(1)
            i = (az * a).argmin(1)
            sneg[fix, i[fix]] = ~sneg[fix, i[fix]]
            signbits = (sneg[:, :7].long() << torch.arange(7, device=u.device)).sum(1)
            word = j | (signbits << 8) | (shift_bit << 15)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_word = torch.where(better, word, best_word)
        words[lo:lo + chunk] = best_word
        errs[lo:lo + chunk] = best_err
    return words, errs


def e8p_decode_blocks(words: torch.Tensor) -> torch.Tensor:
    """16-bit words int64 [M] -> float32 [M, 8]."""
    table = e8p_table().to(words.device)
    a = table[words & 0xFF]                                           # [M, 8]
    neg = ((words[:, None] >> (8 + torch.arange(7, device=words.device))) & 1).bool()
    # the 8th sign makes the coordinate sum even
    partial = a[:, :7].sum(1) - 2 * (a[:, :7] * neg).sum(1) + a[:, 7]
    neg7 = torch.remainder(partial, 2.0) > 0.5
    sign = 1 - 2 * torch.cat([neg, neg7[:, None]], 1).float()
    shift = torch.where(((words >> 15) & 1).bool(), -0.25, 0.25)
    return sign * a + shift[:, None]


@functools.lru_cache(maxsize=None)
def _alpha() -> float:
    """The trained scale factor, stored in ``e8_tables.json`` (key ``e8p-2``) by :func:`train_alpha`."""
    from .e8 import _stored_tables

    entry = _stored_tables().get("e8p-2")
    if entry is None:
        raise ValueError("no trained E8P scale in e8_tables.json; run `python -m e8vllm.codecs.e8p`")
    return float(entry["alpha"])


def train_alpha() -> float:
    """Scale (in RMS units) minimizing E8P's MSE on RMS-normalized Gaussian vectors (seeded)."""
    g = torch.Generator().manual_seed(4321)
    x = torch.randn(2000, 64, generator=g)
    u = (x / x.square().mean(1, keepdim=True).sqrt()).reshape(-1, 8)
    best = (INF, 1.0)
    for alpha in torch.linspace(0.6, 1.4, 33).tolist():
        err = e8p_encode_blocks(u / alpha)[1].mean().item() * alpha ** 2
        best = min(best, (err, alpha))
    return best[1]


@dataclass(frozen=True)
class E8PCodec(Codec):
    """Rotated E8P 2-bit code with an fp16 per-vector scale. x: float [N, D] -> uint8 [N, D/4 + 2]."""

    head_dim: int
    n_scales: int = 5
    seed: int = 0
    family = "e8"
    name = "e8p-2bit"
    codec_id = 132

    def __post_init__(self) -> None:
        check_head_dim(self.head_dim)
        if not isinstance(self.n_scales, int) or self.n_scales < 1:
            raise ValueError(f"n_scales must be a positive int, got {self.n_scales!r}")
        cached_rotation(self.head_dim, self.seed)

    @property
    def code_bytes(self) -> int:
        return self.head_dim // 4 + 2

    @property
    def decode_cost(self) -> DecodeCost:
        return DecodeCost(5.0, 512, "one 16-bit table read per 8 values (256 patterns of 8 two-bit magnitudes), "
                          "then per value: extract magnitude, sign bit (8th from parity), ±¼ shift, scale")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [N, D] -> uint8 [N, code_bytes] (D/8 little-endian 16-bit words, then the fp16 scale)."""
        y = check_vectors(x, self.head_dim)
        n, d = y.shape
        if n == 0:
            return torch.empty((0, self.code_bytes), dtype=torch.uint8)
        y = cached_rotation(self.head_dim, self.seed).forward(y)
        rms = y.square().mean(1).sqrt() * _alpha()
        best_err = torch.full((n,), INF)
        best_words = torch.zeros((n, d // 8), dtype=torch.int64)
        best_scale = torch.zeros(n)
        factors = [1.0] if self.n_scales == 1 else torch.linspace(0.8, 1.2, self.n_scales).tolist()
        vanishing = fp16_round(rms * max(factors)) == 0  # scale 0: decodes to exact zeros
        for f in factors:
            s = fp16_round(rms * f)
            s = torch.where(s > 0, s, torch.ones_like(s))
            words, err = e8p_encode_blocks((y / s[:, None]).reshape(-1, 8))
            err = err.reshape(n, -1).sum(1) * s.square()
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_words[better] = words.reshape(n, -1)[better]
            best_scale = torch.where(better, s, best_scale)
        lo_hi = torch.stack([best_words & 0xFF, best_words >> 8], -1).reshape(n, -1).to(torch.uint8)
        return torch.cat([lo_hi, fp16_bytes(torch.where(vanishing, torch.zeros_like(best_scale), best_scale))], 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: uint8 [N, code_bytes] -> float32 [N, D]."""
        codes = check_codes(codes, self.code_bytes)
        n, d = codes.shape[0], self.head_dim
        if n == 0:
            return torch.empty((0, d), dtype=torch.float32)
        b = codes[:, : d // 4].long().reshape(n, -1, 2)
        words = (b[..., 0] | (b[..., 1] << 8)).reshape(-1)
        s = read_fp16(codes[:, d // 4: d // 4 + 2], "scale")
        y = e8p_decode_blocks(words).reshape(n, d) * s[:, None]
        return cached_rotation(self.head_dim, self.seed).inverse(y)


def _factory(head_dim: int, **kw) -> E8PCodec:
    return E8PCodec(head_dim=head_dim, **kw)


register("e8p-2bit", 132, _factory, family="e8", nominal_bits=2.0,
         summary="E8P ball-shaped 2-bit E8 codebook (256-entry table + signs + ±¼ shift), "
                 "per-vector scale search, Hadamard rotation, fp16 scale")


if __name__ == "__main__":  # pragma: no cover - regenerates the stored scale
    import json

    from .e8 import TABLES_PATH

    tables = json.loads(TABLES_PATH.read_text())
    tables["e8p-2"] = {"alpha": train_alpha()}
    TABLES_PATH.write_text(json.dumps(tables))
    print(tables["e8p-2"])
