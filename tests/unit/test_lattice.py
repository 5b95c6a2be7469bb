"""Tests of e8vllm.lattice: nearest-point maps against a brute-force search.

Brute force: for a coset ``L + c`` (L = Z^8 or D8, c = 0 or 1/2), the nearest point of
``x`` lies in the box of lattice points ``floor(x - c) + bits + c``, bits in {0, 1}^8
(for D8: Conway-Sloane change at most one coordinate of round(x), toward x). The squared
distance is separable per coordinate, so all 256 candidates of every point are scored
with one [N, 8] @ [8, 256] product (float64); D8 candidates of odd sum are masked out.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from e8vllm import lattice as L



pytestmark = pytest.mark.usefixtures("one_thread")


BITS = torch.tensor(list(itertools.product((0.0, 1.0), repeat=8)), dtype=torch.float64)  # [256, 8]
BITS_PARITY = BITS.sum(-1).to(torch.int64)  # [256]


@dataclass(frozen=True)
class Spec:
    name: str
    nearest: Callable[[torch.Tensor], torch.Tensor]
    member: Callable[[torch.Tensor], torch.Tensor]
    #: (shift c, even-sum constraint) per coset: the set is the union of (L + c).
    cosets: tuple[tuple[float, bool], ...]
    #: a hole (point far from the set) used to build near-boundary points.
    hole: tuple[float, ...]


def _is_member_z8(y: torch.Tensor) -> torch.Tensor:
    return (y == torch.round(y)).all(-1)


SPECS = {
    s.name: s
    for s in (
        Spec("z8", L.nearest_zn, _is_member_z8, ((0.0, False),), (0.5,) * 8),
        Spec("d8", L.nearest_d8, L.is_member_d8, ((0.0, True),), (0.5,) * 8),
        Spec("d8_dual", L.nearest_d8_dual, L.is_member_d8_dual, ((0.0, False), (0.5, False)), (0.25,) * 8),
        Spec("e8", L.nearest_e8, L.is_member_e8, ((0.0, True), (0.5, True)), (1.0,) + (0.0,) * 7),
        Spec("d8_half", L.nearest_d8_half, L.is_member_d8_half, ((0.0, True), (0.5, False)), (0.25,) * 8),
    )
}
NAMES = list(SPECS)


def brute_force(x: torch.Tensor, spec: Spec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exhaustive nearest point over the floor/ceil box of every coset.

    Args:
        x: [N, 8] float tensor (scored in float64).
    Returns:
        best point [N, 8] float64, best squared distance [N], second-best squared
        distance [N] (second-best over distinct candidates of the box).
    """
    x = x.to(torch.float64)
    d2s, bases = [], []
    for shift, even in spec.cosets:
        z = x - shift
        fl = torch.floor(z)  # [N, 8]
        c0 = (z - fl).square()  # cost of bit 0 per coordinate
        c1 = (z - fl - 1.0).square()  # cost of bit 1
        d2 = c0 @ (1.0 - BITS).T + c1 @ BITS.T  # [N, 256]
        if even:
            parity = (fl.to(torch.int64).sum(-1, keepdim=True) + BITS_PARITY[None]) % 2
            d2 = d2.masked_fill(parity != 0, float("inf"))
        d2s.append(d2)
        bases.append(fl + shift)
    d2 = torch.cat(d2s, dim=1)  # [N, 256 * cosets]
    top = torch.topk(d2, 2, dim=1, largest=False)
    idx = top.indices[:, 0]
    coset, bit = idx // 256, idx % 256
    base = torch.stack(bases, dim=0)[coset, torch.arange(x.shape[0])]  # [N, 8]
    return base + BITS[bit], top.values[:, 0], top.values[:, 1]


