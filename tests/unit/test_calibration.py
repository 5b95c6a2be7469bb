"""KV centering (e8vllm.calibration) and its use by the attention impl (E8ImplMixin).

* the impl's write + attention with centers equals float64 attention over the *uncentered*
  dequantized cache (k̂ + μ_K, v̂ + μ_V): softmax shift invariance, checked numerically;
* with a large common key component, centering lowers the attention error against exact
  (unquantized) attention;
* the file format, the environment switch, tensor-parallel head selection, layer names.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from e8vllm import calibration as cal
from e8vllm.calibration import KVCenters, find_calibration, layer_index, local_kv_heads
from e8vllm.kernels.reference import gather_dequantized
from e8vllm.vllm_plugin import spec as e8spec
from e8vllm.vllm_plugin.impl import E8ImplMixin

D = 64
H_KV, H_Q, LAYERS = 3, 9, 4


class _Impl(E8ImplMixin):
    def __init__(self, dtype: str) -> None:
        self.num_heads, self.num_kv_heads, self.head_size = H_Q, H_KV, D
        self.scale = 1.0 / math.sqrt(D)
        self.e8 = True
        self._e8_setup(dtype, D)


INV_FREQ = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)


def _centers(seed: int = 0, scaled: bool = True, rotary: bool = True) -> KVCenters:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(LAYERS, H_KV, D, generator=g) * 3.0
    k[..., 5] += 12.0
    v = torch.randn(LAYERS, H_KV, D, generator=g) * 0.7
    ks = torch.rand(LAYERS, H_KV, D, generator=g) * 1.5 + 0.25 if scaled else None
    vs = torch.rand(LAYERS, H_KV, D, generator=g) * 1.5 + 0.25 if scaled else None
    rope = {"k_rope": torch.randn(LAYERS, H_KV, D, generator=g) * 4.0, "rope_inv_freq": INV_FREQ,
            "rope_scale": 1.1, "k_sink": torch.randn(LAYERS, H_KV, D, generator=g) * 6.0} if rotary else {}
    return KVCenters(k, v, ks, vs, {"tokens": "synthetic"}, **rope)


def _m(c: KVCenters, layer: int, positions: torch.Tensor) -> torch.Tensor:
    """Position-dependent key centers [P, H_kv, D] of ``layer``: R_p μ_R + [p = 0] s_K (written out)."""
    m = cal.rope_centers(c.k_rope[layer], cal.rope_table(c.rope_inv_freq, c.rope_scale, positions))
    return m + (positions == 0).float()[:, None, None] * c.k_sink[layer][None]


@pytest.fixture()
def calib_file(tmp_path, monkeypatch):
    c = _centers()
    path = c.save(tmp_path / cal.CALIBRATION_FILE)
    monkeypatch.setenv(cal.CALIBRATION_ENV, str(path))
    cal.load_centers.cache_clear()
    e8spec._reset_active_dtype()
    yield c
    e8spec._reset_active_dtype()
    cal.load_centers.cache_clear()


def _float64_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int) -> torch.Tensor:
    """Causal GQA attention of the last ``n`` of L tokens: q [n, H_q, D], k/v [L, H_kv, D]."""
    L, grp = k.shape[0], H_Q // H_KV
    out = torch.zeros(n, H_Q, D, dtype=torch.float64)
    for t in range(n):
        last = L - n + t
        for h in range(H_Q):
            s = (k[: last + 1, h // grp].double() @ q[t, h].double()) / math.sqrt(D)
            out[t, h] = torch.softmax(s, 0) @ v[: last + 1, h // grp].double()
    return out


def _run(impl: _Impl, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, layer_no: int,
         block_size: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Write k/v [L, H_kv, D] through the impl, attend with q [n, H_q, D]; returns (out, cache, block_row)."""
    L, n = k.shape[0], q.shape[0]
    nb = -(-L // block_size)
    cache = torch.zeros(nb + 2, H_KV, block_size, impl.fmt.slot_bytes, dtype=torch.uint8)
    blocks = torch.randperm(nb + 2, generator=torch.Generator().manual_seed(1))[:nb].to(torch.int32)
    pos = torch.arange(L)
    slots = blocks[pos // block_size].long() * block_size + pos % block_size
    layer = SimpleNamespace(layer_name=f"model.layers.{layer_no}.self_attn.attn")
    impl._e8_write(k, v, cache, slots, layer, positions=pos)
    meta = SimpleNamespace(num_actual_tokens=n, query_start_loc=torch.tensor([0, n], dtype=torch.int32),
                           seq_lens=torch.tensor([L], dtype=torch.int32), block_table=blocks[None])
    out = torch.zeros(n, H_Q * D)
    impl._e8_forward(q.reshape(n, H_Q * D), cache, meta, out, layer=layer)
    return out.view(n, H_Q, D), cache, blocks


@pytest.mark.parametrize("dtype", ["e8_k4v4", "e8_k3v2"])
@pytest.mark.parametrize("L,n", [(45, 45), (45, 1), (70, 9)])
def test_centered_impl_equals_attention_over_uncentered_cache(calib_file: KVCenters, dtype: str, L: int,
                                                              n: int) -> None:
    g = torch.Generator().manual_seed(L + n)
    layer_no = 2
    mk, mv = calib_file.k_mean[layer_no], calib_file.v_mean[layer_no]
    a, b = calib_file.k_scale[layer_no], calib_file.v_scale[layer_no]
    m = _m(calib_file, layer_no, torch.arange(L))  # [L, H_kv, D], turns with the position
    assert m.std(0).mean().item() > 1.0
    k = mk + m + torch.randn(L, H_KV, D, generator=g)
    v = mv + torch.randn(L, H_KV, D, generator=g)
    q = torch.randn(n, H_Q, D, generator=g)
    impl = _Impl(dtype)
    out, cache, blocks = _run(impl, k, v, q, layer_no)
    kc, vc = gather_dequantized(cache, blocks, L, impl.fmt)  # what the cache holds: mapped codes
    want = _float64_attention(q, kc.double() / a.double() + mk.double() + m.double(),
                              vc.double() / b.double() + mv.double(), n)
    diff = (out.double() - want).abs().max().item()
    assert diff <= 1e-4 * want.abs().max().item() + 1e-5, diff
    # the cache really holds a ⊙ (k - μ - m(p)) (not the raw keys): mean near 0, spread follows a
    assert kc.mean(0).abs().max().item() < 0.5 < mk.abs().max().item()
    ratio = (kc.std(0) / a).mean(0) / (k - mk - m).std(0).mean(0)
    assert 0.8 < ratio.median().item() < 1.25


@pytest.mark.parametrize("value_map", [True, False])
@pytest.mark.parametrize("L,n", [(45, 45), (70, 1)])
def test_mapped_impl_equals_attention_over_unmapped_cache(tmp_path, monkeypatch, L: int, n: int,
                                                          value_map: bool) -> None:
    """Linear maps (k' = M (k − c(p)), v' = N (v − μ_V), q' = q M⁻¹, o = N⁻¹ o' + μ_V): the impl equals
    float64 attention over the cache mapped back, and the maps fitted by pca_maps whiten the spread."""
    g = torch.Generator().manual_seed(L + n)
    base = _centers(scaled=False)
    mix = torch.linalg.qr(torch.randn(H_KV, D, D, generator=g))[0]  # rotated axes of spread 0.2..3
    spread = torch.linspace(0.2, 3.0, D)
    x = torch.einsum("nhd,hed->nhe", torch.randn(4000, H_KV, D, generator=g) * spread, mix)
    km = cal.pca_maps(x)  # [H, D, D]
    y = torch.einsum("nhd,hed->nhe", x, km)
    cov = torch.einsum("nhd,nhe->hde", y, y) / 4000  # eigenvalues λ^(1/2) (normalized): less spread
    ev = torch.linalg.eigvalsh(cov.double())
    ev_x = torch.linalg.eigvalsh(torch.einsum("nhd,nhe->hde", x, x).double() / 4000)
    assert (ev[:, -1] / ev[:, 0]).max() < (ev_x[:, -1] / ev_x[:, 0]).min() ** 0.6
    vm = torch.linalg.qr(torch.randn(LAYERS, H_KV, D, D, generator=g))[0] * 1.7
    c = KVCenters(base.k_mean, base.v_mean, meta={"tokens": "synthetic"}, k_rope=base.k_rope,
                  rope_inv_freq=base.rope_inv_freq, rope_scale=base.rope_scale, k_sink=base.k_sink,
                  k_map=km[None].expand(LAYERS, -1, -1, -1).contiguous(), v_map=vm if value_map else None)
    path = c.save(tmp_path / "maps.safetensors")
    back = KVCenters.load(path)
    assert torch.equal(back.k_map, c.k_map)
    assert torch.equal(back.v_map, c.v_map) if value_map else back.v_map is None
    monkeypatch.setenv(cal.CALIBRATION_ENV, str(path))
    cal.load_centers.cache_clear()
    e8spec._reset_active_dtype()
    layer_no = 2
    m = _m(c, layer_no, torch.arange(L))
    k = c.k_mean[layer_no] + m + torch.randn(L, H_KV, D, generator=g)
    v = c.v_mean[layer_no] + torch.randn(L, H_KV, D, generator=g)
    q = torch.randn(n, H_Q, D, generator=g)
    impl = _Impl("e8_k4v4")
    out, cache, blocks = _run(impl, k, v, q, layer_no)
    kc, vc = gather_dequantized(cache, blocks, L, impl.fmt)  # mapped codes
    kinv = torch.linalg.inv(c.k_map[layer_no].double())
    vinv = (torch.linalg.inv(c.v_map[layer_no].double()) if value_map
            else torch.eye(D, dtype=torch.float64).expand(H_KV, D, D))
    k_back = torch.einsum("lhd,hed->lhe", kc.double(), kinv) + c.k_mean[layer_no].double() + m.double()
    v_back = torch.einsum("lhd,hed->lhe", vc.double(), vinv) + c.v_mean[layer_no].double()
    want = _float64_attention(q, k_back, v_back, n)
    diff = (out.double() - want).abs().max().item()
    assert diff <= 1e-4 * want.abs().max().item() + 1e-5, diff
    # and the quantization error is still small against the raw K / V
    assert (k_back - k.double()).pow(2).mean() < 0.05 * (k - c.k_mean[layer_no] - m).pow(2).mean()
    with pytest.raises(ValueError, match="alternatives"):
        KVCenters(base.k_mean, base.v_mean, torch.full_like(base.k_mean, 2.0), None, k_map=c.k_map)
    with pytest.raises(ValueError, match="invertible"):
        KVCenters(base.k_mean, base.v_mean, k_map=torch.zeros_like(c.k_map))


def test_centering_lowers_attention_error(calib_file: KVCenters, monkeypatch, tmp_path) -> None:
    """Keys with a large common component: error vs exact attention drops with centering
    (centers only: the synthetic scales above are random, not calibrated)."""
    calib_file = _centers(scaled=False)
    static = _centers(scaled=False, rotary=False)
    files = {"rotary": calib_file.save(tmp_path / "centers_only.safetensors"),
             "static": KVCenters(static.k_mean + _m(calib_file, 1, torch.arange(96)).mean(0)[None],
                                 static.v_mean).save(tmp_path / "static.safetensors")}
    g = torch.Generator().manual_seed(7)
    layer_no, L = 1, 96
    mk, mv = calib_file.k_mean[layer_no], calib_file.v_mean[layer_no]
    k = mk + _m(calib_file, layer_no, torch.arange(L)) + torch.randn(L, H_KV, D, generator=g)
    v = mv + torch.randn(L, H_KV, D, generator=g)
    q = torch.randn(L, H_Q, D, generator=g) * 0.5
    exact = _float64_attention(q, k, v, L)
    errs = {}
    for mode in ("rotary", "static", "none"):
        monkeypatch.setenv(cal.CALIBRATION_ENV, str(files[mode]) if mode in files else "none")
        cal.load_centers.cache_clear()
        e8spec._reset_active_dtype()
        out, _, _ = _run(_Impl("e8_k4v4"), k, v, q, layer_no)
        errs[mode] = (out.double() - exact).pow(2).mean().item()
    # static centers (the best position-independent mean) help; turning + position-0 centers help more
    assert errs["rotary"] < 0.5 * errs["static"] and errs["static"] < 0.75 * errs["none"], errs


def test_file_roundtrip_and_validation(tmp_path) -> None:
    c = _centers(3)
    p = c.save(tmp_path / "c.safetensors")
    back = KVCenters.load(p)
    for n in ("k_mean", "v_mean", "k_scale", "v_scale"):
        assert torch.equal(getattr(back, n), getattr(c, n))
    assert back.meta == {"tokens": "synthetic", "version": cal.FORMAT_VERSION}
    assert torch.equal(back.k_rope, c.k_rope) and torch.equal(back.rope_inv_freq, c.rope_inv_freq)
    assert back.rope_scale == pytest.approx(1.1) and back.rotary and not _centers(rotary=False).rotary
    assert torch.equal(back.k_sink, c.k_sink) and back.sink and not _centers(rotary=False).sink
    part = back.for_layer(1, [1])
    pos = torch.tensor([0, 5, 0, 9])
    got = cal.key_centers(part, cal.rope_table(c.rope_inv_freq, c.rope_scale, pos), pos)
    assert torch.allclose(got, _m(c, 1, pos)[:, [1]], atol=1e-5)
    part = back.for_layer(3, [2, 0])
    assert torch.equal(part["k_mean"], c.k_mean[3, [2, 0]]) and torch.equal(part["v_scale"], c.v_scale[3, [2, 0]])
    assert torch.equal(KVCenters(c.k_mean, c.v_mean).k_scale, torch.ones_like(c.k_mean))  # centering only
    with pytest.raises(ValueError):
        back.for_layer(4, [0])
    with pytest.raises(ValueError):
        back.for_layer(0, [3])
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="not an e8vllm KV calibration"):
        KVCenters.load(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError):
        KVCenters(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError):
        KVCenters(torch.full((1, 1, 8), float("nan")), torch.zeros(1, 1, 8))
    with pytest.raises(ValueError, match="positive"):
        KVCenters(torch.zeros(1, 1, 8), torch.zeros(1, 1, 8), torch.zeros(1, 1, 8))
    with pytest.raises(ValueError, match="needs rope_inv_freq"):
        KVCenters(torch.zeros(1, 1, 8), torch.zeros(1, 1, 8), k_rope=torch.ones(1, 1, 8))
    with pytest.raises(ValueError, match="rope_inv_freq"):
        KVCenters(torch.zeros(1, 1, 8), torch.zeros(1, 1, 8), k_rope=torch.ones(1, 1, 8), rope_inv_freq=torch.ones(3))
    # format 2 files (static centers only) still load
    save_file({n: getattr(c, n).contiguous() for n in ("k_mean", "v_mean", "k_scale", "v_scale")},
              str(tmp_path / "v2.safetensors"), metadata={"format": "pt", "e8vllm_kv_calibration": "2"})
    old = KVCenters.load(tmp_path / "v2.safetensors")
    assert not old.rotary and old.meta["version"] == "2" and torch.equal(old.k_mean, c.k_mean)


def test_rope_helpers_match_the_rotation() -> None:
    """m(p) is RoPE (neox pairs i, i + D/2) of μ_R; coefficients · table[p] equals q · m(p)."""
    g = torch.Generator().manual_seed(4)
    mu = torch.randn(H_KV, D, generator=g, dtype=torch.float64)
    pos = torch.tensor([0, 1, 7, 300, 4095])
    trig = cal.rope_table(INV_FREQ, 1.3, pos)
    m = cal.rope_centers(mu.float(), trig).double()  # [P, H, D]
    h = D // 2
    ang = pos[:, None].double() * INV_FREQ[None].double()
    c, s = ang.cos()[:, None] * 1.3, ang.sin()[:, None] * 1.3
    want = torch.cat([mu[None, :, :h] * c - mu[None, :, h:] * s, mu[None, :, h:] * c + mu[None, :, :h] * s], -1)
    assert torch.allclose(m, want, atol=4e-3, rtol=0)  # float32 angles (as the models): p·θ rounds
    assert torch.allclose(m[0], mu.double() * 1.3, atol=1e-6)  # position 0: no rotation
    q = torch.randn(2, H_KV, D, generator=g)
    w = cal.rope_bias_coeffs(q, mu.float())  # [2, H, D]
    got = torch.einsum("thd,pd->thp", w.double(), trig.double())
    assert torch.allclose(got, torch.einsum("thd,phd->thp", q.double(), m), atol=1e-3, rtol=1e-5)


def test_token_positions() -> None:
    from e8vllm.vllm_plugin.impl import token_positions

    # three sequences: prefill chunk of 3 (seq_len 5), decode (seq_len 9), prefill 2 (seq_len 2); 2 padding rows
    qsl = torch.tensor([0, 3, 4, 6])
    lens = torch.tensor([5, 9, 2])
    assert token_positions(qsl, lens, 8).tolist() == [2, 3, 4, 8, 0, 1, 0, 0]
    # padded batch entries (repeated query_start_loc, seq_len 0) are skipped
    assert token_positions(torch.tensor([0, 1, 1, 2]), torch.tensor([4, 0, 7]), 2).tolist() == [3, 6]


def test_channel_scales_formula() -> None:
    """a² ∝ sqrt(weight / energy), mean a² = 1, clipped to [1/8, 8]."""
    from e8vllm.calibration import channel_scales

    w = torch.tensor([[4.0, 1.0, 1.0, 1.0]])
    e = torch.tensor([[1.0, 1.0, 4.0, 1.0]])
    a = channel_scales(w, e)
    a2 = torch.tensor([[2.0, 1.0, 0.5, 1.0]]) / 1.125
    assert torch.allclose(a, a2.sqrt(), rtol=1e-6)
    assert channel_scales(torch.tensor([[1e12, 1.0]]), torch.ones(1, 2)).min().item() == pytest.approx(1 / 8)


def _spd(g: torch.Generator, d: int, spread: float) -> torch.Tensor:
    u = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    return (u * torch.logspace(0, spread, d, dtype=torch.float64)) @ u.T


def test_metric_maps_minimise_the_metric_error() -> None:
    """M = (Σ⁻¹ # W)^(1/2): P = MᵀM solves P Σ P = W; the cost tr(MΣMᵀ) tr(M⁻¹ W M⁻ᵀ) of a code whose
    error is isotropic in the mapped space is minimal there (below identity, PCA whitening and random
    perturbations of M), and the predicted gain is the cost ratio against M = I."""
    g = torch.Generator().manual_seed(7)
    d = 16
    sig, w = _spd(g, d, 3.0), _spd(g, d, 2.0)
    m, gain = cal.metric_maps(sig, w, floor=1e-12)
    m = m.double()
    p = m.T @ m
    lhs = p @ sig @ p
    assert torch.allclose(lhs / lhs.trace(), w / w.trace(), atol=1e-4)
    assert torch.trace(m @ sig @ m.T).item() == pytest.approx(torch.trace(sig).item(), rel=1e-5)

    def cost(a: torch.Tensor) -> float:
        ai = torch.linalg.inv(a)
        return (torch.trace(a @ sig @ a.T) * torch.trace(ai @ w @ ai.T)).item()

    best = cost(m)
    assert cost(torch.eye(d, dtype=torch.float64)) / best == pytest.approx(gain.item(), rel=1e-4)
    assert gain.item() > 2.0  # Σ and W with unrelated axes: a real gain
    pca = cal.pca_maps(torch.randn(20000, 1, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(sig).T)
    assert cost(pca[0].double()) > best
    for _ in range(20):
        assert cost(m + 0.05 * torch.randn(d, d, generator=g, dtype=torch.float64)) > best
    # Σ ∝ W: nothing to gain
    _, g1 = cal.metric_maps(sig, 3 * sig, floor=1e-12)
    assert g1.item() == pytest.approx(1.0, rel=1e-6)


def test_compute_centers_validates_its_choices() -> None:
    """Bad map choices fail before any model is loaded (the directory does not exist)."""
    with pytest.raises(ValueError, match="key_map must be"):
        cal.compute_centers("/nonexistent", key_map="bogus")
    with pytest.raises(ValueError, match="value_map must be"):
        cal.compute_centers("/nonexistent", value_map="attn")
    with pytest.raises(ValueError, match="key_map must be"):
        cal.calibrate("/nonexistent", key_map="bogus")  # checked before an existing file is kept
    with pytest.raises(ValueError, match="alternatives"):
        cal.compute_centers("/nonexistent", scales=True)  # the default key map is a map
    with pytest.raises(ValueError, match="strength"):
        cal.compute_centers("/nonexistent", key_map_strength=0.0)
    assert cal.DEFAULT_KEY_MAP in cal.KEY_MAPS and "none" in cal.VALUE_MAPS


def test_attention_query_metric_matches_brute_force() -> None:
    """ω_t = s² Σ_j p_tj² ‖W_o (v_j − o_t)‖², summed as Σ_t ω_t q_t q_tᵀ, against explicit loops."""
    g = torch.Generator().manual_seed(3)
    t, h, grp, d, hidden = 7, 2, 2, 4, 5
    q = torch.randn(t, h, grp, d, generator=g, dtype=torch.float64)
    k = torch.randn(t, h, d, generator=g, dtype=torch.float64)
    v = torch.randn(t, h, d, generator=g, dtype=torch.float64)
    w_o = torch.randn(hidden, h * grp * d, generator=g, dtype=torch.float64)
    s = 0.4
    got = cal._attention_query_metric(q, k, v, w_o, s)
    want = torch.zeros(h, d, d, dtype=torch.float64)
    for hh in range(h):
        for j in range(grp):
            w = w_o[:, (hh * grp + j) * d:(hh * grp + j + 1) * d]
            for ti in range(t):
                p = torch.softmax(s * k[: ti + 1, hh] @ q[ti, hh, j], 0)
                o = p @ v[: ti + 1, hh]
                om = sum(p[jj] ** 2 * (w @ (v[jj, hh] - o)).pow(2).sum() for jj in range(ti + 1)) * s * s
                want[hh] += om * torch.outer(q[ti, hh, j], q[ti, hh, j])
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_find_calibration(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(cal.CALIBRATION_ENV, raising=False)
    assert find_calibration(tmp_path) is None
    f = _centers().save(tmp_path / cal.CALIBRATION_FILE)
    assert find_calibration(tmp_path) == f
    assert find_calibration(None) is None
    monkeypatch.setenv(cal.CALIBRATION_ENV, "none")
    assert find_calibration(tmp_path) is None
    monkeypatch.setenv(cal.CALIBRATION_ENV, str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError):
        find_calibration(tmp_path)


def test_local_kv_heads() -> None:
    assert local_kv_heads(8, 8, 0, 1) == list(range(8))
    assert local_kv_heads(8, 4, 1, 2) == [4, 5, 6, 7]
    assert local_kv_heads(8, 1, 5, 8) == [5]
    assert local_kv_heads(2, 1, 3, 4) == [1]  # replicated: ranks 2, 3 hold head 1
    assert local_kv_heads(3, 3, 0, 1) == [0, 1, 2]
    with pytest.raises(ValueError):
        local_kv_heads(3, 1, 0, 2)
    with pytest.raises(ValueError):
        local_kv_heads(8, 4, 2, 2)


def test_layer_index() -> None:
    assert layer_index("model.layers.7.self_attn.attn") == 7
    assert layer_index("language_model.model.layers.12.self_attn.attn") == 12
    assert layer_index("transformer.h.3.attn.attn") == 3
    with pytest.raises(ValueError):
        layer_index("attn")


def test_running_uncalibrated_is_logged_once_per_model(tmp_path, monkeypatch, caplog) -> None:
    """No calibration file (a Hugging Face id, an uncalibrated directory): a warning naming the fix,
    once per model however many layers ask; none when turned off on purpose or when a file is found."""
    import e8vllm.vllm_plugin.impl as impl_mod

    monkeypatch.setattr(impl_mod, "_UNCALIBRATED_WARNED", set())
    monkeypatch.delenv(cal.CALIBRATION_ENV, raising=False)
    layer = type("L", (), {"layer_name": "model.layers.0.self_attn.attn"})()

    def centers(model) -> object:
        impl = _Impl("e8_k4v4")
        impl._e8_model = model
        return impl._e8_centers(layer, torch.device("cpu"))

    with caplog.at_level("WARNING", logger="e8vllm.vllm_plugin"):
        assert centers("org/hf-model") is None and centers("org/hf-model") is None
    assert caplog.text.count("no KV calibration for model 'org/hf-model'") == 1
    assert "e8vllm calibrate DIR" in caplog.text
    caplog.clear()
    _centers().save(tmp_path / cal.CALIBRATION_FILE)
    with caplog.at_level("WARNING", logger="e8vllm.vllm_plugin"):
        assert centers(str(tmp_path)) is not None
        monkeypatch.setenv(cal.CALIBRATION_ENV, "none")
        assert centers("other/model") is None
    assert "no KV calibration" not in caplog.text
