"""Uniform INT-b per-vector scalar quantizers: the baselines vLLM / KIVI-style int KV caches use.

Two flavours, each plain and after the randomized Hadamard rotation (``-rot``: encode
rotates with ``e8vllm.hadamard.rotation(D, seed)``, decode rotates back):

* ``int{b}`` / ``int{b}-rot`` — asymmetric min/max. Per vector an fp16 ``zero = min(x)`` and
  an fp16 ``scale = (max(x) - zero) / (2^b - 1)``; ``q = round((x - zero) / scale)`` clamped
  to 0..2^b-1, ``x̂ = zero + q * scale``. Cost: ``b + 32/D`` bits per value.
* ``int{b}-sym`` / ``int{b}-sym-rot`` — symmetric mid-rise with one fp16 step per vector (the
  same 16 bits of side information as the E8 codecs): 2^b levels ``(k + 1/2) * step`` for
  k = -2^(b-1) .. 2^(b-1)-1 (b=4: k in -8..7). The step is the best of ``n_clip`` candidates:
  the largest level is set to ``f * absmax(x)`` for f in ``linspace(0.5, 1, n_clip)`` and
  per vector the f with the smallest squared error (measured with the fp16-rounded step
  actually stored; ties -> the smallest f) wins. This is the "best uniform INT-b" baseline.
  Cost: ``b + 16/D`` bits per value.

Code layout (uint8 ``[N, code_bytes]``): ``pack_bits(q, b)`` (``D*b/8`` bytes), then the fp16
scale, then (asymmetric only) the fp16 zero. Values beyond the fp16 range (|x| > 65504)
saturate the scale/zero: KV caches are fp16/bf16 activations, far inside that range.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from e8vllm.hadamard import HadamardRotation, rotation

from . import register
from .base import (Codec, DecodeCost, bytes_fp16, check_codes, check_head_dim, check_vectors,
                   fp16_bytes, pack_bits, packed_len, unpack_bits)

__all__ = ["UniformInt", "fp16_round", "read_fp16", "cached_rotation", "BITS"]

BITS: tuple[int, ...] = (2, 3, 4, 8)
FP16_MAX = 65504.0


def fp16_round(s: torch.Tensor) -> torch.Tensor:
    """float [...] -> float32 [...], each value saturated to ±65504 and rounded to fp16."""
    return s.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).float()


def read_fp16(b: torch.Tensor, what: str) -> torch.Tensor:
    """uint8 [N, 2] -> float32 [N]; ValueError when a stored scale is NaN/Inf (corrupt codes)."""
    s = bytes_fp16(b)
    if s.numel() and not torch.isfinite(s).all():
        raise ValueError(f"corrupt codes: the stored {what} is NaN or Inf")
    return s


@functools.lru_cache(maxsize=None)
def cached_rotation(head_dim: int, seed: int) -> HadamardRotation:
    """The shared Hadamard rotation (ValueError for an unsupported head_dim)."""
    return rotation(head_dim, seed=seed)


def safe_div(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [N, D] / s [N] with s == 0 treated as 1 (all-zero or underflowed vectors)."""
    return x / torch.where(s > 0, s, torch.ones_like(s))[:, None]


