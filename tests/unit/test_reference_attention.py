"""The packed-cache kernels of e8vllm.kernels.reference: write path and paged attention.

paged_attention (vectorized, rotated domain) is compared with reference_attention (float64,
loops, codec.decode); both read the same codes, so they must agree to float32 rounding:
max |diff| <= 1e-4 * max|out| + 1e-5. Every test runs with both decode paths on CPU: the fused
numba kernel (e8vllm.kernels.cpu_decode, the default) and the PyTorch one (E8VLLM_CPU_DECODE=torch).
"""

from __future__ import annotations

import random

import pytest
import torch

import e8vllm.codecs as codecs
from e8vllm.codecs.base import pack_bits, unpack_bits
from e8vllm.kernels import reference as ref
from e8vllm.kernels.reference import (E8KVFormat, check_cache_layout, fast_e8_encode, gather_dequantized,
                                      pack_fields, paged_attention, reference_attention, unpack_fields,
                                      write_kv_cache)

if "e8-4bit" not in codecs.names():  # pragma: no cover - tables not generated
    pytest.skip("e8 codecs are not registered (no trained tables)", allow_module_level=True)

D = 64


@pytest.fixture(autouse=True, params=["numba", "torch"])
def decode_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    from e8vllm.kernels import cpu_decode

    if request.param == "numba" and cpu_decode.numba is None:
        pytest.skip("numba not installed")
    monkeypatch.setenv(cpu_decode.ENV, request.param)
    return request.param


@pytest.fixture(scope="module")
def fmt44() -> E8KVFormat:
    return E8KVFormat.from_bits(D, 4, 4)


@pytest.fixture(scope="module")
def fmt32() -> E8KVFormat:
    return E8KVFormat.from_bits(D, 3, 2)


def _close(out: torch.Tensor, want: torch.Tensor) -> None:
    diff = (out.double() - want.double()).abs().max().item()
    tol = 1e-4 * want.abs().max().item() + 1e-5
    assert diff <= tol, f"max abs diff {diff:.3g} > {tol:.3g}"


