r"""Fused CPU decode attention over the packed E8 cache (numba): the decode rows of
:func:`e8vllm.kernels.reference.paged_attention` without a dequantized copy of the context.

For one decode row (one query token of sequence i, the last of its L tokens) and KV head g, with
the G = H_q / H_kv query heads h of g, queries already rotated and scaled (q̃_h = scale · R_k q_h):

    for p = 0 .. L-1:   slot = cache[block_table[i, p // bs], g, p % bs]
        k̃_p = s_K(tail_K) · T_K[fields_K]          (pair-table lookups, :func:`reference.pair_table`)
        ℓ_{h,p} = q̃_h · k̃_p + scale · (coef_h · table[p] + [p = 0] · first_h)      (key-center bias)
        online softmax over p (running max m_h, sum l_h, accumulator a_h += e^{ℓ-m} ṽ_p)
    õ_h = a_h / l_h        (still in the V rotation's domain: the caller un-rotates once)

Each slot is decoded once per (row, KV head) in registers: 8 values per 8-block word (coset bit,
parity of the low bits of fields 0..6, the table set of ``e8s`` from the switch byte), exactly
the lookups of :func:`reference.fast_e8_decode_rotated`, so the decoded values are bit-identical;
only the order of float32 sums differs from the PyTorch path (tests bound the difference by the
PyTorch path's own float error against a float64 reference).

Why: the PyTorch path decodes every slot of the context into float32 tensors on every layer and
step, then runs SDPA over them (about 4.8 ms per layer at 2,048 tokens and 3 KV heads on this
machine); this reads each code once. ``E8VLLM_CPU_DECODE=torch`` selects the PyTorch path.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

try:  # optional: the ``cpu`` extra installs numba
    import numba
except ImportError:  # pragma: no cover - exercised where numba is missing
    numba = None

__all__ = ["available", "decode_attention"]

ENV = "E8VLLM_CPU_DECODE"


def available() -> bool:
    """True when the fused decode can run (numba importable, not switched off by ``E8VLLM_CPU_DECODE``)."""
    choice = os.environ.get(ENV, "numba").strip().lower()
    if choice not in ("numba", "torch"):
        raise ValueError(f"{ENV} must be 'numba' or 'torch', not {choice!r}")
    return numba is not None and choice == "numba"


@functools.lru_cache(maxsize=None)
def _fp16_table() -> np.ndarray:
    """float32 value of every fp16 bit pattern [65536] (the ``e8-*`` scale bytes, little-endian)."""
    return torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16).float().numpy()


if numba is not None:
    @numba.njit(cache=True, nogil=True, inline="always")
    def _tail(row, off, switched, stab, fp16):  # pragma: no cover - compiled
        """The 2-byte tail at row[off:off+2] -> (scale, switch bits): ``e8s`` [switch byte, exponent
        byte] -> (stab[exponent], switch); ``e8`` a little-endian fp16 scale -> (its value, 0)."""
        if switched:
            return stab[row[off + 1]], np.int64(row[off])
        return fp16[np.int64(row[off]) | (np.int64(row[off + 1]) << 8)], np.int64(0)

    @numba.njit(cache=True, nogil=True, inline="always")
    def _decode_vec(row, off, bits, nblk, pairs, set_bits, gb, scale, out):  # pragma: no cover - compiled
        """Fields at row[off : off + nblk*bits] -> out[0 : 8*nblk] (rotated domain, times ``scale``)."""
        m2 = (1 << (2 * bits)) - 1
        clear = m2 - (1 << bits)
        for g in range(nblk):
            w = np.int64(0)
            for i in range(bits):
                w |= np.int64(row[off + g * bits + i]) << (8 * i)
            par = np.int64(0)
            for k in range(7):
                par ^= (w >> (k * bits)) & 1
            top = ((w >> (7 * bits)) & 1) | (((set_bits >> (g // gb)) & 1) << 1)
            base = top << (2 * bits)
            for j in range(4):
                pidx = (w >> (2 * bits * j)) & m2
                if j == 3:
                    pidx = (pidx & clear) | (par << bits)
                r = base | pidx
                out[8 * g + 2 * j] = pairs[r, 0] * scale
                out[8 * g + 2 * j + 1] = pairs[r, 1] * scale

    # reassociation lets the dots and the accumulator updates vectorize; no nnan/ninf (the running
    # maxima start at -inf)
    @numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
    def _attend(q, cache, block_table, rows, seqs, lens, kb, vb, k_off, v_off, kt_off, vt_off, kpairs, vpairs,
                k_sw, v_sw, kgb, vgb, k_stab, v_stab, fp16, coef, table, first, bscale, out):  # pragma: no cover
        """q float32 [T, H_q, D]; cache uint8 [nb, H_kv, bs, S]; rows / seqs / lens int64 [R] (query row,
        block-table row, length); out float32 [T, H_q, D] (rows written). coef [T, H_q, D] / table [P, D]
        (empty: no term), first [T, H_q] (empty: none); the bias terms are multiplied by ``bscale``."""
        n_rows = rows.shape[0]
        h_q, d = q.shape[1], q.shape[2]
        h_kv, bs = cache.shape[1], cache.shape[2]
        grp = h_q // h_kv
        nblk = d // 8
        has_coef = coef.shape[0] > 0
        has_first = first.shape[0] > 0
        kv = np.empty(d, np.float32)
        vv = np.empty(d, np.float32)
        m = np.empty(grp, np.float32)
        lsum = np.empty(grp, np.float32)
        acc = np.empty((grp, d), np.float32)
        lg = np.empty(grp, np.float32)
        qg = np.empty((grp, d), np.float32)
        for r in range(n_rows):
            t = rows[r]
            sq = seqs[r]
            n = lens[r]
            for g in range(h_kv):
                for a in range(grp):
                    for j in range(d):
                        qg[a, j] = q[t, g * grp + a, j]
                    m[a] = -np.inf
                    lsum[a] = 0.0
                    for j in range(d):
                        acc[a, j] = 0.0
                for p in range(n):
                    blk = block_table[sq, p // bs]
                    slot = cache[blk, g, p % bs]
                    ks, kset = _tail(slot, kt_off, k_sw, k_stab, fp16)
                    vs, vset = _tail(slot, vt_off, v_sw, v_stab, fp16)
                    _decode_vec(slot, k_off, kb, nblk, kpairs, kset, kgb, ks, kv)
                    _decode_vec(slot, v_off, vb, nblk, vpairs, vset, vgb, vs, vv)
                    for a in range(grp):
                        h = g * grp + a
                        s = np.float32(0.0)
                        for j in range(d):
                            s += qg[a, j] * kv[j]
                        if has_coef:
                            bsum = np.float32(0.0)
                            for j in range(d):
                                bsum += coef[t, h, j] * table[p, j]
                            s += bsum * bscale
                        if has_first and p == 0:
                            s += first[t, h] * bscale
                        lg[a] = s
                    for a in range(grp):
                        s = lg[a]
                        if s > m[a]:
                            c = np.float32(np.exp(m[a] - s)) if m[a] > -np.inf else np.float32(0.0)
                            lsum[a] = lsum[a] * c + 1.0
                            for j in range(d):
                                acc[a, j] = acc[a, j] * c + vv[j]
                            m[a] = s
                        else:
                            e = np.float32(np.exp(s - m[a]))
                            lsum[a] += e
                            for j in range(d):
                                acc[a, j] += e * vv[j]
                for a in range(grp):
                    h = g * grp + a
                    inv = np.float32(1.0) / lsum[a] if lsum[a] > 0 else np.float32(0.0)
                    for j in range(d):
                        out[t, h, j] = acc[a, j] * inv


@functools.lru_cache(maxsize=64)
def _constants(fmt) -> tuple:  # noqa: ANN001 - E8KVFormat (frozen, hashable)
    """The kernel's per-format constants, built once per format: for K then V (bits, switched,
    group_blocks, pairs float32 [rows, 2], scale table float32 [256]), then the byte offsets of
    (K fields, V fields, K tail, V tail) in a slot."""
    from e8vllm.codecs.e8s import group_blocks, scale_table
    from .reference import is_switched

    def side(codec, pairs) -> tuple:  # noqa: ANN001
        sw = is_switched(codec)
        stab = scale_table().numpy() if sw else np.zeros(256, np.float32)
        return (int(codec.bits), sw, int(group_blocks(codec.head_dim)) if sw else 1,
                np.ascontiguousarray(pairs.float().numpy()), np.ascontiguousarray(stab, dtype=np.float32))

    nk, nv = fmt.k_bytes - 2, fmt.v_bytes - 2
    return side(fmt.k_codec, fmt._pairs[0]), side(fmt.v_codec, fmt._pairs[1]), (0, nk, nk + nv, nk + nv + 2)


def supported(fmt) -> bool:  # noqa: ANN001 - E8KVFormat
    """True when both K and V decode by pair tables in a rotated domain (the E8 ``e8``/``e8s`` codes)."""
    return fmt.pair_decoded


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, rows: torch.Tensor,
                     seqs: torch.Tensor, lens: torch.Tensor, fmt, out: torch.Tensor,  # noqa: ANN001
                     key_bias=None, scale: float = 1.0) -> None:  # noqa: ANN001 - reference.KeyBias
    """Decode rows of a batch, rotated domain, into ``out`` (see the module docstring).

    Args:
        q: float32 [T, H_q, D], rotated and scaled (contiguous CPU tensor).
        kv_cache: uint8 [num_blocks, H_kv, block_size, slot_bytes] (CPU, any strides).
        block_table: int [B, max_blocks]; rows / seqs / lens: int [R] — query row, its sequence's
            block-table row and length, per decode row.
        fmt: :class:`~e8vllm.kernels.reference.E8KVFormat` with :func:`supported`.
        out: float32 [T, H_q, D] (contiguous); rows ``rows`` are overwritten.
        key_bias: optional ``reference.KeyBias`` (coef [T, H_q, D] + table [P, D], first [T, H_q]).
        scale: multiplies the key-bias terms (the softmax scale; q is already scaled).
    """
    if numba is None:
        raise RuntimeError("numba is not installed (pip install 'e8vllm[cpu]')")
    (kb, k_sw, kgb, kpairs, k_stab), (vb, v_sw, vgb, vpairs, v_stab), offsets = _constants(fmt)
    coef = np.zeros((0, 1, 1), np.float32)  # empty: no term
    table = np.zeros((0, 1), np.float32)
    first = np.zeros((0, 1), np.float32)
    if key_bias is not None:
        if key_bias.coef is not None:
            coef = np.ascontiguousarray(key_bias.coef.float().numpy())
            table = np.ascontiguousarray(key_bias.table.float().numpy())
        if key_bias.first is not None:
            first = np.ascontiguousarray(key_bias.first.float().numpy())
    _attend(q.numpy(), kv_cache.numpy(), block_table.numpy(), rows.to(torch.int64).numpy(),
            seqs.to(torch.int64).numpy(), lens.to(torch.int64).numpy(), kb, vb, *offsets,
            kpairs, vpairs, k_sw, v_sw, kgb, vgb, k_stab, v_stab, _fp16_table(), coef, table, first,
            np.float32(scale), out.numpy())
