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
             cache_ptr="*i32", cs0="i32", cs1="i32", tab_ptr="*i32", k_stab="*fp32", v_stab="*fp32",
             bt_ptr="*i32", sbt0="i32", qsl_ptr="*i32", sl_ptr="*i32", num_heads="i32")


def _image_words(key_pairs: bool, lut: int) -> int:
    return 2048 if key_pairs else (128 if lut else 64)


def _fmt(d: int, sets: int):
    """The e8s-4bit (sets 2: table lookups) or e8-4bit (sets 1) format's constants."""
    return e8_kv.TritonE8Format.get(E8KVFormat.from_bits(d, 4, 4, "switched" if sets == 2 else "search"), "cpu")


def _compile_const(const: dict[str, int]):
    """The decode kernel compiled for sm_90 with the launch constants ``const`` (skips without ptxas)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = gluon_mod._gl_decode_kernel
    sig = {a: ("constexpr" if a in const else TYPES[a]) for a in fn.arg_names}
    try:
        return triton.compile(GluonASTSource(fn, sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 1})
    except RuntimeError as e:  # pragma: no cover - no ptxas for this platform
        if "ptxas" in str(e):
            pytest.skip(f"no ptxas: {e}")
        raise


def _compile(d: int, nq: int, key_pairs: bool, sets: int = 2, tile: int = 16, lut: int = 0, pf: int = 0,
             async_ring: int = 0):
    c = _fmt(d, sets)
    assert c.k.sets == sets
    return _compile_const(gluon_mod.launch_constexprs(c, nq=nq, d=d, block_size=16, segs=16, tile=tile,
                                                      key_pairs=key_pairs, prefetch=pf, lut=lut,
                                                      async_ring=async_ring))


def test_launch_arguments_serialize_for_jit_hooks():
    """A launch's compile-time arguments are plain ints: Triton's JIT hooks serialize them as JSON
    (vLLM 0.26's JIT monitor installs one; with layout objects among them, a kernel compiled during
    inference raised TypeError inside vLLM, seen on the H200 in session 12). Every kernel argument
    is either one of these or a runtime argument."""
    import json

    for d, sets, kp, lut, ar in ((128, 2, False, 0, 0), (128, 1, True, 1, 0), (64, 2, False, 1, 0), (128, 2, False, 0, 1)):
        const = gluon_mod.launch_constexprs(_fmt(d, sets), nq=4, d=d, block_size=16, segs=16, key_pairs=kp, lut=lut,
                                            async_ring=ar)
        assert json.loads(json.dumps(const)) == const
        assert all(type(v) is int for v in const.values())
        assert set(gluon_mod._gl_decode_kernel.arg_names) == set(const) | set(TYPES)
        assert const["TABN"] == gluon_mod._tables(_fmt(d, sets), kp, lut).numel()


@pytest.mark.parametrize("d,nq,key_pairs,sets,lut,pf", [
    (128, 4, False, 2, 0, 0), (128, 4, True, 2, 0, 0), (64, 3, False, 2, 0, 0), (128, 16, False, 1, 0, 0),
    (128, 8, True, 1, 0, 0), (128, 4, False, 2, 1, 2), (128, 4, True, 2, 1, 0), (64, 3, False, 1, 1, 1)])
def test_gluon_decode_compiles_with_only_the_table_in_shared_memory(d, nq, key_pairs, sets, lut, pf):
    k = _compile(d, nq, key_pairs, sets, lut=lut, pf=pf)
    image = _image_words(key_pairs, lut) * 4
    assert k.metadata.shared == image
    ptx = k.asm["ptx"]
    assert ptx.count("ld.shared.b32" if key_pairs else "ld.shared.b16") > 0
    assert "mma.sync.aligned.m16n8k16" in ptx
    assert "st.shared" in ptx and ptx.count("bar.sync") == 1  # the image is stored once, then read only


@pytest.mark.parametrize("d,lut,sets", [(128, 0, 2), (128, 1, 2), (64, 0, 1)])
def test_gluon_async_ring_compiles_into_one_allocation(d, lut, sets):
    """``gluon_async`` 1: the codes go through a two-stage cp.async ring. Its words share the one
    shared-memory allocation with the table image (still at offset 0, where the lookups address it):
    the kernel's shared memory is exactly that buffer; the copies are cp.async, waited for by group."""
    k = _compile(d, 4, False, sets, lut=lut, async_ring=1)
    const = gluon_mod.launch_constexprs(_fmt(d, sets), nq=4, d=d, block_size=16, segs=16, lut=lut, async_ring=1)
    assert k.metadata.shared == const["BUFN"] * 4
    assert const["TO"] == const["TABN"] and const["RO"] == 2 * 16 * d // 4 == const["BUFN"] // 2
    ptx = k.asm["ptx"]
    assert "cp.async.ca.shared.global" in ptx and "cp.async.wait_group" in ptx and "mma.sync.aligned.m16n8k16" in ptx
    with pytest.raises(ValueError, match="async ring"):
        gluon_mod.launch_constexprs(_fmt(d, sets), nq=4, d=d, block_size=16, segs=16, key_pairs=True, async_ring=1)


