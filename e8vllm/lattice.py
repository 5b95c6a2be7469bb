r"""Nearest-point (quantizing) maps for the 8-dimensional lattices used by e8vllm.

Every function works on a tensor ``x`` of shape ``(..., 8)`` (any number of leading
dimensions, CPU or CUDA), treats each length-8 row independently, and is fully
vectorized (no Python loop over points).

Lattices and sets
-----------------
* ``Z^8``  = all integer vectors. Covolume (volume of a fundamental cell) 1.
* ``D8``   = { y in Z^8 : y_1 + ... + y_8 even }, the "checkerboard" lattice.
  Index 2 in Z^8, so covolume 2. Minimal norm 2 (vectors ±e_i ± e_j, 112 of them).
* ``D8*``  = Z^8 ∪ (Z^8 + ½·1), the dual of D8 (1 = all-ones vector). Contains Z^8
  with index 2, so covolume 1/2.
* ``E8``   = D8 ∪ (D8 + ½·1), the Gosset lattice (the "even coordinate system":
  integer or half-integer coordinates, all of the same kind, even coordinate sum).
  Unimodular: covolume 1, minimal norm 2, kissing number 240 (112 vectors
  ±e_i ± e_j and 128 vectors (±½)^8 with an even number of minus signs), covering
  radius 1, packing radius 1/√2.
* ``D8 ∪ (Z^8 + ½·1)``: *not* a lattice (not closed under addition), used by the peer
  project nexusquant-kv. It has 3/2 points per unit volume (1/2 from D8, 1 from the
  half-integer coset).

Algorithms (Conway & Sloane, "Fast quantizing and decoding algorithms for lattice
quantizers and codes", IEEE Trans. Inf. Theory 28(2), 1982)
---------------------------------------------------------------------------------
* ``Z^n``: ``f(x)`` = round every coordinate.
* ``D_n``: compute ``f(x)``; if its coordinate sum is odd, compute ``g(x)``, which is
  ``f(x)`` with the single coordinate having the *largest* rounding error
  ``|x_i - f(x_i)|`` rounded the other way (``f(x_i) ± 1``, toward ``x_i``).
  ``g(x)`` has even sum and is the nearest point of D_n.
* Union of cosets ``L ∪ (L + c)``: quantize ``x`` to ``L`` and ``x - c`` to ``L``
  (then add ``c`` back), and keep whichever of the two candidates is closer to ``x``.
  This gives D8* (L = Z^8), E8 (L = D8) and D8 ∪ (Z^8 + ½) (one candidate from each).

Mean squared error: the normalized second moment of a lattice L in R^n with covolume V is
``G(L) = E||x - Q_L(x)||^2 / (n · V^(2/n))`` for x uniform over a fundamental region.
``G(Z^n) = 1/12 ≈ 0.08333``; ``G(E8) = 929/12960 ≈ 0.0717`` (about 0.65 dB better).
:func:`normalized_second_moment` estimates G by Monte Carlo.

Conventions
-----------
* Inputs must be floating point (float16, bfloat16, float32, float64); computation
  runs in float32 and every nearest-point function returns a **float32** tensor of the
  same shape, on the same device. Lattice points are exactly representable in float32
  for ``|x| < 2^22``; beyond that, quantization is meaningless at float32 precision.
* Ties are resolved deterministically (same answer on every call and device):
  coordinates are rounded half to even (``torch.round``); in the D8 parity fix the
  *first* coordinate with the largest error is re-rounded, upward when its error is
  ``>= 0``; between two cosets the first one (the integer / D8 coset) wins on equal
  distance. Every tie choice is a valid nearest point.
* Negative zeros are normalized to ``+0.0``. NaN/inf inputs give unspecified output.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "DIM",
    "KISSING_NUMBER_E8",
    "G_E8",
    "G_ZN",
    "COVOLUME",
    "nearest_zn",
    "nearest_d8",
    "nearest_d8_dual",
    "nearest_e8",
    "nearest_d8_half",
    "is_member_d8",
    "is_member_d8_dual",
    "is_member_e8",
    "is_member_d8_half",
    "e8_roots",
    "normalized_second_moment",
]

#: Dimension of every lattice in this module.
DIM = 8
#: Number of minimal (norm-2) vectors of E8.
KISSING_NUMBER_E8 = 240
#: Exact normalized second moment of E8 (Conway & Sloane, SPLAG ch. 21): 929/12960.
G_E8 = 929.0 / 12960.0
#: Normalized second moment of Z^n (any n): 1/12.
G_ZN = 1.0 / 12.0
#: Covolume (volume per point) of each lattice.
COVOLUME: dict[str, float] = {"z8": 1.0, "d8": 2.0, "d8_dual": 0.5, "e8": 1.0}


# ---- validation -------------------------------------------------------------------


def _check_float8(x: Tensor, name: str = "x") -> Tensor:
    """Validate ``x`` (..., 8) floating point and return it as float32 (..., 8)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim == 0 or x.shape[-1] != DIM:
        raise ValueError(f"{name} must have shape (..., {DIM}), got {tuple(x.shape)}")
    return x.to(torch.float32)


