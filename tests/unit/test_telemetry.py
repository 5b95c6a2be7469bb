"""e8vllm.telemetry: error sums against a direct computation, the per-process files, the write hook."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from e8vllm import telemetry as tm
from e8vllm.kernels.reference import E8KVFormat, write_kv_cache

ROOT = Path(__file__).resolve().parents[2]


def _direct(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, list[int]]:
    """Plain numpy/python: squared error, energy, cosine sum, per-bucket counts."""
    err = float(((x - y) ** 2).sum())
    energy = float((x ** 2).sum())
    cos = []
    for a, b in zip(x, y):
        na, nb = math.sqrt(float(a @ a)), math.sqrt(float(b @ b))
        if na == 0 and nb == 0:
            c = 1.0
        elif na == 0 or nb == 0:
            c = 0.0
        else:
            c = min(1.0, max(-1.0, float(a @ b) / (na * nb)))
        cos.append(c)
    counts = [0] * (len(tm.COSINE_BUCKETS) + 1)
    for c in cos:
        k = next((i for i, ub in enumerate(tm.COSINE_BUCKETS) if c <= ub), len(tm.COSINE_BUCKETS))
        counts[k] += 1
    return err, energy, sum(cos), counts


def test_error_stats_matches_direct_computation() -> None:
    g = np.random.default_rng(0)
    x = g.standard_normal((300, 64))
    # reconstructions at several noise levels, so every cosine bucket region is hit
    noise = g.standard_normal((300, 64)) * np.repeat([0.001, 0.01, 0.05, 0.1, 0.3, 1.0], 50)[:, None]
    y = x + noise
    x[0] = 0.0
    y[0] = 0.0      # both zero -> cosine 1
    y[1] = 0.0      # reconstruction zero -> cosine 0
    y[2] = -x[2]    # opposite -> cosine -1
    s = tm.error_stats(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    xe, ye = x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64)
    err, energy, cos_sum, counts = _direct(xe, ye)
    assert s.vectors == 300
    assert s.squared_error == pytest.approx(err, rel=1e-12)
    assert s.signal_energy == pytest.approx(energy, rel=1e-12)
    assert s.cosine_sum == pytest.approx(cos_sum, rel=1e-12)
    assert list(s.buckets) == counts
    assert sum(counts[:-1]) == 300 and counts[-1] == 0
    assert len(set(i for i, c in enumerate(counts) if c)) >= 5
    assert s.snr_db == pytest.approx(10 * math.log10(energy / err))


def test_error_stats_leaves_out_nonfinite_pairs() -> None:
    """A model overflow (NaN/Inf K or V) must not turn the process's error counters into NaN."""
    x, y = torch.randn(5, 8), torch.randn(5, 8)
    ref = tm.error_stats(x[[0, 3, 4]], y[[0, 3, 4]])
    x[1, 2], y[2, 0] = float("nan"), float("inf")
    got = tm.error_stats(x, y)
    assert got.vectors == 3 and math.isfinite(got.squared_error)
    assert (got.squared_error, got.signal_energy, got.cosine_sum) == pytest.approx(
        (ref.squared_error, ref.signal_energy, ref.cosine_sum))


def test_error_stats_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        tm.error_stats(torch.zeros(3, 8), torch.zeros(4, 8))
    assert tm.error_stats(torch.zeros(0, 8), torch.zeros(0, 8)).vectors == 0
    assert tm.TensorStats().snr_db is None


def test_config_validation() -> None:
    assert tm.TelemetryConfig.from_env({}) is None
    c = tm.TelemetryConfig.from_env({tm.DIR_ENV: "/tmp/x", tm.SAMPLE_EVERY_ENV: "5"})
    assert c is not None and c.sample_every == 5 and c.max_tokens == 8
    with pytest.raises(ValueError):
        tm.TelemetryConfig.from_env({tm.DIR_ENV: "/tmp/x", tm.SAMPLE_EVERY_ENV: "often"})
    with pytest.raises(ValueError):
        tm.TelemetryConfig(Path("/tmp/x"), sample_every=0)
    with pytest.raises(ValueError):
        tm.TelemetryConfig(Path("/tmp/x"), max_tokens=-1)