def test_operand_orders_are_permutations_of_whole_words():
    for d in (64, 128):
        for order in (gluon_mod.key_order(d), gluon_mod.key_order(d, ar=True), gluon_mod.value_order(d)):
            assert sorted(order.tolist()) == list(range(d))
        # key lane t = (κ >> 1) & 3 holds whole words: word = order // 8 takes d/32 words per lane
        for k in (gluon_mod.key_order(d), gluon_mod.key_order(d, ar=True)):
            for t in range(4):
                pos = [i for i in range(d) if (i >> 1) & 3 == t]
                words = {int(k[i]) // 8 for i in pos}
                assert len(words) * 8 == len(pos)
        # the arithmetic decode's operand registers (κ, κ + 1) hold fields j and j + 4 of one word
        ka = gluon_mod.key_order(d, ar=True)
        assert all(int(ka[i + 1]) == int(ka[i]) + 4 for i in range(0, d, 2))
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


def _f16_bits(x: float) -> int:
    """fp16 bits of float64 ``x`` rounded once to nearest even (``e8c.round_fp16``: torch's own
    float64 -> float16 conversion rounds twice, through float32)."""
    from e8vllm.codecs.e8c import round_fp16

    return int(round_fp16(torch.tensor([x], dtype=torch.float64)).to(torch.float16).view(torch.int16)[0]) & 0xFFFF


def _f16_value(bits: int) -> float:
    return float(torch.tensor([bits & 0xFFFF], dtype=torch.int32).to(torch.int16).view(torch.float16)[0])


def _f16x2(fn) -> int:  # noqa: ANN001
    """Apply ``fn`` (halves as floats -> exact float64 result) to each half, rounded once to fp16
    (round to nearest even, as .rn; exact in float64 for the operands here: fp16 times a small integer)."""
    lo, hi = fn(0), fn(1)
    return _f16_bits(lo) | (_f16_bits(hi) << 16)


def _run_ptx(asm: str, args: dict[str, int], smem: torch.Tensor) -> dict[str, int]:
    """Run the kernel's inline PTX (:data:`e8_gluon._BYTE_LOOKUP_ASM`, ``_AR_KEY_ASM``,
    ``_AR_VALUE_ASM``, ``_VP_ASM``) on the host: its instructions (mov of ``global_smem`` = 0 and of constants,
    shl, shr, and, mul.lo, add, lop3, prmt, ld.shared.b16 / .b32 / .v4.b32, sub / fma.rn.f16x2, the
    unpacking mov of a 32-bit register into two halves) over 32-bit registers, loads from ``smem``
    (bytes); returns the registers ($0.. the outputs, 16-bit ones as fp16 bits)."""
    reg = dict(args)
    m32 = 0xFFFFFFFF

    def val(x: str) -> int:
        x = x.strip()
        return reg[x] if x in reg else int(x, 0)

    def half(r: int, i: int) -> float:
        return _f16_value(r >> (16 * i))

    for ins in asm.strip()[1:-1].split(";"):
        ins = ins.strip()
        if not ins or ins.startswith(".reg"):
            continue
        op, rest = ins.split(None, 1)
        if rest.startswith("{"):  # a vector destination: {a, b, ..}, src
            dst, src = rest[1:].split("}", 1)
            ops = ["{" + dst + "}", src.lstrip(" ,")]
        else:
            ops = [o.strip() for o in rest.split(",")]
        if op in ("mov.u32", "mov.b32") and ops[1] == "global_smem":
            reg[ops[0]] = 0
        elif op == "mov.b32" and ops[0].startswith("{"):
            lo, hi = (x.strip() for x in ops[0].strip("{}").split(","))
            reg[lo], reg[hi] = val(ops[1]) & 0xFFFF, val(ops[1]) >> 16
        elif op == "mov.b32":
            reg[ops[0]] = val(ops[1]) & m32
        elif op == "and.b32":
            reg[ops[0]] = val(ops[1]) & val(ops[2])
        elif op == "mul.lo.u32":
            reg[ops[0]] = (val(ops[1]) * val(ops[2])) & m32
        elif op == "prmt.b32":  # default mode: result byte i = byte sel[4i:4i+4] & 7 of {b, a}
            a, b, sel = val(ops[1]), val(ops[2]), val(ops[3])
            both = a | (b << 32)
            reg[ops[0]] = sum(((both >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))
            assert all((sel >> (4 * i)) & 8 == 0 for i in range(4)), "sign-replicate selectors are not emulated"
        elif op == "sub.rn.f16x2":
            a, b = val(ops[1]), val(ops[2])
            reg[ops[0]] = _f16x2(lambda i: half(a, i) - half(b, i))
        elif op == "fma.rn.f16x2":
            a, b, c = val(ops[1]), val(ops[2]), val(ops[3])
            reg[ops[0]] = _f16x2(lambda i: half(a, i) * half(b, i) + half(c, i))
        elif op == "ld.shared.v4.b32":
            addr = val(ops[1].strip("[]"))
            assert addr % 16 == 0 and addr + 16 <= smem.numel(), f"load at {addr} outside the {smem.numel()}-byte image"
            words = smem[addr:addr + 16].view(torch.int32).tolist()
            for name, w in zip((x.strip() for x in ops[0].strip("{}").split(",")), words):
                reg[name] = w & m32
        elif op == "shl.b32":
            reg[ops[0]] = (val(ops[1]) << val(ops[2])) & m32
        elif op == "shr.u32":
            reg[ops[0]] = (val(ops[1]) & m32) >> val(ops[2])
        elif op == "add.u32":
            reg[ops[0]] = (val(ops[1]) + val(ops[2])) & m32
        elif op == "lop3.b32":
            a, b, c, lut = (val(o) for o in ops[1:])
            r = 0
            for i in range(8):  # truth table bit i: a = bit 2, b = bit 1, c = bit 0 of i
                if lut >> i & 1:
                    r |= (a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c)
            reg[ops[0]] = r & m32
        elif op == "ld.shared.b32":
            addr = val(ops[1].strip("[]"))
            assert addr % 4 == 0 and addr + 4 <= smem.numel(), f"load at {addr} outside the {smem.numel()}-byte image"
            reg[ops[0]] = int(smem[addr:addr + 4].view(torch.int32)[0]) & m32
        elif op == "ld.shared.b16":
            addr = val(ops[1].strip("[]"))
            assert addr % 2 == 0 and addr + 2 <= smem.numel(), f"load at {addr} outside the {smem.numel()}-byte image"
            reg[ops[0]] = int(smem[addr:addr + 2].view(torch.int16)[0]) & 0xFFFF
        else:
            raise AssertionError(f"unexpected PTX instruction {ins!r}")
    return reg


def _byte_layout_values(img: torch.Tensor, w: int, st: int, isv: int, base: int) -> list[float]:
    """The 8 values :func:`e8_gluon._word_values_b` loads for word ``w`` (table set ``st``, K or V):
    its table bases (the same arithmetic as the kernel's) and its inline PTX run on the image."""
    raw = img.view(torch.uint8)
    par = sum((w >> (4 * i)) & 1 for i in range(7)) & 1
    cb = (((w >> 28) & 1) << 1) | (st << 2)
    cbo, cbe = cb | (base + isv * 8), cb * 16 + base + 256 + isv * 128
    reg = _run_ptx(gluon_mod._BYTE_LOOKUP_ASM.value, {"$8": w, "$9": cbe, "$10": cbo, "$11": cbo | (par << 4)}, raw)
    return [float(torch.tensor([reg[f"${i}"]], dtype=torch.int32).to(torch.int16).view(torch.float16)[0])
            for i in range(8)]


@pytest.mark.parametrize("key_pairs", [False, True])
def test_byte_layout_lookups_give_the_field_values(key_pairs):
    """The byte-layout tables (``gluon_lut`` 1) with the kernel's index arithmetic give, for every
    field of random words, T[set][coset][v_i] with v_7 = (f_7 & ~1) | parity of fields 0..6 (the
    decode the other lookups and the reference use), for K and V and both table sets."""
    fmt = E8KVFormat.from_bits(128, 4, 4)
    c = e8_kv.TritonE8Format.get(fmt, "cpu")
    img = gluon_mod._tables(c, key_pairs=key_pairs, lut=1)
    assert img.numel() == _image_words(key_pairs, 1)
    g = torch.Generator().manual_seed(3)
    words = torch.randint(0, 1 << 32, (300,), generator=g, dtype=torch.int64).tolist()
    for isv, tab in ((0, c.k.table_h), (1, c.v.table_h)):
        if key_pairs and not isv:
            continue  # keys take the pair table there
        base = 4096 if key_pairs else 0
        for st in (0, 1):
            for w in words:
                f = [(w >> (4 * i)) & 15 for i in range(8)]
                par = sum(x & 1 for x in f[:7]) & 1
                v = f[:7] + [(f[7] & ~1) | par]
                cbit = (w >> 28) & 1
                want = [float(tab[(st << 5) | (cbit << 4) | x]) for x in v]
                assert _byte_layout_values(img, w, st, isv, base) == want, (hex(w), st, isv)
    if key_pairs:
        assert torch.equal(img[:1024], c.k.pairs)


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
    assert e8_kv.kernel_config(e8_kv.DECODE_CONFIG, {"gluon_lut": 2}, "x")["gluon_lut"] == 2  # value pairs
    with pytest.raises(ValueError, match="gluon_lut"):
        e8_kv.kernel_config(e8_kv.DECODE_CONFIG, {"gluon_lut": 3}, "x")
    with pytest.raises(ValueError, match="gluon_prefetch"):
        e8_kv.kernel_config(e8_kv.DECODE_CONFIG, {"gluon_prefetch": 3}, "x")
    assert e8_kv.kernel_config(e8_kv.DECODE_CONFIG, {"gluon_prefetch": 2}, "x")["gluon_prefetch"] == 2
    with pytest.raises(ValueError, match="gluon_async"):
        e8_kv.kernel_config(e8_kv.DECODE_CONFIG, {"gluon_async": 1, "gluon_kp": 1}, "x")
    assert e8_kv.kernel_config(e8_kv.DECODE_CONFIG, {"gluon_async": 1}, "x")["gluon_async"] == 1
    # the default ring (session 13) gives way to settings it cannot take, unless it is asked for
    base = e8_kv.kernel_config(e8_kv.DECODE_CONFIG, {"gluon_async": 1}, "x")
    for extra in ({"gluon_kp": 1}, {"gluon_prefetch": 2}):
        assert e8_kv.kernel_config(base, extra, "x")["gluon_async"] == 0


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


def _cubic_fmt(d: int = 128, variant: str = "cubic"):
    """A format with cubic levels on both sides ("cubic"), the keys ("cubic-keys") or the values only
    ("cubic-values": no encoder variant names it; built from the codecs)."""
    if variant == "cubic-values":
        from e8vllm import codecs

        fmt = E8KVFormat(d, codecs.get("e8s-4bit", head_dim=d), codecs.get("e8c-4bit", head_dim=d))
    else:
        fmt = E8KVFormat.from_bits(d, 4, 4, variant)
    return e8_kv.TritonE8Format.get(fmt, "cpu")


def _field_values(w: int) -> tuple[int, list[int]]:
    """(coset bit, the 8 level indices of word w): v_7 = (f_7 & ~1) | parity of fields 0..6."""
    f = [(w >> (4 * i)) & 15 for i in range(8)]
    par = sum(x & 1 for x in f[:7]) & 1
    return (w >> 28) & 1, f[:7] + [(f[7] & ~1) | par]


def test_arithmetic_decode_gives_the_codec_levels():
    """The arithmetic decode's inline PTX (``_AR_KEY_ASM``: one key word; ``_AR_VALUE_ASM``: the value
    words of two tokens), run on the host over the coefficient image with the kernel's offsets
    (16·(c + 2·set) for a key word, 64 + 16·(a + 4·b) for a value pair), gives bit for bit the cubic
    codec's level T[set][c][v_i] (the table the reference and the encoder use), for random words,
    both table sets and both cosets; the fields of one 32-bit result are the operand pairs (j, j + 4)
    of a key word and (token 2i, token 2i + 1) of a value field."""
    c = _cubic_fmt()
    assert gluon_mod.arith_bits(c) == 3 and gluon_mod.arith_bits(_fmt(128, 2)) == 0
    img = gluon_mod._tables(c, key_pairs=False, arith=3)
    assert img.numel() == 128 and torch.equal(img[80:], torch.zeros(48, dtype=torch.int32))
    raw = img.view(torch.uint8)
    g = torch.Generator().manual_seed(5)
    words = torch.randint(0, 1 << 32, (400,), generator=g, dtype=torch.int64).tolist()
    for tab, isv in ((c.k.table_h.view(2, 2, 16), 0), (c.v.table_h.view(2, 2, 16), 1)):
        for i in range(0, len(words) - 1, 2):
            wa, wb = words[i], words[i + 1]
            sa, sb = (i // 2) & 1, (i // 4) & 1
            (ca, va), (cb, vb) = _field_values(wa), _field_values(wb)
            want_a = [_f16_bits(float(tab[sa, ca, x])) for x in va]
            want_b = [_f16_bits(float(tab[sb, cb, x])) for x in vb]
            if isv:
                off = 64 + 16 * (ca + 2 * sa) + 64 * (cb + 2 * sb)
                reg = _run_ptx(gluon_mod._AR_VALUE_ASM.value, {"$16": wa, "$17": wb, "$18": off}, raw)
                assert [reg[f"${j}"] for j in range(8)] == want_a, hex(wa)
                assert [reg[f"${j}"] for j in range(8, 16)] == want_b, hex(wb)
            else:
                reg = _run_ptx(gluon_mod._AR_KEY_ASM.value, {"$8": wa, "$9": 16 * (ca + 2 * sa)}, raw)
                assert [reg[f"${j}"] for j in range(8)] == want_a, hex(wa)


def test_arithmetic_decode_image_with_one_side_cubic():
    """Cubic keys with looked-up values (``cubic-keys``: e8c-4bit K, e8s-4bit V) and the reverse: the
    image holds the cubic side's coefficients where the kernel reads them (keys at byte 0; value pairs
    at :func:`_value_coef_base`) and the other side's fp16 table where its lookups read it (values at
    ``TABLE_BYTES``, keys at 0); the value pair entries equal those of the both-cubic image."""
    both = gluon_mod._tables(_cubic_fmt(), key_pairs=False, arith=3)
    ck = _cubic_fmt(128, "cubic-keys")
    assert gluon_mod.arith_bits(ck) == 1
    img = gluon_mod._tables(ck, key_pairs=False, arith=1)
    assert img.numel() == 64 and torch.equal(img[:16], both[:16]) and not img[16:32].any()
    vt = ck.v.table_h.view(torch.int32)
    assert torch.equal(img[gluon_mod.TABLE_BYTES.value // 4:][:vt.numel()], vt)
    rev = _cubic_fmt(128, "cubic-values")  # values cubic, keys looked up
    assert gluon_mod.arith_bits(rev) == 2
    img2 = gluon_mod._tables(rev, key_pairs=False, arith=2)
    assert img2.numel() == 128 and torch.equal(img2[:32], rev.k.table_h.view(torch.int32))
    vcb = gluon_mod._value_coef_base(2) // 4
    assert vcb == 32 and torch.equal(img2[vcb:vcb + 64], both[16:80]) and gluon_mod._value_coef_base(3) == 64
    for fmt, ar in ((ck, 2), (ck, 3), (rev, 1)):
        with pytest.raises(ValueError, match="cubic level tables"):
            gluon_mod.launch_constexprs(fmt, nq=4, d=128, block_size=16, segs=16, arith=ar)


def test_arithmetic_decode_settings():
    """``gluon_arith`` 1 (the default) decodes cubic codes arithmetically unless key pairs or byte
    tables are asked for; other codes always take the lookups; the launch refuses impossible mixes."""
    cub, e8s = _cubic_fmt(), _fmt(128, 2)
    dc = e8_kv.kernel_config(e8_kv.DECODE_CONFIG, {}, "t")
    assert dc["gluon_arith"] == 1 and e8_kv._gluon_arith(cub, dc) == 3 and e8_kv._gluon_arith(e8s, dc) == 0
    assert e8_kv._gluon_arith(_cubic_fmt(128, "cubic-keys"), dc) == 1
    for extra in ({"gluon_arith": 0}, {"gluon_kp": 1}, {"gluon_lut": 1}):
        assert e8_kv._gluon_arith(cub, e8_kv.kernel_config(e8_kv.DECODE_CONFIG, extra, "t")) == 0
    assert e8_kv._gluon_arith(cub, e8_kv.kernel_config(e8_kv.DECODE_CONFIG, {"gluon_lut": 2}, "t")) == 1  # values
    for bad in ({"arith": 3}, {"async_ring": 0}, {"key_pairs": True}):  # value pairs: looked-up values, the ring
        with pytest.raises(ValueError, match="gluon_lut 2"):
            gluon_mod.launch_constexprs(cub, nq=4, d=128, block_size=16, segs=16, **{"async_ring": 1, "arith": 1,
                                                                                    "lut": 2, **bad})
    with pytest.raises(ValueError, match="gluon_arith must be 0 or 1"):
        e8_kv.kernel_config(e8_kv.DECODE_CONFIG, {"gluon_arith": 2}, "t")
    with pytest.raises(ValueError, match="cubic level tables"):
        gluon_mod.launch_constexprs(e8s, nq=4, d=128, block_size=16, segs=16, arith=1)
    with pytest.raises(ValueError, match="gluon_kp 0 and gluon_lut 0"):
        gluon_mod.launch_constexprs(cub, nq=4, d=128, block_size=16, segs=16, key_pairs=True, arith=3)
    assert gluon_mod.launch_constexprs(cub, nq=4, d=128, block_size=16, segs=16, arith=3)["AR"] == 3


@pytest.mark.parametrize("d,nq,async_ring,variant", [(128, 4, 0, "cubic"), (128, 16, 1, "cubic"), (64, 3, 0, "cubic"),
                                                     (64, 3, 1, "cubic"), (128, 4, 1, "cubic-keys"),
                                                     (64, 3, 0, "cubic-keys"), (128, 4, 1, "cubic-values")])
def test_arithmetic_decode_compiles_without_lookups(d, nq, async_ring, variant):
    """The arithmetic decode compiles for sm_90 (every operand conversion a register renaming); with
    both sides cubic its only shared-memory reads in the decode are the coefficient loads
    (ld.shared.v4), the fields go through f16x2 fused multiply-adds; with one side cubic (``cubic-keys``;
    values only: ``AR`` 2, no default) the other side is still looked up (ld.shared.b16)."""
    c = _cubic_fmt(d, variant)
    ar = gluon_mod.arith_bits(c)
    const = gluon_mod.launch_constexprs(c, nq=nq, d=d, block_size=16, segs=16, async_ring=async_ring, arith=ar)
    k = _compile_const(const)
    ptx = k.asm["ptx"]
    assert "fma.rn.f16x2" in ptx and "ld.shared.v4.b32" in ptx and ("ld.shared.b16" in ptx) == (ar != 3)
    assert k.metadata.shared == const["BUFN"] * 4


@pytest.mark.parametrize("variant", ["", "switched"])
def test_value_pair_lookups_give_the_field_values(variant):
    """``gluon_lut`` 2: the image holds the value pair table at byte 0 and the key part (cubic
    coefficients or the fp16 key table) at ``VPAIR_KEY_BYTES``; the value-pair PTX (``_VP_ASM``), run on
    the host over that image with the kernel's table bases ((set·2 + c) << 10), gives each field's value
    T[set][c][v_i] for two tokens (the parity fix of field 7 included), for random words, both table
    sets and both cosets; the key part still decodes (cubic keys: ``_AR_KEY_ASM`` at the new offset)."""
    c = _fmt(128, 2) if variant else _cubic_fmt(128, "cubic-keys")
    ar = gluon_mod.arith_bits(c) & 1
    img = gluon_mod._tables(c, key_pairs=False, lut=2, arith=ar)
    assert img.numel() == gluon_mod._image_words(False, 2, ar) == 1152
    raw = img.view(torch.uint8)
    kb = gluon_mod.VPAIR_KEY_BYTES.value
    vt = c.v.table_h.view(2, 2, 16)
    g = torch.Generator().manual_seed(7)
    words = torch.randint(0, 1 << 32, (400,), generator=g, dtype=torch.int64).tolist()
    for i in range(0, len(words) - 1, 2):
        wa, wb = words[i], words[i + 1]
        sa, sb = (i // 2) & 1, (i // 4) & 1
        (ca, va), (cb, vb) = _field_values(wa), _field_values(wb)
        reg = _run_ptx(gluon_mod._VP_ASM.value, {"$16": wa, "$17": wb, "$18": (ca + 2 * sa) << 10,
                                                 "$19": (cb + 2 * sb) << 10}, raw)
        assert [reg[f"${j}"] for j in range(8)] == [int(vt[sa, ca, x].view(torch.int16)) & 0xFFFF for x in va], hex(wa)
        assert [reg[f"${j}"] for j in range(8, 16)] == [int(vt[sb, cb, x].view(torch.int16)) & 0xFFFF for x in vb]
        if ar:
            kt = c.k.table_h.view(2, 2, 16)
            reg = _run_ptx(gluon_mod._AR_KEY_ASM.value, {"$8": wa, "$9": kb + 16 * (ca + 2 * sa)}, raw)
            assert [reg[f"${j}"] for j in range(8)] == [_f16_bits(float(kt[sa, ca, x])) for x in va], hex(wa)
    if not ar:  # the fp16 key table where the key lookups read it (table offset VPAIR_KEY_BYTES)
        assert torch.equal(raw[kb:kb + 128].view(torch.float16), c.k.table_h)


@pytest.mark.parametrize("d,variant", [(128, "cubic-keys"), (128, "switched"), (64, "cubic-keys")])
def test_value_pairs_compile(d, variant):
    """``gluon_lut`` 2 compiles for sm_90 with the ring: the values as 32-bit pair loads, no 16-bit
    lookups with cubic keys; 16 KiB of shared memory (the allocation is a power of two)."""
    c = _cubic_fmt(d, variant) if variant != "switched" else _fmt(d, 2)
    ar = gluon_mod.arith_bits(c) & 1
    const = gluon_mod.launch_constexprs(c, nq=4, d=d, block_size=16, segs=16, async_ring=1, lut=2, arith=ar)
    assert const["RO"] % (2 * 16 * d // 4) == 0 and const["RO"] >= const["TO"] + 32
    k = _compile_const(const)
    ptx = k.asm["ptx"]
    assert "ld.shared.b32" in ptx and "prmt.b32" in ptx and ("ld.shared.b16" in ptx) == (ar == 0)
    assert k.metadata.shared == const["BUFN"] * 4