class Batch:
    """A paged cache holding several sequences (shuffled, non-contiguous blocks) and a query batch."""

    def __init__(self, fmt: E8KVFormat, seqs: list[tuple[int, int]], *, h_kv: int = 3, h_q: int = 9,
                 block_size: int = 16, seed: int = 0, shared_prefix_blocks: int = 0,
                 dtype: torch.dtype = torch.float32) -> None:
        """seqs: (seq_len L, query_len n) per sequence; n <= L (the last n tokens are queries)."""
        g = torch.Generator().manual_seed(seed)
        rnd = random.Random(seed)
        need = sum(-(-L // block_size) for L, _ in seqs) + 4
        self.num_blocks = need
        self.block_size = block_size
        self.cache = torch.zeros(need, h_kv, block_size, fmt.slot_bytes, dtype=torch.uint8)
        perm = list(range(need))
        rnd.shuffle(perm)
        max_blocks = max(-(-L // block_size) for L, _ in seqs) + 2
        # unused block-table entries hold garbage block ids: must never be read
        self.block_table = torch.tensor([[rnd.randrange(need) for _ in range(max_blocks)] for _ in seqs],
                                        dtype=torch.int32)
        p = 0
        for i, (L, _n) in enumerate(seqs):
            for j in range(-(-L // block_size)):
                if i > 0 and j < shared_prefix_blocks:
                    self.block_table[i, j] = self.block_table[0, j]  # prefix caching: shared block
                else:
                    self.block_table[i, j] = perm[p]
                    p += 1
        self.keys, self.values = [], []
        d = fmt.head_size
        for i, (L, _n) in enumerate(seqs):
            k = torch.randn(L, h_kv, d, generator=g) * 2.0
            k[:, :, 3] += 8.0  # an outlier channel, as real keys have
            v = torch.randn(L, h_kv, d, generator=g)
            if i > 0 and shared_prefix_blocks:
                s = min(L, shared_prefix_blocks * block_size)
                k[:s], v[:s] = self.keys[0][:s], self.values[0][:s]
            self.keys.append(k)
            self.values.append(v)
            write_kv_cache(k.to(dtype), v.to(dtype), self.cache, self.slots(i, torch.arange(L)), fmt)
        qlens = [n for _, n in seqs]
        self.query_start_loc = torch.tensor([0] + torch.cumsum(torch.tensor(qlens), 0).tolist(),
                                            dtype=torch.int32)
        self.seq_lens = torch.tensor([L for L, _ in seqs], dtype=torch.int32)
        self.query = (torch.randn(sum(qlens), h_q, d, generator=g) * 1.5).to(dtype)

    def slots(self, i: int, pos: torch.Tensor) -> torch.Tensor:
        bs = self.block_size
        return self.block_table[i, pos // bs].long() * bs + pos % bs

    def run(self, fmt: E8KVFormat, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
        args = (self.query, self.cache, self.query_start_loc, self.seq_lens, self.block_table, fmt)
        return paged_attention(*args, **kw), reference_attention(*args, scale=kw.get("scale"))


# --------------------------------------------------------------------------- attention
@pytest.mark.parametrize("seqs", [
    [(37, 37)],                                   # prefill, L not a multiple of the block size
    [(50, 13)],                                   # chunked prefill: chunk attends to 37 cached tokens
    [(1, 1), (17, 1), (33, 1), (64, 1)],          # decode batch (incl. a 1-token sequence)
    [(40, 40), (70, 1), (25, 10), (5, 1), (33, 1)],  # mixed batch
])
def test_paged_matches_reference(fmt44: E8KVFormat, seqs: list[tuple[int, int]]) -> None:
    out, want = Batch(fmt44, seqs).run(fmt44)
    _close(out, want)


@pytest.mark.parametrize("h_kv,h_q", [(3, 9), (2, 2), (1, 8), (4, 8)])
def test_gqa_mqa_mha(fmt32: E8KVFormat, h_kv: int, h_q: int) -> None:
    out, want = Batch(fmt32, [(30, 30), (45, 1), (20, 7)], h_kv=h_kv, h_q=h_q, seed=1).run(fmt32)
    _close(out, want)


@pytest.mark.parametrize("bits", [(4, 4), (3, 3), (2, 2), (4, 2), (4, 3), (3, 2)])
def test_all_dtype_bit_pairs(bits: tuple[int, int]) -> None:
    fmt = E8KVFormat.from_bits(D, *bits)
    out, want = Batch(fmt, [(23, 23), (50, 1), (40, 9)], seed=2).run(fmt)
    _close(out, want)


def test_block_size_128_and_shared_prefix_blocks(fmt44: E8KVFormat) -> None:
    """vLLM CPU's default block size; two sequences share their first block (prefix caching)."""
    b = Batch(fmt44, [(150, 150), (140, 1), (200, 20)], block_size=128, shared_prefix_blocks=1, seed=3)
    out, want = b.run(fmt44)
    _close(out, want)


def test_scale_argument_and_bf16_io(fmt44: E8KVFormat) -> None:
    b = Batch(fmt44, [(30, 30), (31, 1)], dtype=torch.bfloat16, seed=4)
    out = torch.full((b.query.shape[0] + 3, 9, D), 7.0, dtype=torch.bfloat16)  # padded rows
    paged_attention(b.query, b.cache, b.query_start_loc, b.seq_lens, b.block_table, fmt44,
                    scale=0.3, out=out)
    want = reference_attention(b.query, b.cache, b.query_start_loc, b.seq_lens, b.block_table, fmt44,
                               scale=0.3)
    t = b.query.shape[0]
    diff = (out[:t].double() - want).abs().max().item()
    assert diff <= 1e-2 * want.abs().max().item()  # bf16 output rounding
    assert torch.all(out[t:] == 7.0)  # rows past the batch untouched


def test_chunking_paths(fmt44: E8KVFormat, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny memory budget forces query-chunked prefill and several decode groups."""
    monkeypatch.setattr(ref, "SCORE_BUDGET", 4096)
    out, want = Batch(fmt44, [(60, 60), (12, 1), (70, 1), (33, 1), (50, 5)], seed=5).run(fmt44)
    _close(out, want)


def test_causality(fmt44: E8KVFormat) -> None:
    """Changing cache entries after a query's position does not change its output."""
    b = Batch(fmt44, [(40, 40)], seed=6)
    out1 = paged_attention(b.query, b.cache, b.query_start_loc, b.seq_lens, b.block_table, fmt44)
    late = b.slots(0, torch.arange(30, 40))
    write_kv_cache(torch.randn(10, 3, D) * 5, torch.randn(10, 3, D) * 5, b.cache, late, fmt44)
    out2 = paged_attention(b.query, b.cache, b.query_start_loc, b.seq_lens, b.block_table, fmt44)
    assert torch.equal(out1[:30], out2[:30])
    assert not torch.equal(out1[30:], out2[30:])


def test_rejects_more_queries_than_tokens(fmt44: E8KVFormat) -> None:
    b = Batch(fmt44, [(10, 10)])
    with pytest.raises(ValueError, match="query tokens"):
        paged_attention(b.query, b.cache, b.query_start_loc, torch.tensor([5], dtype=torch.int32),
                        b.block_table, fmt44)


# --------------------------------------------------------------------------- write path
def test_write_skips_negative_slots(fmt44: E8KVFormat) -> None:
    cache = torch.randint(0, 256, (6, 3, 16, fmt44.slot_bytes), dtype=torch.uint8)
    before = cache.clone()
    k, v = torch.randn(5, 3, D), torch.randn(5, 3, D)
    slots = torch.tensor([-1, 17, -1, 40, -1])
    write_kv_cache(k, v, cache, slots, fmt44)
    changed = (cache != before).flatten(1, 3).any(1)  # per block
    written = {17 // 16: 17 % 16, 40 // 16: 40 % 16}
    for blk in range(6):
        for off in range(16):
            same = torch.equal(cache[blk, :, off], before[blk, :, off])
            assert same == (written.get(blk) != off), (blk, off)
    assert changed.sum() == 2
    # all -1: untouched
    write_kv_cache(k, v, cache, torch.full((5,), -1), fmt44)
    assert torch.equal(cache[0], before[0])


def test_write_survives_nonfinite_kv(fmt44: E8KVFormat, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """NaN/Inf K/V (a model overflow) must not raise inside the engine's forward (that kills the engine
    for every request): they are stored as 0 / +-65504 with one warning; finite rows are unaffected."""
    import e8vllm.kernels.reference as ref

    monkeypatch.setattr(ref, "_NONFINITE_WARNED", [False])
    k, v = torch.randn(4, 3, D), torch.randn(4, 3, D)
    want = torch.zeros(2, 3, 16, fmt44.slot_bytes, dtype=torch.uint8)
    slots = torch.tensor([0, 1, 2, 3])
    fixed_k, fixed_v = k.clone(), v.clone()
    k[1, 0, 3], k[2, 1, 0], v[3, 2, 7] = float("nan"), float("inf"), float("-inf")
    fixed_k[1, 0, 3], fixed_k[2, 1, 0], fixed_v[3, 2, 7] = 0.0, 65504.0, -65504.0
    write_kv_cache(fixed_k, fixed_v, want, slots, fmt44)
    got = torch.zeros_like(want)
    with caplog.at_level("WARNING", logger="e8vllm.kernels"):
        write_kv_cache(k, v, got, slots, fmt44)
        write_kv_cache(k, v, got, slots, fmt44)
    assert torch.equal(got, want)
    assert caplog.text.count("NaN/Inf") == 1
    with pytest.raises(ValueError, match="NaN or Inf"):  # the codec API itself still refuses them
        fmt44.k_codec.encode(k.reshape(-1, D))


@pytest.mark.parametrize("fast_max", [1024, 0])  # batched-search encoder / the codec's own
def test_write_then_decode_is_codec_roundtrip(fmt32: E8KVFormat, fast_max: int,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Cache codes are codec.encode(x) bit for bit; reading back gives codec.decode of them."""
    monkeypatch.setattr(ref, "FAST_ENCODE_MAX", fast_max)
    g = torch.Generator().manual_seed(7)
    k, v = torch.randn(20, 3, D, generator=g), torch.randn(20, 3, D, generator=g)
    cache = torch.zeros(4, 3, 16, fmt32.slot_bytes, dtype=torch.uint8)
    block_row = torch.tensor([2, 0], dtype=torch.int32)
    pos = torch.arange(20)
    slots = block_row[pos // 16].long() * 16 + pos % 16
    write_kv_cache(k, v, cache, slots, fmt32)
    ck = fmt32.k_codec.encode(k.reshape(-1, D))
    cv = fmt32.v_codec.encode(v.reshape(-1, D))
    got = cache[slots // 16, :, slots % 16].reshape(60, -1)
    assert torch.equal(got, fmt32.join_codes(ck, cv))
    gk, gv = fmt32.split_slots(got)
    assert torch.equal(gk, ck) and torch.equal(gv, cv)
    # layout: [K fields | V fields | K scale | V scale], the scales are the codes' last 2 bytes
    nk, nv = fmt32.k_bytes - 2, fmt32.v_bytes - 2
    assert torch.equal(got[:, :nk], ck[:, :nk]) and torch.equal(got[:, nk:nk + nv], cv[:, :nv])
    assert torch.equal(got[:, nk + nv:nk + nv + 2], ck[:, nk:]) and torch.equal(got[:, nk + nv + 2:], cv[:, nv:])
    kd, vd = gather_dequantized(cache, block_row, 20, fmt32)
    assert torch.equal(kd.reshape(60, D), fmt32.k_codec.decode(ck))
    assert torch.equal(vd.reshape(60, D), fmt32.v_codec.decode(cv))
    # rotated-domain decode = R (codec.decode)
    kr = fmt32.decode_k_rotated(gk)
    kr2, vr2 = fmt32.decode_kv_rotated(got)
    assert torch.equal(kr2, kr) and torch.equal(vr2, fmt32.decode_v_rotated(gv))
    torch.testing.assert_close(fmt32.k_rotation.inverse(kr), fmt32.k_codec.decode(ck), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_fields_matches_base(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    packed = torch.randint(0, 256, (33, D * bits // 8), generator=g, dtype=torch.uint8)
    assert torch.equal(unpack_fields(packed, bits), unpack_bits(packed, bits, D))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_fields_matches_base(bits: int) -> None:
    g = torch.Generator().manual_seed(10 + bits)
    fields = torch.randint(0, 1 << bits, (17, D), generator=g)
    assert torch.equal(pack_fields(fields, bits), pack_bits(fields, bits))


@pytest.mark.parametrize("name", ["e8-2bit", "e8-3bit", "e8-4bit", "e8-4bit-rms", "e8-2bit-rms"])
def test_fast_encoder_is_bit_exact(name: str) -> None:
    """The batched scale search writes exactly the codec's codes (the engine relies on it)."""
    c = codecs.get(name, head_dim=D)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(400, D, generator=g) * torch.rand(400, 1, generator=g) * 5
    x[:50, 7] *= 25.0
    x[50:60] = 0.0
    x[60:70] *= 1e-4
    assert torch.equal(fast_e8_encode(c, x), c.encode(x))
    assert torch.equal(fast_e8_encode(c, x.to(torch.bfloat16)), c.encode(x.to(torch.bfloat16)))


def test_formats_use_fast_encoder(fmt44: E8KVFormat, fmt32: E8KVFormat) -> None:
    # e8c keys + e8s values (the default) encode through their codec (compiled on CPU); the e8-* formats batch
    # the search
    assert fmt44.uses_fast_encoder == (False, False) and (fmt44.k_codec.name, fmt44.v_codec.name) == ("e8c-4bit",
                                                                                                     "e8s-4bit")
    assert E8KVFormat.from_bits(64, 4, 4, "switched").uses_fast_encoder == (False, False)
    assert E8KVFormat.from_bits(64, 4, 4, "cubic").uses_fast_encoder == (False, False)
    assert E8KVFormat.from_bits(64, 4, 4, "search").uses_fast_encoder == (True, True)
    assert E8KVFormat.from_bits(64, 3, 2, "rms").uses_fast_encoder == (True, True)


def test_check_cache_layout(fmt44: E8KVFormat) -> None:
    check_cache_layout(torch.zeros(2, 3, 16, 68, dtype=torch.uint8), 3, fmt44)
    with pytest.raises(RuntimeError, match="page layout mismatch"):
        check_cache_layout(torch.zeros(2, 3, 16, 128, dtype=torch.uint8), 3, fmt44)
    with pytest.raises(RuntimeError, match="page layout mismatch"):
        check_cache_layout(torch.zeros(2, 3, 16, 68, dtype=torch.bfloat16), 3, fmt44)


def test_slot_bytes(fmt44: E8KVFormat, fmt32: E8KVFormat) -> None:
    assert fmt44.slot_bytes == 68  # 34 + 34: 3.76x less than bf16's 256 at head size 64
    assert fmt32.slot_bytes == 26 + 18


@pytest.mark.parametrize("variant", ["", "switched", "search"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("head", [64, 128])
def test_pair_decode_matches_codec_decode(bits: int, head: int, variant: str) -> None:
    """The pair-table decode gives the codec's own rotated decode bit for bit (every field byte
    pattern, both cosets, either parity, both table sets of e8s / e8c), and the formats use it (K
    and V with their own codecs: e8c-4bit keys and e8s-4bit values by default)."""
    from e8vllm.kernels.reference import _rotated_decode, decode_tail, fast_e8_decode_rotated, pair_table

    fmt = E8KVFormat.from_bits(head, bits, bits, variant)
    codec = fmt.k_codec
    pairs = pair_table(codec)
    assert pairs is not None and torch.equal(fmt._pairs[0], pairs)
    g = torch.Generator().manual_seed(bits * 1000 + head)
    nb = head * bits // 8
    fb = torch.randint(0, 256, (2000, nb), generator=g, dtype=torch.uint8)
    if variant != "search":  # switch byte, exponent byte
        tail = torch.randint(0, 256, (2000, 2), generator=g, dtype=torch.uint8)
    else:  # fp16 scale
        tail = (torch.rand(2000, generator=g) * 4.0).half().view(torch.uint8).reshape(-1, 2)
    ref = _rotated_decode(codec, bits, fb, tail)
    scale, switch = decode_tail(codec, tail)
    assert (switch is None) == (variant == "search")
    assert torch.equal(fast_e8_decode_rotated(pairs, bits, fb, scale, switch, max(1, head // 64)), ref)
    # and through the format: slots with these K and V fields decode to the same vectors
    slots = fmt.join_codes(torch.cat([fb, tail], 1), torch.cat([fb.flip(0), tail.flip(0)], 1))
    k, v = fmt.decode_kv_rotated(slots)
    assert torch.equal(k, ref)
    assert torch.equal(v, _rotated_decode(fmt.v_codec, bits, fb.flip(0), tail.flip(0)))
    # the codec's decode_rotated is its decode without the inverse rotation
    codes = torch.cat([fb[:50], tail[:50]], 1)
    assert torch.allclose(codec.decode(codes), fmt.k_rotation.inverse(ref[:50]), atol=1e-5)


def test_pair_decode_only_for_plain_e8_codes() -> None:
    """Relaxed-parity and non-E8 codecs have no pair table (the generic decode serves them)."""
    import e8vllm.codecs as codecs
    from e8vllm.kernels.reference import pair_table

    assert pair_table(codecs.get("d8half-4bit", head_dim=64)) is None
    assert pair_table(codecs.get("int4-sym-rot", head_dim=64)) is None
    assert pair_table(codecs.get("e8-4bit", head_dim=64)) is not None
    assert pair_table(codecs.get("e8s-4bit", head_dim=64)).shape == (2 * 2 * 256, 2)
