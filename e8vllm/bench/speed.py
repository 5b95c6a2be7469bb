"""CPU speed benchmark: prefill time and decode time per step, per kv-cache dtype, in vLLM.

Every dtype runs in its own vLLM CPU engine (subprocess, one after the other) with the real
SmolLM2-135M-Instruct weights, ``enforce_eager``, no prefix caching. For each case (batch B of
prompts of N tokens, different windows of the license texts), greedy, ``ignore_eos``:

* prefill: wall time of ``generate`` with ``max_tokens=1`` (B prompts of N tokens + one token);
* decode: (wall of ``max_tokens = 1 + S`` − wall of ``max_tokens = 1``) / S, ms per step of B
  sequences (the second call prefills again; the difference is the S decode steps).

Run suffixes (:data:`SUFFIXES`) change one setting of that engine, so one run compares both:
``NAME+torchdecode`` runs ``NAME`` with ``E8VLLM_CPU_DECODE=torch`` (the PyTorch decode path of
:mod:`e8vllm.kernels.reference` instead of the fused :mod:`e8vllm.kernels.cpu_decode`),
``NAME+1thread`` / ``NAME+2threads`` with ``E8VLLM_CPU_ENCODER_THREADS`` 1 / 2 (the write path's
encoder on that many threads).
Machines are noisy: compare the ratios of one run.

    python -m e8vllm bench speed --out-dir results [--dtypes auto,e8_k4v4,e8_k4v4+torchdecode]

Outputs in ``out_dir``: ``speed_cpu.json``, ``speed_cpu.md`` and ``speed_cpu_<dtype>.log``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from e8vllm.bench.quality import (RESULT_MARK, _cpu_model, _shutdown, _text_ids, engine_env, resolve_dtype,
                                  run_worker_subprocess, safe_name, vllm_version, write_result_atomic)

__all__ = ["run", "main", "DEFAULT_CASES", "parse_cases"]

#: (batch, prompt tokens) per case
DEFAULT_CASES: tuple[tuple[int, int], ...] = ((1, 512), (1, 2048), (8, 512))
DECODE_STEPS = 32
WORKER_TIMEOUT_S = 1800.0
TORCH_SUFFIX = "+torchdecode"
#: run suffix -> environment of that engine
SUFFIXES: dict[str, dict[str, str]] = {TORCH_SUFFIX: {"E8VLLM_CPU_DECODE": "torch"},
                                       "+1thread": {"E8VLLM_CPU_ENCODER_THREADS": "1"},
                                       "+2threads": {"E8VLLM_CPU_ENCODER_THREADS": "2"}}


def split_suffixes(name: str) -> tuple[str, dict[str, str]]:
    """``"e8_k4v4+torchdecode+1thread"`` -> ("e8_k4v4", the suffixes' environment); ValueError on an
    unknown suffix."""
    base, *sufs = name.split("+")
    env: dict[str, str] = {}
    for suf in sufs:
        if f"+{suf}" not in SUFFIXES:
            raise ValueError(f"unknown run suffix +{suf} in {name!r}; known: {sorted(SUFFIXES)}")
        env.update(SUFFIXES[f"+{suf}"])
    return base, env


def parse_cases(text: str) -> list[tuple[int, int]]:
    """``"1x512,8x512"`` -> [(1, 512), (8, 512)]; ValueError on anything else."""
    out = []
    for part in text.split(","):
        b, _, n = part.strip().partition("x")
        if not (b.isdigit() and n.isdigit()) or int(b) < 1 or int(n) < 1:
            raise ValueError(f"a case is BATCHxTOKENS with positive integers, got {part!r}")
        out.append((int(b), int(n)))
    if not out:
        raise ValueError("no cases")
    return out


def _worker(name: str, kv_cache_dtype: str, cases: list[tuple[int, int]], steps: int, result_path: Path) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from e8vllm.kernels import cpu_decode
    from e8vllm.models import prepare_model

    longest = max(n for _, n in cases)
    t0 = time.perf_counter()
    llm = LLM(model=str(prepare_model()), dtype="bfloat16", kv_cache_dtype=kv_cache_dtype,
              max_model_len=longest + steps + 8, max_num_batched_tokens=max(2048, longest + steps + 8),
              enforce_eager=True, enable_prefix_caching=False, seed=0)
    start_s = time.perf_counter() - t0
    _paths, ids = _text_ids(llm.get_tokenizer(), "perplexity")
    rows = []
    for b, n in cases:
        if (b + 1) * 97 + n > len(ids):
            raise ValueError(f"the text has {len(ids)} tokens, too few for {b} x {n}")
        prompts = [TokensPrompt(prompt_token_ids=ids[i * 97:i * 97 + n]) for i in range(b)]
        walls = {}
        for m in (1, 1 + steps):
            sp = SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True, detokenize=False)
            t = time.perf_counter()
            outs = llm.generate(prompts, sp, use_tqdm=False)
            walls[m] = time.perf_counter() - t
            if any(len(o.outputs[0].token_ids) != m for o in outs):
                raise RuntimeError(f"expected {m} generated tokens per prompt")
        row = {"batch": b, "tokens": n, "prefill_s": walls[1],
               "decode_ms_per_step": (walls[1 + steps] - walls[1]) / steps * 1e3}
        print(f"{name}: {b} x {n}: prefill {row['prefill_s']:.2f} s, decode {row['decode_ms_per_step']:.1f} ms/step",
              flush=True)
        rows.append(row)
    res = {"name": name, "kv_cache_dtype": kv_cache_dtype, "status": "ok", "start_s": start_s, "cases": rows,
           "cpu_decode": "numba" if cpu_decode.available() else "torch"}
    write_result_atomic(Path(result_path), res)
    print(f"{RESULT_MARK}{json.dumps(res)}", flush=True)
    _shutdown(llm)


def _f(v: Any, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    c = report["conditions"]
    cases = [tuple(x) for x in c["cases"]]
    head = " | ".join(f"{b} x {n}: prefill s | decode ms/step | decode x auto" for b, n in cases)
    lines = ["# CPU speed in vLLM (prefill and decode per kv-cache dtype)", "", f"Conditions: {c['line']}", "",
             f"prefill = wall time of B prompts of N tokens with max_tokens=1; decode = (wall with "
             f"max_tokens=1+{c['steps']} − that) / {c['steps']}, ms per step of B sequences. decode x auto = "
             "auto's ms/step / this dtype's (above 1 = faster). `+torchdecode` = the PyTorch decode path "
             "(`E8VLLM_CPU_DECODE=torch`); `+1thread` / `+2threads` = the encoder on 1 / 2 threads "
             "(`E8VLLM_CPU_ENCODER_THREADS`).", "",
             f"| dtype | {head} |", "|---|" + "---:|---:|---:|" * len(cases)]
    auto = report["rows"].get("auto", {})
    auto_cases = {(r["batch"], r["tokens"]): r for r in auto.get("cases", [])}
    for name, r in report["rows"].items():
        if r.get("status") != "ok":
            lines.append(f"| {name} | failed ({r.get('status')}) |" + " |" * (3 * len(cases) - 1))
            continue
        cells = []
        for cr in r["cases"]:
            a = auto_cases.get((cr["batch"], cr["tokens"]))
            ratio = a["decode_ms_per_step"] / cr["decode_ms_per_step"] if a else None
            cells += [f"{cr['prefill_s']:.2f}", f"{cr['decode_ms_per_step']:.1f}", _f(ratio, ".2f")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def run(out_dir: Path, dtypes: list[str] | None = None, cases: list[tuple[int, int]] | None = None,
        steps: int = DECODE_STEPS, *, timeout_s: float = WORKER_TIMEOUT_S) -> dict[str, Any]:
    """One engine per dtype (own subprocess, one after the other); writes ``speed_cpu.json`` / ``.md``."""
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtypes = list(dict.fromkeys(dtypes or ["auto", "e8_k4v4", "e8_k4v4" + TORCH_SUFFIX]))
    cases = list(cases or DEFAULT_CASES)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    conditions = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "cpu": _cpu_model(),
                  "cpu_count": os.cpu_count(), "vllm": vllm_version(), "python": platform.python_version(),
                  "model": "SmolLM2-135M-Instruct", "cases": cases, "steps": steps, "dtypes": dtypes}
    conditions["line"] = (f"{conditions['date']} | CPU {conditions['cpu']} ({conditions['cpu_count']} cores) | "
                          f"vllm {conditions['vllm']} (CPU) | {conditions['model']} | enforce_eager | "
                          f"{steps} decode steps")
    print(f"conditions: {conditions['line']}", flush=True)
    arg_cases = ",".join(f"{b}x{n}" for b, n in cases)
    per: dict[str, dict[str, Any]] = {}
    for d in dtypes:
        split_suffixes(d)  # unknown suffixes fail before any engine runs
    for d in dtypes:
        base, suffix_env = split_suffixes(d)
        spec = resolve_dtype(base)
        env = {**spec["env"], "E8VLLM_CPU_DECODE": "numba", **suffix_env}
        res_path = out_dir / f"speed_cpu_{safe_name(d)}.json"
        log_path = out_dir / f"speed_cpu_{safe_name(d)}.log"
        res_path.unlink(missing_ok=True)
        rc, wall, log = run_worker_subprocess(
            ["e8vllm.bench.speed", "--worker", d, "--kv-cache-dtype", spec["kv_cache_dtype"], "--cases", arg_cases,
             "--steps", str(steps), "--result", str(res_path)], engine_env(1, env), log_path, timeout_s)
        if res_path.exists():
            r = json.loads(res_path.read_text())
            res_path.unlink()
            if rc != 0:
                r["worker_exit_code"] = rc
            r["wall_s"] = wall
            per[d] = r
        else:
            per[d] = {"name": d, "status": "timeout" if rc == -9 else f"rc {rc}", "wall_s": wall,
                      "log_tail": log[-3000:]}
            print(f"{d}: FAILED ({per[d]['status']}); log {log_path}\n{log[-2000:]}", flush=True)
    conditions["elapsed_s"] = time.perf_counter() - t_start
    report = {"conditions": conditions, "rows": per}
    (out_dir / "speed_cpu.json").write_text(json.dumps(report, indent=1))
    write_markdown(out_dir / "speed_cpu.md", report)
    print((out_dir / "speed_cpu.md").read_text(), flush=True)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m e8vllm.bench.speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=Path("results"))
    p.add_argument("--dtypes", default=None, help="comma-separated kv-cache dtypes (NAME+torchdecode, NAME+1thread)")
    p.add_argument("--cases", default=None, help="BATCHxTOKENS,... (default 1x512,1x2048,8x512)")
    p.add_argument("--steps", type=int, default=DECODE_STEPS)
    p.add_argument("--timeout-s", type=float, default=WORKER_TIMEOUT_S)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--kv-cache-dtype", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    cases = parse_cases(a.cases) if a.cases else None
    if a.worker:
        _worker(a.worker, a.kv_cache_dtype, cases or list(DEFAULT_CASES), a.steps, a.result)
        return None
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()] if a.dtypes else None
    return run(a.out_dir, dtypes=dtypes, cases=cases, steps=a.steps, timeout_s=a.timeout_s)


if __name__ == "__main__":
    main()
