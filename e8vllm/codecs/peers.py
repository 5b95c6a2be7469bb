r"""Peer codecs: the E8 KV quantizers of two PyPI projects, wrapped (not re-implemented).

Each wrapper calls the peer's own quantizer, stores what the peer needs to decode as
bit-packed fixed-size indices plus the scales in the dtype the peer reconstructs with, and
decodes to exactly (``torch.equal``) what the peer's own quantize -> dequantize returns on the
same input. ``code_bytes`` is therefore the honest fixed-rate cost of each peer, everything
included, without entropy coding. If a peer cannot be imported, nothing is registered for
it and :data:`UNAVAILABLE` says why (importing this module never fails).

nexusquant-kv (``nexusquant-e8-{2,3,4}bit``, ids 700-702)
---------------------------------------------------------
Its quant-only KV path (``NexusQuantQuantOnly``, value branch; the key branch also removes
RoPE first, which needs token positions a codec does not have; no token eviction):
``y = x @ H`` with its ``hadamard_matrix(D)`` (orthonormal Walsh-Hadamard, not randomized),
then ``E8Lattice.quantize_perhead(y, levels=2^b)``: one scale per vector
``sc = max|y| / (levels/2)`` (float32: the pipeline quantizes ``k.float()``), each 8-block of
``y / sc`` goes to ``E8Lattice.nearest_point`` — D8 for the integer candidate, the
half-integer candidate *without* a parity rule (D8 ∪ (Z^8+½), not a lattice) — then clamped
to ``[-h, h]`` (h = levels/2) and multiplied back by ``sc``; the output is ``(...) @ H^T``.

Points it can output, per block in units of ``sc`` (all checked at encode time):
  * half region: every coordinate in {-h+½, ..., h-½} ∪ {h} (h appears when a coordinate is
    exactly +h, i.e. the vector's max, whose half candidate h+½ is clamped back to h);
    ``(L+1)^8`` codes (L = levels);
  * integer region, even sum: ``{-h..h}^8`` ∩ D8, ranked as (base-(L+1) number) / 2 (the
    base is odd, so the number's parity is the coordinate sum's);
  * integer region, odd sum: only when all 8 scaled inputs are exact integers, the first
    coordinate equals h and the parity fix pushed it to h+1, then clamped back;
    ``((L+1)^7 - 1)/2`` codes.
So a block needs ``ceil(log2((L+1)^8 + ((L+1)^8+1)/2 + ((L+1)^7-1)/2))`` bits: 20 / 26 / 34
for b = 2 / 3 / 4 (the minimal fixed length for this point set), and each vector adds its
float32 scale: bits per value = 20/8, 26/8, 34/8 + 32/D (D=128: 2.75 / 3.5 / 4.5).
nexusquant's own accounting counts 16 bits for the scale (fp16) and entropy-codes the int8
coordinates with zstd; its quantizer however reconstructs with the float32 scale, which is
what an exact decode needs. Decode: identical arithmetic on the unpacked values
(``q * sc`` in float32, then ``einsum(..., H)`` as the peer's pipeline does).

glq (``glq-e8-{2..7}bit``, ids 703-708)
---------------------------------------
``glq.kv_e8.E8KVQuantizer`` with the relaxed E8 codebook (``E8RelaxedCodebook``, D̃8 =
Z^8 ∪ (Z^8+½), the default KV codebook of glq) at ``target_size=4096`` entries, the
default of glq's vLLM KV path (``glq_vllm.kv_compression``; its HF cache path uses 65,536).
Per 8-group: 8x8 Walsh-Hadamard, scale = max|.| of the group (stored fp16, the dequantizer
multiplies by the fp16 value), nearest codeword of ``x / scale``, then residual stages: its
"bpw" b is (n_primary, n_secondary) = (1,0) (1,1) (2,0) (2,1) (3,0) (3,1) for b = 2..7
(primary stage: 4096-entry codebook, residual scaled by the codebook's ``resid_scale``;
secondary: ``make_small()``, 256 entries). glq stores int16 / uint8 indices; the fixed-size
cost is 12 bits per primary index (4096 entries) and 8 per secondary index, plus the fp16
scale per group: bits per value = 1.5 n_primary + n_secondary + 2 (b=2: 3.5, b=4: 5.0).
Decode: glq's own ``E8KVQuantizer.dequantize`` on the unpacked indices and scales.
The codebook's ``resid_scale`` is calibrated by glq on random samples from torch's global
generator; we build it under a fixed seed (``torch.random.fork_rng``) so it is reproducible,
and :meth:`GlqE8.describe` reports a fingerprint of the codebook (glq orders entries with an
unstable argsort, so codes are portable only between identical glq/torch builds).
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch

from . import register
from .base import Codec, DecodeCost, check_codes, check_head_dim, check_vectors, pack_bits, unpack_bits

__all__ = ["UNAVAILABLE", "PEER_VERSIONS", "INSTALL", "NexusQuantE8", "GlqE8", "NQ_BITS", "GLQ_BPW",
           "GLQ_TARGET_SIZE"]

#: peer -> why it is not available (the benchmark prints this).
UNAVAILABLE: dict[str, str] = {}
#: peer -> installed version (for the available ones).
PEER_VERSIONS: dict[str, str] = {}
#: peer -> the pip command that installs it beside torch 2.13 (no dependency changes).
INSTALL: dict[str, str] = {
    "nexusquant-kv": "pip install --no-deps nexusquant-kv==0.6.3 zstandard==0.25.0",
    "glq": "pip install --no-deps glq==0.8.16",
}

NQ_BITS: tuple[int, ...] = (2, 3, 4)
#: glq "bpw" setting -> (primary 4096-entry stages, secondary 256-entry stages)
GLQ_BPW: dict[int, tuple[int, int]] = {2: (1, 0), 3: (1, 1), 4: (2, 0), 5: (2, 1), 6: (3, 0), 7: (3, 1)}
GLQ_TARGET_SIZE = 4096
GLQ_METHOD = "e8_relaxed"
GLQ_SEED = 0


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def _why(dist: str, e: BaseException) -> str:
    return f"cannot import {dist} ({type(e).__name__}: {e}); install: {INSTALL[dist]}"


# ---- lazy, failure-tolerant imports of the peers ---------------------------------------

_nq: dict[str, Any] = {}
try:
    from nexusquant.core.e8_lattice import E8Lattice as _E8Lattice  # noqa: N812
    from nexusquant.core.hadamard import hadamard_matrix as _nq_hadamard_matrix

    _nq.update(E8Lattice=_E8Lattice, hadamard_matrix=_nq_hadamard_matrix)
    PEER_VERSIONS["nexusquant-kv"] = _version("nexusquant-kv")
except Exception as _e:  # ImportError, or a peer that breaks on import beside our torch
    UNAVAILABLE["nexusquant-kv"] = _why("nexusquant-kv", _e)

_glq: dict[str, Any] = {}
try:
    from glq.codebook_relaxed import E8RelaxedCodebook as _E8RelaxedCodebook
    from glq.kv_e8 import E8KVQuantizer as _E8KVQuantizer

    _glq.update(E8RelaxedCodebook=_E8RelaxedCodebook, E8KVQuantizer=_E8KVQuantizer)
    PEER_VERSIONS["glq"] = _version("glq")
except Exception as _e:
    UNAVAILABLE["glq"] = _why("glq", _e)


# ---- bit fields ----------------------------------------------------------------------

def _pack_fields(fields: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """[(int64 [N, m_k] values < 2^w_k, w_k), ...] -> uint8 [N, ceil(sum m_k w_k / 8)], little-endian bits."""
    bits = []
    for v, w in fields:
        shifts = torch.arange(w, dtype=torch.int64)
        bits.append(((v.to(torch.int64).unsqueeze(-1) >> shifts) & 1).reshape(v.shape[0], -1))
    return pack_bits(torch.cat(bits, dim=1), 1)


def _unpack_fields(packed: torch.Tensor, layout: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Inverse of :func:`_pack_fields` for ``layout = [(m_k, w_k), ...]``."""
    total = sum(m * w for m, w in layout)
    bits = unpack_bits(packed, 1, total)
    out, pos = [], 0
    for m, w in layout:
        b = bits[:, pos:pos + m * w].reshape(-1, m, w)
        out.append((b << torch.arange(w, dtype=torch.int64)).sum(-1))
        pos += m * w
    return out


