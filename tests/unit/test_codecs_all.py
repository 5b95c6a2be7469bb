"""The contract every registered codec keeps (a new codec joins this matrix by registering)."""

from __future__ import annotations

import pytest
import torch

import e8vllm.codecs as codecs

ALL = codecs.names()


pytestmark = pytest.mark.usefixtures("one_thread")


def _make(name: str, head_dim: int):
    c = codecs.get(name, head_dim=head_dim)
    if c.needs_training:
        g = torch.Generator().manual_seed(1)
        c = c.fit(torch.randn(2048, head_dim, generator=g))
    return c


def test_registry_is_consistent():
    assert len(ALL) == len(set(ALL))
    ids = [codecs.codec_id(n) for n in ALL]
    assert len(ids) == len(set(ids))
    for n in ALL:
        assert codecs.name_of(codecs.codec_id(n)) == n
    for must in ("e8-2bit", "e8-3bit", "e8-4bit", "d8dual-4bit", "int4", "int4-rot", "fp8", "pq-4bit",
                 "lloydmax-4bit", "e8p-2bit"):
        assert must in ALL
    with pytest.raises(ValueError):
        codecs.get("no-such-codec", head_dim=64)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("name", ALL)
def test_codec_contract(name, head_dim):
    c = _make(name, head_dim)
    assert c.name == name and c.codec_id == codecs.codec_id(name)
    # size: exactly bits_per_value * D / 8 bytes, everything included
    assert c.code_bytes * 8 == round(c.bits_per_value * head_dim)
    x = torch.randn(33, head_dim) * 2
    codes = c.encode(x)
    assert codes.dtype == torch.uint8 and codes.shape == (33, c.code_bytes)
    assert torch.equal(codes, c.encode(x.clone()))                       # deterministic
    out = c.decode(codes)
    assert out.dtype == torch.float32 and out.shape == (33, head_dim)
    assert torch.equal(out, c.decode(codes.clone()))                    # deterministic
    assert torch.isfinite(out).all()
    nmse = ((out - x).square().sum() / x.square().sum()).item()
    assert nmse < 0.5, nmse                                              # it is a quantizer, not noise
    # half-precision inputs are accepted
    for dt in (torch.float16, torch.bfloat16):
        assert c.encode(x.to(dt)).shape == codes.shape
    # empty batch
    assert c.encode(torch.empty(0, head_dim)).shape == (0, c.code_bytes)
    assert c.decode(torch.empty(0, c.code_bytes, dtype=torch.uint8)).shape == (0, head_dim)
    # decode(encode(decode(encode(x)))) stays close to decode(encode(x)) (no drift)
    again = c.decode(c.encode(out))
    assert ((again - out).square().sum() / out.square().sum().clamp(min=1e-12)).item() <= max(nmse, 1e-6) * 1.5


@pytest.mark.parametrize("name", ALL)
def test_codec_rejects_bad_input(name):
    c = _make(name, 64)
    x = torch.randn(3, 64)
    for bad in (x.clone().fill_(float("nan")), x.clone().fill_(float("inf")), torch.randn(3, 65),
                torch.randn(3), torch.ones(3, 64, dtype=torch.int64)):
        with pytest.raises(ValueError):
            c.encode(bad)
    for bad in (torch.zeros(3, c.code_bytes + 1, dtype=torch.uint8), torch.zeros(3, c.code_bytes),
                torch.zeros(c.code_bytes, dtype=torch.uint8)):
        with pytest.raises(ValueError):
            c.decode(bad)
    with pytest.raises(ValueError):
        codecs.get(name, head_dim=60)


@pytest.mark.parametrize("name", ALL)
def test_zero_and_vanishing_vectors_decode_near_zero(name):
    """A zero vector (or one far below any scale's range) must not come back as a full-size
    codeword: scale codecs used to search it at a stand-in scale of 1 (e8-*, e8p: |x̂| up to 2)."""
    c = _make(name, 64)
    x = torch.zeros(4, 64)
    x[1] = 1e-9
    x[2, 5] = -3e-8
    x[3] = torch.randn(64)  # an ordinary row beside them
    out = c.decode(c.encode(x))
    assert out[:3].abs().max().item() < 1e-3, out[:3].abs().max(dim=1).values
    assert torch.isfinite(out).all()
