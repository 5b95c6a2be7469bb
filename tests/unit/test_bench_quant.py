"""The quantization benchmark (e8vllm.bench.quant) end to end on a tiny synthetic KV file, quick mode."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from safetensors.torch import save_file

import e8vllm.codecs as codecs
from e8vllm.bench import quant

BAD = "boom-2bit"  # a codec that raises: must be recorded as failed, not crash the benchmark


def write_kv(path, tokens: int = 512, layers: int = 2, heads: int = 3, d: int = 64, seed: int = 0):
    """A dump_kv-shaped file: layer{i}.k (RoPE-rotated, channel-scaled, one outlier channel)
    and layer{i}.v (Gaussian with per-token scales), float32 [tokens, heads, d]."""
    g = torch.Generator().manual_seed(seed)
    ang = torch.arange(tokens).float()[:, None] * 10000 ** (-torch.arange(d // 2).float() / (d // 2))
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    t = {}
    for i in range(layers):
        k = torch.randn(tokens, heads, d, generator=g) * torch.linspace(0.2, 3.0, d)
        k[..., 5] += 6.0
        k1, k2 = k[..., : d // 2], k[..., d // 2:]
        t[f"layer{i}.k"] = torch.cat([k1 * cos - k2 * sin, k1 * sin + k2 * cos], -1).contiguous()
        t[f"layer{i}.v"] = (torch.randn(tokens, heads, d, generator=g)
                            * torch.exp(0.3 * torch.randn(tokens, heads, 1, generator=g))).contiguous()
    save_file(t, str(path), metadata={"model": "synthetic", "num_tokens": str(tokens)})
    return path


def _boom(head_dim: int, **kw):
    raise RuntimeError("this codec always fails")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quant")
    kv = write_kv(tmp / "kv.safetensors")
    mp = pytest.MonkeyPatch()
    try:
        entry = codecs._Entry(BAD, 999_001, _boom, "test", 2.0, "always raises (test)")
        mp.setitem(codecs._REGISTRY, BAD, entry)
        mp.setitem(codecs._BY_ID, 999_001, BAD)
        # tighter quick-mode limits: slow codecs (peers, ball codes) are cut after 1 CPU s
        mp.setattr(quant, "QUICK_LIMIT_S", 1.0)
        mp.setattr(quant, "QUICK_SLOW_S", 0.5)
        rep = quant.run(out_dir=tmp / "out", n_vectors=512, quick=True, kv_path=kv)
    finally:
        mp.undo()
    return tmp / "out", rep


def test_outputs_exist(report):
    out, rep = report
    for f in ("quant.json", "quant.md", "quant.png"):
        assert (out / f).stat().st_size > 0, f
    data = json.loads((out / "quant.json").read_text())
    assert data["conditions"]["quick"] is True and data["conditions"]["threads"] == quant.QUICK_THREADS
    assert [d["name"] for d in data["datasets"]] == list(quant.DATASETS)
    assert data["findings"]["sentences"] and data["findings"]["method"]
    md = (out / "quant.md").read_text()
    assert "## gaussian" in md and "## Findings" in md and "int4-sym-rot" in md


def test_every_codec_recorded(report):
    out, _ = report
    data = json.loads((out / "quant.json").read_text())
    expected = set(codecs.names()) | {BAD}
    for ds, rows in data["results"].items():
        assert set(rows) == expected, ds
        for name, r in rows.items():
            assert r["status"] in ("ok", "failed", "skipped"), (ds, name)
            if r["status"] == "ok":
                assert math.isfinite(r["snr_db"]) and math.isfinite(r["mse"]), (ds, name)
                assert -1.0 <= r["cos_p1"] <= r["cos_mean"] <= 1.0 + 1e-9, (ds, name)
                assert r["encode_vps"] > 0 and r["decode_vps"] > 0
            else:
                assert r["error"], (ds, name)
        assert rows[BAD]["status"] == "failed" and "always fails" in rows[BAD]["error"]
    # the baselines that need no training run on every data set
    assert all(data["results"][ds]["int4-sym-rot"]["status"] == "ok" for ds in quant.DATASETS)


def test_gaussian_sanity(report):
    """int4-sym-rot lands where a 4-bit scalar quantizer must, and nothing beats Shannon."""
    _, rep = report
    rows = rep["results"]["gaussian"]
    assert 15.0 < rows["int4-sym-rot"]["snr_db"] < 25.0
    ran = [r for r in rows.values() if r["status"] == "ok"]
    assert len(ran) >= 10
    for r in ran:
        assert r["snr_db"] < quant.DB_PER_BIT * r["bits_per_value"], r["codec"]
        assert r["gap_to_rd_db"] > 0
        assert r["mse"] > r["shannon_mse_at_bpv"]
    lm = rows["lloydmax-4bit"]
    assert lm["lloydmax_mse_at_nominal"] == pytest.approx(0.009497, rel=1e-3)


def test_equal_bits_interpolation():
    pts = [(2.25, 10.0, "a"), (4.25, 20.0, "b"), (4.5, 19.0, "dominated"), (8.25, 44.0, "c")]
    assert [p[2] for p in quant.envelope(pts)] == ["a", "b", "c"]
    assert quant.snr_at(pts, 4.25)[0] == pytest.approx(20.0)
    assert quant.snr_at(pts, 3.25)[0] == pytest.approx(15.0)
    s, how = quant.snr_at(pts, 1.25)
    assert s == pytest.approx(10.0 - quant.DB_PER_BIT) and "extrapolated" in how


def _spin(seconds: float) -> None:
    t = time.process_time()
    while time.process_time() - t < seconds:
        pass


class _SlowDel:
    def __del__(self) -> None:  # where Python drops an exception raised by a signal handler
        _spin(0.00098)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the drops this test provokes
def test_cpu_limit_interrupts_even_when_the_first_signal_is_dropped() -> None:
    """98 % of the body's CPU time is spent in __del__, where Python drops (prints) an exception
    raised by the signal handler; the limit must still end the body soon after. (A handler that
    fires once failed this 4 times in 5 runs.)"""
    from e8vllm.bench.quant import CodecTimeout, cpu_limit

    c0 = time.process_time()
    with pytest.raises(CodecTimeout):
        with cpu_limit(0.1):
            while time.process_time() - c0 < 10:
                _spin(0.00002)
                _SlowDel()
    assert time.process_time() - c0 < 3


def test_cpu_limit_leaves_no_timer_behind() -> None:
    import signal

    from e8vllm.bench.quant import cpu_limit

    old = signal.getsignal(signal.SIGPROF)
    with cpu_limit(5.0):
        pass
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGPROF) is old
