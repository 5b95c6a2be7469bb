"""The fused Triton E8 kernels in the Triton interpreter (CPU) against the PyTorch reference.

* write: the kernel's codes equal the reference encoder's byte for byte (same search, same
  float32 arithmetic; rotation as an IEEE dot instead of a butterfly);
* attention (general grid for mixed prefill / chunked prefill / decode batches, decode grid with and
  without KV segments; each lookup setting: pairs / pairs_l1 / values): error against the float64 ``reference_attention`` at most 4x the error of
  the same float64 computation with the kernel's fp16 operand roundings (``fp16_operand_reference``).
Small sizes (head size 64, a few hundred cached tokens) to stay fast in the interpreter.
"""

from __future__ import annotations

import os

import pytest
import torch

# Triton decides "interpreter or compiler" when it is imported: on CPU these tests run in a
# subprocess with TRITON_INTERPRET=1 (tests/unit/test_triton_cpu.py), here only where it is set.
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="run through tests/unit/test_triton_cpu.py (TRITON_INTERPRET=1)")

from e8vllm.kernels.reference import E8KVFormat, KeyBias, reference_attention, write_kv_cache  # noqa: E402
from e8vllm.kernels.triton import fp16_operand_reference, supported  # noqa: E402
from e8vllm.kernels.triton.e8_kv import triton_paged_attention, triton_write_kv_cache  # noqa: E402
from e8vllm.kernels.triton.cases import random_case  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

def _write_both(case, slots=None, block_rows=None, parallel=None, candidates=None, rotation=None, maxnreg=None):
    """The reference writer's cache and the kernel's for ``case`` (K/V not yet written)."""
    slots = case.slots if slots is None else slots
    ref = torch.zeros_like(case.kv_cache)
    write_kv_cache(case.key, case.value, ref, slots, case.fmt)
    got = torch.zeros_like(case.kv_cache).to(DEV)
    triton_write_kv_cache(case.key.to(DEV), case.value.to(DEV), got, slots.to(DEV), case.fmt, block_rows=block_rows,
                          parallel=parallel, candidates=candidates, rotation=rotation, maxnreg=maxnreg)
    return ref, got.cpu()


def test_write_rows_per_program(monkeypatch):
    """Small writes (decode steps) take E8VLLM_SMALL_WRITE_ROWS rows per program (default 1), larger
    ones 16 (the tl.dot rotation): up to 2,048 rows with butterflies, 1,023 with the 16-column
    products; 0 turns the small-write path off."""
    from e8vllm.kernels.triton import e8_kv

    assert e8_kv._small_write_rows("1") == 1 and e8_kv._small_write_rows("0") == 0
    monkeypatch.setattr(e8_kv, "SMALL_WRITE_ROWS", e8_kv._small_write_rows("1"))
    assert e8_kv.write_block_rows(64 * 8, "fwht") == e8_kv.write_block_rows(2048, "fwht") == 1
    assert e8_kv.write_block_rows(2049, "fwht") == e8_kv.write_block_rows(8192 * 8, "fwht") == 16
    assert e8_kv.write_block_rows(1023, "dot") == 1 and e8_kv.write_block_rows(1024, "dot") == 16
    monkeypatch.setattr(e8_kv, "SMALL_WRITE_ROWS", e8_kv._small_write_rows("0"))
    assert e8_kv.write_block_rows(8 * 8) == 16
    monkeypatch.setattr(e8_kv, "SMALL_WRITE_ROWS", e8_kv._small_write_rows("2"))
    assert e8_kv.write_block_rows(8 * 8, "fwht") == e8_kv.write_block_rows(2048, "fwht") == 2
    assert e8_kv.write_block_rows(2049, "fwht") == 16
    for bad in ("3", "16", "-2", "two"):
        with pytest.raises(ValueError, match="E8VLLM_SMALL_WRITE_ROWS"):
            e8_kv._small_write_rows(bad)
    with pytest.raises(ValueError, match="power of two"):
        fmt = E8KVFormat.from_bits(64, 4, 4)
        _write_both(random_case(fmt, [3], [1], h_q=4, h_kv=2, write=False), block_rows=3)
    # warps per program of small writes: by size (2 from 256 rows, else 4) unless E8VLLM_SMALL_WRITE_WARPS
    monkeypatch.setattr(e8_kv, "SMALL_WRITE_WARPS", e8_kv._small_write_warps("0"))
    assert [e8_kv.small_write_warps(n, "fwht") for n in (8, 255, 256, 1023)] == [4, 4, 2, 2]
    assert e8_kv.small_write_warps(512, "dot") == 4  # the 16-column products keep sessions 11-13's 4 warps
    monkeypatch.setattr(e8_kv, "SMALL_WRITE_WARPS", e8_kv._small_write_warps("8"))
    assert e8_kv.small_write_warps(8) == e8_kv.small_write_warps(512) == 8
    for bad in ("3", "16", "-1", "many"):
        with pytest.raises(ValueError, match="E8VLLM_SMALL_WRITE_WARPS"):
            e8_kv._small_write_warps(bad)
    with pytest.raises(ValueError, match="rotation must be 'dot' or 'fwht'"):
        _write_both(random_case(fmt, [3], [1], h_q=4, h_kv=2, write=False), rotation="matmul")
    # a register cap for small writes: by setting (128 for butterflies at 2 warps), 0 (none) or 24..255
    assert e8_kv._small_write_maxnreg("") == -1 and e8_kv._small_write_maxnreg("0") == 0
    assert e8_kv._small_write_maxnreg("128") == 128
    monkeypatch.setattr(e8_kv, "SMALL_WRITE_MAXNREG", -1)
    assert e8_kv.small_write_maxnreg(2, "fwht") == 128
    assert e8_kv.small_write_maxnreg(4, "fwht") == e8_kv.small_write_maxnreg(2, "dot") == 0
    monkeypatch.setattr(e8_kv, "SMALL_WRITE_MAXNREG", 0)
    assert e8_kv.small_write_maxnreg(2, "fwht") == 0
    for bad in ("16", "256", "-1", "lots"):
        with pytest.raises(ValueError, match="E8VLLM_SMALL_WRITE_MAXNREG"):
            e8_kv._small_write_maxnreg(bad)
    with pytest.raises(ValueError, match="maxnreg must be 0"):
        _write_both(random_case(fmt, [3], [1], h_q=4, h_kv=2, write=False), block_rows=1, maxnreg=300)
    with pytest.raises(ValueError, match="16 rows per program rotate by tl.dot"):
        _write_both(random_case(fmt, [3], [1], h_q=4, h_kv=2, write=False), block_rows=16, rotation="fwht")


