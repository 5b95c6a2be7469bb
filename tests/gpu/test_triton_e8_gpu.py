"""The fused Triton E8 kernels on the H200 (CUDA) against the PyTorch reference.

Run on the device machine (pytest is not installed there, so the module also runs as a script):

    PYTHONPATH=. python tests/gpu/test_triton_e8_gpu.py   # prints every error / match number
    pytest -m gpu tests/gpu                       # where pytest and CUDA exist

* write: kernel codes vs the reference encoder on CUDA (same search; the rotation is an IEEE dot
  instead of a butterfly, so a near-tie can flip): >= 99.5 % identical slots, MSE within 0.1 %;
* attention at head size 128, GQA 4 (mixed prefill / chunked prefill / decode; decode grid with 16
  segments): error vs float64 ``reference_attention`` <= 4x the error of the float64 computation
  with the kernel's fp16 operand roundings; the same for the Gluon decode kernel over head sizes,
  GQA groups, codecs and its settings, plus its distance to the Triton decode kernel;
* a dummy-weight Llama (vLLM 0.26, CUSTOM backend, e8_k4v4): greedy tokens of the Triton path
  equal the PyTorch reference path's token for token (``scripts/gpu/tokens_check.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

try:
    import pytest

    pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
except ImportError:  # the device machine has no pytest: run as a script
    pytest = None

from e8vllm.kernels.reference import E8KVFormat, reference_attention, write_kv_cache  # noqa: E402
from e8vllm.kernels.triton import fp16_operand_reference, triton_paged_attention, triton_write_kv_cache  # noqa: E402
from e8vllm.kernels.triton.cases import random_case  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RESULTS: dict = {}


def test_write_codes_cuda():
    """Both write paths: 3,048 tokens x 8 heads (16 rows per program, the tl.dot rotation) and a
    decode step's 64 tokens with 16, 4, 2 and 1 rows per program (the small-write path: x P summed
    from 16-column products, or butterflies (``fwht``, with 4, 8 or 2 warps); with 1 row the scale
    candidates are searched side by side: 8 + 1 by default, all 9 padded to 16 with ``ceil``)."""
    for kb, vb, toks, rows, how in ((4, 4, [2048, 1000], 16, None), (3, 3, [2048, 1000], 16, None),
                                    (2, 2, [2048, 1000], 16, None), (4, 4, [40, 24], 16, None),
                                    (3, 3, [40, 24], 16, None), (4, 4, [40, 24], 4, None), (4, 4, [40, 24], 2, None),
                                    (3, 3, [40, 24], 2, None), (2, 2, [40, 24], 2, None), (4, 4, [40, 24], 1, None),
                                    (4, 4, [40, 24], 1, "ceil"), (2, 2, [40, 24], 1, None),
                                    (4, 4, [40, 24], 1, "fwht"), (4, 4, [40, 24], 1, "fwht8"),
                                    (3, 3, [40, 24], 2, "fwht2")):
        rot, nw = ("fwht", int(how[4:] or 4)) if how and how.startswith("fwht") else ("dot" if rows < 16 else None, None)
        fmt = E8KVFormat.from_bits(128, kb, vb)
        case = random_case(fmt, toks, [1] * len(toks), h_q=32, h_kv=8, write=False, device="cuda")
        ref = torch.zeros_like(case.kv_cache)
        write_kv_cache(case.key, case.value, ref, case.slots, fmt)
        got = torch.zeros_like(case.kv_cache)
        triton_write_kv_cache(case.key, case.value, got, case.slots, fmt, block_rows=rows,
                              candidates=None if rot else how, rotation=rot, warps=nw)
        name = (f"write_k{kb}v{vb}" + (f"_{sum(toks)}_tokens_{rows}_rows" if sum(toks) < 1000 else "")
                + (f"_{how}" if how else ""))
        used = case.slots
        r = ref.permute(0, 2, 1, 3).reshape(-1, 8, fmt.slot_bytes)[used]
        g = got.permute(0, 2, 1, 3).reshape(-1, 8, fmt.slot_bytes)[used]
        same = (r == g).all(-1).float().mean().item()
        kref, vref = fmt.decode_kv_rotated(r)
        kgot, vgot = fmt.decode_kv_rotated(g)
        rot_k = fmt.k_rotation.forward(case.key)
        rot_v = fmt.v_rotation.forward(case.value)
        mse_ref = ((kref - rot_k).square().mean() + (vref - rot_v).square().mean()).item()
        mse_got = ((kgot - rot_k).square().mean() + (vgot - rot_v).square().mean()).item()
        RESULTS[name] = {"identical_slots": same, "mse_ref": mse_ref, "mse_triton": mse_got}
        print(f"{name}: identical slots {100 * same:.3f} %, MSE ref {mse_ref:.6g} triton {mse_got:.6g}")
        assert same >= 0.995
        assert abs(mse_got / mse_ref - 1) < 1e-3


def _attention(case, name, key_bias=None, **kw):
    out = triton_paged_attention(case.query, case.kv_cache, case.query_start_loc, case.seq_lens, case.block_table,
                                 case.fmt, max_query_len=case.max_query_len, key_bias=key_bias, **kw)
    torch.cuda.synchronize()
    args = (case.query.cpu(), case.kv_cache.cpu(), case.query_start_loc.cpu(), case.seq_lens.cpu(),
            case.block_table.cpu(), case.fmt)
    from e8vllm.kernels.reference import KeyBias

    kb_cpu = None if key_bias is None else KeyBias(*(None if x is None else x.cpu() for x in key_bias))
    ref = reference_attention(*args, key_bias=kb_cpu)
    emu = fp16_operand_reference(*args, key_bias=kb_cpu)
    from e8vllm.kernels.reference import paged_attention

    pt = paged_attention(case.query, case.kv_cache, case.query_start_loc, case.seq_lens, case.block_table, case.fmt,
                         key_bias=key_bias)
    err = (out.cpu().double() - ref).abs().max().item()
    err_emu = (emu - ref).abs().max().item()
    err_pt = (pt.cpu().double() - ref).abs().max().item()
    RESULTS[name] = {"max_abs_err_triton": err, "max_abs_err_fp16_operand_reference": err_emu,
                     "max_abs_err_torch_float32_path": err_pt, "max_abs_ref": ref.abs().max().item()}
    print(f"{name}: max|triton - float64 ref| {err:.3g}; fp16-operand reference {err_emu:.3g}; "
          f"PyTorch float32 path {err_pt:.3g}; max|ref| {ref.abs().max().item():.3g}")
    assert err <= 4 * err_emu


def test_attention_mixed_cuda():
    for kb, vb in ((4, 4), (2, 2)):
        fmt = E8KVFormat.from_bits(128, kb, vb)
        case = random_case(fmt, [400, 160, 1, 257, 64], [1, 160, 1, 24, 1], h_q=32, h_kv=8, device="cuda")
        _attention(case, f"attention_mixed_k{kb}v{vb}")


def test_attention_decode_segments_cuda():
    fmt = E8KVFormat.from_bits(128, 4, 4)
    case = random_case(fmt, [1500, 33, 800, 2], [1, 1, 1, 1], h_q=32, h_kv=8, device="cuda", seed=5)
    _attention(case, "attention_decode_16seg_k4v4")


def test_asm_lookup_equals_plain_lookup_cuda():
    """'values_asm' (the default: inline-PTX lop3 indices) and 'values' look up the same table
    entries: bit-identical outputs on the decode grid and the general grid, 4 and 3 bits."""
    for kb, vb in ((4, 4), (3, 3)):
        fmt = E8KVFormat.from_bits(128, kb, vb)
        for name, lens, qlens in (("decode", [1500, 33, 800, 2], [1, 1, 1, 1]),
                                  ("mixed", [400, 160, 1, 257, 64], [1, 160, 1, 24, 1])):
            case = random_case(fmt, lens, qlens, h_q=32, h_kv=8, device="cuda", seed=11)
            outs = {}
            for kernel in ("values", "values_asm"):
                outs[kernel] = triton_paged_attention(
                    case.query, case.kv_cache, case.query_start_loc, case.seq_lens, case.block_table, case.fmt,
                    max_query_len=case.max_query_len, decode={"kernel": kernel}, prefill={"kernel": kernel})
            same = torch.equal(outs["values"], outs["values_asm"])
            RESULTS[f"asm_equals_values_{name}_k{kb}v{vb}"] = same
            print(f"values_asm == values ({name}, k{kb}v{vb}): {same}")
            assert same


def test_gluon_decode_cuda():
    """The Gluon decode kernel (the default for 4-bit decode batches) against the float64 reference
    (the same tolerance as the Triton kernels) and against the Triton decode kernel, over head sizes,
    GQA groups (3, 4, 8, 16), both codec families, lengths around the 16-token tile, segment counts
    (1, 16, more than tiles) and its settings (key pairs, 32-token tiles, byte-layout tables, both
    prefetches, the cp.async code ring, the arithmetic decode of cubic-level codes)."""
    from e8vllm.kernels.triton import e8_kv

    combos = [  # (head size, H_q, H_kv, codec variant, lengths, segments, block size, settings)
        (128, 32, 8, "switched", [1500, 33, 800, 2, 16, 17, 1], 16, 16, {}),
        (128, 32, 8, "switched", [1500, 33, 800, 2, 16, 17, 1], 16, 16, {"gluon_kp": 1}),
        (128, 32, 8, "switched", [1500, 33, 800, 2, 16, 17, 1], 16, 32, {"gluon_tile": 32}),
        (128, 32, 8, "search", [1500, 33, 800, 2], 16, 16, {}),
        (128, 32, 8, "search", [1500, 33, 800, 2], 16, 16, {"gluon_kp": 1}),
        (128, 24, 8, "switched", [700, 5, 64], 1, 16, {}),
        (128, 64, 8, "switched", [700, 5, 64], 64, 16, {}),
        (128, 16, 1, "switched", [300, 40], 16, 16, {}),
        (64, 9, 3, "switched", [900, 31, 1], 16, 16, {}),
        (64, 9, 3, "switched", [900, 31, 1], 16, 16, {"gluon_kp": 1}),
        (128, 32, 8, "switched", [1500, 33, 800, 2, 16, 17, 1], 16, 16, {"gluon_lut": 1}),
        (128, 32, 8, "switched", [1500, 33, 800, 2, 16, 17, 1], 16, 16, {"gluon_lut": 1, "gluon_kp": 1, "gluon_prefetch": 2}),
        (128, 32, 8, "search", [1500, 33, 800, 2], 16, 16, {"gluon_lut": 1}),
        (128, 32, 8, "switched", [1500, 33, 800, 2, 16, 17, 1], 16, 16, {"gluon_prefetch": 2}),
        (128, 32, 8, "switched", [1500, 33, 800, 2, 16, 17, 1], 4, 16, {"gluon_prefetch": 1}),
        (64, 9, 3, "switched", [900, 31, 1], 16, 16, {"gluon_lut": 1, "gluon_prefetch": 2}),
        # the cp.async ring (session 12: compiled offline only; last, so that a fault leaves the rest measured)
        (128, 32, 8, "switched", [1500, 33, 800, 2, 16, 17, 1], 16, 16, {"gluon_async": 1}),
        (128, 32, 8, "switched", [1500, 33, 800, 2, 16, 17, 1], 4, 16, {"gluon_async": 1, "gluon_lut": 1}),
        (128, 32, 8, "search", [1500, 33, 800, 2], 1, 16, {"gluon_async": 1}),
        (64, 9, 3, "switched", [900, 31, 1], 16, 16, {"gluon_async": 1}),
        # cubic levels (e8c-4bit): the arithmetic decode (session 13), then the lookups on the same codes
        (128, 32, 8, "cubic", [1500, 33, 800, 2, 16, 17, 1], 16, 16, {}),
        (128, 32, 8, "cubic", [1500, 33, 800, 2, 16, 17, 1], 16, 16, {"gluon_async": 1}),
        (128, 24, 8, "cubic", [700, 5, 64], 1, 16, {}),
        (128, 16, 1, "cubic", [300, 40], 16, 16, {}),
        (64, 9, 3, "cubic", [900, 31, 1], 16, 16, {}),
        (64, 9, 3, "cubic", [900, 31, 1], 4, 16, {"gluon_async": 1}),
        (128, 32, 8, "cubic", [1500, 33, 800, 2], 16, 16, {"gluon_arith": 0}),
        # cubic keys, looked-up values (session 14)
        (128, 32, 8, "cubic-keys", [1500, 33, 800, 2, 16, 17, 1], 16, 16, {}),
        (128, 32, 8, "cubic-keys", [1500, 33, 800, 2, 16, 17, 1], 4, 16, {"gluon_async": 0}),
        (64, 9, 3, "cubic-keys", [900, 31, 1], 16, 16, {}),
        # value pairs (gluon_lut 2, session 16: compiled and emulated offline only; last, as above)
        (128, 32, 8, "cubic-keys", [1500, 33, 800, 2, 16, 17, 1], 16, 16, {"gluon_async": 1, "gluon_lut": 2}),
        (128, 32, 8, "switched", [1500, 33, 800, 2, 16, 17, 1], 4, 16, {"gluon_async": 1, "gluon_lut": 2}),
        (64, 9, 3, "cubic-keys", [900, 31, 1], 16, 16, {"gluon_async": 1, "gluon_lut": 2}),
    ]
    pick = os.environ.get("E8_GLUON_CASES")  # a re-run of some cases: their indices, comma-separated
    if pick:
        combos = [combos[int(i)] for i in pick.split(",")]
    for d, h_q, h_kv, variant, lens, segs, bs, settings in combos:
        fmt = E8KVFormat.from_bits(d, 4, 4, variant)
        case = random_case(fmt, lens, [1] * len(lens), h_q=h_q, h_kv=h_kv, block_size=bs, device="cuda", seed=21)
        c = e8_kv.TritonE8Format.get(fmt, "cuda")
        assert e8_kv._gluon.gluon_supported(c, bs, h_q // h_kv, settings.get("gluon_tile", 16))
        want_ar = {"cubic": 3, "cubic-keys": 1}.get(variant, 0) if settings.get("gluon_arith", 1) == 1 else 0
        assert e8_kv._gluon_arith(c, e8_kv.kernel_config(e8_kv.DECODE_CONFIG, settings, "case")) == want_ar
        name = (f"gluon_decode_d{d}_gqa{h_q // h_kv}_{'e8s' if variant == 'switched' else variant}_segs{segs}"
                + "".join(f"_{k}{v}" for k, v in settings.items()))
        _attention(case, name, num_segs=segs, decode={"gluon": 1, **settings})
        outs = [triton_paged_attention(case.query, case.kv_cache, case.query_start_loc, case.seq_lens,
                                       case.block_table, case.fmt, max_query_len=1, num_segs=segs,
                                       decode={"gluon": g, **(settings if g else {})}) for g in (1, 0)]
        diff = (outs[0] - outs[1]).abs().max().item()
        RESULTS[name]["max_abs_diff_vs_triton_kernel"] = diff
        print(f"{name}: max|gluon - triton kernel| {diff:.3g}")
        assert diff <= 2 * RESULTS[name]["max_abs_err_fp16_operand_reference"] + 1e-6


def _key_bias(case, table_dtype=torch.float16):
    """Position-dependent key centers (as the calibration makes them) for ``case``: coefficients
    from the queries and a random pre-RoPE key mean, the RoPE table of every position, a sink term."""
    from e8vllm.calibration import rope_bias_coeffs, rope_table
    from e8vllm.kernels.reference import KeyBias

    g = torch.Generator().manual_seed(9)
    h_q, d = case.query.shape[1], case.query.shape[2]
    mu = (torch.randn(h_q, d, generator=g) * 2.0).to(case.query.device)
    inv_freq = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    trig = rope_table(inv_freq, 1.0, torch.arange(int(case.seq_lens.max()) + 7)).to(case.query.device, table_dtype)
    first = (case.query.float() * torch.randn(h_q, d, generator=g).to(case.query.device)).sum(-1) * 0.5
    return KeyBias(rope_bias_coeffs(case.query, mu), trig, first)


def test_attention_key_bias_cuda():
    """Both tile kernels with position-dependent key centers (fp16 table, as the impl passes on CUDA)."""
    fmt = E8KVFormat.from_bits(128, 4, 4)
    case = random_case(fmt, [400, 160, 1, 257, 64], [1, 160, 1, 24, 1], h_q=32, h_kv=8, device="cuda", seed=7)
    _attention(case, "attention_mixed_key_bias_k4v4", key_bias=_key_bias(case))
    case = random_case(fmt, [1500, 33, 800, 2], [1, 1, 1, 1], h_q=32, h_kv=8, device="cuda", seed=8)
    _attention(case, "attention_decode_16seg_key_bias_k4v4", key_bias=_key_bias(case))


def test_centering_ops_capture_in_cuda_graph():
    """The write path's position-dependent centers (positions from the metadata, table rows, RoPE of
    the mean) run inside a CUDA graph and replay the eager result."""
    from e8vllm.calibration import rope_centers, rope_table
    from e8vllm.vllm_plugin.impl import token_positions

    dev = "cuda"
    qsl = torch.tensor([0, 1, 3, 4], dtype=torch.int32, device=dev)
    lens = torch.tensor([5, 9, 2], dtype=torch.int32, device=dev)
    inv_freq = 10000.0 ** (-torch.arange(0, 128, 2, dtype=torch.float32) / 128)
    trig = rope_table(inv_freq, 1.0, torch.arange(64, device=dev)).half()
    k_rope = torch.randn(8, 128, device=dev)
    out = torch.empty(6, 8, 128, device=dev)

    def f():
        out.copy_(rope_centers(k_rope, trig[token_positions(qsl, lens, 6)].float()))

    f()
    torch.cuda.synchronize()
    want = out.clone()
    assert token_positions(qsl, lens, 6).tolist() == [4, 7, 8, 1, 0, 0]
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        f()
    out.zero_()
    g.replay()
    torch.cuda.synchronize()
    RESULTS["centering_graph_replay_equal"] = bool(torch.equal(out, want))
    assert torch.equal(out, want)


def _tokens(name: str, *extra: str) -> dict:
    out = Path(os.environ.get("OUT", "/tmp")) / f"{name}.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu" / "tokens_check.py"), str(out), *extra],
                       cwd=ROOT)
    assert r.returncode == 0
    res = json.loads(out.read_text())
    RESULTS[name] = res
    return res


def test_tokens_match_reference_path_with_rope_centers():
    """The same check with a KV calibration that has position-dependent key centers (write-path
    positions from the forward context, the logit bias in both kernels)."""
    res = _tokens("tokens_check_rope_centers", "--calibration")
    assert res["triton"] and res["triton"] == res["torch"], res
    assert res["triton_calls"].get("triton_attn", 0) > 0 and res["torch_calls"].get("torch_attn", 0) > 0


def test_warm_attention_paths_leave_nothing_to_compile_cuda():
    """After the warm-up, batches shaped as vLLM's (the query a view of the fused QKV projection, the
    block table rows of a wider buffer, the output a view, a many-block cache, batch sizes reaching
    every segment count, decode and mixed) compile no new variant of any attention kernel."""
    from e8vllm.kernels.triton import e8_gluon, e8_kv

    fmt = E8KVFormat.from_bits(128, 4, 4)
    h_q, h_kv, d, bs, max_seqs = 32, 8, 128, 16, 64
    e8_kv.warm_attention_paths(fmt, "cuda", h_q, h_kv, d, torch.bfloat16, d ** -0.5, block_size=bs, max_seqs=max_seqs)
    kernels = [e8_kv._e8_rotate_q_kernel, e8_kv._e8_tile_attn_kernel, e8_kv._e8_decode_kernel,
               e8_kv._e8_output_kernel, e8_gluon._gl_decode_kernel]

    def compiled():
        return [sum(len(c[0]) for c in k.device_caches.values()) for k in kernels]

    before = compiled()
    cache = torch.zeros(80, h_kv, bs, fmt.slot_bytes, dtype=torch.uint8, device="cuda")
    bt_buf = torch.randint(0, 80, (max_seqs, 521), dtype=torch.int32, device="cuda")  # 8,336 tokens / 16
    for b in sorted(set(range(1, max_seqs + 1, 7)) | {1, 8, 9, 16, 17, max_seqs}):
        for prompt in (0, 37):  # a decode batch, then the same with a prompt chunk in front
            qlens = [prompt] + [1] * (b - 1) if prompt else [1] * b
            t = sum(qlens)
            qkv = torch.randn(t, (h_q + 2 * h_kv) * d, dtype=torch.bfloat16, device="cuda")
            q = qkv[:, :h_q * d].view(t, h_q, d)
            qsl = torch.tensor([0] + qlens, dtype=torch.int32, device="cuda").cumsum(0, dtype=torch.int32)
            seq_lens = torch.tensor([x + 90 for x in qlens], dtype=torch.int32, device="cuda")
            out = torch.empty(t + 5, h_q * d, dtype=torch.bfloat16, device="cuda")[:t].view(t, h_q, d)
            triton_paged_attention(q, cache, qsl, seq_lens, bt_buf[:b], fmt, max_query_len=max(qlens),
                                   num_kv_heads=h_kv, scale=d ** -0.5, out=out)
    torch.cuda.synchronize()
    RESULTS["warm_attention_compiles"] = {"before": before, "after": compiled()}
    print(f"warm_attention: compiled kernels per kernel {before} -> {compiled()}")
    assert compiled() == before, dict(zip([getattr(k, "__name__", repr(k)) for k in kernels], zip(before, compiled())))


def test_tokens_match_reference_path():
    res = _tokens("tokens_check")
    assert res["triton"] and res["triton"] == res["torch"], res
    # the codecs of $E8VLLM_ENCODER (session 13 ran this check with e8s-4bit and with e8c-4bit: 8/8 each)
    from e8vllm.kernels.reference import codec_names
    from e8vllm.vllm_plugin.spec import encoder_variant

    assert res["triton_codecs"] == res["torch_codecs"] == list(codec_names(4, 4, encoder_variant())), res
    # both paths really ran (writes and attention), each on its own implementation
    assert res["triton_calls"].get("triton_write", 0) > 0 and res["triton_calls"].get("triton_attn", 0) > 0
    assert res["torch_calls"].get("torch_write", 0) > 0 and res["torch_calls"].get("torch_attn", 0) > 0
    assert not res["triton_calls"].get("torch_attn") and not res["torch_calls"].get("triton_attn")


if __name__ == "__main__":
    failed = []
    for name, fn in list(globals().items()):
        if name.startswith("test_") and callable(fn) and (len(sys.argv) < 2 or name in sys.argv[1:]):
            try:
                fn()
                print(f"PASS {name}", flush=True)
            except Exception as e:  # noqa: BLE001
                import traceback

                traceback.print_exc()
                print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
                failed.append(name)
    d = Path(os.environ.get("OUT", "/tmp"))
    (d / "gpu_tests.json").write_text(json.dumps({"results": RESULTS, "failed": failed}, indent=1))
    sys.exit(1 if failed else 0)
