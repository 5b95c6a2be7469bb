"""The GPU benchmark's dtype parsing (the benchmark itself runs on the H200)."""

from __future__ import annotations

import pytest

from e8vllm.bench.gpu import _e8_format


@pytest.mark.parametrize("dtype,k_codec,centers", [
    ("e8_k4v4", "e8s-4bit", False), ("e8_k4v4+search", "e8-4bit", False), ("e8_k3v3+centers", "e8s-3bit", True),
    ("e8_k4v4+centers+search", "e8-4bit", True), ("e8_k2v2+rms", "e8-2bit-rms", False)])
def test_e8_format_suffixes(dtype: str, k_codec: str, centers: bool) -> None:
    fmt, c = _e8_format(dtype)
    assert (fmt.head_size, fmt.k_codec.name, fmt.v_codec.name, c) == (128, k_codec, k_codec, centers)


def test_e8_format_rejects_other_dtypes() -> None:
    with pytest.raises(ValueError):
        _e8_format("fp8")