def _check_member_input(y: Tensor) -> Tensor:
    """Validate ``y`` (..., 8) real-valued and return it as float64 (..., 8)."""
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"y must be a real-valued tensor, got dtype {y.dtype}")
    if y.ndim == 0 or y.shape[-1] != DIM:
        raise ValueError(f"y must have shape (..., {DIM}), got {tuple(y.shape)}")
    return y.to(torch.float64)


# ---- float32 kernels (no validation) ----------------------------------------------


def _round_zn(x: Tensor) -> Tensor:
    """Nearest point of Z^8: (..., 8) float32 -> (..., 8) float32, ties to even."""
    return torch.round(x)


def _round_d8(x: Tensor) -> Tensor:
    """Nearest point of D8 (Conway-Sloane): (..., 8) float32 -> (..., 8) float32."""
    f = torch.round(x)  # (..., 8)
    err = x - f  # (..., 8), exact in floating point, |err| <= 1/2
    # Parity of the coordinate sum, exactly (float32 sums are inexact past 2^24).
    odd = (f.to(torch.int64).sum(dim=-1, keepdim=True) % 2) != 0  # (..., 1)
    k = torch.argmax(err.abs(), dim=-1, keepdim=True)  # (..., 1), first max on ties
    ek = torch.gather(err, -1, k)  # (..., 1)
    # Round the other way (toward x): +1 when err >= 0, else -1; 0 when the sum is even.
    step = ((ek >= 0).to(f.dtype) * 2.0 - 1.0) * odd.to(f.dtype)  # (..., 1)
    return f.scatter_add(-1, k, step)


def _closer(x: Tensor, y0: Tensor, y1: Tensor) -> Tensor:
    """Per row, whichever of y0, y1 (..., 8) is closer to x (..., 8); y0 on ties."""
    d0 = (x - y0).square().sum(dim=-1, keepdim=True)  # (..., 1)
    d1 = (x - y1).square().sum(dim=-1, keepdim=True)  # (..., 1)
    return torch.where(d1 < d0, y1, y0)


def _finish(y: Tensor) -> Tensor:
    """Normalize -0.0 to +0.0 (cosmetic: makes outputs bitwise deterministic)."""
    return y + 0.0


# ---- public nearest-point maps ----------------------------------------------------


def nearest_zn(x: Tensor) -> Tensor:
    """Nearest point of Z^8 to each row of ``x``.

    Args:
        x: (..., 8) floating-point tensor.
    Returns:
        (..., 8) float32 tensor of integers. Ties (coordinates at k + 1/2) round half
        to even, e.g. 0.5 -> 0, 1.5 -> 2, -0.5 -> 0.
    """
    return _finish(_round_zn(_check_float8(x)))


def nearest_d8(x: Tensor) -> Tensor:
    """Nearest point of D8 = {y in Z^8: sum(y) even} to each row of ``x``.

    Conway-Sloane: round every coordinate; if the sum is odd, re-round the coordinate
    with the largest rounding error the other way.

    Args:
        x: (..., 8) floating-point tensor.
    Returns:
        (..., 8) float32 tensor of integers with even row sums.
    """
    return _finish(_round_d8(_check_float8(x)))


def nearest_d8_dual(x: Tensor) -> Tensor:
    """Nearest point of D8* = Z^8 ∪ (Z^8 + 1/2) to each row of ``x``.

    Args:
        x: (..., 8) floating-point tensor.
    Returns:
        (..., 8) float32 tensor; each row is all-integer or all-half-integer (the
        integer row wins on equal distance).
    """
    x = _check_float8(x)
    y0 = _round_zn(x)
    y1 = _round_zn(x - 0.5) + 0.5
    return _finish(_closer(x, y0, y1))


def nearest_e8(x: Tensor) -> Tensor:
    """Nearest point of E8 = D8 ∪ (D8 + 1/2) to each row of ``x``.

    Conway-Sloane: quantize x to D8 and x - 1/2 to D8 (+1/2), keep the closer one.

    Args:
        x: (..., 8) floating-point tensor.
    Returns:
        (..., 8) float32 tensor of E8 points (the D8 candidate wins on equal distance).
    """
    x = _check_float8(x)
    y0 = _round_d8(x)
    y1 = _round_d8(x - 0.5) + 0.5
    return _finish(_closer(x, y0, y1))


