r"""GPU benchmark of the E8 KV cache on vLLM 0.26 (H200): kernel level and engine level.

    python -m e8vllm.bench.gpu kernel  [--batches 1,8,64,256] [--contexts 1024,8192,32768]
    python -m e8vllm.bench.gpu engine  [--runs auto:TRITON_ATTN fp8:TRITON_ATTN ...] [--seqs 64 --prompt 8192]
    python -m e8vllm.bench.gpu tune    [--batch 64 --context 8192] [--what decode|prefill]  # -> tune_*.json
    python -m e8vllm.bench.gpu profile [--runs e8_k4v4:CUSTOM auto:TRITON_ATTN] [--seqs 8 --prompt 32768]
    python -m e8vllm.bench.gpu write   [--tokens 1,8,64,256,512,8192]  # the write op, rows per program
    python -m e8vllm.bench.gpu report  # results/gpu/*.json -> results/gpu/gpu.md + gpu.png

Kernel level (one process, one GPU, every comparison in the same run): decode attention (one query
token per sequence, Llama-3-8B shape: 32 query heads, 8 KV heads, head size 128, block size 16,
one layer) over batch x context. Each variant's whole attention op is captured in a CUDA graph and
replayed (``torch.cuda.Event`` timing, median of repeats), for

* E8 (``e8_k4v4``, ``e8_k3v3``, ``e8_k2v2``): :func:`e8vllm.kernels.triton.triton_paged_attention`
  (query rotation matmul + attention kernel + segment merge + output un-rotation);
* vLLM's ``TritonAttentionImpl.forward`` with ``auto`` (bf16), ``fp8`` and ``int4_per_token_head``
  (metadata as vLLM's builder makes it: 16 softmax segments, 3D grid below 16 sequences).

Bytes the op must read = every cached (token, kv head) slot of every sequence (K and V with their
scales) = B·L·H_kv·slot_bytes; achieved bandwidth = bytes / time, compared with the measured copy
bandwidth (``dst.copy_(src)`` of 4 GiB, counting read + write bytes).

Engine level (one subprocess per dtype, vLLM 0.26, dummy-weight Llama-3-8B shape, 32 layers,
gpu_memory_utilization 0.85, ``enforce_eager`` unless ``E8_BENCH_GRAPHS=1``, prefix caching on):
vLLM's KV capacity in tokens
(num_gpu_blocks x block_size), prefill time of ``seqs`` prompts of ``prompt`` tokens (1 output
token, cold cache), then decode: the same prompts again with ``gen + 1`` output tokens (prompts in
the prefix cache), decode throughput = seqs * gen / time. ``profile``: the same engine, torch.profiler
around a few decode steps (top ops by CUDA and by host time per dtype), to find per-layer costs
outside the attention kernel.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results" / "gpu"
H_Q, H_KV, D, BS = 32, 8, 128, 16
E8_KERNEL_DTYPES = ("e8_k4v4", "e8_k3v3", "e8_k2v2")
VLLM_KERNEL_DTYPES = ("auto", "fp8", "int4_per_token_head")
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 65536,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
}


def _out_dir() -> Path:
    d = Path(os.environ.get("E8_BENCH_OUT") or os.environ.get("OUT") or RESULTS)
    d.mkdir(parents=True, exist_ok=True)
    return d


# ---------------------------------------------------------------------------------------------
# kernel level
# ---------------------------------------------------------------------------------------------
def copy_bandwidth(nbytes: int = 4 << 30, reps: int = 20) -> float:
    """Bytes/s of ``dst.copy_(src)`` on the current GPU, counting read + write."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times)


def _time_graph(fn, reps: int = 10, inner: int = 5) -> tuple[float, bool]:  # noqa: ANN001
    """Median seconds per call of ``fn`` (CUDA graph of ``inner`` calls when capturable)."""
    import torch

    fn()
    torch.cuda.synchronize()
    graph = None
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - fall back to eager timing
        graph = None
        torch.cuda.synchronize()
    run = graph.replay if graph is not None else (lambda: [fn() for _ in range(inner)])
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / inner)
    return statistics.median(times), graph is not None


def _block_tables(batch: int, ctx: int, device: str):  # noqa: ANN202
    import torch

    nbl = math.ceil(ctx / BS)
    perm = torch.randperm(batch * nbl, device=device).to(torch.int32)
    return perm.view(batch, nbl), batch * nbl


def _e8_format(dtype: str) -> tuple[Any, bool]:
    """(``E8KVFormat`` at head size D, centers) of a benchmark dtype: ``e8_kXvY`` with optional
    ``+centers`` (position-dependent key centers) and ``+search`` / ``+rms`` / ``+cubic`` / ``+switched`` /
    ``+cubic-keys`` (that codec variant, ``E8VLLM_ENCODER``) suffixes (:func:`split_run_dtype`)."""
    from e8vllm.kernels.reference import E8KVFormat
    from e8vllm.vllm_plugin.spec import parse_e8_dtype

    kv_dtype, centers, variant = split_run_dtype(dtype)
    return E8KVFormat.from_bits(D, *parse_e8_dtype(kv_dtype), variant), centers


def split_run_dtype(dtype: str) -> tuple[str, bool, str]:
    """A benchmark dtype -> (vLLM kv-cache dtype, key centers, codec variant ('' = the default)):
    ``e8_k4v4+cubic`` -> ("e8_k4v4", False, "cubic"); ``e8_k4v4+centers`` -> ("e8_k4v4", True, "").
    The variant suffixes are the values of ``E8VLLM_ENCODER`` (``spec.ENCODER_VARIANTS``)."""
    from e8vllm.vllm_plugin.spec import ENCODER_VARIANTS

    variant = ""
    for v in ENCODER_VARIANTS:
        if dtype.endswith(f"+{v}"):
            variant, dtype = v, dtype.removesuffix(f"+{v}")
    centers = dtype.endswith("+centers")
    return dtype.removesuffix("+centers"), centers, variant


def decode_inputs(fmt, batch: int, ctx: int) -> tuple[Any, ...]:  # noqa: ANN001 - E8KVFormat
    """A decode step's inputs on the GPU: (cache with real codes of random K/V in every slot, block
    table of a random block order, query bf16 [batch, H_Q, D], query_start_loc, seq_lens = ctx)."""
    import torch

    from e8vllm.kernels.triton import triton_write_kv_cache

    bt, nblocks = _block_tables(batch, ctx, "cuda")
    cache = torch.empty(nblocks, H_KV, BS, fmt.slot_bytes, dtype=torch.uint8, device="cuda")
    slots_all = torch.arange(nblocks * BS, device="cuda")
    for i in range(0, slots_all.numel(), 1 << 18):  # chunked
        sl = slots_all[i:i + (1 << 18)]
        k = torch.randn(sl.numel(), H_KV, D, device="cuda", dtype=torch.bfloat16)
        triton_write_kv_cache(k, k * 0.5, cache, sl, fmt)
    q = torch.randn(batch, H_Q, D, device="cuda", dtype=torch.bfloat16)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    sl = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return cache, bt, q, qsl, sl


