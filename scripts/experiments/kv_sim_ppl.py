"""Offline perplexity simulation of the E8 KV cache (an experiment, not the benchmark).

A float32 transformers forward of the default model (SmolLM2) with the post-RoPE keys and the
values replaced by the plugin's centered E8 round trip (same codecs, the calibration file's
centers and, with ``:maps``, its key/value maps), for chosen layers. Fast enough (~20 s per
configuration for 4 windows) to find where the cost sits (per layer, K vs V) before a vLLM run.

Usage: python scripts/experiments/kv_sim_ppl.py WINDOWS CONFIG...
  CONFIG = name:kbits:vbits:klayers:vlayers[:maps]; layers = all | none | 0,3,10-19
  env CAL=path: another calibration file; TEXT=kv: KV-side license text after the calibration's
  first 4,096 tokens instead of the quality benchmark's windows (results/quality_tokens.json).
The first configuration should be the unquantized base (e.g. base:4:4:none:none).
"""
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from e8vllm.models import prepare_model
from e8vllm.kvdump import load_model
from e8vllm import calibration as cal
from e8vllm.kernels.reference import E8KVFormat
torch.set_num_threads(2)
md = prepare_model()
model, tok = load_model(md)
C = cal.KVCenters.load(os.environ.get("CAL", str(md / cal.CALIBRATION_FILE)))
KM = C.k_map; VM = C.v_map
KMI = torch.linalg.inv(KM.double()).float() if KM is not None else None
VMI = torch.linalg.inv(VM.double()).float() if VM is not None else None
toks = json.load(open(Path(__file__).resolve().parents[2] / "results" / "quality_tokens.json"))["windows"]
if os.environ.get("TEXT") == "kv":  # KV-side text after the calibration's first 4,096 tokens
    from e8vllm import kvdump
    ids = kvdump.text_token_ids(tok, kvdump.split_texts().kv, None)
    ids = ids[4096:]
    toks = [ids[i * 1024:(i + 1) * 1024].tolist() for i in range(len(ids) // 1024)]
    print("kv-side windows available:", len(toks), flush=True)
NW = int(sys.argv[1]); configs = sys.argv[2:]
L = model.config.num_hidden_layers
mod = cal._rope_module(model); orig = mod.apply_rotary_pos_emb
trig = cal.rope_table(C.rope_inv_freq, C.rope_scale, torch.arange(1024))
state = {"layer": 0, "fmt": None, "kl": set(), "vl": set()}
def centers(l):
    return {"k_rope": C.k_rope[l], "k_sink": C.k_sink[l]}
def capture(q, k, *a, **kw):
    qe, ke = orig(q, k, *a, **kw)
    l = state["layer"]
    if l in state["kl"]:
        x = ke[0].transpose(0, 1).float()  # [T, H, D]
        T = x.shape[0]
        c = C.k_mean[l] + cal.key_centers(centers(l), trig[:T], torch.arange(T))
        xc = x - c
        if KM is not None and state.get("maps"):
            xc = torch.einsum("thd,hed->the", xc, KM[l])
        kc = state["fmt"].k_codec.roundtrip(xc.reshape(-1, xc.shape[-1])).reshape(xc.shape)
        if KM is not None and state.get("maps"):
            kc = torch.einsum("thd,hed->the", kc, KMI[l])
        ke = (kc + c).transpose(0, 1)[None].to(ke.dtype)
    return qe, ke
def vhook(m, inp, out, l):
    if l in state["vl"]:
        x = out[0].float().reshape(out.shape[1], -1, 64)
        xc = x - C.v_mean[l]
        if VM is not None and state.get("maps"):
            xc = torch.einsum("thd,hed->the", xc, VM[l])
        vc = state["fmt"].v_codec.roundtrip(xc.reshape(-1, 64)).reshape(xc.shape)
        if VM is not None and state.get("maps"):
            vc = torch.einsum("thd,hed->the", vc, VMI[l])
        vc = vc + C.v_mean[l]
        return vc.reshape(out.shape).to(out.dtype)
    return out
def lhook(m, inp, l):
    state["layer"] = l
hs = []
for i, layer in enumerate(model.model.layers):
    hs.append(layer.self_attn.register_forward_pre_hook(lambda m, inp, i=i: lhook(m, inp, i)))
    hs.append(layer.self_attn.v_proj.register_forward_hook(lambda m, inp, out, i=i: vhook(m, inp, out, i)))
mod.apply_rotary_pos_emb = capture
def layers(spec):
    if spec == "all": return set(range(L))
    if spec == "none": return set()
    out = set()
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-"); out |= set(range(int(a), int(b) + 1))
        else: out.add(int(part))
    return out
@torch.inference_mode()
def nll():
    tot = 0.0; n = 0
    for w in toks[:NW]:
        ids = torch.tensor(w)[None]
        lg = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        tot += torch.nn.functional.cross_entropy(lg, ids[0, 1:], reduction="sum").item(); n += ids.shape[1] - 1
    return tot / n
base = None
for cfgs in configs:
    name, kb, vb, kl, vl = cfgs.split(":")[:5]
    state["maps"] = cfgs.endswith(":maps")
    state["fmt"] = E8KVFormat.from_bits(64, int(kb), int(vb))
    state["kl"], state["vl"] = layers(kl), layers(vl)
    t0 = time.time(); v = nll()
    if base is None and kl == "none" and vl == "none": base = v
    d = (math.exp(v - base) - 1) * 100 if base is not None else float("nan")
    print(f"{name}: nll {v:.5f} ppl {math.exp(v):.4f} dPPL {d:+.2f}% ({time.time()-t0:.0f}s)", flush=True)
