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
    monkeypatch.delenv("E8VLLM_CALIBRATION", raising=False)
    return gpu.E8TritonImpl(8, 64, 64 ** -0.5, 2, None, None, "e8_k4v4")


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
