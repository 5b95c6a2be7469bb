"""E8 block codes and codecs against independent references.

* The block encoder's nearest point is checked against (a) brute force over every codeword
  (2 bits: 2^16 codewords) and (b) an exact 2-state dynamic program over the index parity
  (every bit rate), written independently of the encoder.
* Uniform ("e8u") codes are checked to be E8 / D8* / D8∪(Z^8+½) points (scaled).
* The Voronoi code is checked against ``nearest_e8`` and its wrap-around rule.
* Gaussian MSE targets of the issue (3 and 4 bits) and the Lloyd fixed point of the tables.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import e8vllm.codecs as codecs
from e8vllm.codecs.e8 import BITS, PARITY, E8Codec, E8VoronoiCodec, _lloyd, block_code
from e8vllm.lattice import is_member_d8_dual, is_member_d8_half, is_member_e8, nearest_e8

KINDS = tuple(PARITY)


pytestmark = pytest.mark.usefixtures("one_thread")


def _points(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    scales = torch.tensor([0.3, 1.0, 2.0, 5.0]).repeat_interleave(n // 4 + 1)[:n]
    return x * scales[:, None]


def _dp_min_error(u: torch.Tensor, code) -> torch.Tensor:
    """Exact min squared error by a DP over (coset, index parity): independent of the encoder."""
    best = torch.full((u.shape[0],), float("inf"), dtype=torch.float64)
    u = u.double()
    for c in (0, 1):
        main = code.main[c].double()
        last = code.last[c, : code.last_levels(c)].double()
        # cost of each level for each coordinate: [M, 8, K]
        acc = torch.stack([torch.zeros(u.shape[0], dtype=torch.float64),
                           torch.full((u.shape[0],), float("inf"), dtype=torch.float64)], 1)  # parity 0/1
        for i in range(8):
            table = main if i < 7 else last
            cost = (u[:, i:i + 1] - table[None, :]).square()  # [M, K]
            par = torch.arange(table.numel()) & 1
            new = torch.full_like(acc, float("inf"))
            for p in (0, 1):
                for q in (0, 1):
                    sel = cost[:, par == q]
                    if sel.numel() == 0:
                        continue
                    new[:, p ^ q] = torch.minimum(new[:, p ^ q], acc[:, p] + sel.min(1).values)
            acc = new
        err = acc[:, 0] if code.parity[c] else acc.min(1).values
        best = torch.minimum(best, err)
    return best


@pytest.mark.parametrize("companded", [True, False])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", BITS)
def test_block_encoder_is_exact_nearest(bits, kind, companded):
    if kind != "e8" and bits == 8:
        pytest.skip("relaxed-parity codes are built at 2-4 bits only")
    code = block_code(kind, bits, companded)
    scale = float(code.main.abs().max()) / 2.5
    u = _points(4000, seed=bits) * scale
    fields, err = code.encode(u)
    assert fields.min() >= 0 and fields.max() < (1 << bits)
    rec = code.decode(fields)
    actual = (u.double() - rec.double()).square().sum(1)
    torch.testing.assert_close(actual, err.double(), rtol=1e-4, atol=1e-5)
    dp = _dp_min_error(u, code)
    assert (actual <= dp + 1e-4 * (1 + dp)).all(), (actual - dp).max()


@pytest.mark.parametrize("kind", KINDS)
def test_two_bit_codebook_brute_force(kind):
    """Every one of the 2^16 field words decodes to a distinct codeword; encoder = argmin."""
    code = block_code(kind, 2, True)
    words = torch.tensor(list(itertools.product(range(4), repeat=8)), dtype=torch.int64)
    book = code.decode(words)
    assert torch.unique(book, dim=0).shape[0] == 1 << 16
    u = _points(1500, seed=7) * 0.8
    fields, err = code.encode(u)
    brute = torch.cdist(u.double(), book.double()).square().min(1).values
    assert torch.allclose(err.double(), brute, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_uniform_codes_are_lattice_points(bits):
    for kind, member in (("e8", is_member_e8), ("d8dual", is_member_d8_dual), ("d8half", is_member_d8_half)):
        code = block_code(kind, bits, companded=False)
        step = float(code.main[0, 1] - code.main[0, 0])
        fields, _ = code.encode(_points(2000, seed=3) / step * 0.5 * step)
        pts = code.decode(fields).double() / step
        half = torch.round(pts * 2) / 2
        assert (pts - half).abs().max() < 1e-4  # float32 tables: equal up to rounding
        assert member(half.float()).all(), kind


@pytest.mark.parametrize("bits", (3, 4))
def test_gaussian_targets_without_scale(bits):
    """Issue targets on N(0,1) values, known variance: <= 0.029 (3 bits), <= 0.0075 (4 bits)."""
    g = torch.Generator().manual_seed(11)
    u = torch.randn(100_000, 8, generator=g)
    _, err = block_code("e8", bits).encode(u)
    mse = err.mean().item() / 8
    assert mse <= {3: 0.029, 4: 0.0075}[bits], mse
    lloyd_max = {3: 0.03455, 4: 0.009501}[bits]
    assert mse < lloyd_max


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_companded_tables_are_a_lloyd_fixed_point(bits):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20_000, 64, generator=g)
    u = (x / x.square().mean(1, keepdim=True).sqrt()).reshape(-1, 8)
    code = block_code("e8", bits)
    before = code.encode(u)[1].mean().item()
    after = _lloyd(code, u, iters=1).encode(u)[1].mean().item()
    assert after > before * 0.99, (before, after)  # one more iteration gains < 1%
    assert (code.main.diff(dim=1) > 0).all()


def test_companded_beats_uniform_and_parity_matters():
    g = torch.Generator().manual_seed(2)
    u = torch.randn(50_000, 8, generator=g)
    for bits in (2, 3, 4):
        comp = block_code("e8", bits).encode(u)[1].mean()
        unif = block_code("e8", bits, companded=False).encode(u)[1].mean()
        assert comp < unif


@pytest.mark.parametrize("bits", (2, 4))
def test_codec_roundtrip_rotated_domain(bits):
    c = E8Codec(head_dim=64, bits=bits)
    x = torch.randn(300, 64) * 3
    codes = c.encode(x)
    assert codes.shape == (300, 64 * bits // 8 + 2)
    from e8vllm.codecs.e8 import cached_rotation
    rot = cached_rotation(64, 0)
    fields, scale = c.encode_rotated(rot.forward(x))
    torch.testing.assert_close(rot.inverse(c.decode_rotated(fields, scale)), c.decode(codes), rtol=0, atol=1e-5)


def test_scale_search_never_worse_than_rms():
    x = torch.randn(2000, 64)
    x[:, 3] *= 8  # an outlier channel
    for bits in (2, 4):
        search = E8Codec(head_dim=64, bits=bits, n_scales=9)
        rms = E8Codec(head_dim=64, bits=bits, n_scales=1)
        e_s = (search.roundtrip(x) - x).square().sum(1)
        e_r = (rms.roundtrip(x) - x).square().sum(1)
        # f = 1 is one of the 9 candidates, so per vector the search is never worse
        assert (e_s <= e_r * (1 + 1e-5) + 1e-6).all()


def test_voronoi_code_matches_nearest_e8_without_overload():
    c = E8VoronoiCodec(head_dim=64, bits=4)
    u = torch.randn(5000, 8) * 1.5  # well inside 16·V(E8) (covering radius 16)
    k, rec = c._quantize(u)
    torch.testing.assert_close(rec, nearest_e8(u))
    assert k.min() >= 0 and k.max() < 16
    # wrap-around: adding a point of 16·E8 does not change the code
    shift = 16 * nearest_e8(torch.randn(5000, 8) * 3)
    k2, _ = c._quantize(nearest_e8(u) + shift)
    assert torch.equal(k, k2)


@pytest.mark.parametrize("name", [n for n in codecs.names("e8")])
def test_e8_family_basics(name):
    c = codecs.get(name, head_dim=64)
    # seeded: the Voronoi codes (e8v-*) wrap around on rare overloaded vectors, and with the global
    # RNG (whatever ran before) one such draw failed CI once (e8v-4bit at 5.3x the bound)
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    a, b = c.encode(x), c.encode(x)
    assert torch.equal(a, b)
    assert a.shape[1] == c.code_bytes == round(c.bits_per_value * 64 / 8)
    assert torch.equal(c.decode(a), c.decode(a))
    nmse = ((c.decode(a) - x).square().sum() / x.square().sum()).item()
    bits = codecs.info(name).nominal_bits
    assert nmse < 2.0 ** (-2 * bits) * 4  # within 6 dB of the Gaussian rate-distortion bound
    assert codecs.name_of(codecs.codec_id(name)) == name


@pytest.mark.parametrize("bad", ["nan", "inf", "shape", "int"])
def test_e8_bad_input(bad):
    c = codecs.get("e8-4bit", head_dim=64)
    x = torch.randn(4, 64)
    if bad == "nan":
        x[1, 2] = float("nan")
    elif bad == "inf":
        x[0, 0] = float("inf")
    elif bad == "shape":
        x = torch.randn(4, 60)
    else:
        x = torch.ones(4, 64, dtype=torch.int32)
    with pytest.raises(ValueError):
        c.encode(x)
    with pytest.raises(ValueError):
        c.decode(torch.zeros(4, 33, dtype=torch.uint8))
    with pytest.raises(ValueError):
        codecs.get("e8-4bit", head_dim=60)
    with pytest.raises(ValueError):
        codecs.get("e8-5bit", head_dim=64)


def test_e8p_codebook_and_exact_encoder():
    """E8P: 2^16 distinct points of E8 ± ¼, encoder = brute-force argmin, 2-bit target <= 0.095."""
    from e8vllm.codecs.e8p import e8p_decode_blocks, e8p_encode_blocks, e8p_table

    table = e8p_table()
    assert table.shape == (256, 8) and (table.square().sum(1) <= 12).all()
    book = e8p_decode_blocks(torch.arange(1 << 16))
    assert torch.unique(book, dim=0).shape[0] == 1 << 16
    assert (is_member_e8(book - 0.25) | is_member_e8(book + 0.25)).all()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1500, 8, generator=g) * torch.tensor([0.5, 1.0, 2.0]).repeat(500)[:, None]
    words, err = e8p_encode_blocks(x)
    torch.testing.assert_close(err, (e8p_decode_blocks(words) - x).square().sum(1), rtol=1e-4, atol=1e-5)
    brute = torch.cdist(x.double(), book.double()).square().min(1).values
    torch.testing.assert_close(err.double(), brute, rtol=1e-4, atol=1e-5)
    u = torch.randn(20_000, 8, generator=g)
    mse = e8p_encode_blocks(u / 0.95)[1].mean().item() * 0.95 ** 2 / 8
    assert mse <= 0.095, mse
