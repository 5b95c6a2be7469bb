"""The Gluon decode kernel (:mod:`e8vllm.kernels.triton.e8_gluon`) on a machine without a GPU.

Gluon kernels do not run in ``TRITON_INTERPRET``; their numbers are tested on the H200
(``tests/gpu/test_triton_e8_gpu.py::test_gluon_decode_cuda``). Here the kernel is compiled for sm_90
with the installed Triton (its bundled ``ptxas``), which checks what the design relies on:

* every operand ``convert_layout`` is a register renaming (the kernel asserts it: ``assert_trivial``
  fails the compile otherwise);
* the only shared memory is the value-table image at offset 0 (the lookups address it as
  ``global_smem + offset``): the kernel's shared-memory size equals the image's;
* the operand orders are permutations, and the host-side image has the documented layout.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("Gluon kernels compile for a GPU target; the interpreter cannot trace them", allow_module_level=True)

# Triton 3.9 warns unless the fp-fusion default is explicit; 1 = the default of the Triton vLLM runs with
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
triton = pytest.importorskip("triton")
gluon_mod = pytest.importorskip("e8vllm.kernels.triton.e8_gluon")

from e8vllm.kernels.reference import E8KVFormat  # noqa: E402
from e8vllm.kernels.triton import e8_kv  # noqa: E402

TYPES = dict(q_ptr="*fp32", sq0="i32", sq1="i32", ws_m_ptr="*fp32", ws_l_ptr="*fp32", ws_o_ptr="*fp32",
             cache_ptr="*i32", cs0="i32", cs1="i32", cs2="i32", tab_ptr="*i32", k_stab="*fp32", v_stab="*fp32",
             bt_ptr="*i32", sbt0="i32", qsl_ptr="*i32", sl_ptr="*i32", num_heads="i32")


def _compile(d: int, nq: int, key_pairs: bool, sets: int = 2, tile: int = 16):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    n_pad = 8 if nq <= 8 else 16
    gb = 2 if d == 128 else 1
    const = dict(NQ=nq, NP=n_pad, D=d, BLOCK_SIZE=16, NUM_SEGS=16, TN=tile, KP=int(key_pairs),
                 TABN=2048 if key_pairs else 64, PF=0, LAZY=0, ORDER=0, DIAG=0, KS=sets, VS=sets, KGB=gb, VGB=gb,
                 **gluon_mod.decode_layouts(d, n_pad, tile))
    fn = gluon_mod._gl_decode_kernel
    sig = {a: ("constexpr" if a in const else TYPES[a]) for a in fn.arg_names}
    src = GluonASTSource(fn, sig, constexprs=const)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})


@pytest.mark.parametrize("d,nq,key_pairs,sets", [(128, 4, False, 2), (128, 4, True, 2), (64, 3, False, 2),
                                                 (128, 16, False, 1), (128, 8, True, 1)])
def test_gluon_decode_compiles_with_only_the_table_in_shared_memory(d, nq, key_pairs, sets):
    try:
        k = _compile(d, nq, key_pairs, sets)
    except RuntimeError as e:  # pragma: no cover - no ptxas for this platform
        if "ptxas" in str(e):
            pytest.skip(f"no ptxas: {e}")
        raise
    image = (2048 if key_pairs else 64) * 4
    assert k.metadata.shared == image
    ptx = k.asm["ptx"]
    assert ptx.count("ld.shared.b32" if key_pairs else "ld.shared.b16") > 0
    assert "mma.sync.aligned.m16n8k16" in ptx
    assert "st.shared" in ptx and ptx.count("bar.sync") == 1  # the image is stored once, then read only


def test_operand_orders_are_permutations_of_whole_words():
    for d in (64, 128):
        for order in (gluon_mod.key_order(d), gluon_mod.value_order(d)):
            assert sorted(order.tolist()) == list(range(d))
        # key lane t = (κ >> 1) & 3 holds whole words: word = order // 8 takes d/32 words per lane
        k = gluon_mod.key_order(d)
        for t in range(4):
            pos = [i for i in range(d) if (i >> 1) & 3 == t]
            words = {int(k[i]) // 8 for i in pos}
            assert len(words) * 8 == len(pos)
        v = gluon_mod.value_order(d)
        for g in range(8):
            pos = [i for i in range(d) if i & 7 == g]
            words = {int(v[i]) // 8 for i in pos}
            assert len(words) * 8 == len(pos)


def test_table_image_layout():
    fmt = E8KVFormat.from_bits(128, 4, 4)
    c = e8_kv.TritonE8Format.get(fmt, "cpu")
    img = gluon_mod._tables(c, key_pairs=False)
    assert img.dtype == torch.int32 and img.numel() == 64
    halves = img.view(torch.float16)
    assert torch.equal(halves[:64], c.k.table_h) and torch.equal(halves[64:], c.v.table_h)
    img = gluon_mod._tables(c, key_pairs=True)
    assert img.numel() == 2048
    assert torch.equal(img[:1024], c.k.pairs) and torch.equal(img[1024:1056].view(torch.float16), c.v.table_h)
    # a pair entry is (T[lo], T[hi]) of its set and coset: entry (s*2 + c)*256 + (hi << 4 | lo)
    pairs = img[:1024].view(torch.float16).view(1024, 2)
    tab = c.k.table_h.view(4, 16)
    for sc, lo, hi in ((0, 3, 9), (1, 15, 0), (3, 7, 7)):
        assert torch.equal(pairs[sc * 256 + (hi << 4 | lo)], torch.stack([tab[sc, lo], tab[sc, hi]]))


def test_gluon_setting_needs_a_gpu_target():
    if e8_kv.GLUON:
        cfg = e8_kv.kernel_config(e8_kv.DECODE_CONFIG, {"gluon": 1}, "x")
        assert cfg["gluon"] == 1
    else:  # pragma: no cover - interpreter or no Gluon
        with pytest.raises(ValueError, match="gluon 1 needs"):
            e8_kv.kernel_config(e8_kv.DECODE_CONFIG, {"gluon": 1}, "x")
    with pytest.raises(ValueError, match="gluon_tile"):
        e8_kv.kernel_config(e8_kv.DECODE_CONFIG, {"gluon_tile": 8}, "x")
    with pytest.raises(ValueError, match="gluon_kp"):
        e8_kv.kernel_config(e8_kv.DECODE_CONFIG, {"gluon_kp": 2}, "x")


def test_decode_segments_grow_for_small_batches(monkeypatch):
    """The Gluon decode grid takes more KV segments for small batches (16 one-warp programs per SM,
    at most MAX_SEGMENTS), a function of the batch shape only (CUDA graphs)."""
    monkeypatch.setattr(e8_kv, "_sm_count", lambda device: 132)
    dev = torch.device("cpu")
    assert e8_kv._gluon_segs(64, 8, dev, 16) == 16  # 8,192 programs already
    assert e8_kv._gluon_segs(16, 8, dev, 16) == 32  # 16 x 8 x 16 = 2,048 < 2,112 programs
    assert e8_kv._gluon_segs(8, 8, dev, 16) == 64
    assert e8_kv._gluon_segs(1, 8, dev, 16) == e8_kv.MAX_SEGMENTS
    assert e8_kv._gluon_segs(1, 8, dev, 128) == 128  # an explicit larger base stays
