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
