"""Quality benchmark: perplexity and top-1 agreement of SmolLM2 with an E8-quantized KV cache, in vLLM.

What is measured
----------------
SmolLM2-135M-Instruct (:func:`e8vllm.models.prepare_model`) runs in vLLM's CPU engine over
the held-out perplexity texts (:func:`e8vllm.kvdump.split_texts` ``.perplexity``: GPL-3,
LGPL-2, LGPL-2.1, LGPL-3; ~20.7k tokens, disjoint from the files whose KV vectors the codec
benchmarks use). The token stream (no special tokens) is cut into non-overlapping windows of
``window`` tokens; each window is one token-id prompt run with
``SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0)``. vLLM then returns, for
every prompt position ``i >= 1``, the log-probability of the actual token ``ids[i]`` given
``ids[:i]`` and the rank-1 (top-1) token of that distribution (a dict ``{token_id: Logprob}``
holding the actual token and, when it is not the argmax, the rank-1 token too).

* PPL = exp(mean NLL over every predicted token: ``window - 1`` per window).
* ΔPPL % = 100 (PPL / PPL_auto - 1), with a 95 % interval from the paired per-window
  differences of mean NLL (windows have equal length, so their mean is the overall mean).
* top-1 agreement = share of positions where the run's top-1 token equals the ``auto`` run's.

Every dtype runs in its own engine, in its own subprocess (``python -m e8vllm.bench.quality
--worker ...``), one after the other, so that each engine's memory is freed before the next
starts. Engine settings: bfloat16 weights, ``max_model_len = window + 1``, ``enforce_eager``,
``enable_prefix_caching=False`` (every run writes its own cache and reads it back: in the E8
path prefill attention reads the packed cache too), ``VLLM_CPU_KVCACHE_SPACE=2`` GiB.

Dtypes: ``auto`` (bf16 cache, the reference) and the plugin's E8 dtypes (default ``e8_k4v4``,
``e8_k3v3``, ``e8_k2v2``, ``e8_k4v2``), plus an INT4 baseline: a plugin dtype with ``int4`` in
its name if the plugin registers one, else none by default. A pseudo-dtype
``codecs:KCODEC[/VCODEC]`` runs ``e8_k4v4``'s engine with the plugin's debug switch
``E8VLLM_DEBUG_CODECS=KCODEC,VCODEC`` (any codec of :mod:`e8vllm.codecs`, e.g.
``codecs:int4-sym``: uniform INT4 at 4.25 bits per value, the same bits as ``e8_k4v4``);
bits per value are then read from the codec actually used.

Goals (from the issue; each evaluated from the measured numbers): ``e8_k4v4`` within +1.5 % of
``auto``; E8 3-bit (``e8_k3v3``) within +5 %; E8 beats INT4 at equal bits (lower PPL than the
INT4 baseline at the same or fewer bits per value).

    python -m e8vllm.bench.quality --out-dir results [--dtypes auto,e8_k4v4,...] [--max-tokens 20480]
    python -m e8vllm.bench.quality --out-dir /tmp/q --quick        # 2 windows of 256, auto + e8_k4v4

Outputs in ``out_dir``: ``quality_<dtype>.json`` / ``.log`` per dtype (per-token NLL and
top-1 ids, engine log), ``quality.json`` (everything but the per-token arrays), ``quality.md``
(table + goals) and ``quality.png`` (ΔPPL % vs bits per value).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["run", "main", "QUALITY_DTYPES", "GOALS", "resolve_dtype", "engine_env", "engine_info",
           "run_worker_subprocess", "evaluate_goals", "summarize", "int4_plugin_dtypes"]

ROOT = Path(__file__).resolve().parents[2]
"""Repository root (put on the workers' PYTHONPATH)."""

QUALITY_DTYPES: tuple[str, ...] = ("auto", "e8_k4v4", "e8_k3v3", "e8_k2v2", "e8_k4v2")
"""Default dtypes (an INT4 plugin dtype, if registered, is appended)."""
QUICK_DTYPES: tuple[str, ...] = ("auto", "e8_k4v4")
QUICK_WINDOW = 256
QUICK_WINDOWS = 2
KV_SPACE_GIB = 2
"""VLLM_CPU_KVCACHE_SPACE of the quality engines (integer GiB: vLLM 0.32 parses an int)."""
DEBUG_CODECS_ENV = "E8VLLM_DEBUG_CODECS"
CODECS_PREFIX = "codecs:"
NOCENTER_SUFFIX = "@nocenter"
CALIB_MARK = "@calib="
CALIBRATION_ENV = "E8VLLM_KV_CALIBRATION"
CARRIER_DTYPE = "e8_k4v4"
"""The e8 dtype whose engine runs a ``codecs:`` pseudo-dtype (its codecs are replaced)."""
WORKER_TIMEOUT_S = 3600.0
RESULT_MARK = "E8VLLM_RESULT "

GOALS: tuple[dict[str, Any], ...] = (
    {"id": "k4v4_within_1.5pct", "text": "E8 K4/V4 (e8_k4v4) PPL within +1.5 % of auto",
     "dtype": "e8_k4v4", "max_dppl_pct": 1.5},
    {"id": "3bit_within_5pct", "text": "E8 3-bit (e8_k3v3) PPL within +5 % of auto",
     "dtype": "e8_k3v3", "max_dppl_pct": 5.0},
    {"id": "e8_beats_int4", "text": "E8 beats INT4 at equal bits (lower PPL at the same or fewer bits per value)"},
)


from e8vllm.bench.conditions import cpu_model as _cpu_model  # noqa: E402

# ----------------------------------------------------------------------------- small helpers


def _dist_version(*names: str) -> str | None:
    for n in names:
        try:
            return importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def vllm_version() -> str | None:
    """Installed vLLM distribution version (``vllm-cpu`` or ``vllm``), without importing vllm."""
    return _dist_version("vllm-cpu", "vllm")


def safe_name(name: str) -> str:
    """File-name-safe form of a dtype label."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def resolve_dtype(name: str) -> dict[str, Any]:
    """How to run dtype label ``name``: ``{"name", "kv_cache_dtype", "env", "note"}``.

    ``codecs:KC[/VC]`` -> the :data:`CARRIER_DTYPE` engine with ``E8VLLM_DEBUG_CODECS=KC,VC``.
    A ``@nocenter`` suffix (e.g. ``e8_k4v4@nocenter``) runs the same engine with KV centering
    off (``E8VLLM_KV_CALIBRATION=none``, :mod:`e8vllm.calibration`): the ablation row.
    ``@calib=PATH`` (e.g. ``e8_k4v4@calib=/tmp/c.safetensors``) runs it with another calibration file.
    """
    if CALIB_MARK in name:
        head, _, path = name.partition(CALIB_MARK)
        if not Path(path).is_file():
            raise ValueError(f"{name!r}: no calibration file {path}")
        base = resolve_dtype(head)
        note = "; ".join(x for x in (base["note"], f"KV calibration {path}") if x)
        return {"name": name, "kv_cache_dtype": base["kv_cache_dtype"],
                "env": {**base["env"], CALIBRATION_ENV: path}, "note": note}
    if name.endswith(NOCENTER_SUFFIX):
        base = resolve_dtype(name[: -len(NOCENTER_SUFFIX)])
        note = "; ".join(x for x in (base["note"], f"KV centering off ({CALIBRATION_ENV}=none)") if x)
        return {"name": name, "kv_cache_dtype": base["kv_cache_dtype"],
                "env": {**base["env"], CALIBRATION_ENV: "none"}, "note": note}
    if name.startswith(CODECS_PREFIX):
        kc, _, vc = name[len(CODECS_PREFIX):].partition("/")
        kc, vc = kc.strip(), (vc.strip() or kc.strip())
        if not kc:
            raise ValueError(f"bad pseudo-dtype {name!r}: expected codecs:KCODEC[/VCODEC]")
        return {"name": name, "kv_cache_dtype": CARRIER_DTYPE, "env": {DEBUG_CODECS_ENV: f"{kc},{vc}"},
                "note": f"{CARRIER_DTYPE} engine with {DEBUG_CODECS_ENV}={kc},{vc} (codecs {kc} / {vc})"}
    return {"name": name, "kv_cache_dtype": name, "env": {}, "note": ""}


def _plugin_modules() -> list[Any]:
    mods = []
    for m in ("e8vllm.vllm_plugin.spec", "e8vllm.vllm_plugin.register"):
        try:
            import importlib

            mods.append(importlib.import_module(m))
        except Exception:  # noqa: BLE001 - vllm missing or plugin broken: no plugin dtypes
            pass
    return mods


def plugin_dtypes() -> list[str]:
    """Every kv-cache dtype name the plugin declares (``*DTYPES`` tuples of its modules), in order."""
    out: list[str] = []
    for mod in _plugin_modules():
        for attr in sorted(dir(mod)):
            val = getattr(mod, attr)
            if attr.isupper() and attr.endswith("DTYPES") and isinstance(val, (tuple, list)):
                out += [v for v in val if isinstance(v, str) and v not in out]
    return out


def int4_plugin_dtypes() -> list[str]:
    """Plugin dtypes that are INT4 baselines (``int4`` in the name); [] when there is none."""
    return [d for d in plugin_dtypes() if "int4" in d.lower()]


def default_dtypes() -> list[str]:
    return [*QUALITY_DTYPES, *int4_plugin_dtypes()]


def engine_env(kv_space_gib: float, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of an engine subprocess: CPU target, the KV budget, the repo on PYTHONPATH,
    no inherited debug-codec switch (unless ``extra`` sets one)."""
    if float(kv_space_gib) != int(kv_space_gib) or int(kv_space_gib) < 1:
        raise ValueError(f"VLLM_CPU_KVCACHE_SPACE is a whole number of GiB >= 1 in vLLM 0.32, got {kv_space_gib}")
    env = dict(os.environ)
    env["VLLM_TARGET_DEVICE"] = "cpu"
    env["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_space_gib))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    env.pop(DEBUG_CODECS_ENV, None)
    env.pop(CALIBRATION_ENV, None)
    env.update(extra or {})
    return env


def write_result_atomic(path: Path, result: dict[str, Any]) -> None:
    """Write ``result`` as JSON so that the file exists only when complete (tmp file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)


def run_worker_subprocess(args: list[str], env: dict[str, str], log_path: Path,
                          timeout_s: float = WORKER_TIMEOUT_S) -> tuple[int, float, str]:
    """Run ``python -m <args>`` (new session, cwd = repo root), output to ``log_path``.

    Returns (return code, wall seconds, log text). On timeout the whole process group (the
    worker and the engine processes it spawned) is killed and the code is -9.
    """
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            rc = -9
        except BaseException:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            raise
    return rc, time.perf_counter() - t0, log_path.read_text(errors="replace")


def engine_info(llm: Any, kv_cache_dtype: str) -> dict[str, Any]:
    """What vLLM says about an engine's cache, and the bits the dtype stores per K / V value.

    For e8 dtypes the bits come from the plugin's slot format (:func:`e8vllm.vllm_plugin.spec.kv_format`,
    which honours ``E8VLLM_DEBUG_CODECS``); for stock dtypes from the element size.
    """
    import torch
    import vllm

    cfg = llm.llm_engine.vllm_config
    cc, mc, pc = cfg.cache_config, cfg.model_config, cfg.parallel_config
    head = int(mc.get_head_size())
    info: dict[str, Any] = {
        "vllm_version": getattr(vllm, "__version__", None),
        "torch_version": torch.__version__,
        "cache_dtype": cc.cache_dtype,
        "num_gpu_blocks": cc.num_gpu_blocks,
        "block_size": cc.block_size,
        "pool_tokens": (cc.num_gpu_blocks * cc.block_size) if cc.num_gpu_blocks and cc.block_size else None,
        "kv_cache_size_tokens": getattr(cc, "kv_cache_size_tokens", None),
        "kv_cache_max_concurrency": getattr(cc, "kv_cache_max_concurrency", None),
        "max_model_len": mc.max_model_len,
        "model_dtype": str(mc.dtype).replace("torch.", ""),
        "head_size": head,
        "num_layers": int(mc.get_num_layers(pc)),
        "num_kv_heads": int(mc.get_num_kv_heads(pc)),
        "kv_space_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
        "debug_codecs": os.environ.get(DEBUG_CODECS_ENV) or None,
        "torch_threads": torch.get_num_threads(),
    }
    if kv_cache_dtype.startswith("e8_"):
        from e8vllm.calibration import find_calibration

        calib = find_calibration(mc.model)
        info["kv_centering"] = calib is not None
        info["kv_calibration"] = str(calib) if calib is not None else None
        info["kv_calibration_sha"] = file_sha(calib)
    if cc.cache_dtype != kv_cache_dtype:
        raise RuntimeError(f"engine cache dtype is {cc.cache_dtype!r}, asked for {kv_cache_dtype!r}")
    if kv_cache_dtype.startswith("e8_"):
        from e8vllm.vllm_plugin.spec import kv_format

        fmt = kv_format(kv_cache_dtype, head)
        info.update(k_bytes=fmt.k_bytes, v_bytes=fmt.v_bytes, slot_bytes=fmt.slot_bytes,
                    k_codec=getattr(fmt.k_codec, "name", type(fmt.k_codec).__name__),
                    v_codec=getattr(fmt.v_codec, "name", type(fmt.v_codec).__name__))
    else:
        from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

        tdt = mc.dtype if kv_cache_dtype == "auto" else STR_DTYPE_TO_TORCH_DTYPE[kv_cache_dtype]
        isz = torch.empty((), dtype=tdt).element_size()
        info.update(k_bytes=head * isz, v_bytes=head * isz, slot_bytes=2 * head * isz,
                    k_codec=str(tdt).replace("torch.", ""), v_codec=str(tdt).replace("torch.", ""))
    info["k_bits"] = info["k_bytes"] * 8 / head
    info["v_bits"] = info["v_bytes"] * 8 / head
    info["bits"] = (info["k_bits"] + info["v_bits"]) / 2
    return info


def _shutdown(llm: Any) -> None:
    import gc

    try:
        llm.llm_engine.engine_core.shutdown()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - best effort; the process exits right after
        pass
    del llm
    gc.collect()


# ----------------------------------------------------------------------------- the worker
def _worker(name: str, kv_cache_dtype: str, tokens_path: Path, result_path: Path) -> None:
    """One engine: prompt logprobs of every window; writes ``result_path`` (JSON)."""
    data = json.loads(Path(tokens_path).read_text())
    windows: list[list[int]] = data["windows"]
    window = int(data["window"])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=data["model_dir"], dtype="bfloat16", kv_cache_dtype=kv_cache_dtype,
              max_model_len=window + 1, max_num_batched_tokens=max(2048, window + 1),
              enforce_eager=True, enable_prefix_caching=False, seed=0)
    start_s = time.perf_counter() - t0
    info = engine_info(llm, kv_cache_dtype)
    print(f"engine {name} ({kv_cache_dtype}) started in {start_s:.1f} s: {info}", flush=True)
    sp = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0, detokenize=False)
    t1 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], sp, use_tqdm=False)
    run_s = time.perf_counter() - t1
    nll: list[float] = []
    top1: list[int] = []
    hits = 0
    for w, o in zip(windows, outs, strict=True):
        if list(o.prompt_token_ids) != list(w):
            raise RuntimeError("vLLM returned the outputs in another order than the prompts")
        pl = o.prompt_logprobs
        if pl is None or len(pl) != len(w):
            raise RuntimeError(f"prompt_logprobs missing or of length {None if pl is None else len(pl)} "
                               f"for a prompt of {len(w)} tokens")
        for i in range(1, len(w)):
            d = pl[i]
            lp = d[w[i]]
            best_id, best = min(d.items(), key=lambda kv: kv[1].rank)
            if best.rank != 1:
                raise RuntimeError(f"no rank-1 token at position {i}: {d}")
            nll.append(-float(lp.logprob))
            top1.append(int(best_id))
            hits += int(lp.rank == 1)
    n = len(nll)
    res = {
        "name": name, "kv_cache_dtype": kv_cache_dtype, "status": "ok",
        "tokens_sha": data["tokens_sha"], "window": window, "windows": len(windows), "tokens": n,
        "nll_sum": math.fsum(nll), "ppl": math.exp(math.fsum(nll) / n), "top1_acc": hits / n,
        "start_s": start_s, "run_s": run_s, "tok_per_s": len(windows) * window / run_s,
        "engine": info,
        "window_nll": [math.fsum(nll[j * (window - 1):(j + 1) * (window - 1)]) / (window - 1)
                       for j in range(len(windows))],
        "nll": [round(x, 6) for x in nll], "top1": top1,
    }
    write_result_atomic(Path(result_path), res)
    print(f"{RESULT_MARK}{name}: PPL {res['ppl']:.4f} over {n} tokens, prefill {run_s:.1f} s", flush=True)
    _shutdown(llm)


# ----------------------------------------------------------------------------- aggregation
def summarize(per: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Rows (no per-token arrays) with ΔPPL % and top-1 agreement vs ``auto``."""
    auto = per.get("auto")
    auto_ok = auto is not None and auto.get("status") == "ok"
    rows: dict[str, dict[str, Any]] = {}
    for name, r in per.items():
        row = {k: v for k, v in r.items() if k not in ("nll", "top1", "window_nll")}
        if r.get("status") == "ok":
            eng = r["engine"]
            row.update(k_bits=eng["k_bits"], v_bits=eng["v_bits"], bits=eng["bits"])
        if r.get("status") == "ok" and auto_ok:
            if r["tokens"] != auto["tokens"] or r["tokens_sha"] != auto["tokens_sha"]:
                row["comparable"] = False
            else:
                row["comparable"] = True
                row["dppl_pct"] = 100.0 * (r["ppl"] / auto["ppl"] - 1.0)
                row["top1_agree"] = sum(a == b for a, b in zip(r["top1"], auto["top1"])) / r["tokens"]
                diffs = [a - b for a, b in zip(r["window_nll"], auto["window_nll"])]
                m = sum(diffs) / len(diffs)
                if len(diffs) > 1 and name != "auto":
                    se = math.sqrt(sum((d - m) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
                    row["dppl_ci95_pct"] = [100.0 * (math.exp(m - 1.96 * se) - 1), 100.0 * (math.exp(m + 1.96 * se) - 1)]
        rows[name] = row
    return rows


def _is_int4(name: str, row: dict[str, Any]) -> bool:
    if "int4" in name.lower():
        return True
    codecs = f"{row.get('engine', {}).get('k_codec', '')} {row.get('engine', {}).get('v_codec', '')}".lower()
    return "int4" in codecs


def evaluate_goals(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each goal of :data:`GOALS` with ``status`` "met" / "not met" / "not evaluated" and the numbers."""
    out = []
    ok = {n: r for n, r in rows.items() if r.get("status") == "ok" and "dppl_pct" in r}
    for g in GOALS:
        res = dict(g)
        if "dtype" in g:
            r = ok.get(g["dtype"])
            if r is None:
                res.update(status="not evaluated", detail=f"no comparable {g['dtype']} result")
            else:
                met = r["dppl_pct"] <= g["max_dppl_pct"]
                res.update(status="met" if met else "not met", value_pct=r["dppl_pct"],
                           detail=f"{g['dtype']}: ΔPPL {r['dppl_pct']:+.2f} % (limit +{g['max_dppl_pct']} %)")
        else:
            int4 = {n: r for n, r in ok.items() if _is_int4(n, r)}
            # like with like: the INT rows run the e8 backend with centering, so ablations are left out
            e8 = {n: r for n, r in ok.items()
                  if n.startswith("e8_") and NOCENTER_SUFFIX not in n and not _is_int4(n, r)}
            if not int4:
                res.update(status="not evaluated", detail="no INT4 baseline was run (the plugin registers no "
                           "INT4 kv-cache dtype; a 'codecs:int4-sym' run would provide one)")
            elif not e8:
                res.update(status="not evaluated", detail="no E8 result")
            else:
                pairs = []
                for bn, b in sorted(int4.items()):
                    cands = [(n, r) for n, r in e8.items() if r["bits"] <= b["bits"] + 1e-9]
                    if not cands:
                        continue
                    en, er = max(cands, key=lambda nr: (nr[1]["bits"], -nr[1]["ppl"]))  # closest bits, best PPL
                    pairs.append({"int4": bn, "int4_bits": b["bits"], "int4_ppl": b["ppl"], "e8": en,
                                  "e8_bits": er["bits"], "e8_ppl": er["ppl"], "e8_better": er["ppl"] < b["ppl"]})
                if not pairs:
                    res.update(status="not evaluated", detail="no E8 result at the INT4 baseline's bits or fewer")
                else:
                    met = all(p["e8_better"] for p in pairs)
                    res.update(status="met" if met else "not met", pairs=pairs, detail="; ".join(
                        f"{p['e8']} ({p['e8_bits']:.2f} b) PPL {p['e8_ppl']:.4f} vs {p['int4']} "
                        f"({p['int4_bits']:.2f} b) PPL {p['int4_ppl']:.4f}" for p in pairs))
        out.append(res)
    return out


# ----------------------------------------------------------------------------- outputs
def _f(v: Any, spec: str, dash: str = "–") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return dash
    return format(v, spec)


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    c = report["conditions"]
    lines = ["# KV-cache quality in vLLM: perplexity and top-1 agreement", "",
             f"Conditions: {c['line']}", "",
             f"Method: {c['windows']} non-overlapping windows of {c['window']} tokens of the held-out "
             f"perplexity texts ({', '.join(c['text_files'])}), each a token-id prompt with "
             "`prompt_logprobs=1`; PPL = exp(mean NLL over all "
             f"{c['predicted_tokens']} predicted tokens). ΔPPL vs `auto` (bf16 cache) with a 95 % interval "
             "from paired per-window differences; top-1 agreement = share of positions whose top-1 token "
             "equals auto's. Every dtype in its own engine and subprocess; enforce_eager, no prefix "
             f"caching, VLLM_CPU_KVCACHE_SPACE={c['kv_space_gib']} GiB."
             + (" **Quick run (smoke test): numbers are indicative only.**" if c["quick"] else ""), "",
             "| dtype | bits per K / V value | PPL | ΔPPL % vs auto | 95 % interval | top-1 agreement % | "
             "top-1 acc. % | tokens | engine start s | prefill s | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["rows"].items():
        if r.get("status") != "ok":
            lines.append(f"| {name} | | failed ({r.get('status')}) | | | | | | | | {_f(r.get('wall_s'), '.0f')} |")
            continue
        ci = r.get("dppl_ci95_pct")
        lines.append(
            f"| {name} | {r['k_bits']:.2f} / {r['v_bits']:.2f} | {r['ppl']:.4f} | "
            f"{_f(r.get('dppl_pct'), '+.2f')} | {'[' + format(ci[0], '+.2f') + ', ' + format(ci[1], '+.2f') + ']' if ci else '–'} | "
            f"{_f(None if r.get('top1_agree') is None else 100 * r['top1_agree'], '.2f')} | "
            f"{100 * r['top1_acc']:.2f} | {r['tokens']} | {r['start_s']:.0f} | {r['run_s']:.0f} | "
            f"{_f(r.get('wall_s'), '.0f')} |")
    lines += ["", "Bits per value include the per-vector fp16 scale (K and V codes of 64 values). "
              "top-1 acc. = share of positions where the actual next token is the top-1 token. "
              "wall s = whole subprocess (python start, engine start, prefill, shutdown).", "",
              "## Goals (from the issue, evaluated on the numbers above)", ""]
    for g in report["goals"]:
        lines.append(f"- **{g['status'].upper()}**: {g['text']}. {g.get('detail', '')}")
    notes = list(report.get("notes") or [])
    for name, r in report["rows"].items():
        if r.get("sliced_from_windows"):
            notes.append(f"{name}: reused from an earlier run over {r['sliced_from_windows']} windows of the same "
                         f"text, restricted to its first {r['windows']} windows (timings are those of the "
                         "longer run).")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = {n: r for n, r in report["rows"].items() if r.get("status") == "ok" and "dppl_pct" in r and n != "auto"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, r in rows.items():
        int4 = _is_int4(n, r)
        other = not int4 and not n.startswith("e8_")
        ax.scatter([r["bits"]], [r["dppl_pct"]], marker="s" if int4 else ("^" if other else "o"), s=50,
                   color="tab:red" if int4 else ("tab:gray" if other else "tab:blue"), zorder=3)
        ci = r.get("dppl_ci95_pct")
        if ci:
            ax.vlines(r["bits"], ci[0], ci[1], color="gray", lw=1, zorder=2)
        ax.annotate(n, (r["bits"], r["dppl_pct"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.axhline(0, color="k", lw=0.8)
    ax.axhline(1.5, color="tab:green", ls="--", lw=0.8, label="goal e8_k4v4: +1.5 %")
    ax.axhline(5.0, color="tab:orange", ls="--", lw=0.8, label="goal 3-bit: +5 %")
    vals = [r["dppl_pct"] for r in rows.values()]
    if vals and max(vals) > 50:
        ax.set_yscale("symlog", linthresh=2, linscale=0.5)
        ax.set_ylim(min(-2.0, min(vals) * 1.5), max(vals) * 2.5)
    elif vals:
        ax.set_ylim(min(-1.0, min(vals) - 1), max(6.0, max(vals) * 1.15))
    ax.set_xlabel("bits per K/V value (mean of K and V, incl. scale)")
    ax.set_ylabel("ΔPPL % vs auto (bf16 cache, 16 bits)")
    c = report["conditions"]
    ax.set_title(f"SmolLM2-135M in vLLM: PPL vs KV bits ({c['predicted_tokens']} tokens, window {c['window']})",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- driver
#: ``text`` values of :func:`run` besides a path
TEXTS = ("perplexity", "kv-holdout")


def _text_ids(tok: Any, text: str) -> tuple[list[Path], list[int]]:
    """(files, token ids) of a text source: ``perplexity`` (the held-out perplexity texts),
    ``kv-holdout`` (the KV-side texts after the tokens a default KV calibration reads: text the
    calibration's choices were not made on), or a file / directory of the user's."""
    from e8vllm.calibration import DEFAULT_NUM_TOKENS
    from e8vllm.kvdump import resolve_text_files, split_texts, text_token_ids

    if text == "perplexity":
        files = split_texts().perplexity
        return files, text_token_ids(tok, files).tolist()
    if text == "kv-holdout":
        files = split_texts().kv
        return files, text_token_ids(tok, files).tolist()[DEFAULT_NUM_TOKENS:]
    path = Path(text)
    if not path.exists():
        raise ValueError(f"text must be one of {TEXTS} or an existing file or directory, not {text!r}")
    files = resolve_text_files(path)
    if not files:
        raise ValueError(f"no text files in {path}")
    return files, text_token_ids(tok, files).tolist()


def _tokens(max_tokens: int, window: int,
            text: str = "perplexity") -> tuple[Path, list[Path], list[list[int]], list[list[int]], int]:
    """(model dir, text files, the windows to run, every whole window of the text, tokens available)."""
    from transformers import AutoTokenizer

    from e8vllm.models import prepare_model

    model_dir = prepare_model()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    files, ids = _text_ids(tok, text)
    all_windows = [ids[j * window:(j + 1) * window] for j in range(len(ids) // window)]
    n_win = min(len(ids), max_tokens) // window
    if n_win < 1:
        raise ValueError(f"{len(ids)} tokens available, max_tokens {max_tokens}: not one window of {window}")
    return model_dir, files, all_windows[:n_win], all_windows, len(ids)


def tokens_sha(windows: list[list[int]]) -> str:
    """Identity of a list of equal-length windows (window size and token ids)."""
    flat = [t for w in windows for t in w]
    return hashlib.sha256(json.dumps([len(windows[0]) if windows else 0, flat]).encode()).hexdigest()[:16]


def slice_result(old: dict[str, Any], windows: list[list[int]]) -> dict[str, Any]:
    """A per-dtype result restricted to its first ``len(windows)`` windows (each window is an
    independent prompt, so the first n windows of a longer run are a run on those n windows).
    PPL, top-1 accuracy and the arrays are recomputed; timings stay those of the longer run."""
    n, w = len(windows), int(old["window"])
    k = n * (w - 1)
    nll = old["nll"][:k]
    top1 = old["top1"][:k]
    targets = [t for win in windows for t in win[1:]]
    r = dict(old)
    r.update(windows=n, tokens=k, tokens_sha=tokens_sha(windows), nll=nll, top1=top1,
             window_nll=old["window_nll"][:n], nll_sum=math.fsum(nll), ppl=math.exp(math.fsum(nll) / k),
             top1_acc=sum(a == b for a, b in zip(top1, targets)) / k, sliced_from_windows=old["windows"])
    return r


def file_sha(path: Path | str | None) -> str | None:
    """sha256 of a file (None for None)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path is not None else None


def expected_calibration_sha(spec: dict[str, Any], model_dir: Path) -> str | None:
    """sha256 of the calibration file the engine of ``spec`` will use (None: an uncentered or stock dtype)."""
    if not spec["kv_cache_dtype"].startswith("e8_"):
        return None
    from e8vllm.calibration import CALIBRATION_FILE, OFF_VALUES

    forced = spec["env"].get(CALIBRATION_ENV)
    if forced is not None:
        return None if forced.lower() in OFF_VALUES else file_sha(forced)
    own = Path(model_dir) / CALIBRATION_FILE  # engine_env drops an inherited E8VLLM_KV_CALIBRATION
    return file_sha(own) if own.is_file() else None


def _reusable(res_path: Path, windows: list[list[int]], all_windows: list[list[int]],
              kv_space_gib: int, calibration_sha: str | None = None) -> dict[str, Any] | None:
    """An earlier ok result for the same (or a longer, same-prefix) list of windows and the same
    KV calibration file, sliced; else None."""
    if not res_path.exists():
        return None
    try:
        old = json.loads(res_path.read_text())
    except json.JSONDecodeError:
        return None
    if old.get("status") != "ok" or str(old.get("engine", {}).get("kv_space_gib")) != str(int(kv_space_gib)):
        return None
    n_old = int(old.get("windows", 0))
    if old.get("window") != len(windows[0]) or n_old < len(windows) or n_old > len(all_windows):
        return None
    if old.get("tokens_sha") != tokens_sha(all_windows[:n_old]):
        return None
    if old.get("engine", {}).get("kv_calibration_sha") != calibration_sha:
        return None
    r = slice_result(old, windows) if n_old > len(windows) else dict(old)
    r["reused"] = True
    return r


def run(out_dir: Path, dtypes: list[str] | None = None, max_tokens: int = 20480, window: int = 1024,
        quick: bool = False, *, reuse: bool = False, kv_space_gib: int = KV_SPACE_GIB,
        timeout_s: float = WORKER_TIMEOUT_S, text: str = "perplexity") -> dict[str, Any]:
    """Run the benchmark; writes the outputs into ``out_dir`` and returns the report.

    Args:
        dtypes: dtype labels (default :func:`default_dtypes`; ``auto`` is always run first).
        max_tokens: at most this many tokens (whole windows) of the perplexity texts.
        window: tokens per prompt (non-overlapping windows).
        quick: 2 windows of 256 tokens, auto + e8_k4v4 (unless ``dtypes`` is given).
        reuse: keep a dtype's existing ``quality_<dtype>.json`` when it was made from the same tokens.
        kv_space_gib: VLLM_CPU_KVCACHE_SPACE (whole GiB).
        timeout_s: per-dtype subprocess limit (the process group is killed after it).
        text: ``perplexity`` (default), ``kv-holdout`` (:func:`_text_ids`) or a text file / directory.
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if quick:
        window, max_tokens = QUICK_WINDOW, QUICK_WINDOW * QUICK_WINDOWS
        dtypes = list(dtypes) if dtypes else list(QUICK_DTYPES)
    dtypes = list(dict.fromkeys(dtypes if dtypes else default_dtypes()))
    if "auto" in dtypes:
        dtypes.remove("auto")
    dtypes.insert(0, "auto")
    specs = {d: resolve_dtype(d) for d in dtypes}

    model_dir, files, windows, all_windows, available = _tokens(max_tokens, window, text)
    flat = [t for w in windows for t in w]
    sha = tokens_sha(windows)
    tokens_path = out_dir / "quality_tokens.json"
    tokens_path.write_text(json.dumps({"model_dir": str(model_dir), "window": window, "tokens_sha": sha,
                                       "windows": windows}))
    conditions = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
        "vllm": vllm_version(), "python": platform.python_version(), "model": Path(model_dir).name,
        "model_dir": str(model_dir), "text": text, "text_files": [f.name for f in files], "tokens_available": available,
        "windows": len(windows), "window": window, "prompt_tokens": len(flat),
        "predicted_tokens": len(windows) * (window - 1), "tokens_sha": sha, "kv_space_gib": int(kv_space_gib),
        "weights_dtype": "bfloat16", "quick": quick, "dtypes": dtypes,
    }
    conditions["line"] = (f"{conditions['date']} | CPU {conditions['cpu']} ({conditions['cpu_count']} cores) | "
                          f"vllm {conditions['vllm']} (CPU) | model {conditions['model']} (bf16) | text "
                          f"{'+'.join(conditions['text_files'])} | {len(flat)} tokens = {len(windows)} x {window} "
                          f"({conditions['predicted_tokens']} predicted) | KV space {kv_space_gib} GiB")
    print(f"conditions: {conditions['line']}", flush=True)

    per: dict[str, dict[str, Any]] = {}
    for d in dtypes:
        spec = specs[d]
        res_path = out_dir / f"quality_{safe_name(d)}.json"
        log_path = out_dir / f"quality_{safe_name(d)}.log"
        if reuse:
            old = _reusable(res_path, windows, all_windows, kv_space_gib,
                            expected_calibration_sha(spec, Path(model_dir)))
            if old is not None:
                per[d] = old
                src = f" (first {len(windows)} of its {old['sliced_from_windows']} windows)" if old.get(
                    "sliced_from_windows") else ""
                print(f"{d}: reused {res_path.name}{src}: PPL {old['ppl']:.4f}", flush=True)
                continue
        res_path.unlink(missing_ok=True)
        print(f"{d}: starting engine{' (' + spec['note'] + ')' if spec['note'] else ''} ...", flush=True)
        rc, wall, log = run_worker_subprocess(
            ["e8vllm.bench.quality", "--worker", d, "--kv-cache-dtype", spec["kv_cache_dtype"],
             "--tokens-file", str(tokens_path), "--result", str(res_path)],
            engine_env(kv_space_gib, spec["env"]), log_path, timeout_s)
        if res_path.exists():  # written atomically after the measurement: complete whatever rc is
            r = json.loads(res_path.read_text())
            r["wall_s"] = wall
            r["note"] = spec["note"]
            if rc != 0:  # vLLM 0.32 CPU sometimes aborts in its own teardown, after our result is out
                r["worker_exit_code"] = rc
                print(f"{d}: worker exited with {rc} after writing its result (teardown)", flush=True)
            res_path.write_text(json.dumps(r))
            per[d] = r
            print(f"{d}: PPL {r['ppl']:.4f} over {r['tokens']} tokens; engine start {r['start_s']:.0f} s, "
                  f"prefill {r['run_s']:.0f} s ({r['tok_per_s']:.0f} tok/s), wall {wall:.0f} s", flush=True)
        else:
            status = "timeout" if rc == -9 else f"rc {rc}"
            per[d] = {"name": d, "kv_cache_dtype": spec["kv_cache_dtype"], "status": status, "wall_s": wall,
                      "note": spec["note"], "log_tail": log[-3000:]}
            print(f"{d}: FAILED ({status}) after {wall:.0f} s; log {log_path}\n{log[-2000:]}", flush=True)

    rows = summarize(per)
    goals = evaluate_goals(rows)
    versions = {r["engine"]["vllm_version"] for r in per.values() if r.get("status") == "ok"}
    if versions:
        conditions["vllm_runtime"] = sorted(v for v in versions if v)
    notes = [f"{n}: {r['note']}" for n, r in rows.items() if r.get("note")]
    if not int4_plugin_dtypes():
        notes.append("The plugin registers no INT4 kv-cache dtype; INT4 comparisons (if any) use the "
                     f"'{CODECS_PREFIX}' pseudo-dtype ({DEBUG_CODECS_ENV}, a debug switch of the plugin).")
    conditions["elapsed_s"] = time.perf_counter() - t_start
    report = {"conditions": conditions, "rows": rows, "goals": goals, "notes": notes}
    (out_dir / "quality.json").write_text(json.dumps(report, indent=1))
    write_markdown(out_dir / "quality.md", report)
    try:
        write_plot(out_dir / "quality.png", report)
    except Exception as exc:  # noqa: BLE001 - the numbers matter more than the figure
        print(f"plot failed: {exc!r}", flush=True)
    _print_summary(report)
    print(f"wrote {out_dir / 'quality.json'}, quality.md, quality.png in {conditions['elapsed_s']:.0f} s", flush=True)
    return report


def _print_summary(report: dict[str, Any]) -> None:
    print(f"{'dtype':<22}{'K/V bits':>12}{'PPL':>10}{'ΔPPL%':>9}{'top1 agr%':>11}{'tokens':>8}{'wall s':>8}")
    for n, r in report["rows"].items():
        if r.get("status") != "ok":
            print(f"{n:<22}  {r.get('status')}")
            continue
        agr = r.get("top1_agree")
        print(f"{n:<22}{r['k_bits']:>6.2f}/{r['v_bits']:<5.2f}{r['ppl']:>10.4f}{_f(r.get('dppl_pct'), '+.2f'):>9}"
              f"{_f(None if agr is None else 100 * agr, '.2f'):>11}{r['tokens']:>8}{_f(r.get('wall_s'), '.0f'):>8}")
    for g in report["goals"]:
        print(f"goal [{g['status']}] {g['text']}: {g.get('detail', '')}")


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    p = argparse.ArgumentParser(prog="python -m e8vllm.bench.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=Path("results"), help="where to write quality.json/.md/.png")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated kv-cache dtypes (default: auto,e8_k4v4,e8_k3v3,e8_k2v2,e8_k4v2 + a plugin "
                        "INT4 dtype if any; 'all' = auto + every plugin dtype; 'codecs:K[/V]' = e8_k4v4 engine with "
                        "E8VLLM_DEBUG_CODECS=K,V)")
    p.add_argument("--max-tokens", type=int, default=20480, help="tokens of text (whole windows)")
    p.add_argument("--window", type=int, default=1024, help="tokens per prompt")
    p.add_argument("--quick", action="store_true", help="2 windows of 256 tokens, auto + e8_k4v4")
    p.add_argument("--text", default="perplexity",
                   help="perplexity (held-out licence texts), kv-holdout (KV-side texts after the calibration's "
                        "tokens) or a text file / directory")
    p.add_argument("--reuse", action="store_true", help="keep per-dtype results made from the same tokens")
    p.add_argument("--kv-space-gib", type=int, default=KV_SPACE_GIB, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--timeout-s", type=float, default=WORKER_TIMEOUT_S, help="per-dtype subprocess limit")
    # worker mode (internal)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--kv-cache-dtype", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tokens-file", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        _worker(a.worker, a.kv_cache_dtype or a.worker, a.tokens_file, a.result)
        return None
    dtypes = None
    if a.dtypes == "all":
        dtypes = ["auto", *(d for d in plugin_dtypes() if d != "auto")]
    elif a.dtypes:
        dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    return run(a.out_dir, dtypes=dtypes, max_tokens=a.max_tokens, window=a.window, quick=a.quick, reuse=a.reuse,
               kv_space_gib=a.kv_space_gib, timeout_s=a.timeout_s, text=a.text)


if __name__ == "__main__":
    main()