def _e8_case(dtype: str, batch: int, ctx: int, decodes: list[dict] | None = None) -> dict[str, Any]:
    """Time E8 decode attention; with ``decodes``, each decode-kernel setting on the same cache
    (``{"variants": [{**setting, "time_s"|"error"}...]}`` plus the default's numbers). A dtype
    ending in ``+centers`` adds the logit bias of position-dependent key centers (a model with a
    RoPE KV calibration: :mod:`e8vllm.calibration`), fp16 position table as on the GPU; one ending in
    ``+search`` or ``+rms`` uses that codec variant (``E8VLLM_ENCODER``: the ``e8-*`` formats) instead
    of the default (``e8c-4bit`` keys at 4 bits, ``e8s-*`` otherwise; ``+switched``: ``e8s-*`` for both;
    ``+cubic``: ``e8c-4bit`` for both at 4 bits)."""
    import torch

    from e8vllm.calibration import rope_bias_coeffs, rope_table
    from e8vllm.kernels.reference import KeyBias
    from e8vllm.kernels.triton import triton_paged_attention

    fmt, centers = _e8_format(dtype)
    cache, bt, q, qsl, sl = decode_inputs(fmt, batch, ctx)
    out = torch.empty_like(q)
    nbytes = batch * ctx * H_KV * fmt.slot_bytes
    res: dict[str, Any] = {"bytes": nbytes}
    if decodes:
        ref = triton_paged_attention(q, cache, qsl, sl, bt, fmt, max_query_len=1, num_kv_heads=H_KV,
                                     scale=D ** -0.5, decode=REF_DECODE).float()
        res["variants"] = []
        for dc in decodes:
            v: dict[str, Any] = dict(dc)
            try:
                got = triton_paged_attention(q, cache, qsl, sl, bt, fmt, max_query_len=1, num_kv_heads=H_KV,
                                             scale=D ** -0.5, decode=dc).float()
                v["rel_diff_vs_ref"] = float((got - ref).abs().max() / ref.abs().max())
                fn = lambda dc=dc: triton_paged_attention(q, cache, qsl, sl, bt, fmt, max_query_len=1,  # noqa: E731
                                                          num_kv_heads=H_KV, scale=D ** -0.5, out=out, decode=dc)
                v["time_s"], v["graph"] = _time_graph(fn)
            except Exception as e:  # noqa: BLE001 - record and go on (e.g. out of shared memory)
                v["error"] = f"{type(e).__name__}: {e}"[:300]
            res["variants"].append(v)
            print(f"  {json.dumps(v)}", flush=True)
        del cache
        return res
    kbias = None
    if centers:
        inv_freq = 500000.0 ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)
        kbias = KeyBias(rope_bias_coeffs(q, torch.randn(H_Q, D, device="cuda")),
                        rope_table(inv_freq, 1.0, torch.arange(ctx, device="cuda")).half(),
                        (q.float() * torch.randn(H_Q, D, device="cuda")).sum(-1))
    fn = lambda: triton_paged_attention(q, cache, qsl, sl, bt, fmt, max_query_len=1,  # noqa: E731
                                        num_kv_heads=H_KV, scale=D ** -0.5, out=out, key_bias=kbias)
    res["time_s"], res["graph"] = _time_graph(fn)
    del cache
    return res


def tune_decode(batch: int, ctx: int, dtype: str = "e8_k4v4") -> dict[str, Any]:
    """Time decode-kernel settings on one cache; saves ``tune_decode.json`` and the fastest correct one as
    ``decode_config.json`` (use it with ``E8VLLM_DECODE_CONFIG``)."""
    import torch

    torch.manual_seed(0)
    decodes: list[dict[str, Any]] = [{**REF_DECODE, "segs": 16}]
    # the Triton decode kernel's default (still the decode kernel of 2- and 3-bit codes), for the
    # same-run comparison
    decodes += [{"kernel": "values_asm", "tile_n": 64, "num_warps": 4, "num_stages": 1, "segs": 16, "prefetch": 0,
                 "maxnreg": 128, "gluon": 0}]
    # the Gluon kernel (one warp per program; offline, sm_90: 128 registers at tile 16, 168 with the
    # register prefetch of the codes); lut 1: the byte-layout tables (one shift per byte of a word);
    # prefetch 2: the next tile's block id; async 1: the codes through a two-stage cp.async ring in
    # shared memory (168 registers uncapped); gluon_diag 1: a timing floor without the code loads.
    # (Session 11 timed tile 32, lazy rescaling and forced ordering: all slower.)
    g = {"gluon": 1, "gluon_tile": 16, "gluon_kp": 0, "gluon_maxnreg": 0, "segs": 16, "gluon_prefetch": 0,
         "gluon_lut": 0, "gluon_async": 0, "gluon_lazy": 0, "gluon_order": 0, "gluon_diag": 0, "gluon_arith": 1}
    if _e8_format(dtype)[0].k_codec.name.startswith("e8c"):  # cubic key levels (the default since session 14): the
        # arithmetic decode first, then the lookups on the same cache
        decodes += [{**g, **x} for x in (
            {}, {"gluon_async": 1}, {"gluon_maxnreg": 96}, {"gluon_async": 1, "gluon_maxnreg": 96},
            {"gluon_async": 1, "gluon_maxnreg": 128}, {"gluon_async": 1, "gluon_maxnreg": 128, "gluon_lut": 2},
            {"gluon_prefetch": 1}, {"gluon_arith": 0}, {"gluon_arith": 0, "gluon_async": 1}, {"gluon_diag": 1})]
    else:
        decodes += [{**g, **x} for x in (
            {}, {"gluon_lut": 1}, {"gluon_prefetch": 2}, {"gluon_lut": 1, "gluon_prefetch": 2}, {"gluon_kp": 1},
            {"gluon_kp": 1, "gluon_lut": 1}, {"gluon_kp": 1, "gluon_lut": 1, "gluon_prefetch": 2},
            {"gluon_prefetch": 1}, {"gluon_prefetch": 2, "gluon_maxnreg": 112}, {"gluon_async": 1},
            {"gluon_async": 1, "gluon_maxnreg": 128}, {"gluon_async": 1, "gluon_maxnreg": 128, "gluon_lut": 2},
            {"gluon_async": 1, "gluon_lut": 1, "gluon_maxnreg": 128},
            {"gluon_diag": 1})]
    res = _e8_case(dtype, batch, ctx, decodes)

    def best_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
        ok = [v for v in rows if "time_s" in v and v["rel_diff_vs_ref"] < 1e-2 and not v.get("gluon_diag")]
        return min(ok, key=lambda v: v["time_s"])

    best = best_of(res["variants"])
    for segs in (4, 8, 32):  # the segment count for the best setting
        more = _e8_case(dtype, batch, ctx, [{**{k: best[k] for k in DECODE_KEYS if k in best}, "segs": segs}])
        res["variants"] += more["variants"]
    best = best_of(res["variants"])
    res.update(dtype=dtype, batch=batch, context=ctx, best={k: best[k] for k in DECODE_KEYS if k in best})
    res["best_time_s"] = best["time_s"]
    out = _out_dir()
    (out / "tune_decode.json").write_text(json.dumps(res, indent=1))
    (out / "decode_config.json").write_text(json.dumps(res["best"]))
    print(f"BEST decode {json.dumps(res['best'])} {best['time_s'] * 1e6:.1f} us "
          f"({res['bytes'] / best['time_s'] / 1e12:.2f} TB/s)", flush=True)
    return res


