r"""Fused Triton kernels for the packed E8 KV cache: write path and paged attention.

Math (the same as :mod:`e8vllm.kernels.reference`, which is the reference these kernels are tested
against, and :mod:`e8vllm.codecs.e8`, which defines the code):

* rotation: R = blockdiag(H_b/√b) · diag(s) (``e8vllm.hadamard``). With P = diag(s) · blockdiag(H_b)
  (entries ±1, exact in float32) a row vector rotates as y = x P / √b and rotates back as
  x = y Pᵀ / √b. The write kernel computes x P with an IEEE-float32 ``tl.dot`` when it takes 16 rows
  per program (the reference does the same sum with a butterfly, so y can differ in the last ulp);
  with fewer rows per program (:func:`write_block_rows`) by butterflies in the reference's order
  (:func:`_fwht_rows`, bit for bit the reference's y; since session 14) or, with
  ``E8VLLM_WRITE_ROTATION=dot``, as a sum of 16-column products; then times float32(1/√b).
* encode (per vector y ∈ R^D, D = 8G): for each scale factor f of the codec (9 factors in
  [0.75, 1.25], or f = 1 for the ``-rms`` codecs) s = fp16(RMS(y)·f), u = y / s, and per 8-block of u
  the nearest point of the companded E8 code: per coset c ∈ {0, 1} every coordinate's nearest level
  v_i of the sorted table T_c (count of midpoints below u_i), and if Σ v_i is odd the one
  coordinate whose move to a neighbouring level costs least moves; keep the better coset. The
  factor with the smallest s²·Σ‖u − û‖² (first one on ties) wins. Stored: 8 fields of b bits per block
  (fields 0..6 = v_0..v_6, field 7 = (v_7 with its low bit replaced by c)), little-endian bit stream,
  and the fp16 scale. Switched codes (``e8s-*``, the e8 dtypes' default except for 4-bit keys, :mod:`e8vllm.codecs.e8s`, and ``e8c-4bit``, the same with cubic tables: 4-bit keys by default since session 14):
  the scale candidates are the 9 entries of a 256-entry scale table from exponent
  ⌊10·log2(0.75·RMS)⌋ + 130 up, each 8-block is coded with both table sets and each group of GB
  blocks (GB = 1 at D = 64, 2 at D = 128) keeps the set with the smaller error; the 2-byte tail is
  (switch byte, exponent byte) instead of the fp16 scale. Slot of a (token, kv head) in the cache
  ``uint8 [num_blocks, H_kv, block_size, slot_bytes]``: ``[K fields | V fields | K tail | V tail]``
  (``reference.E8KVFormat``), every part 4-byte aligned, scattered by ``slot_mapping`` (-1 = skip).
* decode (in registers, never to memory): the attention kernels read the slot as int32 words. Per
  8-block word w (8·b bits): c = bit 7b, parity p of Σ_{i<7} f_i (one multiply for b = 3, 4: the
  low bits of the seven fields summed into bit 6b; a xor fold for b = 2), v_7 = (f_7 & ~1) | p. The
  values come out two at a time: the 2b-bit index of fields (2j, 2j+1), with c on top, selects an
  int32 of the *pair table* P_c[(f_{2j+1} << b) | f_{2j}] = fp16 T_c[f_{2j}] | fp16 T_c[f_{2j+1}] << 16
  (2·4^b entries: 2 KiB at b = 4), split into its two fp16 halves. The vector is s · value
  (rotated domain). Switched codes: the block's set bit sits above the coset bit in every index
  (tables of 4·2^b values / 4·4^b pairs) and s is the scale table's entry of the exponent byte.
* attention in the rotated domain: q·k = (qR)·(kR), so the query is rotated once (one matmul,
  folded with the softmax scale and log2(e)), scores are s_k · (q̃ · T[k]) (the scale applied per key
  column after the dot), probabilities p use exp2 with an online softmax (flash attention), the
  output accumulates (p·s_v) · T[v] and is rotated back once: o = õ Rᵀ... (one matmul). Dot operands
  are fp16 (q̃, the table values T ∈ [-4, 4], p·s_v ≤ 65504), accumulation float32.

Kernels:

* :func:`_e8_write_kernel`: one program per ``BLOCK_R`` (token, head) rows of K or V (program axis 1):
  load, rotate, scale search (a loop over the candidates), E8 nearest point, pack, scatter; K and V
  in one launch; ``BLOCK_R`` from :func:`write_block_rows` (16 for large writes; 1 for writes of up to
  :data:`SMALL_WRITE_MAX_ROWS` rows, the scale candidates side by side, rotated by butterflies).
* attention: each tile of TILE_N codes is decoded once to fp16 [TILE_N, D] in registers
  (:func:`_decode_tile`: block words [N, G], the four pair indices of every block as [N, G] tensors
  joined into [N, G, 2, 2] (natural order), one lookup per pair, the halves joined again) and
  feeds one dot for q·k and one for p·v. Lookup (``kernel`` setting): ``pairs`` the pair table with
  ``tl.gather`` (shared memory), ``pairs_l1`` the pair table by a gather load (global memory, L1),
  ``values`` one ``tl.gather`` per value from the 2·2^b-entry fp16 table, ``values_asm`` (the
  default on GPUs) the same with each index built by one inline-PTX ``lop3`` (the compiler would
  otherwise add the coset's table offset to every value's address with a separate multiply-add).
  :func:`_e8_decode_kernel`: flash-decoding (one query token per sequence, the context split in
  ``segs`` segments, partials merged by :func:`_e8_output_kernel`); for 4-bit codes without key
  centers the decode grid is :mod:`.e8_gluon`'s kernel instead (``gluon`` setting; the same
  partials, the same merge); :func:`_e8_tile_attn_kernel`: the
  general grid (prefill, chunked prefill, mixed batches; query tiles found by a binary search over
  ``query_start_loc`` like vLLM's ``triton_unified_attention``). The query tile holds ``BLOCK_Q``
  query tokens × the query heads of one kv head, so every code is decoded once per tile for all
  heads that use it. Settings: :data:`DECODE_CONFIG`, :data:`PREFILL_CONFIG`.
* around them, :func:`_e8_rotate_q_kernel` (the queries rotated by the keys' rotation and scaled,
  butterflies) and :func:`_e8_output_kernel` (the decode grid's partials merged, every row un-rotated
  by the values' rotation, butterflies, and stored in the output's dtype): a decode layer is four
  launches, the write, these two and the decode grid.

Nothing here synchronizes with the host: sequence lengths, block tables and slot mappings are
read on the device; the host only uses tensor shapes and the metadata's Python ints
(``max_query_len``) to pick the grid. The cache block size is a compile-time constant.

Supported: E8 codecs of kind 'e8' and the switched ``e8s-*`` (parity in both cosets, identical
tables for coordinate 7), 2..4 bits, head sizes 64 and 128 (powers of two: ``tl.arange``).
:func:`supported` says so.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["TritonE8Format", "supported", "triton_write_kv_cache", "triton_paged_attention", "fp16_operand_reference",
           "prepare_device_constants", "warm_write_paths", "warm_attention_paths", "mixed_batch_segments", "LOG2E",
           "DECODE_SEGMENTS", "KERNELS"]

LOG2E = 1.4426950408889634
#: KV segments per sequence of the decode (flash-decoding) grid; a constant so that the grid only
#: depends on the batch shape (CUDA-graph capture).
DECODE_SEGMENTS = 16
#: kernel name -> how table values are looked up (LUT constexpr of :func:`_decode_tile`).
#: ``values_asm`` = ``values`` with each index's mask-and-or as one inline-PTX ``lop3`` (the same
#: lookups, bit-identical results, fewer instructions: see :func:`_and_or`).
KERNELS = {"pairs": 0, "pairs_l1": 1, "values": 2, "values_l1": 3, "nolut": 4, "values_asm": 5}
#: kernels with inline PTX, which Triton's CPU interpreter (``TRITON_INTERPRET=1``) cannot run
ASM_KERNELS = ("values_asm",)
#: Triton's CPU interpreter is on (tests on machines without a GPU)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
#: the default lookup: ``values_asm`` on GPUs, ``values`` (the same lookups) in the interpreter
DEFAULT_KERNEL = "values" if INTERPRET else "values_asm"
try:  # Triton's layout-explicit dialect (3.5+): the decode kernel of :mod:`.e8_gluon`
    from . import e8_gluon as _gluon
except ImportError:  # pragma: no cover - a Triton without Gluon
    _gluon = None
#: the Gluon decode kernel can run here (Gluon importable, not the CPU interpreter)
GLUON = _gluon is not None and not INTERPRET
#: settings that skip work and compute wrong values (timing floors for ``bench.gpu``): refused in
#: ``E8VLLM_DECODE_CONFIG`` / ``E8VLLM_PREFILL_CONFIG``
DIAGNOSTIC_KERNELS = ("nolut",)

#: decode kernel settings (see ``triton_paged_attention(decode=...)``), chosen on the H200 with
#: ``python -m e8vllm.bench.gpu tune``; ``E8VLLM_DECODE_CONFIG`` (JSON) overrides keys.
#: ``maxnreg`` 128: session 9, e8s k4v4 at 64 x 8k: 717 us against 886 us with the compiler's 143 registers
#: (4 programs per SM instead of 3); prefetch 1 was slower (1,075 us; 950 us at 128 registers).
#: ``values_asm``: session 10, same run: 714 us against 768 us for ``values`` (1,203 against 1,356 SASS
#: instructions per 64-token tile); 112 registers 732 us, uncapped (168) 790 us, tile 128 / 8 warps 836 us
#: ``gluon`` 1: decode batches of 4-bit codes run :mod:`.e8_gluon` (codes decoded straight into the
#: tensor-core operand registers; ``gluon_tile`` tokens per step, ``gluon_kp`` 1 = key pairs looked
#: up 32 bits at a time, ``gluon_lut`` 1 = byte-layout value tables, 2 = value pairs (session 16:
#: 32-bit lookups of two fields of a value word in the 4-bit pair table, 16 KiB of shared memory per
#: program instead of 8; offline sm_90 at 128 registers 1,489 instead of 1,680 SASS instructions per two
#: 16-token steps; H200, session 17: 339.2 against 336.2 us at 64 x 8k, bank conflicts),
#: ``gluon_prefetch`` 1 / 2 = the
#: next step's codes / block id loaded ahead, ``gluon_async`` 1 = the codes through a cp.async ring
#: (the default since session 13: 363.8 against 370.8 us for e8c-4bit, 412.8 against 434.4 us for
#: e8s-4bit, 64 x 8k; set explicitly it excludes key pairs, prefetches and diagnostics, inherited it
#: gives way to them),
#: ``gluon_maxnreg`` its register cap (128 since session 16: 16 warps per SM instead of 12 at 168 registers, no
#: spills offline; H200, whole op, ``results/gpu/logs_s16``: 64 x 8k 338.0 against 350.0 us, 64 x 32k 1,267.3
#: against 1,296.9, 8 x 8k 57.6 against 59.5, 8 x 32k 178.4 against 184.0), ``gluon_arith`` 1 = cubic-level
#: fields (``e8c-*``, K or V or both) decoded
#: by arithmetic, not lookups (:func:`_gluon_arith`); the H200 timings of each are in :mod:`.e8_gluon`'s docstring);
#: other formats, and key centers, take the Triton kernel with the settings above.
DECODE_CONFIG = {"kernel": DEFAULT_KERNEL, "tile_n": 64, "num_warps": 4, "num_stages": 1, "segs": DECODE_SEGMENTS,
                 "prefetch": 0, "maxnreg": 128, "gluon": int(GLUON), "gluon_tile": 16, "gluon_kp": 0,
                 "gluon_maxnreg": 128, "gluon_prefetch": 0, "gluon_lut": 0, "gluon_async": 1, "gluon_lazy": 0,
                 "gluon_order": 0, "gluon_diag": 0, "gluon_arith": 1}

#: general-grid (prefill) settings; ``E8VLLM_PREFILL_CONFIG`` (JSON) overrides keys. ``block_m`` 256
#: (64 query tokens x 4 heads per tile): session 10, one 8,192-token prompt, 5.34 ms against 5.95 ms at 128.
#: ``split_decode`` 1: in a mixed batch the sequences with one query token go to the split-KV decode
#: grid (DECODE_CONFIG) instead of a query tile of BLOCK_M rows with NQ real ones (session 10; not yet
#: timed on the H200: the sweeps there ran with the tile grid for every row).
PREFILL_CONFIG = {"kernel": DEFAULT_KERNEL, "block_m": 256, "tile_n": 64, "num_warps": 8, "num_stages": 1, "maxnreg": 0,
                  "split_decode": 1}


def kernel_config(base: dict, extra: dict | str | None, what: str, diagnostic: bool = False) -> dict:
    """``base`` updated with ``extra`` (a dict, or JSON text from an environment variable), validated;
    the :data:`DIAGNOSTIC_KERNELS` only with ``diagnostic`` (benchmark settings)."""
    if isinstance(extra, str):
        try:
            extra = json.loads(extra) if extra.strip() else {}
        except ValueError as e:
            raise ValueError(f"{what} is not JSON: {extra!r}") from e
    extra = extra or {}
    if not isinstance(extra, dict):
        raise ValueError(f"{what} must be a JSON object, not {extra!r}")
    bad = set(extra) - set(base)
    if bad:
        raise ValueError(f"{what}: unknown keys {sorted(bad)}; known: {sorted(base)}")
    cfg = {**base, **extra}
    if cfg["kernel"] not in KERNELS:
        raise ValueError(f"{what}: kernel must be one of {sorted(KERNELS)}, not {cfg['kernel']!r}")
    if cfg["kernel"] in ASM_KERNELS and INTERPRET:
        raise ValueError(f"{what}: kernel {cfg['kernel']!r} uses inline PTX, which TRITON_INTERPRET=1 cannot run; "
                         "take 'values' (the same lookups)")
    if cfg["kernel"] in DIAGNOSTIC_KERNELS and not diagnostic:
        raise ValueError(f"{what}: kernel {cfg['kernel']!r} computes wrong values (a timing diagnostic); "
                         "only benchmarks may select it")
    for k in ("block_m", "tile_n", "num_warps", "segs"):
        if k in cfg:
            v, lo = cfg[k], 16 if k in ("block_m", "tile_n") else 1
            if type(v) is not int or v < lo or v & (v - 1):
                raise ValueError(f"{what}: {k} must be a power of two >= {lo}, not {v!r}")
    if type(cfg["num_stages"]) is not int or not 1 <= cfg["num_stages"] <= 4:
        raise ValueError(f"{what}: num_stages must be an integer in 1..4, not {cfg['num_stages']!r}")
    for k in ("prefetch", "split_decode", "gluon", "gluon_kp", "gluon_async", "gluon_lazy", "gluon_order",
              "gluon_arith"):
        if k in cfg and (type(cfg[k]) is not int or cfg[k] not in (0, 1)):
            raise ValueError(f"{what}: {k} must be 0 or 1, not {cfg[k]!r}")
    if "gluon_lut" in cfg and (type(cfg["gluon_lut"]) is not int or cfg["gluon_lut"] not in (0, 1, 2)):
        raise ValueError(f"{what}: gluon_lut must be 0 (value tables), 1 (byte-layout tables) or 2 (value pairs), "
                         f"not {cfg['gluon_lut']!r}")
    if "gluon_prefetch" in cfg and (type(cfg["gluon_prefetch"]) is not int or cfg["gluon_prefetch"] not in (0, 1, 2)):
        raise ValueError(f"{what}: gluon_prefetch must be 0 (none), 1 (the next tile's codes) or 2 (the next tile's "
                         f"block id), not {cfg['gluon_prefetch']!r}")
    for k in ("maxnreg", "gluon_maxnreg"):
        mr = cfg.get(k, 0)
        if type(mr) is not int or not (mr == 0 or 24 <= mr <= 255):
            raise ValueError(f"{what}: {k} must be 0 (the compiler's choice) or a register cap in 24..255, not {mr!r}")
    if cfg.get("gluon") and not GLUON:
        raise ValueError(f"{what}: gluon 1 needs Triton's Gluon dialect on a GPU"
                         + (" (TRITON_INTERPRET=1 cannot run it)" if INTERPRET else " (not in this Triton)"))
    if cfg.get("gluon_diag", 0) not in (0, 1, 2, 3) or (cfg.get("gluon_diag") and not diagnostic):
        raise ValueError(f"{what}: gluon_diag {cfg.get('gluon_diag')!r} skips loads (1) or lookups (2) and computes "
                         "wrong values (a timing diagnostic); only benchmarks may select it")
    if cfg.get("gluon_async") and (cfg.get("gluon_kp") or cfg.get("gluon_prefetch") or cfg.get("gluon_diag")):
        if "gluon_async" not in extra:  # an inherited ring gives way to key pairs / a prefetch / a diagnostic
            cfg["gluon_async"] = 0
        else:
            raise ValueError(f"{what}: gluon_async 1 (the cp.async code ring) takes gluon_kp 0, gluon_prefetch 0 "
                             "and gluon_diag 0")
    if "gluon_tile" in cfg and cfg["gluon_tile"] not in (16, 32):
        raise ValueError(f"{what}: gluon_tile must be 16 or 32, not {cfg['gluon_tile']!r}")
    return cfg


DECODE_CONFIG = kernel_config(DECODE_CONFIG, os.environ.get("E8VLLM_DECODE_CONFIG"), "E8VLLM_DECODE_CONFIG")
PREFILL_CONFIG = kernel_config(PREFILL_CONFIG, os.environ.get("E8VLLM_PREFILL_CONFIG"), "E8VLLM_PREFILL_CONFIG")
_FP16_MAX = tl.constexpr(65504.0)
# e8s-* scale exponents (``e8vllm.codecs.e8s``): s = 2^((e - EXP_BIAS) / STEPS_PER_OCTAVE)
LOW_FACTOR = tl.constexpr(0.75)
STEPS_PER_OCTAVE = tl.constexpr(10.0)
EXP_BIAS = tl.constexpr(130.0)


# ---------------------------------------------------------------------------------------------
# host-side constants
# ---------------------------------------------------------------------------------------------
def supported(fmt) -> bool:  # noqa: ANN001 - E8KVFormat
    """True when both codecs of ``fmt`` (an ``E8KVFormat``) can run on these kernels: pair-table
    codes (``E8KVFormat.pair_decoded``) at head size 64 or 128."""
    return fmt.head_size in (64, 128) and fmt.pair_decoded


def _pair_table(codec) -> torch.Tensor:  # noqa: ANN001 - a supported E8 codec
    """fp16 pair table int32 [S · 2 · 4^b]: entry (t·2 + c)·4^b + (hi << b | lo) = fp16 T_{t,c}[lo] |
    fp16 T_{t,c}[hi] << 16 (S table sets: 1, or 2 for ``e8s-*``)
    (``reference.pair_table`` rounded to fp16, each row's two halves read as one little-endian word)."""
    from e8vllm.kernels.reference import pair_table

    return pair_table(codec).half().contiguous().view(torch.int32).reshape(-1)


@dataclass(frozen=True)
class _CodecConsts:
    bits: int
    n_bytes: int          # packed field bytes D*b/8
    table: torch.Tensor   # float32 [S * 2 * 2^b]: T_{0,0}, T_{0,1} (set 0), then set 1's
    table_h: torch.Tensor  # the same rounded to fp16 (attention operands)
    pairs: torch.Tensor   # int32 [S * 2 * 4^b]: :func:`_pair_table`
    mids: torch.Tensor    # float32 [S * 2 * (2^b - 1)]: midpoints of each table, in the same order
    factors: torch.Tensor  # float32 [n_scales] (e8-*: scale = fp16(RMS·f)); [9] zeros for e8s-*
    pm1: torch.Tensor     # float32 [D, D]: P = diag(s) blockdiag(H_b), entries ±1
    inv_sqrt_b: float     # float32(1/√b) as a Python float
    sets: int = 1         # table sets S: 1 (e8-*, fp16 scale) or 2 (e8s-*: switch byte + exponent byte)
    group_blocks: int = 1  # e8s-*: blocks per switch bit
    scales: torch.Tensor | None = None  # e8s-*: float32 [256] scale of each exponent byte (e8-*: unread)
    poly: torch.Tensor | None = None  # e8c-*: fp16 [S, 2, 4] cubic coefficients (c3, c2, c1, c0) per table
    block: int = 0        # b: the Hadamard block size of the rotation


@dataclass(frozen=True)
class TritonE8Format:
    """Device constants of one ``E8KVFormat`` for the kernels (build with :meth:`get`)."""

    head_size: int
    k: _CodecConsts
    v: _CodecConsts
    k_bytes: int
    slot_bytes: int
    q_rot: torch.Tensor   # float32 [D, D]: R_kᵀ (q̃ = q @ q_rot) = k.pm1 / √b: the kernels use the butterflies
    o_unrot: torch.Tensor  # float32 [D, D]: R_v (o = õ @ o_unrot) = v.pm1ᵀ / √b (references and tests)

    @property
    def v_fields_off(self) -> int:
        """Byte offset of the V fields in a slot."""
        return self.k.n_bytes

    @property
    def scales_off(self) -> int:
        """Byte offset of the K scale (the V scale follows) in a slot."""
        return self.k.n_bytes + self.v.n_bytes

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def get(fmt, device: str) -> "TritonE8Format":  # noqa: ANN001
        """Constants of ``fmt`` on ``device`` (cached per format and device)."""
        if not supported(fmt):
            raise ValueError(f"e8vllm: the Triton kernels do not support this format: {fmt}")
        with torch.device("cpu"):  # host-side construction whatever the caller's default device
            return TritonE8Format._build(fmt, torch.device(device))

    @staticmethod
    def _build(fmt, dev: torch.device) -> "TritonE8Format":  # noqa: ANN001
        from e8vllm.codecs.e8 import _scale_factors
        from e8vllm.kernels.reference import _E8_SCALE_RANGE

        from e8vllm.codecs.e8s import N_CANDIDATES, group_blocks, scale_table
        from e8vllm.kernels.reference import is_switched

        def consts(codec) -> _CodecConsts:  # noqa: ANN001
            sw = is_switched(codec)
            codes = codec.code.codes if sw else (codec.code,)
            main = torch.cat([c.main.to(torch.float32) for c in codes])  # [S * 2, K]
            mids = (main[:, 1:] + main[:, :-1]) * 0.5  # the reference's bucketize boundaries
            rot = codec_rotation(codec)
            b = rot.block
            blocks = torch.block_diag(*([_hadamard(b)] * rot.num_blocks))
            pm1 = rot.signs("cpu")[:, None] * blocks
            if sw:
                fs = torch.zeros(N_CANDIDATES, dtype=torch.float32)
            else:
                fs = torch.tensor(_scale_factors(codec.n_scales, *_E8_SCALE_RANGE), dtype=torch.float32)
            return _CodecConsts(codec.bits, codec.head_dim * codec.bits // 8, main.reshape(-1).contiguous().to(dev),
                                main.reshape(-1).half().contiguous().to(dev),
                                _pair_table(codec).to(dev),
                                mids.reshape(-1).contiguous().to(dev), fs.to(dev), pm1.contiguous().to(dev),
                                float(torch.tensor(1.0 / b ** 0.5, dtype=torch.float32)),
                                len(codes), group_blocks(codec.head_dim) if sw else 1,
                                scale_table().to(dev) if sw else fs.to(dev),
                                codec.poly.to(dev) if getattr(codec, "poly", None) is not None else None, b)

        rk = fmt.k_rotation.matrix(torch.float64)
        rv = fmt.v_rotation.matrix(torch.float64)
        return TritonE8Format(fmt.head_size, consts(fmt.k_codec), consts(fmt.v_codec), fmt.k_bytes, fmt.slot_bytes,
                              rk.t().contiguous().to(torch.float32).to(dev), rv.contiguous().to(torch.float32).to(dev))


def codec_rotation(codec):  # noqa: ANN001, ANN201
    from e8vllm.hadamard import rotation

    return rotation(codec.head_dim, codec.seed)


def _hadamard(b: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


# ---------------------------------------------------------------------------------------------
# write path
# ---------------------------------------------------------------------------------------------
@triton.jit
def _bucket16(u, mb):
    """#{k : u > mids[k]} for the 15 increasing midpoints mids = mb[0..14] of a 16-level table, by a
    branch-free binary search: four comparisons, each against the midpoint its interval's earlier
    answers select (uniform values), instead of fifteen comparisons and additions. The same count
    for every u (NaN: 0), so the same codes. Offline (sm_90, Triton 3.6, the default one-row write at
    2 warps): 5,920 instead of 7,920 SASS instructions, 202 registers and no stack instead of 255 and
    an 88-byte stack."""
    m0 = tl.load(mb + 0)
    m1 = tl.load(mb + 1)
    m2 = tl.load(mb + 2)
    m3 = tl.load(mb + 3)
    m4 = tl.load(mb + 4)
    m5 = tl.load(mb + 5)
    m6 = tl.load(mb + 6)
    m7 = tl.load(mb + 7)
    m8 = tl.load(mb + 8)
    m9 = tl.load(mb + 9)
    m10 = tl.load(mb + 10)
    m11 = tl.load(mb + 11)
    m12 = tl.load(mb + 12)
    m13 = tl.load(mb + 13)
    m14 = tl.load(mb + 14)
    b3 = u > m7
    b2 = u > tl.where(b3, m11, m3)
    b1 = u > tl.where(b3, tl.where(b2, m13, m9), tl.where(b2, m5, m1))
    b0 = u > tl.where(b3, tl.where(b2, tl.where(b1, m14, m12), tl.where(b1, m10, m8)),
                      tl.where(b2, tl.where(b1, m6, m4), tl.where(b1, m2, m0)))
    return b3.to(tl.int32) * 8 + b2.to(tl.int32) * 4 + b1.to(tl.int32) * 2 + b0.to(tl.int32)


@triton.jit
def _nearest_coset(u, tab_ptr, mid_ptr, C: tl.constexpr, K: tl.constexpr, i8):
    """u float32 [R, G, 8] -> (levels int32 [R, G, 8], squared error float32 [R, G]) in coset C."""
    if K == 16:
        v = _bucket16(u, mid_ptr + C * (K - 1))
    else:
        v = tl.zeros(u.shape, dtype=tl.int32)
        for k in tl.static_range(K - 1):
            m = tl.load(mid_ptr + C * (K - 1) + k)
            v += (u > m).to(tl.int32)
    tv = tl.load(tab_ptr + C * K + v)
    base = (u - tv) * (u - tv)
    tu = tl.load(tab_ptr + C * K + tl.minimum(v + 1, K - 1))
    up = tl.where(v + 1 < K, (u - tu) * (u - tu) - base, float("inf"))
    td = tl.load(tab_ptr + C * K + tl.maximum(v - 1, 0))
    dn = tl.where(v >= 1, (u - td) * (u - td) - base, float("inf"))
    err = tl.sum(tl.where(i8 < 7, base, 0.0), axis=2) + tl.sum(tl.where(i8 == 7, base, 0.0), axis=2)
    odd = (tl.sum(v, axis=2) & 1) == 1
    move = tl.minimum(up, dn)
    imin = tl.argmin(move, axis=2)
    sel = i8 == imin[:, :, None]
    up_i = tl.sum(tl.where(sel, up, 0.0), axis=2)
    dn_i = tl.sum(tl.where(sel, dn, 0.0), axis=2)
    step = tl.where(up_i <= dn_i, 1, -1) * odd.to(tl.int32)
    v = v + tl.where(sel, step[:, :, None], 0)
    err = err + tl.where(odd, tl.minimum(up_i, dn_i), 0.0)
    return v, err


@triton.jit
def _best_of_sets(u, tab_ptr, mid_ptr, K: tl.constexpr, i8, BLOCK_R: tl.constexpr, G: tl.constexpr,
                  SETS: tl.constexpr, GB: tl.constexpr):
    """u float32 [R, G, 8] -> (levels int32 [R, G, 8], coset [R, G] int32, switch bits [R] int32, squared
    error [R]): per block the better coset; with SETS = 2, per group of GB blocks the better table set
    (set 0 on ties), the group's bit g of the switch set when set 1 won."""
    va, ea = _nearest_coset(u, tab_ptr, mid_ptr, 0, K, i8)
    vb, eb = _nearest_coset(u, tab_ptr, mid_ptr, 1, K, i8)
    cb = eb < ea
    v = tl.where(cb[:, :, None], vb, va)
    c = cb.to(tl.int32)
    e = tl.minimum(ea, eb)
    sw = tl.zeros([BLOCK_R], dtype=tl.int32)
    if SETS == 2:
        va2, ea2 = _nearest_coset(u, tab_ptr + 2 * K, mid_ptr + 2 * (K - 1), 0, K, i8)
        vb2, eb2 = _nearest_coset(u, tab_ptr + 2 * K, mid_ptr + 2 * (K - 1), 1, K, i8)
        cb2 = eb2 < ea2
        v2 = tl.where(cb2[:, :, None], vb2, va2)
        e2 = tl.minimum(ea2, eb2)
        NG: tl.constexpr = G // GB
        if GB == 1:
            pg = e2 < e
            ge = tl.where(pg, e2, e)
            pick = pg
        else:
            g0 = tl.sum(tl.reshape(e, [BLOCK_R, NG, GB]), axis=2)
            g1 = tl.sum(tl.reshape(e2, [BLOCK_R, NG, GB]), axis=2)
            pg = g1 < g0
            ge = tl.where(pg, g1, g0)
            pick = tl.reshape(tl.broadcast_to(pg[:, :, None], [BLOCK_R, NG, GB]), [BLOCK_R, G])
        v = tl.where(pick[:, :, None], v2, v)
        c = tl.where(pick, cb2.to(tl.int32), c)
        sw = tl.sum(pg.to(tl.int32) << tl.arange(0, NG)[None, :], axis=1)
        err = tl.sum(ge, axis=1)
    else:
        err = tl.sum(e, axis=1)
    return v, c, sw, err


@triton.jit
def _fwht_rows(y, BLOCK_R: tl.constexpr, D: tl.constexpr, LOG_B: tl.constexpr):
    """y float32 [R, D] -> y · blockdiag(H_b), b = 2^LOG_B (Sylvester order), by butterflies in the order
    of ``hadamard.fwht``: stage h pairs the entries at distance h in groups of 2h into (a + b, a - b),
    so the float32 sums are the reference's, bit for bit."""
    for k in tl.static_range(LOG_B):  # h = 2^k
        a, b = tl.split(tl.permute(tl.reshape(y, [BLOCK_R, D >> (k + 1), 2, 1 << k]), (0, 1, 3, 2)))
        y = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), [BLOCK_R, D])
    return y


