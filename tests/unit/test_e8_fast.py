"""The compiled (numba) CPU encoder against the reference tensor-op encoder of ``E8Codec``.

Same search, same float32 arithmetic: the codes must agree on (almost) every vector. The only
allowed differences are float32 ties between candidates summed in another order, so the test asks
for >= 99.9 % identical vectors and the same squared error to 1e-6 relative (in practice 100 %).
"""

from __future__ import annotations

import pytest
import torch

from e8vllm.codecs import _e8_fast
from e8vllm.codecs.e8 import E8Codec

pytestmark = pytest.mark.skipif(_e8_fast.numba is None, reason="numba not installed")

CODECS = [("e8", 4, True, 9), ("e8", 3, True, 9), ("e8", 2, True, 9), ("e8", 8, True, 9), ("e8", 4, False, 9),
          ("d8dual", 4, True, 9), ("d8half", 3, True, 9), ("e8", 4, True, 1)]


def _vectors(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, d, generator=g) * (0.01 + 3 * torch.rand(n, 1, generator=g))
    y[::7, 3] += 9.0  # outliers
    y[5] = 0.0  # an all-zero vector (scale 0 -> 1)
    y[6, :8] = 1e-30  # subnormal-range values
    return y


@pytest.mark.parametrize("kind,bits,companded,n_scales", CODECS, ids=[f"{k}-{b}{'' if c else 'u'}-s{s}" for k, b, c, s in CODECS])
def test_compiled_encoder_matches_reference(kind, bits, companded, n_scales, monkeypatch):
    codec = E8Codec(64, bits, kind, companded, n_scales)
    y = _vectors(2000, 64, bits)
    monkeypatch.setenv("E8VLLM_CPU_ENCODER", "torch")
    f0, s0 = codec.encode_rotated(y)
    monkeypatch.setenv("E8VLLM_CPU_ENCODER", "numba")
    assert _e8_fast.available()
    f1, s1 = codec.encode_rotated(y)
    assert f1.dtype == torch.int64 and f1.shape == f0.shape and s1.shape == s0.shape
    same = ((f0 == f1).all(1) & (s0 == s1)).float().mean().item()
    assert same >= 0.999, same
    e0 = (codec.decode_rotated(f0, s0) - y).square().sum().item()
    e1 = (codec.decode_rotated(f1, s1) - y).square().sum().item()
    assert abs(e1 - e0) <= 1e-6 * e0


def test_encoder_switch(monkeypatch):
    monkeypatch.setenv("E8VLLM_CPU_ENCODER", "torch")
    assert not _e8_fast.available()
    monkeypatch.setenv("E8VLLM_CPU_ENCODER", "fast")
    with pytest.raises(ValueError, match="E8VLLM_CPU_ENCODER"):
        _e8_fast.available()


def test_full_codec_roundtrip_uses_compiled_encoder(monkeypatch):
    """encode() (rotation + search + packing) gives the same bytes with either encoder."""
    codec = E8Codec(128, 4)
    x = _vectors(300, 128, 11)
    monkeypatch.setenv("E8VLLM_CPU_ENCODER", "torch")
    ref = codec.encode(x)
    monkeypatch.setenv("E8VLLM_CPU_ENCODER", "numba")
    got = codec.encode(x)
    assert (ref == got).all(1).float().mean().item() >= 0.999


@pytest.mark.parametrize("n_rows", [63, 64, 301])
def test_threaded_encode_equals_one_thread(n_rows, monkeypatch):
    """Both compiled encoders split big writes over threads: the same codes as on one thread,
    for row counts below, at and above the split threshold (uneven ranges), and really split."""
    import threading

    from e8vllm.codecs.e8s import E8SwitchedCodec

    calls: list[tuple[str, int]] = []
    for name in ("_encode", "_encode_sw"):
        real = getattr(_e8_fast, name)

        def spy(y, *a, _real=real):  # noqa: ANN001, ANN002, ANN202
            calls.append((threading.current_thread().name, y.shape[0]))
            return _real(y, *a)

        monkeypatch.setattr(_e8_fast, name, spy)
    y = _vectors(n_rows, 128, 5)
    for codec in (E8Codec(128, 4), E8SwitchedCodec(128, 3)):
        monkeypatch.setenv("E8VLLM_CPU_ENCODER_THREADS", "1")
        calls.clear()
        one = codec.encode_rotated(y)
        assert calls == [(threading.current_thread().name, n_rows)]
        monkeypatch.setenv("E8VLLM_CPU_ENCODER_THREADS", "3")
        calls.clear()
        three = codec.encode_rotated(y)
        assert all(torch.equal(a, b) for a, b in zip(one, three))
        assert sum(n for _, n in calls) == n_rows
        if n_rows >= _e8_fast.PARALLEL_MIN_ROWS:  # ranges of >= 32 rows, up to 3; some on the pool's threads
            assert len(calls) == min(3, n_rows // 32), calls
            assert any(t.startswith("e8vllm-encode") for t, _ in calls), calls
        else:
            assert len(calls) == 1


def test_encoder_threads_setting(monkeypatch):
    monkeypatch.delenv("E8VLLM_CPU_ENCODER_THREADS", raising=False)
    assert _e8_fast.encoder_threads() == max(1, torch.get_num_threads())
    monkeypatch.setenv("E8VLLM_CPU_ENCODER_THREADS", "4")
    assert _e8_fast.encoder_threads() == 4
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv("E8VLLM_CPU_ENCODER_THREADS", bad)
        with pytest.raises(ValueError, match="E8VLLM_CPU_ENCODER_THREADS"):
            _e8_fast.encoder_threads()
