"""FP8 e4m3 per value (``torch.float8_e4m3fn``), as vLLM's ``kv_cache_dtype="fp8"``.

* ``fp8`` — no scale, like vLLM's fp8 KV cache with the default scale 1.0: each value is
  cast to e4m3 (round to nearest even). e4m3fn has no Inf and its largest finite value is
  448, so values are clamped to ±448 first (saturation; vLLM relies on calibrated scales to
  stay in range). Magnitudes up to 2^-10 flush to zero (the smallest subnormal is 2^-9).
  Exactly 8 bits per value.
* ``fp8-scaled`` — one fp16 per-vector scale ``s = absmax(x) / 448`` (fp16-rounded; the scaled
  values are clamped to ±448 against that rounding), each ``x / s`` cast to e4m3, decode
  ``fp8 * s``. 8 + 16/D bits per value.

Code layout: the D e4m3 bytes, then (scaled only) the fp16 scale. Decoding rejects the e4m3
NaN patterns (0x7F / 0xFF), which the encoder never writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register
from .base import Codec, DecodeCost, check_codes, check_head_dim, check_vectors, fp16_bytes
from .uniform import fp16_round, read_fp16, safe_div

__all__ = ["Fp8", "E4M3_MAX", "to_e4m3"]

E4M3_MAX = 448.0


def to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """float32 [N, D] -> uint8 [N, D]: the e4m3fn bytes of ``clamp(v, ±448)``."""
    return v.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


@dataclass(frozen=True)
class Fp8(Codec):
    """FP8 e4m3. x: float [N, D] -> uint8 [N, D (+2 if scaled)] -> float32 [N, D]."""

    head_dim: int
    scaled: bool = False

    family = "fp8"

    def __post_init__(self) -> None:
        check_head_dim(self.head_dim)

    @property
    def name(self) -> str:  # type: ignore[override]
        return "fp8-scaled" if self.scaled else "fp8"

    @property
    def codec_id(self) -> int:  # type: ignore[override]
        return 502 if self.scaled else 501

    @property
    def code_bytes(self) -> int:
        return self.head_dim + (2 if self.scaled else 0)

    @property
    def decode_cost(self) -> DecodeCost:
        if self.scaled:
            return DecodeCost(2.0, 0, "convert e4m3 -> float (one instruction), multiply by the fp16 scale")
        return DecodeCost(1.0, 0, "convert e4m3 -> float (one instruction)")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [N, D] -> uint8 [N, code_bytes]."""
        y = check_vectors(x, self.head_dim)
        if not self.scaled:
            return to_e4m3(y)
        s = fp16_round(y.abs().amax(dim=1) / E4M3_MAX) if y.shape[0] else y.new_zeros(0)
        return torch.cat([to_e4m3(safe_div(y, s)), fp16_bytes(s)], dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: uint8 [N, code_bytes] -> float32 [N, D]."""
        codes = check_codes(codes, self.code_bytes)
        d = self.head_dim
        body = codes[:, :d].contiguous()
        if body.numel() and ((body & 0x7F) == 0x7F).any():
            raise ValueError("corrupt codes: e4m3 NaN pattern (0x7F/0xFF)")
        y = body.view(torch.float8_e4m3fn).float()
        if self.scaled:
            y = y * read_fp16(codes[:, d:d + 2], "scale")[:, None]
        return y


register("fp8", 501, lambda head_dim, **kw: Fp8(head_dim=head_dim, scaled=False, **kw), family="fp8",
         nominal_bits=8.0, summary="fp8 e4m3 per value, no scale (vLLM fp8 KV with scale 1.0), clamped to ±448")
register("fp8-scaled", 502, lambda head_dim, **kw: Fp8(head_dim=head_dim, scaled=True, **kw), family="fp8",
         nominal_bits=8.0, summary="fp8 e4m3 per value with a per-vector fp16 absmax/448 scale")
