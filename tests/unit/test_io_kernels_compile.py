"""The query-rotation and output kernels around the decode grid
(:func:`e8vllm.kernels.triton.e8_kv._e8_rotate_q_kernel`, ``_e8_output_kernel``) compiled for sm_90
on a machine without a GPU: the interpreter tests (``test_triton_e8.py``) run their arithmetic, the
compiler type-checks them (the runtime branches on a scalar, the butterflies' reshapes)."""

from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiles for a GPU target; the interpreter cannot", allow_module_level=True)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
triton = pytest.importorskip("triton")

from e8vllm.kernels.triton import e8_kv  # noqa: E402


def _compile(fn, ptrs: dict[str, str], const: dict):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {a: ("constexpr" if a in const else ptrs.get(a, "i32")) for a in fn.arg_names}
    try:
        return triton.compile(ASTSource(fn, sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4, "num_stages": 1})
    except RuntimeError as e:  # pragma: no cover - no ptxas for this platform
        if "ptxas" in str(e):
            pytest.skip(f"no ptxas: {e}")
        raise


@pytest.mark.parametrize("d", [64, 128])
def test_rotate_q_kernel_compiles_for_sm90(d):
    k = _compile(e8_kv._e8_rotate_q_kernel, {"q_ptr": "*bf16", "qr_ptr": "*fp32", "pm1_ptr": "*fp32", "mul": "fp32"},
                 dict(D=d, BH=e8_kv.HEAD_BLOCK, LOG_B=d.bit_length() - 1))
    assert "st.global" in k.asm["ptx"]


@pytest.mark.parametrize("ws,has_o,segs,out", [(1, 0, 8, "*bf16"), (1, 1, 64, "*fp16"), (1, 0, 6, "*bf16"), (0, 1, 1, "*fp32")],
                         ids=["decode", "mixed", "decode-6-segments", "tile-grid-only"])
def test_output_kernel_compiles_for_sm90(ws, has_o, segs, out):
    ptrs = {"out_ptr": out, "o_ptr": "*fp32", "ws_m_ptr": "*fp32", "ws_l_ptr": "*fp32", "ws_o_ptr": "*fp32",
            "qsl_ptr": "*i32", "pm1_ptr": "*fp32", "inv_sqrt_b": "fp32"}
    k = _compile(e8_kv._e8_output_kernel, ptrs, dict(D=128, NUM_SEGS=segs, SEGS_P2=triton.next_power_of_2(segs), LOG_B=7,
                                                     WS=ws, HAS_O=has_o))
    assert "st.global" in k.asm["ptx"]
