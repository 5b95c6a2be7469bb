"""e8vllm.vllm_plugin without an engine: dtype names, registration, page sizing, refusal checks."""

from __future__ import annotations

import importlib
from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from e8vllm.vllm_plugin import spec  # noqa: E402
from e8vllm.vllm_plugin.spec import (E8_DTYPES, E8UnsupportedError, config_unsupported_reasons,  # noqa: E402
                                     layer_unsupported_reasons, parse_e8_dtype, raise_if_unsupported)


# --------------------------------------------------------------------------- names
def test_parse_e8_dtype() -> None:
    assert parse_e8_dtype("e8_k4v4") == (4, 4)
    assert parse_e8_dtype("e8_k4v2") == (4, 2)
    assert {parse_e8_dtype(n) for n in E8_DTYPES} == {(4, 4), (3, 3), (2, 2), (4, 2), (4, 3), (3, 2)}
    for bad in ("e8", "e8_k4", "e8_k5v5", "e8_k2v4", "E8_K4V4", "fp8", "", None, "e8_k4v4 "):
        with pytest.raises(ValueError):
            parse_e8_dtype(bad)  # type: ignore[arg-type]


def test_slot_bytes() -> None:
    assert spec.slot_bytes("e8_k4v4", 64) == 68       # vs 256 B bf16: 3.76x
    assert spec.slot_bytes("e8_k2v2", 64) == 36
    assert spec.slot_bytes("e8_k3v2", 128) == 50 + 34


def test_encoder_variant_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(spec.ENCODER_ENV, raising=False)
    assert spec.encoder_variant() == ""
    fmt = spec.kv_format("e8_k4v4", 64)
    assert (fmt.k_codec.name, fmt.v_codec.name) == ("e8c-4bit", "e8s-4bit")
    monkeypatch.setenv(spec.ENCODER_ENV, "switched")
    assert spec.kv_format("e8_k4v4", 64).k_codec.name == "e8s-4bit"
    monkeypatch.setenv(spec.ENCODER_ENV, "cubic")
    assert spec.kv_format("e8_k4v4", 64).k_codec.name == "e8c-4bit"
    assert spec.kv_format("e8_k3v2", 64).k_codec.name == "e8s-3bit"
    monkeypatch.setenv(spec.ENCODER_ENV, "rms")
    assert spec.encoder_variant() == "rms"
    assert spec.kv_format("e8_k4v4", 64).k_codec.name == "e8-4bit-rms"
    monkeypatch.setenv(spec.ENCODER_ENV, "search")
    assert spec.kv_format("e8_k3v2", 64).k_codec.name == "e8-3bit"
    assert spec.kv_format("e8_k3v2", 64).slot_bytes == spec.slot_bytes("e8_k3v2", 64)  # same bytes, any variant
    monkeypatch.setenv(spec.ENCODER_ENV, "bogus")
    with pytest.raises(ValueError):
        spec.encoder_variant()


# --------------------------------------------------------------------------- registration
def test_register_is_idempotent_and_makes_dtypes_valid() -> None:
    import e8vllm.vllm_plugin as plugin

    plugin.register()
    plugin.register()
    st = plugin.registration_state()
    assert st["registered"] and st["dtypes"] in ("api", "literal")
    from vllm.config.cache import CacheConfig

    for n in E8_DTYPES:
        assert CacheConfig(cache_dtype=n).cache_dtype == n
    with pytest.raises(Exception):
        CacheConfig(cache_dtype="e8_k9v9")
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    assert STR_DTYPE_TO_TORCH_DTYPE["e8_k4v4"] == torch.uint8
    reg = importlib.import_module("e8vllm.vllm_plugin.register")
    if st["backend"]:  # CPU platform
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        assert AttentionBackendEnum.CPU_ATTN.get_path() == reg.BACKEND_PATH