def test_files_sum_across_writers(tmp_path: Path) -> None:
    a = tm.StatsFile(tmp_path / "stats-1.f64")
    b = tm.StatsFile(tmp_path / "stats-2.f64")
    s1 = tm.TensorStats(1.5, 10.0, 3.0, 2.9, (0.0,) * 9 + (3.0, 0.0))
    s2 = tm.TensorStats(0.5, 5.0, 1.0, 0.99, (1.0,) + (0.0,) * 10)
    a.add("key", s1)
    a.add("key", s2)
    b.add("value", s2)
    (tmp_path / "stats-3.f64").write_bytes(b"garbage")  # skipped, not fatal
    snap = tm.read_dir(tmp_path)
    assert snap.files == 2
    k, v = snap.stats["key"], snap.stats["value"]
    assert (k.squared_error, k.signal_energy, k.vectors) == (2.0, 15.0, 4.0)
    assert k.buckets[0] == 1.0 and k.buckets[9] == 3.0
    assert (v.squared_error, v.vectors) == (0.5, 1.0)
    a.close()
    b.close()


def test_another_process_writes_server_reads(tmp_path: Path) -> None:
    code = ("import sys; from pathlib import Path; from e8vllm import telemetry as tm\n"
            "f = tm.StatsFile(Path(sys.argv[1]) / 'stats-child.f64')\n"
            "for _ in range(100): f.add('value', tm.TensorStats(0.25, 1.0, 2.0, 1.9, (0.0,) * 11))\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=ROOT, timeout=60)
    v = tm.read_dir(tmp_path).stats["value"]
    assert (v.squared_error, v.signal_energy, v.vectors) == (25.0, 100.0, 200.0)


def test_sampler_measures_the_codes_in_the_cache(tmp_path: Path) -> None:
    """The hook reads back what write_kv_cache stored; compare with the codec's own round trip."""
    fmt = E8KVFormat.from_bits(64, 4, 4)
    h, bs, nblocks = 3, 16, 4
    g = torch.Generator().manual_seed(1)
    cache = torch.zeros(nblocks, h, bs, fmt.slot_bytes, dtype=torch.uint8)
    s = tm.Sampler(tm.TelemetryConfig(tmp_path, sample_every=3, max_tokens=5))
    expected_k, expected_v = tm.TensorStats(), tm.TensorStats()
    for call in range(1, 7):
        t = 7
        key = torch.randn(t + 2, h, 64, generator=g).to(torch.bfloat16)  # 2 padding rows
        value = torch.randn(t + 2, h, 64, generator=g).to(torch.bfloat16)
        slots = torch.randperm(nblocks * bs, generator=g)[:t]
        slots[0] = -1  # skipped token
        write_kv_cache(key, value, cache, slots, fmt)
        s.after_write(key, value, cache, slots, fmt)
        if (call - 1) % 3 == 0:  # calls 1 and 4
            rows = torch.tensor([1, 2, 3, 5, 6])  # 5 of the 6 valid rows, evenly spread, first and last kept
            k = key[rows].reshape(-1, 64).float()
            v = value[rows].reshape(-1, 64).float()
            expected_k = expected_k + tm.error_stats(k, fmt.k_codec.decode(fmt.k_codec.encode(k)))
            expected_v = expected_v + tm.error_stats(v, fmt.v_codec.decode(fmt.v_codec.encode(v)))
    snap = tm.read_dir(tmp_path)
    got_k, got_v = snap.stats["key"], snap.stats["value"]
    assert got_k.vectors == expected_k.vectors == 2 * 5 * h
    for got, exp in ((got_k, expected_k), (got_v, expected_v)):
        assert got.squared_error == pytest.approx(exp.squared_error, rel=1e-4)
        assert got.signal_energy == pytest.approx(exp.signal_energy, rel=1e-9)
        assert got.cosine_sum == pytest.approx(exp.cosine_sum, rel=1e-6)
        assert 20.0 < got.snr_db < 27.0  # e8c-4bit / e8s-4bit on Gaussian data: ~23.3 dB
    (info,) = snap.info
    assert info["codec_key"] == "e8c-4bit" and info["codec_value"] == "e8s-4bit" and info["bits_key"] == 4.25
    assert info["rotation_key"].startswith("hadamard")


def test_sampler_off_without_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tm.DIR_ENV, raising=False)
    monkeypatch.setitem(tm._SAMPLER, "pid", None)
    assert tm.sampler() is None