@pytest.mark.parametrize("heads", [1, 2, 3, 8, 32])
@pytest.mark.parametrize("rows", ["1", "0", "2"])
def test_warm_write_tokens_cover_every_variant(heads, rows, monkeypatch):
    """The warm-up writes launch every (rows per program, warps, register cap) variant that writes of
    1 .. 3,000 tokens launch, whatever the small-write settings; a count between two variants is not
    needed, a missing one fails."""
    from e8vllm.kernels.triton import e8_kv

    for name, value in (("WRITE_ROTATION", "fwht"), ("SMALL_WRITE_WARPS", 0), ("SMALL_WRITE_MAXNREG", -1)):
        monkeypatch.setattr(e8_kv, name, value)  # the defaults, whatever this process's environment says
    monkeypatch.setattr(e8_kv, "SMALL_WRITE_ROWS", e8_kv._small_write_rows(rows))
    want = {e8_kv.write_variant(t * heads) for t in range(1, 3001)}
    counts = e8_kv.warm_write_tokens(heads, limit=3000)
    assert {e8_kv.write_variant(t * heads) for t in counts} == want
    assert len(counts) == len(want)  # one count per variant
    if rows != "0":  # 4 warps, 2 warps with the cap, 16 rows
        assert want == {(int(rows), 4, 0), (int(rows), 2, 128), (16, 8, 0)}


def test_write_launch_options(monkeypatch):
    """The launch gets the register cap of its setting (128 for a small write at 2 warps, none at 4 warps,
    none for 16 rows or with maxnreg 0); a default 16-row write ignores the small-write settings, an
    explicit one refuses them."""
    from e8vllm.kernels.triton import e8_kv

    launches = []

    class Spy:
        def __getitem__(self, grid):
            return lambda *a, **kw: launches.append((grid, kw))

    for name, value in (("WRITE_ROTATION", "fwht"), ("SMALL_WRITE_WARPS", 0), ("SMALL_WRITE_MAXNREG", -1),
                        ("SMALL_WRITE_ROWS", 1)):
        monkeypatch.setattr(e8_kv, name, value)
    monkeypatch.setattr(e8_kv, "_e8_write_kernel", Spy())
    fmt = E8KVFormat.from_bits(64, 4, 4)

    def write(t, **kw):
        kv = torch.zeros(t, 8, 64)
        triton_write_kv_cache(kv, kv, torch.zeros(1, 8, 16, fmt.slot_bytes, dtype=torch.uint8),
                              torch.full((t,), -1), fmt, **kw)
        grid, k = launches.pop()
        return grid, k["num_warps"], k.get("maxnreg", 0), k["BLOCK_R"]

    assert write(8) == ((64, 2), 4, 0, 1)  # 64 rows: 4 warps, no cap
    assert write(32) == ((256, 2), 2, 128, 1)  # 256 rows: 2 warps, capped
    assert write(32, maxnreg=0)[2] == 0 and write(32, maxnreg=96)[2] == 96
    monkeypatch.setattr(e8_kv, "SMALL_WRITE_MAXNREG", 0)
    assert write(32)[2] == 0
    assert write(257, rotation="fwht") == ((129, 2), 8, 0, 16)  # 2,056 rows: 16 per program, settings ignored
    with pytest.raises(ValueError, match="no register cap"):
        write(3, block_rows=16, maxnreg=128)


