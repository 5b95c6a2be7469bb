"""Peer codecs (nexusquant-kv, glq): honest sizes, exact wrapping of the peers' own quantizers.

Each test is skipped, with the reason from ``peers.UNAVAILABLE``, when its peer cannot be
imported. The references below call the peers' functions directly, not the wrapper.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

import e8vllm.codecs as codecs
from e8vllm.codecs import peers

NQ = [(f"nexusquant-e8-{b}bit", "nexusquant-kv") for b in (2, 3, 4)]
GLQ = [(f"glq-e8-{b}bit", "glq") for b in (2, 3, 4, 5, 6, 7)]
DIMS = (64, 128)
CASES = [pytest.param(n, p, d, id=f"{n}-D{d}") for n, p in NQ + GLQ for d in DIMS]

#: bits per 8-value block of nexusquant's D8 ∪ (Z^8+½) point set (see peers.py docstring)
NQ_BLOCK_BITS = {2: 20, 3: 26, 4: 34}


def need(peer: str) -> None:
    if peer in peers.UNAVAILABLE:
        pytest.skip(f"{peer} unavailable: {peers.UNAVAILABLE[peer]}")


def gauss(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def nq_reference(x: torch.Tensor, bits: int, hadamard: bool = True) -> torch.Tensor:
    """nexusquant-kv's quant-only value path, written with its own functions."""
    from nexusquant.core.e8_lattice import E8Lattice
    from nexusquant.core.hadamard import hadamard_matrix

    if not hadamard:
        return E8Lattice.quantize_perhead(x, levels=2**bits)
    h = hadamard_matrix(x.shape[1]).float()
    return torch.einsum("nd,ed->ne", E8Lattice.quantize_perhead(torch.einsum("nd,de->ne", x, h), levels=2**bits), h)


def reference(c: codecs.Codec, x: torch.Tensor) -> torch.Tensor:
    if isinstance(c, peers.NexusQuantE8):
        return nq_reference(x, c.bits, c.hadamard)
    from glq.kv_e8 import E8KVQuantizer

    q = c.quantizer
    assert isinstance(q, E8KVQuantizer)
    return q.dequantize(q.quantize(x))