def _packed_bytes(layout: list[tuple[int, int]]) -> int:
    return math.ceil(sum(m * w for m, w in layout) / 8)


# ---- nexusquant-kv ---------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _nq_space(levels: int) -> tuple[int, int, int, int]:
    """(B, size of the half region, size of the even-integer region, bits per block)."""
    base = levels + 1
    n_half = base**8
    n_even = (base**8 + 1) // 2
    n_odd = (base**7 - 1) // 2
    return base, n_half, n_even, (n_half + n_even + n_odd - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _nq_matrix(head_dim: int) -> torch.Tensor:
    return _nq["hadamard_matrix"](head_dim).float()


def _nq_rank(q2: torch.Tensor, levels: int) -> torch.Tensor:
    """Doubled lattice coordinates int64 [K, 8] (in units of sc/2) -> block code int64 [K]."""
    base, n_half, n_even, _ = _nq_space(levels)
    powers = base ** torch.arange(8, dtype=torch.int64)
    odd_coord = torch.remainder(q2, 2) == 1
    is_int = ~odd_coord.any(dim=1)
    # half region: digit L for a clamped +h, else (2q + L - 1)/2 in 0..L-1
    e = torch.where(q2 == levels, torch.full_like(q2, levels), torch.div(q2 + levels - 1, 2, rounding_mode="floor"))
    ok_half = (odd_coord | (q2 == levels)).all(dim=1) & (e >= 0).all(dim=1) & (e <= levels).all(dim=1)
    code_half = (e * powers).sum(dim=1)
    # integer regions: digits q + h in 0..L
    d = torch.div(q2, 2, rounding_mode="floor") + levels // 2
    n = (d * powers).sum(dim=1)
    ok_int = (d >= 0).all(dim=1) & (d <= levels).all(dim=1)
    even = torch.remainder(n, 2) == 0
    m = torch.div(n - levels, base, rounding_mode="floor")
    ok_odd = d[:, 0] == levels
    code_even = n_half + torch.div(n, 2, rounding_mode="floor")
    code_odd = n_half + n_even + torch.div(m, 2, rounding_mode="floor")
    code = torch.where(is_int, torch.where(even, code_even, code_odd), code_half)
    valid = torch.where(is_int, ok_int & (even | ok_odd), ok_half)
    if not bool(valid.all()):
        bad = q2[~valid][:3].tolist()
        raise RuntimeError(f"nexusquant-kv produced lattice points outside the code space, e.g. 2q = {bad} "
                           f"(levels={levels}); this wrapper does not cover this version of the peer")
    return code


def _nq_unrank(code: torch.Tensor, levels: int) -> torch.Tensor:
    """Block code int64 [K] -> doubled lattice coordinates int64 [K, 8]."""
    base, n_half, n_even, _ = _nq_space(levels)
    powers = base ** torch.arange(8, dtype=torch.int64)
    r_half = code < n_half
    r_even = (code >= n_half) & (code < n_half + n_even)
    n = torch.where(r_half, code,
                    torch.where(r_even, 2 * (code - n_half), levels + base * (2 * (code - n_half - n_even) + 1)))
    dig = torch.remainder(torch.div(n.unsqueeze(1), powers, rounding_mode="floor"), base)
    half = torch.where(dig == levels, torch.full_like(dig, levels), 2 * dig - levels + 1)
    return torch.where(r_half.unsqueeze(1), half, 2 * dig - levels)


@dataclass(frozen=True)
class NexusQuantE8(Codec):
    """nexusquant-kv's quant-only E8 path. x: float [N, D] -> uint8 [N, code_bytes] -> float32 [N, D].

    ``hadamard=False`` drops the peer's Hadamard rotation (its bare ``quantize_perhead``):
    for ablations only, the registered codecs use the rotation.
    """

    head_dim: int
    bits: int = 3
    hadamard: bool = True

    family = "peer"

    def __post_init__(self) -> None:
        if "nexusquant-kv" in UNAVAILABLE:
            raise RuntimeError(UNAVAILABLE["nexusquant-kv"])
        check_head_dim(self.head_dim)
        if self.bits not in NQ_BITS:
            raise ValueError(f"bits must be one of {NQ_BITS}, got {self.bits!r}")
        if self.hadamard and self.head_dim & (self.head_dim - 1):
            raise ValueError(f"head_dim {self.head_dim} not supported: nexusquant's Hadamard needs a power of 2")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"nexusquant-e8-{self.bits}bit" + ("" if self.hadamard else "-norot")

    @property
    def codec_id(self) -> int:  # type: ignore[override]
        return 698 + self.bits

    @property
    def levels(self) -> int:
        return 2**self.bits

    @property
    def block_bits(self) -> int:
        return _nq_space(self.levels)[3]

    @property
    def _layout(self) -> list[tuple[int, int]]:
        return [(self.head_dim // 8, self.block_bits)]

    @property
    def code_bytes(self) -> int:
        return _packed_bytes(self._layout) + 4

    @property
    def decode_cost(self) -> DecodeCost:
        return DecodeCost(6.0, 0, f"unpack a {self.block_bits}-bit block code, region test, 8 base-{self.levels + 1} "
                                  "digits (div, mod), offset, float32 scale; inverse Hadamard once per vector")

    def describe(self) -> dict:
        return {**super().describe(), "peer": f"nexusquant-kv {PEER_VERSIONS.get('nexusquant-kv', '?')}"}

    def peer_roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """The peer's own quantize -> dequantize on float32 [N, D] (the reference of the wrapper)."""
        y = x.float()
        if self.hadamard:
            h = _nq_matrix(self.head_dim)
            y = torch.einsum("nd,de->ne", y, h)
        q = _nq["E8Lattice"].quantize_perhead(y, levels=self.levels)
        if self.hadamard:
            q = torch.einsum("nd,ed->ne", q, h)
        return q

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [N, D] -> uint8 [N, code_bytes]."""
        xf = check_vectors(x, self.head_dim).cpu()
        n = xf.shape[0]
        if n == 0:
            return torch.empty((0, self.code_bytes), dtype=torch.uint8, device=x.device)
        y = torch.einsum("nd,de->ne", xf, _nq_matrix(self.head_dim)) if self.hadamard else xf
        qv = _nq["E8Lattice"].quantize_perhead(y, levels=self.levels)   # the peer's quantizer
        # its scale, recomputed exactly as quantize_perhead does (float32)
        amax = y.abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(y.dtype).tiny)
        sc = amax / (self.levels / 2)
        q2 = torch.round(qv / sc * 2)
        if not torch.equal(q2 / 2 * sc, qv):
            raise RuntimeError("nexusquant-kv output is not (half-integer point) * scale; wrapper out of date")
        code = _nq_rank(q2.long().reshape(-1, 8), self.levels).reshape(n, -1)
        packed = _pack_fields([(code, self.block_bits)])
        return torch.cat([packed, sc.reshape(n, 1).contiguous().view(torch.uint8)], dim=1).to(x.device)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: uint8 [N, code_bytes] -> float32 [N, D]."""
        codes = check_codes(codes, self.code_bytes)
        dev, codes = codes.device, codes.cpu()
        n = codes.shape[0]
        if n == 0:
            return torch.empty((0, self.head_dim), dtype=torch.float32, device=dev)
        nb = _packed_bytes(self._layout)
        (code,) = _unpack_fields(codes[:, :nb], self._layout)
        _, n_half, n_even, _ = _nq_space(self.levels)
        if bool((code >= n_half + n_even + (((self.levels + 1) ** 7 - 1) // 2)).any()):
            raise ValueError("corrupt codes: block code out of range")
        sc = codes[:, nb:nb + 4].contiguous().view(torch.float32)        # [N, 1]
        if not bool(torch.isfinite(sc).all()):
            raise ValueError("corrupt codes: the stored scale is NaN or Inf")
        q = _nq_unrank(code.reshape(-1), self.levels).reshape(n, self.head_dim).float() / 2
        y = q * sc                                                         # = quantize_perhead's (q * sc)
        if self.hadamard:
            y = torch.einsum("nd,ed->ne", y, _nq_matrix(self.head_dim))
        return y.to(dev)


# ---- glq -----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _glq_codebooks(target_size: int = GLQ_TARGET_SIZE) -> tuple[Any, Any]:
    """(primary, secondary) glq relaxed codebooks on CPU, built by glq under a fixed seed.

    Same construction as glq's ``kv_cache._get_codebook("e8_relaxed", target_size=...)`` and
    ``make_small()``; its calibration draws from torch's generator, which we fork and seed.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(GLQ_SEED)
        cb = _glq["E8RelaxedCodebook"](device="cpu", verbose=False, target_size=target_size)
        small = cb.make_small()
    return cb, small


@functools.lru_cache(maxsize=None)
def _glq_quantizer(bpw: int, target_size: int = GLQ_TARGET_SIZE) -> Any:
    n_primary, n_secondary = GLQ_BPW[bpw]
    cb, small = _glq_codebooks(target_size)
    return _glq["E8KVQuantizer"](cb, n_stages=n_primary, secondary_codebook=small if n_secondary else None,
                                 secondary_stages=n_secondary)


@dataclass(frozen=True)
class GlqE8(Codec):
    """glq's E8KVQuantizer (relaxed codebook). x: float [N, D] -> uint8 [N, code_bytes] -> float32 [N, D]."""

    head_dim: int
    bpw: int = 2
    target_size: int = GLQ_TARGET_SIZE

    family = "peer"

    def __post_init__(self) -> None:
        if "glq" in UNAVAILABLE:
            raise RuntimeError(UNAVAILABLE["glq"])
        check_head_dim(self.head_dim)
        if self.bpw not in GLQ_BPW:
            raise ValueError(f"bpw must be one of {tuple(GLQ_BPW)}, got {self.bpw!r}")
        if not isinstance(self.target_size, int) or not 256 <= self.target_size <= 65536:
            raise ValueError(f"target_size must be an int in 256..65536, got {self.target_size!r}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"glq-e8-{self.bpw}bit" + ("" if self.target_size == GLQ_TARGET_SIZE else f"-cb{self.target_size}")

    @property
    def codec_id(self) -> int:  # type: ignore[override]
        return 701 + self.bpw

    @property
    def quantizer(self) -> Any:
        """glq's own ``E8KVQuantizer`` this codec wraps (shared, built on first use)."""
        return _glq_quantizer(self.bpw, self.target_size)

    @property
    def index_bits(self) -> tuple[int, int]:
        """(bits per primary index, bits per secondary index): fixed size for the codebook sizes."""
        return (self.target_size - 1).bit_length(), 8

    @property
    def _keys(self) -> list[str]:
        n_primary, n_secondary = GLQ_BPW[self.bpw]
        return ["idx1", "idx2", "idx3"][:n_primary] + [f"idx_s{k}" for k in range(1, n_secondary + 1)]

    @property
    def _layout(self) -> list[tuple[int, int]]:
        g = self.head_dim // 8
        ib, sb = self.index_bits
        return [(g, sb if k.startswith("idx_s") else ib) for k in self._keys]

    @property
    def code_bytes(self) -> int:
        return _packed_bytes(self._layout) + 2 * (self.head_dim // 8)

    @property
    def decode_cost(self) -> DecodeCost:
        n_primary, n_secondary = GLQ_BPW[self.bpw]
        stages = n_primary + n_secondary
        table = self.target_size * 8 * 4 + (256 * 8 * 4 if n_secondary else 0)
        return DecodeCost(2.0 * stages + 4.0, table,
                          f"per 8-group: {stages} codebook lookups (float32 tables) added with the residual "
                          "scale, times the fp16 group scale, then an 8x8 Hadamard (3 butterflies per value)")

    def describe(self) -> dict:
        cb, _ = _glq_codebooks(self.target_size)
        fp = hashlib.sha256(cb.codebook.numpy().tobytes()).hexdigest()[:16]
        return {**super().describe(), "peer": f"glq {PEER_VERSIONS.get('glq', '?')}",
                "codebook": f"{GLQ_METHOD}, {self.target_size} entries, resid_scale={cb.resid_scale}, sha256 {fp}"}

    def peer_roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """glq's own quantize -> dequantize on float32 [N, D] (the reference of the wrapper)."""
        q = self.quantizer
        return q.dequantize(q.quantize(x.float()))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [N, D] -> uint8 [N, code_bytes]."""
        xf = check_vectors(x, self.head_dim).cpu()
        n = xf.shape[0]
        if n == 0:
            return torch.empty((0, self.code_bytes), dtype=torch.uint8, device=x.device)
        qt = self.quantizer.quantize(xf)                                   # glq's quantizer
        fields = []
        for k, (_, w) in zip(self._keys, self._layout):
            v = qt[k].to(torch.int64) & 0xFFFF                             # int16 storage -> unsigned index
            if bool((v >> w).any()):
                raise RuntimeError(f"glq index {k} does not fit {w} bits; wrapper out of date")
            fields.append((v, w))
        if set(k for k in qt if k.startswith("idx")) != set(self._keys):
            raise RuntimeError(f"glq returned fields {sorted(qt)}, expected {self._keys}; wrapper out of date")
        scale = qt["scale"].to(torch.float16).reshape(n, -1).contiguous().view(torch.uint8)
        return torch.cat([_pack_fields(fields), scale], dim=1).to(x.device)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: uint8 [N, code_bytes] -> float32 [N, D] via glq's ``dequantize``."""
        codes = check_codes(codes, self.code_bytes)
        dev, codes = codes.device, codes.cpu()
        n, g = codes.shape[0], self.head_dim // 8
        if n == 0:
            return torch.empty((0, self.head_dim), dtype=torch.float32, device=dev)
        nb = _packed_bytes(self._layout)
        vals = _unpack_fields(codes[:, :nb], self._layout)
        qt: dict[str, Any] = {"shape": (n, self.head_dim), "dtype": torch.float32,
                              "scale": codes[:, nb:].contiguous().view(torch.float16)}
        for k, v in zip(self._keys, vals):
            if k.startswith("idx_s"):
                qt[k] = v.to(torch.uint8)
            else:
                if bool((v >= self.quantizer.codebook.codebook.shape[0]).any()):
                    raise ValueError("corrupt codes: codebook index out of range")
                qt[k] = v.to(torch.int16)                                  # as glq stores it
        return self.quantizer.dequantize(qt).float().to(dev)


# ---- registration ----------------------------------------------------------------------

def _nq_factory(bits: int):
    def make(head_dim: int, **kw) -> NexusQuantE8:
        return NexusQuantE8(head_dim=head_dim, bits=bits, **kw)
    return make


def _glq_factory(bpw: int):
    def make(head_dim: int, **kw) -> GlqE8:
        return GlqE8(head_dim=head_dim, bpw=bpw, **kw)
    return make


if "nexusquant-kv" not in UNAVAILABLE:
    for _b in NQ_BITS:
        _bb = _nq_space(2**_b)[3]
        register(f"nexusquant-e8-{_b}bit", 698 + _b, _nq_factory(_b), family="peer", nominal_bits=float(_b),
                 summary=f"nexusquant-kv {PEER_VERSIONS['nexusquant-kv']} quant-only: Hadamard, D8 ∪ (Z^8+½) "
                         f"(levels={2**_b}), fp32 per-vector scale; {_bb} bits per 8 values + 32/D")

if "glq" not in UNAVAILABLE:
    for _b, (_np, _ns) in GLQ_BPW.items():
        register(f"glq-e8-{_b}bit", 701 + _b, _glq_factory(_b), family="peer", nominal_bits=float(_b),
                 summary=f"glq {PEER_VERSIONS['glq']} E8KVQuantizer, relaxed E8 codebook {GLQ_TARGET_SIZE} entries, "
                         f"{_np} primary + {_ns} secondary stages, fp16 scale per 8 values; "
                         f"{1.5 * _np + _ns + 2:g} bits per value")
