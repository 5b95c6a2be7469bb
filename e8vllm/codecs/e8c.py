r"""Cubic switched E8 code (``e8c-4bit``, ours): ``e8s-4bit`` whose four level tables are cubic
polynomials of the level index, evaluated exactly as a GPU evaluates them in fp16, so that a kernel
decodes a 4-bit field with arithmetic instead of a table lookup.

Format, encoder and scale: those of ``e8s-4bit`` (:mod:`e8vllm.codecs.e8s`): Hadamard rotation, an
8-bit log scale s, one switch bit per group of blocks choosing table set t ∈ {0, 1}, the E8 block
code (cosets D8 and D8 + ½, parity rule in both) with 16 levels per (set, coset); the same
``D/2 + 2`` bytes. Only the levels differ: for table set t, coset c and field n ∈ {0..15},

    z = n − 7                                  (exact in fp16: x = 1024 + n has ulp 1, z = x − 1031)
    T[t, c, n] = fl(fl(fl(c3·z + c2)·z + c1)·z + c0)

with c3..c0 fp16 numbers (one set of 4 per (t, c), :attr:`E8CubicCodec.poly`) and fl(·) one fp16
fused multiply-add with round-to-nearest-even (Horner's rule, three ``fma.rn.f16``). Each FMA's
exact value fits a float64 (a product of an fp16 number by |z| ≤ 8 plus an fp16 number spans under
45 significant bits), so :func:`horner_fp16` reproduces the GPU bit for bit: exact float64, then
ONE correct rounding to fp16 per step (:func:`round_fp16`; note that ``Tensor.to(torch.float16)`` on
a float64 tensor rounds through float32 first, a double rounding that is wrong for some of these
sums, so it is not used). The levels are therefore fp16 numbers, and the decoder's
x̂_i = s · T[sw_g, c, v_i] is the same as with a table.

Training (:func:`train_cubic`, deterministic; constrained Lloyd on the ``e8s`` Gaussian data: 20,000
vectors, D = 64, seed 1234): start from the ``e8s-4`` levels, fit each table by a least-squares cubic
in z; then repeat: encode with the switched encoder (scale search, switch), collect per (set, coset,
level) the count w and the centroid m of the scaled values u that chose it, refit the cubic by
least squares weighted by w (for fixed assignments Σ (u − T)² = Σ w (m − T)² + const, so this is
the exact minimizer over real coefficients), round the coefficients to fp16 one at a time (c3 first,
the rest refitted with the rounded ones fixed); keep the iterate with the best SNR. (A search over
the ±1-ulp neighbours of the rounded coefficients changed the result by 0.0001 dB: not done.)
Levels must stay strictly increasing (the encoder cuts at midpoints): checked.

Training converges after about 80 iterations (training SNR 23.260 dB for the plain fit of the
``e8s-4`` levels, 23.351 dB trained; ``e8s-4`` itself: 23.344 dB on the same data). Measured SNR,
public encode / decode (``e8c_tables.json`` "train": ``gaussian_snr_db`` written by
``python -m e8vllm.codecs.e8c``, ``smollm2_snr_db`` measured by hand on a ``kvdump.dump_kv`` file):

=====================================================  ===========  ===========
data                                                    e8s-4bit     e8c-4bit
=====================================================  ===========  ===========
Gaussian, head size 64 (20,000 vectors, seed 7)         23.345 dB    23.347 dB
Gaussian, head size 128 (20,000 vectors, seed 7)        22.711 dB    22.711 dB
SmolLM2-135M keys after RoPE (20,520 held-out, D = 64)  23.472 dB    23.495 dB
the same, per-head mean removed                         23.360 dB    23.358 dB
SmolLM2-135M values                                     23.347 dB    23.347 dB
the same, per-head mean removed                         23.345 dB    23.343 dB
=====================================================  ===========  ===========

(A plain least-squares cubic of the ``e8s-4`` levels, not retrained, loses about 0.08 dB.) The SNR
does not tell the whole story: in vLLM with SmolLM2 (session 13, 20 windows of 1,024 tokens, README
"Quality"), e8_k4v4 with these codes has perplexity +0.79 % above e8_k4v4 with ``e8s-4bit`` in the
same run (paired t = 2.9; on the other, KV-side text +0.22 %, t = 0.85), and a cubic that keeps
``e8s``'s outermost levels (0.14 dB lower SNR) is +1.17 % above it. The cost is in the values:
with ``e8c`` keys and ``e8s`` values the perplexity is +0.11 % (t = 0.46) above ``e8s`` for both,
with ``e8s`` keys and ``e8c`` values +0.81 % (t = 2.87); on the KV-side text ``e8c`` keys with ``e8s``
values are -0.55 % (t = -3.4) against ``e8s`` for both (session 14). So since session 14 the KV dtypes'
4-bit keys use this code by default (``E8VLLM_ENCODER=cubic-keys``: the H200 decode kernel computes the
keys, 386.9 against 414.7 us at 64 x 8k) and the values stay ``e8s-4bit``; ``E8VLLM_ENCODER=cubic``
puts it in the values too (364.6 us). Tables in ``e8c_tables.json`` beside this
file, key ``e8c-4``: ``poly`` [set][coset][c3, c2, c1, c0] and the ``levels`` they give; loading
recomputes the levels from ``poly`` and refuses a file where they differ.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from . import register
from .base import DecodeCost
from .e8 import BlockCode
from .e8s import E8SwitchedCodec, SwitchedCode, _encode, decode_switched, group_blocks, scale_candidates, \
    scale_table, switched_code

__all__ = ["E8CubicCodec", "horner_fp16", "round_fp16", "cubic_code", "cubic_poly", "train_cubic", "fit_cubic",
           "TABLES_PATH", "BITS", "Z_OFFSET", "CODEC_ID"]

TABLES_PATH = Path(__file__).with_name("e8c_tables.json")
BITS = 4
Z_OFFSET = 7
CODEC_ID = 174
_FP16_MAX = 65504.0


# ---------------------------------------------------------------------------------------------
# fp16 arithmetic, exactly
# ---------------------------------------------------------------------------------------------
def round_fp16(x: torch.Tensor) -> torch.Tensor:
    """float64 tensor -> float64 tensor of the nearest fp16 numbers (round to nearest, ties to even;
    subnormals with step 2^-24; ±inf beyond the fp16 range, NaN stays NaN). One rounding, exact."""
    x = x.to(torch.float64)
    _m, e = torch.frexp(x)  # |x| = m · 2^e, 0.5 <= |m| < 1
    # step of the fp16 grid at |x|: 2^(e - 11) for normal numbers (11 significant bits), 2^-24 below 2^-14
    step = torch.exp2((e - 11).clamp(min=-24).to(torch.float64))
    r = torch.round(x / step) * step  # x / step: exact (power of two); torch.round: half to even
    r = torch.where(r.abs() > _FP16_MAX, torch.copysign(torch.full_like(r, math.inf), x), r)
    return torch.where(torch.isfinite(x), r, x)


def horner_fp16(coeffs: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """fp16 Horner evaluation as the GPU does it: z = n − 7, t = fma(c3, z, c2), t = fma(t, z, c1),
    level = fma(t, z, c0), each FMA exact then rounded once to fp16 (nearest even).

    Args:
        coeffs: [..., 4] (c3, c2, c1, c0), each an fp16 number (ValueError otherwise); any float dtype.
        n: int [K] level indices (0..15 in the codec).
    Returns:
        float32 [..., K]: fp16-exact levels.
    """
    c = coeffs.to(torch.float64)
    if c.shape[-1:] != (4,):
        raise ValueError(f"coeffs must have a last dimension of 4 (c3, c2, c1, c0), got shape {tuple(coeffs.shape)}")
    if not bool(torch.equal(round_fp16(c), c)):
        raise ValueError("coeffs must be fp16 numbers (finite, representable in float16)")
    if n.dtype.is_floating_point or n.dim() != 1:
        raise ValueError(f"n must be a 1-d integer tensor, got {n.dtype} of shape {tuple(n.shape)}")
    z = (n.to(torch.int64) - Z_OFFSET).to(torch.float64)
    t = round_fp16(c[..., 0:1] * z + c[..., 1:2])
    t = round_fp16(t * z + c[..., 2:3])
    t = round_fp16(t * z + c[..., 3:4])
    return t.to(torch.float32)


def _levels(poly: torch.Tensor) -> torch.Tensor:
    """poly [2, 2, 4] -> levels float32 [2, 2, 16] (ValueError unless finite and strictly increasing)."""
    lv = horner_fp16(poly, torch.arange(1 << BITS))
    if not bool(torch.isfinite(lv).all()):
        raise ValueError("cubic levels overflow fp16")
    bad = (lv[..., 1:] <= lv[..., :-1]).any(-1)
    if bool(bad.any()):
        t, c = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"cubic levels of table set {t}, coset {c} are not strictly increasing: {lv[t, c].tolist()}")
    return lv


def _code(levels: torch.Tensor) -> SwitchedCode:
    """levels [2, 2, 16] -> the switched code (parity rule in both cosets, one table per coset)."""
    codes = tuple(BlockCode(BITS, (True, True), lv.float().clone(), lv.float().clone()) for lv in levels)
    return SwitchedCode(codes)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Stored tables
# ---------------------------------------------------------------------------------------------
def _stored() -> dict:
    return json.loads(TABLES_PATH.read_text()) if TABLES_PATH.exists() else {}


@functools.lru_cache(maxsize=None)
def _loaded() -> tuple[torch.Tensor, SwitchedCode]:
    entry = _stored().get(f"e8c-{BITS}")
    if entry is None:
        raise ValueError(f"no trained tables for e8c-{BITS} in {TABLES_PATH}; run `python -m e8vllm.codecs.e8c`")
    poly = torch.tensor(entry["poly"], dtype=torch.float64)
    if poly.shape != (2, 2, 4):
        raise ValueError(f"{TABLES_PATH}: 'poly' must be [2][2][4], got {list(poly.shape)}")
    levels = _levels(poly)
    if not torch.equal(levels, torch.tensor(entry["levels"], dtype=torch.float32)):
        raise ValueError(f"{TABLES_PATH}: stored 'levels' differ from the fp16 Horner evaluation of 'poly'")
    return poly.to(torch.float16), _code(levels)


def cubic_poly() -> torch.Tensor:
    """float16 [2, 2, 4]: (set, coset, (c3, c2, c1, c0)) of the stored code (a copy)."""
    return _loaded()[0].clone()


def cubic_code() -> SwitchedCode:
    """The stored cubic switched code (levels = :func:`horner_fp16` of :func:`cubic_poly`)."""
    return _loaded()[1]


# ---------------------------------------------------------------------------------------------
# Codec
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class E8CubicCodec(E8SwitchedCodec):
    """``e8s-4bit`` with cubic fp16 level tables. x: float [N, D] -> uint8 [N, D/2 + 2] =
    ``[fields | switch byte | exponent byte]`` (the ``e8s-4bit`` format)."""

    bits: int = BITS

    def __post_init__(self) -> None:
        if self.bits != BITS:
            raise ValueError(f"e8c supports bits={BITS} only, got {self.bits!r}")
        super().__post_init__()
        cubic_code()  # loads and checks the tables

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"e8c-{self.bits}bit"

    @property
    def codec_id(self) -> int:  # type: ignore[override]
        return CODEC_ID

    @property
    def code(self) -> SwitchedCode:
        return cubic_code()

    @property
    def poly(self) -> torch.Tensor:
        """float16 [2, 2, 4]: (table set, coset, (c3, c2, c1, c0))."""
        return cubic_poly()

    @property
    def decode_cost(self) -> DecodeCost:
        return DecodeCost(8.0, 2 * 2 * 4 * 2,
                          "unpack a 4-bit field, one parity and one switch bit per 8 values, pick 4 fp16 "
                          "coefficients of (set, coset) (a 16-coefficient table), level = 3 fp16 FMAs "
                          "(Horner in z = n - 7, z from the fp16 mantissa trick 1024 + n - 1031), multiply "
                          "by the scale (a 256-entry table); the inverse rotation is applied once to the "
                          "attention output")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def _basis() -> torch.Tensor:
    z = torch.arange(1 << BITS, dtype=torch.float64) - Z_OFFSET
    return torch.stack([z ** 3, z ** 2, z, torch.ones_like(z)], 1)  # [16, 4]: c3, c2, c1, c0


def _wls(target: torch.Tensor, w: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Weighted least squares of target [16] by the cubic with the first len(fixed) coefficients
    fixed -> float64 [4]."""
    a = _basis()
    k = fixed.numel()
    r = target - a[:, :k] @ fixed
    sw = w.sqrt()[:, None]
    sol = torch.linalg.lstsq(a[:, k:] * sw, (r * w.sqrt())[:, None]).solution[:, 0]
    return torch.cat([fixed, sol])


