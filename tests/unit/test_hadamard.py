"""Tests of e8vllm.hadamard: the fast transform against the scipy reference matrix."""

from __future__ import annotations

import pytest
import scipy.linalg
import torch

from e8vllm.hadamard import SUPPORTED_HEAD_DIMS, HadamardRotation, block_size, fwht, rotation

SEEDS = (0, 1, 12345)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_block_sizes() -> None:
    expected = {64: 64, 80: 16, 96: 32, 112: 16, 128: 128, 256: 256, 8: 8, 24: 8, 192: 64}
    for d, b in expected.items():
        r = rotation(d)
        assert r.block == b == block_size(d)
        assert r.num_blocks * b == d


@pytest.mark.parametrize("head_dim", SUPPORTED_HEAD_DIMS)
@pytest.mark.parametrize("seed", SEEDS)
def test_orthonormal(head_dim: int, seed: int) -> None:
    r = rotation(head_dim, seed).matrix()
    assert r.dtype == torch.float64 and r.shape == (head_dim, head_dim)
    eye = torch.eye(head_dim, dtype=torch.float64)
    torch.testing.assert_close(r @ r.T, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(r.T @ r, eye, atol=1e-12, rtol=0)


@pytest.mark.parametrize("head_dim", SUPPORTED_HEAD_DIMS)
@pytest.mark.parametrize("seed", SEEDS)
def test_forward_and_inverse_match_reference(head_dim: int, seed: int) -> None:
    rot = rotation(head_dim, seed)
    gen = torch.Generator().manual_seed(seed + head_dim)
    x = torch.randn(3, 5, head_dim, generator=gen)
    r = rot.matrix()
    y = rot.forward(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y.double(), x.double() @ r.T, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(rot.inverse(x).double(), x.double() @ r, atol=2e-6, rtol=1e-5)
    # Round trips.
    torch.testing.assert_close(rot.inverse(y), x, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(rot.forward(rot.inverse(x)), x, atol=2e-6, rtol=1e-5)
    # Norms and inner products (attention scores) are preserved.
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((y[0] @ y[1].T), (x[0] @ x[1].T), atol=1e-4, rtol=1e-5)


def test_matrix_blocks_are_scipy_hadamard() -> None:
    rot = rotation(80, 7)
    r = rot.matrix()
    h16 = torch.from_numpy(scipy.linalg.hadamard(16)).double() / 4.0
    s = rot.signs().double()
    for i in range(5):
        blk = slice(16 * i, 16 * (i + 1))
        torch.testing.assert_close(r[blk, blk], h16 * s[blk][None, :], atol=0, rtol=0)
    off = r.clone()
    for i in range(5):
        off[16 * i : 16 * (i + 1), 16 * i : 16 * (i + 1)] = 0
    assert bool((off == 0).all())
    assert rot.matrix(torch.float32).dtype == torch.float32


def test_fwht_matches_sylvester_order() -> None:
    for b in (1, 2, 8, 64):
        eye = torch.eye(b, dtype=torch.float64)
        h = torch.from_numpy(scipy.linalg.hadamard(b)).double()
        torch.testing.assert_close(fwht(eye, b), h, atol=0, rtol=0)


def test_signs_and_seeds() -> None:
    a, b = rotation(128, 0), rotation(128, 1)
    sa, sb = a.signs(), b.signs()
    assert set(sa.unique().tolist()) == {-1.0, 1.0} and sa.shape == (128,)
    assert not torch.equal(sa, sb)
    assert not torch.equal(a.matrix(), b.matrix())
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(sb, torch.randint(0, 2, (128,), generator=gen).float() * 2 - 1)
    # Deterministic and cached.
    assert torch.equal(HadamardRotation(128, 1).signs(), sb)
    assert rotation(128, 1) is b
    assert HadamardRotation(128, 1) == b and hash(HadamardRotation(128, 1)) == hash(b)
    assert len({rotation(64, s).signs().tolist().__repr__() for s in range(8)}) == 8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes(dtype: torch.dtype) -> None:
    rot = rotation(96, 3)
    x = torch.randn(4, 2, 96).to(dtype)
    y = rot.forward(x)
    assert y.dtype == torch.float32 and y.shape == (4, 2, 96)
    torch.testing.assert_close(y, rot.forward(x.float()), atol=1e-6, rtol=1e-6)
    assert rot.inverse(y.to(dtype)).dtype == torch.float32
    assert x.dtype == dtype


def test_validation() -> None:
    for bad in (60, 0, -8, 12, 100):
        with pytest.raises(ValueError):
            HadamardRotation(bad)
        with pytest.raises(ValueError):
            rotation(bad)
    for bad in (64.0, True, "64", None):
        with pytest.raises(ValueError):
            HadamardRotation(bad)  # type: ignore[arg-type]
    rot = rotation(64)
    for shape in ((3, 63), (3, 128), (64, 3), ()):
        with pytest.raises(ValueError):
            rot.forward(torch.zeros(shape))
        with pytest.raises(ValueError):
            rot.inverse(torch.zeros(shape))
    with pytest.raises(ValueError):
        rot.forward(torch.zeros(2, 64, dtype=torch.int32))


def test_gaussianization_spreads_an_outlier() -> None:
    """One huge coordinate: after rotation no coordinate keeps more than 20% of the energy."""
    d = 64
    gen = torch.Generator().manual_seed(9)
    n = 2000
    x = 0.1 * torch.randn(n, d, generator=gen)
    k = torch.randint(0, d, (n,), generator=gen)
    x[torch.arange(n), k] += 100.0 * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    frac_before = (x.square().amax(-1) / x.square().sum(-1)).min()
    assert float(frac_before) > 0.9
    y = rotation(d, 0).forward(x)
    frac_after = y.square().amax(-1) / y.square().sum(-1)
    assert float(frac_after.max()) < 0.2
    # Each coordinate gets about 1/64 of the outlier's energy: near-flat magnitudes.
    assert float(frac_after.median()) < 2.0 / d


def test_gaussianization_of_heavy_tailed_vectors() -> None:
    """Student-t(3) coordinates become close to Gaussian (kurtosis near 3)."""
    d = 128
    gen = torch.Generator().manual_seed(10)
    chi2 = torch.randn(4000, d, 3, generator=gen).square().sum(-1)
    x = torch.randn(4000, d, generator=gen) / (chi2 / 3).sqrt()  # Student-t, 3 dof

    def kurtosis(v: torch.Tensor) -> float:
        z = v / v.norm(dim=-1, keepdim=True) * d**0.5  # per-vector unit RMS
        return float((z**4).mean())

    assert kurtosis(x) > 8.0
    assert abs(kurtosis(rotation(d, 5).forward(x)) - 3.0) < 0.4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("head_dim", SUPPORTED_HEAD_DIMS)
def test_cuda_matches_cpu(head_dim: int) -> None:
    rot = rotation(head_dim, 4)
    x = torch.randn(64, head_dim)
    y = rot.forward(x.cuda())
    assert y.is_cuda and y.dtype == torch.float32
    torch.testing.assert_close(y.cpu(), rot.forward(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rot.inverse(y).cpu(), x, atol=1e-5, rtol=1e-5)
    assert rot.signs("cuda").is_cuda
    torch.testing.assert_close(rot.forward(x.cuda().half()).cpu(), rot.forward(x.half()), atol=1e-5, rtol=1e-5)
