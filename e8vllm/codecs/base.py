"""The codec protocol: fixed-rate maps between head vectors and packed bytes.

A codec turns a batch of head vectors ``x`` of shape ``[N, D]`` (D = head_dim) into
``uint8`` codes of shape ``[N, code_bytes]`` and back. Everything a decoder needs that
depends on the vector (scales, offsets) is inside those bytes; what is shared by all
vectors (rotation seed, lattice, tables, trained codebooks) is codec state. So the
storage cost is exactly ``bits_per_value = code_bytes * 8 / D`` bits per value.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch

__all__ = ["Codec", "DecodeCost", "check_vectors", "check_codes"]


@dataclass(frozen=True)
class DecodeCost:
    """What a decoder does per value read (the budget of the fused GPU attention kernel).

    ops_per_value: integer/float operations per decoded value (unpack, table index,
        sign, scale), counted on the decode path of ``decode`` as written for a kernel.
    table_bytes: size of the lookup tables the decoder reads (0: pure arithmetic).
    note: one line saying what the decoder does.
    """

    ops_per_value: float
    table_bytes: int
    note: str


class Codec(abc.ABC):
    """Base class of every codec. Subclasses are frozen dataclasses with a ``head_dim`` field.

    Class attributes a subclass sets: ``name`` (registry name, e.g. ``"e8-4bit"``),
    ``codec_id`` (stable numeric id, stored with data), ``family``.
    """

    name: str = ""
    codec_id: int = -1
    family: str = ""
    head_dim: int
    #: True when the codec must be fitted on training vectors (``fit``) before use.
    needs_training: bool = False

    # ---- sizes -------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def code_bytes(self) -> int:
        """Bytes per encoded vector, everything included (codes, scales)."""

    @property
    def bits_per_value(self) -> float:
        return self.code_bytes * 8 / self.head_dim

    # ---- the maps ----------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [N, D] (float32/float16/bfloat16) -> uint8 [N, code_bytes]."""

    @abc.abstractmethod
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: uint8 [N, code_bytes] -> float32 [N, D]."""

    @property
    @abc.abstractmethod
    def decode_cost(self) -> DecodeCost:
        """Per-value work of the decoder (see :class:`DecodeCost`)."""

    def fit(self, x: torch.Tensor) -> "Codec":  # pragma: no cover - trivial default
        """Train on vectors [N, D] held apart from test data. Default: nothing to learn."""
        return self

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)) as float32 [N, D]."""
        return self.decode(self.encode(x))

    def describe(self) -> dict:
        return {
            "name": self.name,
            "id": self.codec_id,
            "family": self.family,
            "head_dim": self.head_dim,
            "code_bytes": self.code_bytes,
            "bits_per_value": self.bits_per_value,
            "decode_ops_per_value": self.decode_cost.ops_per_value,
            "decode_table_bytes": self.decode_cost.table_bytes,
            "decode_note": self.decode_cost.note,
        }


def check_vectors(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Validate encoder input; return it as contiguous float32 [N, D].

    Raises ValueError (never silent garbage) for: a non-tensor, a wrong rank or last
    dimension, a non-floating dtype, NaN or Inf values.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor of shape [N, {head_dim}], got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != head_dim:
        raise ValueError(f"expected shape [N, {head_dim}], got {list(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected a floating-point tensor, got {x.dtype}")
    xf = x.float().contiguous()
    if xf.numel() and not torch.isfinite(xf).all():
        bad = (~torch.isfinite(xf)).any(dim=1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"input has NaN or Inf values (rows {bad}...)")
    return xf


def check_codes(codes: torch.Tensor, code_bytes: int) -> torch.Tensor:
    """Validate decoder input: uint8 [N, code_bytes]."""
    if not isinstance(codes, torch.Tensor):
        raise ValueError(f"expected a uint8 tensor [N, {code_bytes}], got {type(codes).__name__}")
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    if codes.dim() != 2 or codes.shape[1] != code_bytes:
        raise ValueError(f"expected codes of shape [N, {code_bytes}], got {list(codes.shape)}")
    return codes.contiguous()


def check_head_dim(head_dim: int, supported: tuple[int, ...] | None = None, multiple: int = 8) -> None:
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    if supported is not None and head_dim not in supported:
        raise ValueError(f"head_dim {head_dim} not supported (supported: {sorted(supported)})")
    if head_dim % multiple:
        raise ValueError(f"head_dim {head_dim} must be a multiple of {multiple}")


# ---- byte packing helpers shared by codecs -------------------------------------------

def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ints < 2**bits, int tensor [N, M] -> uint8 [N, ceil(M*bits/8)].

    Little-endian bit order: value j occupies bits [j*bits, (j+1)*bits) of the stream.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    n, m = values.shape
    v = values.to(torch.int64)
    shifts = torch.arange(bits, device=v.device)
    bitstream = ((v.unsqueeze(-1) >> shifts) & 1).reshape(n, m * bits)
    pad = (-bitstream.shape[1]) % 8
    if pad:
        bitstream = torch.nn.functional.pad(bitstream, (0, pad))
    weights = (1 << torch.arange(8, device=v.device))
    return (bitstream.reshape(n, -1, 8) * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, m: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 [N, B] -> int64 [N, m]."""
    n = packed.shape[0]
    p = packed.to(torch.int64)
    bitstream = ((p.unsqueeze(-1) >> torch.arange(8, device=p.device)) & 1).reshape(n, -1)
    bitstream = bitstream[:, : m * bits].reshape(n, m, bits)
    return (bitstream << torch.arange(bits, device=p.device)).sum(-1)


def packed_len(m: int, bits: int) -> int:
    return math.ceil(m * bits / 8)


def fp16_bytes(s: torch.Tensor) -> torch.Tensor:
    """float [N] -> uint8 [N, 2] (IEEE half, little-endian)."""
    return s.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def bytes_fp16(b: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 2] -> float32 [N]."""
    return b.contiguous().view(torch.float16).reshape(-1).float()
