r"""Switched E8 codes (``e8s-*``, ours): the companded E8 block code with two table sets, one
switch bit per group of blocks, and an 8-bit log scale, at the SAME bytes as ``e8-*``.

Pipeline for a head vector x ∈ R^D (D a multiple of 8, G = D/8 blocks):

1. rotate: y = R x (randomized Hadamard, ``e8vllm.hadamard``), as in ``e8-*``;
2. scale: s = 2^((e − 130)/10) with one byte e (10 steps per octave, s ∈ [2^-13, 2^12.5]); the
   encoder tries the 9 exponents from ⌊10·log2(0.75·RMS(y))⌋ up (scales between about 0.70 and
   1.31 times the RMS, :func:`scale_candidates`) and keeps the one with the smallest squared error;
3. code u = y / s block by block with one of two companded E8 block codes C_0, C_1 (each the
   ``e8-*`` structure: cosets D8 and D8 + ½ with the parity rule, 2^b Lloyd levels per coset,
   b bits per value); the 8 switch bits of a vector each choose the code of one group of
   ⌈G/8⌉ consecutive blocks (D = 64: one block each), the one with the smaller squared error;
4. store ``[fields (D·b/8 bytes) | switch byte | exponent byte]``: D·b/8 + 2 bytes, exactly the
   bytes of ``e8-{b}bit`` (whose last two bytes are an fp16 scale).

Why it pays: the fp16 scale spends 16 bits where 8 do as well (searched on a 7 % grid; 16 steps
per octave instead of 10 would gain about 0.03 dB, measured at 3 bits), and the freed byte gives
every block one more bit. The two codes are trained jointly
(Lloyd: encode with the switch and the scale search → each level the centroid of the values that
chose it, per code; C_0 starts at 0.8x the ``e8-*`` levels, C_1 at 1.2x), so the switch acts as
a per-block gain: C_0 covers quiet blocks finely, C_1 loud ones without overload. Measured
(Gaussian, head size 64): +0.83 / +0.95 / +0.94 dB over ``e8-{b}bit`` at 2 / 3 / 4 bits at equal
bytes (+0.51 / +0.64 / +0.64 dB at head size 128, one switch bit per two blocks); on SmolLM2's real
keys and values (per-head mean removed, 3 bits) +0.95 to +0.98 dB.

Decoding stays a table lookup: x̂_i = s · T[sw_g, c, v_i] from a 2 · 2 · 2^b table, one parity per
block as in ``e8-*``, the switch bit once per block. Tables live in ``e8s_tables.json`` beside this
file, keyed ``e8s-{b}``, trained by :func:`train_switched` (deterministic).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from . import _e8_fast, register
from .base import Codec, DecodeCost, check_codes, check_head_dim, check_vectors, pack_bits, packed_len, unpack_bits
from .e8 import BlockCode, _lloyd, block_code
from .uniform import cached_rotation

__all__ = ["E8SwitchedCodec", "SwitchedCode", "switched_code", "scale_table", "scale_candidates",
           "train_switched", "TABLES_PATH", "STEPS_PER_OCTAVE", "EXP_BIAS", "N_CANDIDATES", "BITS"]

TABLES_PATH = Path(__file__).with_name("e8s_tables.json")
BITS: tuple[int, ...] = (2, 3, 4)
STEPS_PER_OCTAVE = 10
EXP_BIAS = 130
N_CANDIDATES = 9
LOW_FACTOR = 0.75
SWITCH_BITS = 8
INF = float("inf")


@functools.lru_cache(maxsize=None)
def scale_table() -> torch.Tensor:
    """float32 [256]: the scale of each exponent byte, 2^((e − 130)/10) rounded once from float64
    (every encoder and decoder reads this table, so scales agree bit for bit everywhere)."""
    e = torch.arange(256, dtype=torch.float64)
    return torch.exp2((e - EXP_BIAS) / STEPS_PER_OCTAVE).to(torch.float32)


def scale_candidates(y: torch.Tensor) -> torch.Tensor:
    """Rotated vectors float32 [N, D] -> candidate exponent bytes int64 [N, 9] (clamped to 0..255).

    The first is ⌊10·log2(0.75·RMS)⌋ + 130 (float32, as the Triton write kernel computes it; 0 for
    a zero vector)."""
    rms = y.float().square().mean(1).sqrt()
    first = torch.floor(torch.log2(rms * LOW_FACTOR) * STEPS_PER_OCTAVE) + EXP_BIAS
    first = torch.where(rms > 0, first, torch.zeros_like(first)).clamp(0, 255 - N_CANDIDATES + 1)
    return (first.long()[:, None] + torch.arange(N_CANDIDATES, device=y.device)).clamp(0, 255)


def group_blocks(head_dim: int) -> int:
    """Blocks per switch bit: ⌈(D/8) / 8⌉ (1 for D ≤ 64, 2 for D = 128)."""
    return -(-(head_dim // 8) // SWITCH_BITS)


@dataclass(frozen=True)
class SwitchedCode:
    """Two block codes of the same bits (``codes[0]``: quiet blocks, ``codes[1]``: loud ones)."""

    codes: tuple[BlockCode, BlockCode]

    @property
    def bits(self) -> int:
        return self.codes[0].bits

    def table(self) -> torch.Tensor:
        """float32 [2, 2, 2^b]: level of (switch, coset, index) — the decoder's only table."""
        return torch.stack([c.main for c in self.codes])


