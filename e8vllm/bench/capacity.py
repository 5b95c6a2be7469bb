"""Capacity benchmark: vLLM's own KV-cache size in tokens per kv-cache dtype, at one memory budget.

For the same ``VLLM_CPU_KVCACHE_SPACE`` (whole GiB), every dtype (``auto`` = the bf16 cache,
and the plugin's E8 dtypes) starts one vLLM CPU engine for SmolLM2-135M-Instruct in its own
subprocess (``load_format="dummy"``: capacity does not depend on the weights), and the numbers
vLLM itself computed are recorded:

* ``cache_config.num_gpu_blocks`` x ``block_size`` (the block pool, in tokens),
* ``cache_config.kv_cache_size_tokens`` and ``kv_cache_max_concurrency`` (vLLM's capacity for
  requests of ``max_model_len`` tokens),
* the engine log line ``CPU KV cache size: N tokens, Maximum concurrency for L tokens per
  request: X.XXx`` (parsed from the subprocess output).

Derived: the ratio of each to ``auto``'s, and the bytes per (token, layer, kv-head) the pool
implies (budget bytes / (pool tokens x layers x kv heads)), next to the slot size the dtype
declares (``2 * head_size * 2`` bytes for bf16, the plugin's ``slot_bytes`` for e8).

    python -m e8vllm.bench.capacity --out-dir results [--kv-space-gib 1] [--dtypes auto,e8_k4v4] [--max-model-len 8192]

Outputs in ``out_dir``: ``capacity.json``, ``capacity.md`` and ``capacity_<dtype>.log`` (engine logs).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

from e8vllm.bench.quality import (RESULT_MARK, write_result_atomic, _cpu_model, _shutdown, engine_env, engine_info, plugin_dtypes,
                                  resolve_dtype, run_worker_subprocess, safe_name, vllm_version)

__all__ = ["run", "main", "parse_capacity_lines", "CAPACITY_RE"]

CAPACITY_RE = re.compile(r"(\w+) KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per "
                         r"request: ([\d.]+)x")
WORKER_TIMEOUT_S = 600.0


def parse_capacity_lines(log: str) -> list[dict[str, Any]]:
    """Every ``<DEVICE> KV cache size: N tokens, Maximum concurrency for L tokens per request: X.XXx``."""
    return [{"device": m.group(1), "tokens": int(m.group(2).replace(",", "")),
             "max_model_len": int(m.group(3).replace(",", "")), "concurrency": float(m.group(4))}
            for m in CAPACITY_RE.finditer(log)]


def _worker(name: str, kv_cache_dtype: str, max_model_len: int, result_path: Path) -> None:
    from vllm import LLM

    from e8vllm.models import prepare_model

    t0 = time.perf_counter()
    llm = LLM(model=str(prepare_model()), load_format="dummy", dtype="bfloat16", kv_cache_dtype=kv_cache_dtype,
              max_model_len=max_model_len, enforce_eager=True, enable_prefix_caching=False, seed=0)
    info = engine_info(llm, kv_cache_dtype)
    res = {"name": name, "kv_cache_dtype": kv_cache_dtype, "status": "ok", "start_s": time.perf_counter() - t0,
           "engine": info}
    write_result_atomic(Path(result_path), res)
    print(f"{RESULT_MARK}{json.dumps(res)}", flush=True)
    _shutdown(llm)


def _rows(per: dict[str, dict[str, Any]], budget_bytes: int) -> dict[str, dict[str, Any]]:
    auto = per.get("auto") if per.get("auto", {}).get("status") == "ok" else None
    rows = {}
    for name, r in per.items():
        row = dict(r)
        if r.get("status") == "ok":
            e = r["engine"]
            log = r.get("log_capacity") or {}
            row["pool_tokens"] = e["pool_tokens"]
            row["kv_cache_size_tokens"] = e["kv_cache_size_tokens"]
            row["concurrency"] = e.get("kv_cache_max_concurrency")
            row["log_tokens"] = log.get("tokens")
            row["log_concurrency"] = log.get("concurrency")
            heads = e["num_layers"] * e["num_kv_heads"]
            row["implied_bytes_per_token_head"] = budget_bytes / (e["pool_tokens"] * heads) if e["pool_tokens"] else None
            row["declared_bytes_per_token_head"] = e["slot_bytes"]
            row["bits_k"], row["bits_v"] = e["k_bits"], e["v_bits"]
            if auto is not None:
                a = auto["engine"]
                row["ratio_pool"] = e["pool_tokens"] / a["pool_tokens"]
                if e["kv_cache_size_tokens"] and a["kv_cache_size_tokens"]:
                    row["ratio_tokens"] = e["kv_cache_size_tokens"] / a["kv_cache_size_tokens"]
                alog = (auto.get("log_capacity") or {}).get("tokens")
                if log.get("tokens") and alog:
                    row["ratio_log_tokens"] = log["tokens"] / alog
                row["ratio_declared"] = a["slot_bytes"] / e["slot_bytes"]
        rows[name] = row
    return rows


def _f(v: Any, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    c = report["conditions"]
    lines = ["# KV-cache capacity in vLLM at a fixed memory budget", "", f"Conditions: {c['line']}", "",
             "Numbers read from vLLM: pool = `cache_config.num_gpu_blocks` x `block_size`; vLLM tokens / "
             "concurrency = `cache_config.kv_cache_size_tokens` / `kv_cache_max_concurrency` (for requests of "
             f"max_model_len = {c['max_model_len']} tokens); log = the engine's line `CPU KV cache size: N tokens, "
             "Maximum concurrency ...`. Implied bytes per token-head = budget / (pool tokens x "
             f"{c.get('num_layers', '?')} layers x {c.get('num_kv_heads', '?')} kv heads); declared = the dtype's "
             "slot size (K + V).", "",
             "| dtype | bits K / V | blocks | pool tokens | vLLM tokens | log tokens | max concurrency | "
             "ratio vs auto | implied B / token-head | declared B / token-head |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["rows"].items():
        if r.get("status") != "ok":
            lines.append(f"| {name} | failed ({r.get('status')}) | | | | | | | | |")
            continue
        e = r["engine"]
        lines.append(
            f"| {name} | {r['bits_k']:.2f} / {r['bits_v']:.2f} | {e['num_gpu_blocks']} | {r['pool_tokens']:,} | "
            f"{_f(r['kv_cache_size_tokens'], ',')} | {_f(r['log_tokens'], ',')} | {_f(r['concurrency'], '.2f')} | "
            f"{_f(r.get('ratio_tokens', r.get('ratio_pool')), '.2f')}x | "
            f"{_f(r['implied_bytes_per_token_head'], '.1f')} | {r['declared_bytes_per_token_head']} |")
    lines += ["", "ratio vs auto = vLLM tokens / auto's vLLM tokens (pool ratios: "
              + ", ".join(f"{n} {_f(r.get('ratio_pool'), '.3f')}" for n, r in report["rows"].items()
                          if r.get("status") == "ok" and n != "auto") + ")."]
    path.write_text("\n".join(lines) + "\n")


def run(out_dir: Path, kv_space_gib: float = 1.0, dtypes: list[str] | None = None,
        max_model_len: int = 8192, *, timeout_s: float = WORKER_TIMEOUT_S) -> dict[str, Any]:
    """Start one engine per dtype (own subprocess, one after the other) at ``kv_space_gib`` GiB of KV
    cache; write ``capacity.json`` / ``capacity.md`` into ``out_dir``; return the report."""
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if dtypes is None:
        dtypes = ["auto", *(d for d in plugin_dtypes() if d != "auto")]
    dtypes = list(dict.fromkeys(dtypes))
    if "auto" in dtypes:
        dtypes.remove("auto")
    dtypes.insert(0, "auto")
    budget = int(kv_space_gib) * 2**30
    conditions = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "cpu": _cpu_model(),
                  "cpu_count": os.cpu_count(), "vllm": vllm_version(), "python": platform.python_version(),
                  "model": "SmolLM2-135M-Instruct (dummy weights)", "kv_space_gib": int(kv_space_gib),
                  "budget_bytes": budget, "max_model_len": max_model_len, "dtypes": dtypes}
    conditions["line"] = (f"{conditions['date']} | CPU {conditions['cpu']} ({conditions['cpu_count']} cores) | "
                          f"vllm {conditions['vllm']} (CPU) | {conditions['model']} | VLLM_CPU_KVCACHE_SPACE="
                          f"{int(kv_space_gib)} GiB | max_model_len {max_model_len}")
    print(f"conditions: {conditions['line']}", flush=True)
    per: dict[str, dict[str, Any]] = {}
    for d in dtypes:
        spec = resolve_dtype(d)
        res_path = out_dir / f"capacity_{safe_name(d)}.json"
        log_path = out_dir / f"capacity_{safe_name(d)}.log"
        res_path.unlink(missing_ok=True)
        rc, wall, log = run_worker_subprocess(
            ["e8vllm.bench.capacity", "--worker", d, "--kv-cache-dtype", spec["kv_cache_dtype"],
             "--max-model-len", str(max_model_len), "--result", str(res_path)],
            engine_env(kv_space_gib, spec["env"]), log_path, timeout_s)
        if res_path.exists():  # written atomically after the measurement: complete whatever rc is
            r = json.loads(res_path.read_text())
            res_path.unlink()
            if rc != 0:  # vLLM 0.32 CPU sometimes aborts in its own teardown, after our result is out
                r["worker_exit_code"] = rc
                print(f"{d}: worker exited with {rc} after writing its result (teardown)", flush=True)
            caps = parse_capacity_lines(log)
            r["log_capacity"] = caps[-1] if caps else None
            r["wall_s"] = wall
            r["note"] = spec["note"]
            per[d] = r
            e = r["engine"]
            print(f"{d}: {e['num_gpu_blocks']} blocks x {e['block_size']} = {e['pool_tokens']:,} tokens; vLLM "
                  f"{e['kv_cache_size_tokens']} tokens, concurrency {e['kv_cache_max_concurrency']}; log "
                  f"{r['log_capacity']}; wall {wall:.0f} s", flush=True)
        else:
            per[d] = {"name": d, "status": "timeout" if rc == -9 else f"rc {rc}", "wall_s": wall,
                      "log_tail": log[-3000:]}
            print(f"{d}: FAILED ({per[d]['status']}); log {log_path}\n{log[-2000:]}", flush=True)
    rows = _rows(per, budget)
    ok = [r for r in rows.values() if r.get("status") == "ok"]
    if ok:
        conditions.update(num_layers=ok[0]["engine"]["num_layers"], num_kv_heads=ok[0]["engine"]["num_kv_heads"],
                          head_size=ok[0]["engine"]["head_size"], block_size=ok[0]["engine"]["block_size"])
    conditions["elapsed_s"] = time.perf_counter() - t_start
    report = {"conditions": conditions, "rows": rows}
    (out_dir / "capacity.json").write_text(json.dumps(report, indent=1))
    write_markdown(out_dir / "capacity.md", report)
    print(f"{'dtype':<18}{'pool tok':>10}{'vLLM tok':>10}{'log tok':>10}{'conc.':>8}{'ratio':>7}{'B/tok-head':>11}")
    for n, r in rows.items():
        if r.get("status") == "ok":
            print(f"{n:<18}{r['pool_tokens']:>10}{_f(r['kv_cache_size_tokens'], 'd'):>10}{_f(r['log_tokens'], 'd'):>10}"
                  f"{_f(r['concurrency'], '.2f'):>8}{_f(r.get('ratio_tokens'), '.2f'):>7}"
                  f"{_f(r['implied_bytes_per_token_head'], '.1f'):>11}")
    print(f"wrote {out_dir / 'capacity.json'}, capacity.md in {conditions['elapsed_s']:.0f} s", flush=True)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    p = argparse.ArgumentParser(prog="python -m e8vllm.bench.capacity", description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=Path("results"), help="where to write capacity.json/.md")
    p.add_argument("--kv-space-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (whole GiB)")
    p.add_argument("--dtypes", default=None, help="comma-separated kv-cache dtypes (default: auto + every plugin dtype)")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--timeout-s", type=float, default=WORKER_TIMEOUT_S, help="per-dtype subprocess limit")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--kv-cache-dtype", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        _worker(a.worker, a.kv_cache_dtype or a.worker, a.max_model_len, a.result)
        return None
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()] if a.dtypes else None
    return run(a.out_dir, kv_space_gib=a.kv_space_gib, dtypes=dtypes, max_model_len=a.max_model_len,
               timeout_s=a.timeout_s)


if __name__ == "__main__":
    main()