def test_customize_spec_packs_only_e8() -> None:
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    cpu = pytest.importorskip("e8vllm.vllm_plugin.cpu")
    base = FullAttentionSpec(block_size=128, num_kv_heads=3, head_size=64, dtype=torch.bfloat16)
    spec._reset_active_dtype()
    try:
        assert cpu.E8CPUAttentionBackend.customize_spec(base).page_size_bytes == 128 * 3 * 256
        spec.set_active_dtype("e8_k4v4")
        u8 = FullAttentionSpec(block_size=128, num_kv_heads=3, head_size=64, dtype=torch.uint8)
        got = cpu.E8CPUAttentionBackend.customize_spec(u8)
        assert got.state_content_bytes == 68 and got.page_size_bytes == 128 * 3 * 68
        assert cpu.E8CPUAttentionBackend.customize_spec(base) == base  # bf16 layers untouched
        with pytest.raises(RuntimeError):
            spec.set_active_dtype("e8_k2v2")  # one e8 dtype per process
    finally:
        spec._reset_active_dtype()


def test_legacy_spec_subclass() -> None:
    """The vLLM 0.26 path (spec subclass): page size and merge keep the packed slot."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    base = FullAttentionSpec(block_size=16, num_kv_heads=8, head_size=128, dtype=torch.uint8)
    e8 = spec.to_legacy_spec(base, "e8_k3v2")
    assert e8.e8_slot_bytes == 84 and e8.real_page_size_bytes == 16 * 8 * 84
    merged = spec.E8FullAttentionSpec.merge([e8, e8])
    assert isinstance(merged, spec.E8FullAttentionSpec) and merged.e8_slot_bytes == 84


# --------------------------------------------------------------------------- refusal checks
def test_layer_check_accepts_plain_decoder() -> None:
    assert layer_unsupported_reasons("e8_k4v4", head_size=64, num_heads=9, num_kv_heads=3) == []


@pytest.mark.parametrize("kw,needle", [
    ({"sliding_window": 4096}, "sliding-window"),
    ({"alibi_slopes": [0.5, 0.25]}, "ALiBi"),
    ({"logits_soft_cap": 50.0}, "soft-capping"),
    ({"attn_type": "encoder_decoder"}, "encoder_decoder attention"),
    ({"attn_type": "encoder_only"}, "encoder_only attention"),
    ({"sinks": torch.zeros(9)}, "attention sinks"),
    ({"head_size": 60}, "head size 60"),
    ({"kv_sharing_target_layer_name": "model.layers.3.self_attn.attn"}, "cross-layer KV sharing"),
])
def test_layer_check_reasons(kw: dict[str, Any], needle: str) -> None:
    args: dict[str, Any] = {"head_size": 64, "num_heads": 9, "num_kv_heads": 3, **kw}
    reasons = layer_unsupported_reasons("e8_k4v4", **args)
    assert any(needle in r for r in reasons), reasons
    with pytest.raises(E8UnsupportedError, match="cannot serve this model"):
        raise_if_unsupported("e8_k4v4", reasons)


def test_impl_refuses_sliding_window_at_construction() -> None:
    cpu = pytest.importorskip("e8vllm.vllm_plugin.cpu")
    with pytest.raises(E8UnsupportedError, match="sliding-window"):
        cpu.E8CPUAttentionImpl(num_heads=9, head_size=64, scale=0.125, num_kv_heads=3, alibi_slopes=None,
                               sliding_window=4096, kv_cache_dtype="e8_k4v4")


class _MC:
    """A minimal stand-in for vllm.config.ModelConfig (attributes the check reads)."""

    def __init__(self, **hf: Any) -> None:
        self.hf_text_config = SimpleNamespace(**hf)
        self.use_mla = hf.pop("_mla", False)
        self.uses_alibi = hf.pop("_alibi", False)
        self.is_encoder_decoder = hf.pop("_encdec", False)
        self.is_hybrid = hf.pop("_hybrid", False)
        self.is_attention_free = False
        self._head = hf.pop("_head", 64)
        for k in ("_mla", "_alibi", "_encdec", "_hybrid", "_head"):
            self.hf_text_config.__dict__.pop(k, None)

    def get_sliding_window(self) -> int | None:
        return getattr(self.hf_text_config, "sliding_window", None)

    def get_head_size(self) -> int:
        return self._head


def _cfg(dtype: str = "e8_k4v4", **hf: Any) -> SimpleNamespace:
    return SimpleNamespace(cache_config=SimpleNamespace(cache_dtype=dtype, sliding_window=None,
                                                        kv_cache_dtype_skip_layers=None),
                           model_config=_MC(**{"model_type": "llama", **hf}))


@pytest.mark.parametrize("hf,needle", [
    ({"sliding_window": 4096}, "sliding-window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding-window"),
    ({"_mla": True}, "MLA"),
    ({"_alibi": True}, "ALiBi"),
    ({"_encdec": True}, "encoder-decoder"),
    ({"_hybrid": True}, "hybrid"),
    ({"attn_logit_softcapping": 50.0}, "soft-capping"),
    ({"model_type": "gpt_oss"}, "sinks"),
    ({"_head": 20}, "head size 20"),
])
def test_config_check_reasons(hf: dict[str, Any], needle: str) -> None:
    reasons = config_unsupported_reasons(_cfg(**hf))
    assert any(needle in r for r in reasons), reasons


def test_config_check_refuses_kv_transfer() -> None:
    """KV connectors move pages between engines; E8 pages do not record the settings that wrote them."""
    cfg = _cfg()
    cfg.kv_transfer_config = SimpleNamespace(kv_connector="LMCacheConnectorV1")
    assert any("kv_transfer_config" in r for r in config_unsupported_reasons(cfg))
    cfg.kv_transfer_config = None
    assert config_unsupported_reasons(cfg) == []


def test_config_check_accepts_llama_and_qwen_style_disabled_window() -> None:
    assert config_unsupported_reasons(_cfg()) == []
    assert config_unsupported_reasons(_cfg(sliding_window=32768, use_sliding_window=False)) == []


@pytest.mark.parametrize("var,value,needle", [
    (spec.ENCODER_ENV, "bogus", "E8VLLM_ENCODER must be one of"),
    (spec.DEBUG_CODECS_ENV, "int8", "'KCODEC,VCODEC'"),
    (spec.DEBUG_CODECS_ENV, "int8,nope", "unknown codec 'nope'"),
])
def test_bad_settings_are_named_not_blamed_on_the_head_size(var: str, value: str, needle: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(var, value)
    for check in (lambda: config_unsupported_reasons(_cfg()),
                  lambda: layer_unsupported_reasons("e8_k4v4", head_size=64)):
        with pytest.raises(ValueError) as e:
            check()
        assert needle in str(e.value) and var in str(e.value) and "head size" not in str(e.value)


@pytest.mark.parametrize("backend", [None, "TRITON_ATTN", "CUSTOM"])
def test_cuda_needs_the_custom_backend_and_says_how(backend: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA only the backend choice is wrong: the error says how to pick CUSTOM, not to give up E8."""
    reg = importlib.import_module("e8vllm.vllm_plugin.register")  # the package's `register` is the function
    monkeypatch.setattr(reg, "_is_cuda", lambda: True)
    monkeypatch.setattr(reg, "_is_cpu", lambda: False)
    cfg = _cfg()
    cfg.attention_config = SimpleNamespace(backend=backend)
    if backend == "CUSTOM":
        reg.check_engine_config(cfg)
        return
    with pytest.raises(E8UnsupportedError) as e:
        reg.check_engine_config(cfg)
    msg = str(e.value)
    assert "--attention-backend CUSTOM" in msg and "attention_config={'backend': 'CUSTOM'}" in msg
    assert (backend or "none") in msg and "kv_cache_dtype='auto'" not in msg
    # a model the E8 path cannot serve is reported as such first
    bad = _cfg(_alibi=True)
    bad.attention_config = SimpleNamespace(backend=backend)
    with pytest.raises(E8UnsupportedError, match="ALiBi"):
        reg.check_engine_config(bad)

