r"""Vectorized PyTorch write path and paged attention over a packed E8 KV cache.

Cache layout (what vLLM 0.32's CPU backend hands an attention impl after our ``customize_spec``,
``KVCacheLayout.LBHNC``; and what our 0.26 ``get_kv_cache_shape`` returns)::

    kv_cache: uint8 [num_blocks, H_kv, block_size, slot_bytes]        (a strided view is fine)
    slot    = [ K fields | V fields | K scale | V scale ]

A codec's code is ``[fields (code_bytes - 2) | fp16 scale (2)]``; the slot keeps the two codes'
fields first and their scales last (:meth:`E8KVFormat.join_codes` / :meth:`E8KVFormat.split_slots`),
so for the E8 codes (``D·b/8`` field bytes, a multiple of 8 for D = 64, 128) every field run and the
scale pair start on a 4-byte boundary and ``slot_bytes`` is a multiple of 4: the GPU kernels read
the slot as int32 words (one word holds both scales).

A token at absolute position ``p`` of sequence ``i`` lives at block ``block_table[i, p // bs]``,
offset ``p % bs``; ``slot_mapping`` (write path) gives ``block * bs + offset`` per new token,
``-1`` = padding (skipped).

Three pieces:

(a) :func:`write_kv_cache` encodes key/value [T, H_kv, D] with the K and V codecs and scatters the
    codes by ``slot_mapping``.
(b) :func:`paged_attention` computes causal GQA attention for a whole vLLM batch (prefill, chunked
    prefill and decode mixed, described by ``query_start_loc`` / ``seq_lens`` / ``block_table``),
    reading K and V **only from the cache**, so prefill tokens also see quantized K/V. It decodes
    each needed cache slot once per call (shared prefix blocks once), in the rotated domain: an
    orthonormal rotation R gives q·k = (Rq)·(Rk), so queries are rotated once, codes are decoded
    without the per-vector inverse rotation, and the attention output (a convex combination of
    rotated values) is rotated back once. Decode rows (one query token) of all sequences go
    through :mod:`e8vllm.kernels.cpu_decode` on CPU (numba: each code decoded in registers inside
    an online-softmax loop, no decoded copy of the context; ``E8VLLM_CPU_DECODE=torch`` turns it
    off), else through one padded, masked, fused SDPA call (GQA via ``enable_gqa``); each prefill /
    chunked prefill sequence through one SDPA call with a bottom-right-aligned causal mask. Slots
    are decoded into tensors only when some row takes an SDPA path.
    The write path uses :func:`fast_e8_encode`, the codec's encoder with its scale search batched
    (bit-identical codes, checked against ``codec.encode`` when a format is built).
(c) :func:`reference_attention` is the obviously-correct float64 version: per sequence, gather the
    dequantized cache with ``codec.decode`` and loop over heads with plain softmax attention.

Nothing here imports vLLM.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from e8vllm.codecs.base import Codec
from e8vllm.hadamard import HadamardRotation, rotation

__all__ = ["E8KVFormat", "KeyBias", "unpack_fields", "pack_fields", "fast_e8_encode", "write_kv_cache", "paged_attention", "reference_attention",
           "gather_dequantized", "check_cache_layout", "codec_names"]

#: float32 elements of the biggest score / gathered-K temporary built at once (~64 MiB).
SCORE_BUDGET = 1 << 24
#: vectors per write above which the codec's own (per-factor) encoder is used: the batched
#: search only saves call overhead, and is slightly slower once the work is memory-bound.
FAST_ENCODE_MAX = 1024


def codec_names(k_bits: int, v_bits: int, variant: str = "") -> tuple[str, str]:
    """Registry names of the K and V codecs for a dtype's bits: '' or 'cubic-keys' (the default since
    session 14) = ``e8c-4bit`` for 4-bit keys, ``e8s-{b}bit`` otherwise; 'switched' = ``e8s-{b}bit``
    for both (the default of sessions 7-13); 'cubic' = ``e8c-4bit`` for every 4-bit side, ``e8s-{b}bit``
    otherwise; 'search' = ``e8-{b}bit``; 'rms' = ``e8-{b}bit-rms``."""
    if variant in ("", "cubic-keys", "switched", "cubic"):
        kn = "e8c-4bit" if k_bits == 4 and variant != "switched" else f"e8s-{k_bits}bit"
        vn = "e8c-4bit" if v_bits == 4 and variant == "cubic" else f"e8s-{v_bits}bit"
        return kn, vn
    if variant not in ("search", "rms"):
        raise ValueError(f"codec variant must be '', 'cubic-keys', 'switched', 'cubic', 'search' or 'rms', "
                         f"got {variant!r}")
    suffix = "-rms" if variant == "rms" else ""
    return f"e8-{k_bits}bit{suffix}", f"e8-{v_bits}bit{suffix}"


def _rotated_parts(codec: Codec) -> tuple[HadamardRotation, int, int] | None:
    """(rotation, bits, packed field bytes) when ``codec`` stores 'bit-packed fields + a 2-byte tail'
    of a rotated vector (``e8-*``: the fp16 scale; ``e8s-*``: switch byte, exponent byte) and can
    decode them without the inverse rotation; else None."""
    from e8vllm.codecs.e8 import E8Codec  # deferred: loads the trained tables
    from e8vllm.codecs.e8s import E8SwitchedCodec

    if not isinstance(codec, (E8Codec, E8SwitchedCodec)):
        return None
    nb = codec.head_dim * codec.bits // 8
    if codec.code_bytes != nb + 2:  # pragma: no cover - guards a future format change
        return None
    return rotation(codec.head_dim, codec.seed), codec.bits, nb


def is_switched(codec: Codec) -> bool:
    """True for the ``e8s-*`` codecs (two table sets, switch byte + exponent byte)."""
    from e8vllm.codecs.e8s import E8SwitchedCodec

    return isinstance(codec, E8SwitchedCodec)


def decode_tail(codec: Codec, tail: Tensor) -> tuple[Tensor, Tensor | None]:
    """The 2-byte tails uint8 [M, 2] of a rotated codec's codes -> (scale float32 [M], switch int64
    [M] or None): ``e8-*`` an fp16 scale; ``e8s-*`` the switch byte, then the exponent byte."""
    if is_switched(codec):
        from e8vllm.codecs.e8s import scale_table

        return scale_table().to(tail.device)[tail[:, 1].long()], tail[:, 0].long()
    return tail.contiguous().view(torch.float16).reshape(-1).float(), None


def unpack_fields(packed: Tensor, bits: int) -> Tensor:
    """Bit-unpack fields stored by ``codecs.base.pack_bits`` (little-endian bit stream).

    Eight fields of ``bits`` bits fill exactly ``bits`` bytes, so each group of ``bits`` bytes is
    read as one little-endian word and split by shifts (no per-bit expansion).

    Args:
        packed: uint8 [..., M * bits / 8], M a multiple of 8.
        bits: 1..8.
    Returns:
        int64 [..., M], each < 2**bits.
    """
    lead = packed.shape[:-1]
    g = packed.reshape(*lead, -1, bits).to(torch.int64)  # [..., M/8, bits]
    word = g[..., 0]
    for i in range(1, bits):
        word = word | (g[..., i] << (8 * i))
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    fields = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., M/8, 8]
    return fields.reshape(*lead, -1)


def pair_table(codec: Codec) -> Tensor | None:
    """Decode table of packed value pairs for :func:`fast_e8_decode_rotated`, float32 [S · 2 · 4^b, 2]:
    row (t·2 + c)·4^b + (hi << b | lo) = (T_{t,c}[lo], T_{t,c}[hi]) for table set t (S = 1 for
    ``e8-*``, 2 for ``e8s-*``); None unless ``codec`` is a companded or uniform E8 code with the
    parity rule in both cosets, one table for all coordinates, 2..4 bits."""
    from e8vllm.codecs.e8 import E8Codec

    if is_switched(codec):
        codes = codec.code.codes  # type: ignore[attr-defined]
    elif type(codec) is E8Codec and codec.kind == "e8":
        codes = (codec.code,)
    else:
        return None
    if codec.bits not in (2, 3, 4):  # type: ignore[attr-defined]
        return None
    k = 1 << codec.bits  # type: ignore[attr-defined]
    out = []
    for code in codes:
        if code.parity != (True, True) or not torch.equal(code.main, code.last):
            return None
        t = code.main.to(torch.float32).reshape(2, k)
        lo = t[:, None, :].expand(2, k, k)  # [c, hi, lo]
        hi = t[:, :, None].expand(2, k, k)
        out.append(torch.stack([lo, hi], -1).reshape(2 * k * k, 2))
    return torch.cat(out).contiguous()


def fast_e8_decode_rotated(pairs: Tensor, bits: int, field_bytes: Tensor, scale: Tensor,
                           switch: Tensor | None = None, group_blocks: int = 1) -> Tensor:
    """E8 fields + scale -> rotated vectors, one table lookup per pair of values.

    Per 8-block word w (8·b bits, little-endian): coset c = bit 7b, parity p of the low bits of
    fields 0..6, v_7 = (f_7 & ~1) | p; the four pair indices c·4^b + (f_{2j+1} << b | f_{2j}) pick
    rows of ``pairs`` (:func:`pair_table`); with ``switch`` ([N], ``e8s-*``) block g reads table set
    (switch >> (g // group_blocks)) & 1. Bit-identical to the codec's ``decode_rotated`` (the same
    table values times the same float32 scale).

    Args:
        pairs: float32 [2 · 4^b, 2] (on the bytes' device).
        field_bytes: uint8 [N, D·b/8]; scale: float32 [N].
    Returns:
        float32 [N, D].
    """
    n = field_bytes.shape[0]
    g = field_bytes.reshape(n, -1, bits).to(torch.int32)  # [N, G, b] bytes of each block
    w = g[..., 0]
    for i in range(1, bits):
        w = w | (g[..., i] << (8 * i))
    low = sum(1 << (k * bits) for k in range(7))
    if bits == 2:  # xor fold (the partial sums of a multiply would carry into the sum's bit)
        x = w & low
        x = x ^ (x >> 8)
        x = x ^ (x >> 4)
        par = (x ^ (x >> 2)) & 1
    else:  # the low bits summed into bit 6b by one multiply (no carries: each partial sum < 2^b)
        par = (((w & low) * low) >> (6 * bits)) & 1
    m2 = (1 << (2 * bits)) - 1
    top = (w >> (7 * bits)) & 1
    shifts = torch.arange(4, device=w.device, dtype=torch.int32) * (2 * bits)
    idx = (w.unsqueeze(-1) >> shifts) & m2  # [N, G, 4] pair indices without the coset
    idx[..., 3] = (idx[..., 3] & (m2 - (1 << bits))) | (par << bits)
    if switch is not None:  # table set of each block above the coset bit
        gi = torch.arange(w.shape[1], device=w.device, dtype=torch.int32) // group_blocks
        top = top | ((((switch.to(torch.int32)[:, None] >> gi) & 1)) << 1)
    idx = idx | (top << (2 * bits)).unsqueeze(-1)
    return pairs.index_select(0, idx.reshape(-1)).reshape(n, -1) * scale[:, None]  # index_select: ~2.5x advanced indexing


def pack_fields(fields: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`unpack_fields` (same bytes as ``codecs.base.pack_bits``).

    Args:
        fields: int [..., M] each < 2**bits, M a multiple of 8.
    Returns:
        uint8 [..., M * bits / 8].
    """
    lead = fields.shape[:-1]
    f = fields.to(torch.int64).reshape(*lead, -1, 8)
    shifts = torch.arange(8, device=fields.device, dtype=torch.int64) * bits
    word = (f << shifts).sum(-1)  # disjoint bit ranges: sum == or
    byte_shifts = torch.arange(bits, device=fields.device, dtype=torch.int64) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF  # [..., M/8, bits]
    return out.to(torch.uint8).reshape(*lead, -1)


#: scale-factor range of ``E8Codec.encode_rotated`` (mirrored; guarded by ``_fast_encoder_ok``)
_E8_SCALE_RANGE = (0.75, 1.25)


def fast_e8_encode(codec: Codec, x: Tensor) -> Tensor:
    """``E8Codec.encode`` with its per-vector scale search done in one batched block-code call.

    Same expressions per scale factor as the codec (so bit-identical codes: every block of the
    block-code search is independent of the others, and the first strictly-best factor wins as
    in the codec's loop), but one ``BlockCode.encode`` over all factors instead of one per
    factor: ~n_scales x fewer small-tensor calls, which dominates the per-token write cost.

    Args:
        codec: an ``E8Codec``.
        x: float [N, D].
    Returns:
        uint8 [N, code_bytes].
    """
    from e8vllm.codecs.base import check_vectors
    from e8vllm.codecs.e8 import _scale_factors
    from e8vllm.codecs.uniform import cached_rotation, fp16_round

    d = codec.head_dim
    y = check_vectors(x, d)
    n = y.shape[0]
    if n == 0:
        return torch.empty((0, codec.code_bytes), dtype=torch.uint8, device=y.device)
    y = cached_rotation(d, codec.seed).forward(y)  # type: ignore[attr-defined]
    rms = y.square().mean(1).sqrt()
    # float32 factors: ``rms * f`` with a Python float f also multiplies in float32
    fs = torch.tensor(_scale_factors(codec.n_scales, *_E8_SCALE_RANGE),  # type: ignore[attr-defined]
                      dtype=torch.float32, device=y.device)
    m = fs.shape[0]
    scales = fp16_round(rms[None, :] * fs[:, None])  # [m, n]
    vanishing = scales[-1] == 0  # the codec's rule: scale 0 (exact zeros) when every candidate underflows
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    fields, err = codec.code.encode((y[None] / scales[..., None]).reshape(-1, 8))  # type: ignore[attr-defined]
    err = err.reshape(m, n, -1).sum(2) * scales.square()
    best = torch.argmin(err, dim=0) if m > 1 else torch.zeros(n, dtype=torch.int64, device=y.device)
    ar = torch.arange(n, device=y.device)
    fields = fields.reshape(m, n, d)[best, ar]
    scale = torch.where(vanishing, torch.zeros_like(scales[0]), scales[best, ar])
    sb = scale.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)
    return torch.cat([pack_fields(fields, codec.bits), sb], 1)  # type: ignore[attr-defined]


def _fast_decoder_table(codec: Codec) -> Tensor | None:
    """:func:`pair_table` of ``codec`` when :func:`fast_e8_decode_rotated` reproduces the codec's own
    rotated decode bit for bit on a probe batch (random field bytes and tails); else None."""
    pairs = pair_table(codec)
    parts = _rotated_parts(codec)
    if pairs is None or parts is None:
        return None
    _rot, bits, nb = parts
    g = torch.Generator().manual_seed(4321)
    fb = torch.randint(0, 256, (64, nb), generator=g, dtype=torch.uint8)
    if is_switched(codec):
        tail = torch.randint(0, 256, (64, 2), generator=g, dtype=torch.uint8)
    else:
        tail = (torch.rand(64, generator=g) * 3.0).half().view(torch.uint8).reshape(64, 2)
    ref = _rotated_decode(codec, bits, fb, tail)
    scale, switch = decode_tail(codec, tail)
    from e8vllm.codecs.e8s import group_blocks

    fast = fast_e8_decode_rotated(pairs, bits, fb, scale, switch, group_blocks(codec.head_dim))
    return pairs if torch.equal(fast, ref) else None


def _rotated_decode(codec: Codec, bits: int, field_bytes: Tensor, tail: Tensor) -> Tensor:
    """The codec's own rotated decode of field bytes uint8 [M, nb] and tails uint8 [M, 2]."""
    fields = unpack_fields(field_bytes, bits)
    if is_switched(codec):
        return codec.decode_rotated(fields, tail[:, 0].long(), tail[:, 1].long())  # type: ignore[attr-defined]
    return codec.decode_rotated(fields, decode_tail(codec, tail)[0])  # type: ignore[attr-defined]


def _fast_encoder_ok(codec: Codec) -> bool:
    """True when :func:`fast_e8_encode` reproduces ``codec.encode`` bit for bit on a probe batch
    (Gaussian vectors, outliers, tiny and zero vectors); otherwise the codec's own encoder is used."""
    from e8vllm.codecs.e8 import E8Codec

    if type(codec) is not E8Codec or not all(hasattr(codec, a) for a in ("n_scales", "code", "bits", "seed")):
        return False
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(96, codec.head_dim, generator=g)
    x[:16, 5] *= 40.0
    x[16:24] *= 1e-3
    x[24:26] = 0.0
    x[26:32] = x[26:32].round()
    try:
        return bool(torch.equal(fast_e8_encode(codec, x), codec.encode(x)))
    except Exception:  # pragma: no cover - any drift in the codec internals
        return False


@dataclass(frozen=True)
class E8KVFormat:
    """The packed (token, kv-head) slot: ``[K fields | V fields | K scale | V scale]``, ``slot_bytes`` bytes.

    ``K fields`` + ``K scale`` is the K codec's code (``[fields | 2-byte scale]``), the same for V
    (:meth:`join_codes`, :meth:`split_slots`).

    Attributes:
        head_size: D.
        k_codec, v_codec: codecs for keys and values (``encode`` [N, D] -> uint8 [N, code_bytes]).
    """

    head_size: int
    k_codec: Codec
    v_codec: Codec
    _k_rot: tuple | None = field(default=None, init=False, repr=False, compare=False)
    _v_rot: tuple | None = field(default=None, init=False, repr=False, compare=False)
    _fast: tuple[bool, bool] = field(default=(False, False), init=False, repr=False, compare=False)
    _pairs: tuple = field(default=(None, None), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, c in (("k_codec", self.k_codec), ("v_codec", self.v_codec)):
            if c.head_dim != self.head_size:
                raise ValueError(f"{name} is for head_dim {c.head_dim}, format for {self.head_size}")
        object.__setattr__(self, "_k_rot", _rotated_parts(self.k_codec))
        object.__setattr__(self, "_v_rot", _rotated_parts(self.v_codec))
        fk = _fast_encoder_ok(self.k_codec)
        fv = fk if self.v_codec == self.k_codec else _fast_encoder_ok(self.v_codec)
        object.__setattr__(self, "_fast", (fk, fv))
        pk = _fast_decoder_table(self.k_codec)
        object.__setattr__(self, "_pairs", (pk, pk if self.v_codec == self.k_codec else _fast_decoder_table(self.v_codec)))

    @classmethod
    def from_bits(cls, head_size: int, k_bits: int, v_bits: int, variant: str = "") -> "E8KVFormat":
        """The format of ``e8_k{k_bits}v{v_bits}`` (codecs :func:`codec_names`).

        Raises ValueError for a head size the rotation/codec does not support.
        """
        import e8vllm.codecs as codecs

        kn, vn = codec_names(k_bits, v_bits, variant)
        return cls(head_size, codecs.get(kn, head_dim=head_size), codecs.get(vn, head_dim=head_size))

    # ---- sizes ------------------------------------------------------------------------------
    @property
    def k_bytes(self) -> int:
        return self.k_codec.code_bytes

    @property
    def v_bytes(self) -> int:
        return self.v_codec.code_bytes

    @property
    def slot_bytes(self) -> int:
        """Bytes per (token, kv-head): K code + V code."""
        return self.k_bytes + self.v_bytes

    def join_codes(self, ck: Tensor, cv: Tensor) -> Tensor:
        """K codes uint8 [..., k_bytes] and V codes [..., v_bytes] -> slots [..., slot_bytes]."""
        return torch.cat([ck[..., :-2], cv[..., :-2], ck[..., -2:], cv[..., -2:]], dim=-1)

    def split_slots(self, slots: Tensor) -> tuple[Tensor, Tensor]:
        """Slots uint8 [..., slot_bytes] -> (K codes [..., k_bytes], V codes [..., v_bytes]) (copies)."""
        kf, vf, ks, vs = self._slot_parts(slots)
        return torch.cat([kf, ks], dim=-1), torch.cat([vf, vs], dim=-1)

    def _slot_parts(self, slots: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Slots [..., slot_bytes] -> views (K fields, V fields, K scale, V scale)."""
        nk, nv = self.k_bytes - 2, self.v_bytes - 2
        return slots[..., :nk], slots[..., nk:nk + nv], slots[..., nk + nv:nk + nv + 2], slots[..., nk + nv + 2:]

    # ---- encoding ---------------------------------------------------------------------------
    @property
    def pair_decoded(self) -> bool:
        """True when K and V both decode by pair tables in a rotated domain
        (:func:`fast_e8_decode_rotated`, verified bit-exact at construction): the E8 ``e8-*`` /
        ``e8s-*`` codes at 2-4 bits that the fused kernels (Triton, :mod:`.cpu_decode`) read."""
        return self._pairs[0] is not None and self._pairs[1] is not None

    @property
    def uses_fast_encoder(self) -> tuple[bool, bool]:
        """(K, V): whether :func:`fast_e8_encode` (verified bit-exact at construction) is used."""
        return self._fast

    def encode_kv(self, key: Tensor, value: Tensor) -> Tensor:
        """key, value float [N, H, D] -> slots uint8 [N, H, slot_bytes] (:meth:`join_codes` layout).

        Bit-identical to ``join_codes(k_codec.encode(k), v_codec.encode(v))``; K and V go through one
        encoder call when they share the codec.
        """
        n, h, d = key.shape
        kf, vf = key.reshape(n * h, d), value.reshape(n * h, d)
        fast = self._fast if 2 * n * h <= FAST_ENCODE_MAX else (False, False)
        if self.k_codec == self.v_codec:
            enc = fast_e8_encode if fast[0] else (lambda c, x: c.encode(x))
            both = enc(self.k_codec, torch.cat([kf, vf]))
            ck, cv = both[: n * h], both[n * h:]
        else:
            ck = fast_e8_encode(self.k_codec, kf) if fast[0] else self.k_codec.encode(kf)
            cv = fast_e8_encode(self.v_codec, vf) if fast[1] else self.v_codec.encode(vf)
        return self.join_codes(ck.reshape(n, h, -1), cv.reshape(n, h, -1))

    # ---- rotated domain ---------------------------------------------------------------------
    @property
    def k_rotation(self) -> HadamardRotation | None:
        """R applied to queries (None: keys decode to the plain domain)."""
        return None if self._k_rot is None else self._k_rot[0]

    @property
    def v_rotation(self) -> HadamardRotation | None:
        """R whose inverse is applied to the attention output (None: identity)."""
        return None if self._v_rot is None else self._v_rot[0]

    @staticmethod
    def _decode(codec: Codec, parts: tuple | None, codes: Tensor, scale_bytes: Tensor | None = None,
                pairs: Tensor | None = None) -> Tensor:
        """uint8 [..., code_bytes] -> float32 [..., D], rotated domain when ``parts``.

        With ``scale_bytes`` ([..., 2]), ``codes`` holds the fields only ([..., code_bytes - 2]).
        With ``pairs`` (:func:`pair_table`), the rotated path uses :func:`fast_e8_decode_rotated`."""
        if scale_bytes is not None:
            if parts is None:
                codes, scale_bytes = torch.cat([codes, scale_bytes], dim=-1), None
            else:
                scale_bytes = scale_bytes.reshape(-1, 2)
        lead = codes.shape[:-1]
        flat = codes.reshape(-1, codes.shape[-1])
        if flat.shape[0] == 0:
            return torch.empty(*lead, codec.head_dim, dtype=torch.float32, device=codes.device)
        if parts is None:
            return codec.decode(flat.contiguous()).reshape(*lead, -1)
        _rot, bits, nb = parts
        sb = flat[:, nb:nb + 2] if scale_bytes is None else scale_bytes
        if pairs is not None:
            from e8vllm.codecs.e8s import group_blocks

            scale, switch = decode_tail(codec, sb)
            return fast_e8_decode_rotated(pairs.to(flat.device), bits, flat[:, :nb], scale, switch,
                                          group_blocks(codec.head_dim)).reshape(*lead, -1)
        return _rotated_decode(codec, bits, flat[:, :nb], sb).reshape(*lead, -1)

    def decode_kv_rotated(self, slots: Tensor) -> tuple[Tensor, Tensor]:
        """Slots uint8 [..., slot_bytes] -> (K, V) float32 [..., D] each, rotated domains.

        One decoder call for K and V together when they share the codec."""
        kf, vf, ks, vs = self._slot_parts(slots)
        if self.k_codec == self.v_codec:
            both = self._decode(self.k_codec, self._k_rot, torch.stack([kf, vf]), torch.stack([ks, vs]), self._pairs[0])
            return both[0], both[1]
        return (self._decode(self.k_codec, self._k_rot, kf, ks, self._pairs[0]),
                self._decode(self.v_codec, self._v_rot, vf, vs, self._pairs[1]))

    def decode_k_rotated(self, codes: Tensor) -> Tensor:
        """K codes uint8 [..., k_bytes] -> float32 [..., D] in the K rotation's domain."""
        return self._decode(self.k_codec, self._k_rot, codes, pairs=self._pairs[0])

    def decode_v_rotated(self, codes: Tensor) -> Tensor:
        """V codes uint8 [..., v_bytes] -> float32 [..., D] in the V rotation's domain."""
        return self._decode(self.v_codec, self._v_rot, codes, pairs=self._pairs[1])


def check_cache_layout(kv_cache: Tensor, num_kv_heads: int, fmt: E8KVFormat, what: str = "") -> None:
    """Raise RuntimeError unless ``kv_cache`` is uint8 [num_blocks, num_kv_heads, block_size, slot_bytes]."""
    ok = (kv_cache.dtype == torch.uint8 and kv_cache.dim() == 4 and kv_cache.shape[1] == num_kv_heads
          and kv_cache.shape[3] == fmt.slot_bytes)
    if not ok:
        raise RuntimeError(
            f"e8vllm: KV cache page layout mismatch{' for ' + what if what else ''}: expected a uint8 "
            f"[num_blocks, {num_kv_heads}, block_size, {fmt.slot_bytes}] view ({fmt.k_bytes} B K code + "
            f"{fmt.v_bytes} B V code per token-head, head_size {fmt.head_size}), got {kv_cache.dtype} "
            f"{list(kv_cache.shape)}. The page-size hook of e8vllm.vllm_plugin.spec did not apply "
            f"(unsupported vLLM version or a feature that rebuilds KV specs, e.g. "
            f"kv_cache_dtype_skip_layers / hybrid models / KV connectors).")


# ---------------------------------------------------------------------------------------------
# (a) write path
# ---------------------------------------------------------------------------------------------
logger = logging.getLogger("e8vllm.kernels")
#: the write path warned about non-finite K/V in this process (once)
_NONFINITE_WARNED = [False]
#: what a non-finite K/V value is stored as: 0 for NaN, ±this for ±Inf (fp16's largest finite value)
NONFINITE_CLAMP = 65504.0


def _finite_kv(x: Tensor, name: str) -> Tensor:
    """``x`` with NaN -> 0 and ±Inf -> ±:data:`NONFINITE_CLAMP`, and a warning (once per process).

    Non-finite K/V come from the model's own numerics (an overflow), not from a request: the codecs
    refuse them (``ValueError``), and raising inside the engine's forward would kill the engine for
    every request. Stock vLLM caches them as they are; here the affected values are clamped and the
    sequence's output is as unreliable as it would be there."""
    if bool(torch.isfinite(x).all()):
        return x
    if not _NONFINITE_WARNED[0]:
        _NONFINITE_WARNED[0] = True
        logger.warning("e8vllm: the model produced NaN/Inf %s values (a numerical overflow); they are stored "
                       "as 0 / +-%g in the E8 cache (this warning is shown once)", name, NONFINITE_CLAMP)
    return torch.nan_to_num(x, nan=0.0, posinf=NONFINITE_CLAMP, neginf=-NONFINITE_CLAMP)


def write_kv_cache(key: Tensor, value: Tensor, kv_cache: Tensor, slot_mapping: Tensor,
                   fmt: E8KVFormat) -> None:
    """Encode and scatter new tokens into the packed cache (in place).

    Args:
        key, value: float [T', H_kv, D] (T' >= T; rows beyond ``slot_mapping`` are padding).
        kv_cache: uint8 [num_blocks, H_kv, block_size, slot_bytes].
        slot_mapping: int [T]; ``block * block_size + offset``, -1 = skip the token.
        fmt: the slot format.
    """
    t = slot_mapping.shape[0]
    if t == 0:
        return
    slots = slot_mapping.to(torch.int64)
    valid = slots >= 0
    key, value = key[:t], value[:t]
    if not bool(valid.all()):
        idx = valid.nonzero().squeeze(1)
        if idx.numel() == 0:
            return
        slots, key, value = slots[idx], key[idx], value[idx]
    bs = kv_cache.shape[2]
    key, value = _finite_kv(key, "key"), _finite_kv(value, "value")
    # advanced indices around a slice: the indexed result is [n, H, C]
    kv_cache[slots // bs, :, slots % bs, :] = fmt.encode_kv(key, value).to(kv_cache.device)


# ---------------------------------------------------------------------------------------------
# (b) paged attention
# ---------------------------------------------------------------------------------------------
def _batch_slots(seq_lens: Tensor, block_table: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Cache slot of every (sequence, position < seq_len), flattened.

    Returns (slots int64 [N], starts int64 [B]) with N = sum(seq_lens); sequence i owns
    entries ``starts[i] : starts[i] + seq_lens[i]``.
    """
    lens = seq_lens.to(torch.int64)
    b = lens.shape[0]
    starts = torch.zeros(b, dtype=torch.int64, device=lens.device)
    if b > 1:
        starts[1:] = torch.cumsum(lens, 0)[:-1]
    total = int(lens.sum())
    seq_id = torch.repeat_interleave(torch.arange(b, device=lens.device), lens)
    pos = torch.arange(total, device=lens.device) - starts[seq_id]
    blk = block_table[seq_id, pos // block_size].to(torch.int64)
    return blk * block_size + pos % block_size, starts


def _fused_decode(kv_cache: Tensor, fmt: "E8KVFormat") -> bool:
    """Whether decode rows go through :mod:`.cpu_decode` (CPU cache, numba, a pair-table format)."""
    if kv_cache.device.type != "cpu":
        return False
    from . import cpu_decode

    return cpu_decode.available() and cpu_decode.supported(fmt)


def _gather_codes(kv_cache: Tensor, slots: Tensor) -> Tensor:
    """uint8 [U, H, C] codes of the given slots (block * bs + off)."""
    bs = kv_cache.shape[2]
    return kv_cache[slots // bs, :, slots % bs, :]


class KeyBias(NamedTuple):
    """Logit terms of position-dependent key centers (:mod:`e8vllm.calibration`): the logit of query
    row t, head h and the key at position p gains, before the softmax scale (like q·k),

        coef[t, h] · table[p]  +  (p == 0) · first[t, h].

    coef: float [T, H_q, D] with table: float [P, D] (P > every position), or both None;
    first: float [T, H_q] or None."""

    coef: Tensor | None
    table: Tensor | None
    first: Tensor | None = None


def _bias_columns(kb: KeyBias, length: int, like: Tensor) -> Tensor:
    """Extra key columns that fold the KeyBias terms into q·k: [length, E] float32, the table's rows
    (E = D) then the indicator of position 0 (one column) for the parts ``kb`` has."""
    cols = []
    if kb.coef is not None:
        cols.append(kb.table[:length].to(like.device, torch.float32))
    if kb.first is not None:
        first = torch.zeros(length, 1, dtype=torch.float32, device=like.device)
        first[0] = 1.0
        cols.append(first)
    return torch.cat(cols, 1)


def _bias_query_columns(kb: KeyBias, rows: Tensor | slice, scale: float) -> Tensor:
    """The query side of :func:`_bias_columns` (times ``scale``): [n, H_q, E] float32."""
    cols = []
    if kb.coef is not None:
        cols.append(kb.coef[rows].float())
    if kb.first is not None:
        cols.append(kb.first[rows].float()[..., None])
    return torch.cat(cols, 2) * scale


def paged_attention(query: Tensor, kv_cache: Tensor, query_start_loc: Tensor, seq_lens: Tensor,
                    block_table: Tensor, fmt: E8KVFormat, *, num_kv_heads: int | None = None,
                    scale: float | None = None, out: Tensor | None = None,
                    key_bias: KeyBias | None = None) -> Tensor:
    """Causal GQA attention over the packed cache for one vLLM batch.

    Sequence i has query rows ``query_start_loc[i]:query_start_loc[i+1]`` (q_i tokens, the last q_i
    of its seq_lens[i] tokens, all already written to the cache); query token t of it sits at
    position ``seq_lens[i] - q_i + t`` and attends to positions ``<= `` that. Query head j uses KV
    head ``j // (H_q / H_kv)``.

    Args:
        query: float [T', H_q, D], T' >= T = query_start_loc[-1].
        kv_cache: uint8 [num_blocks, H_kv, block_size, slot_bytes].
        query_start_loc: int [B + 1]; seq_lens: int [>= B]; block_table: int [>= B, max_blocks].
        fmt: slot format (codecs).
        num_kv_heads: H_kv (default: kv_cache.shape[1]).
        scale: softmax scale (default 1/sqrt(D)).
        out: optional [T', H_q, D] output buffer (any float dtype), written in rows < T.
        key_bias: optional :class:`KeyBias` (the position-dependent key centers of
            :mod:`e8vllm.calibration`): extra logit terms per (query row, head, key position).
    Returns:
        ``out`` (or a new tensor of query's dtype [T', H_q, D]; rows >= T are zero).
    """
    d = fmt.head_size
    h_kv = num_kv_heads if num_kv_heads is not None else kv_cache.shape[1]
    h_q = query.shape[1]
    if h_q % h_kv:
        raise ValueError(f"{h_q} query heads is not a multiple of {h_kv} kv heads")
    grp = h_q // h_kv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if out is None:
        out = torch.zeros(query.shape, dtype=query.dtype, device=query.device)
    qsl = query_start_loc.tolist()
    b = len(qsl) - 1
    tq = qsl[-1]
    if b <= 0 or tq == 0:
        return out
    lens_t = seq_lens[:b].to(torch.int64)
    lens = lens_t.tolist()
    qlens = [qsl[i + 1] - qsl[i] for i in range(b)]
    for i in range(b):
        if qlens[i] > lens[i]:
            raise ValueError(f"sequence {i}: {qlens[i]} query tokens but seq_len {lens[i]}")

    dec = sorted((i for i in range(b) if qlens[i] == 1), key=lambda i: lens[i])
    fused = bool(dec) and _fused_decode(kv_cache, fmt)
    dec_t = torch.tensor(dec, dtype=torch.int64)
    if key_bias is not None and key_bias.table is not None and key_bias.table.shape[0] < max(lens):
        raise ValueError(f"key_bias table has {key_bias.table.shape[0]} positions, sequences have up to {max(lens)}")

    q = query[:tq].to(torch.float32)
    if fmt.k_rotation is not None:
        q = fmt.k_rotation.forward(q)
    q = q * scale
    o = torch.zeros(tq, h_q, d, dtype=torch.float32, device=query.device)

    # -- decode every needed slot once (rotated domain), unless only fused decode rows need them
    bs = kv_cache.shape[2]
    if not fused or len(dec) < b:  # (fused: the decode rows' sequences need no slots here)
        need = lens_t.index_fill(0, dec_t, 0) if fused else lens_t
        slots, starts_t = _batch_slots(need, block_table[:b], bs)
        uniq, inv = torch.unique(slots, return_inverse=True)
        codes = _gather_codes(kv_cache, uniq)  # [U, H, C]
        k_all, v_all = fmt.decode_kv_rotated(codes)  # [U, H, D] each
        starts = starts_t.tolist()

    # -- decode rows (q_i == 1): fused on CPU (cpu_decode), else batched SDPA, sorted by length,
    #    chunked by memory
    if fused:
        from . import cpu_decode

        cpu_decode.decode_attention(q.contiguous(), kv_cache, block_table, torch.tensor([qsl[i] for i in dec]), dec_t,
                                    lens_t[dec_t], fmt, o, key_bias, scale)
        dec = []
    # KeyBias terms (both SDPA paths) ride along as extra dot-product columns: q' = [q | coef·scale |
    # first·scale], k' = [k | table[p] | p == 0] (:func:`_bias_columns`), so masks stay boolean
    n_ext = 0 if key_bias is None else (d if key_bias.coef is not None else 0) + (key_bias.first is not None)
    j = 0
    while j < len(dec):
        k_end = j + 1
        per_pos = h_kv * (2 * d + n_ext) + h_q  # gathered K (+ bias columns), V and the scores, per (row, position)
        while k_end < len(dec) and (k_end - j + 1) * lens[dec[k_end]] * per_pos <= SCORE_BUDGET:
            k_end += 1
        chunk = dec[j:k_end]
        lmax = lens[chunk[-1]]
        j = k_end
        idx_t = torch.tensor(chunk, dtype=torch.int64, device=query.device)
        ar = torch.arange(lmax, device=query.device)
        valid = ar[None, :] < lens_t[idx_t][:, None]  # [Bd, Lmax]
        flat = (starts_t[idx_t][:, None] + ar[None, :]).clamp(max=slots.shape[0] - 1)
        kk = k_all[inv[flat]]  # [Bd, Lmax, H, D]
        vv = v_all[inv[flat]]
        rows = torch.tensor([qsl[i] for i in chunk], dtype=torch.int64, device=query.device)
        qq = q[rows].unsqueeze(2)  # [Bd, H_q, 1, D]
        if key_bias is not None:
            ext = _bias_columns(key_bias, lmax, kk)  # [Lmax, E]
            kk = torch.cat([kk, ext[None, :, None, :].expand(len(chunk), lmax, h_kv, n_ext)], 3)
            qq = torch.cat([qq, _bias_query_columns(key_bias, rows, scale).unsqueeze(2)], 3)  # [Bd, H_q, 1, D + E]
        od = F.scaled_dot_product_attention(qq, kk.permute(0, 2, 1, 3), vv.permute(0, 2, 1, 3),
                                            attn_mask=valid[:, None, None, :], scale=1.0,
                                            enable_gqa=grp > 1)  # q is pre-scaled
        o[rows] = od.squeeze(2)

    # -- prefill / chunked-prefill rows: one sequence at a time, fused SDPA (GQA), causal mask
    #    aligned bottom-right (query t sits at position L - n + t); query-chunked for long ones;
    #    KeyBias terms as extra columns (above)
    for i in range(b):
        n, L = qlens[i], lens[i]
        if n <= 1:
            continue
        pos = inv[starts[i]:starts[i] + L]
        kk = k_all[pos].permute(1, 0, 2).unsqueeze(0)  # [1, H_kv, L, D]
        vv = v_all[pos].permute(1, 0, 2).unsqueeze(0)
        qi = q[qsl[i]:qsl[i] + n].permute(1, 0, 2).unsqueeze(0)  # [1, H_q, n, D]
        if key_bias is not None:
            ext = _bias_columns(key_bias, L, kk)  # [L, E]
            kk = torch.cat([kk, ext.expand(1, kk.shape[1], L, ext.shape[1])], 3)
            qe = _bias_query_columns(key_bias, slice(qsl[i], qsl[i] + n), scale).permute(1, 0, 2).unsqueeze(0)
            qi = torch.cat([qi, qe], 3)  # [1, H_q, n, D + E]
        step = max(1, SCORE_BUDGET // max(1, h_q * L))
        key_pos = torch.arange(L, device=query.device)
        for t0 in range(0, n, step):
            t1 = min(n, t0 + step)
            qpos = torch.arange(L - n + t0, L - n + t1, device=query.device)
            mask = key_pos[None, :] <= qpos[:, None]  # [t, L] True = attend
            oc = F.scaled_dot_product_attention(qi[:, :, t0:t1], kk, vv, attn_mask=mask, scale=1.0,
                                                enable_gqa=grp > 1)  # q is pre-scaled
            o[qsl[i] + t0:qsl[i] + t1] = oc[0].permute(1, 0, 2)

    if fmt.v_rotation is not None:
        o = fmt.v_rotation.inverse(o)
    out[:tq] = o.to(out.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# (c) float64 reference
# ---------------------------------------------------------------------------------------------
def gather_dequantized(kv_cache: Tensor, block_table_row: Tensor, seq_len: int,
                       fmt: E8KVFormat) -> tuple[Tensor, Tensor]:
    """K and V of one sequence's first ``seq_len`` positions via ``codec.decode``.

    Returns (k, v), each float32 [seq_len, H_kv, D] (plain, un-rotated domain).
    """
    bs = kv_cache.shape[2]
    h = kv_cache.shape[1]
    ks, vs = [], []
    for p in range(seq_len):
        row = kv_cache[int(block_table_row[p // bs]), :, p % bs, :]  # [H, C]
        ck, cv = fmt.split_slots(row)
        ks.append(fmt.k_codec.decode(ck))
        vs.append(fmt.v_codec.decode(cv))
    if not ks:
        z = torch.zeros(0, h, fmt.head_size)
        return z, z.clone()
    return torch.stack(ks), torch.stack(vs)


def reference_attention(query: Tensor, kv_cache: Tensor, query_start_loc: Tensor, seq_lens: Tensor,
                        block_table: Tensor, fmt: E8KVFormat, *, scale: float | None = None,
                        key_bias: KeyBias | None = None) -> Tensor:
    """Same contract as :func:`paged_attention`, float64 and loops. Returns float64 [T, H_q, D]."""
    d = fmt.head_size
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    qsl = [int(x) for x in query_start_loc.tolist()]
    b = len(qsl) - 1
    h_q = query.shape[1]
    h_kv = kv_cache.shape[1]
    grp = h_q // h_kv
    out = torch.zeros(qsl[-1], h_q, d, dtype=torch.float64)
    for i in range(b):
        n, L = qsl[i + 1] - qsl[i], int(seq_lens[i])
        if n == 0:
            continue
        k, v = gather_dequantized(kv_cache, block_table[i], L, fmt)
        k, v = k.double(), v.double()
        for t in range(n):
            last = L - n + t  # absolute position of this query token
            qv = query[qsl[i] + t].double()  # [H_q, D]
            for hq in range(h_q):
                hk = hq // grp
                s = (k[: last + 1, hk] @ qv[hq]) * scale  # [last+1]
                if key_bias is not None and key_bias.coef is not None:
                    s = s + (key_bias.table[: last + 1].double() @ key_bias.coef[qsl[i] + t, hq].double()) * scale
                if key_bias is not None and key_bias.first is not None:
                    s[0] = s[0] + key_bias.first[qsl[i] + t, hq].double() * scale
                p = torch.softmax(s, dim=0)
                out[qsl[i] + t, hq] = p @ v[: last + 1, hk]
    return out
