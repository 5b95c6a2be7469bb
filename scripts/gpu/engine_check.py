"""GPU engine check (run on the device machine with the vLLM 0.26 bundle).

For each (kv_cache_dtype, attention backend): start vLLM with a dummy-weight Llama-3-8B-shaped
model (32 layers, 8 KV heads, head size 128) at gpu_memory_utilization 0.85, print what the
plugin registered, vLLM's KV capacity (blocks, tokens, concurrency), and time a short batch of
generation. Every number is read from vLLM; one JSON line per run goes to ``$OUT/engine_check.jsonl``.

    python scripts/gpu/engine_check.py              # auto (TRITON_ATTN), fp8, e8_k4v4 / e8_k2v2 (CUSTOM)

Without installing e8vllm the script exposes its ``vllm.general_plugins`` entry point through a
generated ``.dist-info`` folder on PYTHONPATH, so vLLM's own plugin loader finds it in every process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
}
RUNS = [("auto", "TRITON_ATTN"), ("fp8", "TRITON_ATTN"), ("e8_k4v4", "CUSTOM"), ("e8_k2v2", "CUSTOM")]


def plugin_path() -> str:
    """The repo plus a generated dist-info exposing our vllm.general_plugins entry point."""
    sys.path.insert(0, str(ROOT))
    from e8vllm.bench.gpu import _plugin_path

    return _plugin_path()


def worker(model_dir: str, dtype: str, backend: str, out: str) -> None:
    from vllm import LLM, SamplingParams

    t0 = time.time()
    max_len = int(os.environ.get("E8_CHECK_MAX_LEN", "8192"))
    llm = LLM(model=model_dir, load_format="dummy", skip_tokenizer_init=True, max_model_len=max_len,
              max_num_batched_tokens=max(max_len, 2048), gpu_memory_utilization=0.85, enforce_eager=True,
              kv_cache_dtype=dtype, attention_config={"backend": backend}, enable_prefix_caching=False)
    start_s = time.time() - t0
    cc = llm.llm_engine.vllm_config.cache_config
    rec = {"dtype": dtype, "backend": backend, "start_s": round(start_s, 1),
           "num_gpu_blocks": cc.num_gpu_blocks, "block_size": cc.block_size,
           "kv_cache_size_tokens": getattr(cc, "kv_cache_size_tokens", None),
           "kv_cache_max_concurrency": getattr(cc, "kv_cache_max_concurrency", None)}
    import vllm

    rec["vllm"] = vllm.__version__
    sp = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, detokenize=False)
    plen = min(1024, max_len - 64)
    prompts = [{"prompt_token_ids": [(7 * i + 13 * j) % 30000 + 100 for j in range(plen)]} for i in range(8)]
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, detokenize=False))  # warm-up
    t = time.time()
    outs = llm.generate(prompts, sp)
    rec["gen_8x1024_plus_32_s"] = round(time.time() - t, 2)
    rec["first_tokens"] = list(outs[0].outputs[0].token_ids[:8])
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print("RESULT", json.dumps(rec), flush=True)


def main() -> None:
    out_dir = Path(os.environ.get("OUT", "."))
    out = str(out_dir / "engine_check.jsonl")
    model_dir = Path(tempfile.mkdtemp(prefix="llama3-8b-shape-"))
    (model_dir / "config.json").write_text(json.dumps(CONFIG))
    env = {**os.environ, "PYTHONPATH": plugin_path() + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "VLLM_PLUGINS": "e8vllm"}
    runs = RUNS if len(sys.argv) < 2 else [tuple(r.split(":")) for r in sys.argv[1:]]
    for dtype, backend in runs:
        print(f"=== {dtype} ({backend})", flush=True)
        code = ("import sys; sys.path[:0]=%r.split(%r); from scripts.gpu.engine_check import worker; "
                "worker(%r, %r, %r, %r)" % (env["PYTHONPATH"], os.pathsep, str(model_dir), dtype, backend, out))
        r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT)
        print(f"=== {dtype}: exit {r.returncode}", flush=True)
    if Path(out).exists():
        recs = [json.loads(x) for x in Path(out).read_text().splitlines()]
        base = next((r for r in recs if r["dtype"] == "auto"), None)
        for r in recs:
            ratio = r["num_gpu_blocks"] / base["num_gpu_blocks"] if base else float("nan")
            print(f"{r['dtype']:10s} blocks {r['num_gpu_blocks']:>8} tokens {r['kv_cache_size_tokens']} "
                  f"ratio {ratio:.3f}x  gen {r['gen_8x1024_plus_32_s']} s")


if __name__ == "__main__":
    main()