def nearest_d8_half(x: Tensor) -> Tensor:
    """Nearest point of the non-lattice set D8 ∪ (Z^8 + 1/2) to each row of ``x``.

    This is the codebook of the peer project nexusquant-kv: the D8 candidate and the
    rounded half-integer candidate, whichever is closer.

    Args:
        x: (..., 8) floating-point tensor.
    Returns:
        (..., 8) float32 tensor (the D8 candidate wins on equal distance).
    """
    x = _check_float8(x)
    y0 = _round_d8(x)
    y1 = _round_zn(x - 0.5) + 0.5
    return _finish(_closer(x, y0, y1))


# ---- membership -------------------------------------------------------------------


def _all_integer(y: Tensor) -> Tensor:
    """(..., 8) float64 -> (...,) bool: every coordinate is a finite integer."""
    return (torch.isfinite(y) & (y == torch.round(y))).all(dim=-1)


def _even_sum(y: Tensor) -> Tensor:
    """(..., 8) float64 integer-valued -> (...,) bool: coordinate sum is even."""
    return torch.remainder(y.sum(dim=-1), 2.0) == 0


def is_member_d8(y: Tensor) -> Tensor:
    """(..., 8) real tensor -> (...,) bool: row is in D8 (integers, even sum)."""
    y = _check_member_input(y)
    return _all_integer(y) & _even_sum(y)


def is_member_d8_dual(y: Tensor) -> Tensor:
    """(..., 8) real tensor -> (...,) bool: row is in D8* (all integer or all half-integer)."""
    y = _check_member_input(y)
    return _all_integer(y) | _all_integer(y - 0.5)


def is_member_e8(y: Tensor) -> Tensor:
    """(..., 8) real tensor -> (...,) bool: row is in E8 = D8 ∪ (D8 + 1/2)."""
    y = _check_member_input(y)
    h = y - 0.5
    return (_all_integer(y) & _even_sum(y)) | (_all_integer(h) & _even_sum(h))


def is_member_d8_half(y: Tensor) -> Tensor:
    """(..., 8) real tensor -> (...,) bool: row is in D8 ∪ (Z^8 + 1/2)."""
    y = _check_member_input(y)
    return (_all_integer(y) & _even_sum(y)) | _all_integer(y - 0.5)


# ---- constants and estimates ------------------------------------------------------


def e8_roots(dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """The 240 minimal vectors of E8 (norm^2 = 2), shape [240, 8].

    Rows 0..111 are ±e_i ± e_j (i < j); rows 112..239 are (±1/2)^8 with an even
    number of minus signs.
    """
    rows: list[list[float]] = []
    for i, j in itertools.combinations(range(DIM), 2):
        for si, sj in itertools.product((1.0, -1.0), repeat=2):
            v = [0.0] * DIM
            v[i], v[j] = si, sj
            rows.append(v)
    for signs in itertools.product((0.5, -0.5), repeat=DIM):
        if sum(s < 0 for s in signs) % 2 == 0:
            rows.append(list(signs))
    assert len(rows) == KISSING_NUMBER_E8
    return torch.tensor(rows, dtype=dtype, device=device)


def normalized_second_moment(
    nearest_fn: Callable[[Tensor], Tensor],
    covolume: float,
    n: int = 200_000,
    *,
    seed: int = 0,
    batch: int = 65_536,
    device: torch.device | str = "cpu",
) -> float:
    """Monte Carlo estimate of G = E||x - Q(x)||^2 / (8 · covolume^(1/4)).

    ``x`` is drawn uniformly from the cube [0, 2)^8. That is uniform on the torus
    R^8 / 2Z^8, hence (by periodicity) equivalent to uniform sampling over a Voronoi
    cell, for every lattice containing 2Z^8 (Z^8, D8, D8*, E8).

    Args:
        nearest_fn: maps (..., 8) float tensors to their nearest lattice points.
        covolume: volume per lattice point (see :data:`COVOLUME`).
        n: number of samples (standard error about 0.1-0.2% of G at the default).
        seed: seed of the sampling generator.
        batch: samples per call to ``nearest_fn``.
        device: where to run ``nearest_fn``.
    Returns:
        The estimate of G as a Python float.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    done = 0
    while done < n:
        m = min(batch, n - done)
        x = 2.0 * torch.rand(m, DIM, generator=gen, dtype=torch.float32)  # [m, 8]
        y = nearest_fn(x.to(device)).to("cpu", torch.float64)  # [m, 8]
        total += (x.to(torch.float64) - y).square().sum().item()
        done += m
    return total / n / (DIM * covolume ** (2.0 / DIM))
