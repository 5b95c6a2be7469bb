"""The cubic switched E8 code (``e8c-4bit``): exact fp16 Horner evaluation (against independent
per-element emulations and hand-checked values), the stored tables, the codec against ``e8s-4bit``,
and the ``cubic`` encoder variant. The exact-search tests of the encoder are in
``test_codecs_e8s.py`` (parametrized over e8c-4bit too)."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch

import e8vllm.codecs as codecs
from e8vllm.codecs import e8c, e8s
from e8vllm.codecs.uniform import cached_rotation
from e8vllm.kernels.reference import E8KVFormat, codec_names, is_switched, pair_table
from e8vllm.vllm_plugin import spec


def _fp16_struct(x: float) -> float:
    """float -> nearest fp16 (Python's own correctly rounded binary16 packing), inf on overflow."""
    try:
        return struct.unpack("<e", struct.pack("<e", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _horner_numpy(c: np.ndarray, n: int) -> float:
    """One level, independently: numpy float64 FMA (exact here), then np.float16 per step."""
    z = np.float64(n - 7)
    t = np.float64(np.float16(np.float64(c[0]) * z + np.float64(c[1])))
    t = np.float64(np.float16(t * z + np.float64(c[2])))
    return float(np.float16(t * z + np.float64(c[3])))


def _random_fp16(g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Random finite fp16 numbers over many binades (incl. subnormals), as float64."""
    m = torch.randint(-2047, 2048, shape, generator=g).double()
    e = torch.randint(-34, 5, shape, generator=g).double()
    return e8c.round_fp16(m * torch.exp2(e))


def test_round_fp16_is_one_correct_rounding() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g, dtype=torch.float64)
    x = x * torch.exp2(torch.randint(-30, 17, (20000,), generator=g).double())
    # halfway cases and just off them (where rounding through float32 first goes wrong), subnormals, overflow
    special = [1 + 2**-11, 1 + 2**-11 + 2**-40, 1 + 2**-11 - 2**-40, 3 + 3 * 2**-10 - 2**-24, 2**-25, 3 * 2**-25,
               2**-24 * 0.49, 65504.0, 65519.99, 65520.0, -65520.0, 0.0, -0.0, 6e-8, -1e-30]
    x = torch.cat([x, torch.tensor(special, dtype=torch.float64)])
    got = e8c.round_fp16(x)
    want = torch.tensor([_fp16_struct(v) for v in x.tolist()], dtype=torch.float64)
    assert torch.equal(got, want)
    assert e8c.round_fp16(torch.tensor([1 + 2**-11 + 2**-40], dtype=torch.float64)).item() == 1 + 2**-10
    assert torch.isnan(e8c.round_fp16(torch.tensor([math.nan], dtype=torch.float64))).all()


def test_horner_fp16_equals_an_independent_emulation() -> None:
    g = torch.Generator().manual_seed(1)
    coeffs = _random_fp16(g, (300, 4))
    coeffs[:100, 0] = e8c.round_fp16(coeffs[:100, 0] * 2**-8)  # small cubic terms, as in the codec
    got = e8c.horner_fp16(coeffs, torch.arange(16))
    assert got.dtype == torch.float32 and got.shape == (300, 16)
    with np.errstate(over="ignore"):
        want = torch.tensor([[_horner_numpy(c, n) for n in range(16)] for c in coeffs.numpy()], dtype=torch.float32)
    assert torch.equal(got, want)
    assert torch.equal(got.half().float(), got)  # fp16-exact


def test_horner_fp16_hand_checked() -> None:
    n = torch.arange(16)
    z = n - 7
    # integer cubic: every step exact in fp16
    got = e8c.horner_fp16(torch.tensor([1.0, 2.0, 3.0, 4.0]), n)
    assert got.tolist() == (z**3 + 2 * z**2 + 3 * z + 4).tolist()
    assert got[0] == -262 and got[15] == 668
    # z = 0 (n = 7) gives c0 exactly
    assert e8c.horner_fp16(torch.tensor([0.125, -3.5, 0.0625, 0.3330078125]), torch.tensor([7])).item() == 0.3330078125
    # last step: (1 + 2^-10) * 3 - 2^-24 = 3 + 2^-9 + 2^-10 - 2^-24: just below the midpoint of
    # 3 + 2^-9 and 3 + 2^-8, so it rounds down (rounding through float32 first would make it a tie
    # and round up to the even 3 + 2^-8)
    c = torch.tensor([0.0, 0.0, 1 + 2**-10, -(2**-24)], dtype=torch.float64)
    assert e8c.horner_fp16(c, torch.tensor([10])).item() == 3 + 2**-9
    # intermediate rounding: t = fl(2^-11 * 1 + 1) = 1 (tie to even), then 1 * 1 + 0 = 1
    assert e8c.horner_fp16(torch.tensor([2**-11, 1.0, 0.0, 0.0]), torch.tensor([8])).item() == 1.0
    # overflow -> inf
    assert e8c.horner_fp16(torch.tensor([256.0, 0.0, 0.0, 0.0]), torch.tensor([15])).item() == math.inf
    with pytest.raises(ValueError):
        e8c.horner_fp16(torch.tensor([0.1, 0.0, 0.0, 0.0], dtype=torch.float64), n)  # 0.1 is no fp16 number
    with pytest.raises(ValueError):
        e8c.horner_fp16(torch.tensor([1.0, 0.0, 0.0]), n)
    with pytest.raises(ValueError):
        e8c.horner_fp16(torch.tensor([1.0, 0.0, 0.0, 0.0]), n.double())


def test_stored_tables() -> None:
    poly = e8c.cubic_poly()
    assert poly.dtype == torch.float16 and poly.shape == (2, 2, 4)
    entry = json.loads(e8c.TABLES_PATH.read_text())["e8c-4"]
    assert entry["kind"] == "e8c" and entry["bits"] == 4
    assert torch.equal(poly.double(), torch.tensor(entry["poly"], dtype=torch.float64))
    levels = e8c.horner_fp16(poly, torch.arange(16))
    assert torch.equal(levels, torch.tensor(entry["levels"], dtype=torch.float32))
    assert torch.equal(e8c.cubic_code().table(), levels)
    assert bool((levels[..., 1:] > levels[..., :-1]).all())  # strictly increasing
    # near the e8s-4 tables it was started from (measured: inner levels moved by at most 0.16, the
    # rarely used outermost ones by up to 0.26)
    diff = (levels - e8s.switched_code(4).table()).abs()
    assert diff[..., 1:-1].max().item() < 0.2 and diff.max().item() < 0.3
    for code in e8c.cubic_code().codes:
        assert code.parity == (True, True) and torch.equal(code.main, code.last)


def test_loading_checks_the_levels(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = json.loads(e8c.TABLES_PATH.read_text())
    data["e8c-4"]["levels"][1][0][3] += 2**-10
    bad = tmp_path / "e8c_tables.json"
    bad.write_text(json.dumps(data))
    monkeypatch.setattr(e8c, "TABLES_PATH", bad)
    e8c._loaded.cache_clear()
    try:
        with pytest.raises(ValueError, match="differ"):
            e8c.cubic_code()
        data["e8c-4"]["poly"][0][1] = [0.0, 0.0, 0.0, 1.0]  # constant: not increasing
        bad.write_text(json.dumps(data))
        e8c._loaded.cache_clear()
        with pytest.raises(ValueError, match="increasing"):
            e8c.cubic_code()
    finally:
        monkeypatch.undo()
        e8c._loaded.cache_clear()
    assert e8c.cubic_code().bits == 4


def test_fit_cubic() -> None:
    n = torch.arange(16)
    # dyadic coefficients whose fp16 Horner steps are all exact: the target is a real cubic, recovered exactly
    p = torch.tensor([2**-6, -(2**-5), 0.25, -0.125], dtype=torch.float64)
    target = e8c.horner_fp16(p, n).double()
    z = (n - 7).double()
    assert torch.equal(target, ((p[0] * z + p[1]) * z + p[2]) * z + p[3])
    assert torch.equal(e8c.fit_cubic(target), p)
    # a table of the codec's kind (fp16-rounded steps): refitted to within a few fp16 ulps
    q = e8c.round_fp16(torch.tensor([0.0013, -0.002, 0.21, -0.19], dtype=torch.float64))
    target = e8c.horner_fp16(q, n).double()
    assert (e8c.horner_fp16(e8c.fit_cubic(target), n).double() - target).abs().max().item() <= 2**-8
    # weights: a level with weight 0 does not pull the fit
    w = torch.ones(16, dtype=torch.float64)
    w[3] = 0.0
    bumped = target.clone()
    bumped[3] += 1.0
    assert torch.equal(e8c.fit_cubic(bumped, w), e8c.fit_cubic(target, w))
    with pytest.raises(ValueError):
        e8c.fit_cubic(target, torch.tensor([1.0, 1.0, 1.0] + [0.0] * 13))
    with pytest.raises(ValueError):
        e8c.fit_cubic(target[:8])


def test_training_is_deterministic_and_improves() -> None:
    a = e8c.train_cubic(n_vectors=400, iters=3, seed=5)
    b = e8c.train_cubic(n_vectors=400, iters=3, seed=5)
    assert a == b
    h = a["train"]["snr_db_per_iter"]
    assert len(h) == 4 and a["train"]["best_snr_db"] == max(h) and max(h) > h[0]
    lv = torch.tensor(a["levels"])
    assert torch.equal(e8c.horner_fp16(torch.tensor(a["poly"]), torch.arange(16)), lv)
    with pytest.raises(ValueError):
        e8c.train_cubic(3)


def test_codec_identity_and_format() -> None:
    c = codecs.get("e8c-4bit", head_dim=64)
    assert isinstance(c, e8c.E8CubicCodec) and isinstance(c, e8s.E8SwitchedCodec)
    assert c.name == "e8c-4bit" and c.codec_id == 174 and codecs.name_of(174) == "e8c-4bit"
    assert codecs.info("e8c-4bit").family == "e8" and codecs.info("e8c-4bit").nominal_bits == 4.0
    assert c.code_bytes == codecs.get("e8s-4bit", head_dim=64).code_bytes == 34
    assert torch.equal(c.poly, e8c.cubic_poly()) and c.poly.dtype == torch.float16
    assert c.decode_cost.table_bytes == 32 and "FMA" in c.decode_cost.note
    with pytest.raises(ValueError):
        e8c.E8CubicCodec(head_dim=64, bits=3)
    with pytest.raises(ValueError):
        codecs.get("e8c-4bit", head_dim=60)
    # the e8s-4bit format and pipeline with the cubic tables
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(2))
    rot = cached_rotation(64, 0)
    f, sw, ex = c.encode_rotated(rot.forward(x))
    codes = c.encode(x)
    assert torch.equal(codes[:, -2].long(), sw) and torch.equal(codes[:, -1].long(), ex)
    want = rot.inverse(e8s.decode_switched(e8c.cubic_code(), f, sw, ex))
    torch.testing.assert_close(c.decode(codes), want, rtol=0, atol=0)
    assert not torch.equal(c.decode(codes), codecs.get("e8s-4bit", head_dim=64).decode(codes))  # other tables


@pytest.mark.parametrize("d", [64, 128])
def test_snr_matches_e8s(d: int) -> None:
    """Measured (e8c vs e8s, 20,000 vectors): 23.347 vs 23.345 dB (D = 64), 22.711 vs 22.711 dB (D = 128)."""
    x = torch.randn(4000, d, generator=torch.Generator().manual_seed(11))

    def snr(name: str) -> float:
        c = codecs.get(name, head_dim=d)
        return 10 * math.log10(x.square().sum().item() / (x - c.decode(c.encode(x))).square().sum().item())

    s, c = snr("e8s-4bit"), snr("e8c-4bit")
    assert c > s - 0.1, (s, c)
    assert c > (23.1 if d == 64 else 22.5)


def test_kernel_helpers_see_a_switched_code() -> None:
    c = codecs.get("e8c-4bit", head_dim=128)
    assert is_switched(c)
    pairs = pair_table(c)
    assert pairs is not None and pairs.shape == (2 * 2 * 256, 2)
    t = c.code.table()
    assert torch.equal(pairs[(1 * 2 + 0) * 256 + (5 << 4 | 9)], torch.stack([t[1, 0, 9], t[1, 0, 5]]))
    fmt = E8KVFormat(128, c, codecs.get("e8s-3bit", head_dim=128))
    assert fmt.pair_decoded
    x = torch.randn(7, 2, 128)
    slots = fmt.encode_kv(x, x)
    ck, _cv = fmt.split_slots(slots)
    assert torch.equal(ck, c.encode(x.reshape(-1, 128)).reshape(7, 2, -1))


def test_cubic_encoder_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default ("cubic-keys", session 14) puts e8c-4bit in 4-bit keys only, E8VLLM_ENCODER=cubic in
    every 4-bit field (session 13: e8c-4bit values cost +0.79 % SmolLM2 perplexity, README "Quality"),
    "switched" e8s-{b}bit everywhere."""
    assert codec_names(4, 3, "cubic") == ("e8c-4bit", "e8s-3bit")
    assert codec_names(4, 4, "cubic") == ("e8c-4bit", "e8c-4bit")
    assert codec_names(3, 2, "cubic") == ("e8s-3bit", "e8s-2bit")
    assert codec_names(4, 4, "cubic-keys") == ("e8c-4bit", "e8s-4bit")
    assert codec_names(3, 3, "cubic-keys") == ("e8s-3bit", "e8s-3bit")
    for variant in ("", "cubic-keys"):
        assert codec_names(4, 4, variant) == ("e8c-4bit", "e8s-4bit")
        assert codec_names(3, 4, variant) == ("e8s-3bit", "e8s-4bit")
    assert codec_names(4, 4, "switched") == ("e8s-4bit", "e8s-4bit")
    monkeypatch.setenv(spec.ENCODER_ENV, "cubic")
    assert spec.encoder_variant() == "cubic"
    fmt = spec.kv_format("e8_k4v3", 64)
    assert (fmt.k_codec.name, fmt.v_codec.name) == ("e8c-4bit", "e8s-3bit")
    assert fmt.pair_decoded
    assert fmt.slot_bytes == spec.slot_bytes("e8_k4v3", 64) == 34 + 26
    monkeypatch.setenv(spec.ENCODER_ENV, "switched")
    assert spec.encoder_variant() == "switched"
    assert spec.kv_format("e8_k4v4", 64).k_codec.name == "e8s-4bit"
    monkeypatch.setenv(spec.ENCODER_ENV, "cubic-keys")
    assert spec.encoder_variant() == ""
    monkeypatch.delenv(spec.ENCODER_ENV)
    assert spec.encoder_variant() == ""
    assert spec.kv_format("e8_k4v4", 64).k_codec.name == "e8c-4bit"
    monkeypatch.setenv(spec.ENCODER_ENV, "nope")
    with pytest.raises(ValueError, match="cubic-keys, switched, cubic, search, rms"):
        spec.encoder_variant()
