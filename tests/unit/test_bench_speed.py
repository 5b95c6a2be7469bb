"""The CPU speed benchmark's pure parts: case parsing and the markdown table (no engine here; the
benchmark itself runs engines for minutes, see README)."""

from __future__ import annotations

from pathlib import Path

import pytest

from e8vllm.bench.speed import parse_cases, split_suffixes, write_markdown


def test_parse_cases() -> None:
    assert parse_cases("1x512, 8x256") == [(1, 512), (8, 256)]
    for bad in ("1x", "x5", "0x5", "2x-1", "1x5,,2x3", "ax2"):
        with pytest.raises(ValueError):
            parse_cases(bad)


def test_markdown_ratios_against_auto(tmp_path: Path) -> None:
    rows = {"auto": {"status": "ok", "cases": [{"batch": 1, "tokens": 8, "prefill_s": 0.5, "decode_ms_per_step": 30.0}]},
            "e8_k4v4": {"status": "ok", "cases": [{"batch": 1, "tokens": 8, "prefill_s": 1.5,
                                                   "decode_ms_per_step": 60.0}]},
            "e8_k2v2": {"status": "rc 1"}}
    report = {"conditions": {"line": "here", "cases": [[1, 8]], "steps": 4}, "rows": rows}
    write_markdown(tmp_path / "s.md", report)
    text = (tmp_path / "s.md").read_text()
    assert "| auto | 0.50 | 30.0 | 1.00 |" in text
    assert "| e8_k4v4 | 1.50 | 60.0 | 0.50 |" in text
    assert "| e8_k2v2 | failed (rc 1) |" in text


def test_run_suffixes() -> None:
    assert split_suffixes("auto") == ("auto", {})
    assert split_suffixes("e8_k4v4+torchdecode") == ("e8_k4v4", {"E8VLLM_CPU_DECODE": "torch"})
    assert split_suffixes("e8_k4v4+1thread+torchdecode") == (
        "e8_k4v4", {"E8VLLM_CPU_ENCODER_THREADS": "1", "E8VLLM_CPU_DECODE": "torch"})
    with pytest.raises(ValueError, match="unknown run suffix"):
        split_suffixes("e8_k4v4+fast")