def tune_prefill(seq: int = 8192, dtype: str = "e8_k4v4") -> dict[str, Any]:
    """Time general-grid (prefill) settings on one ``seq``-token prompt (vLLM's 8192-token chunk);
    saves ``tune_prefill.json`` and ``prefill_config.json`` (``E8VLLM_PREFILL_CONFIG``)."""
    import torch

    from e8vllm.kernels.triton import triton_paged_attention, triton_write_kv_cache

    torch.manual_seed(0)
    fmt, centers = _e8_format(dtype)
    if centers:
        raise ValueError(f"tune_prefill times plain attention; {dtype!r} asks for key centers")
    bt, nblocks = _block_tables(1, seq, "cuda")
    cache = torch.zeros(nblocks, H_KV, BS, fmt.slot_bytes, dtype=torch.uint8, device="cuda")
    k = torch.randn(seq, H_KV, D, device="cuda", dtype=torch.bfloat16)
    slots = (bt[0].long()[:, None] * BS + torch.arange(BS, device="cuda")[None, :]).reshape(-1)[:seq]
    triton_write_kv_cache(k, k * 0.5, cache, slots, fmt)
    q = torch.randn(seq, H_Q, D, device="cuda", dtype=torch.bfloat16)
    qsl = torch.tensor([0, seq], dtype=torch.int32, device="cuda")
    sl = torch.tensor([seq], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    call = lambda pc: triton_paged_attention(q, cache, qsl, sl, bt, fmt, max_query_len=seq,  # noqa: E731
                                             num_kv_heads=H_KV, scale=D ** -0.5, out=out, prefill=pc)
    ref = call(REF_PREFILL).float().clone()
    rows: list[dict[str, Any]] = []
    cands: list[dict[str, Any]] = [REF_PREFILL]
    cands += [{"kernel": kk, "block_m": m, "tile_n": n, "num_warps": w, "num_stages": 1}
              for kk, (m, n, w) in (("values", (128, 64, 8)), ("values_asm", (128, 64, 8)),
                                    ("values_asm", (256, 64, 8)), ("values_asm", (128, 32, 4)))]
    for pc in cands:
        v: dict[str, Any] = dict(pc)
        try:
            v["rel_diff_vs_ref"] = float((call(pc).float() - ref).abs().max() / ref.abs().max())
            v["time_s"], v["graph"] = _time_graph(lambda pc=pc: call(pc), reps=5, inner=2)
        except Exception as e:  # noqa: BLE001 - record and go on
            v["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(v)
        print(f"  {json.dumps(v)}", flush=True)
    ok = [v for v in rows if "time_s" in v and v["rel_diff_vs_ref"] < 1e-2]
    best = min(ok, key=lambda v: v["time_s"])
    res = {"dtype": dtype, "seq": seq, "variants": rows, "best": {k: best[k] for k in PREFILL_KEYS if k in best},
           "best_time_s": best["time_s"]}
    out = _out_dir()
    (out / "tune_prefill.json").write_text(json.dumps(res, indent=1))
    (out / "prefill_config.json").write_text(json.dumps(res["best"]))
    print(f"BEST prefill {json.dumps(res['best'])} {best['time_s'] * 1e3:.2f} ms", flush=True)
    return res


PREFILL_KEYS = ("kernel", "block_m", "tile_n", "num_warps", "num_stages", "maxnreg")
#: the settings other settings are checked against in ``tune`` (the pair-table kernel: a different
#: table and lookup path than the default one-value-per-lookup kernel)
REF_DECODE = {"kernel": "pairs", "tile_n": 64, "num_warps": 4, "num_stages": 1, "gluon": 0}
REF_PREFILL = {"kernel": "pairs", "block_m": 128, "tile_n": 64, "num_warps": 8, "num_stages": 2}
DECODE_KEYS = ("kernel", "tile_n", "num_warps", "num_stages", "segs", "prefetch", "maxnreg", "gluon", "gluon_tile",
               "gluon_kp", "gluon_maxnreg", "gluon_prefetch", "gluon_lut", "gluon_async", "gluon_lazy", "gluon_order",
               "gluon_diag", "gluon_arith")


def _vllm_case(dtype: str, batch: int, ctx: int) -> dict[str, Any]:
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):
        return _vllm_case_in_config(dtype, batch, ctx)


def _vllm_case_in_config(dtype: str, batch: int, ctx: int) -> dict[str, Any]:
    import torch
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend, TritonAttentionImpl

    try:
        from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE
    except ImportError:  # pragma: no cover
        from vllm.utils import STR_DTYPE_TO_TORCH_DTYPE  # type: ignore[no-redef]
    impl = TritonAttentionImpl(H_Q, D, D ** -0.5, H_KV, None, None, dtype)
    bt, nblocks = _block_tables(batch, ctx, "cuda")
    shape = TritonAttentionBackend.get_kv_cache_shape(nblocks, BS, H_KV, D, dtype)
    order = TritonAttentionBackend.get_kv_cache_stride_order()
    phys_shape = tuple(shape[i] for i in order)
    cdt = torch.bfloat16 if dtype == "auto" else STR_DTYPE_TO_TORCH_DTYPE[dtype]
    if cdt.is_floating_point and cdt.itemsize == 2:
        phys = torch.randn(phys_shape, dtype=cdt, device="cuda")
    else:
        phys = torch.randint(0, 120, phys_shape, dtype=torch.uint8, device="cuda").view(cdt)
    inv = [order.index(i) for i in range(len(order))]
    kv_cache = phys.permute(*inv)
    if impl._is_per_token_head_quant:  # finite scales
        impl._ensure_scale_caches(kv_cache)
        impl._k_scale_cache.fill_(0.01)
        impl._v_scale_cache.fill_(0.01)
    q = torch.randn(batch, H_Q, D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(batch, H_Q, D, device="cuda", dtype=torch.bfloat16)
    thr, segs = 128 // H_KV, 16
    md = SimpleNamespace(
        num_actual_tokens=batch, max_query_len=1, query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device="cuda"),
        max_seq_len=ctx, seq_lens=torch.full((batch,), ctx, dtype=torch.int32, device="cuda"), block_table=bt,
        slot_mapping=None, seq_threshold_3D=thr, num_par_softmax_segments=segs,
        softmax_segm_output=torch.empty(thr, H_Q, segs, D, dtype=torch.float32, device="cuda"),
        softmax_segm_max=torch.empty(thr, H_Q, segs, dtype=torch.float32, device="cuda"),
        softmax_segm_expsum=torch.empty(thr, H_Q, segs, dtype=torch.float32, device="cuda"),
        causal=True, use_cascade=False, common_prefix_len=0, cu_prefix_query_lens=None, prefix_kv_lens=None,
        suffix_kv_lens=None, scheduler_metadata=None, prefix_scheduler_metadata=None, mm_prefix_range=None,
        mm_prefix_range_tensor=None, rswa_prefix_lens=None, rswa_window=None)
    one = torch.ones((), dtype=torch.float32, device="cuda")
    layer = SimpleNamespace(_k_scale=one, _v_scale=one, _q_scale=one, _k_scale_float=1.0, _v_scale_float=1.0)
    fn = lambda: impl.forward(layer, q, None, None, kv_cache, md, out)  # noqa: E731
    t, graphed = _time_graph(fn)
    per_token_head = kv_cache.shape[-1] * kv_cache.element_size()  # K+V (+ scales) bytes per (token, head)
    nbytes = batch * ctx * H_KV * per_token_head
    del phys, kv_cache
    return {"time_s": t, "bytes": nbytes, "graph": graphed}


def run_kernel(batches: list[int], contexts: list[int], dtypes: list[str]) -> dict[str, Any]:
    """Kernel-level decode-attention benchmark; returns and saves ``kernel.json``."""
    import torch

    torch.manual_seed(0)
    bw = copy_bandwidth()
    from e8vllm.kernels.triton.e8_kv import DECODE_CONFIG

    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "copy_bandwidth_Bps": bw,
                           "shape": {"H_q": H_Q, "H_kv": H_KV, "D": D, "block_size": BS},
                           "e8_decode_config": DECODE_CONFIG, "rows": []}
    print(f"device {res['device']}; copy bandwidth {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    for batch in batches:
        for ctx in contexts:
            for dt in dtypes:
                need = batch * ctx * H_KV * (512 if dt == "auto" else 256)
                if need > 60e9:
                    continue
                try:
                    r = _e8_case(dt, batch, ctx) if dt.startswith("e8_") else _vllm_case(dt, batch, ctx)
                    r.update(dtype=dt, batch=batch, context=ctx)
                    if dt.startswith("e8_"):  # what the dtype meant in this run (the default changes)
                        fmt = _e8_format(dt)[0]
                        r["codecs"] = [fmt.k_codec.name, fmt.v_codec.name]
                    r["Bps"] = r["bytes"] / r["time_s"]
                    r["frac_copy_bw"] = r["Bps"] / bw
                except Exception as e:  # noqa: BLE001 - record and go on
                    r = {"dtype": dt, "batch": batch, "context": ctx, "error": f"{type(e).__name__}: {e}"[:400]}
                res["rows"].append(r)
                (_out_dir() / "kernel.json").write_text(json.dumps(res, indent=1))
                if "error" in r:
                    print(f"B={batch:4d} L={ctx:6d} {dt:20s} ERROR {r['error']}", flush=True)
                else:
                    print(f"B={batch:4d} L={ctx:6d} {dt:20s} {r['time_s'] * 1e6:9.1f} us  "
                          f"{r['Bps'] / 1e12:6.2f} TB/s  {100 * r['frac_copy_bw']:5.1f}% of copy"
                          f"{'' if r['graph'] else ' (eager)'}", flush=True)
                torch.cuda.empty_cache()
    (_out_dir() / "kernel.json").write_text(json.dumps(res, indent=1))
    return res


#: the write benchmark's settings: (rows per program, candidates side by side, "floor" / "ceil", small-write
#: rotation, warps per program, register cap (0: none); None: the 16-row path's tl.dot and 8 warps); the
#: session-11 ones (2 rows side by side or in a loop with the 16-column products) are in
#: ``results/gpu/write_s11.json`` and ``write_s12.json``, session 14's ('dot', 8 warps) in ``write_s14.json``
_WRITE_SETTINGS = ((1, True, "floor", "fwht", 2, 0), (1, True, "floor", "fwht", 4, 0), (1, True, "floor", "fwht", 1, 0),
                   (1, True, "floor", "fwht", 2, 128), (1, True, "floor", "fwht", 2, 168),
                   (1, True, "floor", "fwht", 4, 128), (1, True, "ceil", "fwht", 2, 0), (1, True, "ceil", "fwht", 4, 0),
                   (2, True, "floor", "fwht", 4, 0), (16, False, None, None, None, 0))


def run_write(tokens: list[int], dtypes: list[str]) -> dict[str, Any]:
    """The write op (rotate + encode + pack + scatter of K and V, H_kv 8, D 128) for ``tokens`` new
    tokens (a decode step of that many sequences, or a prefill chunk), with 1, 2, 4 and 16 (the tl.dot
    rotation) rows per program (``E8VLLM_SMALL_WRITE_ROWS``; the default,
    :func:`e8vllm.kernels.triton.e8_kv.write_block_rows`, is marked), the scale candidates side by
    side ('parallel', 1 or 2 rows) or in a loop, the small-write rotation (16-column products 'dot'
    or butterflies 'fwht', ``E8VLLM_WRITE_ROTATION``) and warps per program
    (``E8VLLM_SMALL_WRITE_WARPS``) and register cap (``E8VLLM_SMALL_WRITE_MAXNREG``), each in a CUDA graph;
    saves ``write.json``."""
    import torch

    from e8vllm.kernels.triton import triton_write_kv_cache
    from e8vllm.kernels.triton.e8_kv import (PAR_CANDIDATES, WRITE_ROTATION, small_write_maxnreg, small_write_warps,
                                             write_block_rows)

    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    for dt in dtypes:
        fmt, _ = _e8_format(dt)
        for n in tokens:
            cache = torch.zeros(-(-n // BS) + 1, H_KV, BS, fmt.slot_bytes,
                                dtype=torch.uint8, device="cuda")
            k = torch.randn(n, H_KV, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            slots = torch.randperm(cache.shape[0] * BS, device="cuda")[:n]
            for br, par, how, rot, nw, mr in _WRITE_SETTINGS:
                fn = lambda br=br, par=par, how=how, rot=rot, nw=nw, mr=mr: triton_write_kv_cache(  # noqa: E731
                    k, v, cache, slots, fmt, block_rows=br, parallel=par, candidates=how, rotation=rot, warps=nw,
                    maxnreg=mr)
                t, graphed = _time_graph(fn)
                small = br < 16
                r = {"dtype": dt, "tokens": n, "block_rows": br, "parallel_scales": par, "candidates": how,
                     "rotation": rot or "dot", "warps": nw or 8, "maxnreg": mr,  # 16 rows: tl.dot, 8 warps
                     "default": (br == write_block_rows(n * H_KV) and par == (br == 1) and how in (None, PAR_CANDIDATES)
                                 and (not small or (rot == WRITE_ROTATION and nw == small_write_warps(n * H_KV, rot)
                                                    and mr == small_write_maxnreg(nw, rot)))),
                     "time_s": t, "graph": graphed}
                rows.append(r)
                print(f"write {dt:10s} {n:6d} tokens  block_rows {br:2d} {'parallel ' + how if par else 'loop':14s}"
                      f" {r['rotation']:4s} {r['warps']} warps{f' maxnreg {mr}' if mr else ''}"
                      f"{' (default)' if r['default'] else '          '}  {t * 1e6:9.1f} us", flush=True)
            del cache
    res = {"device": torch.cuda.get_device_name(), "rows": rows}
    (_out_dir() / "write.json").write_text(json.dumps(res, indent=1))
    return res


def compiled_resources() -> list[dict[str, Any]]:
    """Registers, spills, shared memory and warps of every compiled variant, in this process, of the
    decode path's kernels: the Gluon decode grid, the query rotation and the output kernel (Triton's
    per-device kernel caches; empty where the layout of those caches differs). The Triton decode and
    query-tile kernels are not listed."""
    from e8vllm.kernels.triton import e8_gluon, e8_kv

    out: list[dict[str, Any]] = []
    for fn in (e8_gluon._gl_decode_kernel, e8_kv._e8_rotate_q_kernel, e8_kv._e8_output_kernel):
        for entry in getattr(fn, "device_caches", {}).values():
            cache = entry[0] if isinstance(entry, tuple) else entry
            for k in getattr(cache, "values", lambda: [])():
                md = getattr(k, "metadata", None)
                out.append({"kernel": getattr(fn, "__name__", str(fn)), "n_regs": getattr(k, "n_regs", None),
                            "n_spills": getattr(k, "n_spills", None), "shared": getattr(md, "shared", None),
                            "num_warps": getattr(md, "num_warps", None)})
    return out


def run_segs(batches: list[int], contexts: list[int], segs: list[int], dtype: str = "e8_k4v4") -> dict[str, Any]:
    """The whole decode attention op (query rotation, split-KV decode grid, merge + un-rotation) over
    the number of KV segments of the grid, explicit (``num_segs``) and the default
    (:func:`e8vllm.kernels.triton.e8_kv.decode_segments`, marked), one cache per batch x context,
    each timing in a CUDA graph; saves ``segs.json``."""
    import torch

    from e8vllm.kernels.triton import triton_paged_attention
    from e8vllm.kernels.triton.e8_kv import DECODE_CONFIG, decode_segments

    torch.manual_seed(0)
    fmt, _ = _e8_format(dtype)
    rows: list[dict[str, Any]] = []
    for b in batches:
        for ctx in contexts:
            cache, bt, q, qsl, sl = decode_inputs(fmt, b, ctx)
            out = torch.empty_like(q)
            default = decode_segments(b, H_KV, torch.device("cuda"), DECODE_CONFIG, fmt=fmt, block_size=BS, nq=H_Q // H_KV)
            nbytes = b * ctx * H_KV * fmt.slot_bytes
            for ns in sorted(set(segs) | {default}):
                fn = lambda ns=ns: triton_paged_attention(q, cache, qsl, sl, bt, fmt, max_query_len=1,  # noqa: E731
                                                          num_kv_heads=H_KV, scale=D ** -0.5, out=out, num_segs=ns)
                t, graphed = _time_graph(fn)
                r = {"dtype": dtype, "batch": b, "context": ctx, "segs": ns, "programs": b * H_KV * ns,
                     "default": ns == default, "time_s": t, "bytes_per_s": nbytes / t, "graph": graphed}
                rows.append(r)
                print(f"segs B={b:4d} ctx={ctx:6d} segs {ns:3d} ({r['programs']:6d} programs)"
                      f"{' (default)' if r['default'] else '          '}  {t * 1e6:9.1f} us"
                      f"  {nbytes / t / 1e12:5.2f} TB/s", flush=True)
            del cache
    res = {"device": torch.cuda.get_device_name(), "sms": torch.cuda.get_device_properties(0).multi_processor_count,
           "kernels": compiled_resources(), "rows": rows}
    print("kernels", json.dumps(res["kernels"]), flush=True)
    (_out_dir() / "segs.json").write_text(json.dumps(res, indent=1))
    return res


# ---------------------------------------------------------------------------------------------
# engine level
# ---------------------------------------------------------------------------------------------
def _plugin_path() -> str:
    d = Path(tempfile.gettempdir()) / "e8vllm-plugin-path"
    info = d / "e8vllm-0.1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: e8vllm\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[vllm.general_plugins]\ne8vllm = e8vllm.vllm_plugin:register\n")
    return f"{d}{os.pathsep}{ROOT}"


def _graphs() -> bool:
    """Engine benchmarks with vLLM's CUDA graphs (``$E8_BENCH_GRAPHS=1``) instead of enforce_eager."""
    return os.environ.get("E8_BENCH_GRAPHS", "0") == "1"


def _dummy_llm(model_dir: str, dtype: str, backend: str, max_model_len: int, max_num_seqs: int, **kw: Any) -> Any:
    """vLLM engine on the dummy-weight model of the engine benchmarks (gpu_memory_utilization 0.85,
    enforce_eager unless ``$E8_BENCH_GRAPHS`` is 1, 8,192 batched tokens); ``dtype`` may carry the
    ``+centers`` and codec-variant run suffixes (:func:`split_run_dtype`; the variant goes to
    ``$E8VLLM_ENCODER`` of this process, which runs the engine in-process)."""
    from vllm import LLM

    from e8vllm.vllm_plugin.spec import ENCODER_ENV

    kv_dtype, _centers, variant = split_run_dtype(dtype)
    os.environ[ENCODER_ENV] = variant or "cubic-keys"

    return LLM(model=model_dir, load_format="dummy", skip_tokenizer_init=True, max_model_len=max_model_len,
               max_num_batched_tokens=8192, max_num_seqs=max_num_seqs, gpu_memory_utilization=0.85,
               enforce_eager=not _graphs(), kv_cache_dtype=kv_dtype,
               attention_config={"backend": backend}, **kw)


def engine_worker(model_dir: str, dtype: str, backend: str, seqs: int, prompt: int, gen: int, out: str) -> None:
    """One engine: capacity, prefill and decode throughput (appends one JSON line to ``out``)."""
    from vllm import SamplingParams

    t0 = time.time()
    llm = _dummy_llm(model_dir, dtype, backend, prompt + gen + 16, max(seqs, 8), enable_prefix_caching=True)
    cc = llm.llm_engine.vllm_config.cache_config
    rec: dict[str, Any] = {"dtype": dtype, "backend": backend, "seqs": seqs, "prompt": prompt, "gen": gen,
                           "cuda_graphs": _graphs(), "start_s": round(time.time() - t0, 1),
                           "e8_decode_config": os.environ.get("E8VLLM_DECODE_CONFIG") or "default",
                           "num_gpu_blocks": cc.num_gpu_blocks, "block_size": cc.block_size,
                           "capacity_tokens": cc.num_gpu_blocks * cc.block_size}
    from e8vllm.calibration import find_calibration

    calib = find_calibration(model_dir)
    rec["kv_calibration"] = str(calib) if calib is not None else None
    print("CAPACITY", json.dumps(rec), flush=True)
    prompts = [{"prompt_token_ids": [(7919 * i + 104729 * j) % 120000 + 100 for j in range(prompt)]}
               for i in range(seqs)]
    llm.generate([{"prompt_token_ids": [5] * 64}], SamplingParams(max_tokens=4, detokenize=False), use_tqdm=False)
    t = time.time()
    llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False),
                 use_tqdm=False)
    rec["prefill_s"] = round(time.time() - t, 2)
    rec["prefill_tok_s"] = round(seqs * prompt / rec["prefill_s"], 1)
    t = time.time()
    outs = llm.generate(prompts, SamplingParams(max_tokens=gen + 1, temperature=0.0, ignore_eos=True,
                                                detokenize=False), use_tqdm=False)
    dt = time.time() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    rec["decode_s"] = round(dt, 2)
    rec["decode_tok_s"] = round((n_out - seqs) / dt, 1)
    rec["first_tokens"] = list(outs[0].outputs[0].token_ids[:6])
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print("RESULT", json.dumps(rec), flush=True)


def _kernel_totals(prof: Any) -> dict[str, tuple[float, int]]:
    """{name: (self device time in us, calls)} of a torch.profiler run (CUDA kernels and ops)."""
    out: dict[str, tuple[float, int]] = {}
    for e in prof.key_averages():
        t = float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0) or 0.0)
        if t > 0:
            prev = out.get(e.key, (0.0, 0))
            out[e.key] = (prev[0] + t, prev[1] + int(e.count))
    return out