def expected_code_bytes(name: str, d: int) -> int:
    b = int(name.rsplit("-", 1)[1].removesuffix("bit"))
    if name.startswith("nexusquant"):
        return math.ceil(d // 8 * NQ_BLOCK_BITS[b] / 8) + 4            # block codes + float32 scale
    n_primary, n_secondary = peers.GLQ_BPW[b]
    return math.ceil(d // 8 * (12 * n_primary + 8 * n_secondary) / 8) + 2 * (d // 8)   # indices + fp16 scales


# ---- availability ----------------------------------------------------------------------

def test_unavailable_is_reported_and_nothing_registered_for_it():
    assert isinstance(peers.UNAVAILABLE, dict)
    registered = set(codecs.names("peer"))
    for names, peer in ((NQ, "nexusquant-kv"), (GLQ, "glq")):
        want = {n for n, _ in names}
        if peer in peers.UNAVAILABLE:
            assert isinstance(peers.UNAVAILABLE[peer], str) and peers.UNAVAILABLE[peer]
            assert not want & registered
        else:
            assert want <= registered
            assert peer in peers.PEER_VERSIONS


def test_import_never_fails_without_the_peers():
    code = textwrap.dedent(f"""
        import sys
        sys.path[:0] = {sys.path!r}
        sys.modules["nexusquant"] = None   # makes `import nexusquant...` raise ImportError
        sys.modules["glq"] = None
        import e8vllm.codecs as codecs
        from e8vllm.codecs import peers
        assert set(peers.UNAVAILABLE) == {{"nexusquant-kv", "glq"}}, peers.UNAVAILABLE
        assert codecs.names("peer") == [], codecs.names("peer")
        assert "pip install" in peers.UNAVAILABLE["glq"]
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_ids_and_names():
    for n, p in NQ + GLQ:
        if p in peers.UNAVAILABLE:
            continue
        c = codecs.get(n, head_dim=64)
        assert c.name == n and c.family == "peer"
        assert codecs.codec_id(n) == c.codec_id and 700 <= c.codec_id <= 709
        assert codecs.name_of(c.codec_id) == n


# ---- per codec ------------------------------------------------------------------------

@pytest.mark.parametrize("name,peer,d", CASES)
def test_code_size_is_honest(name, peer, d):
    need(peer)
    c = codecs.get(name, head_dim=d)
    codes = c.encode(gauss(37, d, 1))
    assert codes.dtype == torch.uint8 and codes.shape == (37, c.code_bytes)
    assert c.code_bytes == expected_code_bytes(name, d)
    assert c.code_bytes * 8 == pytest.approx(c.bits_per_value * d)
    assert c.describe()["bits_per_value"] == c.bits_per_value


@pytest.mark.parametrize("name,peer,d", CASES)
def test_decode_equals_peer_output(name, peer, d):
    need(peer)
    c = codecs.get(name, head_dim=d)
    x = gauss(200, d, 2) * torch.exp(gauss(200, 1, 3))     # per-row scales
    x[:, 5] *= 6.0                                          # an outlier channel
    y = c.decode(c.encode(x))
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.equal(y, reference(c, x)), "the wrapper must add no error to the peer's quantize -> dequantize"


@pytest.mark.parametrize("name,peer,d", CASES)
def test_deterministic(name, peer, d):
    need(peer)
    x = gauss(64, d, 4)
    c = codecs.get(name, head_dim=d)
    a, b = c.encode(x), codecs.get(name, head_dim=d).encode(x.clone())
    assert torch.equal(a, b)
    assert torch.equal(c.decode(a), c.decode(a.clone()))


@pytest.mark.parametrize("name,peer", NQ[:1] + GLQ[:1])
def test_edge_inputs(name, peer):
    need(peer)
    c = codecs.get(name, head_dim=64)
    assert c.encode(torch.zeros(0, 64)).shape == (0, c.code_bytes)
    assert c.decode(torch.zeros(0, c.code_bytes, dtype=torch.uint8)).shape == (0, 64)
    x = gauss(8, 64, 5)
    x[0] = 0.0
    for dt in (torch.float16, torch.bfloat16):
        xd = x.to(dt)
        assert torch.equal(c.decode(c.encode(xd)), reference(c, xd.float()))
    with pytest.raises(ValueError):
        c.encode(torch.full((2, 64), float("nan")))
    with pytest.raises(ValueError):
        c.encode(gauss(2, 32, 0))
    with pytest.raises(ValueError):
        c.decode(torch.zeros(2, c.code_bytes + 1, dtype=torch.uint8))


# ---- nexusquant: every region of its point set ------------------------------------------

@pytest.mark.parametrize("bits", (2, 3, 4))
@pytest.mark.parametrize("hadamard", (False, True))
def test_nexusquant_structured_inputs(bits, hadamard):
    """Grid inputs hit the clamped +h half points and the odd-parity integer points."""
    need("nexusquant-kv")
    h = 2 ** (bits - 1)
    g = torch.Generator().manual_seed(bits)
    n, d = 400, 64
    grid = torch.randint(-h, h + 1, (n, d), generator=g).float()
    grid[:, 0] = h                                     # the row max sits on a block's first coordinate
    halfgrid = torch.randint(-h, h, (n, d), generator=g).float() + 0.5
    halfgrid[:, 8] = h                                 # +h beside half-integers: the clamped half point
    onehot = torch.eye(d)[:16] * 3.0
    x = torch.cat([grid * 0.37, halfgrid * 1.9, onehot, torch.zeros(2, d), -grid[:50]])
    c = peers.NexusQuantE8(head_dim=d, bits=bits, hadamard=hadamard)
    codes = c.encode(x)
    assert torch.equal(c.decode(codes), nq_reference(x, bits, hadamard))
    if not hadamard:
        (block,) = peers._unpack_fields(codes[:, :-4], c._layout)
        _, n_half, n_even, _ = peers._nq_space(2**bits)
        assert bool((block >= n_half + n_even).any()), "odd-parity integer region not exercised"
        assert bool((block < n_half).any()) and bool(((block >= n_half) & (block < n_half + n_even)).any())


def test_nexusquant_rank_is_a_bijection_on_samples():
    need("nexusquant-kv")
    for levels in (4, 8, 16):
        base, n_half, n_even, w = peers._nq_space(levels)
        total = n_half + n_even + (base**7 - 1) // 2
        assert total <= 2**w < 2 * total
        code = torch.cat([torch.arange(0, 3000), torch.arange(n_half - 1000, n_half + 1000),
                          torch.arange(n_half + n_even - 1000, n_half + n_even + 1000), torch.arange(total - 3000, total),
                          torch.randint(0, total, (5000,), generator=torch.Generator().manual_seed(levels))])
        code = code[code != n_half - 1]        # the one unused code: all digits L = (h, ..., h), an integer point
        q2 = peers._nq_unrank(code, levels)
        assert int(q2.abs().max()) <= levels
        assert torch.equal(peers._nq_rank(q2, levels), code)


def test_nexusquant_rejects_corrupt_codes():
    need("nexusquant-kv")
    c = codecs.get("nexusquant-e8-3bit", head_dim=64)
    bad = torch.full((1, c.code_bytes), 255, dtype=torch.uint8)    # block codes 2^26-1 > last code
    with pytest.raises(ValueError):
        c.decode(bad)


def test_mse_sanity():
    """Loose bounds on N(0,1) data (20k-vector measurements: 0.0341, 0.229, 0.0343)."""
    if {"glq", "nexusquant-kv"} <= set(peers.UNAVAILABLE):
        pytest.skip(f"no peer available: {peers.UNAVAILABLE}")
    x = gauss(2000, 128, 7)
    bounds = {"nexusquant-e8-3bit": (0.02, 0.05), "glq-e8-2bit": (0.15, 0.30), "glq-e8-4bit": (0.02, 0.05)}
    for name, (lo, hi) in bounds.items():
        if ("glq" if name.startswith("glq") else "nexusquant-kv") in peers.UNAVAILABLE:
            continue
        c = codecs.get(name, head_dim=128)
        mse = float((c.roundtrip(x) - x).square().mean())
        assert lo < mse < hi, (name, mse)
