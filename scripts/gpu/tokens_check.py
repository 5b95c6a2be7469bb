"""Greedy tokens of a small dummy-weight Llama on vLLM 0.26 (CUSTOM backend, e8_k4v4): the fused
Triton path against the PyTorch reference path (``E8VLLM_GPU_KERNELS=torch``), token for token.

    python scripts/gpu/tokens_check.py OUT.json [--calibration]

With ``--calibration`` the dummy model directory gets a synthetic KV calibration with
position-dependent key centers (random means, the model's RoPE frequencies), so both paths also
run the centering (RoPE and position-0 centers), the write-path positions and the logit terms.

Each path runs in its own process (the choice is read when the attention layers are built); the
same seed-initialized dummy weights and prompts go to both. Writes {"torch": [...], "triton": [...]}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 4096, "num_hidden_layers": 4, "num_attention_heads": 16,
    "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 32000, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}
STEPS = 8


def worker(model_dir: str, out: str) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, load_format="dummy", skip_tokenizer_init=True, max_model_len=2048, seed=0,
              gpu_memory_utilization=0.3, enforce_eager=True, kv_cache_dtype="e8_k4v4",
              attention_config={"backend": "CUSTOM"}, enable_prefix_caching=False)
    prompts = [{"prompt_token_ids": [(31 * i + 17 * j) % 31000 + 3 for j in range(n)]}
               for i, n in enumerate((300, 77, 513, 1))]
    outs = llm.generate(prompts, SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True,
                                                detokenize=False), use_tqdm=False)
    from e8vllm.vllm_plugin import gpu, spec

    fmt = spec.kv_format("e8_k4v4", CONFIG["head_dim"])
    print("E8 CALLS", gpu.CALLS, flush=True)
    Path(out).write_text(json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs], "calls": gpu.CALLS,
                                     "codecs": [fmt.k_codec.name, fmt.v_codec.name]}))


def main() -> None:
    from e8vllm.bench.gpu import _plugin_path

    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    dest = Path(args[0] if args else "tokens_check.json")
    model_dir = Path(tempfile.mkdtemp(prefix="llama-small-"))
    (model_dir / "config.json").write_text(json.dumps(CONFIG))
    if "--calibration" in sys.argv:
        import torch

        from e8vllm.calibration import CALIBRATION_FILE, KVCenters

        g = torch.Generator().manual_seed(3)
        shape = (CONFIG["num_hidden_layers"], CONFIG["num_key_value_heads"], CONFIG["head_dim"])
        d = CONFIG["head_dim"]
        KVCenters(torch.randn(shape, generator=g) * 0.5, torch.randn(shape, generator=g) * 0.05,
                  meta={"tokens": "synthetic"}, k_rope=torch.randn(shape, generator=g),
                  rope_inv_freq=CONFIG["rope_theta"] ** (-torch.arange(0, d, 2, dtype=torch.float32) / d),
                  k_sink=torch.randn(shape, generator=g)).save(model_dir / CALIBRATION_FILE)
    res = {}
    for path in ("torch", "triton"):
        tmp = Path(tempfile.mkstemp(suffix=".json")[1])
        env = {**os.environ, "PYTHONPATH": _plugin_path() + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "VLLM_PLUGINS": "e8vllm", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "E8VLLM_GPU_KERNELS": path}
        code = ("import sys; sys.path[:0]=%r.split(%r); sys.argv=['x']; "
                "from scripts.gpu.tokens_check import worker; worker(%r, %r)"
                % (env["PYTHONPATH"], os.pathsep, str(model_dir), str(tmp)))
        r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT)
        got = json.loads(tmp.read_text()) if r.returncode == 0 and tmp.stat().st_size else {}
        res[path] = got.get("tokens")
        res[f"{path}_calls"] = got.get("calls")
        res[f"{path}_codecs"] = got.get("codecs")
        print(f"{path}: exit {r.returncode} tokens {res[path]} calls {res[f'{path}_calls']}", flush=True)
    res["match_steps"] = [sum(1 for a, b in zip(x, y) if a == b) if res["torch"] and res["triton"] else None
                          for x, y in zip(res["torch"] or [[]] * 4, res["triton"] or [[]] * 4)]
    dest.write_text(json.dumps(res))
    print("tokens_check", json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