def profile_worker(model_dir: str, dtype: str, backend: str, seqs: int, prompt: int, steps: int, out: str) -> None:
    """One engine: prefill ``seqs`` prompts, then profile (torch.profiler in the engine's process: CUDA
    kernels, CUDA-graph replays included) a generate of one token over the cached prompts (the
    prefill step alone) and one of ``steps`` + 1 tokens: their difference per kernel is the decode
    steps' time. Writes ``profile_<dtype>.txt`` (the top kernels of the long run, and the decode
    steps' kernels in us per decode step) next to ``out`` and appends a JSON line (wall time per
    step, the decode kernels per step) to ``out``."""
    import torch
    from vllm import SamplingParams

    llm = _dummy_llm(model_dir, dtype, backend, prompt + steps + 16, max(seqs, 8), enable_prefix_caching=True)
    prompts = [{"prompt_token_ids": [(7919 * i + 104729 * j) % 120000 + 100 for j in range(prompt)]}
               for i in range(seqs)]
    sp = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True, detokenize=False)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate(prompts, one, use_tqdm=False)
    t = time.time()
    llm.generate(prompts, sp, use_tqdm=False)
    plain = (time.time() - t) / steps
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as p_one:
        llm.generate(prompts, one, use_tqdm=False)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=acts) as prof:
        t = time.time()
        llm.generate(prompts, sp, use_tqdm=False)
        torch.cuda.synchronize()
        profiled = (time.time() - t) / steps
    long_run, prefill = _kernel_totals(prof), _kernel_totals(p_one)
    decode = {k: ((t - prefill.get(k, (0.0, 0))[0]) / steps, (n - prefill.get(k, (0.0, 0))[1]) / steps)
              for k, (t, n) in long_run.items()}
    top = [(k, v) for k, v in sorted(decode.items(), key=lambda kv: -kv[1][0]) if v[0] > 0.5][:40]
    lines = [f"{'kernel or op (decode steps: long run minus the prefill-only run)':80s} {'us/step':>10s} {'calls/step':>10s}"]
    lines += [f"{k[:80]:80s} {v[0]:10.1f} {v[1]:10.2f}" for k, v in top]
    text = (f"{dtype} ({backend}) {seqs} x {prompt}, {steps} steps: {plain * 1e3:.2f} ms/step "
            f"({profiled * 1e3:.2f} profiled)\n\n" + "\n".join(lines) + "\n\nlong run (prefill step + decode steps):\n"
            + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70))
    Path(out).with_name(f"profile_{safe_label(dtype)}.txt").write_text(text)
    rec = {"dtype": dtype, "backend": backend, "seqs": seqs, "prompt": prompt, "steps": steps,
           "cuda_graphs": _graphs(), "ms_per_step": plain * 1e3, "ms_per_step_profiled": profiled * 1e3,
           "decode_us_per_step": {k: round(v[0], 1) for k, v in top}}
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print("PROFILE", json.dumps(rec)[:3000], flush=True)
    print(text[:6000], flush=True)