@dataclass(frozen=True)
class UniformInt(Codec):
    """Uniform INT-b per vector. x: float [N, D] -> uint8 [N, code_bytes] -> float32 [N, D]."""

    head_dim: int
    bits: int = 4
    symmetric: bool = False
    rotate: bool = False
    seed: int = 0
    n_clip: int = 16

    family = "uniform"

    def __post_init__(self) -> None:
        check_head_dim(self.head_dim)
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits!r}")
        if not isinstance(self.n_clip, int) or self.n_clip < 1:
            raise ValueError(f"n_clip must be a positive int, got {self.n_clip!r}")
        if self.rotate:
            cached_rotation(self.head_dim, self.seed)

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"int{self.bits}" + ("-sym" if self.symmetric else "") + ("-rot" if self.rotate else "")

    @property
    def codec_id(self) -> int:  # type: ignore[override]
        return 300 + self.bits + 10 * self.rotate + 20 * self.symmetric

    @property
    def code_bytes(self) -> int:
        return packed_len(self.head_dim, self.bits) + (2 if self.symmetric else 4)

    @property
    def decode_cost(self) -> DecodeCost:
        f = "x = (q - 2^(b-1) + 1/2) * step" if self.symmetric else "x = zero + q * scale"
        rot = "; the rotation is applied once to q / the output, not per value" if self.rotate else ""
        return DecodeCost(3.0, 0, f"unpack a {self.bits}-bit q (shift, mask); {f}{rot}")

    # ---- quantizers on (rotated) float32 [N, D] ----------------------------------
    def _sym_index(self, y: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """Signed level index k in -2^(b-1)..2^(b-1)-1 of each value (integral float32 [N, D])."""
        half = 1 << (self.bits - 1)
        return torch.floor(safe_div(y, step)).clamp_(-half, half - 1)

    def _encode_sym(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (unsigned level index int64 [N, D], fp16-exact step float32 [N])."""
        half = 1 << (self.bits - 1)
        amax = y.abs().amax(dim=1)
        best_err = torch.full_like(amax, float("inf"))
        best_step = torch.zeros_like(amax)
        for f in torch.linspace(0.5, 1.0, self.n_clip, dtype=torch.float64).tolist():
            step = fp16_round(amax * (f / (half - 0.5)))
            k = self._sym_index(y, step)
            err = (y - (k + 0.5) * step[:, None]).square().sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_step = torch.where(better, step, best_step)
        return (self._sym_index(y, best_step) + half).long(), best_step

    def _encode_asym(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (q int64 [N, D] in 0..2^b-1, scale [N], zero [N]) with fp16-exact scale/zero."""
        top = (1 << self.bits) - 1
        zero = fp16_round(y.amin(dim=1))
        scale = fp16_round((y.amax(dim=1) - zero) / top)
        q = torch.round(safe_div(y - zero[:, None], scale)).clamp(0, top).long()
        return q, scale, zero

    # ---- the maps -----------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [N, D] -> uint8 [N, code_bytes]."""
        y = check_vectors(x, self.head_dim)
        if y.shape[0] == 0:
            return torch.empty((0, self.code_bytes), dtype=torch.uint8)
        if self.rotate:
            y = cached_rotation(self.head_dim, self.seed).forward(y)
        if self.symmetric:
            q, step = self._encode_sym(y)
            return torch.cat([pack_bits(q, self.bits), fp16_bytes(step)], dim=1)
        q, scale, zero = self._encode_asym(y)
        return torch.cat([pack_bits(q, self.bits), fp16_bytes(scale), fp16_bytes(zero)], dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: uint8 [N, code_bytes] -> float32 [N, D]."""
        codes = check_codes(codes, self.code_bytes)
        n, d = codes.shape[0], self.head_dim
        if n == 0:
            return torch.empty((0, d), dtype=torch.float32)
        nb = packed_len(d, self.bits)
        q = unpack_bits(codes[:, :nb], self.bits, d).float()
        scale = read_fp16(codes[:, nb:nb + 2], "scale")
        if self.symmetric:
            y = (q - ((1 << (self.bits - 1)) - 0.5)) * scale[:, None]
        else:
            y = read_fp16(codes[:, nb + 2:nb + 4], "zero point")[:, None] + q * scale[:, None]
        if self.rotate:
            y = cached_rotation(self.head_dim, self.seed).inverse(y)
        return y


def _factory(bits: int, symmetric: bool, rotate: bool):
    def make(head_dim: int, **kw) -> UniformInt:
        return UniformInt(head_dim=head_dim, bits=bits, symmetric=symmetric, rotate=rotate, **kw)
    return make


for _b in BITS:
    for _sym in (False, True):
        for _rot in (False, True):
            _c = UniformInt(head_dim=64, bits=_b, symmetric=_sym, rotate=_rot)
            _kind = "symmetric mid-rise, MSE-best clip, fp16 step" if _sym else "asymmetric min/max, fp16 scale + zero"
            register(_c.name, _c.codec_id, _factory(_b, _sym, _rot), family="uniform", nominal_bits=float(_b),
                     summary=f"uniform INT{_b} per vector, {_kind}" + (", after Hadamard rotation" if _rot else ""))
del _b, _sym, _rot, _c, _kind
