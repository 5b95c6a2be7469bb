"""The GPU benchmark's dtype parsing (the benchmark itself runs on the H200)."""

from __future__ import annotations

import pytest

from e8vllm.bench.gpu import _e8_format


@pytest.mark.parametrize("dtype,k_codec,v_codec,centers", [
    ("e8_k4v4", "e8c-4bit", "e8s-4bit", False), ("e8_k4v4+search", "e8-4bit", "e8-4bit", False),
    ("e8_k3v3+centers", "e8s-3bit", "e8s-3bit", True), ("e8_k4v4+centers+search", "e8-4bit", "e8-4bit", True),
    ("e8_k2v2+rms", "e8-2bit-rms", "e8-2bit-rms", False), ("e8_k4v4+switched", "e8s-4bit", "e8s-4bit", False),
    ("e8_k4v4+cubic", "e8c-4bit", "e8c-4bit", False), ("e8_k4v4+cubic-keys", "e8c-4bit", "e8s-4bit", False),
    ("e8_k4v4+centers+switched", "e8s-4bit", "e8s-4bit", True)])
def test_e8_format_suffixes(dtype: str, k_codec: str, v_codec: str, centers: bool) -> None:
    fmt, c = _e8_format(dtype)
    assert (fmt.head_size, fmt.k_codec.name, fmt.v_codec.name, c) == (128, k_codec, v_codec, centers)


def test_e8_format_rejects_other_dtypes() -> None:
    with pytest.raises(ValueError):
        _e8_format("fp8")


def test_report_renders_engine_sweep_and_write_results(tmp_path) -> None:
    """``report`` turns the device's result files into gpu.md tables (ratios against auto)."""
    import json

    from e8vllm.bench.gpu import report

    eng = [{"dtype": "auto", "backend": "TRITON_ATTN", "seqs": 64, "prompt": 8192, "gen": 128, "cuda_graphs": True,
            "capacity_tokens": 1000, "prefill_s": 10.0, "decode_tok_s": 200.0},
           {"dtype": "e8_k4v4", "backend": "CUSTOM", "seqs": 64, "prompt": 8192, "gen": 128, "cuda_graphs": True,
            "capacity_tokens": 3880, "prefill_s": 12.5, "decode_tok_s": 160.0}]
    (tmp_path / "engine_64x8192_graphs_x.jsonl").write_text("\n".join(json.dumps(r) for r in eng))
    sw = {"dtype": "e8_k4v4", "backend": "CUSTOM", "concurrency": 512, "prompt": 3072, "gen": 128,
          "capacity_tokens": 3880, "wall_s": 113.2, "output_tok_s": 578.8, "total_tok_s": 14470.0,
          "tpot_p50_ms": 494.1, "tpot_p99_ms": 604.1, "preemptions": 0}
    (tmp_path / "sweep_3072_graphs_x.jsonl").write_text(json.dumps(sw) + "\n")
    (tmp_path / "write_x.json").write_text(json.dumps({"rows": [
        {"dtype": "e8_k4v4", "tokens": 8, "block_rows": 2, "default": False, "time_s": 31.7e-6},
        {"dtype": "e8_k4v4", "tokens": 8, "block_rows": 16, "default": True, "time_s": 56.1e-6},
        {"dtype": "e8_k4v4", "tokens": 8, "block_rows": 1, "parallel_scales": True, "candidates": "floor",
         "rotation": "fwht", "warps": 8, "default": False, "time_s": 9.5e-6}]}))
    md = report(tmp_path)
    assert "| e8_k4v4 | CUSTOM | 3,880 | 3.88 | 12.5 | 0.80 | 160.0 | 0.80 |" in md
    assert "| e8_k4v4 | 512 | 3,880 | 113.2 | 578.8 | 14470.0 | 494.1 | 604.1 | 0 |" in md
    assert "CUDA graphs" in md.split("Concurrency sweep")[1]
    assert ("| dtype | tokens | 2 rows, dot, 4 warps | 16 rows | 1 row (parallel scales, floor), fwht, 8 warps |" in md
            and "| e8_k4v4 | 8 | 31.7 | 56.1* | 9.5 |" in md)
    assert (tmp_path / "gpu.md").read_text() == md
