"""The fused CPU decode attention (e8vllm.kernels.cpu_decode) against the float64 reference.

Both read the same codes and the fused path decodes them with the same table lookups, so the only
difference is float32 summation order: the tolerance is the one test_reference_attention uses for
the PyTorch path, max |diff| <= 1e-4 * max|out| + 1e-5 (the PyTorch path itself is checked here
with it too). A spy checks that decode rows really took the fused path (and prefill rows did not)."""

from __future__ import annotations

import pytest
import torch

import e8vllm.codecs as codecs
from e8vllm.kernels import cpu_decode
from e8vllm.kernels import reference as ref
from e8vllm.kernels.reference import E8KVFormat, KeyBias, paged_attention, reference_attention

from test_reference_attention import Batch, _close  # tests/unit is on sys.path (rootdir-relative modules)

if "e8s-4bit" not in codecs.names():  # pragma: no cover - tables not generated
    pytest.skip("e8 codecs are not registered (no trained tables)", allow_module_level=True)
pytestmark = pytest.mark.skipif(cpu_decode.numba is None, reason="numba not installed")


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Decode rows handed to the fused kernel, per call."""
    calls: list[int] = []
    real = cpu_decode.decode_attention

    def wrapped(q, kv_cache, block_table, rows, *a, **kw):  # noqa: ANN001, ANN002, ANN003
        calls.append(int(rows.numel()))
        return real(q, kv_cache, block_table, rows, *a, **kw)

    monkeypatch.setattr(cpu_decode, "decode_attention", wrapped)
    monkeypatch.delenv(cpu_decode.ENV, raising=False)
    return calls


def _key_bias(b: Batch, seed: int = 0) -> KeyBias:
    """Random position-dependent key-center terms (RoPE table of every position + a sink term)."""
    from e8vllm.calibration import rope_bias_coeffs, rope_table

    g = torch.Generator().manual_seed(seed)
    h_q, d = b.query.shape[1], b.query.shape[2]
    mu = torch.randn(h_q, d, generator=g) * 2.0
    inv_freq = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    trig = rope_table(inv_freq, 1.0, torch.arange(int(b.seq_lens.max()) + 3))
    first = (b.query.float() * torch.randn(h_q, d, generator=g)).sum(-1) * 0.5
    return KeyBias(rope_bias_coeffs(b.query, mu), trig, first)


@pytest.mark.parametrize("variant", ["", "search"])  # e8s (switch byte + exponent) / e8 (fp16 scale)
@pytest.mark.parametrize("head", [64, 128])
@pytest.mark.parametrize("bits", [(4, 4), (3, 3), (2, 2), (4, 2), (3, 2)])
def test_decode_batch_matches_reference(spy: list[int], bits: tuple[int, int], head: int, variant: str) -> None:
    fmt = E8KVFormat.from_bits(head, *bits, variant)
    assert cpu_decode.supported(fmt)
    b = Batch(fmt, [(1, 1), (17, 1), (40, 1), (129, 1)], seed=bits[0] * 10 + bits[1])
    out, want = b.run(fmt)
    _close(out, want)
    assert spy == [4]


@pytest.mark.parametrize("h_kv,h_q", [(3, 9), (2, 2), (1, 8), (4, 8)])
def test_mixed_batch_gqa(spy: list[int], h_kv: int, h_q: int) -> None:
    """Decode rows fused, prefill / chunked-prefill rows through SDPA, in one call."""
    fmt = E8KVFormat.from_bits(64, 4, 4)
    out, want = Batch(fmt, [(40, 40), (70, 1), (25, 10), (5, 1), (33, 1)], h_kv=h_kv, h_q=h_q, seed=7).run(fmt)
    _close(out, want)
    assert spy == [3]


def test_prefill_only_batch_skips_the_fused_kernel(spy: list[int]) -> None:
    fmt = E8KVFormat.from_bits(64, 4, 4)
    out, want = Batch(fmt, [(30, 30), (20, 4)], seed=8).run(fmt)
    _close(out, want)
    assert spy == []


@pytest.mark.parametrize("path", ["numba", "torch"])
@pytest.mark.parametrize("parts", ["coef+first", "first", "coef"])
def test_key_bias(spy: list[int], parts: str, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode rows (fused, or the PyTorch path's batched SDPA) and prefill / chunked-prefill rows,
    the terms as extra SDPA columns."""
    monkeypatch.setenv(cpu_decode.ENV, path)
    fmt = E8KVFormat.from_bits(64, 3, 3)
    b = Batch(fmt, [(50, 1), (64, 1), (33, 5), (41, 41)], block_size=16, seed=9)
    kb = _key_bias(b)
    if parts == "first":
        kb = KeyBias(None, None, kb.first)
    elif parts == "coef":
        kb = KeyBias(kb.coef, kb.table, None)
    args = (b.query, b.cache, b.query_start_loc, b.seq_lens, b.block_table, fmt)
    out = paged_attention(*args, key_bias=kb, scale=0.2)
    want = reference_attention(*args, key_bias=kb, scale=0.2)
    _close(out, want)
    assert spy == ([2] if path == "numba" else [])  # the two decode rows, fused only on the numba path


def test_fused_equals_pytorch_path(spy: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """The switch selects the PyTorch path; both agree within float32 rounding."""
    fmt = E8KVFormat.from_bits(64, 4, 4)
    b = Batch(fmt, [(300, 1), (77, 1), (128, 1)], block_size=128, seed=10)
    args = (b.query, b.cache, b.query_start_loc, b.seq_lens, b.block_table, fmt)
    fused = paged_attention(*args)
    monkeypatch.setenv(cpu_decode.ENV, "torch")
    assert not cpu_decode.available()
    torch_path = paged_attention(*args)
    assert spy == [3]  # the second call did not use the fused kernel
    _close(fused, torch_path)


def test_unsupported_format_uses_pytorch_path(spy: list[int]) -> None:
    """Codecs without a pair table (here uniform INT4) stay on the PyTorch path."""
    fmt = E8KVFormat(64, codecs.get("int4-sym-rot", head_dim=64), codecs.get("int4-sym-rot", head_dim=64))
    assert not cpu_decode.supported(fmt)
    out, want = Batch(fmt, [(30, 1), (12, 1)], seed=11).run(fmt)
    _close(out, want)
    assert spy == []


def test_switch_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_decode.ENV, "fast")
    with pytest.raises(ValueError, match="E8VLLM_CPU_DECODE"):
        cpu_decode.available()


def test_cache_views_and_padding_rows(spy: list[int]) -> None:
    """A strided cache view (another layer's slice of one buffer) and output rows past the batch."""
    fmt = E8KVFormat.from_bits(64, 4, 3)
    b = Batch(fmt, [(45, 1), (9, 1)], seed=12)
    big = torch.zeros((2,) + tuple(b.cache.shape), dtype=torch.uint8)
    big[1] = b.cache
    view = big[1]
    out = torch.full((b.query.shape[0] + 2, 9, 64), 5.0)
    paged_attention(b.query, view, b.query_start_loc, b.seq_lens, b.block_table, fmt, out=out)
    want = reference_attention(b.query, b.cache, b.query_start_loc, b.seq_lens, b.block_table, fmt)
    _close(out[:2], want)
    assert torch.all(out[2:] == 5.0)
    assert spy == [2]
    assert ref._fused_decode(view, fmt)