def test_warm_write_paths_writes_nothing(monkeypatch):
    """The warm-up runs the real write once per count with every slot skipped: the scratch cache stays
    zero, and a second call (same format, device, heads, dtype, block size) does nothing."""
    from e8vllm.kernels.triton import e8_kv

    calls = []
    real = e8_kv.triton_write_kv_cache

    blocks = []

    def spy(key, value, cache, slots, fmt, **kw):
        calls.append((key.shape, key.dtype, bool(torch.all(slots == -1))))
        blocks.append(cache.shape[2])
        real(key[:2], value[:2], cache, slots[:2], fmt, **kw)  # the kernel itself on two tokens (interpreter)
        assert torch.all(cache == 0)

    monkeypatch.setattr(e8_kv, "triton_write_kv_cache", spy)
    monkeypatch.setattr(e8_kv, "_WARMED", set())
    fmt = E8KVFormat.from_bits(64, 4, 4)
    counts = e8_kv.warm_write_paths(fmt, DEV, 2, 64, torch.float16)
    assert counts == e8_kv.warm_write_tokens(2) and len(calls) == len(counts)
    assert all(shape == (t, 2, 64) and dt == torch.float16 and skipped
               for (shape, dt, skipped), t in zip(calls, counts))
    assert e8_kv.warm_write_paths(fmt, DEV, 2, 64, torch.float16) == [] and len(calls) == len(counts)
    # the engine's block size (an argument the kernel specializes on) is another warm-up
    assert e8_kv.warm_write_paths(fmt, DEV, 2, 64, torch.float16, block_size=32) == counts
    assert blocks == [16] * len(counts) + [32] * len(counts)


def test_warm_attention_paths_runs_each_segment_count(monkeypatch):
    """The attention warm-up runs, per segment count the decode grid can take, a decode batch and a
    mixed batch (a prompt chunk and a decode row: the tile grid, the decode grid and the output kernel
    with both kinds of rows) through the real op (interpreter), with the float64 reference's output on
    its inputs (a zero cache: every value the decoded zero code); a second call does nothing, and
    neither does one after a failure (each layer would retry it)."""
    from e8vllm.kernels.triton import e8_kv

    calls = []
    real = e8_kv.triton_paged_attention

    def spy(q, cache, qsl, seq_lens, bt, fmt, **kw):
        out = real(q, cache, qsl, seq_lens, bt, fmt, **kw)
        ref = reference_attention(q.cpu(), cache.cpu(), qsl.cpu(), seq_lens.cpu(), bt.cpu(), fmt, scale=kw["scale"])
        ok = bool(torch.allclose(out.double().cpu(), ref, atol=2e-3)) and float(ref.abs().max()) > 0
        calls.append((kw["max_query_len"], kw["num_segs"], q.dtype, out.dtype, cache.shape[2], ok))
        return out

    monkeypatch.setattr(e8_kv, "triton_paged_attention", spy)
    monkeypatch.setattr(e8_kv, "_WARMED_ATTN", set())
    monkeypatch.setattr(e8_kv, "mixed_batch_segments", lambda *a, **k: [1, 4])  # two counts (the CPU's is one)
    fmt = E8KVFormat.from_bits(64, 4, 4)
    assert e8_kv.warm_attention_paths(fmt, DEV, 4, 2, 64, torch.float16, block_size=32) == [1, 4]
    assert calls == [(mql, segs, torch.float16, torch.float16, 32, True) for segs in (1, 4) for mql in (1, 2)]
    assert e8_kv.warm_attention_paths(fmt, DEV, 4, 2, 64, torch.float16, block_size=32) == [] and len(calls) == 4
    # without the split of decode rows a prompt batch does not use the segments: one mixed batch
    calls.clear()
    monkeypatch.setitem(e8_kv.PREFILL_CONFIG, "split_decode", 0)
    assert e8_kv.warm_attention_paths(fmt, DEV, 4, 2, 64, torch.float16) == [1, 4]
    assert [c[:2] for c in calls] == [(1, 1), (2, 1), (1, 4)]

    def fail(*a, **k):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(e8_kv, "triton_paged_attention", fail)
    with pytest.raises(RuntimeError):
        e8_kv.warm_attention_paths(fmt, DEV, 4, 2, 64, torch.float32)
    assert e8_kv.warm_attention_paths(fmt, DEV, 4, 2, 64, torch.float32) == []