def _stored() -> dict:
    return json.loads(TABLES_PATH.read_text()) if TABLES_PATH.exists() else {}


@functools.lru_cache(maxsize=None)
def switched_code(bits: int) -> SwitchedCode:
    """The trained switched code at ``bits`` (ValueError when it has no stored tables)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    entry = _stored().get(f"e8s-{bits}")
    if entry is None:
        raise ValueError(f"no trained tables for e8s-{bits} in {TABLES_PATH}; run `python -m e8vllm.codecs.e8s`")
    parity = (True, True)
    codes = tuple(BlockCode(bits, parity, torch.tensor(s, dtype=torch.float32), torch.tensor(s, dtype=torch.float32))
                  for s in entry["levels"])
    return SwitchedCode(codes)  # type: ignore[arg-type]


def encode_switched(code: SwitchedCode, y: torch.Tensor, cand: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference encoder. y float32 [N, D] rotated, cand int64 [N, F] exponent bytes ->
    (fields int64 [N, D], switch int64 [N] (bit g = code of group g), exponent int64 [N]).

    Per candidate (first strictly-best wins), per group the code with the smaller squared error
    (code 0 on ties), every block by the exact ``BlockCode.encode`` of that code."""
    n, d = y.shape
    g = d // 8
    gb = group_blocks(d)
    ng = -(-g // gb)
    table = scale_table().to(y.device)
    best_err = torch.full((n,), INF, device=y.device)
    best_fields = torch.zeros((n, d), dtype=torch.int64, device=y.device)
    best_sw = torch.zeros(n, dtype=torch.int64, device=y.device)
    best_e = torch.zeros(n, dtype=torch.int64, device=y.device)
    grp = torch.arange(g, device=y.device) // gb  # block -> group
    for j in range(cand.shape[1]):
        e = cand[:, j]
        s = table[e]
        u = (y / s[:, None]).reshape(-1, 8)
        fe = [c.encode(u) for c in code.codes]
        errs = [er.reshape(n, g) for _f, er in fe]
        ge = [torch.zeros(n, ng, device=y.device).index_add_(1, grp, er) for er in errs]  # [N, groups]
        pick = ge[1] < ge[0]  # [N, groups]
        tot = torch.where(pick, ge[1], ge[0]).sum(1) * s.square()
        pb = pick[:, grp]  # [N, G]
        fields = torch.where(pb[..., None], fe[1][0].reshape(n, g, 8), fe[0][0].reshape(n, g, 8)).reshape(n, d)
        sw = (pick.long() << torch.arange(ng, device=y.device)).sum(1)
        better = tot < best_err
        best_err = torch.where(better, tot, best_err)
        best_fields = torch.where(better[:, None], fields, best_fields)
        best_sw = torch.where(better, sw, best_sw)
        best_e = torch.where(better, e, best_e)
    return best_fields, best_sw, best_e


def _encode(code: SwitchedCode, y: torch.Tensor, cand: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`encode_switched`, compiled (numba) on CPU where available: the same codes."""
    if y.device.type == "cpu" and _e8_fast.available():
        return _e8_fast.encode_switched(code, y, cand, group_blocks(y.shape[1]))
    return encode_switched(code, y, cand)


def decode_switched(code: SwitchedCode, fields: torch.Tensor, switch: torch.Tensor, exponent: torch.Tensor
                    ) -> torch.Tensor:
    """(fields int64 [N, D], switch int64 [N], exponent int64 [N]) -> rotated vectors float32 [N, D]."""
    n, d = fields.shape
    g = d // 8
    gb = group_blocks(d)
    blocks = fields.reshape(-1, 8)
    c, v = code.codes[0].indices(blocks)  # the index rule is the same for both codes
    sw = ((switch[:, None] >> (torch.arange(g, device=fields.device) // gb)) & 1).reshape(-1)
    k = 1 << code.bits
    flat = code.table().to(fields.device).reshape(-1)
    out = flat[(sw * 2 + c)[:, None] * k + v].reshape(n, d)
    return out * scale_table().to(fields.device)[exponent][:, None]


@dataclass(frozen=True)
class E8SwitchedCodec(Codec):
    """Rotated E8 code with two table sets and an 8-bit log scale. x: float [N, D] -> uint8
    [N, D·b/8 + 2] = ``[fields | switch byte | exponent byte]``."""

    head_dim: int
    bits: int = 3
    seed: int = 0
    family = "e8"

    def __post_init__(self) -> None:
        check_head_dim(self.head_dim)
        if self.head_dim // 8 > SWITCH_BITS * 8:
            raise ValueError(f"head_dim {self.head_dim} > {SWITCH_BITS * 64}: more than 8 blocks per switch bit")
        switched_code(self.bits)  # validates bits, loads the tables
        cached_rotation(self.head_dim, self.seed)

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"e8s-{self.bits}bit"

    @property
    def codec_id(self) -> int:  # type: ignore[override]
        return 160 + self.bits

    @property
    def code(self) -> SwitchedCode:
        return switched_code(self.bits)

    @property
    def code_bytes(self) -> int:
        return packed_len(self.head_dim, self.bits) + 2

    @property
    def decode_cost(self) -> DecodeCost:
        k = 4 << self.bits
        return DecodeCost(4.0, 4 * k, f"unpack a {self.bits}-bit field, one parity and one switch bit per 8 values, "
                                      f"look up a {k}-entry float table, multiply by the scale (a 256-entry table); "
                                      "the inverse rotation is applied once to the attention output")

    def encode_rotated(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated y float32 [N, D] -> (fields int64 [N, D], switch int64 [N], exponent int64 [N])."""
        y = y.float()
        return _encode(self.code, y, scale_candidates(y))

    def decode_rotated(self, fields: torch.Tensor, switch: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
        return decode_switched(self.code, fields, switch, exponent)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [N, D] -> uint8 [N, code_bytes]."""
        y = check_vectors(x, self.head_dim)
        if y.shape[0] == 0:
            return torch.empty((0, self.code_bytes), dtype=torch.uint8, device=y.device)
        y = cached_rotation(self.head_dim, self.seed).forward(y)
        fields, sw, e = self.encode_rotated(y)
        tail = torch.stack([sw, e], 1).to(torch.uint8)
        return torch.cat([pack_bits(fields, self.bits), tail], 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: uint8 [N, code_bytes] -> float32 [N, D]."""
        codes = check_codes(codes, self.code_bytes)
        if codes.shape[0] == 0:
            return torch.empty((0, self.head_dim), dtype=torch.float32)
        nb = packed_len(self.head_dim, self.bits)
        fields = unpack_bits(codes[:, :nb], self.bits, self.head_dim)
        y = decode_switched(self.code, fields, codes[:, nb].long(), codes[:, nb + 1].long())
        return cached_rotation(self.head_dim, self.seed).inverse(y)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def train_switched(bits: int, *, n_vectors: int = 20_000, dim: int = 64, iters: int = 12, seed: int = 1234,
                   init: tuple[float, float] = (0.8, 1.2)) -> dict:
    """Joint Lloyd training of the two codes on Gaussian vectors (deterministic); JSON-able dict."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n_vectors, dim, generator=g)
    base = block_code("e8", bits, True)
    codes = tuple(BlockCode(bits, base.parity, base.main * f, base.last * f) for f in init)
    history = []
    for _ in range(iters):
        sc = SwitchedCode(codes)  # type: ignore[arg-type]
        fields, sw, e = _encode(sc, y, scale_candidates(y))
        yhat = decode_switched(sc, fields, sw, e)
        history.append(round(10 * math.log10(y.square().sum().item() / (y - yhat).square().sum().item()), 4))
        u = (y / scale_table()[e][:, None]).reshape(-1, 8)
        gb = group_blocks(dim)
        pick = ((sw[:, None] >> (torch.arange(dim // 8) // gb)) & 1).reshape(-1).bool()
        codes = tuple(_lloyd(c, u[pick == bool(k)], 1) for k, c in enumerate(codes))
    return {"kind": "e8s", "bits": bits, "levels": [c.main.tolist() for c in codes],
            "train": {"n_vectors": n_vectors, "dim": dim, "iters": iters, "seed": seed, "init": list(init),
                      "snr_db_per_iter": history}}


def _factory(bits: int):
    def make(head_dim: int, **kw) -> E8SwitchedCodec:
        return E8SwitchedCodec(head_dim=head_dim, bits=bits, **kw)
    return make


for _b in BITS:
    if f"e8s-{_b}" in _stored():
        register(f"e8s-{_b}bit", 160 + _b, _factory(_b), family="e8", nominal_bits=float(_b),
                 summary="E8 block code with two trained table sets (one switch bit per block group) and an "
                         "8-bit log scale, Hadamard rotation: the bytes of e8-*")


def _regenerate(force: bool = False) -> None:  # pragma: no cover - run by hand
    data = _stored()
    for b in BITS:
        key = f"e8s-{b}"
        if key in data and not force:
            continue
        data[key] = train_switched(b)
        TABLES_PATH.write_text(json.dumps(data, indent=1) + "\n")
        print(key, data[key]["train"]["snr_db_per_iter"])


if __name__ == "__main__":  # pragma: no cover
    import sys

    _regenerate(force="--force" in sys.argv)
