"""The vLLM benchmarks (``e8vllm.bench.capacity`` and ``e8vllm.bench.quality``) end to end, small.

* capacity: ``auto`` and ``e8_k4v4`` at VLLM_CPU_KVCACHE_SPACE=1 GiB (the smallest whole-GiB
  budget vLLM 0.32 accepts), max_model_len 2048: vLLM's own token capacity (``cache_config``
  and the engine's log line) must be >= 3.5x auto's for e8_k4v4.
* quality, quick mode: 2 windows of 256 tokens of the held-out perplexity texts, auto and
  e8_k4v4: PPL finite, e8_k4v4 within 10 % of auto, top-1 agreement with auto > 80 %.

Each engine runs in its own subprocess (the benchmarks' worker mode); four engine starts in all,
about 3-4 minutes on a 2-core machine.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def engines_available() -> None:
    pytest.importorskip("vllm")
    try:
        from e8vllm.models import find_gguf

        find_gguf()
    except FileNotFoundError as exc:  # pragma: no cover - environment
        pytest.skip(f"SmolLM2 weights unavailable: {exc}")


def test_capacity_e8_k4v4_at_least_3_5x_auto(engines_available: None, tmp_path: Path) -> None:
    from e8vllm.bench.capacity import run

    rep = run(tmp_path, kv_space_gib=1, dtypes=["auto", "e8_k4v4"], max_model_len=2048, timeout_s=300)
    rows = rep["rows"]
    assert rows["auto"]["status"] == "ok", rows["auto"].get("log_tail")
    assert rows["e8_k4v4"]["status"] == "ok", rows["e8_k4v4"].get("log_tail")
    auto, e8 = rows["auto"], rows["e8_k4v4"]
    # numbers as vLLM computed them: cache_config and the engine's own log line
    assert auto["kv_cache_size_tokens"] and e8["kv_cache_size_tokens"]
    assert e8["kv_cache_size_tokens"] / auto["kv_cache_size_tokens"] >= 3.5, (auto, e8)
    assert e8["pool_tokens"] / auto["pool_tokens"] >= 3.5
    assert auto["log_tokens"] == auto["kv_cache_size_tokens"]
    assert e8["log_tokens"] == e8["kv_cache_size_tokens"]
    assert e8["ratio_log_tokens"] >= 3.5
    assert e8["concurrency"] >= 3.5 * auto["concurrency"]
    # the pool implies (within block rounding) the slot size the dtype declares
    for r in (auto, e8):
        assert r["implied_bytes_per_token_head"] == pytest.approx(r["declared_bytes_per_token_head"], rel=0.01)
    saved = json.loads((tmp_path / "capacity.json").read_text())
    assert saved["rows"]["e8_k4v4"]["ratio_tokens"] == pytest.approx(e8["ratio_tokens"])
    assert "e8_k4v4" in (tmp_path / "capacity.md").read_text()


def test_quality_quick_e8_k4v4_close_to_auto(engines_available: None, tmp_path: Path) -> None:
    from e8vllm.bench.quality import run

    rep = run(tmp_path, quick=True, timeout_s=400)
    rows = rep["rows"]
    for name in ("auto", "e8_k4v4"):
        assert rows[name]["status"] == "ok", rows[name].get("log_tail")
        assert math.isfinite(rows[name]["ppl"]) and rows[name]["ppl"] > 1.0
        assert rows[name]["tokens"] == rep["conditions"]["predicted_tokens"] == 2 * 255
    auto, e8 = rows["auto"], rows["e8_k4v4"]
    assert abs(e8["ppl"] / auto["ppl"] - 1.0) <= 0.10, (auto["ppl"], e8["ppl"])
    assert e8["top1_agree"] > 0.80, e8["top1_agree"]
    assert auto["top1_agree"] == 1.0
    assert e8["k_bits"] == pytest.approx(4.25) and auto["k_bits"] == 16
    for f in ("quality.json", "quality.md", "quality.png", "quality_auto.json", "quality_e8_k4v4.json"):
        assert (tmp_path / f).exists(), f
    md = (tmp_path / "quality.md").read_text()
    assert "Goals" in md and "e8_k4v4" in md
    goals = {g["id"]: g for g in rep["goals"]}
    assert goals["k4v4_within_1.5pct"]["status"] in ("met", "not met")
    assert goals["3bit_within_5pct"]["status"] == "not evaluated"  # e8_k3v3 not run in quick mode


def _fake(ppl_nll: list[float], top1: list[int], bits: float, name: str) -> dict[str, Any]:
    n = len(ppl_nll)
    return {"name": name, "status": "ok", "tokens": n, "tokens_sha": "x", "ppl": math.exp(sum(ppl_nll) / n),
            "top1": top1, "nll": ppl_nll, "window_nll": [sum(ppl_nll[:2]) / 2, sum(ppl_nll[2:]) / 2],
            "engine": {"k_bits": bits, "v_bits": bits, "bits": bits, "k_codec": name, "v_codec": name}}


def test_summary_and_goals_are_computed() -> None:
    """Pure logic (no engine): ΔPPL, agreement and goal verdicts come from the numbers."""
    from e8vllm.bench.quality import evaluate_goals, summarize

    per = {"auto": _fake([1.0, 1.0, 1.0, 1.0], [1, 2, 3, 4], 16, "bfloat16"),
           "e8_k4v4": _fake([1.01, 1.0, 1.0, 1.01], [1, 2, 3, 5], 4.25, "e8-4bit"),
           "e8_k3v3": _fake([1.1, 1.1, 1.1, 1.1], [1, 9, 9, 4], 3.25, "e8-3bit"),
           "codecs:int4-sym": _fake([1.2, 1.2, 1.2, 1.2], [1, 2, 3, 4], 4.25, "int4-sym")}
    rows = summarize(per)
    assert rows["e8_k4v4"]["dppl_pct"] == pytest.approx(100 * (math.exp(0.005) - 1))
    assert rows["e8_k4v4"]["top1_agree"] == 0.75 and rows["e8_k3v3"]["top1_agree"] == 0.5
    goals = {g["id"]: g for g in evaluate_goals(rows)}
    assert goals["k4v4_within_1.5pct"]["status"] == "met"
    assert goals["3bit_within_5pct"]["status"] == "not met"  # +10.5 %
    assert goals["e8_beats_int4"]["status"] == "met"
    assert goals["e8_beats_int4"]["pairs"][0]["e8"] == "e8_k4v4"
    del per["codecs:int4-sym"]
    assert {g["id"]: g for g in evaluate_goals(summarize(per))}["e8_beats_int4"]["status"] == "not evaluated"


def test_resolve_dtype_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pure logic: plain dtypes, codec swaps and the no-centering ablation map to engine + env."""
    from e8vllm.bench.quality import engine_env, resolve_dtype

    assert resolve_dtype("e8_k3v3") == {"name": "e8_k3v3", "kv_cache_dtype": "e8_k3v3", "env": {}, "note": ""}
    r = resolve_dtype("codecs:int4-sym-rot")
    assert r["kv_cache_dtype"] == "e8_k4v4" and r["env"] == {"E8VLLM_DEBUG_CODECS": "int4-sym-rot,int4-sym-rot"}
    r = resolve_dtype("e8_k4v2@nocenter")
    assert r["kv_cache_dtype"] == "e8_k4v2" and r["env"] == {"E8VLLM_KV_CALIBRATION": "none"}
    r = resolve_dtype("codecs:int4-sym/int8@nocenter")
    assert r["env"] == {"E8VLLM_DEBUG_CODECS": "int4-sym,int8", "E8VLLM_KV_CALIBRATION": "none"}
    assert "centering off" in r["note"]
    with pytest.raises(ValueError):
        resolve_dtype("codecs:")
    monkeypatch.setenv("E8VLLM_KV_CALIBRATION", "none")  # a caller's switch must not leak into every row
    assert "E8VLLM_KV_CALIBRATION" not in engine_env(2, resolve_dtype("e8_k4v4")["env"])
    assert engine_env(2, resolve_dtype("e8_k4v4@nocenter")["env"])["E8VLLM_KV_CALIBRATION"] == "none"