def test_mixed_batch_segments_cover_the_gluon_grid(monkeypatch):
    """On an H200-sized GPU (132 SMs) the Gluon grid takes 64, 32 or 16 segments by batch size (16 one-warp
    programs per SM, at most MAX_SEGMENTS); the warm-up's list is exactly those, and on the Triton
    decode kernel the configured count alone."""
    from e8vllm.kernels.triton import e8_kv

    fmt = E8KVFormat.from_bits(128, 4, 4)
    monkeypatch.setattr(e8_kv, "_sm_count", lambda device: 132)
    monkeypatch.setattr(e8_kv, "_use_gluon", lambda *a: True)
    assert e8_kv.mixed_batch_segments(8, torch.device("cpu"), fmt) == [16, 32, 64]
    assert e8_kv.mixed_batch_segments(8, torch.device("cpu"), fmt, max_seqs=8) == [64]
    assert [e8_kv._default_segs(True, b, 8, torch.device("cpu"), e8_kv.DECODE_CONFIG) for b in (1, 8, 9, 16, 17)] \
        == [64, 64, 32, 32, 16]
    monkeypatch.setattr(e8_kv, "_use_gluon", lambda *a: False)
    assert e8_kv.mixed_batch_segments(8, torch.device("cpu"), fmt) == [e8_kv.DECODE_CONFIG["segs"]]


_WRITE_PATHS = {"two-rows-parallel-scales": (2, True, None, "dot"), "two-rows-scale-loop": (2, None, None, "dot"),
                "one-row-parallel-scales": (1, None, None, "dot"), "one-row-parallel-scales-ceil": (1, None, "ceil", "dot"),
                "dot-path": (16, None, None, None), "one-row-butterflies": (1, None, None, "fwht"),
                "two-rows-butterflies": (2, None, None, "fwht")}
_WRITE_CASES = [(b, v, p) for b, v in (((4, 4), ""), ((3, 2), ""), ((4, 4), "search")) for p in list(_WRITE_PATHS)[:5]]
_WRITE_CASES += [(b, "", p) for b in ((4, 4), (3, 2)) for p in ("one-row-butterflies", "two-rows-butterflies")]
_WRITE_CASES += [((4, 4), "cubic-keys", "one-row-parallel-scales")]


@pytest.mark.parametrize("bits,variant,block_rows,parallel,candidates,rotation",
                         [(b, v, *_WRITE_PATHS[p]) for b, v, p in _WRITE_CASES],
                         ids=[f"k{b[0]}v{b[1]}{'-' + v if v else ''}-{p}" for b, v, p in _WRITE_CASES])
def test_write_matches_reference_codes(bits, variant, block_rows, parallel, candidates, rotation, one_thread):
    """Every write path gives the reference's codes: 16 rows per program (tl.dot rotation, scale
    candidates in a loop), 2 or 1 rows (16-column rotation products, or butterflies in the
    reference's order) with the candidates side by side (1 row: the small-write default; the first 8
    of 9 side by side and the 9th after them, or all 9 padded to 16 with ``ceil``) or in the loop;
    e8s (scale table), e8 (fp16 scales) and e8c keys."""
    fmt = E8KVFormat.from_bits(64, *bits, variant)
    case = random_case(fmt, [37, 21], [1, 1], h_q=4, h_kv=2, write=False)
    slots = case.slots.clone()
    slots[5] = -1  # skipped token
    ref, got = _write_both(case, slots, block_rows, parallel, candidates, rotation)
    assert torch.equal(got, ref)
    blk, off = int(case.slots[5]) // 16, int(case.slots[5]) % 16
    assert int(got[blk, :, off].cpu().abs().sum()) == 0  # -1 was not written


def test_write_strided_input(one_thread):
    """vLLM hands key/value as views into the fused qkv output (row stride > H*D)."""
    fmt = E8KVFormat.from_bits(64, 4, 4)
    case = random_case(fmt, [19], [1], h_q=4, h_kv=2, write=False)
    qkv = torch.randn(19, 8, 64)
    qkv[:, 4:6], qkv[:, 6:8] = case.key, case.value
    ref = torch.zeros_like(case.kv_cache)
    write_kv_cache(case.key, case.value, ref, case.slots, fmt)
    got = torch.zeros_like(case.kv_cache).to(DEV)
    triton_write_kv_cache(qkv[:, 4:6].to(DEV), qkv[:, 6:8].to(DEV), got, case.slots.to(DEV), fmt)
    assert torch.equal(got.cpu(), ref)


def _check_attention(case, key_bias=None, **kw):
    ref = reference_attention(case.query.cpu(), case.kv_cache.cpu(), case.query_start_loc.cpu(), case.seq_lens.cpu(),
                              case.block_table.cpu(), case.fmt, key_bias=key_bias)
    emu = fp16_operand_reference(case.query, case.kv_cache, case.query_start_loc, case.seq_lens, case.block_table,
                                 case.fmt, key_bias=key_bias)
    kb = None if key_bias is None else KeyBias(*(None if x is None else x.to(DEV) for x in key_bias))
    out = triton_paged_attention(case.query.to(DEV), case.kv_cache.to(DEV), case.query_start_loc.to(DEV),
                                 case.seq_lens.to(DEV), case.block_table.to(DEV), case.fmt,
                                 max_query_len=case.max_query_len, key_bias=kb, **kw)
    err = (out.cpu().double() - ref).abs().max().item()
    err_emu = (emu - ref).abs().max().item()
    assert 0 < err_emu < 1e-2 * ref.abs().max().item()
    assert err <= 4 * err_emu, (err, err_emu)
    return err, err_emu


