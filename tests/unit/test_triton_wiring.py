"""The CUSTOM backend's impl routes e8 writes and attention through the fused Triton kernels
(here in Triton's CPU interpreter) and gets the PyTorch reference's results: same codes, and
attention within the fp16-operand tolerance of ``test_triton_e8``; ``E8VLLM_GPU_KERNELS=torch``
routes both to the reference."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="run through tests/unit/test_triton_cpu.py (TRITON_INTERPRET=1)")

gpu = pytest.importorskip("e8vllm.vllm_plugin.gpu")

from e8vllm.kernels.reference import paged_attention, write_kv_cache  # noqa: E402
from e8vllm.kernels.triton import fp16_operand_reference  # noqa: E402
from e8vllm.kernels.triton.cases import random_case  # noqa: E402


def _impl(monkeypatch, kernels: str):
    monkeypatch.setenv(gpu.KERNELS_ENV, kernels)
    monkeypatch.delenv("E8VLLM_KV_CALIBRATION", raising=False)
    return gpu.E8TritonImpl(8, 64, 64 ** -0.5, 2, None, None, "e8_k4v4")


@pytest.mark.parametrize("fail", [False, True])
def test_impl_compiles_write_and_attention_variants_when_built(fail, monkeypatch, caplog):
    """On CUDA the impl's constructor warms the write variants and the attention variants for its
    shape (device, heads, head size, the model's dtype, its scale, the engine's block size and batch
    limit); a failing warm-up is logged, not raised (the kernels then compile at first use)."""
    calls = []

    def warm_attn(*args, **kw):
        calls.append(("attention", *args, kw))
        if fail:
            raise RuntimeError("no compiler")
        return [16]

    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(gpu, "prepare_device_constants", lambda *a: None)
    monkeypatch.setattr(gpu, "warm_write_paths", lambda *a, **kw: calls.append(("write", *a, kw)) or [1])
    monkeypatch.setattr(gpu, "warm_attention_paths", warm_attn)
    with caplog.at_level("WARNING", logger=gpu.logger.name):
        impl = _impl(monkeypatch, "triton")
    dt = torch.get_default_dtype()
    # no vLLM config here: the defaults (block size 16, up to 4,096 sequences, the default dtype)
    assert calls == [("write", impl.fmt, "cuda:0", 2, 64, dt, {"block_size": 16}),
                     ("attention", impl.fmt, "cuda:0", 8, 2, 64, dt, 64 ** -0.5, {"block_size": 16, "max_seqs": 4096})]
    assert ("compiling the attention kernels ahead of inference failed" in caplog.text) == fail


def test_impl_reads_the_engine_shape_from_the_vllm_config(monkeypatch):
    """The warm-up's block size, batch limit and dtype are the engine's (vLLM's current config)."""
    import vllm.config as vc

    cfg = SimpleNamespace(model_config=SimpleNamespace(model="/nonexistent", max_model_len=8336, dtype=torch.bfloat16),
                          cache_config=SimpleNamespace(block_size=32), scheduler_config=SimpleNamespace(max_num_seqs=96))
    monkeypatch.setattr(vc, "get_current_vllm_config", lambda: cfg)
    impl = _impl(monkeypatch, "triton")
    assert (impl._e8_block_size, impl._e8_max_seqs, impl._e8_dtype, impl._e8_max_len) == (32, 96, torch.bfloat16, 8336)


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_impl_routes_and_matches_reference(kernels, monkeypatch, one_thread):
    impl = _impl(monkeypatch, kernels)
    assert impl._triton == (kernels == "triton")
    gpu.CALLS.clear()
    case = random_case(impl.fmt, [40, 18], [1, 18], h_q=8, h_kv=2, write=False)
    cache = torch.zeros_like(case.kv_cache)
    impl.do_kv_cache_update(None, case.key, case.value, cache, case.slots)
    ref_cache = torch.zeros_like(case.kv_cache)
    write_kv_cache(case.key, case.value, ref_cache, case.slots, impl.fmt)
    assert torch.equal(cache, ref_cache)
    qsl = case.query_start_loc
    md = SimpleNamespace(num_actual_tokens=int(qsl[-1]), max_query_len=case.max_query_len, query_start_loc=qsl,
                         seq_lens=case.seq_lens, block_table=case.block_table)
    out = torch.zeros(case.query.shape[0], 8 * 64)
    impl.forward(None, case.query.reshape(-1, 8 * 64), None, None, cache, md, out)
    ref = paged_attention(case.query, cache, qsl, case.seq_lens, case.block_table, impl.fmt).double()
    emu = fp16_operand_reference(case.query, cache, qsl, case.seq_lens, case.block_table, impl.fmt)
    err = (out.view_as(case.query).double() - ref).abs().max().item()
    if kernels == "triton":
        assert err <= 4 * (emu - ref).abs().max().item()
        assert gpu.CALLS.get("triton_write") == 1 and gpu.CALLS.get("triton_attn") == 1
    else:
        assert err < 1e-5
        assert gpu.CALLS.get("torch_write") == 1 and gpu.CALLS.get("torch_attn") == 1


def test_calibration_with_key_maps_routes_through_kernels(monkeypatch, tmp_path, one_thread):
    """With a calibration (static, RoPE and sink centers, and a key map), the Triton path writes the
    same codes as the PyTorch path and its attention agrees within the fp16-operand error; without
    the map applied on both sides (q' = q M⁻¹, k' = M (k − c)) the outputs would differ at O(1)."""
    from e8vllm import calibration as cal
    from e8vllm.vllm_plugin import spec as e8spec

    g = torch.Generator().manual_seed(5)
    layers, h_kv, h_q, d, length, n = 2, 2, 8, 64, 37, 5
    eye = torch.eye(d).expand(layers, h_kv, d, d)
    c = cal.KVCenters(torch.randn(layers, h_kv, d, generator=g) * 2, torch.randn(layers, h_kv, d, generator=g),
                      meta={"tokens": "synthetic"}, k_rope=torch.randn(layers, h_kv, d, generator=g) * 2,
                      rope_inv_freq=10000.0 ** (-torch.arange(0, d, 2).float() / d), rope_scale=1.0,
                      k_sink=torch.randn(layers, h_kv, d, generator=g) * 3,
                      k_map=(eye + 0.3 * torch.randn(layers, h_kv, d, d, generator=g) / d ** 0.5).contiguous())
    path = str(c.save(tmp_path / "c.safetensors"))
    k = torch.randn(length, h_kv, d, generator=g) + c.k_mean[1]
    v = torch.randn(length, h_kv, d, generator=g)
    q = torch.randn(n, h_q, d, generator=g)
    block = 16
    blocks = torch.tensor([3, 0, 2], dtype=torch.int32)
    pos = torch.arange(length)
    slots = blocks[pos // block].long() * block + pos % block
    layer = SimpleNamespace(layer_name="model.layers.1.self_attn.attn")
    res = {}
    try:
        for kernels in ("triton", "torch"):
            impl = _impl(monkeypatch, kernels)  # read on the first call with a layer, below
            monkeypatch.setenv(cal.CALIBRATION_ENV, path)
            cal.load_centers.cache_clear()
            e8spec._reset_active_dtype()
            gpu.CALLS.clear()
            assert impl._k_mapped is False  # set up on the first call with a layer
            cache = torch.zeros(4, h_kv, block, impl.fmt.slot_bytes, dtype=torch.uint8)
            impl._e8_write(k, v, cache, slots, layer, positions=pos)
            md = SimpleNamespace(num_actual_tokens=n, max_query_len=n,
                                 query_start_loc=torch.tensor([0, n], dtype=torch.int32),
                                 seq_lens=torch.tensor([length], dtype=torch.int32), block_table=blocks[None])
            out = torch.zeros(n, h_q * d)
            impl._e8_forward(q.reshape(n, -1), cache, md, out, layer=layer)
            assert impl._k_mapped
            assert gpu.CALLS.get(f"{kernels}_write") == 1 and gpu.CALLS.get(f"{kernels}_attn") == 1
            res[kernels] = (cache, out.view(n, h_q, d).double())
    finally:
        cal.load_centers.cache_clear()
        e8spec._reset_active_dtype()
    assert torch.equal(res["triton"][0], res["torch"][0])
    err = (res["triton"][1] - res["torch"][1]).abs().max().item()
    assert err < 2e-3 * res["torch"][1].abs().max().item(), err


@pytest.mark.parametrize("telemetry_on", [False, True])
@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_cuda_graph_level_does_not_depend_on_telemetry(telemetry_on, kernels, monkeypatch, tmp_path):
    """Full decode graphs on the fused kernels whether or not the live-error sampler is on (it skips
    calls made during a capture); none on the PyTorch path (host syncs). Until session 18 the sampler,
    on by default in ``e8vllm serve``, turned graphs off."""
    from e8vllm import telemetry
    from e8vllm.vllm_plugin import spec as e8spec

    monkeypatch.setenv(gpu.KERNELS_ENV, kernels)
    for var in (telemetry.DIR_ENV, telemetry.SAMPLE_EVERY_ENV):
        monkeypatch.delenv(var, raising=False)
    if telemetry_on:
        monkeypatch.setenv(telemetry.DIR_ENV, str(tmp_path))
        monkeypatch.setenv(telemetry.SAMPLE_EVERY_ENV, "4")
    monkeypatch.setitem(telemetry._SAMPLER, "pid", None)  # built anew from this environment
    assert (telemetry.sampler() is not None) == telemetry_on
    monkeypatch.setitem(e8spec._ACTIVE, "dtype", "e8_k4v4")
    level = gpu.E8TritonMetadataBuilder.get_cudagraph_support(None, SimpleNamespace(head_size=128))
    want = gpu.AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE if kernels == "triton" else gpu.AttentionCGSupport.NEVER
    assert level == want


def test_reference_path_on_cuda_is_reported_once(monkeypatch, caplog):
    """A format without fused kernels (here head size 32) runs the PyTorch path on CUDA: a warning,
    once per dtype and head size; choosing that path (E8VLLM_GPU_KERNELS=torch) is only logged as info."""
    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu, "_REFERENCE_WARNED", set())
    monkeypatch.delenv(gpu.KERNELS_ENV, raising=False)
    monkeypatch.delenv("E8VLLM_KV_CALIBRATION", raising=False)
    with caplog.at_level("INFO", logger=gpu.logger.name):
        for _ in range(2):
            impl = gpu.E8TritonImpl(4, 32, 32 ** -0.5, 2, None, None, "e8_k4v4")
            assert not impl._triton
    warn = [r for r in caplog.records if r.levelname == "WARNING" and "reference path" in r.getMessage()]
    assert len(warn) == 1 and "head size 32" in warn[0].getMessage()
    caplog.clear()
    with caplog.at_level("INFO", logger=gpu.logger.name):
        _impl(monkeypatch, "torch")
    recs = [r for r in caplog.records if "reference path" in r.getMessage()]
    assert [r.levelname for r in recs] == ["INFO"] and "E8VLLM_GPU_KERNELS=torch" in recs[0].getMessage()