def fit_cubic(target: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Cubic in z = n − 7 with fp16 coefficients fitting levels target [16] (weights w [16], default
    1): exact weighted least squares, the coefficients rounded to fp16 one at a time (c3 first, the
    later ones refitted with the rounded ones fixed). -> float64 [4] (c3, c2, c1, c0).

    (Also trying every ±1-ulp neighbour of the four rounded coefficients, 81 candidates scored with
    the exact fp16 Horner levels, changed the trained SNR by 0.0001 dB: not done.)"""
    target = target.to(torch.float64)
    w = torch.ones_like(target) if w is None else w.to(torch.float64)
    if target.shape != (1 << BITS,) or w.shape != target.shape:
        raise ValueError(f"target and w must have shape [{1 << BITS}], got {tuple(target.shape)}, {tuple(w.shape)}")
    if int((w > 0).sum()) < 4:
        raise ValueError("a cubic fit needs at least 4 levels with positive weight")
    fixed = torch.empty(0, dtype=torch.float64)
    for _ in range(4):
        fixed = round_fp16(_wls(target, w, fixed)[: fixed.numel() + 1])
    return fixed


def _stats(code: SwitchedCode, fields: torch.Tensor, sw: torch.Tensor, u: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (set, coset, level): (count float64 [2, 2, 16], sum of the u that chose it float64 [2, 2, 16]).

    The gathering of ``e8._lloyd`` for cosets with the parity rule (all 8 coordinates read the one
    table of their coset), split by the block's switch bit like ``e8s.train_switched``."""
    n, d = fields.shape
    k = 1 << code.bits
    blocks = fields.reshape(-1, 8)
    c, v = code.codes[0].indices(blocks)
    sblk = ((sw[:, None] >> (torch.arange(d // 8) // group_blocks(d))) & 1).reshape(-1)
    idx = ((sblk * 2 + c)[:, None] * k + v).reshape(-1)
    cnt = torch.zeros(2 * 2 * k, dtype=torch.float64).index_add_(0, idx, torch.ones(idx.numel(), dtype=torch.float64))
    tot = torch.zeros(2 * 2 * k, dtype=torch.float64).index_add_(0, idx, u.reshape(-1).double())
    return cnt.reshape(2, 2, k), tot.reshape(2, 2, k)


def _snr_db(y: torch.Tensor, yhat: torch.Tensor) -> float:
    return 10 * math.log10(y.double().square().sum().item() / (y - yhat).double().square().sum().item())


def train_cubic(bits: int = BITS, *, n_vectors: int = 20_000, dim: int = 64, iters: int = 100, seed: int = 1234
                ) -> dict:
    """Constrained Lloyd training of the cubic tables on Gaussian vectors (deterministic, the data of
    ``e8s.train_switched``), starting from the ``e8s-{bits}`` levels. Returns a JSON-able dict
    (``poly``, ``levels``, ``train`` with the SNR of every iterate; the best iterate is kept)."""
    if bits != BITS:
        raise ValueError(f"e8c supports bits={BITS} only, got {bits!r}")
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n_vectors, dim, generator=g)
    start = switched_code(bits).table().double()  # [2, 2, 16]
    poly = torch.stack([torch.stack([fit_cubic(start[t, c]) for c in range(2)])
                        for t in range(2)])
    history: list[float] = []
    best: tuple[float, torch.Tensor] = (-math.inf, poly)
    for _ in range(iters + 1):
        code = _code(_levels(poly))
        fields, sw, e = _encode(code, y, scale_candidates(y))
        snr = round(_snr_db(y, decode_switched(code, fields, sw, e)), 4)
        history.append(snr)
        if snr > best[0]:
            best = (snr, poly)
        u = y / scale_table()[e][:, None]
        cnt, tot = _stats(code, fields, sw, u)
        cen = torch.where(cnt > 0, tot / cnt.clamp(min=1), 0.0)
        poly = torch.stack([torch.stack([fit_cubic(cen[t, c], cnt[t, c]) for c in range(2)])
                            for t in range(2)])
    poly = best[1]
    return {"kind": "e8c", "bits": bits, "poly": poly.tolist(), "levels": _levels(poly).tolist(),
            "train": {"n_vectors": n_vectors, "dim": dim, "iters": iters, "seed": seed, "init": f"e8s-{bits}",
                      "snr_db_per_iter": history, "best_snr_db": best[0]}}


def measure_snr(name: str, head_dim: int, n_vectors: int = 20_000, seed: int = 7) -> float:
    """SNR (dB) of registered codec ``name`` on N(0, 1) vectors [n_vectors, head_dim] (public
    encode / decode)."""
    import e8vllm.codecs as codecs

    x = torch.randn(n_vectors, head_dim, generator=torch.Generator().manual_seed(seed))
    c = codecs.get(name, head_dim=head_dim)
    return _snr_db(x, c.decode(c.encode(x)))


_SUMMARY = ("e8s-4bit with cubic fp16 level tables (3 fp16 FMAs per value instead of a table lookup): "
            "the bytes of e8-4bit")


def _factory(head_dim: int, **kw) -> E8CubicCodec:
    return E8CubicCodec(head_dim=head_dim, **kw)


def _register() -> None:
    register(f"e8c-{BITS}bit", CODEC_ID, _factory, family="e8", nominal_bits=float(BITS), summary=_SUMMARY)


if f"e8c-{BITS}" in _stored():
    _register()


def _regenerate() -> None:  # pragma: no cover - run by hand
    from e8vllm.codecs import e8c as mod  # the registered module (this file may run as __main__)

    entry = mod.train_cubic(BITS)
    data = mod._stored()
    data[f"e8c-{BITS}"] = entry
    mod.TABLES_PATH.write_text(json.dumps(data, indent=1) + "\n")
    mod._loaded.cache_clear()
    mod._register()
    print(f"e8c-{BITS}", entry["train"]["snr_db_per_iter"])
    print("poly", entry["poly"])
    snr = {f"{name}@{d}": round(mod.measure_snr(name, d), 4) for d in (64, 128) for name in ("e8s-4bit", "e8c-4bit")}
    entry["train"]["gaussian_snr_db"] = {"n_vectors": 20_000, "seed": 7, **snr}
    mod.TABLES_PATH.write_text(json.dumps(data, indent=1) + "\n")
    print(snr)


if __name__ == "__main__":  # pragma: no cover
    _regenerate()