@pytest.mark.parametrize("bits", [(4, 4), (4, 2)])
@pytest.mark.parametrize("prefill", [{"kernel": "values", "block_m": 64, "tile_n": 32},
                                     {"kernel": "values", "block_m": 64, "tile_n": 32, "split_decode": 0},
                                     {"kernel": "pairs_l1", "block_m": 64, "tile_n": 32},
                                     {"kernel": "pairs", "block_m": 32}, {"kernel": "pairs"}],
                         ids=["values", "values-tile-grid-decode-rows", "pairs_l1", "pairs-32", "pairs-default"])
def test_attention_mixed_batch(bits, prefill, one_thread):
    """Decode rows, a full prefill, a chunked prefill and a one-token sequence in one batch; the
    one-token sequences on the split-KV decode grid (default) or on the query-tile grid."""
    fmt = E8KVFormat.from_bits(64, *bits)
    case = random_case(fmt, [70, 33, 1, 50, 20], [1, 33, 1, 9, 1], h_q=8, h_kv=2)
    _check_attention(case, prefill=prefill)


def _key_bias(case, seed=0, parts=("coef", "first"), table_dtype=torch.float32):
    """Position-dependent key centers as the calibration makes them: coefficients from the queries
    and a random pre-RoPE key mean, the RoPE table of every position, and a position-0 (sink) term."""
    from e8vllm.calibration import rope_bias_coeffs, rope_table

    g = torch.Generator().manual_seed(seed)
    h_q, d = case.query.shape[1], case.query.shape[2]
    mu = torch.randn(h_q, d, generator=g) * 2.0
    inv_freq = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    trig = rope_table(inv_freq, 1.0, torch.arange(int(case.seq_lens.max()) + 5)).to(table_dtype)
    first = (case.query.float() * torch.randn(h_q, d, generator=g)).sum(-1) * 0.5
    if "coef" not in parts:
        return KeyBias(None, None, first)
    return KeyBias(rope_bias_coeffs(case.query, mu), trig, first if "first" in parts else None)


@pytest.mark.parametrize("kernel", ["pairs", "pairs_l1"])
def test_attention_key_bias_both_grids(kernel, one_thread):
    """Position-dependent key centers: the logit of key p gains coef · table[p] + [p = 0] first, in
    the decode grid (with segments) and in the general grid (mixed batch), against the float64
    reference with them; each part alone too (fp16 table as on GPUs for pairs)."""
    fmt = E8KVFormat.from_bits(64, 4, 4)
    tdt = torch.float16 if kernel == "pairs" else torch.float32
    mixed = random_case(fmt, [70, 33, 1, 50, 20], [1, 33, 1, 9, 1], h_q=8, h_kv=2, seed=11)
    err, _ = _check_attention(mixed, key_bias=_key_bias(mixed, table_dtype=tdt), prefill={"kernel": kernel, "block_m": 32})
    for parts in (("coef",), ("first",)):
        _check_attention(mixed, key_bias=_key_bias(mixed, parts=parts), prefill={"kernel": kernel, "block_m": 32})
    dec = random_case(fmt, [150, 9, 64], [1, 1, 1], h_q=8, h_kv=2, seed=12)
    _check_attention(dec, key_bias=_key_bias(dec, 1, table_dtype=tdt), num_segs=4, decode={"kernel": kernel})
    _check_attention(dec, key_bias=_key_bias(dec, 2, parts=("first",)), num_segs=4, decode={"kernel": kernel, "prefetch": 1})
    # the bias matters: without it the same kernel is far from the reference that has it
    ref = reference_attention(mixed.query, mixed.kv_cache, mixed.query_start_loc, mixed.seq_lens,
                              mixed.block_table, fmt, key_bias=_key_bias(mixed))
    plain = triton_paged_attention(mixed.query.to(DEV), mixed.kv_cache.to(DEV), mixed.query_start_loc.to(DEV),
                                   mixed.seq_lens.to(DEV), mixed.block_table.to(DEV), fmt,
                                   max_query_len=mixed.max_query_len, prefill={"kernel": kernel, "block_m": 32})
    assert (plain.cpu().double() - ref).abs().max().item() > 20 * err


@pytest.mark.parametrize("segs", [1, 3, 4])
@pytest.mark.parametrize("decode", [{"kernel": "pairs"}, {"kernel": "pairs", "tile_n": 16}, {"kernel": "pairs_l1"},
                                    {"kernel": "values", "tile_n": 32}, {"kernel": "values", "tile_n": 16, "prefetch": 1},
                                    {"kernel": "pairs", "tile_n": 32, "prefetch": 1},
                                    {"kernel": "values", "tile_n": 32, "maxnreg": 128}],
                         ids=["pairs", "pairs-16", "pairs_l1", "values", "values-prefetch", "pairs-prefetch",
                              "values-maxnreg"])