def test_sampler_undoes_the_kv_calibration_map(tmp_path: Path) -> None:
    """With the KV calibration the cache holds a ⊙ (x - μ); the error is measured against x
    (x̂ = decode ⊘ a + μ), and the signal energy is that of x."""
    fmt = E8KVFormat.from_bits(64, 4, 4)
    h, bs = 2, 16
    g = torch.Generator().manual_seed(2)
    c = {"k_mean": torch.randn(h, 64, generator=g) * 3, "v_mean": torch.randn(h, 64, generator=g) * 3,
         "k_scale": torch.rand(h, 64, generator=g) + 0.5, "v_scale": torch.rand(h, 64, generator=g) + 0.5}
    key = torch.randn(5, h, 64, generator=g) + c["k_mean"]
    value = torch.randn(5, h, 64, generator=g) + c["v_mean"]
    cache = torch.zeros(2, h, bs, fmt.slot_bytes, dtype=torch.uint8)
    slots = torch.arange(5)
    kc = (key - c["k_mean"]) * c["k_scale"]
    write_kv_cache(kc, (value - c["v_mean"]) * c["v_scale"], cache, slots, fmt)
    s = tm.Sampler(tm.TelemetryConfig(tmp_path, sample_every=1, max_tokens=5))
    s.after_write(key, value, cache, slots, fmt, c)
    got = tm.read_dir(tmp_path).stats["key"]
    k_hat = fmt.k_codec.decode(fmt.k_codec.encode(kc.reshape(-1, 64))).reshape(5, h, 64) / c["k_scale"] + c["k_mean"]
    exp = tm.error_stats(key.reshape(-1, 64), k_hat.reshape(-1, 64))
    assert got.squared_error == pytest.approx(exp.squared_error, rel=1e-4)
    assert got.signal_energy == pytest.approx(exp.signal_energy, rel=1e-9)  # energy of x, not of the mapped x
    assert got.signal_energy > 5 * float((key - c["k_mean"]).pow(2).sum())


def test_sampler_counts_calls_per_layer(tmp_path: Path) -> None:
    """Sampling one in S calls per layer: with L layers per step and S a multiple of L, a global
    counter would sample one layer only; per-layer counters sample each layer every S steps, and
    staggering them keeps one sample per step instead of a burst every S steps."""
    fmt = E8KVFormat.from_bits(64, 4, 4)
    h, bs = 1, 16
    cache = torch.zeros(8, h, bs, fmt.slot_bytes, dtype=torch.uint8)
    s = tm.Sampler(tm.TelemetryConfig(tmp_path, sample_every=4, max_tokens=1))
    g = torch.Generator().manual_seed(3)
    per_step = []
    for step in range(8):
        before = tm.read_dir(tmp_path).stats["key"].vectors
        for layer in range(4):
            key = torch.randn(1, h, 64, generator=g)
            slots = torch.tensor([step * 4 + layer])
            write_kv_cache(key, key, cache, slots, fmt)
            s.after_write(key, key, cache, slots, fmt, None, layer)
        per_step.append(tm.read_dir(tmp_path).stats["key"].vectors - before)
    assert s.calls == {0: 8, 1: 8, 2: 8, 3: 8}
    assert tm.read_dir(tmp_path).stats["key"].vectors == 4 * 2  # every layer, twice in 8 steps
    assert per_step == [1.0] * 8  # staggered: one layer's sample in every step, not bursts