def safe_label(dtype: str) -> str:
    """A file-name-safe form of a run label (``e8_k4v4+centers`` -> ``e8_k4v4_centers``)."""
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in dtype)


def run_profile(runs: list[tuple[str, str]], seqs: int, prompt: int, steps: int) -> None:
    """:func:`profile_worker` per (dtype, backend), each in a fresh process; ``profile_<S>x<P>.jsonl``."""
    _each_run("profile_worker", runs, f"{seqs}x{prompt}, {steps} steps",
              str(_out_dir() / f"profile_{seqs}x{prompt}.jsonl"), seqs, prompt, steps)


def _each_run(worker: str, runs: list[tuple[str, str]], what: str, out: str, *args: Any) -> None:
    """``worker(model_dir, dtype, backend, *args, out)`` per (dtype, backend), each in a fresh process,
    on one dummy-weight model directory."""
    model_dir = _model_dir()
    for dtype, backend in runs:
        print(f"=== {worker.removesuffix('_worker')} {dtype} ({backend}) {what}", flush=True)
        rc = _in_fresh_process(worker, str(model_dir), dtype, backend, *args, out)
        print(f"=== {dtype}: exit {rc}", flush=True)


def sweep_worker(model_dir: str, dtype: str, backend: str, concurrency: list[int], prompt: int, gen: int,
                 out: str) -> None:
    """Concurrency sweep on one engine: for each c, c requests of ``prompt`` distinct tokens + ``gen``
    generated, all submitted at once (the scheduler admits what fits in the KV cache). Per c: wall
    time, output and total token throughput, p50 / p99 time per output token over the requests
    (vLLM's per-request stats: (last token - first token) / (tokens - 1)) and preemptions."""
    import statistics

    from vllm import SamplingParams

    llm = _dummy_llm(model_dir, dtype, backend, prompt + gen + 16, max(concurrency), enable_prefix_caching=False,
                     disable_log_stats=False)
    cc = llm.llm_engine.vllm_config.cache_config
    llm.generate([{"prompt_token_ids": [5] * 64}], SamplingParams(max_tokens=4, detokenize=False), use_tqdm=False)
    for c in concurrency:
        prompts = [{"prompt_token_ids": [(7919 * i + 104729 * j + 31 * c) % 120000 + 100 for j in range(prompt)]}
                   for i in range(c)]
        t = time.time()
        outs = llm.generate(prompts, SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True,
                                                    detokenize=False), use_tqdm=False)
        dt = time.time() - t
        stats = [m for m in (getattr(o, "metrics", None) for o in outs) if m is not None]
        tpot = [(m.last_token_ts - m.first_token_ts) / (m.num_generation_tokens - 1) for m in stats
                if m.num_generation_tokens > 1 and m.last_token_ts > m.first_token_ts]
        preempt = sum(int(getattr(m, "num_preemptions", 0) or 0) for m in stats)
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        tpot.sort()
        rec = {"dtype": dtype, "backend": backend, "concurrency": c, "prompt": prompt, "gen": gen,
               "capacity_tokens": cc.num_gpu_blocks * cc.block_size, "wall_s": round(dt, 2),
               "output_tok_s": round(n_out / dt, 1), "total_tok_s": round((n_out + c * prompt) / dt, 1),
               "tpot_p50_ms": round(1e3 * statistics.median(tpot), 2) if tpot else None,
               "tpot_p99_ms": round(1e3 * tpot[min(len(tpot) - 1, int(0.99 * len(tpot)))], 2) if tpot else None,
               "preemptions": preempt if stats else None}
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print("SWEEP", json.dumps(rec), flush=True)


