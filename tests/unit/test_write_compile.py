"""The write kernel (:func:`e8vllm.kernels.triton.e8_kv._e8_write_kernel`) compiled for sm_90 on a
machine without a GPU.

The interpreter tests (``test_triton_e8.py``) run its arithmetic, but ``TRITON_INTERPRET`` does not
type-check the kernel as the compiler does (a loop-carried variable that changes shape passes there
and fails to compile on a GPU). Compiling the small-write settings here catches that before the H200.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiles for a GPU target; the interpreter cannot", allow_module_level=True)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
triton = pytest.importorskip("triton")

from e8vllm.kernels.triton import e8_kv  # noqa: E402

PTRS = {"k_ptr": "*bf16", "v_ptr": "*bf16", "slot_ptr": "*i64", "cache_ptr": "*u8", "k_isb": "fp32", "v_isb": "fp32",
        **{f"{p}_{t}": "*fp32" for p in "kv" for t in ("pm1", "tab", "mid", "fac", "stab")}}


@pytest.mark.parametrize("block_rows,par,how,log_b,sets,maxnreg", [(1, True, "floor", 0, 2, 0), (1, True, "ceil", 0, 2, 0),
                                                                  (2, False, None, 0, 2, 0), (1, True, "floor", 7, 2, 0),
                                                                  (2, True, "floor", 0, 1, 0), (1, True, "floor", 7, 1, 0),
                                                                  (1, True, "floor", 7, 2, 128)],
                         ids=["one-row-parallel-8+1", "one-row-parallel-16", "two-rows-loop", "one-row-butterflies",
                              "fp16-scales-two-rows-parallel", "fp16-scales-one-row-butterflies",
                              "one-row-butterflies-maxnreg-128"])
def test_write_kernel_compiles_for_sm90(block_rows, par, how, log_b, sets, maxnreg):
    """Each small-write setting; ``sets`` 1: the ``e8-*`` formats (fp16 scales, a candidate loop over
    scale factors), 2: ``e8s-*`` / ``e8c-*`` (table sets, exponent bytes); ``maxnreg``: a register cap
    (``E8VLLM_SMALL_WRITE_MAXNREG``), which the compiled kernel keeps."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = e8_kv._e8_write_kernel
    nc = e8_kv.par_candidates(9, how) if par else 1
    assert nc == {"floor": 8, "ceil": 16, None: 1}[how]
    const = dict(D=128, KB=4, VB=4, KNS=9, VNS=9, BLOCK_R=block_rows, KS=sets, VS=sets, KGB=sets, VGB=sets, PAR=par, KNC=nc,
                 VNC=nc, LOG_B=log_b)
    sig = {a: ("constexpr" if a in const else PTRS.get(a, "i32")) for a in fn.arg_names}
    opts = {"num_warps": 4, "num_stages": 1, **({"maxnreg": maxnreg} if maxnreg else {})}
    try:
        k = triton.compile(ASTSource(fn, sig, constexprs=const), target=GPUTarget("cuda", 90, 32), options=opts)
    except RuntimeError as e:  # pragma: no cover - no ptxas for this platform
        if "ptxas" in str(e):
            pytest.skip(f"no ptxas: {e}")
        raise
    assert "st.global" in k.asm["ptx"]
    if maxnreg:
        assert f".maxnreg {maxnreg}" in k.asm["ptx"]