def check_against_brute_force(x: torch.Tensor, spec: Spec, margin: float = 1e-4) -> None:
    """Assert nearest(x) is a member at (brute-force) minimal distance, and is *the*
    brute-force point whenever the minimum is unique by more than ``margin``."""
    x = x.to(torch.float32).reshape(-1, 8)
    y = spec.nearest(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert bool(spec.member(y).all()), "output not in the set"
    best, d_best, d_second = brute_force(x, spec)
    d_y = (x.double() - y.double()).square().sum(-1)
    excess = d_y - d_best
    assert float(excess.max()) <= 1e-5, f"worst excess {float(excess.max())} at {x[excess.argmax()]}"
    unique = (d_second - d_best) > margin
    assert bool((y.double()[unique] == best[unique]).all())


def random_lattice_points(spec: Spec, n: int, gen: torch.Generator, radius: int = 6) -> torch.Tensor:
    """[n, 8] float32 points of the set, built directly (not with the function under test)."""
    z = torch.randint(-radius, radius + 1, (n, 8), generator=gen).to(torch.float64)
    k = torch.randint(0, len(spec.cosets), (n,), generator=gen)
    out = torch.empty_like(z)
    for i, (shift, even) in enumerate(spec.cosets):
        zi = z.clone()
        if even:  # fix the parity on the last coordinate
            zi[:, 7] += zi.sum(-1) % 2
        out[k == i] = (zi + shift)[k == i]
    assert bool(spec.member(out).all())
    return out.to(torch.float32)


# ---- agreement with brute force -----------------------------------------------------


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0, 20.0])
@pytest.mark.parametrize("name", NAMES)
def test_random_gaussian_points(name: str, scale: float) -> None:
    gen = torch.Generator().manual_seed(1000 * NAMES.index(name) + int(10 * scale))
    x = scale * torch.randn(25_000, 8, generator=gen)  # 10^5 per set over 4 scales
    check_against_brute_force(x, SPECS[name])