def _model_dir(prefix: str = "llama3-8b-shape-") -> Path:
    """A fresh directory with the Llama-3-8B-shaped config (weights are dummy)."""
    model_dir = Path(tempfile.mkdtemp(prefix=prefix))
    (model_dir / "config.json").write_text(json.dumps(LLAMA3_8B))
    return model_dir


def _in_fresh_process(worker: str, *args: Any) -> int:
    """Run ``e8vllm.bench.gpu.<worker>(*args)`` in a new Python process with the plugin loaded
    (engines do not share a process); returns its exit code."""
    env = {**os.environ, "PYTHONPATH": _plugin_path() + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "VLLM_PLUGINS": "e8vllm", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    code = ("import sys; sys.path[:0]=%r.split(%r); from e8vllm.bench.gpu import %s; %s(*%r)"
            % (env["PYTHONPATH"], os.pathsep, worker, worker, args))
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT).returncode


def run_sweep(runs: list[tuple[str, str]], concurrency: list[int], prompt: int, gen: int) -> None:
    """:func:`sweep_worker` per (dtype, backend) in a fresh process; JSON lines in ``sweep_PROMPT.jsonl``."""
    _each_run("sweep_worker", runs, f"c={concurrency} {prompt}+{gen}", str(_out_dir() / f"sweep_{prompt}.jsonl"),
              concurrency, prompt, gen)


def _synthetic_calibration(model_dir: Path, cfg: dict[str, Any]) -> None:
    """A KV calibration with every position-dependent center (RoPE-turned mean and the position-0
    sink; random values, the model's RoPE frequencies) in ``model_dir``: dummy weights have no real
    statistics, this measures what the centers cost."""
    import torch

    from e8vllm.calibration import CALIBRATION_FILE, KVCenters

    g = torch.Generator().manual_seed(0)
    d = cfg["head_dim"]
    shape = (cfg["num_hidden_layers"], cfg["num_key_value_heads"], d)
    KVCenters(torch.randn(shape, generator=g) * 0.1, torch.randn(shape, generator=g) * 0.01,
              meta={"tokens": "synthetic (benchmark)"}, k_rope=torch.randn(shape, generator=g) * 0.1,
              rope_inv_freq=cfg["rope_theta"] ** (-torch.arange(0, d, 2, dtype=torch.float32) / d),
              k_sink=torch.randn(shape, generator=g) * 0.1).save(model_dir / CALIBRATION_FILE)