def test_attention_decode_grid(segs, decode, one_thread):
    fmt = E8KVFormat.from_bits(64, 3, 3)
    case = random_case(fmt, [150, 9, 64], [1, 1, 1], h_q=8, h_kv=2, seed=3)
    _check_attention(case, num_segs=segs, decode=decode)


@pytest.mark.parametrize("bits", [(4, 4), (2, 2)])
def test_attention_decode_head128_gqa(bits, one_thread):
    """The decode kernel at head size 128 with 4 query heads per kv head (the Llama-3-8B shape)."""
    fmt = E8KVFormat.from_bits(128, *bits)
    case = random_case(fmt, [90, 17], [1, 1], h_q=8, h_kv=2, seed=5)
    _check_attention(case, num_segs=2)


def test_attention_rows_past_batch_are_zero(one_thread):
    fmt = E8KVFormat.from_bits(64, 4, 4)
    case = random_case(fmt, [20], [1], h_q=4, h_kv=2)
    q = torch.cat([case.query, torch.randn(3, 4, 64)]).to(DEV)
    out = torch.full((4, 4, 64), 7.0, device=DEV)
    triton_paged_attention(q, case.kv_cache.to(DEV), case.query_start_loc.to(DEV), case.seq_lens.to(DEV),
                           case.block_table.to(DEV), fmt, max_query_len=1, out=out)
    assert torch.all(out[1:] == 0)



def test_attention_decode_rows_skip_empty_sequences(one_thread):
    """A decode batch with sequences of no query token (padding) before, between and after the
    others: each query row gets its own sequence's output (the output kernel finds a row's sequence
    by query_start_loc), the same as without the empty ones; a strided fp16 query (a slice of a fused
    qkv tensor, as vLLM passes it) gives an fp16 output within the fp16 rounding of the float32 one."""
    fmt = E8KVFormat.from_bits(64, 4, 4)
    case = random_case(fmt, [150, 9, 64], [1, 1, 1], h_q=8, h_kv=2, seed=21)
    dev = [x.to(DEV) for x in (case.query, case.kv_cache, case.query_start_loc, case.seq_lens, case.block_table)]
    base = triton_paged_attention(*dev, case.fmt, max_query_len=1, num_segs=4).cpu()
    order = [None, 0, None, 1, 2, None]  # None: an empty sequence
    qsl = torch.tensor([0] + list(torch.cumsum(torch.tensor([0 if i is None else 1 for i in order]), 0)),
                       dtype=torch.int32)
    seq_lens = torch.tensor([5 if i is None else int(case.seq_lens[i]) for i in order], dtype=torch.int32)
    bt = torch.stack([case.block_table[0 if i is None else i] for i in order])
    got = triton_paged_attention(dev[0], dev[1], qsl.to(DEV), seq_lens.to(DEV), bt.to(DEV), case.fmt, max_query_len=1,
                                 num_segs=4).cpu()
    torch.testing.assert_close(got, base, rtol=0, atol=1e-6)
    qkv = torch.randn(3, 8 + 2 * 2, 64, dtype=torch.float16).to(DEV)
    qkv[:, :8] = case.query.half().to(DEV)
    q = qkv[:, :8]  # strided on the device
    assert not q.is_contiguous()
    out = triton_paged_attention(q, *dev[1:], case.fmt, max_query_len=1, num_segs=4).cpu()
    assert out.dtype == torch.float16
    ref32 = triton_paged_attention(case.query.half().float().to(DEV), *dev[1:], case.fmt, max_query_len=1,
                                   num_segs=4).cpu()
    torch.testing.assert_close(out.float(), ref32, rtol=2e-3, atol=1e-3)
    # an output whose last dim is strided takes a contiguous buffer and a copy; a wrong shape is refused
    wide = torch.full((3, 8, 128), 5.0, device=DEV)
    triton_paged_attention(*dev, case.fmt, max_query_len=1, num_segs=4, out=wide[..., ::2])
    torch.testing.assert_close(wide[..., ::2].cpu(), base, rtol=0, atol=1e-6)
    assert torch.all(wide[..., 1::2] == 5.0)
    with pytest.raises(ValueError, match="does not fit"):
        triton_paged_attention(*dev, case.fmt, max_query_len=1, out=torch.empty(3, 8, 32, device=DEV))


def test_supported_formats():
    assert supported(E8KVFormat.from_bits(128, 4, 4))
    assert not supported(E8KVFormat.from_bits(96, 4, 4))  # not a power of two: reference path


@pytest.mark.parametrize("kernel", ["pairs", "values"])
def test_tile_kernels_nq3_block32(kernel, one_thread):
    """SmolLM2's grouping (3 query heads per kv head: NQ not a power of two), cache blocks of 32,
    a chunked prefill over a prefix with several query tiles, decode rows, and a one-token sequence."""
    fmt = E8KVFormat.from_bits(64, 4, 4)
    case = random_case(fmt, [75, 40, 1, 33], [1, 23, 1, 1], h_q=6, h_kv=2, block_size=32, seed=7)
    _check_attention(case, prefill={"kernel": kernel, "block_m": 32, "tile_n": 16}, decode={"kernel": kernel})
    dec = random_case(fmt, [75, 3, 50], [1, 1, 1], h_q=6, h_kv=2, block_size=32, seed=8)
    _check_attention(dec, decode={"kernel": kernel, "tile_n": 16, "segs": 4})