@triton.jit
def _rotation_signs(pm1_ptr, D: tl.constexpr, LOG_B: tl.constexpr):
    """The signs s float32 [D] of P = diag(s) blockdiag(H_b) (b = 2^LOG_B): P's entries on each block's
    first column (H_b's first column is all ones)."""
    d = tl.arange(0, D)
    return tl.load(pm1_ptr + d * D + ((d >> LOG_B) << LOG_B))


@triton.jit
def _write_rows(pid, x_ptr, sx0, sx1, slot_ptr, cache_ptr, cs0, cs1, cs2, code_off, scale_off,
                pm1_ptr, inv_sqrt_b, tab_ptr, mid_ptr, fac_ptr, stab_ptr, n_rows, H, block_size,
                D: tl.constexpr, BITS: tl.constexpr, NS: tl.constexpr, BLOCK_R: tl.constexpr,
                SETS: tl.constexpr, GB: tl.constexpr, PAR: tl.constexpr = False, NC: tl.constexpr = 1,
                LOG_B: tl.constexpr = 0):
    """Rows r = pid·BLOCK_R ... of x [T, H, D] (r = t*H + h; last dim contiguous) -> codes into the
    cache slots: fields at byte ``code_off`` of the slot, the 2-byte tail at ``scale_off`` (SETS 1:
    the fp16 scale; SETS 2: the switch byte, then the exponent byte of the scale table ``stab``).
    With PAR the first NC scale candidates (NC: a power of two <= NS, :func:`par_candidates`) are
    searched side by side, the rest one after another: the same errors and the same winner (the first
    of equal ones) as the loop over all NS, a shorter dependency chain for small writes. With LOG_B > 0
    (BLOCK_R < 16 only) the rotation is a butterfly transform (:func:`_fwht_rows`, Hadamard block
    2^LOG_B; the signs are P's entries on each block's first column) instead of products with P."""
    G: tl.constexpr = D // 8
    K: tl.constexpr = 1 << BITS
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    t = rows // H
    h = rows % H
    slot = tl.load(slot_ptr + t, mask=rmask, other=-1).to(tl.int64)
    valid = rmask & (slot >= 0)
    d = tl.arange(0, D)
    x_rows = x_ptr + t[:, None].to(tl.int64) * sx0 + h[:, None].to(tl.int64) * sx1
    if BLOCK_R >= 16:  # tl.dot needs 16 rows
        x = tl.load(x_rows + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        pm1 = tl.load(pm1_ptr + d[:, None] * D + d[None, :])
        y = tl.dot(x, pm1, input_precision="ieee") * inv_sqrt_b  # [R, D] rotated
    elif LOG_B > 0:  # few rows per program, butterflies: (x ⊙ s) blockdiag(H_b), the reference's sums
        sgn = _rotation_signs(pm1_ptr, D, LOG_B)
        x = tl.load(x_rows + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        y = _fwht_rows(x * sgn[None, :], BLOCK_R, D, LOG_B) * inv_sqrt_b
    else:  # few rows per program (small writes: decode steps): x P as 16-column products, summed
        y = tl.zeros([BLOCK_R, D], dtype=tl.float32)
        i16 = tl.arange(0, 16)
        for ch in tl.static_range(D // 16):
            xc = tl.load(x_rows + ch * 16 + i16[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            pc = tl.load(pm1_ptr + (ch * 16 + i16)[:, None] * D + d[None, :])  # [16, D]
            y += tl.sum(xc[:, :, None] * pc[None, :, :], axis=1)
        y = y * inv_sqrt_b
    rms = tl.sqrt(tl.sum(y * y, axis=1) / D)
    y3 = tl.reshape(y, [BLOCK_R, G, 8])
    i8 = tl.arange(0, 8)[None, None, :]
    if SETS == 2:  # the first candidate exponent floor(10·log2(0.75·RMS)) + 130 (``codecs.e8s.scale_candidates``)
        e0 = tl.floor(tl.log2(tl.maximum(rms * LOW_FACTOR, 1e-30)) * STEPS_PER_OCTAVE) + EXP_BIAS
        e0 = tl.minimum(tl.maximum(tl.where(rms > 0, e0, 0.0), 0.0), 256.0 - NS).to(tl.int32)
    else:  # fp16 scales: no exponent
        e0 = tl.zeros([BLOCK_R], dtype=tl.int32)
    best_err = tl.full([BLOCK_R], float("inf"), tl.float32)
    best_v = tl.zeros([BLOCK_R, G, 8], dtype=tl.int32)
    best_c = tl.zeros([BLOCK_R, G], dtype=tl.int32)
    best_s = tl.zeros([BLOCK_R], dtype=tl.float32)
    best_sw = tl.zeros([BLOCK_R], dtype=tl.int32)
    best_e = tl.zeros([BLOCK_R], dtype=tl.int32)
    if PAR:  # the first NC candidates side by side: (row, candidate) pairs are the rows of one search
        ci = tl.arange(0, NC)
        if SETS == 2:
            sc = tl.load(stab_ptr + e0[:, None] + ci[None, :], mask=ci[None, :] < NS, other=1.0)  # [R, NC]
        else:
            f = tl.load(fac_ptr + ci, mask=ci < NS, other=1.0)
            sc = tl.minimum(tl.maximum(rms[:, None] * f[None, :], -_FP16_MAX), _FP16_MAX).to(tl.float16).to(tl.float32)
            sc = tl.where(sc > 0, sc, 1.0)
        u = tl.reshape(tl.math.div_rn(y3[:, None, :, :], sc[:, :, None, None]), [BLOCK_R * NC, G, 8])
        v, c, sw, err = _best_of_sets(u, tab_ptr, mid_ptr, K, i8, BLOCK_R * NC, G, SETS, GB)
        err = tl.where(ci[None, :] < NS, tl.reshape(err, [BLOCK_R, NC]) * (sc * sc), float("inf"))
        best = tl.argmin(err, axis=1)  # the first of equal errors, as the loop's strict '<'
        pick = ci[None, :] == best[:, None]  # [R, NC]
        best_err = tl.min(err, axis=1)
        best_v = tl.sum(tl.where(pick[:, :, None, None], tl.reshape(v, [BLOCK_R, NC, G, 8]), 0), axis=1)
        best_c = tl.sum(tl.where(pick[:, :, None], tl.reshape(c, [BLOCK_R, NC, G]), 0), axis=1)
        best_s = tl.sum(tl.where(pick, sc, 0.0), axis=1)
        best_sw = tl.sum(tl.where(pick, tl.reshape(sw, [BLOCK_R, NC]), 0), axis=1)
        best_e = e0 + best.to(tl.int32)
    # the candidates not searched side by side, one after another (all of them without PAR);
    # a runtime loop: unrolling 9 candidates made a 28k-instruction kernel (2 min to compile)
    for si in range(NC if PAR else 0, NS):
        if SETS == 2:
            s = tl.load(stab_ptr + e0 + si)
        else:
            f1 = tl.load(fac_ptr + si)  # not ``f``: the side-by-side search's f is a tensor (a loop-carried type)
            s = tl.minimum(tl.maximum(rms * f1, -_FP16_MAX), _FP16_MAX).to(tl.float16).to(tl.float32)
            s = tl.where(s > 0, s, 1.0)
        u1 = tl.math.div_rn(y3, s[:, None, None])  # (names apart from the side-by-side search's: other shapes)
        v1, c1, sw1, err1 = _best_of_sets(u1, tab_ptr, mid_ptr, K, i8, BLOCK_R, G, SETS, GB)
        err1 = err1 * (s * s)
        better = err1 < best_err
        best_err = tl.where(better, err1, best_err)
        best_v = tl.where(better[:, None, None], v1, best_v)
        best_c = tl.where(better[:, None], c1, best_c)
        best_s = tl.where(better, s, best_s)
        best_sw = tl.where(better, sw1, best_sw)
        best_e = tl.where(better, e0 + si, best_e)
    fields = tl.where(i8 == 7, ((best_v >> 1) << 1) | best_c[:, :, None], best_v).to(tl.int64)
    word = tl.sum(fields << (i8.to(tl.int64) * BITS), axis=2)  # [R, G], disjoint bits
    blk = slot // block_size
    off = slot % block_size
    slot_base = cache_ptr + blk * cs0 + h.to(tl.int64) * cs1 + off * cs2  # [R]
    base = slot_base + code_off
    g = tl.arange(0, G)
    for k in tl.static_range(BITS):
        tl.store(base[:, None] + g[None, :] * BITS + k, ((word >> (8 * k)) & 255).to(tl.uint8),
                 mask=valid[:, None])
    if SETS == 2:
        tail = best_sw | (best_e << 8)
    else:
        # a row whose largest candidate scale underflows fp16 stores scale 0 (exact zeros), as the codec
        fmx = tl.load(fac_ptr + NS - 1)
        smx = tl.minimum(tl.maximum(rms * fmx, -_FP16_MAX), _FP16_MAX).to(tl.float16).to(tl.float32)
        best_s = tl.where(smx > 0, best_s, 0.0)
        tail = best_s.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    tl.store(slot_base + scale_off, (tail & 255).to(tl.uint8), mask=valid)
    tl.store(slot_base + scale_off + 1, ((tail >> 8) & 255).to(tl.uint8), mask=valid)


@triton.jit(do_not_specialize=["n_rows"])  # batch-dependent: no recompile per batch size
def _e8_write_kernel(k_ptr, sk0, sk1, v_ptr, sv0, sv1, slot_ptr, cache_ptr, cs0, cs1, cs2,
                     k_off, k_soff, v_off, v_soff, k_pm1, k_isb, k_tab, k_mid, k_fac, k_stab,
                     v_pm1, v_isb, v_tab, v_mid, v_fac, v_stab, n_rows, H, block_size,
                     D: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr, KNS: tl.constexpr, VNS: tl.constexpr,
                     BLOCK_R: tl.constexpr, KS: tl.constexpr = 1, VS: tl.constexpr = 1, KGB: tl.constexpr = 1,
                     VGB: tl.constexpr = 1, PAR: tl.constexpr = False, KNC: tl.constexpr = 1,
                     VNC: tl.constexpr = 1, LOG_B: tl.constexpr = 0):
    """K (program axis 1 = 0) and V (= 1) of one write in one launch: :func:`_write_rows` each, so a
    decode step's few rows of K and V are encoded side by side on different SMs."""
    pid = tl.program_id(0)
    if tl.program_id(1) == 0:
        _write_rows(pid, k_ptr, sk0, sk1, slot_ptr, cache_ptr, cs0, cs1, cs2, k_off, k_soff, k_pm1, k_isb, k_tab,
                    k_mid, k_fac, k_stab, n_rows, H, block_size, D, KB, KNS, BLOCK_R, KS, KGB, PAR, KNC, LOG_B)
    else:
        _write_rows(pid, v_ptr, sv0, sv1, slot_ptr, cache_ptr, cs0, cs1, cs2, v_off, v_soff, v_pm1, v_isb, v_tab,
                    v_mid, v_fac, v_stab, n_rows, H, block_size, D, VB, VNS, BLOCK_R, VS, VGB, PAR, VNC, LOG_B)


#: the largest writes, in (token, head) rows, that take the small-write path, by rotation (decode steps, small
#: chunks): ``E8VLLM_SMALL_WRITE_ROWS`` = r rows per program (a power of two below 16; 0 = off: 16 rows)
#: instead of 16, so that a decode step's few rows spread over many SMs; with 1 row the scale candidates
#: are searched side by side. Default 1: session 11, H200, e8_k4v4 K and V of H_kv 8 (``bench.gpu
#: write``, 16-column products): 1 token 13.2 us (16 rows: 63.4), 8 tokens 15.1 (57.2), 64 tokens 50.2
#: (57.9); at 256 tokens 16 rows won (111.6 against 189.5), hence 1,023 rows for "dot". Butterflies with
#: 2 warps and a cap of 128 registers (session 16, ``results/gpu/write_s16.json``): 256 tokens (2,048 rows)
#: 82.7 us against 93.0 with 16 rows, hence 2,048 rows for "fwht" (larger writes not measured; uncapped,
#: ``E8VLLM_SMALL_WRITE_MAXNREG=0``, the one-row write took 99.6 us there).
SMALL_WRITE_MAX_ROWS = {"fwht": 2048, "dot": 1023}


def _small_write_setting(text: str, name: str, zero: str) -> int:
    """The value of environment variable ``name`` (text ``text``, empty = 0): 0 (meaning ``zero``) or a
    power of two below 16; ValueError otherwise."""
    try:
        v = int(text or "0")
    except ValueError:
        v = -1
    if v not in (0, 1, 2, 4, 8):
        raise ValueError(f"{name} must be 0 ({zero}) or a power of two below 16, not {text!r}")
    return v


def _small_write_rows(text: str) -> int:
    return _small_write_setting(text, "E8VLLM_SMALL_WRITE_ROWS", "off")


SMALL_WRITE_ROWS = _small_write_rows(os.environ.get("E8VLLM_SMALL_WRITE_ROWS", "1"))


#: ``E8VLLM_PAR_CANDIDATES`` "floor" (default): the parallel scale search takes the largest power of
#: two <= NS candidates side by side and the rest in the loop (9 = 8 + 1: 1,152 searched values per
#: row); "ceil": all NS side by side, padded to the next power of two (9 -> 16: 2,048 values)
PAR_CANDIDATES = os.environ.get("E8VLLM_PAR_CANDIDATES", "floor")
if PAR_CANDIDATES not in ("floor", "ceil"):
    raise ValueError(f"E8VLLM_PAR_CANDIDATES must be 'floor' or 'ceil', not {PAR_CANDIDATES!r}")


#: ``E8VLLM_WRITE_ROTATION``: how writes of fewer than 16 rows per program rotate: "fwht" (the default since
#: session 14: butterflies, the reference's float32 sums; :func:`_fwht_rows`) or "dot" (x P as 16-column
#: products, summed). H200, session 14, e8_k4v4 K and V of H_kv 8, 1 row per program (``bench.gpu write``,
#: ``results/gpu/write_s14.json``): 8 tokens 11.5 us against 12.8 us (4 warps), 64 tokens 35.0 against
#: 39.6 us (4 warps) and 32.7 us with 2 warps
WRITE_ROTATION = os.environ.get("E8VLLM_WRITE_ROTATION", "").strip().lower() or "fwht"
if WRITE_ROTATION not in ("dot", "fwht"):
    raise ValueError(f"E8VLLM_WRITE_ROTATION must be 'dot' or 'fwht', not {WRITE_ROTATION!r}")


def _small_write_warps(text: str) -> int:
    return _small_write_setting(text, "E8VLLM_SMALL_WRITE_WARPS", "by size")


#: ``E8VLLM_SMALL_WRITE_WARPS``: warps per program of writes with fewer than 16 rows per program; 0 (the
#: default): :func:`small_write_warps`
SMALL_WRITE_WARPS = _small_write_warps(os.environ.get("E8VLLM_SMALL_WRITE_WARPS", "0"))


def _small_write_maxnreg(text: str) -> int:
    """``E8VLLM_SMALL_WRITE_MAXNREG``: empty = -1 (by setting, :func:`small_write_maxnreg`), 0 (no cap) or
    24..255 registers; ValueError otherwise."""
    if not text.strip():
        return -1
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v != 0 and not 24 <= v <= 255:
        raise ValueError(f"E8VLLM_SMALL_WRITE_MAXNREG must be 0 (no cap) or 24..255 registers, not {text!r}")
    return v


#: ``E8VLLM_SMALL_WRITE_MAXNREG``: a register cap (``maxnreg``) for writes with fewer than 16 rows per program
#: (0: none); unset: :func:`small_write_maxnreg`
SMALL_WRITE_MAXNREG = _small_write_maxnreg(os.environ.get("E8VLLM_SMALL_WRITE_MAXNREG", ""))


def small_write_maxnreg(warps: int, rotation: str | None = None) -> int:
    """Register cap of a small write at ``warps`` warps per program with ``rotation`` (default
    :data:`WRITE_ROTATION`): :data:`SMALL_WRITE_MAXNREG` when set, else 128 for butterflies at 2 warps
    (more programs resident per SM: 202 registers uncapped, offline sm_90) and none otherwise. H200,
    session 16, e8_k4v4 K and V of H_kv 8, 1 row per program (``results/gpu/write_s16.json``): 64 tokens
    25.2 us capped against 27.2, 256 tokens 82.7 against 99.6; at 4 warps (8 tokens) 10.9 capped
    against 10.4."""
    if SMALL_WRITE_MAXNREG >= 0:
        return SMALL_WRITE_MAXNREG
    return 128 if warps == 2 and (rotation or WRITE_ROTATION) == "fwht" else 0


#: small writes with butterflies take 2 warps per program from this many rows (4 below)
SMALL_WRITE_TWO_WARPS_ROWS = 256


def small_write_warps(n_rows: int, rotation: str | None = None) -> int:
    """Warps per program of a small write of ``n_rows`` (token, head) rows with ``rotation`` (default
    :data:`WRITE_ROTATION`): :data:`SMALL_WRITE_WARPS`, or for butterflies by size, 2 from 256 rows (more
    programs in flight per SM), else 4 (H200, session 14, 1 row per program: 64 rows 11.5 us with 4 warps
    against 15.4 with 2; 512 rows 32.7 us with 2 against 35.0 with 4, 61.0 with 8; 256 lies between the
    two sizes measured); for the 16-column products 4 (sessions 11-13's setting; 8 warps: 97.2 against
    39.6 us at 512 rows)."""
    if SMALL_WRITE_WARPS:
        return SMALL_WRITE_WARPS
    if (rotation or WRITE_ROTATION) == "dot":
        return 4
    return 2 if n_rows >= SMALL_WRITE_TWO_WARPS_ROWS else 4


def par_candidates(ns: int, how: str | None = None) -> int:
    """Scale candidates searched side by side by the parallel write (``how``: :data:`PAR_CANDIDATES`)."""
    if (how or PAR_CANDIDATES) == "ceil":
        return triton.next_power_of_2(ns)
    return 1 << (ns.bit_length() - 1)


def write_block_rows(n_rows: int, rotation: str | None = None) -> int:
    """(token, head) rows per program of the write kernel for a write of ``n_rows`` rows of K (and of V)
    with small-write ``rotation`` (default :data:`WRITE_ROTATION`)."""
    small = n_rows <= SMALL_WRITE_MAX_ROWS[rotation or WRITE_ROTATION]
    return SMALL_WRITE_ROWS if SMALL_WRITE_ROWS and small else 16


def triton_write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                          slot_mapping: torch.Tensor, fmt, *, block_rows: int | None = None,  # noqa: ANN001
                          parallel: bool | None = None, candidates: str | None = None, rotation: str | None = None,
                          warps: int | None = None, maxnreg: int | None = None) -> None:
    """Fused rotate + E8 encode + pack + scatter (same contract as ``reference.write_kv_cache``).

    Args:
        key, value: float [T', H_kv, D] (any strides with a contiguous last dim; rows >= T ignored).
        kv_cache: uint8 [num_blocks, H_kv, block_size, slot_bytes] (strided view allowed).
        slot_mapping: int [T]; block * block_size + offset, -1 = skip.
        fmt: ``E8KVFormat`` (see :func:`supported`).
        block_rows: rows per program, a power of two (default :func:`write_block_rows`: 16 with the
            rotation as one ``tl.dot`` for large writes; ``E8VLLM_SMALL_WRITE_ROWS`` (1) for writes of up
            to :data:`SMALL_WRITE_MAX_ROWS` rows of ``rotation``).
        parallel: search the scale candidates side by side instead of in a loop (default: with one
            row per program; at most 2 rows per program. H200, one token: 13.2 us with 1 row side by
            side, 33.9 us with 2 rows side by side, 31.8 us with 2 rows in the loop).
        candidates: with ``parallel``, "floor" or "ceil" (:func:`par_candidates`; default
            :data:`PAR_CANDIDATES`).
        rotation: with fewer than 16 rows per program, "dot" or "fwht" (default :data:`WRITE_ROTATION`;
            it also picks the small-write size limit).
        warps: warps per program with fewer than 16 rows per program (default :func:`small_write_warps`;
            16 rows take 8).
        maxnreg: register cap with fewer than 16 rows per program (default :func:`small_write_maxnreg`;
            0: none).

    ``rotation``, ``warps`` and ``maxnreg`` apply to small writes: a write that takes 16 rows per
    program by default ignores them; with ``block_rows`` 16 given, "fwht", warps other than 8 or a
    register cap raise ValueError.
    """
    t = slot_mapping.shape[0]
    if t == 0:
        return
    c = TritonE8Format.get(fmt, str(kv_cache.device))
    h, d = key.shape[1], key.shape[2]
    bs = kv_cache.shape[2]
    n_rows = t * h
    if rotation not in (None, "dot", "fwht"):
        raise ValueError(f"rotation must be 'dot' or 'fwht', not {rotation!r}")
    explicit = block_rows is not None
    block_rows = write_block_rows(n_rows, rotation) if block_rows is None else block_rows
    if block_rows < 1 or block_rows & (block_rows - 1):
        raise ValueError(f"block_rows must be a power of two, not {block_rows}")
    par = block_rows == 1 if parallel is None else bool(parallel)
    if par and block_rows > 2:
        raise ValueError(f"parallel scale search takes at most 2 rows per program, not {block_rows}")
    if candidates not in (None, "floor", "ceil"):
        raise ValueError(f"candidates must be 'floor' or 'ceil', not {candidates!r}")
    if explicit and block_rows >= 16 and (rotation == "fwht" or warps not in (None, 8) or maxnreg not in (None, 0)):
        raise ValueError(f"16 rows per program rotate by tl.dot with 8 warps and no register cap (rotation "
                         f"{rotation!r}, warps {warps!r}, maxnreg {maxnreg!r} apply to fewer rows per program)")
    rotation = WRITE_ROTATION if rotation is None else rotation
    warps, maxnreg = _write_launch(n_rows, block_rows, rotation, warps, maxnreg)
    if warps not in (1, 2, 4, 8):
        raise ValueError(f"warps must be 1, 2, 4 or 8, not {warps!r}")
    if maxnreg and not 24 <= maxnreg <= 255:
        raise ValueError(f"maxnreg must be 0 (no cap) or 24..255, not {maxnreg!r}")
    opts = {"maxnreg": maxnreg} if maxnreg else {}
    log_b = c.k.block.bit_length() - 1 if rotation == "fwht" and block_rows < 16 else 0
    if log_b and c.v.block != c.k.block:  # pragma: no cover - one head size, one rotation block
        raise ValueError("e8vllm: the butterfly write needs the same Hadamard block for K and V")
    key = key if key.stride(2) == 1 else key.contiguous()
    value = value if value.stride(2) == 1 else value.contiguous()
    kns, vns = c.k.factors.shape[0], c.v.factors.shape[0]
    _e8_write_kernel[(triton.cdiv(n_rows, block_rows), 2)](
        key, key.stride(0), key.stride(1), value, value.stride(0), value.stride(1), slot_mapping, kv_cache,
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), 0, c.scales_off, c.v_fields_off,
        c.scales_off + 2, c.k.pm1, c.k.inv_sqrt_b, c.k.table, c.k.mids, c.k.factors, c.k.scales, c.v.pm1,
        c.v.inv_sqrt_b, c.v.table, c.v.mids, c.v.factors, c.v.scales, n_rows, h, bs, D=d, KB=c.k.bits, VB=c.v.bits,
        KNS=kns, VNS=vns, BLOCK_R=block_rows, KS=c.k.sets, VS=c.v.sets,
        KGB=c.k.group_blocks, VGB=c.v.group_blocks, PAR=par, KNC=par_candidates(kns, candidates),
        VNC=par_candidates(vns, candidates), LOG_B=log_b, num_warps=warps, num_stages=1, **opts)


def _write_launch(n_rows: int, block_rows: int, rotation: str | None, warps: int | None = None,
                  maxnreg: int | None = None) -> tuple[int, int]:
    """(warps, register cap) of a write of ``n_rows`` rows at ``block_rows`` rows per program: 8 and none
    for 16 rows; else ``warps`` / ``maxnreg`` where given, the small-write defaults
    (:func:`small_write_warps`, :func:`small_write_maxnreg`) where None."""
    if block_rows >= 16:
        return 8, 0
    warps = small_write_warps(n_rows, rotation) if warps is None else warps
    return warps, small_write_maxnreg(warps, rotation) if maxnreg is None else maxnreg


def write_variant(n_rows: int) -> tuple[int, int, int]:
    """(rows per program, warps, register cap) of a default write of ``n_rows`` (token, head) rows: the
    compiled variant it launches (the kernel does not specialize on ``n_rows``)."""
    br = write_block_rows(n_rows)
    return (br, *_write_launch(n_rows, br, None))


def warm_write_tokens(num_kv_heads: int, limit: int = 1 << 16) -> list[int]:
    """Token counts whose default writes (``num_kv_heads`` heads) launch every variant that writes of 1 ..
    ``limit`` tokens launch (:func:`write_variant`), the smallest count of each."""
    seen: dict[tuple[int, int, int], int] = {}
    bounds = {1, SMALL_WRITE_MAX_ROWS[WRITE_ROTATION] // num_kv_heads + 1,
              -(-SMALL_WRITE_TWO_WARPS_ROWS // num_kv_heads), limit}
    for t in sorted(b for b in bounds if 1 <= b <= limit):  # the variants change only at these counts
        seen.setdefault(write_variant(t * num_kv_heads), t)
    return sorted(seen.values())


_WARMED: set[tuple[object, str, int, int, torch.dtype, int]] = set()


def warm_write_paths(fmt, device: str, num_kv_heads: int, head_size: int,  # noqa: ANN001
                     dtype: torch.dtype, *, block_size: int = 16) -> list[int]:
    """Compile the write kernel's variants now (model construction) rather than at their first use
    inside inference, where a compile stalls a step (vLLM's JIT monitor warns; session 16: the write
    compiled inside the first prefill of the 64 x 8k engine run, 32.9 s against 27.9 s in session 15):
    one write of each :func:`warm_write_tokens` count of zero K and V (``dtype``, contiguous, as
    aligned as vLLM's views of its fused qkv) into a one-block scratch cache of ``block_size`` slots (an
    argument the kernel specializes on, as on the cache's strides) with every slot skipped (-1). Tried
    once per (format, device, heads, head size, dtype, block size), also when it fails; returns the
    token counts written."""
    key = (fmt, device, num_kv_heads, head_size, dtype, block_size)
    if key in _WARMED:
        return []
    _WARMED.add(key)  # a failure is not retried by every layer
    counts = warm_write_tokens(num_kv_heads)
    cache = torch.zeros(1, num_kv_heads, block_size, fmt.slot_bytes, dtype=torch.uint8, device=device)
    for t in counts:
        kv = torch.zeros(t, num_kv_heads, head_size, dtype=dtype, device=device)
        triton_write_kv_cache(kv, kv, cache, torch.full((t,), -1, dtype=torch.int64, device=device), fmt)
    return counts


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------
@triton.jit
def _parity7(w, BITS: tl.constexpr):
    """Parity (0/1, int32) of Σ_{i<7} f_i of block words w (8·BITS bits at the bottom)."""
    if BITS == 2:
        x = w & 0x1555
        x = x ^ (x >> 8)
        x = x ^ (x >> 4)
        x = x ^ (x >> 2)
        return x & 1
    else:
        # the low bits of fields 0..6, times Σ_k 2^(k·BITS): their sum (<= 7 < 2^BITS) lands at bit
        # 6·BITS; lower partial sums have <= 6 terms, so nothing carries into it
        LOW: tl.constexpr = 1 | (1 << BITS) | (1 << (2 * BITS)) | (1 << (3 * BITS)) | (1 << (4 * BITS)) | \
            (1 << (5 * BITS)) | (1 << (6 * BITS))
        return (((w & LOW) * LOW) >> (6 * BITS)) & 1


@triton.jit
def _block_words(cache_ptr, slot, nmask, OFF: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr):
    """Block words int32 [N, G] (block g's 8·BITS bits at the bottom) of the fields starting at int32
    word OFF of each slot (int32 offsets ``slot`` [N] into ``cache_ptr``, loaded where ``nmask``)."""
    g = tl.arange(0, G)[None, :]
    m = nmask[:, None]
    ptr = cache_ptr + slot[:, None] + OFF
    if BITS == 4:
        w = tl.load(ptr + g, mask=m, other=0)
    elif BITS == 2:
        w = (tl.load(ptr + g // 2, mask=m, other=0) >> ((g % 2) * 16)) & 0xFFFF
    else:
        bit = g * 24  # a 24-bit block straddles two words when it starts at bit 16 or 24 of one
        lo = tl.load(ptr + bit // 32, mask=m, other=0).to(tl.uint32, bitcast=True)
        hi = tl.load(ptr + bit // 32 + 1, mask=m, other=0).to(tl.uint32, bitcast=True)
        sh = bit % 32
        w = ((lo >> sh) | tl.where(sh > 8, hi << ((32 - sh) % 32), 0)).to(tl.int32, bitcast=True) & 0xFFFFFF
    return w


@triton.jit
def _pair_index(w, ck2, fix3, J: tl.constexpr, BITS: tl.constexpr):
    """Pair-table index of fields (2J, 2J+1) of block words w: c·4^b + (f_{2J+1} << b | f_{2J}), with
    v_7 = (f_7 & ~1) | parity for J = 3 (``fix3`` = c·4^b | parity << b)."""
    M2: tl.constexpr = (1 << (2 * BITS)) - 1
    if J == 3:
        return ((w >> (6 * BITS)) & (M2 - (1 << BITS))) | fix3
    elif J == 0:
        return (w & M2) | ck2
    else:
        return ((w >> (2 * J * BITS)) & M2) | ck2


@triton.jit
def _and_or(a, mask: tl.constexpr, b, ASM: tl.constexpr):
    """(a & mask) | b (int32). With ASM one PTX ``lop3`` (truth table 0xEA = (x & y) | z), which the
    compiler cannot see through: otherwise it turns the or into an add and adds the coset's table
    offset to every value's shared-memory address with its own multiply-add (5 instructions per
    looked-up value instead of 4: shift, lop3, lea, lds)."""
    if ASM:
        m = tl.full(a.shape, mask, tl.int32)
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r", [a, m, b],
                                         dtype=tl.int32, is_pure=True, pack=1)
    return (a & mask) | b


@triton.jit
def _value_index(w, ck, fix7, I: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr = False):
    """Table index c·2^b + v_I of field I of block words w (``fix7`` = c·2^b | parity)."""
    MASK: tl.constexpr = (1 << BITS) - 1
    if I == 7:
        return _and_or(w >> (7 * BITS), MASK - 1, fix7, ASM)
    elif I == 0:
        return _and_or(w, MASK, ck, ASM)
    else:
        return _and_or(w >> (I * BITS), MASK, ck, ASM)


@triton.jit
def _table_offset(w, sw, SHIFT: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, SETS: tl.constexpr,
                  GB: tl.constexpr):
    """(set << 1 | c) << SHIFT of block words w [N, G]: the coset bit c (bit 7·BITS of w) and, with
    SETS = 2, the block's table set ((sw >> (g // GB)) & 1 of switch bytes sw [N]), moved into place
    without first isolating them (the first index bit above a value's or a pair's fields)."""
    off = (w >> (7 * BITS - SHIFT)) & (1 << SHIFT)
    if SETS == 2:
        off = off | ((sw[:, None] >> (tl.arange(0, G)[None, :] // GB)) << (SHIFT + 1)) & (2 << SHIFT)
    return off


@triton.jit
def _decode_tile(w, tab_ptr, pair_ptr, BITS: tl.constexpr, G: tl.constexpr, TILE_N: tl.constexpr,
                 LUT: tl.constexpr, sw=None, SETS: tl.constexpr = 1, GB: tl.constexpr = 1):
    """Block words int32 [N, G] -> table values fp16 [N, 8·G], natural coordinate order.

    With SETS = 2 (``e8s-*``), block g reads table set (sw >> (g // GB)) & 1 (switch bytes sw [N]):
    the set is one more index bit above the coset's.

    Coset, parity and indices stay in the [N, G] shape (each block's word once per thread); the
    per-pair (or per-value) indices are joined into trailing dims of size 2 (held in registers),
    so the result needs no layout change before the dots. LUT 0: pair table by ``tl.gather``;
    1: pair table by a gather load; 2: fp16 value table by ``tl.gather``; 3: the value table by a
    gather load; 4: no lookup (wrong values: a timing diagnostic); 5: as 2 with each index's
    mask-and-or as one inline-PTX ``lop3`` (:func:`_and_or`)."""
    par = _parity7(w, BITS)
    if LUT == 2 or LUT == 3 or LUT == 5:
        ASM: tl.constexpr = LUT == 5
        ck = _table_offset(w, sw, BITS, BITS, G, SETS, GB)
        fix7 = ck | par
        i0 = _value_index(w, ck, fix7, 0, BITS, ASM)
        i1 = _value_index(w, ck, fix7, 1, BITS, ASM)
        i2 = _value_index(w, ck, fix7, 2, BITS, ASM)
        i3 = _value_index(w, ck, fix7, 3, BITS, ASM)
        i4 = _value_index(w, ck, fix7, 4, BITS, ASM)
        i5 = _value_index(w, ck, fix7, 5, BITS, ASM)
        i6 = _value_index(w, ck, fix7, 6, BITS, ASM)
        i7 = _value_index(w, ck, fix7, 7, BITS, ASM)
        # flattened [.., 2, 2, 2] index = 4a + 2b + c: innermost join pairs i and i+4
        idx = tl.join(tl.join(tl.join(i0, i4), tl.join(i2, i6)), tl.join(tl.join(i1, i5), tl.join(i3, i7)))
        if LUT == 2 or LUT == 5:
            vals = tl.gather(tl.load(tab_ptr + tl.arange(0, (2 * SETS) << BITS)), tl.reshape(idx, [TILE_N * 8 * G]), 0)
        else:
            vals = tl.load(tab_ptr + tl.reshape(idx, [TILE_N * 8 * G]))
        return tl.reshape(vals, [TILE_N, 8 * G])
    else:
        ck2 = _table_offset(w, sw, 2 * BITS, BITS, G, SETS, GB)
        fix3 = ck2 | (par << BITS)
        p0 = _pair_index(w, ck2, fix3, 0, BITS)
        p1 = _pair_index(w, ck2, fix3, 1, BITS)
        p2 = _pair_index(w, ck2, fix3, 2, BITS)
        p3 = _pair_index(w, ck2, fix3, 3, BITS)
        idx = tl.reshape(tl.join(tl.join(p0, p2), tl.join(p1, p3)), [TILE_N * 4 * G])  # pair j at 2j, 2j+1
        if LUT == 0:
            x = tl.gather(tl.load(pair_ptr + tl.arange(0, (2 * SETS) << (2 * BITS))), idx, 0)
        elif LUT == 1:
            x = tl.load(pair_ptr + idx)
        else:
            x = idx * 0x3C003C00  # diagnostic: no lookup
        lo = x.to(tl.int16).to(tl.float16, bitcast=True)
        hi = (x >> 16).to(tl.int16).to(tl.float16, bitcast=True)
        return tl.reshape(tl.join(lo, hi), [TILE_N, 8 * G])


@triton.jit
def _tile_slots(j, n_end, bt_row, kvh_off, cs0, cs2, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr):
    """Cache positions n [N] of KV tile j, their mask (n < n_end) and the int32-word offsets [N] of
    their (token, kv head) slots through the sequence's block-table row."""
    n = j * TILE_N + tl.arange(0, TILE_N)
    nmask = n < n_end
    if (BLOCK_SIZE & (BLOCK_SIZE - 1)) == 0:
        # n >= 0: a shift and a mask instead of C-style signed division
        un = n.to(tl.uint32, bitcast=True)
        blk = tl.load(bt_row + (un // BLOCK_SIZE), mask=nmask, other=0).to(tl.uint32, bitcast=True).to(tl.int64)
        return n, nmask, blk * cs0 + kvh_off + ((un % BLOCK_SIZE) * cs2).to(tl.int64)
    blk = tl.load(bt_row + n // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
    return n, nmask, blk * cs0 + kvh_off + (n % BLOCK_SIZE) * cs2


@triton.jit
def _query_rows(qsl_ptr, sl_ptr, seq, q_tile, kvh, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                NQ: tl.constexpr, NQ_PAD: tl.constexpr):
    """Rows of query tile ``q_tile`` of sequence ``seq`` for kv head ``kvh`` (row r = query token
    r // NQ_PAD of the tile, query head r % NQ_PAD of the kv head's group) ->
    (q_len, seq_len, ctx = seq_len - q_len, qi [M] token index in the sequence's queries, rvalid [M],
    head [M], tok int64 [M] row of q/o)."""
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    seq_len = tl.load(sl_ptr + seq)
    r = tl.arange(0, BLOCK_M)
    qi = q_tile * BLOCK_Q + r // NQ_PAD
    hj = r % NQ_PAD
    rvalid = (hj < NQ) & (qi < q_len) & (r // NQ_PAD < BLOCK_Q)
    return q_len, seq_len, seq_len - q_len, qi, rvalid, kvh * NQ + hj, (q_start + qi).to(tl.int64)


@triton.jit
def _query_operands(q_ptr, qb_ptr, sink_ptr, tok, head, rvalid, sq0, sq1, ss0, D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BIAS: tl.constexpr, SINK: tl.constexpr):
    """The query tile's operands for rows (tok, head): q fp16 [M, D], the key-bias coefficients qb
    fp16 [M, D] (q itself when not BIAS) and the position-0 term sb float32 [M] (zeros when not SINK)."""
    d = tl.arange(0, D)
    rows = (tok * sq0 + head * sq1)[:, None] + d[None, :]
    q = tl.load(q_ptr + rows, mask=rvalid[:, None], other=0.0).to(tl.float16)
    qb = q
    if BIAS:
        qb = tl.load(qb_ptr + rows, mask=rvalid[:, None], other=0.0).to(tl.float16)
    sb = tl.zeros([BLOCK_M], dtype=tl.float32)
    if SINK:
        sb = tl.load(sink_ptr + tok * ss0 + head, mask=rvalid, other=0.0)
    return q, qb, sb


@triton.jit
def _tile_load(cache_ptr, slot, nmask, KB: tl.constexpr, VB: tl.constexpr, G: tl.constexpr):
    """The codes of one KV tile (int32-word slot offsets ``slot`` [N], loaded where ``nmask``):
    (K block words [N, G], V block words [N, G], scale words [N]: K scale low half, V scale high)."""
    V_OFF: tl.constexpr = G * KB // 4  # int32 word of the V fields
    S_OFF: tl.constexpr = G * (KB + VB) // 4  # the word holding both scales
    wk = _block_words(cache_ptr, slot, nmask, 0, KB, G)
    wv = _block_words(cache_ptr, slot, nmask, V_OFF, VB, G)
    sc = tl.load(cache_ptr + slot + S_OFF, mask=nmask, other=0)
    return wk, wv, sc


@triton.jit
def _tile_compute(q, wk, wv, sc, n, nmask, qpos, k_tab, v_tab, k_pairs, v_pairs, m_i, l_i, acc, qb, trig_ptr, sb,
                  KB: tl.constexpr, VB: tl.constexpr, G: tl.constexpr, TILE_N: tl.constexpr, LUT: tl.constexpr,
                  CAUSAL: tl.constexpr, BIAS: tl.constexpr, SINK: tl.constexpr, k_stab, v_stab, KS: tl.constexpr,
                  VS: tl.constexpr, KGB: tl.constexpr, VGB: tl.constexpr):
    """One online-softmax step over a loaded tile (:func:`_tile_load`) of positions ``n`` [N]; with
    CAUSAL, row r attends only to positions <= qpos[r]; with BIAS, the logits gain qb [M, D] · trig[n]
    (position-dependent key centers; trig float32 or fp16 [P, D]); with SINK, the logit of position 0
    gains sb [M]. The tails in ``sc`` (K low half, V high half): an fp16 scale, or with KS / VS = 2
    (``e8s-*``) the switch byte then the exponent byte into the scale table k_stab / v_stab.
    -> (m_i, l_i, acc)."""
    if KS == 2:
        swk = sc & 255
        sk = tl.load(k_stab + ((sc >> 8) & 255))
    else:
        swk = sc
        sk = sc.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    if VS == 2:
        swv = (sc >> 16) & 255
        sv = tl.load(v_stab + ((sc >> 24) & 255))
    else:
        swv = sc
        sv = (sc >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    k = _decode_tile(wk, k_tab, k_pairs, KB, G, TILE_N, LUT, swk, KS, KGB)
    s = tl.dot(q, tl.trans(k)) * sk[None, :]
    if BIAS:
        dd = tl.arange(0, 8 * G)
        tg = tl.load(trig_ptr + n.to(tl.int64)[:, None] * (8 * G) + dd[None, :], mask=nmask[:, None], other=0.0)
        s = tl.dot(qb, tl.trans(tg.to(tl.float16)), s)
    if SINK:
        s = s + tl.where(n[None, :] == 0, sb[:, None], 0.0)
    if CAUSAL:
        s = tl.where(nmask[None, :] & (n[None, :] <= qpos[:, None]), s, float("-inf"))
    else:
        s = tl.where(nmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = _decode_tile(wv, v_tab, v_pairs, VB, G, TILE_N, LUT, swv, VS, VGB)
    acc = tl.dot((p * sv[None, :]).to(tl.float16), v, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _tile_step(q, cache_ptr, slot, n, nmask, qpos, k_tab, v_tab, k_pairs, v_pairs, m_i, l_i, acc, qb, trig_ptr,
               sb, KB: tl.constexpr, VB: tl.constexpr, G: tl.constexpr, TILE_N: tl.constexpr, LUT: tl.constexpr,
               CAUSAL: tl.constexpr, BIAS: tl.constexpr, SINK: tl.constexpr, k_stab, v_stab, KS: tl.constexpr,
               VS: tl.constexpr, KGB: tl.constexpr, VGB: tl.constexpr):
    """:func:`_tile_load` + :func:`_tile_compute` of one tile. -> (m_i, l_i, acc)."""
    wk, wv, sc = _tile_load(cache_ptr, slot, nmask, KB, VB, G)
    return _tile_compute(q, wk, wv, sc, n, nmask, qpos, k_tab, v_tab, k_pairs, v_pairs, m_i, l_i, acc, qb, trig_ptr,
                         sb, KB, VB, G, TILE_N, LUT, CAUSAL, BIAS, SINK, k_stab, v_stab, KS, VS, KGB, VGB)


@triton.jit(do_not_specialize=["sbt0"])  # the block table's row stride: the warm-up's table is not vLLM's
def _e8_decode_kernel(q_ptr, sq0, sq1, ws_m_ptr, ws_l_ptr, ws_o_ptr,
                      cache_ptr, cs0, cs1, cs2, k_tab, v_tab, k_pairs, v_pairs, bt_ptr, sbt0, qsl_ptr, sl_ptr,
                      num_heads, qb_ptr, trig_ptr, sink_ptr, ss0,
                      NQ: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, D: tl.constexpr,
                      KB: tl.constexpr, VB: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SEGS: tl.constexpr,
                      LUT: tl.constexpr, BIAS: tl.constexpr = False, SINK: tl.constexpr = False,
                      PREFETCH: tl.constexpr = False, k_stab=None, v_stab=None, KS: tl.constexpr = 1,
                      VS: tl.constexpr = 1, KGB: tl.constexpr = 1, VGB: tl.constexpr = 1):
    """Flash-decoding over the packed cache (one query token per sequence).

    Program (sequence, kv head, segment): the NQ query heads of the kv head as rows of one tile; each
    tile of TILE_N codes is decoded once to fp16 [TILE_N, D] in registers (:func:`_decode_tile`)
    and used by one dot for q·k and one for p·v. cache_ptr: the cache as int32 words (strides
    cs0, cs1, cs2 in words). q: float32 [T, H_q, D] rotated and scaled by scale·log2(e).
    With BIAS: qb float32 [T, H_q, D] (q's strides) and trig [P, D] add qb · trig[n] to the
    logit of position n; with SINK, sink float32 [T, H_q] (row stride ss0) adds to position 0's
    (:func:`_tile_step`). With PREFETCH, the next tile's codes are loaded into registers before the
    current tile is decoded (its loads are in flight while this tile computes).
    Writes unnormalized partials to ws_o [B, H_q, S, D] and ws_m / ws_l [B, H_q, S] (per sequence).
    """
    G: tl.constexpr = D // 8
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    seg = tl.program_id(2)
    q_start = tl.load(qsl_ptr + seq)
    if tl.load(qsl_ptr + seq + 1) - q_start != 1:  # not a decode row (in a mixed batch: the tile grid's)
        return
    seq_len = tl.load(sl_ptr + seq)
    r = tl.arange(0, BLOCK_M)
    rvalid = r < NQ
    head = kvh * NQ + r
    tok = q_start.to(tl.int64)
    d = tl.arange(0, D)
    q, qb, sb = _query_operands(q_ptr, qb_ptr, sink_ptr, tok, head, rvalid, sq0, sq1, ss0, D, BLOCK_M, BIAS, SINK)
    n_tiles = tl.cdiv(seq_len, TILE_N)
    per = tl.cdiv(n_tiles, NUM_SEGS)
    j0 = seg * per
    j1 = tl.minimum(j0 + per, n_tiles)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * sbt0
    kvh_off = kvh.to(tl.int64) * cs1
    if PREFETCH:
        seg_end = tl.minimum(seq_len, j1 * TILE_N)  # the next tile past the segment loads nothing
        n, nmask, slot = _tile_slots(j0, seg_end, bt_row, kvh_off, cs0, cs2, BLOCK_SIZE, TILE_N)
        wk, wv, sc = _tile_load(cache_ptr, slot, nmask, KB, VB, G)
        for j in range(j0, j1):
            n2, nmask2, slot2 = _tile_slots(j + 1, seg_end, bt_row, kvh_off, cs0, cs2, BLOCK_SIZE, TILE_N)
            wk2, wv2, sc2 = _tile_load(cache_ptr, slot2, nmask2, KB, VB, G)
            m_i, l_i, acc = _tile_compute(q, wk, wv, sc, n, nmask, n, k_tab, v_tab, k_pairs, v_pairs, m_i, l_i, acc,
                                          qb, trig_ptr, sb, KB, VB, G, TILE_N, LUT, False, BIAS, SINK, k_stab, v_stab,
                                          KS, VS, KGB, VGB)
            n, nmask, wk, wv, sc = n2, nmask2, wk2, wv2, sc2
    else:
        for j in range(j0, j1):
            n, nmask, slot = _tile_slots(j, seq_len, bt_row, kvh_off, cs0, cs2, BLOCK_SIZE, TILE_N)
            m_i, l_i, acc = _tile_step(q, cache_ptr, slot, n, nmask, n, k_tab, v_tab, k_pairs, v_pairs, m_i, l_i,
                                       acc, qb, trig_ptr, sb, KB, VB, G, TILE_N, LUT, False, BIAS, SINK, k_stab,
                                       v_stab, KS, VS, KGB, VGB)
    wi = (seq.to(tl.int64) * num_heads + head) * NUM_SEGS + seg  # workspaces are per sequence
    tl.store(ws_m_ptr + wi, m_i, mask=rvalid)
    tl.store(ws_l_ptr + wi, l_i, mask=rvalid)
    tl.store(ws_o_ptr + (wi * D)[:, None] + d[None, :], acc, mask=rvalid[:, None])


@triton.jit
def _find_seq(qsl_ptr, target, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest i with query_start_loc[i] // BLOCK_Q + i <= target (the sequence owning q tile target)."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        val = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        if val <= target:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# batch- and engine-dependent integers: no recompile per batch size or block-table width (warm-up)
@triton.jit(do_not_specialize=["num_seqs", "sbt0"])
def _e8_tile_attn_kernel(q_ptr, sq0, sq1, o_ptr, so0, so1, cache_ptr, cs0, cs1, cs2, k_tab, v_tab, k_pairs, v_pairs,
                         bt_ptr, sbt0, qsl_ptr, sl_ptr, num_seqs, qb_ptr, trig_ptr, sink_ptr, ss0,
                         NQ: tl.constexpr, NQ_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                         TILE_N: tl.constexpr, D: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, LUT: tl.constexpr, BIAS: tl.constexpr = False,
                         SINK: tl.constexpr = False, k_stab=None, v_stab=None, KS: tl.constexpr = 1,
                         VS: tl.constexpr = 1, KGB: tl.constexpr = 1, VGB: tl.constexpr = 1,
                         SKIP_DECODE: tl.constexpr = False):
    """The general grid (prefill, chunked prefill, mixed batches): causal attention of BLOCK_Q query
    tokens × the NQ query heads of one kv head over the sequence's cached codes. With SKIP_DECODE,
    sequences with one query token are left to the decode grid (:func:`_e8_decode_kernel`).

    q: float32 [T, H_q, D] rotated, scaled by scale·log2(e); o: float32 [T, H_q, D].
    BIAS, qb, trig, SINK, sink, ss0: as in :func:`_e8_decode_kernel`.
    """
    G: tl.constexpr = D // 8
    kvh = tl.program_id(1)
    target = tl.program_id(0)
    seq = _find_seq(qsl_ptr, target, num_seqs, BLOCK_Q)
    q_tile = target - (tl.load(qsl_ptr + seq) // BLOCK_Q + seq)
    q_len, seq_len, ctx, qi, rvalid, head, tok = _query_rows(qsl_ptr, sl_ptr, seq, q_tile, kvh, BLOCK_Q, BLOCK_M,
                                                            NQ, NQ_PAD)
    if q_tile * BLOCK_Q >= q_len or (SKIP_DECODE and q_len == 1):
        return
    d = tl.arange(0, D)
    q, qb, sb = _query_operands(q_ptr, qb_ptr, sink_ptr, tok, head, rvalid, sq0, sq1, ss0, D, BLOCK_M, BIAS, SINK)
    qpos = ctx + qi
    n_end = tl.minimum(seq_len, ctx + (q_tile + 1) * BLOCK_Q)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * sbt0
    kvh_off = kvh.to(tl.int64) * cs1
    for j in range(0, tl.cdiv(n_end, TILE_N)):
        n, nmask, slot = _tile_slots(j, n_end, bt_row, kvh_off, cs0, cs2, BLOCK_SIZE, TILE_N)
        m_i, l_i, acc = _tile_step(q, cache_ptr, slot, n, nmask, qpos, k_tab, v_tab, k_pairs, v_pairs, m_i, l_i,
                                   acc, qb, trig_ptr, sb, KB, VB, G, TILE_N, LUT, True, BIAS, SINK, k_stab, v_stab,
                                   KS, VS, KGB, VGB)
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + (tok * so0 + head * so1)[:, None] + d[None, :], acc, mask=rvalid[:, None])


#: query heads per program of the query-rotation kernel
HEAD_BLOCK = 16


@triton.jit
def _e8_rotate_q_kernel(q_ptr, sq0, sq1, qr_ptr, pm1_ptr, mul, num_heads, D: tl.constexpr, BH: tl.constexpr,
                        LOG_B: tl.constexpr):
    """q̃ = ((q ⊙ s) · blockdiag(H_b)) · mul for BH query heads of one token row (program (row, head
    block)), i.e. q · R_kᵀ · scale · log2(e) with mul = scale · log2(e) / √b: the keys' rotation
    (P = diag(s) blockdiag(H_b), :class:`_CodecConsts` ``pm1``; :func:`_rotation_signs`) by butterflies in float32 (:func:`_fwht_rows`). q [T, H_q, D] in its own
    dtype and strides (last dim contiguous); q̃ float32 [T, H_q, D] contiguous. One kernel and no
    matrix instead of a cast and a GEMM."""
    row = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BH + tl.arange(0, BH)
    hmask = heads < num_heads
    d = tl.arange(0, D)
    sgn = _rotation_signs(pm1_ptr, D, LOG_B)
    x = tl.load(q_ptr + row * sq0 + heads[:, None].to(tl.int64) * sq1 + d[None, :], mask=hmask[:, None],
                other=0.0).to(tl.float32)
    y = _fwht_rows(x * sgn[None, :], BH, D, LOG_B) * mul
    tl.store(qr_ptr + (row * num_heads + heads[:, None]) * D + d[None, :], y, mask=hmask[:, None])


@triton.jit
def _row_seq(qsl_ptr, row, num_seqs):
    """The sequence owning query row ``row``: the largest i < num_seqs with query_start_loc[i] <= row
    (empty sequences starting at the same row come before it and are skipped)."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(qsl_ptr + mid) <= row:
            lo = mid + 1
        else:
            hi = mid
    return tl.maximum(lo - 1, 0)


@triton.jit(do_not_specialize=["num_seqs"])  # batch-dependent: no recompile per batch size
def _e8_output_kernel(out_ptr, so0, so1, o_ptr, oo0, oo1, ws_m_ptr, ws_l_ptr, ws_o_ptr, qsl_ptr, num_seqs,
                      num_heads, pm1_ptr, inv_sqrt_b, D: tl.constexpr, NUM_SEGS: tl.constexpr,
                      SEGS_P2: tl.constexpr, LOG_B: tl.constexpr, WS: tl.constexpr, HAS_O: tl.constexpr):
    """The attention output of one (token row, query head) (program (row, head)), un-rotated and stored
    in ``out``'s dtype: out = õ · R_v = ((õ · blockdiag(H_b)) ⊙ s) / √b (P = diag(s) blockdiag(H_b) the
    values' ``pm1``), by butterflies in float32 (:func:`_fwht_rows`).

    õ: for a row that is the only query token of its sequence, when the split-KV decode grid ran
    (WS), the merge of its NUM_SEGS partials (m, l in base 2, unnormalized o: workspaces [B, H_q,
    NUM_SEGS(, D)] per sequence; SEGS_P2 the next power of two); for any other row below
    query_start_loc[-1] the tile grid's normalized output o [T, H_q, D] float32 (HAS_O); rows past
    the batch get zeros. One kernel and no matrix instead of a merge, a GEMM and a copy. A row r that is
    the only query token of sequence r (every row of a decode batch) skips the search for its sequence
    (:func:`_row_seq`: log2(B) dependent loads)."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    d = tl.arange(0, D)
    direct = False  # row r the only query token of sequence r (a decode batch): no search
    if row < num_seqs:
        direct = (tl.load(qsl_ptr + row) == row) & (tl.load(qsl_ptr + row + 1) == row + 1)
    if direct:
        seq = row
    else:
        seq = _row_seq(qsl_ptr, row, num_seqs)
    in_batch = row < tl.load(qsl_ptr + num_seqs)
    alone = (tl.load(qsl_ptr + seq) == row) & (tl.load(qsl_ptr + seq + 1) == row + 1)
    decoded = (in_batch & alone).to(tl.int32) * WS  # WS: 0 or 1
    o = tl.zeros([D], dtype=tl.float32)
    if decoded != 0:
        sg = tl.arange(0, SEGS_P2)
        smask = sg < NUM_SEGS
        wi = (seq.to(tl.int64) * num_heads + head) * NUM_SEGS + sg
        m = tl.load(ws_m_ptr + wi, mask=smask, other=-float("inf"))
        l_ = tl.load(ws_l_ptr + wi, mask=smask, other=0.0)
        w = tl.exp2(m - tl.max(m, axis=0))
        tot = tl.sum(l_ * w, axis=0)
        acc = tl.sum(tl.load(ws_o_ptr + wi[:, None] * D + d[None, :], mask=smask[:, None], other=0.0) * w[:, None],
                     axis=0)
        o = acc / tl.where(tot > 0, tot, 1.0)
    else:
        if HAS_O:
            if in_batch:
                o = tl.load(o_ptr + row.to(tl.int64) * oo0 + head * oo1 + d)
    sgn = _rotation_signs(pm1_ptr, D, LOG_B)
    y = tl.reshape(_fwht_rows(tl.reshape(o, [1, D]), 1, D, LOG_B), [D]) * sgn * inv_sqrt_b
    tl.store(out_ptr + row.to(tl.int64) * so0 + head * so1 + d, y.to(out_ptr.dtype.element_ty))


def _launch(cfg: dict) -> dict:
    """Launch options of a kernel setting: warps, pipeline stages and (when set) the register cap
    ``maxnreg`` (fewer registers per thread, more resident warps per SM, possibly spills)."""
    opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    if cfg.get("maxnreg"):
        opts["maxnreg"] = cfg["maxnreg"]
    return opts


def prepare_device_constants(fmt, device: str, scale: float) -> None:  # noqa: ANN001
    """Build (and cache) the kernels' constants of ``fmt`` on ``device`` ahead of time (``scale``: the
    layer's softmax scale, a kernel argument): the first attention call may run inside a CUDA-graph capture, where
    host-to-device copies are not allowed. ``device`` as ``str(kv_cache.device)`` will name it.
    Safe under a default-device context (vLLM builds models under ``torch.device("cuda")``): the
    constants are built on the host and copied to ``device`` explicitly."""
    c = TritonE8Format.get(fmt, device)
    if GLUON and c.k.bits == 4 and c.v.bits == 4:  # the table image of the configured key lookup
        _gluon.gluon_tables(c, bool(DECODE_CONFIG["gluon_kp"]), DECODE_CONFIG["gluon_lut"],
                            _gluon_arith(c, DECODE_CONFIG))


def _gluon_arith(c: "TritonE8Format", dc: dict) -> int:
    """The fields the Gluon decode decodes arithmetically (bit 0 keys, bit 1 values): those with cubic
    level tables (``e8c-*``, ``e8_gluon.arith_bits``) when ``gluon_arith`` is 1 and the lookups are the
    plain ones (``gluon_kp`` 0, ``gluon_lut`` 0), the keys' only with value pairs (``gluon_lut`` 2: values
    looked up two fields at a time); else 0."""
    if not dc.get("gluon_arith", 1) or dc["gluon_kp"] or dc["gluon_lut"] == 1:
        return 0
    return _gluon.arith_bits(c) & (1 if dc["gluon_lut"] == 2 else 3)


#: most KV segments the decode grid takes by default (the output kernel holds segments x head size per program)
MAX_SEGMENTS = 64


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def _mma_v2_capable(device: torch.device) -> bool:
    """The Gluon decode kernel's ``mma.m16n8k16`` needs sm_80 or newer; older GPUs take the Triton kernel."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def _gluon_segs(num_seqs: int, h_kv: int, device: torch.device, base: int) -> int:
    """Segments of the Gluon decode grid: ``base``, or more (a power of two, at most
    :data:`MAX_SEGMENTS`) until the grid has 16 one-warp programs per SM. Depends on the batch shape
    only (CUDA-graph capture)."""
    want = 16 * _sm_count(device)
    segs = base
    while segs < MAX_SEGMENTS and num_seqs * h_kv * segs < want:
        segs *= 2
    return segs


def _use_gluon(c: TritonE8Format, dc: dict, block_size: int, nq: int, device: torch.device, biased: bool) -> bool:
    """Whether the decode grid is :mod:`.e8_gluon`'s kernel (else the Triton one)."""
    return (bool(dc["gluon"]) and not biased and _gluon.gluon_supported(c, block_size, nq, dc["gluon_tile"])
            and _mma_v2_capable(device))


def _default_segs(use_gluon: bool, num_seqs: int, h_kv: int, device: torch.device, dc: dict) -> int:
    """KV segments of the decode grid: :func:`_gluon_segs` for the Gluon kernel, else ``dc["segs"]``."""
    return _gluon_segs(num_seqs, h_kv, device, dc["segs"]) if use_gluon else dc["segs"]


def decode_segments(num_seqs: int, h_kv: int, device: torch.device, dc: dict | None = None, *, fmt=None,  # noqa: ANN001
                    block_size: int = 16, nq: int = 1, biased: bool = False) -> int:
    """KV segments of the decode grid that :func:`triton_paged_attention` takes by default for a
    decode batch of ``num_seqs`` sequences (``dc``: decode settings, default :data:`DECODE_CONFIG`;
    ``fmt`` the ``E8KVFormat``, ``nq`` query heads per kv head, ``biased`` with key centers)."""
    dc = DECODE_CONFIG if dc is None else dc
    gluon = fmt is not None and _use_gluon(TritonE8Format.get(fmt, str(device)), dc, block_size, nq, device, biased)
    return _default_segs(gluon, num_seqs, h_kv, device, dc)


def _cache_words(kv_cache: torch.Tensor) -> torch.Tensor:
    """The uint8 cache [num_blocks, H_kv, block_size, slot_bytes] as int32 words (a view)."""
    if kv_cache.shape[3] % 4 or any(st % 4 for st in kv_cache.stride()[:3]) or kv_cache.stride(3) != 1:
        raise ValueError(f"e8vllm: the Triton kernels read the cache as int32 words; slot bytes and strides must be "
                         f"multiples of 4 (shape {tuple(kv_cache.shape)}, strides {kv_cache.stride()})")
    return kv_cache.view(torch.int32)


def triton_paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                           seq_lens: torch.Tensor, block_table: torch.Tensor, fmt, *,  # noqa: ANN001
                           max_query_len: int, num_kv_heads: int | None = None, scale: float | None = None,
                           out: torch.Tensor | None = None, num_segs: int | None = None,
                           decode: dict | None = None, prefill: dict | None = None,
                           key_bias=None) -> torch.Tensor:  # noqa: ANN001 - reference.KeyBias
    """Causal GQA attention over the packed cache (same contract as ``reference.paged_attention``).

    Args:
        query: float [T, H_q, D] (rows past ``query_start_loc[-1]`` come out as zeros).
        kv_cache: uint8 [num_blocks, H_kv, block_size, slot_bytes].
        query_start_loc: int32 [B + 1]; seq_lens: int32 [>= B]; block_table: int32 [>= B, max_blocks].
        max_query_len: host int (from vLLM's metadata): 1 selects the decode (split-KV) grid.
        num_segs: KV segments of the decode grid (default ``DECODE_CONFIG["segs"]``; 1 = none).
        decode: decode-kernel settings (benchmarks): ``kernel`` (a :data:`KERNELS` name), ``tile_n``,
            ``num_warps``, ``num_stages``, ``segs``, ``prefetch`` (0/1: load the next tile's codes
            before decoding this one), ``maxnreg`` (0 or a register cap per thread) (default
            :data:`DECODE_CONFIG`).
        prefill: general-grid settings (batches with max_query_len > 1): ``kernel``, ``block_m``,
            ``tile_n``, ``num_warps``, ``num_stages``, ``maxnreg``, ``split_decode`` (1: the batch's
            one-token sequences take the decode grid with the ``decode`` settings) (default
            :data:`PREFILL_CONFIG`).
        key_bias: optional ``reference.KeyBias`` (coef [T, H_q, D] with table [P, D], P > every
            position, float32 or fp16; first [T, H_q]): extra logit terms of position-dependent key
            centers (:mod:`e8vllm.calibration`).
    Returns:
        ``out`` (or a new [T, H_q, D] tensor of query's dtype).
    """
    c = TritonE8Format.get(fmt, str(kv_cache.device))
    t, h_q, d = query.shape
    h_kv = num_kv_heads if num_kv_heads is not None else kv_cache.shape[1]
    nq = h_q // h_kv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if out is None:
        out = torch.zeros(query.shape, dtype=query.dtype, device=query.device)
    elif out.dim() != 3 or out.shape[0] < t or tuple(out.shape[1:]) != (h_q, d):
        raise ValueError(f"out {tuple(out.shape)} does not fit query {tuple(query.shape)}")
    b = query_start_loc.shape[0] - 1
    if t == 0 or b <= 0:
        return out
    words = _cache_words(kv_cache)
    bs = kv_cache.shape[2]
    # settings validated once at import; an explicit (benchmark) setting is validated here
    dc = DECODE_CONFIG if decode is None else kernel_config(DECODE_CONFIG, decode, "decode settings", True)
    pc = PREFILL_CONFIG if prefill is None else kernel_config(PREFILL_CONFIG, prefill, "prefill settings", True)
    if query.stride(2) != 1:
        query = query.contiguous()
    qr = torch.empty((t, h_q, d), dtype=torch.float32, device=query.device)
    _e8_rotate_q_kernel[(t, triton.cdiv(h_q, HEAD_BLOCK))](
        query, query.stride(0), query.stride(1), qr, c.k.pm1, c.k.inv_sqrt_b * scale * LOG2E, h_q, D=d,
        BH=HEAD_BLOCK, LOG_B=c.k.block.bit_length() - 1, num_warps=4)
    w, trig, first = key_bias if key_bias is not None else (None, None, None)
    bias, sink = w is not None, first is not None
    qb = sb = qr  # placeholders when unused
    if bias:
        if trig is None or trig.shape[1] != d or w.shape != query.shape:
            raise ValueError(f"key_bias coef {tuple(w.shape)} / table {None if trig is None else tuple(trig.shape)} "
                             f"do not fit query {tuple(query.shape)}")
        qb = (w.to(torch.float32) * (scale * LOG2E)).contiguous()  # same strides as qr
        trig = trig.contiguous()  # float32 or fp16 (rounded to fp16 in the kernel)
        if trig.dtype not in (torch.float16, torch.float32):
            raise ValueError(f"key_bias table must be float16 or float32, got {trig.dtype}")
    else:
        trig = qr
    if sink:
        if first.shape != (t, h_q):
            raise ValueError(f"key_bias first {tuple(first.shape)} does not fit query {tuple(query.shape)}")
        sb = (first.to(torch.float32) * (scale * LOG2E)).contiguous()
    use_gluon = _use_gluon(c, dc, bs, nq, query.device, bias or sink)
    segs = num_segs if num_segs is not None else _default_segs(use_gluon, b, h_kv, query.device, dc)
    tabs = (c.k.table_h, c.v.table_h, c.k.pairs, c.v.pairs)
    sets = dict(k_stab=c.k.scales, v_stab=c.v.scales, KS=c.k.sets, VS=c.v.sets, KGB=c.k.group_blocks,
                VGB=c.v.group_blocks)
    strides = (words.stride(0), words.stride(1), words.stride(2))
    split = max_query_len > 1 and bool(pc["split_decode"])
    ws = max_query_len <= 1 or split  # the split-KV decode grid runs (its partials go to the output kernel)
    if max_query_len > 1:
        nq_pad = triton.next_power_of_2(nq)
        block_m = max(pc["block_m"], nq_pad)
        block_q = block_m // nq_pad
        o = torch.zeros((t, h_q, d), dtype=torch.float32, device=query.device)  # normalized, still rotated
        _e8_tile_attn_kernel[(t // block_q + b, h_kv)](
            qr, qr.stride(0), qr.stride(1), o, o.stride(0), o.stride(1), words, *strides, *tabs, block_table,
            block_table.stride(0), query_start_loc, seq_lens, b, qb, trig, sb, h_q, NQ=nq, NQ_PAD=nq_pad,
            BLOCK_Q=block_q, BLOCK_M=block_m, TILE_N=pc["tile_n"], D=d, KB=c.k.bits, VB=c.v.bits, BLOCK_SIZE=bs,
            LUT=KERNELS[pc["kernel"]], BIAS=bias, SINK=sink, SKIP_DECODE=split, **sets, **_launch(pc))
    if ws:
        # the split-KV decode grid over the sequences with one query token (all of them in a decode
        # batch; in a mixed batch the ones the tile grid skipped); workspaces per sequence, not per
        # query token (a mixed batch holds a prefill chunk's tokens as well)
        ws_m = torch.empty((b, h_q, segs), dtype=torch.float32, device=query.device)
        ws_l = torch.empty_like(ws_m)
        ws_o = torch.empty((b, h_q, segs, d), dtype=torch.float32, device=query.device)
        if use_gluon:
            _gluon.gluon_decode(qr, words, c, block_table, query_start_loc, seq_lens, ws_m, ws_l, ws_o, num_seqs=b,
                                num_kv_heads=h_kv, block_size=bs, segs=segs, maxnreg=dc["gluon_maxnreg"],
                                tile=dc["gluon_tile"], key_pairs=bool(dc["gluon_kp"]),
                                prefetch=dc["gluon_prefetch"], lut=dc["gluon_lut"], async_ring=dc["gluon_async"],
                                arith=_gluon_arith(c, dc),
                                lazy=bool(dc["gluon_lazy"]),
                                order=bool(dc["gluon_order"]), diag=dc["gluon_diag"])
        else:
            _e8_decode_kernel[(b, h_kv, segs)](
                qr, qr.stride(0), qr.stride(1), ws_m, ws_l, ws_o, words, *strides, *tabs, block_table,
                block_table.stride(0), query_start_loc, seq_lens, h_q, qb, trig, sb, h_q, NQ=nq,
                BLOCK_M=max(16, triton.next_power_of_2(nq)), TILE_N=dc["tile_n"], D=d, KB=c.k.bits, VB=c.v.bits,
                BLOCK_SIZE=bs, NUM_SEGS=segs, LUT=KERNELS[dc["kernel"]], BIAS=bias, SINK=sink,
                PREFETCH=bool(dc["prefetch"]), **sets, **_launch(dc))
    if not ws:  # placeholders, unread
        ws_m = ws_l = ws_o = qr
    if max_query_len <= 1:
        o = qr  # placeholder, unread
    # merge (decode rows), un-rotation and the store in out's dtype in one kernel
    dst = out if out.stride(2) == 1 else torch.empty((t, h_q, d), dtype=out.dtype, device=out.device)
    _e8_output_kernel[(t, h_q)](dst, dst.stride(0), dst.stride(1), o, o.stride(0), o.stride(1), ws_m, ws_l, ws_o,
                                query_start_loc, b, h_q, c.v.pm1, c.v.inv_sqrt_b, D=d, NUM_SEGS=segs if ws else 1,
                                SEGS_P2=triton.next_power_of_2(segs if ws else 1), LOG_B=c.v.block.bit_length() - 1,
                                WS=int(ws), HAS_O=max_query_len > 1, num_warps=4)
    if dst is not out:
        out[:t].copy_(dst)
    return out


def mixed_batch_segments(h_kv: int, device: torch.device, fmt, *, block_size: int = 16, nq: int = 1,  # noqa: ANN001
                         max_seqs: int = 1 << 12) -> list[int]:
    """Every KV-segment count the decode grid takes by default (:func:`decode_segments`, no key
    centers) in a batch of 1 .. ``max_seqs`` sequences at cache block size ``block_size``: the output
    kernel and the decode kernels compile once per count (a constexpr)."""
    return sorted({decode_segments(b, h_kv, device, fmt=fmt, block_size=block_size, nq=nq)
                   for b in range(1, max_seqs + 1)})


_WARMED_ATTN: set[tuple[object, ...]] = set()


def warm_attention_paths(fmt, device: str, num_heads: int, num_kv_heads: int, head_size: int,  # noqa: ANN001
                         dtype: torch.dtype, scale: float | None = None, *, block_size: int = 16,
                         max_seqs: int = 1 << 12) -> list[int]:
    """Compile the attention op's variants for batches of up to ``max_seqs`` sequences now (model
    construction) rather than inside inference. vLLM's CUDA-graph capture runs decode batches only,
    so a batch with a prompt chunk launches the output kernel with the tile grid's rows (``HAS_O``) at
    its own segment count for the first time inside a prefill (session 17: vLLM's JIT monitor logged
    ``_e8_output_kernel`` compiling in the first prefill of the 64 x 8k engine run); under
    ``enforce_eager`` the decode batches' variants, too. For each :func:`mixed_batch_segments` count
    one decode batch (two one-token sequences) and, with ``split_decode`` (else once), one mixed
    batch (a two-token prompt chunk and a one-token sequence), queries of ``dtype``, over a zero
    one-block scratch cache of ``block_size`` slots: the query rotation, the tile grid, the decode
    grid and the output kernel with the compile-time constants and argument specializations of real
    batches (the kernels do not specialize on the batch size or the block table's row stride). Key
    centers' variants (RoPE / sink terms) still compile at first use. Tried once per (format, device,
    heads, head size, dtype, block size, batch limit), also when it fails; returns the segment counts."""
    key = (fmt, device, num_heads, num_kv_heads, head_size, dtype, block_size, max_seqs)
    if key in _WARMED_ATTN:
        return []
    _WARMED_ATTN.add(key)  # a failure is not retried by every layer
    dev = torch.device(device)
    counts = mixed_batch_segments(num_kv_heads, dev, fmt, block_size=block_size, nq=num_heads // num_kv_heads,
                                  max_seqs=max_seqs)
    cache = torch.zeros(1, num_kv_heads, block_size, fmt.slot_bytes, dtype=torch.uint8, device=dev)
    i32 = dict(dtype=torch.int32, device=dev)
    batches = {1: (torch.tensor([0, 1, 2], **i32), torch.tensor([1, 1], **i32)),  # max_query_len: (qsl, seq_lens)
               2: (torch.tensor([0, 2, 3], **i32), torch.tensor([2, 1], **i32))}
    block_table = torch.zeros(2, 1, **i32)
    for i, segs in enumerate(counts):
        for mql, (qsl, seq_lens) in batches.items():
            if mql > 1 and i and not PREFILL_CONFIG["split_decode"]:
                continue  # without the split, prompt batches do not use the decode grid's segments
            q = torch.zeros(int(qsl[-1]), num_heads, head_size, dtype=dtype, device=dev)
            triton_paged_attention(q, cache, qsl, seq_lens, block_table, fmt, max_query_len=mql,
                                   num_kv_heads=num_kv_heads, scale=scale, out=torch.empty_like(q), num_segs=segs)
    return counts


# ---------------------------------------------------------------------------------------------
# the reference computed with the kernels' operand precision (for tolerances)
# ---------------------------------------------------------------------------------------------
def fp16_operand_reference(query: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                           seq_lens: torch.Tensor, block_table: torch.Tensor, fmt, *,  # noqa: ANN001
                           scale: float | None = None,
                           key_bias=None) -> torch.Tensor:  # noqa: ANN001 - reference.KeyBias
    """The attention of ``reference.reference_attention`` with the attention kernel's roundings.

    Everything in float64 except what the kernel rounds to fp16 before its dots: the rotated,
    scaled query q̃, the table values T[k] and T[v], and p·s_v (and, with ``key_bias``, the scaled
    coefficients and the position table). Its distance to the float64
    reference is the float error inherent to those fp16 operands; the tests bound the kernel's
    error by a multiple of it. Loops over sequences (small inputs only).

    Returns float64 [T, H_q, D] (T = query_start_loc[-1]).
    """
    from e8vllm.codecs.e8s import EXP_BIAS, decode_switched
    from e8vllm.kernels.reference import decode_tail, is_switched, unpack_fields

    d = fmt.head_size
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    qsl = [int(x) for x in query_start_loc.tolist()]
    h_q, h_kv = query.shape[1], kv_cache.shape[1]
    grp = h_q // h_kv
    bs = kv_cache.shape[2]
    rk = fmt.k_rotation.matrix(torch.float64)
    rv = fmt.v_rotation.matrix(torch.float64)
    cache = kv_cache.cpu()

    def parts(codes: torch.Tensor, codec) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        nb = codec.head_dim * codec.bits // 8
        lead = codes.shape[:-1]
        f = unpack_fields(codes[..., :nb].reshape(-1, nb), codec.bits)
        tail = codes[..., nb:nb + 2].reshape(-1, 2)
        scale, switch = decode_tail(codec, tail)
        if is_switched(codec):  # table values: exponent EXP_BIAS is the scale 1.0
            tv = decode_switched(codec.code, f, switch, torch.full_like(switch, EXP_BIAS))
        else:
            tv = codec.code.decode(f.reshape(-1, 8))
        return tv.reshape(*lead, d).half().double(), scale.reshape(lead).double()

    out = torch.zeros(qsl[-1], h_q, d, dtype=torch.float64)
    qr = (query[:qsl[-1]].cpu().double() @ rk.t() * (scale * LOG2E)).float().half().double()
    wb = fb = None
    if key_bias is not None and key_bias.coef is not None:
        wb = (key_bias.coef[:qsl[-1]].cpu().double() * (scale * LOG2E)).float().half().double()
        tb = key_bias.table.cpu().float().half().double()
    if key_bias is not None and key_bias.first is not None:
        fb = (key_bias.first[:qsl[-1]].cpu().double() * (scale * LOG2E)).float().double()
    for i in range(len(qsl) - 1):
        n, L = qsl[i + 1] - qsl[i], int(seq_lens[i])
        if n == 0:
            continue
        pos = torch.arange(L)
        blk = block_table[i].cpu().long()[pos // bs]
        codes = cache[blk, :, pos % bs, :]  # [L, H_kv, C]
        ck, cv = fmt.split_slots(codes)
        tk, sk = parts(ck, fmt.k_codec)
        tv, sv = parts(cv, fmt.v_codec)
        for t in range(n):
            last = L - n + t
            for hq in range(h_q):
                hk = hq // grp
                sc = (tk[: last + 1, hk] @ qr[qsl[i] + t, hq]) * sk[: last + 1, hk]
                if wb is not None:
                    sc = sc + tb[: last + 1] @ wb[qsl[i] + t, hq]
                if fb is not None:
                    sc[0] = sc[0] + fb[qsl[i] + t, hq]
                p = torch.exp2(sc - sc.max())
                pv = (p * sv[: last + 1, hk]).half().double()
                out[qsl[i] + t, hq] = (pv @ tv[: last + 1, hk]) / p.sum()
    return out @ rv