def run_engine(runs: list[tuple[str, str]], seqs: int, prompt: int, gen: int) -> list[dict[str, Any]]:
    """Run :func:`engine_worker` per (dtype, backend) in a fresh process; results in ``engine.jsonl``.
    A dtype ``X+centers`` runs X on a model directory with a synthetic KV calibration."""
    out = str(_out_dir() / f"engine_{seqs}x{prompt}.jsonl")
    model_dir = _model_dir()
    calibrated = None  # a second directory with a synthetic KV calibration, for "DTYPE+centers" runs
    if any(split_run_dtype(dt)[1] for dt, _ in runs):
        calibrated = _model_dir("llama3-8b-shape-calibrated-")
        _synthetic_calibration(calibrated, LLAMA3_8B)
    for dtype, backend in runs:
        print(f"=== {dtype} ({backend}) {seqs}x{prompt}+{gen}", flush=True)
        mdir = calibrated if split_run_dtype(dtype)[1] else model_dir
        rc = _in_fresh_process("engine_worker", str(mdir), dtype, backend, seqs, prompt, gen, out)
        print(f"=== {dtype}: exit {rc}", flush=True)
    return [json.loads(x) for x in Path(out).read_text().splitlines()] if Path(out).exists() else []


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def report(src: Path = RESULTS) -> str:
    """results/gpu/kernel.json + engine_*.jsonl -> gpu.md (+ gpu.png when matplotlib is there)."""
    lines = ["# GPU results (H200, vLLM 0.26)", ""]
    kj = src / "kernel.json"
    if kj.exists():
        k = json.loads(kj.read_text())
        bw = k["copy_bandwidth_Bps"]
        lines += [f"Kernel level, decode attention, one layer (H_q 32, H_kv 8, D 128), {k['device']}; "
                  f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write). E8 decode settings: "
                  f"{json.dumps(k['e8_decode_config']) if 'e8_decode_config' in k else 'not recorded'}; "
                  "`e8_*` dtypes in the default format of their run (rows that recorded it name their K / V codecs; "
                  "`e8s-*` for both from session 7 to session 14's runs, `e8c-4bit` keys since), `+search` the `e8-*` "
                  "format, `+cubic` `e8c-4bit` at 4 bits, `+cubic-keys` `e8c-4bit` for 4-bit keys only, `+switched` "
                  "`e8s-*` for both.",
                  "",
                  *([k["note"] + ".", ""] if k.get("note") else []),
                  "| batch | context | dtype | time (us) | bytes read (MB) | TB/s | % of copy BW | vs auto |",
                  "|---:|---:|---|---:|---:|---:|---:|---:|"]
        base = {(r["batch"], r["context"]): r["time_s"] for r in k["rows"] if r.get("dtype") == "auto" and "time_s" in r}
        for r in k["rows"]:
            if "error" in r:
                lines.append(f"| {r['batch']} | {r['context']} | {r['dtype']} | error | | | | |")
                continue
            b = base.get((r["batch"], r["context"]))
            sp = f"{b / r['time_s']:.2f}x" if b else ""
            dt = r["dtype"] + (f" ({' / '.join(r['codecs'])})" if r.get("codecs") else "")
            lines.append(f"| {r['batch']} | {r['context']} | {dt} | {r['time_s'] * 1e6:.1f} | "
                         f"{r['bytes'] / 1e6:.1f} | {r['Bps'] / 1e12:.2f} | {100 * r['frac_copy_bw']:.1f} | {sp} |")
        lines.append("")
    tunes = [(p, "decode") for p in sorted(src.glob("tune_decode*.json"))]
    tunes += [(p, "prefill of one 8192-token prompt") for p in sorted(src.glob("tune_prefill*.json"))]
    tunes += [(p, "decode diagnostics (scripts/gpu/diag_decode.py; 'nolut' skips the table lookup and computes "
                  "wrong values: a timing floor; 'tile3'/'tile3g': the previous kernel)")
              for p in sorted(src.glob("diag_decode*.json"))]
    for tj, what in tunes:
        name = tj.name
        t = json.loads(tj.read_text())
        shape = f"{t['batch']} x {t['context']}" if "batch" in t else f"1 x {t.get('seq', '?')}"
        lines += [f"Kernel settings ({name}, {what}: {shape}, {t.get('dtype', 'e8_k4v4')}); relative difference "
                  "to the output of the run's reference setting (the first one it ran).", "",
                  "| kernel | block_m | tile_n | warps | stages | segs | prefetch | maxnreg | time (us) | rel. diff |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for v in sorted(t["variants"], key=lambda v: v.get("time_s", 1e9)):
            tm = f"{v['time_s'] * 1e6:.1f}" if "time_s" in v else "error"
            kern = v.get("kernel") or ("gluon" + "".join(
                f" {k.removeprefix('gluon_')} {v[k]}" for k in ("gluon_tile", "gluon_kp", "gluon_maxnreg", "gluon_prefetch",
                                                               "gluon_lut", "gluon_async", "gluon_lazy", "gluon_order",
                                                               "gluon_diag", "gluon_arith")
                if k in v and (v[k] or k in ("gluon_tile", "gluon_kp", "gluon_maxnreg"))))
            lines.append(f"| {kern} | {v.get('block_m', '')} | {v.get('tile_n', '')} | {v.get('num_warps', '')} | "
                         f"{v.get('num_stages', '')} | {v.get('segs', '')} | {v.get('prefetch', '')} | "
                         f"{v.get('maxnreg', '')} | {tm} | "
                         f"{v.get('rel_diff_vs_ref', float('nan')):.1e} |")
        lines.append("")
    for ej in sorted(src.glob("engine_*.jsonl")) + sorted(src.glob("engine_*.log")):
        recs = [r for r in _engine_records(ej) if "seqs" in r]
        if not recs:
            continue
        r0 = recs[0]
        base = next((r for r in recs if r["dtype"] == "auto"), None)
        lines += [f"Engine level ({ej.name}): dummy-weight Llama-3-8B shape, {r0['seqs']} x {r0['prompt']} prompt "
                  f"+ {r0['gen']} generated, gpu_memory_utilization 0.85, "
                  f"{'CUDA graphs' if r0.get('cuda_graphs') else 'enforce_eager'}.", "",
                  "| kv_cache_dtype | backend | KV capacity (tokens) | x auto | prefill (s) | prefill x auto | "
                  "decode (tok/s) | decode x auto |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in recs:
            def ratio(key: str, inv: bool = False) -> str:
                if not base or key not in r or key not in base:
                    return ""
                v = base[key] / r[key] if inv else r[key] / base[key]
                return f"{v:.2f}"
            lines.append(f"| {r['dtype']} | {r['backend']} | {r['capacity_tokens']:,} | {ratio('capacity_tokens')} | "
                         f"{r.get('prefill_s', 'not finished')} | {ratio('prefill_s', True)} | "
                         f"{r.get('decode_tok_s', 'not finished')} | {ratio('decode_tok_s')} |")
        lines.append("")
    for sj in sorted(src.glob("sweep_*.jsonl")):
        recs = [json.loads(x) for x in sj.read_text().splitlines() if x.strip()]
        if not recs:
            continue
        lines += [f"Concurrency sweep ({sj.name}): c requests of {recs[0]['prompt']} distinct prompt tokens + "
                  f"{recs[0]['gen']} generated, all submitted at once; "
                  f"{'CUDA graphs' if '_graphs' in sj.name else 'enforce_eager'}. Time per output token over "
                  "the requests (vLLM's per-request stats).", "",
                  "| kv_cache_dtype | c | KV capacity (tokens) | wall (s) | output tok/s | total tok/s | "
                  "TPOT p50 (ms) | TPOT p99 (ms) | preemptions |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(recs, key=lambda r: (r["concurrency"], r["dtype"])):
            lines.append(f"| {r['dtype']} | {r['concurrency']} | {r['capacity_tokens']:,} | {r['wall_s']} | "
                         f"{r['output_tok_s']} | {r['total_tok_s']} | {r['tpot_p50_ms']} | {r['tpot_p99_ms']} | "
                         f"{r['preemptions']} |")
        lines.append("")
    for wj in sorted(src.glob("write*.json")):
        rows = json.loads(wj.read_text())["rows"]
        lines += [f"Write op ({wj.name}): rotate + encode + pack + scatter of K and V (H_kv 8, D 128) for n new "
                  "tokens, by rows per program, in a CUDA graph (us; * = the default then).", "",
                  ]
        # columns: (rows per program, scale candidates side by side, rotation, warps, register cap) in the order first seen
        cols: list[tuple[int, bool, str, str, int, int]] = []
        by: dict[tuple[str, int], dict[tuple[int, bool, str, str, int, int], str]] = {}
        for r in rows:
            par = bool(r.get("parallel_scales", False))
            small = r["block_rows"] < 16
            key = (r["block_rows"], par, (r.get("candidates") or "ceil") if par else "",
                   r.get("rotation", "dot"), r.get("warps", 4 if small else 8), r.get("maxnreg") or 0)
            if key not in cols:
                cols.append(key)
            by.setdefault((r["dtype"], r["tokens"]), {})[key] = (
                f"{r['time_s'] * 1e6:.1f}{'*' if r.get('default') else ''}")
        names = [f"{br} row{'s' if br > 1 else ''}{f' (parallel scales, {how})' if par else ''}"
                 + (f", {rot}, {nw} warps" if br < 16 else "") + (f", maxnreg {mr}" if mr else "")
                 for br, par, how, rot, nw, mr in cols]
        lines += ["| dtype | tokens | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(cols)]
        for (dt, n), t in by.items():
            lines.append(f"| {dt} | {n} | " + " | ".join(t.get(c, "") for c in cols) + " |")
        lines.append("")
    md = "\n".join(lines)
    (src / "gpu.md").write_text(md)
    if kj.exists():
        try:
            _plot(src)
        except ImportError:
            pass
    return md


def _engine_records(path: Path) -> list[dict[str, Any]]:
    """Engine records of a ``.jsonl`` (one per finished run) or a log (``RESULT`` lines, and
    ``CAPACITY`` lines of runs that did not finish)."""
    if path.suffix == ".jsonl":
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    done: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        for tag in ("RESULT ", "CAPACITY "):
            if line.startswith(tag):
                r = json.loads(line[len(tag):])
                if tag == "RESULT " or r["dtype"] not in done:
                    done[r["dtype"]] = r
    return list(done.values())


def _plot(src: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = json.loads((src / "kernel.json").read_text())
    rows = [r for r in k["rows"] if "time_s" in r]
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4 * len(batches), 3.6), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for dt in sorted({r["dtype"] for r in rows}):
            pts = sorted((r["context"], 100 * r["frac_copy_bw"]) for r in rows if r["batch"] == b and r["dtype"] == dt)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=dt)
        ax.set_xscale("log", base=2)
        ax.set_title(f"decode attention, batch {b}")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("% of copy bandwidth")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(src / "gpu.png", dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m e8vllm.bench.gpu", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    pk = sub.add_parser("kernel")
    pk.add_argument("--batches", default="1,8,64,256")
    pk.add_argument("--contexts", default="1024,8192,32768")
    pk.add_argument("--dtypes", default=",".join(E8_KERNEL_DTYPES + VLLM_KERNEL_DTYPES))
    pe = sub.add_parser("engine")
    pe.add_argument("--runs", nargs="+", default=["auto:TRITON_ATTN", "fp8:TRITON_ATTN",
                                                    "int4_per_token_head:TRITON_ATTN", "e8_k4v4:CUSTOM"])
    pe.add_argument("--seqs", type=int, default=64)
    pe.add_argument("--prompt", type=int, default=8192)
    pe.add_argument("--gen", type=int, default=128)
    ps = sub.add_parser("sweep")
    ps.add_argument("--runs", nargs="+", default=["auto:TRITON_ATTN", "e8_k4v4:CUSTOM"])
    ps.add_argument("--concurrency", default="32,128,512")
    ps.add_argument("--prompt", type=int, default=2048)
    ps.add_argument("--gen", type=int, default=128)
    pp = sub.add_parser("profile")
    pp.add_argument("--runs", nargs="+", default=["e8_k4v4:CUSTOM", "auto:TRITON_ATTN"])
    pp.add_argument("--seqs", type=int, default=8)
    pp.add_argument("--prompt", type=int, default=32768)
    pp.add_argument("--steps", type=int, default=8)
    pt = sub.add_parser("tune")
    pt.add_argument("--batch", type=int, default=64)
    pt.add_argument("--context", type=int, default=8192)
    pt.add_argument("--dtype", default="e8_k4v4")
    pt.add_argument("--what", choices=("both", "decode", "prefill"), default="both")
    pw = sub.add_parser("write")
    pw.add_argument("--tokens", default="1,8,64,256,512,8192")
    pw.add_argument("--dtypes", default="e8_k4v4,e8_k4v4+search")
    pg = sub.add_parser("segs")
    pg.add_argument("--batches", default="8,32,64,128")
    pg.add_argument("--contexts", default="8192,32768")
    pg.add_argument("--segs", default="4,6,8,12,16,24,32")
    pg.add_argument("--dtype", default="e8_k4v4")
    sub.add_parser("report")
    a = p.parse_args(argv)
    if a.cmd == "segs":
        run_segs([int(x) for x in a.batches.split(",")], [int(x) for x in a.contexts.split(",")],
                 [int(x) for x in a.segs.split(",")], a.dtype)
    if a.cmd == "write":
        run_write([int(x) for x in a.tokens.split(",")], a.dtypes.split(","))
    if a.cmd == "tune":
        if a.what in ("both", "decode"):
            tune_decode(a.batch, a.context, a.dtype)
        if a.what in ("both", "prefill"):
            tune_prefill(8192, a.dtype)
    if a.cmd in (None, "kernel"):
        if a.cmd is None:
            a = p.parse_args(["kernel"])
        run_kernel([int(x) for x in a.batches.split(",")], [int(x) for x in a.contexts.split(",")],
                   a.dtypes.split(","))
    if a.cmd == "engine":
        run_engine([tuple(r.split(":")) for r in a.runs], a.seqs, a.prompt, a.gen)  # type: ignore[misc]
    if a.cmd == "profile":
        run_profile([tuple(r.split(":")) for r in a.runs], a.seqs, a.prompt, a.steps)  # type: ignore[misc]
    if a.cmd == "sweep":
        run_sweep([tuple(r.split(":")) for r in a.runs], [int(x) for x in a.concurrency.split(",")],  # type: ignore[misc]
                  a.prompt, a.gen)
    if a.cmd in ("report",):
        print(report(Path(os.environ.get("E8_BENCH_OUT") or RESULTS)))


if __name__ == "__main__":
    main()