def test_tile_prefill_head128_3bit_default_settings(one_thread):
    """Head size 128, 3-bit codes, the default prefill settings (block_m 256: 64 query tokens per tile)."""
    fmt = E8KVFormat.from_bits(128, 3, 3)
    case = random_case(fmt, [90, 70], [70, 5], h_q=8, h_kv=2, seed=9)
    _check_attention(case)


@pytest.mark.parametrize("bad", [{"kernel": "tile3"}, {"tile_n": 8}, {"num_stages": 0}, {"num_stages": True},
                                 {"segs": 3}, {"tiles": 32}, {"kernel": "phase"}, {"prefetch": 2},
                                 {"maxnreg": 8}, {"maxnreg": 300}, {"maxnreg": True}, {"split_decode": 2},
                                 {"split_decode": "yes"}])
def test_kernel_settings_are_validated(bad):
    from e8vllm.kernels.triton.e8_kv import DECODE_CONFIG, PREFILL_CONFIG, kernel_config

    base = PREFILL_CONFIG if "split_decode" in bad else DECODE_CONFIG
    with pytest.raises(ValueError):
        kernel_config(base, bad, "decode settings")
    with pytest.raises(ValueError):
        kernel_config(base, __import__("json").dumps(bad), "E8VLLM_DECODE_CONFIG")


def test_diagnostic_kernel_only_for_benchmarks():
    """'nolut' computes wrong values on purpose: an environment setting may not select it."""
    from e8vllm.kernels.triton.e8_kv import DECODE_CONFIG, kernel_config

    with pytest.raises(ValueError, match="wrong values"):
        kernel_config(DECODE_CONFIG, '{"kernel": "nolut"}', "E8VLLM_DECODE_CONFIG")
    assert kernel_config(DECODE_CONFIG, {"kernel": "nolut"}, "decode settings", True)["kernel"] == "nolut"


def test_inline_ptx_kernel_refused_by_the_interpreter():
    """'values_asm' (inline PTX) cannot run in TRITON_INTERPRET=1: refused with a clear error, and
    the interpreter's defaults take 'values' (the same lookups); compiled, it is the default."""
    from e8vllm.kernels.triton import e8_kv

    if not e8_kv.INTERPRET:
        assert e8_kv.DECODE_CONFIG["kernel"] == e8_kv.PREFILL_CONFIG["kernel"] == "values_asm"
        pytest.skip("compiled Triton: values_asm runs (tests/gpu compares it with 'values' bit for bit)")
    with pytest.raises(ValueError, match="inline PTX"):
        e8_kv.kernel_config(e8_kv.DECODE_CONFIG, {"kernel": "values_asm"}, "decode settings", True)
    assert e8_kv.DECODE_CONFIG["kernel"] == e8_kv.PREFILL_CONFIG["kernel"] == "values"


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pair_table_packs_both_values(bits):
    """Entry c·4^b + (hi << b | lo) of the pair table holds fp16 T_c[lo] in its low and T_c[hi] in its high half."""
    from e8vllm.kernels.triton.e8_kv import _pair_table

    fmt = E8KVFormat.from_bits(64, bits, bits)  # e8s: table sets t = 0, 1 (entry (t·2 + c)·4^b + ...)
    table = torch.cat([c.main.float() for c in fmt.k_codec.code.codes])  # [t·2 + c, 2^b]
    pairs = _pair_table(fmt.k_codec)
    k = 1 << bits
    assert pairs.dtype == torch.int32 and pairs.numel() == 4 * k * k
    halves = pairs.view(torch.int16).view(torch.float16).reshape(4, k, k, 2)  # [tc, hi, lo, (lo half, hi half)]
    for c in range(4):
        for hi in range(k):
            for lo in range(k):
                assert halves[c, hi, lo, 0] == table[c, lo].half() and halves[c, hi, lo, 1] == table[c, hi].half()


def test_cache_must_be_word_aligned():
    """The kernels read the cache as int32 words: a slot size that is not a multiple of 4 is refused."""
    from e8vllm.kernels.triton.e8_kv import _cache_words

    ok = torch.zeros(2, 2, 16, 68, dtype=torch.uint8)
    assert _cache_words(ok).shape == (2, 2, 16, 17)
    with pytest.raises(ValueError, match="int32 words"):
        _cache_words(torch.zeros(2, 2, 16, 66, dtype=torch.uint8))


