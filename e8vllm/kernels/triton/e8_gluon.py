r"""Decode attention over the packed E8 cache in Gluon: codes decoded straight into tensor-core registers.

The Triton decode kernel (:func:`e8vllm.kernels.triton.e8_kv._e8_decode_kernel`) decodes a tile of
codes into a blocked register layout and lets the compiler move it into the ``mma`` operand layout
through shared memory (a store and an ``ldmatrix`` of every decoded value), and looks values up with
``tl.gather``. On the H200 that kernel reads the cache at under 20 % of the copy bandwidth; its
shared-memory traffic alone (two 16 KiB operand round trips per 64 tokens and head) bounds it. This
kernel is written in Gluon (Triton's layout-explicit dialect) so that nothing but the 256-byte value
table goes through shared memory:

* **Coordinate order.** Attention is invariant to a permutation π of the rotated coordinates applied
  to both q and k (and v's coordinates only have to be un-permuted in the output). Each thread of an
  ``mma.m16n8k16`` operand holds a fixed set of k-indices; π is chosen so that every such set is a
  union of whole 8-blocks (E8 words), i.e. each thread decodes exactly the words it needs:

  - keys, A operand [16 tokens, D] of S^T = K·Q^T: lane (g, t) (g = lane // 4, t = lane % 4) holds
    tokens g, g + 8 and the operand positions κ = i₀ + 2t + 8i₁ + 16i₂ + 32m of words t + 4m
    (field i = i₀ + 2i₁ + 4i₂);
  - values, A operand [D, 16 tokens] of O^T = V^T·P^T: lane (g, t) holds tokens 2t, 2t + 1, 2t + 8,
    2t + 9 and κ = g + 8i₀ + 16i₁ + 32i₂ + 64x of words g + 8x.

  The words are loaded in a linear layout whose join/permute/reshape into [16, D] (or [D, 16]) *is*
  the operand layout, so the ``convert_layout`` to it is a register renaming (``assert_trivial``).
* **Lookup.** The K and V tables (fp16, index (set << 5) | (c << 4) | v, 64 entries each) are stored
  once per program in shared memory at offset 0; a value is one ``ld.shared.u16`` at byte offset
  ``((w >> (4i - 1)) & 0x1E) | cb`` with the word's table base cb = table | c << 5 | set << 6
  (inline PTX: shift, ``lop3``, load; the table is 128-byte aligned, so the base is or-ed in).
* **Arithmetic decode** (``AR``, bit 0 the keys, bit 1 the values: the default for cubic-level codes,
  ``e8c-4bit``: :mod:`e8vllm.codecs.e8c`; session 13, per side since session 14, when the default
  became ``e8c-4bit`` keys with ``e8s-4bit`` values): a level is T[set, c, n] = ((c3·z + c2)·z + c1)·z + c0 in fp16 with z = n − 7, so no
  lookup is needed. A ``lop3`` with mask 0x000F000F (or 0x00F000F0) and magic 0x64006400 (0x54005400)
  puts two 4-bit fields into the mantissas of an fp16x2 register (1024 + n, or 64 + n for the fields
  at bits 4-7); ``sub.f16x2`` gives z exactly and three ``fma.rn.f16x2`` the two levels, bit for bit
  the codec's table (Horner in fp16, one rounding per step). Each fp16x2 result is one mma operand
  register, so the pairs are chosen to be operand pairs: for keys the fields j and j + 4 of a word
  (the key order becomes κ = b2 + 2t + 8·b0 + 16·b1 + 32m, field i = b0 + 2·b1 + 4·b2,
  :func:`key_order` with ``ar``); for values the same field of tokens 2i and 2i + 1 (their words
  byte-permuted together first, ``prmt``). The coefficients of a key word's (set, coset), as four
  (c, c) fp16x2 words, or of a value word pair's two (set, coset)s, as (c_a, c_b), are one
  ``ld.shared.v4`` from an 80-word image (:func:`_tables`). The parity fix of field 7 is an
  ``and``, a multiply ((w & 0x1111111) · 0x11111110 sums fields 0..6's low bits into bit 28) and a
  ``lop3``. SASS (sm_90, offline): 741 instructions per 16-token step against 832 with lookups, 256 of
  them fp16x2 FMA-pipe operations and about half the integer ALU work.
* **Math** (per program = (sequence, kv head, KV segment), one warp): S^T = K̃·q̃^T per 16-token tile
  with fp16 operands and float32 accumulation, scaled per key by its scale s_k, an online softmax in
  base 2 per query head, P^T·s_v in fp16 moved to the B-operand layout (16 × N values, within the
  warp), O^T += Ṽ^T·P^T. Partials (m, l, unnormalized o in the natural rotated order) go to the same
  workspace as the Triton kernel's and are merged by the same output kernel. The numbers are the Triton
  kernel's (same operand precision), only summed in another order.

Settings (``e8_kv.DECODE_CONFIG``, keys ``gluon_*``; timed on the H200 in sessions 11 and 12, 64 x 8k,
none faster than the default beyond the run-to-run spread): 16-token steps (32: 719 us against 431
us), key lookups by value (``kp`` 1: pairs, 32 bits per two keys, 8 % fewer instructions, 428-431 us),
value tables in the value layout (``lut`` 1: the byte layout of :func:`_word_values_b`, one shift per
byte, 441 us), no prefetch (``prefetch`` 1: the next step's codes in flight during this one, 168
registers, 432-435 us; 2: the next step's block id, 446 us), rescaling every step (``lazy`` 1: only
when a maximum grows, 441 us), no forced ordering (``order`` 1: value lookups after the softmax, 450
us); ``diag`` (benchmarks only) drops the code loads (1) or the lookups (2) for timing floors.
``async`` 1 (the default since session 13): the codes of the next
tile are copied with ``cp.async`` into a two-stage ring in shared memory (coalesced: lanes along a
token's words; 4-word groups xor-swizzled by the token, so that by the layout's arithmetic the lanes of
one key- or value-layout read hit distinct banks at head size 128: not yet profiled) while this tile
is decoded, in the same allocation as the table image,
which stays at offset 0; no registers hold codes in flight (H200, session 13, 64 x 8k: 412.8 against
434.4 us with lookups, 363.8 against 370.8 us with the arithmetic decode).
Session 13, one cache of ``e8c-4bit`` codes (64 x 8k, ``tune_decode_s13_cubic.json``): arithmetic
decode 370.8 us against 434.4 us for lookups of the same codes; with the ring 361.5-363.8 us; no code
loads (timing floor) 314.5 us; 96 registers 405.7 us.
Session 14 (``bench.gpu kernel``, one run, whole attention op, ring): 64 x 8k 414.7 us (``e8s`` lookups
for both), 386.9 us (arithmetic keys, looked-up ``e8s`` values: the default), 364.6 us (both
arithmetic); SASS per 16-token step with the ring (sm_90, offline) 870 / 812 / 756 instructions.
Session 16: the slot stride is a constexpr (``CS2``) and a whole tile's ring copies are unmasked, so
each ``cp.async`` is one base register plus an immediate offset (the default's taken path: 1,501
instead of 1,624 SASS instructions per two steps; H200, whole op, 64 x 8k: 350.0 against 366.1 us
earlier that session), and the default caps the kernel at 128 registers (``gluon_maxnreg``; no
spills offline; 338.0 against 350.0 us, 16 warps per SM instead of 12). ``gluon_lut`` 2 (session 16):
values looked up two fields at a time as 32-bit entries of the 4-bit pair table (4 KiB at
byte 0 of the image, the key part at :data:`VPAIR_KEY_BYTES`; two ``prmt`` per two tokens make the
operand registers; :data:`_VP_ASM`), 1,489 instead of 1,680 SASS instructions per two steps at 128
registers offline, but 16 KiB of shared memory per program instead of 8 (allocations are powers of two);
on the H200 (session 17) correct but not faster (339.2 against 336.2 us at 64 x 8k): its random 32-bit
lookups conflict on shared-memory banks (32.7 M wavefronts against 11.0 M ideal) and the larger
allocation lowers the occupancy. Nsight Compute on the default (session 17, 64 x 8k): 779 warp
instructions per 16-token step, 66.6 % of issue slots busy, the integer ALU pipe 61.5 %, no bank
conflicts: bound by instruction issue (session 12's kernel: the ALU pipe 68 % busy, 25 % of the stalls
waiting on the code loads, 16 warps per SM at 128 registers).

Supported: 4-bit K and V codes of the pair-table E8 codecs (``e8-4``, ``e8s-4``, ``e8c-4``: the last
decoded arithmetically, on either side), head size 64 or 128, block size a multiple of the step, up to 16 query heads per kv head (:func:`gluon_supported`).
Gluon kernels do not run in ``TRITON_INTERPRET``; CPU tests compile them for sm_90 instead.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

__all__ = ["gluon_supported", "gluon_decode", "gluon_tables", "launch_constexprs", "key_order", "value_order", "TILE"]

#: a CTA barrier: ``thread_barrier`` in Triton 3.6 (vLLM 0.26's), renamed ``barrier`` later
_cta_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier
#: shared-memory views change type with ``_reinterpret`` in Triton 3.6 (vLLM 0.26's), ``reinterpret`` later
_PRIVATE_REINTERPRET = gl.constexpr(hasattr(gl.shared_memory_descriptor, "_reinterpret"))
#: ``cp.async`` into shared memory: ``async_copy_global_to_shared`` in Triton 3.6, ``async_load`` later
#: (resolved here: the JIT's dependency scan looks up every attribute a kernel names, taken branch or not)
_cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
#: tokens per tile (one m16n8k16 M or K extent)
TILE = 16
#: bytes of one codec's value table in shared memory (64 fp16 entries: 2 sets x 2 cosets x 16 levels)
TABLE_BYTES = gl.constexpr(128)
#: bytes of a 4-bit pair table (2 sets x 2 cosets x 256 int32)
PAIR_BYTES = gl.constexpr(4096)


def gluon_supported(fmt, block_size: int, nq: int, tile: int = TILE) -> bool:  # noqa: ANN001 - TritonE8Format
    """True when this kernel runs ``fmt`` (a ``TritonE8Format``) at this cache block size, GQA group
    and tile (a tile must lie in one cache block)."""
    return (fmt.head_size in (64, 128) and fmt.k.bits == 4 and fmt.v.bits == 4 and block_size % tile == 0
            and 1 <= nq <= 16)


def key_order(d: int, ar: bool = False) -> torch.Tensor:
    """int64 [d]: natural rotated coordinate (8·word + field) of key operand position κ (``ar``: the
    arithmetic decode's order, whose operand registers pair fields j and j + 4 of a word)."""
    k = torch.arange(d)
    word = ((k >> 1) & 3) + 4 * (k >> 5)
    if ar:
        field = 4 * (k & 1) + ((k >> 3) & 1) + 2 * ((k >> 4) & 1)
    else:
        field = (k & 1) + 2 * ((k >> 3) & 1) + 4 * ((k >> 4) & 1)
    return 8 * word + field


def value_order(d: int) -> torch.Tensor:
    """int64 [d]: natural rotated coordinate of value operand position κ."""
    k = torch.arange(d)
    return 8 * ((k & 7) + 8 * (k >> 6)) + ((k >> 3) & 7)


@gluon.constexpr_function
def _layout(name, d, n_pad, tile):
    """Layout ``name`` of the kernel for head size ``d``, ``n_pad`` (8 or 16) query-head columns and
    ``tile`` (16 or 32) tokens per step (token bit 4 in registers): MMA (the m16n8 accumulator), LK /
    LV (key / value words [tile, d / 8]), OPA / OPB (the mma operands), TABL (the table load), SMEM.
    Built while the kernel compiles: the layouts are not kernel arguments, because Triton's JIT hooks
    (vLLM's JIT monitor installs one) serialize a launch's constexpr arguments as JSON, which layout
    objects are not. Self-contained: a compile-time function may reference no Python helpers."""
    g = d // 8
    gbits = g.bit_length() - 1
    extra = [[16, 0]] if tile == 32 else []
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    if name == "MMA":
        return mma
    if name == "LK":  # registers token bit 3, then the word bits above t; lanes t (word bits 0, 1), tokens 0..7
        return gl.DistributedLinearLayout(reg_bases=[[8, 0]] + [[0, 4 << i] for i in range(gbits - 2)] + extra,
                                          lane_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]],
                                          warp_bases=[], block_bases=[], shape=[tile, g])
    if name == "LV":  # registers token bits 0, 3, the word bits above g; lanes token bits 1, 2, word bits 0..2
        return gl.DistributedLinearLayout(reg_bases=[[1, 0], [8, 0]] + [[0, 8 << i] for i in range(gbits - 3)] + extra,
                                          lane_bases=[[2, 0], [4, 0], [0, 1], [0, 2], [0, 4]],
                                          warp_bases=[], block_bases=[], shape=[tile, g])
    if name in ("OPA", "OPB"):
        return gl.DotOperandLayout(0 if name == "OPA" else 1, mma, 2)
    if name == "TABL":
        return gl.BlockedLayout([4], [32], [1], [0])
    if name == "SMEM":
        return gl.SwizzledSharedLayout(1, 1, 1, [0])
    if name == "RING":  # code ring [stages x tile, 2g] (``async``): 4-word groups xor-swizzled by the token
        return gl.SwizzledSharedLayout(4, 1, 8 if 2 * g >= 32 else 4, [1, 0])
    if name == "CP":  # the ring copy [tile, 2g]: lanes along a token's words
        return gl.BlockedLayout([1, 1], [32 // (2 * g), 2 * g], [1, 1], [1, 0])
    if name == "CPT":  # the tails copy [tile]
        return gl.BlockedLayout([1], [32], [1], [0])
    raise ValueError(f"unknown layout {name!r}")


@gluon.jit
def _lookup(off):
    """fp16 at byte ``off`` of the kernel's shared memory (the value tables sit at offset 0)."""
    return gl.inline_asm_elementwise(
        "{ .reg .u32 a; mov.u32 a, global_smem; add.u32 a, a, $1; ld.shared.b16 $0, [a]; }",
        "=h,r", [off], dtype=gl.float16, is_pure=True, pack=1)


@gluon.jit
def _lookup_pair(off):
    """The two fp16 halves (low, high) of the int32 at byte ``off`` of the kernel's shared memory."""
    return gl.inline_asm_elementwise(
        "{ .reg .u32 a; .reg .b32 x; mov.u32 a, global_smem; add.u32 a, a, $2; ld.shared.b32 x, [a]; "
        "mov.b32 {$0, $1}, x; }",
        "=h,=h,r", [off], dtype=(gl.float16, gl.float16), is_pure=True, pack=1)


@gluon.jit
def _join8(v0, v1, v2, v3, v4, v5, v6, v7):
    """Eight equal-shaped tensors (fields 0..7) -> one with three trailing dims of 2 (field bits 0, 1, 2)."""
    return gl.join(gl.join(gl.join(v0, v1), gl.join(v2, v3)), gl.join(gl.join(v4, v5), gl.join(v6, v7)))


@gluon.jit
def _word_bits(w, sw, SHIFT: gl.constexpr, SETS: gl.constexpr, GB: gl.constexpr, G: gl.constexpr, L: gl.constexpr,
               PSHIFT: gl.constexpr):
    """(parity of fields 0..6 at bit PSHIFT, the table bits of block words w [16, G] (layout L)): the
    coset bit (bit 28) at byte-offset bit SHIFT and, with SETS = 2, the block's table set
    ((sw >> (g // GB)) & 1 of switch bytes sw [16]) at bit SHIFT + 1."""
    LOW: gl.constexpr = 0x1111111
    par = (((w & LOW) * LOW) >> (24 - PSHIFT)) & (1 << PSHIFT)  # the low bits of fields 0..6 summed into bit 24
    cb = (w >> (28 - SHIFT)) & (1 << SHIFT)
    if SETS == 2:
        wi = gl.arange(0, G, gl.SliceLayout(0, L))
        cb = cb | (((sw[:, None] >> (wi // GB)[None, :]) & 1) << (SHIFT + 1))
    return par, cb


@gluon.jit
def _word_pairs(w, sw, SETS: gl.constexpr, GB: gl.constexpr, G: gl.constexpr, L: gl.constexpr):
    """As :func:`_word_values` through the pair table at shared-memory offset 0 (int32 (set·2 + c)·256 +
    (f_{2j+1} << 4 | f_{2j}) = fp16 T[f_{2j}] | T[f_{2j+1}] << 16): one 32-bit load per two fields."""
    par, cb = _word_bits(w, sw, 10, SETS, GB, G, L, 6)
    v0, v1 = _lookup_pair(((w << 2) & 0x3FC) | cb)
    v2, v3 = _lookup_pair(((w >> 6) & 0x3FC) | cb)
    v4, v5 = _lookup_pair(((w >> 14) & 0x3FC) | cb)
    v6, v7 = _lookup_pair(((w >> 22) & 0x3BC) | cb | par)  # v_7 = (f_7 & ~1) | parity
    return _join8(v0, v1, v2, v3, v4, v5, v6, v7)


@gluon.jit
def _lookup_d(off, DIAG: gl.constexpr):
    if DIAG & 2:  # a timing diagnostic: no lookup (wrong values)
        return off.to(gl.float16)
    return _lookup(off)


@gluon.jit
def _word_values(w, sw, TOFF: gl.constexpr, SETS: gl.constexpr, GB: gl.constexpr, G: gl.constexpr,
                 L: gl.constexpr, DIAG: gl.constexpr = 0):
    """Block words int32 [16, G] (layout L) of 4-bit codes -> the 8 field values fp16 [16, G, 2, 2, 2]
    (trailing dims: field bits 0, 1, 2). ``sw`` [16]: switch bytes (SETS = 2), ``TOFF``: the table's
    byte offset in shared memory."""
    par, cb = _word_bits(w, sw, 5, SETS, GB, G, L, 1)
    cb = cb | TOFF
    v0 = _lookup_d(((w << 1) & 0x1E) | cb, DIAG)
    v1 = _lookup_d(((w >> 3) & 0x1E) | cb, DIAG)
    v2 = _lookup_d(((w >> 7) & 0x1E) | cb, DIAG)
    v3 = _lookup_d(((w >> 11) & 0x1E) | cb, DIAG)
    v4 = _lookup_d(((w >> 15) & 0x1E) | cb, DIAG)
    v5 = _lookup_d(((w >> 19) & 0x1E) | cb, DIAG)
    v6 = _lookup_d(((w >> 23) & 0x1E) | cb, DIAG)
    v7 = _lookup_d(((w >> 27) & 0x1C) | cb | par, DIAG)  # v_7 = (f_7 & ~1) | parity
    return _join8(v0, v1, v2, v3, v4, v5, v6, v7)


#: one word's 8 lookups in the byte layout (:func:`_word_values_b`): $8 the word, $9 / $10 the even /
#: odd field table bases, $11 the odd base with the parity bit; one shift per byte of the word
_BYTE_LOOKUP_ASM = gl.constexpr(
    "{ .reg .u32 b, s, t, i; mov.u32 b, global_smem; "
    "shl.b32 t, $8, 1; lop3.b32 i, t, 30, $9, 0xEA; add.u32 i, i, b; ld.shared.b16 $0, [i]; "
    "lop3.b32 i, $8, 240, $10, 0xEA; add.u32 i, i, b; ld.shared.b16 $1, [i]; "
    "shr.u32 s, $8, 8; "
    "shl.b32 t, s, 1; lop3.b32 i, t, 30, $9, 0xEA; add.u32 i, i, b; ld.shared.b16 $2, [i]; "
    "lop3.b32 i, s, 240, $10, 0xEA; add.u32 i, i, b; ld.shared.b16 $3, [i]; "
    "shr.u32 s, $8, 16; "
    "shl.b32 t, s, 1; lop3.b32 i, t, 30, $9, 0xEA; add.u32 i, i, b; ld.shared.b16 $4, [i]; "
    "lop3.b32 i, s, 240, $10, 0xEA; add.u32 i, i, b; ld.shared.b16 $5, [i]; "
    "shr.u32 s, $8, 24; "
    "shl.b32 t, s, 1; lop3.b32 i, t, 30, $9, 0xEA; add.u32 i, i, b; ld.shared.b16 $6, [i]; "
    "lop3.b32 i, s, 224, $11, 0xEA; add.u32 i, i, b; ld.shared.b16 $7, [i]; }")


@gluon.jit
def _word_values_b(w, sw, BASE: gl.constexpr, ISV: gl.constexpr, SETS: gl.constexpr, GB: gl.constexpr,
                   G: gl.constexpr, L: gl.constexpr):
    """As :func:`_word_values` through the byte layout of the tables (:func:`_byte_tables`, at byte
    ``BASE`` of shared memory; ISV 1 = the value tables): the table of slot σ = c + 2·set + 4·ISV holds
    the odd fields' values at (f << 4) | (σ << 1) and the even fields' at 256 + (σ << 5) + (f << 1), so
    a byte of the word shifted once serves both of its fields: the odd one masked in place (& 0xF0),
    the even one after a left shift (which the compiler gives the FMA pipe, not the integer ALU)."""
    par, cb = _word_bits(w, sw, 1, SETS, GB, G, L, 4)
    cbo = cb | (BASE + ISV * 8)
    cbe = cb * 16 + (BASE + 256 + ISV * 128)
    v0, v1, v2, v3, v4, v5, v6, v7 = gl.inline_asm_elementwise(
        _BYTE_LOOKUP_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r", [w, cbe, cbo, cbo | par],
        dtype=(gl.float16,) * 8, is_pure=True, pack=1)
    return _join8(v0, v1, v2, v3, v4, v5, v6, v7)


#: the parity fix of a word $W into register w: field 7's low bit := parity of the low bits of fields
#: 0..6 ((w & 0x1111111) · 0x11111110 sums them into bit 28, which lop3 0xD8 = (a & ~c) | (b & c) takes)
_AR_PARITY = "and.b32 p, {W}, 0x1111111; mul.lo.u32 p, p, 0x11111110; lop3.b32 {w}, {W}, p, 0x10000000, 0xD8; "
#: four fp16x2 operand registers from the fp16x2 magic words x0..x3 (halves 1024 + n in x0 / x2, 64 + n in x1 /
#: x3, bits 0-3 / 4-7 of each half) through the cubic coefficients k3..k0: z = n − 7, ((k3·z + k2)·z + k1)·z + k0
_AR_HORNER = ("sub.rn.f16x2 x0, x0, m0; sub.rn.f16x2 x1, x1, m1; sub.rn.f16x2 x2, x2, m0; sub.rn.f16x2 x3, x3, m1; "
              + "".join(f"fma.rn.f16x2 t, k3, x{i}, k2; fma.rn.f16x2 t, t, x{i}, k1; fma.rn.f16x2 x{i}, t, x{i}, k0; "
                        for i in range(4)))
#: the nibble pairs of a 32-bit register {s} with a 16-bit half per value: x0 (bits 0-3 of each half), x1 (4-7),
#: then after a shift by 8: x2 (8-11), x3 (12-15); lop3 0xEA = (a & b) | c puts them in fp16 mantissas
_AR_MAGIC = ("lop3.b32 x0, {s}, 0x000F000F, 0x64006400, 0xEA; lop3.b32 x1, {s}, 0x00F000F0, 0x54005400, 0xEA; "
             "shr.u32 {s}, {s}, 8; "
             "lop3.b32 x2, {s}, 0x000F000F, 0x64006400, 0xEA; lop3.b32 x3, {s}, 0x00F000F0, 0x54005400, 0xEA; ")
_AR_HEAD = (".reg .b32 w, u, p, a, s, x0, x1, x2, x3, t, m0, m1, k3, k2, k1, k0; "
            "mov.b32 m0, 0x64076407; mov.b32 m1, 0x54705470; mov.u32 a, global_smem; ")
#: one key word's 8 values (fields 0..7 in $0..$7) from word $8 and the byte offset $9 of its coefficient
#: entry (4 x fp16x2 (c, c): k3, k2, k1, k0); operand pairs are fields (j, j + 4)
_AR_KEY_ASM = gl.constexpr(
    "{ " + _AR_HEAD + _AR_PARITY.format(W="$8", w="w") + "add.u32 a, a, $9; ld.shared.v4.b32 {k3, k2, k1, k0}, [a]; "
    + _AR_MAGIC.format(s="w") + _AR_HORNER
    + "mov.b32 {$0, $4}, x0; mov.b32 {$1, $5}, x1; mov.b32 {$2, $6}, x2; mov.b32 {$3, $7}, x3; }")
#: the 16 values of two value words of one field index, tokens 2i ($16) and 2i + 1 ($17): $0..$7 the
#: first token's fields 0..7, $8..$15 the second's; $18: the byte offset of the pair coefficient entry
#: (4 x fp16x2 (c_a, c_b)); operand pairs are the two tokens of one field
_AR_VALUE_ASM = gl.constexpr(
    "{ " + _AR_HEAD + _AR_PARITY.format(W="$16", w="w") + _AR_PARITY.format(W="$17", w="u")
    + "add.u32 a, a, $18; ld.shared.v4.b32 {k3, k2, k1, k0}, [a]; "
    + "prmt.b32 s, w, u, 0x5410; " + _AR_MAGIC.format(s="s") + _AR_HORNER
    + "mov.b32 {$0, $8}, x0; mov.b32 {$1, $9}, x1; mov.b32 {$2, $10}, x2; mov.b32 {$3, $11}, x3; "
    + "prmt.b32 s, w, u, 0x7632; " + _AR_MAGIC.format(s="s") + _AR_HORNER
    + "mov.b32 {$4, $12}, x0; mov.b32 {$5, $13}, x1; mov.b32 {$6, $14}, x2; mov.b32 {$7, $15}, x3; }")
@gluon.constexpr_function
def _value_coef_base(ar):
    """Byte offset of the value pair coefficients (16 entries of 16 bytes) in the image of arithmetic
    mode ``ar`` (:func:`_tables`): after the key coefficients (``ar`` 3: 4 entries of 16 bytes) or after
    the key lookup table (2: 64 fp16)."""
    return 64 if ar & 1 else 128


@gluon.jit
def _word_values_ar(w, cb):
    """Key words int32 [16, G] -> their field values fp16 [16, G, 2, 2, 2] by the cubic of each word's
    (set, coset) (``cb``: byte offset 16·(c + 2·set) of its coefficient entry)."""
    v0, v1, v2, v3, v4, v5, v6, v7 = gl.inline_asm_elementwise(
        _AR_KEY_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [w, cb], dtype=(gl.float16,) * 8, is_pure=True, pack=1)
    return _join8(v0, v1, v2, v3, v4, v5, v6, v7)


@gluon.jit
def _split_tokens(x, TN: gl.constexpr, G: gl.constexpr):
    """[TN, G] -> (tokens 0, 2, 4, .. ; tokens 1, 3, 5, ..), each [TN / 2, G] (token bit 0 is a register bit)."""
    return gl.split(gl.permute(gl.reshape(x, [TN // 2, 2, G]), [0, 2, 1]))


@gluon.jit
def _value_words_ar(w, cb, TN: gl.constexpr, G: gl.constexpr, VCB: gl.constexpr):
    """Value words int32 [TN, G] (cb: as :func:`_word_values_ar`) -> fp16 [TN, G, 2, 2, 2], two tokens
    (2i, 2i + 1) per asm call so that each fp16x2 result is one operand register; the pair coefficients
    start at byte VCB of shared memory."""
    wa, wb = _split_tokens(w, TN, G)
    ca, cc = _split_tokens(cb, TN, G)
    o = gl.inline_asm_elementwise(
        _AR_VALUE_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,r,r,r",
        [wa, wb, ca + 4 * cc + VCB], dtype=(gl.float16,) * 16, is_pure=True, pack=1)
    x = _join8(gl.join(o[0], o[8]), gl.join(o[1], o[9]), gl.join(o[2], o[10]), gl.join(o[3], o[11]),
               gl.join(o[4], o[12]), gl.join(o[5], o[13]), gl.join(o[6], o[14]),
               gl.join(o[7], o[15]))  # [TN/2, G, tok, b0, b1, b2]
    return gl.reshape(gl.permute(x, [0, 2, 1, 3, 4, 5]), [TN, G, 2, 2, 2])


#: ``gluon_lut`` 2 (value pairs): the key part of the table image starts at this byte (the value pair
#: table, 4 KiB, is at byte 0)
VPAIR_KEY_BYTES = gl.constexpr(4096)


def _vp_asm() -> str:
    """The value-pair lookup of two value words of one field index, tokens 2i ($16) and 2i + 1 ($17), $18 /
    $19 their pair-table bases ((set·2 + c) << 10): $0..$7 the first token's fields 0..7, $8..$15 the
    second's. Field 7's low bit := the parity of fields 0..6 (as ``_AR_PARITY``); then per byte j of each
    word one ``ld.shared.b32`` of its pair entry (fields 2j, 2j + 1: fp16 T[f_2j] | T[f_2j+1] << 16 at
    byte base | byte_j << 2) and two ``prmt`` that make the operand registers (token 2i, 2i + 1) of
    fields 2j and 2j + 1."""
    a = ("{ .reg .u32 b, wa, wb, p, ia, ib, pa, pb, x, y; mov.u32 b, global_smem; "
         + _AR_PARITY.format(W="$16", w="wa") + _AR_PARITY.format(W="$17", w="wb"))
    for j in range(4):
        for w, i, c, r in (("wa", "ia", "$18", "pa"), ("wb", "ib", "$19", "pb")):
            a += f"shl.b32 {i}, {w}, 2; " if j == 0 else f"shr.u32 {i}, {w}, {8 * j - 2}; "
            a += f"lop3.b32 {i}, {i}, 0x3FC, {c}, 0xEA; add.u32 {i}, {i}, b; ld.shared.b32 {r}, [{i}]; "
        a += "prmt.b32 x, pa, pb, 0x5410; prmt.b32 y, pa, pb, 0x7632; "
        a += f"mov.b32 {{${2 * j}, ${8 + 2 * j}}}, x; mov.b32 {{${2 * j + 1}, ${9 + 2 * j}}}, y; "
    return a + "}"


_VP_ASM = gl.constexpr(_vp_asm())


@gluon.jit
def _value_words_vp(w, cb, TN: gl.constexpr, G: gl.constexpr):
    """Value words int32 [TN, G] (cb: their pair-table bases, :func:`_word_bits` at SHIFT 10) -> fp16 [TN, G,
    2, 2, 2] through the value pair table at byte 0 (:data:`_VP_ASM`, two tokens per call)."""
    wa, wb = _split_tokens(w, TN, G)
    ca, cc = _split_tokens(cb, TN, G)
    o = gl.inline_asm_elementwise(
        _VP_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r",
        [wa, wb, ca, cc], dtype=(gl.float16,) * 16, is_pure=True, pack=1)
    x = _join8(gl.join(o[0], o[8]), gl.join(o[1], o[9]), gl.join(o[2], o[10]), gl.join(o[3], o[11]),
               gl.join(o[4], o[12]), gl.join(o[5], o[13]), gl.join(o[6], o[14]),
               gl.join(o[7], o[15]))  # [TN/2, G, tok, b0, b1, b2]
    return gl.reshape(gl.permute(x, [0, 2, 1, 3, 4, 5]), [TN, G, 2, 2, 2])


@gluon.jit
def _tile_block(bt_row, j, seg_end, TN: gl.constexpr, BLOCK_SIZE: gl.constexpr):
    """The cache block of tile j (0 past ``seg_end``: a prefetch loads nothing there)."""
    n0 = j * TN
    return gl.load(bt_row + n0 // BLOCK_SIZE, mask=n0 < seg_end, other=0)


@gluon.jit
def _tile_words(cache_ptr, blk, kvh_off, cs0, cs2, j, seg_end, tk, wk, tv, wv, TN: gl.constexpr,
                BLOCK_SIZE: gl.constexpr, G: gl.constexpr, DIAG: gl.constexpr = 0):
    """The codes of tile j in cache block ``blk`` (tokens j·TN + [0, TN), those >= seg_end masked):
    key words [TN, G] and tails [TN] in the key layout, value words and tails in the value layout.
    DIAG & 1 (a timing diagnostic): no loads, synthetic words."""
    n0 = j * TN
    if DIAG & 1:
        h = n0 * 0x2E3779B1 + blk
        wkk = (tk[:, None] * 0x01234567 + wk[None, :] * 0x2545F491 + h) ^ (h >> 7)
        wvv = (tv[:, None] * 0x01234567 + wv[None, :] * 0x2545F491 + h) ^ (h >> 9)
        sck = (tk * 0x11 + h) & 0x7F7F7F7F | 0x40004000
        scv = (tv * 0x11 + h) & 0x7F7F7F7F | 0x40004000
        return wkk, sck, wvv, scv
    base = cache_ptr + (blk.to(gl.int64) * cs0 + kvh_off + (n0 % BLOCK_SIZE) * cs2)
    mk = (n0 + tk) < seg_end
    wkk = gl.load(base + (tk * cs2)[:, None] + wk[None, :], mask=mk[:, None], other=0)
    sck = gl.load(base + tk * cs2 + 2 * G, mask=mk, other=0)
    mv = (n0 + tv) < seg_end
    wvv = gl.load(base + (tv * cs2)[:, None] + (G + wv)[None, :], mask=mv[:, None], other=0)
    scv = gl.load(base + tv * cs2 + 2 * G, mask=mv, other=0)
    return wkk, sck, wvv, scv


@gluon.jit
def _as_ring(buf, RO: gl.constexpr, ROWS: gl.constexpr, COLS: gl.constexpr, RING: gl.constexpr):
    """The words [RO, RO + ROWS·COLS) of the int32 buffer ``buf`` as a [ROWS, COLS] view in layout RING."""
    if _PRIVATE_REINTERPRET:
        return buf.slice(RO, ROWS * COLS)._reinterpret(gl.int32, [ROWS, COLS], RING)
    else:
        return buf.slice(RO, ROWS * COLS).reinterpret(gl.int32, [ROWS, COLS], RING)


@gluon.jit
def _ring_issue(ring_st, tails_st, cache_ptr, bt_row, kvh_off, cs0, cs2, jj, seg_end, ct, cw, tt, TN: gl.constexpr,
                BLOCK_SIZE: gl.constexpr, G: gl.constexpr):
    """Start copying tile jj's codes (K and V words of its TN tokens, then their tails) into one ring
    stage with ``cp.async`` (tokens >= seg_end are not read: zero-filled), as one commit group."""
    n0 = jj * TN
    blk = gl.load(bt_row + n0 // BLOCK_SIZE, mask=n0 < seg_end, other=0)
    base = cache_ptr + (blk.to(gl.int64) * cs0 + kvh_off + (n0 % BLOCK_SIZE) * cs2)
    if n0 + TN <= seg_end:  # a whole tile (all but a segment's last): no masks; with the slot stride a
        # constexpr every copy's address is one base plus an immediate offset
        _cp_async(ring_st, base + (ct * cs2)[:, None] + cw[None, :])
        _cp_async(tails_st, base + tt * cs2 + 2 * G)
    else:
        _cp_async(ring_st, base + (ct * cs2)[:, None] + cw[None, :], mask=((n0 + ct) < seg_end)[:, None])
        _cp_async(tails_st, base + tt * cs2 + 2 * G, mask=(n0 + tt) < seg_end)
    async_copy.commit_group()


@gluon.jit
def _ring_words(ring_st, tails_st, G: gl.constexpr, LK: gl.constexpr, LV: gl.constexpr):
    """A ring stage's key words / tails (key layout) and value words / tails (value layout)."""
    wkk = ring_st.slice(0, G, dim=1).load(LK)
    wvv = ring_st.slice(G, G, dim=1).load(LV)
    sck = tails_st.load(gl.SliceLayout(1, LK))
    scv = tails_st.load(gl.SliceLayout(1, LV))
    return wkk, sck, wvv, scv


@gluon.jit
def _tile_math(wkk, sck, wvv, scv, j, q, m_i, l_i, acc, ts, limit, k_stab, v_stab, TN: gl.constexpr,
               NP: gl.constexpr, D: gl.constexpr, G: gl.constexpr, KP: gl.constexpr, LUT: gl.constexpr,
               LAZY: gl.constexpr, ORDER: gl.constexpr, DIAG: gl.constexpr, KS: gl.constexpr, VS: gl.constexpr,
               KGB: gl.constexpr, VGB: gl.constexpr, MMA: gl.constexpr, LK: gl.constexpr, LV: gl.constexpr,
               OPA: gl.constexpr, OPB: gl.constexpr, ASYNC: gl.constexpr = 0, AR: gl.constexpr = 0):
    """One 16-token step of tile j: its key words / tails (key layout) and value words / tails (value
    layout) decoded into the mma operands, scores (tokens >= ``limit`` masked), online softmax,
    accumulation; (m_i, l_i, acc). ASYNC: the value scales of masked tokens are zeroed too (their
    codes come from the ring, not from a masked load)."""
    n0 = j * TN
    if KS == 2:
        swk = sck & 255
    else:
        swk = sck
    if VS == 2:
        swv = (scv >> 16) & 255
    else:
        swv = scv
    if AR & 1:  # arithmetic key decode; operand pairs are fields (j, j + 4): κ = b2 + 2t + 8·b0 + 16·b1 + 32m
        kcb = _word_bits(wkk, swk, 4, KS, KGB, G, LK, 1)[1]
        xk = _word_values_ar(wkk, kcb + (VPAIR_KEY_BYTES if LUT == 2 else 0))
        xk = gl.permute(gl.reshape(xk, [TN, G // 4, 4, 2, 2, 2]), [0, 1, 4, 3, 2, 5])
    else:
        if KP:
            xk = _word_pairs(wkk, swk, KS, KGB, G, LK)  # [TN, G, 2, 2, 2]
        elif LUT == 1:
            xk = _word_values_b(wkk, swk, 0, 0, KS, KGB, G, LK)
        else:
            xk = _word_values(wkk, swk, VPAIR_KEY_BYTES if LUT == 2 else 0, KS, KGB, G, LK, DIAG)
        xk = gl.permute(gl.reshape(xk, [TN, G // 4, 4, 2, 2, 2]), [0, 1, 5, 4, 2, 3])
    ka = gl.convert_layout(gl.reshape(xk, [TN, D]), OPA, assert_trivial=True)
    s = mma_v2(ka, q, gl.zeros([TN, NP], gl.float32, MMA))
    sc = gl.convert_layout(sck, gl.SliceLayout(1, MMA))
    if KS == 2:
        sk = gl.load(k_stab + ((sc >> 8) & 255))
    else:
        sk = sc.to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
    if VS == 2:
        sv = gl.load(v_stab + ((sc >> 24) & 255))
    else:
        sv = (sc >> 16).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
    s = gl.where(((n0 + ts) < limit)[:, None], s * sk[:, None], float("-inf"))
    if ASYNC:
        sv = gl.where((n0 + ts) < limit, sv, 0.0)
    m_new = gl.maximum(m_i, gl.max(s, axis=0))
    p = gl.exp2(s - m_new[None, :])
    pb = gl.convert_layout((p * sv[:, None]).to(gl.float16), OPB)
    if ORDER:  # the value lookups wait for the softmax (Σp <= TN·NP never exceeds 1e9): fewer live registers
        swv = swv | (gl.sum(gl.sum(p, axis=1), axis=0) > 1.0e9).to(gl.int32)
    if AR & 2:
        xv = _value_words_ar(wvv, _word_bits(wvv, swv, 4, VS, VGB, G, LV, 1)[1], TN, G,
                             _value_coef_base(AR))  # [TN, G, 2, 2, 2]
    elif LUT == 2:  # value pairs: one 32-bit lookup per two fields of a token
        xv = _value_words_vp(wvv, _word_bits(wvv, swv, 10, VS, VGB, G, LV, 6)[1], TN, G)
    elif LUT:
        xv = _word_values_b(wvv, swv, PAIR_BYTES if KP else 0, 1, VS, VGB, G, LV)  # [TN, G, 2, 2, 2]
    else:
        xv = _word_values(wvv, swv, PAIR_BYTES if KP else TABLE_BYTES, VS, VGB, G, LV, DIAG)
    xv = gl.permute(gl.reshape(xv, [TN, G // 8, 8, 2, 2, 2]), [1, 5, 4, 3, 2, 0])
    va = gl.convert_layout(gl.reshape(xv, [D, TN]), OPA, assert_trivial=True)
    if LAZY:  # rescale only when a running maximum grew (warp-uniform branch)
        if gl.max(m_new - m_i, axis=0) > 0.0:
            alpha = gl.exp2(m_i - m_new)
            acc = acc * alpha[None, :]
            l_i = l_i * alpha
        l_i = l_i + gl.sum(p, axis=0)
        acc = mma_v2(va, pb, acc)
    else:
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, axis=0)
        acc = mma_v2(va, pb, acc * alpha[None, :])
    return m_new, l_i, acc


@gluon.jit
def _ring_step(ring, tails, CUR: gl.constexpr, j, cache_ptr, bt_row, kvh_off, cs0, cs2, seg_end, ct, cw, tt, q, m_i,
               l_i, acc, ts, k_stab, v_stab, TN: gl.constexpr, BLOCK_SIZE: gl.constexpr, NP: gl.constexpr,
               D: gl.constexpr, G: gl.constexpr, LUT: gl.constexpr, LAZY: gl.constexpr, ORDER: gl.constexpr,
               KS: gl.constexpr, VS: gl.constexpr, KGB: gl.constexpr, VGB: gl.constexpr, MMA: gl.constexpr,
               LK: gl.constexpr, LV: gl.constexpr, OPA: gl.constexpr, OPB: gl.constexpr, AR: gl.constexpr):
    """Tile j from ring stage CUR while tile j + 1 starts landing in the other stage; (m_i, l_i, acc)."""
    NXT: gl.constexpr = 1 - CUR
    _cta_barrier()  # every lane is done with stage NXT (tile j - 1)
    _ring_issue(ring.slice(NXT * TN, TN), tails.slice(NXT * TN, TN), cache_ptr, bt_row, kvh_off, cs0, cs2, j + 1,
                seg_end, ct, cw, tt, TN, BLOCK_SIZE, G)
    async_copy.wait_group(1)  # tile j has landed
    _cta_barrier()  # ... for every lane's copies
    wkk, sck, wvv, scv = _ring_words(ring.slice(CUR * TN, TN), tails.slice(CUR * TN, TN), G, LK, LV)
    return _tile_math(wkk, sck, wvv, scv, j, q, m_i, l_i, acc, ts, seg_end, k_stab, v_stab, TN, NP, D, G, 0, LUT, LAZY,
                      ORDER, 0, KS, VS, KGB, VGB, MMA, LK, LV, OPA, OPB, 1, AR)


@gluon.jit(do_not_specialize=["sbt0"])  # the block table's row stride: the warm-up's table is not vLLM's
def _gl_decode_kernel(q_ptr, sq0, sq1, ws_m_ptr, ws_l_ptr, ws_o_ptr, cache_ptr, cs0, cs1, tab_ptr,
                      k_stab, v_stab, bt_ptr, sbt0, qsl_ptr, sl_ptr, num_heads,
                      NQ: gl.constexpr, NP: gl.constexpr, D: gl.constexpr, BLOCK_SIZE: gl.constexpr,
                      NUM_SEGS: gl.constexpr, TN: gl.constexpr, KP: gl.constexpr, TABN: gl.constexpr,
                      PF: gl.constexpr, LUT: gl.constexpr, LAZY: gl.constexpr, ORDER: gl.constexpr, DIAG: gl.constexpr,
                      KS: gl.constexpr, VS: gl.constexpr, KGB: gl.constexpr,
                      VGB: gl.constexpr, ASYNC: gl.constexpr, BUFN: gl.constexpr, RO: gl.constexpr,
                      TO: gl.constexpr, AR: gl.constexpr, CS2: gl.constexpr):
    """Flash-decoding partials of one (sequence, kv head, segment) with one warp (module docstring).

    q: float32 [T, H_q, D] rotated (natural order), scaled by scale·log2(e); cache_ptr: the cache as
    int32 words (strides cs0, cs1, CS2; the slot stride CS2 a constexpr, so that the ring's copies
    address one base plus immediate offsets); tab_ptr: the shared-memory image int32 [TABN] (:func:`_tables`);
    k_stab / v_stab: float32 [256] scale tables (e8s) or unread. Writes ws_m / ws_l [B, H_q, S], ws_o [B, H_q, S, D].
    """
    G: gl.constexpr = D // 8
    MMA: gl.constexpr = _layout("MMA", D, NP, TN)
    LK: gl.constexpr = _layout("LK", D, NP, TN)
    LV: gl.constexpr = _layout("LV", D, NP, TN)
    OPA: gl.constexpr = _layout("OPA", D, NP, TN)
    OPB: gl.constexpr = _layout("OPB", D, NP, TN)
    TABL: gl.constexpr = _layout("TABL", D, NP, TN)
    SMEM: gl.constexpr = _layout("SMEM", D, NP, TN)
    seq = gl.program_id(0)
    kvh = gl.program_id(1)
    seg = gl.program_id(2)
    q_start = gl.load(qsl_ptr + seq)
    if gl.load(qsl_ptr + seq + 1) - q_start != 1:  # not a decode row (mixed batch: the tile grid's)
        return
    seq_len = gl.load(sl_ptr + seq)
    tok = q_start.to(gl.int64)

    # value tables at shared-memory offset 0 (the only allocation): int32 [TABN] (:func:`_tables`)
    if ASYNC:  # one allocation at offset 0: the tables, the tails [2 x TN] at TO, the code ring at RO
        tables = gl.allocate_shared_memory(gl.int32, [BUFN], SMEM)
        if LUT == 2:  # 1,024 + 128 words (not a power of two): two stores
            tables.slice(0, 1024).store(gl.load(tab_ptr + gl.arange(0, 1024, TABL)))
            tables.slice(1024, 128).store(gl.load(tab_ptr + 1024 + gl.arange(0, 128, TABL)))
        else:
            tables.slice(0, TABN).store(gl.load(tab_ptr + gl.arange(0, TABN, TABL)))
    else:
        tables = gl.allocate_shared_memory(gl.int32, [TABN], SMEM, gl.load(tab_ptr + gl.arange(0, TABN, TABL)))
    _cta_barrier()

    # query operand [D, NP] in key operand order
    kk = gl.arange(0, D, gl.SliceLayout(1, OPB))
    hh = gl.arange(0, NP, gl.SliceLayout(0, OPB))
    if AR & 1:  # key_order(D, ar=True)
        dn = 8 * (((kk >> 1) & 3) + 4 * (kk >> 5)) + 4 * (kk & 1) + ((kk >> 3) & 1) + 2 * ((kk >> 4) & 1)
    else:  # key_order(D)
        dn = 8 * (((kk >> 1) & 3) + 4 * (kk >> 5)) + (kk & 1) + 2 * ((kk >> 3) & 1) + 4 * ((kk >> 4) & 1)
    q = gl.load(q_ptr + tok * sq0 + (kvh * NQ + hh)[None, :].to(gl.int64) * sq1 + dn[:, None],
                mask=(hh < NQ)[None, :], other=0.0).to(gl.float16)

    n_tiles = gl.cdiv(seq_len, TN)
    per = gl.cdiv(n_tiles, NUM_SEGS)
    j0 = seg * per
    j1 = gl.minimum(j0 + per, n_tiles)
    m_i = gl.full([NP], -1.0e30, gl.float32, gl.SliceLayout(0, MMA))
    l_i = gl.zeros([NP], gl.float32, gl.SliceLayout(0, MMA))
    acc = gl.zeros([D, NP], gl.float32, MMA)
    bt_row = bt_ptr + seq.to(gl.int64) * sbt0
    kvh_off = kvh.to(gl.int64) * cs1
    tk = gl.arange(0, TN, gl.SliceLayout(1, LK))
    wk = gl.arange(0, G, gl.SliceLayout(0, LK))
    tv = gl.arange(0, TN, gl.SliceLayout(1, LV))
    wv = gl.arange(0, G, gl.SliceLayout(0, LV))
    ts = gl.arange(0, TN, gl.SliceLayout(1, MMA))
    seg_end = gl.minimum(seq_len, j1 * TN)  # a prefetched tile past the segment loads nothing
    if ASYNC:  # two-stage cp.async ring: tile j + 1 lands in shared memory while tile j is decoded
        RING: gl.constexpr = _layout("RING", D, NP, TN)
        CP: gl.constexpr = _layout("CP", D, NP, TN)
        CPT: gl.constexpr = _layout("CPT", D, NP, TN)
        ring = _as_ring(tables, RO, 2 * TN, 2 * G, RING)
        tails = tables.slice(TO, 2 * TN)
        ct = gl.arange(0, TN, gl.SliceLayout(1, CP))
        cw = gl.arange(0, 2 * G, gl.SliceLayout(0, CP))
        tt = gl.arange(0, TN, CPT)
        _ring_issue(ring.slice(0, TN), tails.slice(0, TN), cache_ptr, bt_row, kvh_off, cs0, CS2, j0, seg_end, ct, cw,
                    tt, TN, BLOCK_SIZE, G)
        for j in range(j0, j1, 2):  # tiles past j1 (an odd count) are masked: seg_end
            m_i, l_i, acc = _ring_step(ring, tails, 0, j, cache_ptr, bt_row, kvh_off, cs0, CS2, seg_end, ct, cw, tt, q,
                                       m_i, l_i, acc, ts, k_stab, v_stab, TN, BLOCK_SIZE, NP, D, G, LUT, LAZY, ORDER,
                                       KS, VS, KGB, VGB, MMA, LK, LV, OPA, OPB, AR)
            m_i, l_i, acc = _ring_step(ring, tails, 1, j + 1, cache_ptr, bt_row, kvh_off, cs0, CS2, seg_end, ct, cw, tt,
                                       q, m_i, l_i, acc, ts, k_stab, v_stab, TN, BLOCK_SIZE, NP, D, G, LUT, LAZY, ORDER,
                                       KS, VS, KGB, VGB, MMA, LK, LV, OPA, OPB, AR)
        async_copy.wait_group(0)
    else:
        if PF == 1:  # the next tile's words in flight during this one
            wkk, sck, wvv, scv = _tile_words(cache_ptr, _tile_block(bt_row, j0, seg_end, TN, BLOCK_SIZE), kvh_off, cs0,
                                             CS2, j0, seg_end, tk, wk, tv, wv, TN, BLOCK_SIZE, G, DIAG)
        if PF == 2:  # the next tile's block id in flight during this one (one register)
            blk = _tile_block(bt_row, j0, seg_end, TN, BLOCK_SIZE)
        for j in range(j0, j1):
            if PF == 1:
                nk, nsk, nv, nsv = _tile_words(cache_ptr, _tile_block(bt_row, j + 1, seg_end, TN, BLOCK_SIZE), kvh_off,
                                               cs0, CS2, j + 1, seg_end, tk, wk, tv, wv, TN, BLOCK_SIZE, G, DIAG)
            elif PF == 2:
                wkk, sck, wvv, scv = _tile_words(cache_ptr, blk, kvh_off, cs0, CS2, j, seg_end, tk, wk, tv, wv, TN,
                                                 BLOCK_SIZE, G, DIAG)
                blk = _tile_block(bt_row, j + 1, seg_end, TN, BLOCK_SIZE)
            else:
                wkk, sck, wvv, scv = _tile_words(cache_ptr, _tile_block(bt_row, j, seg_end, TN, BLOCK_SIZE), kvh_off, cs0,
                                                 CS2, j, seg_end, tk, wk, tv, wv, TN, BLOCK_SIZE, G, DIAG)
            m_i, l_i, acc = _tile_math(wkk, sck, wvv, scv, j, q, m_i, l_i, acc, ts, seq_len, k_stab, v_stab, TN, NP, D, G,
                                       KP, LUT, LAZY, ORDER, DIAG, KS, VS, KGB, VGB, MMA, LK, LV, OPA, OPB, 0, AR)
            if PF == 1:
                wkk, sck, wvv, scv = nk, nsk, nv, nsv
    tables._keep_alive()
    hm = gl.arange(0, NP, gl.SliceLayout(0, MMA))
    wi = (seq.to(gl.int64) * num_heads + kvh * NQ + hm) * NUM_SEGS + seg  # workspaces are per sequence
    gl.store(ws_m_ptr + wi, m_i, mask=hm < NQ)
    gl.store(ws_l_ptr + wi, l_i, mask=hm < NQ)
    ko = gl.arange(0, D, gl.SliceLayout(1, MMA))
    do = 8 * ((ko & 7) + 8 * (ko >> 6)) + ((ko >> 3) & 7)
    gl.store(ws_o_ptr + (wi * D)[None, :] + do[:, None], acc, mask=(hm < NQ)[None, :])


def _pad(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.numel() > n:
        raise ValueError(f"e8vllm: a {t.numel()}-entry table does not fit the Gluon kernel's {n}")
    return torch.cat([t, t.new_zeros(n - t.numel())])


def _byte_tables(fmt) -> torch.Tensor:  # noqa: ANN001 - TritonE8Format
    """The K and V value tables in the byte layout of :func:`_word_values_b`: fp16 [256] (512 bytes);
    slot σ = c + 2·set + 4·(V) holds T_σ[f] at byte (f << 4) | (σ << 1) (odd fields) and at
    256 + (σ << 5) + (f << 1) (even fields)."""
    out = torch.zeros(256, dtype=torch.float16, device=fmt.k.table_h.device)
    f = torch.arange(16, device=out.device)
    for isv, tab in ((0, fmt.k.table_h), (1, fmt.v.table_h)):
        t = _pad(tab, 64)  # index (set << 5) | (c << 4) | f
        for st in range(2):
            for c in range(2):
                sigma = c + 2 * st + 4 * isv
                vals = t[(st << 5) | (c << 4) | f]
                out[((f << 4) | (sigma << 1)) // 2] = vals
                out[(256 + (sigma << 5) + (f << 1)) // 2] = vals
    return out


def arith_bits(fmt) -> int:  # noqa: ANN001 - TritonE8Format
    """Which fields of ``fmt`` the kernel can decode arithmetically instead of looking them up: bit 0
    the keys, bit 1 the values, set where that codec's level tables are cubic polynomials (``e8c-*``,
    :mod:`e8vllm.codecs.e8c`)."""
    return int(fmt.k.poly is not None) | 2 * int(fmt.v.poly is not None)


def _key_coefs(fmt) -> torch.Tensor:  # noqa: ANN001 - TritonE8Format
    """The arithmetic decode's key entries, int32 [16]: entry c + 2·set is the fp16x2 words (c3, c3),
    (c2, c2), (c1, c1), (c0, c0) of that table's cubic."""
    kp = fmt.k.poly.reshape(4, 4)  # fp16 [set·2 + c, (c3, c2, c1, c0)]
    return torch.stack([kp, kp], -1).contiguous().view(torch.int32).reshape(-1)


def _pair_coefs(fmt) -> torch.Tensor:  # noqa: ANN001 - TritonE8Format
    """The arithmetic decode's value pair entries, int32 [64]: entry a + 4·b, for the tables a of token 2i
    and b of token 2i + 1, is (c3_a, c3_b), ..., (c0_a, c0_b)."""
    vp = fmt.v.poly.reshape(4, 4)
    pairs = torch.stack([vp[None, :, :].expand(4, 4, 4), vp[:, None, :].expand(4, 4, 4)], -1)  # [b, a, j, 2]
    return pairs.contiguous().view(torch.int32).reshape(-1)


def _key_part(fmt, arith: int) -> torch.Tensor:  # noqa: ANN001 - TritonE8Format
    """The keys' part of the table image, int32: the cubic coefficients (``arith`` bit 0) or the fp16 K
    value table (64 entries)."""
    return _key_coefs(fmt) if arith & 1 else _pad(fmt.k.table_h, 64).view(torch.int32)


def _image_words(key_pairs: bool, lut: int, arith: int = 0) -> int:
    """int32 words of the shared-memory table image (:func:`_tables`): a power of two, or with ``lut`` 2
    1,024 + 128 (the value pair table, then the key part)."""
    if lut == 2:
        return 1024 + 128
    return 2048 if key_pairs else (128 if lut or arith & 2 else 64)


def _tables(fmt, key_pairs: bool, lut: int = 0, arith: int = 0) -> torch.Tensor:  # noqa: ANN001 - TritonE8Format
    """The shared-memory image as int32 on the format's device: the K value table (fp16, 64 entries)
    or with ``key_pairs`` the K pair table (int32, 1,024 entries), then the V value table; with
    ``lut`` 1 the value tables in the byte layout (:func:`_byte_tables`, 128 int32) instead of both
    value tables (after the pair table with ``key_pairs``). With the arithmetic decode (``arith``, bits
    as :func:`arith_bits`): 3 = the key coefficients (16 words), then the value pair coefficients (64
    words, byte 64 = :func:`_value_coef_base`); 1 = the key coefficients, then the V value table at byte
    128 (``TABLE_BYTES``); 2 = the K value table, then the value pair coefficients at byte 128. With
    ``lut`` 2: the V pair table (1,024 int32), then the key part at :data:`VPAIR_KEY_BYTES`. Padded to
    :func:`_image_words`."""
    if lut == 2:  # value pairs (int32 [1,024]) at byte 0, the key part at VPAIR_KEY_BYTES
        return torch.cat([_pad(fmt.v.pairs, 1024), _pad(_key_part(fmt, arith), 128)]).contiguous()
    if arith:  # the value part starts at the byte the kernel reads it from
        kpart = _key_part(fmt, arith)
        vpart = _pair_coefs(fmt) if arith & 2 else _pad(fmt.v.table_h, 64).view(torch.int32)
        voff = _value_coef_base(arith) if arith & 2 else TABLE_BYTES.value
        return _pad(torch.cat([_pad(kpart, voff // 4), vpart]), _image_words(False, 0, arith)).contiguous()
    keys = [_pad(fmt.k.pairs, 1024)] if key_pairs else []
    if lut:
        parts = keys + [_byte_tables(fmt).view(torch.int32)]
    else:
        parts = (keys or [_pad(fmt.k.table_h, 64).view(torch.int32)]) + [_pad(fmt.v.table_h, 64).view(torch.int32)]
    return _pad(torch.cat(parts), _image_words(key_pairs, lut)).contiguous()


_TABLES: dict[tuple[int, bool, int, int], torch.Tensor] = {}


def gluon_tables(fmt, key_pairs: bool, lut: int = 0, arith: int = 0) -> torch.Tensor:  # noqa: ANN001
    """:func:`_tables`, built once per format (``e8_kv.prepare_device_constants`` builds them before any
    CUDA-graph capture)."""
    key = (id(fmt), key_pairs, lut, arith)
    tabs = _TABLES.get(key)
    if tabs is None:
        tabs = _TABLES[key] = _tables(fmt, key_pairs, lut, arith)
    return tabs


def launch_constexprs(fmt, *, nq: int, d: int, block_size: int, segs: int, tile: int = TILE,  # noqa: ANN001
                      key_pairs: bool = False, prefetch: int = 0, lut: int = 0, lazy: bool = False,
                      order: bool = False, diag: int = 0, async_ring: int = 0, arith: int = 0,
                      slot_words: int | None = None) -> dict[str, int]:
    """The kernel's compile-time arguments for a launch: plain ints (the layouts are built inside the
    kernel, :func:`_layout`), so that Triton's JIT hooks can serialize them. ``async_ring`` 1: the
    codes go through a two-stage ``cp.async`` ring in shared memory (with value lookups, no register
    prefetch, no diagnostics); its words sit after the table image and the tails (BUFN words in all).
    ``arith``: the fields decoded arithmetically, bit 0 keys, bit 1 values (:func:`arith_bits`; no key
    pairs, no byte tables). ``slot_words``: the cache's slot stride in int32 words (``CS2``; default the
    dense 4-bit slot, 2·d/8 + 1: K words, V words, the tails)."""
    if arith & ~3 or arith & ~arith_bits(fmt):
        raise ValueError(f"e8vllm: arithmetic decode {arith} needs cubic level tables (e8c-*) where it is set "
                         f"(bit 0 keys, bit 1 values); this format has {arith_bits(fmt)}")
    if lut == 2 and (key_pairs or arith & 2 or not async_ring or prefetch or diag):
        raise ValueError("e8vllm: gluon_lut 2 (value pairs) takes the cp.async ring, looked-up values (no "
                         "arithmetic values), no key pairs, no prefetch and no diagnostics")
    if arith and (key_pairs or lut == 1):
        raise ValueError("e8vllm: the arithmetic decode takes gluon_kp 0 and gluon_lut 0")
    tabn = _image_words(key_pairs, lut, arith)
    c = dict(NQ=nq, NP=8 if nq <= 8 else 16, D=d, BLOCK_SIZE=block_size, NUM_SEGS=segs, TN=tile, KP=int(key_pairs),
             TABN=tabn, PF=int(prefetch), LUT=int(lut), LAZY=int(lazy), ORDER=int(order), DIAG=int(diag),
             KS=int(fmt.k.sets), VS=int(fmt.v.sets), KGB=int(fmt.k.group_blocks), VGB=int(fmt.v.group_blocks),
             ASYNC=0, BUFN=tabn, RO=0, TO=0, AR=int(arith),
             CS2=int(2 * (d // 8) + 1 if slot_words is None else slot_words))
    if async_ring:
        if key_pairs or prefetch or diag:
            raise ValueError("e8vllm: the Gluon async ring takes value lookups (gluon_kp 0), no prefetch and no "
                             "diagnostics")
        ring = 2 * tile * (d // 4)  # words: 2 stages x tile tokens x (K + V words); a subview starts at a
        ro = ring * -(-(tabn + 2 * tile) // ring)  # multiple of its size: above the tables and the tails;
        c.update(ASYNC=1, TO=tabn, RO=ro, BUFN=1 << (ro + ring - 1).bit_length())  # allocations: powers of two
    return c


def gluon_decode(qr: torch.Tensor, words: torch.Tensor, fmt, block_table: torch.Tensor,  # noqa: ANN001
                 query_start_loc: torch.Tensor, seq_lens: torch.Tensor, ws_m: torch.Tensor, ws_l: torch.Tensor,
                 ws_o: torch.Tensor, *, num_seqs: int, num_kv_heads: int, block_size: int, segs: int,
                 maxnreg: int = 0, tile: int = TILE, key_pairs: bool = False, prefetch: int = 0, lut: int = 0,
                 lazy: bool = False, order: bool = False, diag: int = 0, async_ring: int = 0, arith: int = 0) -> None:
    """Launch the decode grid (num_seqs, H_kv, segs) writing the workspaces of
    ``e8_kv._e8_output_kernel``. qr: float32 [T, H_q, D] rotated and scaled (natural order)."""
    h_q, d = qr.shape[1], qr.shape[2]
    consts = launch_constexprs(fmt, nq=h_q // num_kv_heads, d=d, block_size=block_size, segs=segs, tile=tile,
                               key_pairs=key_pairs, prefetch=prefetch, lut=lut, lazy=lazy, order=order, diag=diag,
                               async_ring=async_ring, arith=arith, slot_words=words.stride(2))
    tabs = gluon_tables(fmt, key_pairs, lut, arith)  # consts["TABN"] words: both sized by _image_words
    opts = {"num_warps": 1}
    if maxnreg:
        opts["maxnreg"] = maxnreg
    _gl_decode_kernel[(num_seqs, num_kv_heads, segs)](
        qr, qr.stride(0), qr.stride(1), ws_m, ws_l, ws_o, words, words.stride(0), words.stride(1), tabs,
        fmt.k.scales, fmt.v.scales, block_table, block_table.stride(0), query_start_loc, seq_lens, h_q,
        **consts, **opts)