@pytest.mark.parametrize("name", NAMES)
def test_exact_ties_on_quarter_grid(name: str) -> None:
    """Points of (1/4)Z^8: coordinates at .5 boundaries, midpoints of lattice points, holes."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(-12, 13, (20_000, 8), generator=gen).to(torch.float32) / 4
    check_against_brute_force(x, SPECS[name])
    # Midpoints between two points of the set (equidistant from both).
    p = random_lattice_points(SPECS[name], 10_000, gen)
    q = random_lattice_points(SPECS[name], 10_000, gen, radius=1) + p
    check_against_brute_force((p + q) / 2, SPECS[name])


@pytest.mark.parametrize("name", NAMES)
def test_near_cell_boundaries(name: str) -> None:
    spec = SPECS[name]
    gen = torch.Generator().manual_seed(2)
    # Quarter-grid points nudged by tiny offsets, on each side of every boundary.
    base = torch.randint(-12, 13, (15_000, 8), generator=gen).to(torch.float32) / 4
    for eps in (1e-5, 1e-3):
        check_against_brute_force(base + eps * torch.randn(base.shape, generator=gen), spec)
    # Lattice point + t * (permuted hole) with t around 1/2 and 1 (boundaries / hole).
    n = 15_000
    p = random_lattice_points(spec, n, gen)
    perm = torch.argsort(torch.rand(n, 8, generator=gen), dim=1)
    h = torch.tensor(spec.hole).expand(n, 8).gather(1, perm)
    t = torch.tensor([0.5, 1.0])[torch.randint(0, 2, (n, 1), generator=gen)]
    t = t + torch.tensor([0.0, 1e-4, -1e-4, 1e-3, -1e-3])[torch.randint(0, 5, (n, 1), generator=gen)]
    check_against_brute_force(p + t * h, spec)


def test_brute_force_helper_is_sound() -> None:
    """The box search finds known answers (guards the oracle itself)."""
    x = torch.tensor([[0.6, 0.7, 0.0, 0.0, 0.0, 0.0, 0.0, 0.9]])  # round -> sum 3, odd
    best, d, _ = brute_force(x, SPECS["d8"])
    assert best.tolist() == [[0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]]
    assert d.item() == pytest.approx(0.36 + 0.09 + 0.01)
    best, d, _ = brute_force(torch.full((1, 8), 0.4), SPECS["e8"])
    assert best.tolist() == [[0.5] * 8] and d.item() == pytest.approx(0.08)


# ---- known values and ties ---------------------------------------------------------


def test_known_values() -> None:
    # round -> (1, 1, 0, ..., 1), odd sum; largest error is 0.4 at coordinate 0 -> 0.
    x = torch.tensor([0.6, 0.7, 0.0, 0.0, 0.0, 0.0, 0.0, 0.9])
    assert L.nearest_zn(x).tolist() == [1, 1, 0, 0, 0, 0, 0, 1]
    assert L.nearest_d8(x).tolist() == [0, 1, 0, 0, 0, 0, 0, 1]
    assert L.nearest_e8(torch.full((8,), 0.4)).tolist() == [0.5] * 8
    assert L.nearest_d8_dual(torch.full((8,), 0.3)).tolist() == [0.5] * 8
    assert L.nearest_d8_dual(torch.full((8,), 0.2)).tolist() == [0.0] * 8
    # D8 ∪ (Z^8 + 1/2): (0.5, -0.5, 0.5, ...) is in the half coset (not in E8: odd sign count).
    v = torch.tensor([0.5, -0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    assert L.nearest_d8_half(v).tolist() == v.tolist()
    assert not bool(L.is_member_e8(v)) and bool(L.is_member_d8_half(v))


def test_tie_rules_are_deterministic() -> None:
    # Z^8: round half to even.
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 3.5, -2.5, 0.0])
    assert L.nearest_zn(x).tolist() == [0, 2, 2, 0, -2, 4, -2, 0]
    # D8 from an odd integer point: first coordinate moves up.
    assert L.nearest_d8(torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0])).tolist() == [2, 0, 0, 0, 0, 0, 0, 0]
    # E8 deep hole (1, 0, ..., 0): 16 E8 points at distance 1; D8 coset wins.
    y = L.nearest_e8(torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0]))
    assert y.tolist() == [2, 0, 0, 0, 0, 0, 0, 0]
    # D8*: exact tie between cosets keeps the integer point.
    assert L.nearest_d8_dual(torch.full((8,), 0.25)).tolist() == [0.0] * 8
    # No negative zeros; repeat calls are bitwise equal.
    gen = torch.Generator().manual_seed(3)
    z = torch.randint(-8, 9, (5000, 8), generator=gen).to(torch.float32) / 4
    for fn in (L.nearest_zn, L.nearest_d8, L.nearest_d8_dual, L.nearest_e8, L.nearest_d8_half):
        a, b = fn(z), fn(z.clone())
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
        assert not bool(torch.signbit(a[a == 0]).any())


# ---- dtypes, shapes, validation ------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_dtypes_and_leading_dims(name: str, dtype: torch.dtype) -> None:
    fn = SPECS[name].nearest
    gen = torch.Generator().manual_seed(4)
    x = (3 * torch.randn(2, 3, 5, 8, generator=gen)).to(dtype)
    y = fn(x)
    assert y.dtype == torch.float32 and y.shape == (2, 3, 5, 8) and y.device == x.device
    assert torch.equal(y, fn(x.to(torch.float32)).reshape(2, 3, 5, 8))
    assert torch.equal(y.reshape(-1, 8), fn(x.reshape(-1, 8)))
    assert SPECS[name].member(y).shape == (2, 3, 5)
    assert fn(torch.empty(0, 8, dtype=dtype)).shape == (0, 8)
    assert x.dtype == dtype  # input untouched


@pytest.mark.parametrize("name", NAMES)
def test_validation(name: str) -> None:
    fn = SPECS[name].nearest
    for bad in (torch.zeros(7), torch.zeros(4, 9), torch.zeros(8, 4), torch.tensor(1.0)):
        with pytest.raises(ValueError):
            fn(bad)
    with pytest.raises(ValueError):
        fn(torch.zeros(3, 8, dtype=torch.int64))
    with pytest.raises(ValueError):
        L.is_member_e8(torch.zeros(3, 7))


def test_membership() -> None:
    pts = torch.tensor(
        [
            [0, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 0, 0, 0, 0, 0, 0, 0],
            [0.5] * 8,
            [-0.5] + [0.5] * 7,
            [0.5, 0, 0, 0, 0, 0, 0, 0],
            [float("nan")] * 8,
        ]
    )
    assert L.is_member_d8(pts).tolist() == [True, True, False, False, False, False, False]
    assert L.is_member_e8(pts).tolist() == [True, True, False, True, False, False, False]
    assert L.is_member_d8_dual(pts).tolist() == [True, True, True, True, True, False, False]
    assert L.is_member_d8_half(pts).tolist() == [True, True, False, True, True, False, False]
    assert L.is_member_d8(torch.tensor([[2, 0, 0, 0, 0, 0, 0, 0]])).tolist() == [True]  # int input


def test_e8_roots_and_kissing_number() -> None:
    r = L.e8_roots(torch.float64)
    assert r.shape == (L.KISSING_NUMBER_E8, 8) == (240, 8)
    assert bool(L.is_member_e8(r).all())
    assert torch.allclose(r.square().sum(-1), torch.full((240,), 2.0, dtype=torch.float64))
    assert len({tuple(v) for v in r.tolist()}) == 240
    # Count all E8 points of norm 2 among {-1,0,1}^8 ∪ {±1/2}^8: exactly the 240 roots.
    ints = torch.tensor(list(itertools.product((-1.0, 0.0, 1.0), repeat=8)))
    halves = torch.tensor(list(itertools.product((-0.5, 0.5), repeat=8)))
    cand = torch.cat([ints, halves])
    norm2 = cand.square().sum(-1)
    assert int((L.is_member_e8(cand) & (norm2 == 2)).sum()) == 240
    assert int((L.is_member_e8(cand) & (norm2 > 0) & (norm2 < 2)).sum()) == 0  # minimal norm 2


def test_normalized_second_moment() -> None:
    g_e8 = L.normalized_second_moment(L.nearest_e8, L.COVOLUME["e8"], n=200_000)
    g_z8 = L.normalized_second_moment(L.nearest_zn, L.COVOLUME["z8"], n=200_000)
    assert g_e8 == pytest.approx(L.G_E8, rel=0.01)
    assert L.G_E8 == pytest.approx(0.0717, abs=1e-4)
    assert g_z8 == pytest.approx(1 / 12, rel=0.01)
    # D8 sits between: G(D8) = 0.0758 (SPLAG Table 2.3).
    g_d8 = L.normalized_second_moment(L.nearest_d8, L.COVOLUME["d8"], n=100_000)
    assert L.G_E8 < g_d8 < L.G_ZN
    with pytest.raises(ValueError):
        L.normalized_second_moment(L.nearest_e8, 1.0, n=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_cpu(name: str) -> None:
    fn = SPECS[name].nearest
    gen = torch.Generator().manual_seed(5)
    x = torch.cat(
        [3 * torch.randn(20_000, 8, generator=gen), torch.randint(-8, 9, (20_000, 8), generator=gen) / 4.0]
    )
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xd = x.to(dtype)
        y = fn(xd.cuda())
        assert y.is_cuda and y.dtype == torch.float32
        assert torch.equal(y.cpu(), fn(xd))


# ---- properties (hypothesis) ---------------------------------------------------------

coords = st.lists(
    st.floats(min_value=-40, max_value=40, allow_nan=False, width=32), min_size=8, max_size=8
)
quarter_coords = st.lists(st.integers(-40, 40), min_size=8, max_size=8).map(lambda v: [c / 4 for c in v])


def _e8_point(ints: list[int], half: bool) -> torch.Tensor:
    v = torch.tensor(ints, dtype=torch.float32)
    v[7] += float(int(v.sum()) % 2)
    return v + (0.5 if half else 0.0)


@settings(max_examples=300, deadline=None)
@given(x=st.one_of(coords, quarter_coords), name=st.sampled_from(NAMES))
def test_property_matches_brute_force(x: list[float], name: str) -> None:
    check_against_brute_force(torch.tensor([x], dtype=torch.float32), SPECS[name])


@settings(max_examples=300, deadline=None)
@given(
    x=st.one_of(coords, quarter_coords),
    v=st.lists(st.integers(-6, 6), min_size=8, max_size=8),
    half=st.booleans(),
)
def test_property_e8_translation_and_idempotence(x: list[float], v: list[int], half: bool) -> None:
    xt = torch.tensor(x, dtype=torch.float32)
    vt = _e8_point(v, half)
    y = L.nearest_e8(xt)
    # Idempotence: lattice points are fixed.
    assert torch.equal(L.nearest_e8(y), y)
    assert torch.equal(L.nearest_e8(vt), vt)
    # Equivariance under E8 translations: same distance; same point unless x is (near) a tie.
    x64 = xt.double()
    xv = xt + vt  # float32 sum (may round for large |x|)
    yv = L.nearest_e8(xv)
    d = (x64 - y.double()).square().sum()
    dv = (xv.double() - yv.double()).square().sum()
    assert abs(float(d - dv)) < 1e-3
    _, d_best, d_second = brute_force(xt[None], SPECS["e8"])
    if float(d_second - d_best) > 1e-2:
        assert torch.equal(yv, y + vt)