def test_prepare_device_constants_caches_what_attention_uses():
    """The GPU impl builds the kernels' constants at construction (the first attention call may be inside
    a CUDA-graph capture): afterwards attention finds the same objects instead of building new ones."""
    from e8vllm.kernels.triton import e8_kv

    fmt = E8KVFormat.from_bits(64, 3, 2)
    e8_kv.prepare_device_constants(fmt, DEV, 0.125)
    c = e8_kv.TritonE8Format.get(fmt, DEV)
    assert c.k.pm1.device.type == torch.device(DEV).type
    case = random_case(fmt, [20], [1], h_q=4, h_kv=2)
    triton_paged_attention(case.query.to(DEV), case.kv_cache.to(DEV), case.query_start_loc.to(DEV),
                           case.seq_lens.to(DEV), case.block_table.to(DEV), fmt, max_query_len=1, scale=0.125)
    assert e8_kv.TritonE8Format.get(fmt, DEV) is c


@pytest.mark.parametrize("d,bits,variant", [(64, (3, 2), ""), (128, (4, 4), ""), (128, (4, 4), "switched")])
def test_rotations_are_signed_block_hadamards(d, bits, variant):
    """The query-rotation and output kernels rotate by butterflies: that is exact only because the
    codecs' rotations are R_kᵀ = diag(s) blockdiag(H_b) / √b (``pm1`` / √b) and R_v = its transpose for
    the values' signs; the dense matrices of the formats say so."""
    from e8vllm.kernels.triton import e8_kv

    fmt = E8KVFormat.from_bits(d, *bits, variant)
    c = e8_kv.TritonE8Format.get(fmt, "cpu")
    torch.testing.assert_close(c.q_rot, c.k.pm1 * c.k.inv_sqrt_b, rtol=0, atol=1e-7)
    torch.testing.assert_close(c.o_unrot, c.v.pm1.t() * c.v.inv_sqrt_b, rtol=0, atol=1e-7)
    assert c.k.block & (c.k.block - 1) == 0 and d % c.k.block == 0 and c.v.block == c.k.block


def test_constants_ignore_the_default_device():
    """vLLM builds the attention impls under ``with torch.device("cuda")``; the constants must still be
    built on the host and land on the device asked for (here: a meta default device, CPU asked)."""
    from e8vllm.kernels.triton import e8_kv

    e8_kv.TritonE8Format.get.cache_clear()
    fmt = E8KVFormat.from_bits(64, 2, 3)
    with torch.device("meta"):
        e8_kv.prepare_device_constants(fmt, "cpu", 0.125)
    c = e8_kv.TritonE8Format.get(fmt, "cpu")
    for t in (c.q_rot, c.o_unrot, c.k.pairs, c.v.table_h, c.k.pm1):
        assert t.device.type == "cpu"
    torch.testing.assert_close(c.q_rot.double() @ c.q_rot.double().t(), torch.eye(64, dtype=torch.float64),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["search", "rms"])
def test_fp16_scale_formats(variant, one_thread):
    """The e8-* formats (one table set, fp16 scale: ``E8VLLM_ENCODER=search`` / ``rms``) on the same
    kernels: byte-exact writes, attention within the fp16-operand bound on both grids."""
    fmt = E8KVFormat.from_bits(64, 4, 3, variant)
    assert fmt.k_codec.name.startswith("e8-") and supported(fmt)
    case = random_case(fmt, [37, 21], [1, 1], h_q=4, h_kv=2, write=False)
    case.key[3], case.value[5, 1], case.key[7, 0] = 0.0, 1e-9, 2e-8  # scale 0 (exact zeros), as the codec
    for rows in (None, 16):  # one row per program / the 16-row path
        ref, got = _write_both(case, block_rows=rows)
        assert torch.equal(got, ref)
    assert case.fmt.decode_kv_rotated(ref[case.slots[3] // 16, :, case.slots[3] % 16])[0].abs().max() == 0
    case = random_case(fmt, [70, 33, 1, 50, 20], [1, 33, 1, 9, 1], h_q=8, h_kv=2)
    _check_attention(case, prefill={"kernel": "values", "block_m": 64, "tile_n": 32})
    dec = random_case(fmt, [70, 33, 50], [1, 1, 1], h_q=8, h_kv=2, seed=3)
    _check_attention(dec, decode={"kernel": "pairs", "tile_n": 16, "segs": 2})


def test_switched_write_head128_groups_of_two_blocks(one_thread):
    """Head size 128: 16 blocks, one switch bit per two blocks (the group's summed error decides)."""
    fmt = E8KVFormat.from_bits(128, 4, 2)
    case = random_case(fmt, [29], [1], h_q=4, h_kv=2, write=False, seed=11)
    ref, got = _write_both(case)
    assert torch.equal(got, ref)
    kf, vf, ks, vs = fmt._slot_parts(ref)
    assert int(ks[..., 0].max()) > 1  # switch bytes use more than the first group


def test_kernel_scale_constants_match_the_codec():
    from e8vllm.codecs import e8s
    from e8vllm.kernels.triton import e8_kv

    assert (e8_kv.LOW_FACTOR.value, e8_kv.STEPS_PER_OCTAVE.value, e8_kv.EXP_BIAS.value) == (
        e8s.LOW_FACTOR, float(e8s.STEPS_PER_OCTAVE), float(e8s.EXP_BIAS))
