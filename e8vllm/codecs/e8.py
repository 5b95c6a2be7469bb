r"""E8-lattice KV codecs (ours): fixed-rate 8-dimensional block codes after a Hadamard rotation.

Pipeline for a head vector x in R^D (D a multiple of 8):

1. rotate: y = R x with the randomized Hadamard rotation R (``e8vllm.hadamard``); the
   coordinates of y are close to iid Gaussian whatever outliers x had;
2. scale: one fp16 scale s per vector, u = y / s (s = RMS(y) * f, f chosen per vector, below);
3. code each 8-dim block of u with a block code C ⊂ R^8 of 2^(8b) points (b bits per value);
4. store the block codes bit-packed, then s: ``code_bytes = D*b/8 + 2`` (b + 16/D bits per value).

Block codes: E8 as two cosets with a parity rule
-------------------------------------------------
E8 = D8 ∪ (D8 + ½·1) and D8 = {v ∈ Z^8 : Σ v_i even}. Truncating each coset to a box of
2^b integers per coordinate gives 2 · 2^(8b) / 2 = 2^(8b) points: a coset bit c, seven free
b-bit indices v_0..v_6, and v_7 whose lowest bit is fixed by the parity rule Σ v_i even. That
freed bit stores c, so a block is exactly 8 fields of b bits. A point's coordinates are
``T_c[v_i]`` with T_0[v] = (v - 2^(b-1)) δ and T_1[v] = T_0[v] + δ/2: the **plain E8 box code**
(``e8u-*``). Nearest point (exact, Conway-Sloane style): per coset, take every coordinate's
nearest level; if the index sum is odd, move the one coordinate whose move to its next level
costs least; keep the better coset.

Nothing in that search needs the levels to be uniform. The **companded E8 code** (``e8-*``;
the KV dtypes' default, ``e8s-*`` in :mod:`e8vllm.codecs.e8s` and ``e8c-4bit`` for 4-bit keys, builds on it) keeps the E8 index
structure (cosets, parity rule, the same encoder) but replaces the uniform levels by two sorted tables T_0, T_1 of 2^b levels trained by Lloyd's algorithm
on rotated Gaussian data (encode with the parity rule → each level = centroid of the values
that chose it → repeat). The lattice keeps its granular gain (the parity rule), the tables add
Lloyd-Max-like point density (shaping). Decoding is a lookup in a 2^(b+1)-entry table per value
plus one parity per block: x̂_i = s · T_c[v_i].

Relaxed parity at EQUAL bits
----------------------------
D8* = Z^8 ∪ (Z^8 + ½) drops the parity rule in both cosets, and the set used by nexusquant-kv,
D8 ∪ (Z^8 + ½), drops it in the half-integer coset only. Without the rule a coset has twice as
many points in the same box, so to stay at exactly 8b bits per block the unconstrained coset
gives its last coordinate 2^(b-1) levels (its own trained table) instead of 2^b:
``d8dual-*`` and ``d8half-*``. Same encoder, tables trained the same way.

Overload handling
-----------------
* scale choice (default): the per-vector scale is RMS(y) times the best of ``n_scales`` factors
  in [0.75, 1.25] (smallest squared error, measured with the fp16 scale actually stored);
  ``*-rms`` variants take f = 1 (one encode instead of ``n_scales``).
* Voronoi shaping (``e8v-*``): the nested-lattice code E8 / 2^b E8 (Conway-Sloane 1983): the fine
  point p = Q_E8(u / δ) is stored as its generator coordinates mod 2^b and decoded as
  p - 2^b Q_E8(p / 2^b). Its cell is E8's Voronoi region (0.65 dB better shaped than a cube), but
  a point outside it wraps around; the scale search (here over f in [0.6, 1.6]) avoids that.
  Decoding needs a full E8 nearest-point search per block (≈ 15 operations per value): too slow
  for an attention kernel, measured here as the reference for what shaping can buy.

Tables are produced by :func:`train_tables` (deterministic, seeded) and shipped in
``e8_tables.json`` next to this file, keyed by the table id stored with every codec.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from e8vllm.lattice import nearest_e8

from . import _e8_fast, register
from .base import (Codec, DecodeCost, check_codes, check_head_dim, check_vectors, fp16_bytes,
                   pack_bits, packed_len, unpack_bits)
from .uniform import cached_rotation, fp16_round, read_fp16

__all__ = ["BlockCode", "E8Codec", "E8VoronoiCodec", "block_code", "train_tables", "TABLES_PATH"]

TABLES_PATH = Path(__file__).with_name("e8_tables.json")
BITS: tuple[int, ...] = (2, 3, 4, 8)
INF = float("inf")

# kind -> parity rule per coset (coset 0 = integer-like, coset 1 = half-integer-like)
PARITY: dict[str, tuple[bool, bool]] = {
    "e8": (True, True),        # E8     = D8 ∪ (D8 + ½)
    "d8dual": (False, False),  # D8*    = Z^8 ∪ (Z^8 + ½)
    "d8half": (True, False),   # D8 ∪ (Z^8 + ½)   (nexusquant-kv's set)
}


# ---------------------------------------------------------------------------------------------
# The 8-dimensional block code
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class BlockCode:
    """A 2-coset block code with 2^(8b) points in R^8.

    main: float32 [2, K] sorted levels of coordinates 0..6 (and 7 where the coset has the parity
        rule), K = 2^b; last: float32 [2, K] levels of coordinate 7 (only the first K/2 are used
        in a coset without the parity rule).
    """

    bits: int
    parity: tuple[bool, bool]
    main: torch.Tensor
    last: torch.Tensor

    @property
    def levels(self) -> int:
        return 1 << self.bits

    def last_levels(self, c: int) -> int:
        return self.levels if self.parity[c] else self.levels // 2

    # -- encoder ---------------------------------------------------------------------------
    @staticmethod
    def _nearest(x: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [M, k], sorted table [K] -> index [M, k], cost, extra cost of index+1 / index-1."""
        k = table.numel()
        v = torch.bucketize(x.contiguous(), (table[1:] + table[:-1]) * 0.5)
        base = (x - table[v]).square()
        up = torch.where(v + 1 < k, (x - table[(v + 1).clamp(max=k - 1)]).square() - base, INF)
        dn = torch.where(v >= 1, (x - table[(v - 1).clamp(min=0)]).square() - base, INF)
        return v, base, up, dn

    def _encode_coset(self, u: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """u [M, 8] -> (indices int64 [M, 8], squared error [M]) for coset c."""
        table = self.main[c].to(u.device)
        last = self.last[c, : self.last_levels(c)].to(u.device)
        v0, b0, u0, d0 = self._nearest(u[:, :7], table)
        v1, b1, u1, d1 = self._nearest(u[:, 7:], last)
        v = torch.cat([v0, v1], 1)
        err = b0.sum(1) + b1.sum(1)
        if self.parity[c]:
            up, dn = torch.cat([u0, u1], 1), torch.cat([d0, d1], 1)
            odd = (v.sum(1) & 1).bool()
            move = torch.minimum(up, dn)
            i = move.argmin(1, keepdim=True)
            step = torch.where(up.gather(1, i) <= dn.gather(1, i), 1, -1) * odd[:, None]
            v = v.scatter_add(1, i, step)
            err = err + torch.where(odd, move.gather(1, i).squeeze(1), 0.0)
        return v, err

    def encode(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u: float32 [M, 8] -> (fields int64 [M, 8] each < 2^b, squared error float32 [M])."""
        va, ea = self._encode_coset(u, 0)
        vb, eb = self._encode_coset(u, 1)
        c = eb < ea
        v = torch.where(c[:, None], vb, va)
        pc = torch.tensor(self.parity, device=u.device)[c.long()]
        f7 = torch.where(pc, v[:, 7] >> 1, v[:, 7])
        fields = torch.cat([v[:, :7], ((f7 << 1) | c.long())[:, None]], 1)
        return fields, torch.minimum(ea, eb)

    def indices(self, fields: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fields [M, 8] -> (coset int64 [M], level indices int64 [M, 8])."""
        c = fields[:, 7] & 1
        f7 = fields[:, 7] >> 1
        parity = fields[:, :7].sum(1) & 1
        pc = torch.tensor(self.parity, device=fields.device)[c]
        v7 = torch.where(pc, (f7 << 1) | parity, f7)
        return c, torch.cat([fields[:, :7], v7[:, None]], 1)

    def decode(self, fields: torch.Tensor) -> torch.Tensor:
        """fields int64 [M, 8] -> float32 [M, 8]."""
        c, v = self.indices(fields)
        main, last = self.main.to(fields.device), self.last.to(fields.device)
        k = self.levels
        out = main.reshape(-1)[(c[:, None] * k + v[:, :7])]
        return torch.cat([out, last.reshape(-1)[c * k + v[:, 7]][:, None]], 1)


# ---------------------------------------------------------------------------------------------
# Tables: uniform (plain E8) and Lloyd-trained (companded)
# ---------------------------------------------------------------------------------------------
def _uniform_tables(bits: int, step: float, parity: tuple[bool, bool]) -> tuple[torch.Tensor, torch.Tensor]:
    k = 1 << bits
    t0 = (torch.arange(k, dtype=torch.float64) - k // 2) * step
    main = torch.stack([t0, t0 + step / 2]).float()
    last = main.clone()
    for c in (0, 1):
        if not parity[c]:  # half as many levels on coordinate 7, same span
            h = k // 2
            # every other level of the coset: integers stay integers, half-integers half-integers
            last[c, :h] = ((2 * torch.arange(h, dtype=torch.float64) - k // 2 + 0.5 * c) * step).float()
            last[c, h:] = last[c, h - 1]
    return main, last


def _gaussian_blocks(n_vectors: int, dim: int, seed: int) -> torch.Tensor:
    """RMS-normalized Gaussian vectors [n_vectors, dim] cut into blocks [n*dim/8, 8]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_vectors, dim, generator=g)
    x = x / x.square().mean(1, keepdim=True).sqrt()
    return x.reshape(-1, 8)


def _best_uniform_step(bits: int, parity: tuple[bool, bool], u: torch.Tensor) -> float:
    best = (INF, 1.0)
    k = 1 << bits
    for step in torch.linspace(1.0 / k, 12.0 / k, 23).tolist():
        main, last = _uniform_tables(bits, step, parity)
        code = BlockCode(bits, parity, main, last)
        err = code.encode(u)[1].mean().item()
        best = min(best, (err, step))
    lo, hi = best[1] * 0.88, best[1] * 1.12
    for step in torch.linspace(lo, hi, 13).tolist():
        main, last = _uniform_tables(bits, step, parity)
        err = BlockCode(bits, parity, main, last).encode(u)[1].mean().item()
        best = min(best, (err, step))
    return best[1]


def _lloyd(code: BlockCode, u: torch.Tensor, iters: int) -> BlockCode:
    k = code.levels
    main, last = code.main.double().clone(), code.last.double().clone()
    for _ in range(iters):
        fields, _err = code.encode(u)
        c, v = code.indices(fields)
        for cc in (0, 1):
            rows = c == cc
            vm = v[rows][:, :7] if not code.parity[cc] else v[rows]
            xm = u[rows][:, :7] if not code.parity[cc] else u[rows]
            s = torch.zeros(k, dtype=torch.float64).index_add_(0, vm.reshape(-1), xm.reshape(-1).double())
            n = torch.zeros(k, dtype=torch.float64).index_add_(0, vm.reshape(-1), torch.ones(vm.numel(), dtype=torch.float64))
            main[cc] = torch.where(n > 0, s / n.clamp(min=1), main[cc])
            if code.parity[cc]:
                last[cc] = main[cc]
            else:
                h = k // 2
                v7, x7 = v[rows][:, 7], u[rows][:, 7].double()
                s7 = torch.zeros(h, dtype=torch.float64).index_add_(0, v7, x7)
                n7 = torch.zeros(h, dtype=torch.float64).index_add_(0, v7, torch.ones_like(x7))
                last[cc, :h] = torch.where(n7 > 0, s7 / n7.clamp(min=1), last[cc, :h])
        main = main.sort(dim=1).values
        last[:, :] = torch.stack([last[cc] if code.parity[cc] else torch.cat(
            [last[cc, : k // 2].sort().values, last[cc, k // 2:]]) for cc in (0, 1)])
        for cc in (0, 1):
            if code.parity[cc]:
                last[cc] = main[cc]
        code = BlockCode(code.bits, code.parity, main.float(), last.float())
    return code


def train_tables(kind: str, bits: int, *, n_vectors: int = 20_000, dim: int = 64, iters: int = 30,
                 seed: int = 1234) -> dict:
    """Train the tables of one block code on RMS-normalized Gaussian vectors (deterministic).

    Returns a JSON-able dict: kind, bits, parity, uniform_step, and the uniform and Lloyd tables.
    """
    parity = PARITY[kind]
    u = _gaussian_blocks(n_vectors, dim, seed)
    step = _best_uniform_step(bits, parity, u)
    main, last = _uniform_tables(bits, step, parity)
    code = _lloyd(BlockCode(bits, parity, main, last), u, iters)
    return {
        "kind": kind, "bits": bits, "parity": list(parity), "uniform_step": step,
        "lloyd_main": code.main.tolist(), "lloyd_last": code.last.tolist(),
        "train": {"n_vectors": n_vectors, "dim": dim, "iters": iters, "seed": seed},
    }


@functools.lru_cache(maxsize=None)
def _stored_tables() -> dict:
    if not TABLES_PATH.exists():
        return {}
    return json.loads(TABLES_PATH.read_text())


@functools.lru_cache(maxsize=None)
def block_code(kind: str, bits: int, companded: bool = True) -> BlockCode:
    """The block code of ``kind`` ('e8', 'd8dual', 'd8half') at ``bits``; uniform or Lloyd levels."""
    if kind not in PARITY:
        raise ValueError(f"unknown block code kind {kind!r}; known: {sorted(PARITY)}")
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    key = f"{kind}-{bits}"
    entry = _stored_tables().get(key)
    if entry is None:
        raise ValueError(f"no trained tables for {key} in {TABLES_PATH}; run `python -m e8vllm.codecs.e8`")
    parity = PARITY[kind]
    if companded:
        main = torch.tensor(entry["lloyd_main"], dtype=torch.float32)
        last = torch.tensor(entry["lloyd_last"], dtype=torch.float32)
    else:
        main, last = _uniform_tables(bits, entry["uniform_step"], parity)
    return BlockCode(bits, parity, main, last)


# ---------------------------------------------------------------------------------------------
# Codecs
# ---------------------------------------------------------------------------------------------
def _scale_factors(n: int, lo: float, hi: float) -> list[float]:
    if n == 1:
        return [1.0]
    return torch.linspace(lo, hi, n, dtype=torch.float64).tolist()


@dataclass(frozen=True)
class E8Codec(Codec):
    """Rotated, per-vector-scaled 2-coset block code. x: float [N, D] -> uint8 [N, D*b/8 + 2].

    kind: 'e8' | 'd8dual' | 'd8half'; companded: Lloyd tables (True) or uniform levels (False);
    n_scales: scale factors tried per vector (1 = plain RMS scale).
    """

    head_dim: int
    bits: int = 4
    kind: str = "e8"
    companded: bool = True
    n_scales: int = 9
    seed: int = 0
    family = "e8"

    def __post_init__(self) -> None:
        check_head_dim(self.head_dim)
        if not isinstance(self.n_scales, int) or self.n_scales < 1:
            raise ValueError(f"n_scales must be a positive int, got {self.n_scales!r}")
        block_code(self.kind, self.bits, self.companded)  # validates kind / bits
        cached_rotation(self.head_dim, self.seed)

    @property
    def name(self) -> str:  # type: ignore[override]
        prefix = self.kind if self.kind != "e8" else ("e8" if self.companded else "e8u")
        if self.kind != "e8" and not self.companded:
            prefix += "u"
        return f"{prefix}-{self.bits}bit" + ("-rms" if self.n_scales == 1 else "")

    @property
    def codec_id(self) -> int:  # type: ignore[override]
        base = {"e8": 100, "d8dual": 200, "d8half": 220}[self.kind]
        return base + self.bits + (10 if not self.companded else 0) + (40 if self.n_scales == 1 else 0)

    @property
    def code(self) -> BlockCode:
        return block_code(self.kind, self.bits, self.companded)

    @property
    def code_bytes(self) -> int:
        return packed_len(self.head_dim, self.bits) + 2

    @property
    def decode_cost(self) -> DecodeCost:
        k = 2 << self.bits
        return DecodeCost(
            4.0, 4 * k if self.companded else 0,
            f"unpack a {self.bits}-bit field, one parity per 8 values, "
            + (f"look up a {k}-entry float table" if self.companded else "x = (v - 2^(b-1) + c/2) * step")
            + ", multiply by the fp16 scale; the inverse rotation is applied once to the attention output")

    # ---- the maps -----------------------------------------------------------------------
    def encode_rotated(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated vectors y float32 [N, D] -> (fields int64 [N, D], fp16-exact scale float32 [N])."""
        n, d = y.shape
        rms = y.square().mean(1).sqrt()
        scales = [fp16_round(rms * f) for f in _scale_factors(self.n_scales, 0.75, 1.25)]
        # a vector whose every candidate scale underflows fp16 (zero, or RMS below ~5e-8) is stored
        # with scale 0 and decodes to exact zeros (searching at the stand-in scale 1 would emit a
        # full-size codeword)
        vanishing = scales[-1] == 0
        scales = [torch.where(s > 0, s, torch.ones_like(s)) for s in scales]  # candidate scales [N] each
        if y.device.type == "cpu" and _e8_fast.available():  # the same search, compiled (numba)
            fields, scale = _e8_fast.encode_rotated(self.code, y.float(), torch.stack(scales, 1))
            return fields, torch.where(vanishing, torch.zeros_like(scale), scale)
        best_err = torch.full((n,), INF, device=y.device)
        best_fields = torch.zeros((n, d), dtype=torch.int64, device=y.device)
        best_scale = torch.zeros(n, device=y.device)
        for s in scales:
            fields, err = self.code.encode((y / s[:, None]).reshape(-1, 8))
            err = err.reshape(n, -1).sum(1) * s.square()
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_fields[better] = fields.reshape(n, d)[better]
            best_scale = torch.where(better, s, best_scale)
        return best_fields, torch.where(vanishing, torch.zeros_like(best_scale), best_scale)

    def decode_rotated(self, fields: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """(fields int64 [N, D], scale float32 [N]) -> rotated vectors float32 [N, D]."""
        n, d = fields.shape
        return self.code.decode(fields.reshape(-1, 8)).reshape(n, d) * scale[:, None]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [N, D] -> uint8 [N, code_bytes] (packed fields, then the fp16 scale)."""
        y = check_vectors(x, self.head_dim)
        if y.shape[0] == 0:
            return torch.empty((0, self.code_bytes), dtype=torch.uint8, device=y.device)
        y = cached_rotation(self.head_dim, self.seed).forward(y)
        fields, scale = self.encode_rotated(y)
        return torch.cat([pack_bits(fields, self.bits), fp16_bytes(scale)], 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: uint8 [N, code_bytes] -> float32 [N, D]."""
        codes = check_codes(codes, self.code_bytes)
        if codes.shape[0] == 0:
            return torch.empty((0, self.head_dim), dtype=torch.float32)
        nb = packed_len(self.head_dim, self.bits)
        fields = unpack_bits(codes[:, :nb], self.bits, self.head_dim)
        scale = read_fp16(codes[:, nb:nb + 2], "scale")
        y = self.decode_rotated(fields, scale)
        return cached_rotation(self.head_dim, self.seed).inverse(y)


# E8 generator matrix (rows are a basis; det 1) and its inverse, for the Voronoi code.
_G = torch.tensor(
    [[2, 0, 0, 0, 0, 0, 0, 0],
     [-1, 1, 0, 0, 0, 0, 0, 0],
     [0, -1, 1, 0, 0, 0, 0, 0],
     [0, 0, -1, 1, 0, 0, 0, 0],
     [0, 0, 0, -1, 1, 0, 0, 0],
     [0, 0, 0, 0, -1, 1, 0, 0],
     [0, 0, 0, 0, 0, -1, 1, 0],
     [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
_GINV = torch.linalg.inv(_G)


@dataclass(frozen=True)
class E8VoronoiCodec(Codec):
    """Voronoi (nested-lattice) code E8 / 2^b E8 with a per-vector scale search.

    x: float [N, D] -> uint8 [N, D*b/8 + 2]. The fine step δ is fixed per b (trained on
    Gaussian data); the scale factor f in [0.6, 1.6] is searched per vector (``n_scales``).
    """

    head_dim: int
    bits: int = 4
    n_scales: int = 11
    seed: int = 0
    family = "e8"
    step: float = field(default=0.0)

    def __post_init__(self) -> None:
        check_head_dim(self.head_dim)
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits!r}")
        cached_rotation(self.head_dim, self.seed)
        if self.step <= 0:
            object.__setattr__(self, "step", _voronoi_step(self.bits))

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"e8v-{self.bits}bit"

    @property
    def codec_id(self) -> int:  # type: ignore[override]
        return 120 + self.bits

    @property
    def code_bytes(self) -> int:
        return packed_len(self.head_dim, self.bits) + 2

    @property
    def decode_cost(self) -> DecodeCost:
        return DecodeCost(16.0, 0, "unpack, generator matrix product, then a full E8 nearest-point search "
                          "per 8 values (two cosets: round, parity fix, compare) to reduce mod 2^b E8")

    def _quantize(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u [M, 8] (units of the fine step) -> (indices mod q int64 [M, 8], reconstruction [M, 8])."""
        q = 1 << self.bits
        p = nearest_e8(u)
        k = torch.round(p.double() @ _GINV.to(p.device)).long() % q
        return k, self._reconstruct(k)

    def _reconstruct(self, k: torch.Tensor) -> torch.Tensor:
        q = 1 << self.bits
        p = (k.double() @ _G.to(k.device)).float()
        return p - q * nearest_e8(p / q)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [N, D] -> uint8 [N, code_bytes]."""
        y = check_vectors(x, self.head_dim)
        n, d = y.shape
        if n == 0:
            return torch.empty((0, self.code_bytes), dtype=torch.uint8, device=y.device)
        y = cached_rotation(self.head_dim, self.seed).forward(y)
        rms = y.square().mean(1).sqrt()
        dev = y.device
        best = (torch.full((n,), INF, device=dev), torch.zeros((n, d), dtype=torch.int64, device=dev),
                torch.zeros(n, device=dev))
        vanishing = fp16_round(rms * 1.6 * self.step) == 0  # scale 0: decodes to exact zeros
        for f in _scale_factors(self.n_scales, 0.6, 1.6):
            s = fp16_round(rms * f * self.step)
            s = torch.where(s > 0, s, torch.ones_like(s))
            k, rec = self._quantize((y / s[:, None]).reshape(-1, 8))
            err = (rec.reshape(n, d) * s[:, None] - y).square().sum(1)
            better = err < best[0]
            best[1][better] = k.reshape(n, d)[better]
            best = (torch.where(better, err, best[0]), best[1], torch.where(better, s, best[2]))
        scale = torch.where(vanishing, torch.zeros_like(best[2]), best[2])
        return torch.cat([pack_bits(best[1], self.bits), fp16_bytes(scale)], 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: uint8 [N, code_bytes] -> float32 [N, D]."""
        codes = check_codes(codes, self.code_bytes)
        n, d = codes.shape[0], self.head_dim
        if n == 0:
            return torch.empty((0, d), dtype=torch.float32)
        nb = packed_len(d, self.bits)
        k = unpack_bits(codes[:, :nb], self.bits, d)
        s = read_fp16(codes[:, nb:nb + 2], "scale")
        y = self._reconstruct(k.reshape(-1, 8)).reshape(n, d) * s[:, None]
        return cached_rotation(self.head_dim, self.seed).inverse(y)


@functools.lru_cache(maxsize=None)
def _voronoi_step(bits: int) -> float:
    entry = _stored_tables().get(f"e8v-{bits}")
    if entry is None:
        raise ValueError(f"no trained Voronoi step for {bits} bits in {TABLES_PATH}")
    return float(entry["step"])


def train_voronoi_step(bits: int, *, n_vectors: int = 4000, dim: int = 64, seed: int = 99) -> float:
    """Fine step δ (in RMS units) minimizing the Gaussian MSE of E8/2^b E8 with the scale search."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_vectors, dim, generator=g)
    q = 1 << bits
    best = (INF, 1.0)
    # a cube of side q·δ holding ±c·σ: start near 2·2.5/q and search around it
    for step in torch.linspace(1.0 / q, 12.0 / q, 45).tolist():
        c = E8VoronoiCodec(head_dim=dim, bits=bits, step=step)
        err = (c.decode(c.encode(x)) - x).square().mean().item()
        best = min(best, (err, step))
    return best[1]


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------
def _factory(**fixed):
    def make(head_dim: int, **kw) -> E8Codec:
        return E8Codec(head_dim=head_dim, **{**fixed, **kw})
    return make


def _voronoi_factory(bits: int):
    def make(head_dim: int, **kw) -> E8VoronoiCodec:
        return E8VoronoiCodec(head_dim=head_dim, bits=bits, **kw)
    return make


_SUMMARY = {
    "e8": "E8 (D8 ∪ D8+½) block code",
    "d8dual": "relaxed parity D8* = Z^8 ∪ (Z^8+½) block code at equal bits",
    "d8half": "nexusquant's D8 ∪ (Z^8+½) block code at equal bits",
}

if _stored_tables():
    for _b in BITS:
        for _kind in ("e8", "d8dual", "d8half"):
            for _comp in (True, False):
                for _ns in (9, 1):
                    if (_kind != "e8" or _b == 8) and _ns == 1:
                        continue  # the scale-choice comparison is made on E8 at 2-4 bits
                    if _kind != "e8" and _b == 8:
                        continue  # relaxed parity is compared at 2-4 bits
                    if f"{_kind}-{_b}" not in _stored_tables():
                        continue  # tables not trained yet (`python -m e8vllm.codecs.e8`)
                    _c = E8Codec(head_dim=64, bits=_b, kind=_kind, companded=_comp, n_scales=_ns)
                    _desc = ("Lloyd-companded levels" if _comp else "uniform lattice levels") + \
                            (", RMS scale" if _ns == 1 else ", per-vector scale search")
                    register(_c.name, _c.codec_id, _factory(bits=_b, kind=_kind, companded=_comp, n_scales=_ns),
                             family="e8", nominal_bits=float(_b),
                             summary=f"{_SUMMARY[_kind]}, {_desc}, Hadamard rotation, fp16 scale")
        if f"e8v-{_b}" in _stored_tables():
            register(f"e8v-{_b}bit", 120 + _b, _voronoi_factory(_b), family="e8", nominal_bits=float(_b),
                     summary="Voronoi nested-lattice code E8/2^b E8, per-vector scale search, Hadamard rotation")


def _regenerate(path: Path = TABLES_PATH, force: bool = False) -> None:  # pragma: no cover - run by hand
    """Train every missing table (all with ``force``) and write ``e8_tables.json`` after each one."""
    import time

    from rich.console import Console

    con = Console()
    out: dict = {} if force or not path.exists() else json.loads(path.read_text())

    def save() -> None:
        path.write_text(json.dumps(out))
        _stored_tables.cache_clear()
        block_code.cache_clear()
        _voronoi_step.cache_clear()

    for b in BITS:
        for kind in ("e8", "d8dual", "d8half") if b < 8 else ("e8",):
            if f"{kind}-{b}" in out:
                continue
            t = time.time()
            out[f"{kind}-{b}"] = train_tables(kind, b, n_vectors=20_000 if b < 8 else 50_000)
            con.log(f"{kind}-{b}: {time.time() - t:.1f}s")
            save()
    for b in BITS:
        if f"e8v-{b}" in out:
            continue
        t = time.time()
        out[f"e8v-{b}"] = {"step": train_voronoi_step(b)}
        con.log(f"e8v-{b}: step {out[f'e8v-{b}']['step']:.4f} {time.time() - t:.1f}s")
        save()


if __name__ == "__main__":  # pragma: no cover
    _regenerate()
