"""Baseline codecs (uniform INT-b, Lloyd-Max, fp8, faiss PQ) against float64 references."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import e8vllm.codecs as codecs
from e8vllm.codecs.lloydmax import gaussian_lloyd_max
from e8vllm.hadamard import rotation

FAMILIES = ("uniform", "lloydmax", "fp8", "pq")
NAMES = [n for f in FAMILIES for n in codecs.names(f)]
DIMS = (64, 128)
CASES = [(n, d) for n in NAMES for d in DIMS]


def kv_like(n: int, d: int, seed: int) -> torch.Tensor:
    """float32 [n, d]: Gaussian rows with per-row scales and two outlier channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.exp(torch.randn(n, 1, generator=g) * 0.5)
    x[:, 3] *= 8.0
    x[:, d // 2 + 1] *= 4.0
    return x


@functools.lru_cache(maxsize=None)
def make(name: str, d: int) -> codecs.Codec:
    """The codec, fitted on held-out vectors (other seed) when it needs training (cached)."""
    if codecs.info(name).family == "pq":
        c = codecs.get(name, head_dim=d, niter=10)
        return c.fit(kv_like(1024 if name.endswith("raw") else 2048, d, seed=99))
    return codecs.get(name, head_dim=d)


# ---- float64 references ------------------------------------------------------------

def ref_int_asym(y: np.ndarray, b: int) -> np.ndarray:
    top = 2**b - 1
    mn, mx = y.min(1, keepdims=True), y.max(1, keepdims=True)
    scale = np.where(mx > mn, (mx - mn) / top, 1.0)
    return mn + np.clip(np.round((y - mn) / scale), 0, top) * scale


def ref_int_sym(y: np.ndarray, b: int, n_clip: int = 16) -> np.ndarray:
    half = 2 ** (b - 1)
    amax = np.abs(y).max(1, keepdims=True)
    best, best_err = np.zeros_like(y), np.full((y.shape[0], 1), np.inf)
    for f in np.linspace(0.5, 1.0, n_clip):
        step = np.where(amax > 0, f * amax / (half - 0.5), 1.0)
        yh = (np.clip(np.floor(y / step), -half, half - 1) + 0.5) * step
        err = ((y - yh) ** 2).sum(1, keepdims=True)
        best = np.where(err < best_err, yh, best)
        best_err = np.minimum(err, best_err)
    return best


def ref_e4m3(v: np.ndarray) -> np.ndarray:
    """Exact float64 e4m3fn rounding (nearest, ties to even), saturating at ±448."""
    a = np.minimum(np.abs(v), 448.0)
    e = np.maximum(np.floor(np.log2(np.where(a > 0, a, 1.0))), -6.0)
    q = 2.0 ** (e - 3)
    return np.sign(v) * np.round(a / q) * q


def ref_roundtrip(c: codecs.Codec, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(target, float64 reconstruction) in the codec's (rotated) working domain."""
    x64 = x.double().numpy()
    if getattr(c, "rotate", c.family in ("lloydmax",)):
        x64 = x64 @ rotation(c.head_dim, seed=c.seed).matrix().numpy().T
    if c.family == "uniform":
        return x64, (ref_int_sym if c.symmetric else ref_int_asym)(x64, c.bits)
    if c.family == "fp8":
        if not c.scaled:
            return x64, ref_e4m3(x64)
        s = np.abs(x64).max(1, keepdims=True) / 448.0
        return x64, ref_e4m3(x64 / s) * s
    s = np.sqrt((x64**2).mean(1, keepdims=True))
    u = x64 / s
    if c.family == "lloydmax":
        levels = gaussian_lloyd_max(c.bits)[0]
        return x64, levels[np.abs(u[..., None] - levels).argmin(-1)] * s
    cent = c.centroids.double().numpy()  # pq: [M, ksub, d_sub]
    sub = u.reshape(u.shape[0], c.m, c.d_sub)
    out = np.empty_like(sub)
    for m in range(c.m):  # brute-force nearest centroid, [N, ksub] distances per sub-vector
        idx = ((sub[:, m, None, :] - cent[m][None]) ** 2).sum(-1).argmin(-1)
        out[:, m] = cent[m][idx]
    return x64, out.reshape(u.shape) * s


# ---- tests ---------------------------------------------------------------------------

def test_registry_ids_and_names():
    assert len(NAMES) == 16 + 3 + 2 + 4
    for n in NAMES:
        c = make(n, 64)
        assert c.name == n and codecs.codec_id(n) == c.codec_id and codecs.name_of(c.codec_id) == n
    assert [codecs.codec_id(f"int4{s}") for s in ("", "-rot", "-sym", "-sym-rot")] == [304, 314, 324, 334]


@pytest.mark.parametrize("name,d", CASES)
def test_code_size_counts_everything(name, d):
    c = make(name, d)
    x = kv_like(33, d, seed=1)
    codes = c.encode(x)
    assert codes.dtype == torch.uint8 and codes.shape == (33, c.code_bytes)
    assert c.code_bytes * 8 == c.bits_per_value * d
    side = {"uniform": 16 if getattr(c, "symmetric", False) else 32, "lloydmax": 16, "pq": 16,
            "fp8": 16 if getattr(c, "scaled", False) else 0}[c.family]
    nominal = codecs.info(name).nominal_bits
    assert c.bits_per_value == pytest.approx(nominal + side / d, abs=1e-12)


@pytest.mark.parametrize("name,d", CASES)
def test_deterministic(name, d):
    c = make(name, d)
    x = kv_like(200, d, seed=2)
    a, b = c.encode(x), c.encode(x.clone())
    assert torch.equal(a, b)
    assert torch.equal(c.decode(a), c.decode(b))
    if not c.needs_training:
        assert torch.equal(codecs.get(name, head_dim=d).encode(x), a)
    assert torch.equal(c.encode(x.half()), c.encode(x.half().float()))


@pytest.mark.parametrize("name,d", CASES)
def test_mse_matches_float64_reference(name, d):
    c = make(name, d)
    x = kv_like(400 if c.family == "pq" else 1500, d, seed=3)
    xh = c.decode(c.encode(x))
    assert xh.dtype == torch.float32 and xh.shape == x.shape and torch.isfinite(xh).all()
    mse = ((x.double() - xh.double()) ** 2).mean().item()
    target, ref = ref_roundtrip(c, x)
    mse_ref = ((target - ref) ** 2).mean()
    assert abs(mse - mse_ref) <= 0.02 * mse_ref + 1e-7, (mse, mse_ref)


@pytest.mark.parametrize("name,d", CASES)
def test_rejects_bad_input(name, d):
    c = make(name, d)
    x = kv_like(4, d, seed=4)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[2, 5] = bad
        with pytest.raises(ValueError):
            c.encode(y)
    for shape in ((4, d + 8), (d,), (2, 2, d)):
        with pytest.raises(ValueError):
            c.encode(torch.zeros(shape))
    with pytest.raises(ValueError):
        c.encode(torch.zeros(4, d, dtype=torch.int32))
    codes = c.encode(x)
    for bad_codes in (codes.to(torch.int32), codes.float(), codes[:, :-1], codes[0], codes.numpy()):
        with pytest.raises(ValueError):
            c.decode(bad_codes)


@pytest.mark.parametrize("name", NAMES)
def test_zero_and_empty(name):
    c = make(name, 64)
    z = c.decode(c.encode(torch.zeros(3, 64)))
    assert torch.equal(z, torch.zeros(3, 64))
    assert c.encode(torch.zeros(0, 64)).shape == (0, c.code_bytes)
    assert c.decode(torch.zeros(0, c.code_bytes, dtype=torch.uint8)).shape == (0, 64)


def test_corrupt_scale_rejected():
    c = make("int4-sym", 64)
    codes = c.encode(kv_like(2, 64, seed=5))
    codes[1, -2:] = torch.tensor([0x00, 0x7C], dtype=torch.uint8)  # fp16 +Inf
    with pytest.raises(ValueError):
        c.decode(codes)


def test_fp8_exact_cast_and_clamp():
    c = make("fp8", 64)
    x = kv_like(500, 64, seed=6) * 30.0
    x[0, :4] = torch.tensor([1000.0, -5000.0, 448.0, 2.0**-11])
    xh = c.decode(c.encode(x))
    assert np.array_equal(xh.double().numpy(), ref_e4m3(x.double().numpy()))
    assert xh[0, :4].tolist() == [448.0, -448.0, 448.0, 0.0]
    bad = c.encode(x[:1])
    bad[0, 7] = 0x7F
    with pytest.raises(ValueError):
        c.decode(bad)
    s = make("fp8-scaled", 64)
    big = x * 100.0  # beyond ±448: the scale keeps the relative error small
    rel = ((s.roundtrip(big) - big).norm() / big.norm()).item()
    assert rel < 0.04


@pytest.mark.parametrize("bits,known", [(2, 0.1175), (3, 0.03454), (4, 0.009497)])
def test_lloyd_max_gaussian_mse(bits, known):
    levels, thresholds, mse = gaussian_lloyd_max(bits)
    assert mse == pytest.approx(known, rel=1e-3)
    assert np.allclose(levels, -levels[::-1]) and np.all(np.diff(levels) > 0)
    g = np.random.default_rng(7).standard_normal(102_400)  # 800 vectors of 128
    emp = ((g - levels[np.searchsorted(thresholds, g)]) ** 2).mean()
    assert emp == pytest.approx(known, rel=0.03)
    # the codec (rotation + per-vector RMS scale): same levels, ~N(0,1) coordinates
    c = make(f"lloydmax-{bits}bit", 128)
    x = torch.from_numpy(g.reshape(-1, 128)).float()
    assert ((c.roundtrip(x) - x) ** 2).mean().item() == pytest.approx(known, rel=0.05)


def test_pq_needs_fit_and_is_deterministic():
    for name in codecs.names("pq"):
        c = codecs.get(name, head_dim=64)
        assert c.needs_training and not c.fitted
        with pytest.raises(ValueError, match="fit"):
            c.encode(torch.zeros(2, 64))
        with pytest.raises(ValueError, match="fit"):
            c.decode(torch.zeros(2, c.code_bytes, dtype=torch.uint8))
    with pytest.raises(ValueError):
        codecs.get("pq-4bit-raw", head_dim=64).fit(kv_like(100, 64, seed=8))  # < 256 points
    x, train = kv_like(300, 64, seed=9), kv_like(2048, 64, seed=99)
    a = codecs.get("pq-2bit", head_dim=64, niter=10).fit(train).encode(x)
    assert torch.equal(a, make("pq-2bit", 64).encode(x))
