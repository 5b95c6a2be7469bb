"""Quantization benchmark: MSE / SNR / cosine vs bits per value of every registered codec.

Data sets (each split into disjoint train and test parts; codecs with ``needs_training``,
e.g. PQ, are fitted on the train part only):

* ``gaussian``: iid N(0, 1) vectors, D = 64 (seeded).
* ``smollm2-k`` / ``smollm2-v``: SmolLM2-135M's cached keys (after RoPE) and values on real
  text (:func:`e8vllm.kvdump.dump_kv`, D = 64). Train = vectors of the first 25 % of the
  tokens, test = vectors of the remaining tokens; both sub-sampled evenly over all
  (layer, head) pairs (seeded).

Per codec and data set: bits per value, MSE per value, NMSE = Σ||x - x̂||² / Σ||x||²,
SNR = -10 log10(NMSE), mean and 1st-percentile cosine similarity, encode/decode throughput
(vectors/s: after the warm-up run that produced the measured codes, the fastest of up to
three timed runs, ``torch.set_num_threads(2)``), decode ops/value and table bytes
(``decode_cost``), training time. A codec that raises is recorded as failed (with its
error), the benchmark goes on.

Quick mode (a smoke run, about a minute): 2000 vectors per set, 1 thread (on a shared 2-core
machine 2 threads are up to tens of times slower on these small tensors whenever the other
core is busy), one timed run; a codec that uses more than ``QUICK_SLOW_S`` CPU seconds on a
data set is skipped on the following ones, and one still running after ``QUICK_LIMIT_S`` CPU
seconds is interrupted (recorded as skipped).

Reference: the rate-distortion bound of a unit Gaussian, SNR = 20 log10(2) ≈ 6.02 dB per
bit; every codec's gap to it is reported at its own bits per value. (For real KV data the
Gaussian bound is not a bound, since non-Gaussian sources can be compressed further: the
"gap" is then only a yardstick and may be negative.)

Findings (computed from the measured numbers) compare our E8 codes with the baselines at
*equal* bits per value (see :data:`METHOD`).

    python -m e8vllm.bench.quant --out-dir results [--n-vectors 20000] [--quick]
    e8vllm bench quant --out-dir results [--quick]

Outputs in ``out_dir``: ``quant.json`` (everything), ``quant.md`` (tables + findings) and
``quant.png`` (SNR vs bits per value per data set).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import random
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["run", "main", "DEFAULT_KV_PATH", "DB_PER_BIT", "METHOD", "snr_at", "envelope"]

DEFAULT_KV_PATH = Path("results/kv_smollm2.safetensors")
"""The KV dump read for the real-data sets (created with :func:`e8vllm.kvdump.dump_kv` if missing)."""
DUMP_TOKENS = 8192
HEAD_DIM = 64
THREADS = 2
QUICK_THREADS = 1
"""Quick mode's default: on a shared 2-core machine, 2 threads make these small-tensor ops up
to 10-40x slower whenever the other core is busy (each parallel region waits for it)."""
SEED = 0
TRAIN_FRACTION = 0.25
"""Share of the tokens (the first ones) whose KV vectors form the train split."""
N_TRAIN_FULL = 20000
QUICK_N = 2000
QUICK_SLOW_S = 1.5
"""Quick mode: a codec whose fit + encode + decode (+ timed repeats) on one data set uses more
CPU seconds than this (process CPU time, so that load from other processes does not count)
is skipped on the following data sets."""
QUICK_LIMIT_S = 2.0
"""Quick mode: a codec is interrupted after this many CPU seconds on one data set (SIGPROF
timer; recorded as skipped, and skipped on the following data sets)."""
DB_PER_BIT = 20.0 * math.log10(2.0)  # 6.0206 dB per bit: Gaussian rate-distortion bound
CLAIM_MSE_REDUCTION = 0.22
"""The seed's claim: E8 has 22 % lower MSE than INT8 and than PQ."""
COMPARE_BITS = (2, 3, 4)
DATASETS = ("gaussian", "smollm2-k", "smollm2-v")

METHOD = (
    "Equal-bits comparison: a baseline's SNR at the E8 code's bits/value is read off the baseline "
    "group's upper SNR-vs-bits envelope (best measured SNR at each bits/value, Pareto-dominated points "
    "dropped) by linear interpolation between the two bracketing measured points; outside the measured "
    "range it is extrapolated from the nearest measured point with the 6.02 dB/bit slope of the Gaussian "
    "rate-distortion bound. Gain = SNR(E8) - SNR(baseline at equal bits), in dB; "
    "MSE reduction = 1 - 10^(-gain/10). 'Our best E8 code at b bits' = the family-e8 codec of nominal "
    "b bits with the smallest gap to the 6.02 dB/bit bound (= the highest SNR when bits/value are equal)."
)


# ----------------------------------------------------------------------------- data


@dataclass
class DataSet:
    name: str
    train: torch.Tensor  # float32 [N_train, D]
    test: torch.Tensor  # float32 [N_test, D]
    source: str
    info: dict = field(default_factory=dict)


def gaussian_dataset(n_test: int, n_train: int, head_dim: int = HEAD_DIM, seed: int = SEED) -> DataSet:
    """iid N(0, 1) vectors: train and test drawn from one seeded generator (disjoint draws)."""
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(n_train, head_dim, generator=g)
    test = torch.randn(n_test, head_dim, generator=g)
    return DataSet("gaussian", train, test, f"iid N(0,1), D={head_dim}, torch seed {seed}",
                   {"n_train": n_train, "n_test": n_test, "head_dim": head_dim, "seed": seed})


def _even_sample(tokens_lo: int, tokens_hi: int, n_total: int, blocks: list[torch.Tensor],
                 gen: torch.Generator) -> torch.Tensor:
    """n_total rows sampled evenly over ``blocks`` (each [T, D]: one (layer, head)), from
    token rows tokens_lo..tokens_hi-1, without replacement inside a block."""
    g = len(blocks)
    avail = tokens_hi - tokens_lo
    n_total = min(n_total, g * avail)
    base, extra = divmod(n_total, g)
    counts = torch.full((g,), base, dtype=torch.long)
    counts[torch.randperm(g, generator=gen)[:extra]] += 1
    parts = []
    for blk, cnt in zip(blocks, counts.tolist()):
        if cnt == 0:
            continue
        idx = tokens_lo + torch.randperm(avail, generator=gen)[:cnt].sort().values
        parts.append(blk[idx])
    return torch.cat(parts).contiguous()


def kv_datasets(kv_path: Path, n_test: int, n_train: int, seed: int = SEED,
                train_fraction: float = TRAIN_FRACTION) -> list[DataSet]:
    """``smollm2-k`` and ``smollm2-v`` from a :func:`e8vllm.kvdump.dump_kv` file."""
    from e8vllm.kvdump import kv_metadata, kv_vectors, load_kv, num_layers

    kv = load_kv(kv_path)
    meta = kv_metadata(kv_path)
    n_layers = num_layers(kv)
    t_tokens, n_heads, head_dim = kv["layer0.k"].shape
    n_tr_tok = int(t_tokens * train_fraction)
    if not 1 <= n_tr_tok < t_tokens:
        raise ValueError(f"{kv_path}: {t_tokens} tokens are too few for a {train_fraction:.0%} train split")
    out = []
    for which, dname in (("k", "smollm2-k"), ("v", "smollm2-v")):
        blocks = []
        for layer in range(n_layers):
            # rows ordered token, head -> [T, H, D]
            v = kv_vectors(kv, which=which, layers=[layer]).reshape(t_tokens, n_heads, head_dim)
            blocks.extend(v[:, h, :] for h in range(n_heads))
        gen = torch.Generator().manual_seed(seed + (1 if which == "k" else 2))
        train = _even_sample(0, n_tr_tok, n_train, blocks, gen)
        test = _even_sample(n_tr_tok, t_tokens, n_test, blocks, gen)
        what = "keys after RoPE" if which == "k" else "values"
        source = (f"{meta.get('model', 'SmolLM2')} {what}, {kv_path} ({t_tokens} tokens x {n_layers} layers x "
                  f"{n_heads} kv heads); train = tokens 0..{n_tr_tok - 1}, test = tokens {n_tr_tok}..{t_tokens - 1}, "
                  f"even over {n_layers * n_heads} (layer, head) pairs, seed {seed}")
        out.append(DataSet(dname, train, test, source, {
            "n_train": int(train.shape[0]), "n_test": int(test.shape[0]), "head_dim": int(head_dim),
            "kv_path": str(kv_path), "tokens": int(t_tokens), "train_tokens": [0, n_tr_tok],
            "test_tokens": [n_tr_tok, int(t_tokens)], "layers": n_layers, "kv_heads": int(n_heads),
            "model": meta.get("model"), "text_files": meta.get("text_files"), "seed": seed,
            "rms": float(test.square().mean().sqrt()),
        }))
    del kv
    return out


# ----------------------------------------------------------------------------- measurement


from e8vllm.bench.conditions import cpu_model as _cpu_model  # noqa: E402


def quality(x: torch.Tensor, xh: torch.Tensor) -> dict[str, float]:
    """MSE per value, NMSE, SNR dB, mean / 1st-percentile cosine of x vs x̂ (float64)."""
    x64, e64 = x.double(), (x.double() - xh.double())
    se = e64.square().sum()
    energy = x64.square().sum()
    nmse = float(se / energy) if energy > 0 else float("nan")
    snr = -10.0 * math.log10(nmse) if nmse > 0 else float("inf")
    xh64 = xh.double()
    cos = (x64 * xh64).sum(1) / (x64.norm(dim=1) * xh64.norm(dim=1)).clamp_min(1e-300)
    cos_np = cos.numpy()
    return {"mse": float(se / x.numel()), "nmse": nmse, "snr_db": snr,
            "cos_mean": float(cos_np.mean()), "cos_p1": float(np.percentile(cos_np, 1))}


def _timed(fn, budget_s: float = 1.0, max_runs: int = 3) -> float:
    """Seconds of one call of fn (already warmed up): the fastest of up to ``max_runs`` timed
    runs, stopping once ``budget_s`` is spent (one run for slow codecs)."""
    best, spent = math.inf, 0.0
    for _ in range(max_runs):
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        best, spent = min(best, dt), spent + dt
        if spent >= budget_s:
            break
    return best


class CodecTimeout(Exception):
    """A codec ran past the quick-mode CPU-time limit."""


@contextlib.contextmanager
def cpu_limit(seconds: float | None):
    """Raise :class:`CodecTimeout` in the body once the process has used ``seconds`` more CPU
    seconds (ITIMER_PROF; all threads count). No limit when seconds is None, off the main
    thread, or without setitimer."""
    if seconds is None or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return
    armed = [True]

    def handler(signum, frame):  # noqa: ARG001
        if armed[0]:
            # Python drops an exception raised where it cannot propagate (a gc callback, a
            # __del__): fire again shortly, after a random delay so that a loop cannot keep
            # catching it at the same spot; the body's exit disarms the timer once it propagated
            signal.setitimer(signal.ITIMER_PROF, random.uniform(0.005, 0.02))
            raise CodecTimeout(f"quick mode: interrupted after {seconds:g} CPU s")

    old = signal.signal(signal.SIGPROF, handler)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)


def bench_codec(name: str, ds: DataSet, limit_s: float | None = None, timed_runs: int = 3) -> dict[str, Any]:
    """Fit (if needed), encode+decode ds.test, measure; never raises for a codec error.

    limit_s: CPU-second limit (quick mode); past it the codec is recorded as skipped.
    timed_runs: throughput = the fastest of up to this many timed runs after the warm-up."""
    import e8vllm.codecs as codecs

    inf = codecs.info(name)
    row: dict[str, Any] = {"codec": name, "family": inf.family, "nominal_bits": float(inf.nominal_bits),
                           "codec_id": inf.codec_id, "dataset": ds.name, "status": "ok", "error": None,
                           "bits_per_value": None, "train_s": None}
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        with cpu_limit(limit_s):
            _measure(row, codecs.get, name, ds, timed_runs)
    except CodecTimeout as e:
        row["status"] = "skipped"
        row["error"] = f"{e} ({row.get('stage', '?')})"
    except Exception as e:  # noqa: BLE001 - a failing codec is a result, not a crash
        row["status"] = "failed"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        row["error"] = f"{row.get('stage', '?')}: {type(e).__name__}: {msg}"[:500]
    row.pop("stage", None)
    row["wall_s"] = time.perf_counter() - t0
    row["cpu_s"] = time.process_time() - c0
    bpv = row["bits_per_value"]
    if row["status"] == "ok" and bpv is not None:
        row["rd_bound_snr_db"] = DB_PER_BIT * bpv
        row["gap_to_rd_db"] = DB_PER_BIT * bpv - row["snr_db"]
        if ds.name == "gaussian":
            row.update(_known_variance(row))
    return row


def _measure(row: dict, get, name: str, ds: DataSet, timed_runs: int = 3) -> None:
    """The measurement of :func:`bench_codec`; fills ``row`` (``row['stage']``: where it is)."""
    row["stage"] = "build"
    c = get(name, head_dim=ds.test.shape[1])
    row["bits_per_value"] = float(c.bits_per_value)
    cost = c.decode_cost
    row.update(decode_ops_per_value=float(cost.ops_per_value), decode_table_bytes=int(cost.table_bytes),
               decode_note=cost.note)
    if c.needs_training:
        row["stage"] = "fit"
        t = time.perf_counter()
        c.fit(ds.train)
        row["train_s"] = time.perf_counter() - t
    x = ds.test
    row["stage"] = "encode"
    codes = c.encode(x)  # warm-up run; its output is what is measured
    want = (x.shape[0], c.code_bytes)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or tuple(codes.shape) != want:
        raise ValueError(f"encode returned {getattr(codes, 'dtype', type(codes))} "
                         f"{list(getattr(codes, 'shape', []))}, expected uint8 [{x.shape[0]}, {c.code_bytes}]")
    row["stage"] = "decode"
    xh = c.decode(codes)
    if tuple(xh.shape) != tuple(x.shape):
        raise ValueError(f"decode returned shape {list(xh.shape)}, expected {list(x.shape)}")
    if not torch.isfinite(xh).all():
        raise ValueError("decode returned NaN/Inf values")
    row.update(quality(x, xh.float()))
    row["stage"] = "timing"
    enc_s = _timed(lambda: c.encode(x), max_runs=timed_runs)
    dec_s = _timed(lambda: c.decode(codes), max_runs=timed_runs)
    row["encode_vps"] = x.shape[0] / max(enc_s, 1e-9)
    row["decode_vps"] = x.shape[0] / max(dec_s, 1e-9)
    row["describe"] = c.describe()


def _lloyd_max_mse(bits: float) -> float | None:
    """Lloyd-Max MSE of N(0,1) at an integer number of bits in 1..4 (computed, not tabulated)."""
    if bits != int(bits) or not 1 <= bits <= 4:
        return None
    try:
        from e8vllm.codecs.lloydmax import gaussian_lloyd_max

        return float(gaussian_lloyd_max(int(bits))[2])
    except Exception:  # noqa: BLE001
        return None


def _known_variance(row: dict) -> dict:
    """Gaussian set (unit variance): the per-value MSE against Shannon's D(R) = 2^-2R (at the
    codec's total bits, and at its nominal bits = "without the scale", as for a known
    variance) and against the scalar Lloyd-Max quantizer at the nominal bits."""
    nb, bpv, mse = row["nominal_bits"], row["bits_per_value"], row["mse"]
    out = {"shannon_mse_at_bpv": 2.0 ** (-2.0 * bpv), "shannon_mse_at_nominal": 2.0 ** (-2.0 * nb),
           "lloydmax_mse_at_nominal": _lloyd_max_mse(nb)}
    out["mse_over_shannon_at_nominal"] = mse / out["shannon_mse_at_nominal"]
    out["gap_to_rd_at_nominal_db"] = 10.0 * math.log10(mse / out["shannon_mse_at_nominal"]) if mse > 0 else None
    lm = out["lloydmax_mse_at_nominal"]
    out["mse_over_lloydmax"] = mse / lm if lm else None
    return out


# ----------------------------------------------------------------------------- equal-bits comparisons


def envelope(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Upper SNR-vs-bits envelope of (bits, snr, name) points: best SNR per bits, increasing."""
    out: list[tuple[float, float, str]] = []
    best = -math.inf
    for p in sorted(points, key=lambda p: (p[0], -p[1])):
        if p[1] > best and not (out and abs(out[-1][0] - p[0]) < 1e-9):
            out.append(p)
            best = p[1]
    return out


def snr_at(points: list[tuple[float, float, str]], bits: float) -> tuple[float, str] | None:
    """SNR of a group of (bits, snr, name) points at ``bits`` (see :data:`METHOD`), with how."""
    env = envelope(points)
    if not env:
        return None
    for b, s, n in env:
        if abs(b - bits) < 1e-9:
            return s, f"{n} at {b:.3g} b (measured)"
    lo = [p for p in env if p[0] < bits]
    hi = [p for p in env if p[0] > bits]
    if lo and hi:
        (b0, s0, n0), (b1, s1, n1) = lo[-1], hi[0]
        s = s0 + (s1 - s0) * (bits - b0) / (b1 - b0)
        return s, f"interpolated between {n0} ({b0:.3g} b) and {n1} ({b1:.3g} b)"
    b0, s0, n0 = lo[-1] if lo else hi[0]
    return s0 + DB_PER_BIT * (bits - b0), f"extrapolated at 6.02 dB/bit from {n0} ({b0:.3g} b)"


def _pct(gain_db: float) -> float:
    """MSE reduction in % for an SNR gain in dB."""
    return 100.0 * (1.0 - 10.0 ** (-gain_db / 10.0))


def _ok(rows: dict[str, dict]) -> dict[str, dict]:
    return {n: r for n, r in rows.items() if r["status"] == "ok" and math.isfinite(r.get("snr_db", float("nan")))}


def _pts(rows: dict[str, dict], pred) -> list[tuple[float, float, str]]:
    return [(r["bits_per_value"], r["snr_db"], n) for n, r in rows.items() if pred(n, r)]


BASELINES: dict[str, Any] = {
    "INT (unrotated)": lambda n, r: r["family"] == "uniform" and not n.endswith("-rot"),
    "INT (rotated)": lambda n, r: r["family"] == "uniform" and n.endswith("-rot"),
    "Lloyd-Max": lambda n, r: r["family"] == "lloydmax",
    "PQ": lambda n, r: r["family"] == "pq",
    "peers": lambda n, r: r["family"] == "peer",
}


def _baseline_groups(results: dict[str, dict[str, dict]]) -> dict[str, Any]:
    """:data:`BASELINES` plus one group per peer package (codec name without ``-{b}bit...``)."""
    groups = dict(BASELINES)
    peers = sorted({re.sub(r"-\d+bit.*$", "", n) for rows in results.values() for n, r in rows.items()
                    if r["family"] == "peer"})
    if len(peers) > 1:
        for pk in peers:
            groups[f"peer {pk}"] = (lambda pk_: lambda n, r: r["family"] == "peer"
                                    and re.sub(r"-\d+bit.*$", "", n) == pk_)(pk)
    return groups


def best_e8(rows: dict[str, dict], bits: float) -> dict | None:
    """The family-e8 codec of nominal ``bits`` closest to the RD bound (ok rows only)."""
    cands = [r for r in rows.values() if r["family"] == "e8" and r["nominal_bits"] == bits]
    return min(cands, key=lambda r: r["gap_to_rd_db"]) if cands else None


def _pair(rows: dict[str, dict], a: str, b: str, kind: str, ds: str, extra: dict | None = None) -> dict | None:
    """Codec a vs codec b at equal bits (b moved to a's bits at 6.02 dB/bit if they differ)."""
    if a not in rows or b not in rows:
        return None
    ra, rb = rows[a], rows[b]
    s_b, how = snr_at([(rb["bits_per_value"], rb["snr_db"], b)], ra["bits_per_value"])
    gain = ra["snr_db"] - s_b
    item = {"kind": kind, "dataset": ds, "codec": a, "codec_bpv": ra["bits_per_value"], "codec_snr_db": ra["snr_db"],
            "reference": b, "reference_bpv": rb["bits_per_value"], "reference_snr_db": rb["snr_db"],
            "reference_snr_at_equal_bits_db": s_b, "how": how, "gain_db": gain, "mse_reduction_pct": _pct(gain)}
    item.update(extra or {})
    return item


def compute_findings(results: dict[str, dict[str, dict]], registered: list[str]) -> dict:
    """All derived comparisons (structured items + sentences), from the measured rows."""
    items: list[dict] = []
    sentences: list[str] = []
    dsets = list(results)
    ok = {d: _ok(results[d]) for d in dsets}
    e8_names = [n for n in registered if results[dsets[0]][n]["family"] == "e8"] if dsets else []

    def fmt_gain(it: dict) -> str:
        return f"{it['gain_db']:+.2f} dB (MSE {-it['mse_reduction_pct']:+.1f}%)"

    # (i)/(ii) best E8 at b bits vs each baseline group at equal bits; (iii) gap to RD bound
    for b in COMPARE_BITS:
        best = {d: best_e8(ok[d], float(b)) for d in dsets}
        if not any(best.values()):
            sentences.append(f"{b} bits: no E8 code of nominal {b} bits ran; no comparison.")
            continue
        for group, pred in _baseline_groups(results).items():
            parts = []
            for d in dsets:
                e = best[d]
                if e is None:
                    continue
                res = snr_at(_pts(ok[d], pred), e["bits_per_value"])
                if res is None:
                    continue
                s_base, how = res
                gain = e["snr_db"] - s_base
                it = {"kind": "e8_vs_baseline", "bits": b, "baseline": group, "dataset": d, "codec": e["codec"],
                      "codec_bpv": e["bits_per_value"], "codec_snr_db": e["snr_db"],
                      "baseline_snr_at_equal_bits_db": s_base, "how": how, "gain_db": gain,
                      "mse_reduction_pct": _pct(gain)}
                items.append(it)
                parts.append(f"{d}: {e['codec']} ({e['bits_per_value']:.3g} b/v) {e['snr_db']:.2f} dB vs "
                             f"{s_base:.2f} dB [{how}] -> {fmt_gain(it)}")
            if parts:
                sentences.append(f"{b} bits, best E8 vs {group} at equal bits: " + "; ".join(parts) + ".")
            else:
                sentences.append(f"{b} bits, best E8 vs {group}: no {group} codec ran; no comparison.")
        parts = []
        for d in dsets:
            e = best[d]
            if e is None:
                continue
            it = {"kind": "gap_to_rd", "bits": b, "dataset": d, "codec": e["codec"], "codec_bpv": e["bits_per_value"],
                  "codec_snr_db": e["snr_db"], "rd_bound_snr_db": e["rd_bound_snr_db"], "gap_db": e["gap_to_rd_db"]}
            if d == "gaussian":
                it["mse"] = e["mse"]
                it["shannon_mse_at_bpv"] = e["shannon_mse_at_bpv"]
                it["gap_to_rd_at_nominal_db"] = e.get("gap_to_rd_at_nominal_db")
            items.append(it)
            extra = ""
            if d == "gaussian":
                extra = (f", MSE {e['mse']:.4g} vs Shannon 2^-2R {e['shannon_mse_at_bpv']:.4g}"
                         f" ({_f(e.get('gap_to_rd_at_nominal_db'), '.2f')} dB from 2^-2b at the nominal {b} bits,"
                         " i.e. without the scale)")
            parts.append(f"{d}: {e['codec']} {e['snr_db']:.2f} dB at {e['bits_per_value']:.3g} b/v, "
                         f"gap {e['gap_to_rd_db']:.2f} dB to the 6.02 dB/bit bound{extra}")
        sentences.append(f"{b} bits, gap of our best E8 code to the Gaussian RD bound: " + "; ".join(parts)
                         + " (the bound holds for Gaussian data only; real KV data may beat it).")

    # (iv) relaxed parity, (v) Voronoi vs box/companded, scale-choice variants
    pairs: list[tuple[str, str, str]] = []
    for n in e8_names:
        m = re.match(r"^(d8dual|d8half)(u?)-(.+)$", n)  # d8dual-4bit vs e8-4bit, d8dualu-4bit vs e8u-4bit
        if m:
            pairs.append(("relaxed_parity", n, f"e8{m.group(2)}-{m.group(3)}"))
        m = re.match(r"^e8v-(.+)$", n)
        if m:
            pairs.append(("voronoi", n, "e8-" + m.group(1)))
            pairs.append(("voronoi", n, "e8u-" + m.group(1)))
        m = re.match(r"^([a-z0-9]+-\d+bit)-(.+)$", n)
        if m and m.group(1) in registered:
            pairs.append(("scale_choice", n, m.group(1)))
    labels = {"relaxed_parity": "relaxed parity", "voronoi": "Voronoi (nested lattice)",
              "scale_choice": "scale-choice variant"}
    pairs.sort(key=lambda p: list(labels).index(p[0]))  # stable: registration order within a kind
    for kind, a, b in pairs:
        if b not in registered:
            sentences.append(f"{labels[kind]}: {a} vs {b}: {b} is not registered.")
            continue
        parts = []
        for d in dsets:
            it = _pair(ok[d], a, b, kind, d)
            if it is None:
                why = [x for x in (a, b) if x not in ok[d]]
                parts.append(f"{d}: n/a ({', '.join(why)} did not run)")
                continue
            items.append(it)
            parts.append(f"{d}: {it['codec_snr_db']:.2f} vs {it['reference_snr_db']:.2f} dB"
                         f" ({it['codec_bpv']:.3g} vs {it['reference_bpv']:.3g} b/v) -> {fmt_gain(it)}")
        sentences.append(f"{labels[kind]}: {a} vs {b} at equal bits: " + "; ".join(parts) + ".")
    if not any(k == "relaxed_parity" for k, _, _ in pairs):
        sentences.append("relaxed parity: no d8dual-*/d8half-* codec is registered.")
    if not any(k == "voronoi" for k, _, _ in pairs):
        sentences.append("Voronoi: no e8v-* codec is registered.")

    # (vi) the seed's claim: 22 % lower MSE than INT8 and than PQ
    claim: dict[str, Any] = {"claim_mse_reduction_pct": 100 * CLAIM_MSE_REDUCTION, "vs_int8": [], "vs_pq": []}
    e8_8 = "e8-8bit"
    if e8_8 not in registered:
        claim["e8_8bit"] = "unavailable (e8-8bit is not registered)"
        sentences.append("Claim '22% lower MSE than INT8': unavailable, e8-8bit is not registered.")
    else:
        for ref in ("int8-sym-rot", "int8"):
            if ref not in registered:
                continue
            parts = []
            for d in dsets:
                it = _pair(ok[d], e8_8, ref, "claim_vs_int8", d)
                if it is None:
                    parts.append(f"{d}: n/a")
                    continue
                raw = _pct(it["codec_snr_db"] - it["reference_snr_db"])
                it["mse_reduction_raw_pct"] = raw
                it["claim_holds"] = it["mse_reduction_pct"] >= 100 * CLAIM_MSE_REDUCTION
                items.append(it)
                claim["vs_int8"].append(it)
                parts.append(f"{d}: {it['mse_reduction_pct']:.1f}% at equal bits ({raw:.1f}% as measured, "
                             f"{it['codec_bpv']:.3g} vs {it['reference_bpv']:.3g} b/v) -> "
                             + ("holds" if it["claim_holds"] else "does not hold"))
            sentences.append(f"Claim '22% lower MSE' for {e8_8} vs {ref}: " + "; ".join(parts) + ".")
    pq_items = [it for it in items if it["kind"] == "e8_vs_baseline" and it["baseline"] == "PQ"]
    if pq_items:
        parts = []
        for it in pq_items:
            holds = it["mse_reduction_pct"] >= 100 * CLAIM_MSE_REDUCTION
            claim["vs_pq"].append({**it, "claim_holds": holds})
            parts.append(f"{it['bits']} b {it['dataset']}: {it['mse_reduction_pct']:.1f}% -> "
                         + ("holds" if holds else "does not hold"))
        sentences.append("Claim '22% lower MSE than PQ' (best E8 vs PQ envelope at equal bits): "
                         + "; ".join(parts) + ".")
    else:
        sentences.append("Claim '22% lower MSE than PQ': no E8-vs-PQ comparison could be made.")
    all_claim = claim["vs_int8"] + claim["vs_pq"]
    claim["holds_everywhere"] = bool(all_claim) and all(it["claim_holds"] for it in all_claim)
    claim["holds_count"] = sum(bool(it["claim_holds"]) for it in all_claim)
    claim["comparisons"] = len(all_claim)
    sentences.append(f"Claim '22% lower MSE than INT8 and than PQ' holds in {claim['holds_count']} of "
                     f"{claim['comparisons']} equal-bits comparisons"
                     + (" (all)." if claim["holds_everywhere"] else "."))
    return {"method": METHOD, "items": items, "claim_22pct": claim, "sentences": sentences}


# ----------------------------------------------------------------------------- output


def _clean(o: Any) -> Any:
    """JSON-safe: non-finite floats -> None, tensors/np scalars -> Python."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, Path):
        return str(o)
    return o


def _f(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return format(v, spec)


COLUMNS = ("codec", "family", "bits/value", "MSE", "SNR dB", "gap to RD dB", "mean cos", "p1 cos",
           "encode vec/s", "decode vec/s", "decode ops/value", "table bytes", "train s")


def _row_cells(r: dict) -> list[str]:
    if r["status"] != "ok":
        return [r["codec"], r["family"], _f(r.get("bits_per_value"), ".4g"), r["status"],
                (r.get("error") or "")[:80], *([""] * (len(COLUMNS) - 5))]
    return [r["codec"], r["family"], _f(r["bits_per_value"], ".4g"), _f(r["mse"], ".3e"), _f(r["snr_db"], ".2f"),
            _f(r["gap_to_rd_db"], ".2f"), _f(r["cos_mean"], ".5f"), _f(r["cos_p1"], ".5f"),
            _f(r["encode_vps"], ",.0f"), _f(r["decode_vps"], ",.0f"), _f(r["decode_ops_per_value"], ".1f"),
            _f(r["decode_table_bytes"], ",d"), _f(r.get("train_s"), ".2f")]


def write_markdown(path: Path, report: dict) -> None:
    c = report["conditions"]
    lines = ["# Quantization benchmark: SNR vs bits per value", "",
             f"Conditions: {c['line']}", "",
             "SNR = -10 log10(Σ||x-x̂||² / Σ||x||²). Gap to RD bound = 6.02 dB × bits/value − SNR "
             "(Gaussian rate-distortion bound; for real KV data only a yardstick). Throughput: vectors/s, "
             f"fastest of up to 3 timed runs after a warm-up (1 in quick mode), {c['threads']} threads.", ""]
    for ds in report["datasets"]:
        lines += [f"## {ds['name']}", "", f"Source: {ds['source']}; {ds['info']['n_train']} train / "
                  f"{ds['info']['n_test']} test vectors.", "",
                  "| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] * len(COLUMNS)) + "|"]
        for r in report["results"][ds["name"]].values():
            lines.append("| " + " | ".join(x.replace("|", "\\|") for x in _row_cells(r)) + " |")
        if ds["name"] == "gaussian":
            lines += ["", "Known-variance figures (unit-variance data; MSE per value vs Shannon 2^-2R at the codec's "
                      "bits/value and at its nominal bits, i.e. without the scale, and vs the scalar Lloyd-Max "
                      "quantizer of N(0,1) at the nominal bits):", "",
                      "| codec | nominal bits | bits/value | MSE | Shannon 2^-2R | Shannon 2^-2b (no scale) | "
                      "gap at nominal dB | Lloyd-Max MSE | MSE / Lloyd-Max |", "|---|---|---|---|---|---|---|---|---|"]
            for r in report["results"][ds["name"]].values():
                if r["status"] != "ok":
                    continue
                lines.append(f"| {r['codec']} | {r['nominal_bits']:g} | {r['bits_per_value']:.4g} | {r['mse']:.4g} | "
                             f"{r['shannon_mse_at_bpv']:.4g} | {r['shannon_mse_at_nominal']:.4g} | "
                             f"{_f(r['gap_to_rd_at_nominal_db'], '.2f')} | {_f(r['lloydmax_mse_at_nominal'], '.4g')} | "
                             f"{_f(r['mse_over_lloydmax'], '.3f')} |")
        lines.append("")
    lines += ["## Findings", "", f"Method: {report['findings']['method']}", ""]
    lines += [f"- {s}" for s in report["findings"]["sentences"]]
    lines.append("")
    if report.get("peers_unavailable"):
        lines += ["## Peers that could not be installed", ""]
        lines += [f"- {k}: {v}" for k, v in report["peers_unavailable"].items()]
        lines.append("")
    fails = [r for d in report["results"].values() for r in d.values() if r["status"] != "ok"]
    if fails:
        lines += ["## Failed / skipped", ""]
        lines += [f"- {r['dataset']} / {r['codec']}: {r['status']}: {r['error']}" for r in fails]
        lines.append("")
    path.write_text("\n".join(lines))


FAMILY_STYLE = {  # family -> (marker, color)
    "e8": ("o", "#d62728"),
    "uniform": ("s", "#1f77b4"),
    "lloydmax": ("D", "#2ca02c"),
    "fp8": ("^", "#9467bd"),
    "pq": ("v", "#ff7f0e"),
    "peer": ("P", "#8c564b"),
}
OTHER_STYLES = [("X", "#7f7f7f"), ("*", "#17becf"), ("h", "#bcbd22"), ("<", "#e377c2")]


def write_plot(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    dnames = [d["name"] for d in report["datasets"]]
    fig, axes = plt.subplots(1, len(dnames), figsize=(7.0 * len(dnames), 6.6), squeeze=False)
    families = sorted({r["family"] for d in report["results"].values() for r in d.values()},
                      key=lambda f: (f != "e8", list(FAMILY_STYLE).index(f) if f in FAMILY_STYLE else 99, f))
    style = dict(FAMILY_STYLE)
    for i, f in enumerate(x for x in families if x not in style):
        style[f] = OTHER_STYLES[i % len(OTHER_STYLES)]
    xs = np.linspace(1.5, 9.0, 50)
    for ax, dn in zip(axes[0], dnames):
        rows = [r for r in report["results"][dn].values() if r["status"] == "ok" and math.isfinite(r["snr_db"])]
        ax.plot(xs, DB_PER_BIT * xs, "k--", lw=1.2, label="Gaussian RD bound (6.02 dB/bit)", zorder=1)
        ymax = DB_PER_BIT * 9.0
        for fam in families:
            pts = sorted((r["bits_per_value"], r["snr_db"], r["codec"]) for r in rows if r["family"] == fam)
            if not pts:
                continue
            m, col = style[fam]
            if fam != "e8":
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=m, color=col, s=42, alpha=0.9,
                           zorder=4, label=fam)
                continue
            # ours: every variant small and hollow, the best per bits (the envelope) large, joined
            env = envelope(pts)
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=m, facecolors="none", edgecolors=col,
                       s=22, linewidths=0.8, alpha=0.7, zorder=3, label="E8 variants (ours)")
            ax.scatter([p[0] for p in env], [p[1] for p in env], marker=m, color=col, s=80, edgecolors="black",
                       linewidths=0.9, zorder=5, label="best E8 (ours)")
            ax.plot([p[0] for p in env], [p[1] for p in env], "-", color=col, lw=1.8, zorder=2)
            for b, s_, n in env:
                ax.annotate(n, (b, s_), textcoords="offset points", xytext=(-8, 7), ha="right", fontsize=8,
                            color=col, fontweight="bold")
        ax.set_xlim(1.5, 9.0)
        snrs = [r["snr_db"] for r in rows if 1.5 <= r["bits_per_value"] <= 9.0]
        top = max([ymax] + snrs) + 3
        ax.set_ylim(min([0.0] + snrs) - 1, top)
        ax.set_xlabel("bits per value (all side information included)")
        ax.set_ylabel("SNR (dB)")
        ax.set_title(dn)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    c = report["conditions"]
    fig.suptitle(f"SNR vs bits per value, D={c['head_dim']}, {c['n_vectors']} test vectors per set"
                 + (" (quick)" if c["quick"] else ""), fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print_table(console: Any, ds: dict, rows: dict[str, dict]) -> None:
    from rich.table import Table

    t = Table(title=f"{ds['name']}: {ds['info']['n_test']} test vectors ({ds['info'].get('bench_s', 0):.1f} s)",
              show_lines=False)
    for col in COLUMNS:
        t.add_column(col, justify="left" if col in ("codec", "family") else "right", no_wrap=col == "codec")
    for r in rows.values():
        t.add_row(*_row_cells(r), style=("bold red" if r["family"] == "e8" and r["status"] == "ok"
                                        else "dim" if r["status"] != "ok" else None))
    console.print(t)


# ----------------------------------------------------------------------------- driver


def run(out_dir: Path, n_vectors: int = 20000, quick: bool = False, kv_path: Path | None = None,
        codec_names: list[str] | None = None, seed: int = SEED, threads: int | None = None) -> dict:
    """Run the benchmark; write quant.json / quant.md / quant.png in ``out_dir``; return the report.

    kv_path: the KV dump (default :data:`DEFAULT_KV_PATH`, created with ``dump_kv`` of
        8192 tokens if missing).
    codec_names: restrict to these codecs (default: every registered codec).
    threads: torch (and faiss) threads for everything, timings included (default 2; quick
        mode: 1, see :data:`QUICK_THREADS`).
    quick: at most 2000 test/train vectors per set, 1 thread, one timed run; a codec is interrupted after
        :data:`QUICK_LIMIT_S` CPU seconds on a data set, and one that used more than
        :data:`QUICK_SLOW_S` is skipped on the following data sets.
    """
    from rich.console import Console
    from rich.markup import escape

    console = Console(width=None if sys.stdout.isatty() else 220, highlight=False)
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_test = min(n_vectors, QUICK_N) if quick else n_vectors
    n_train = n_test if quick else max(n_test, N_TRAIN_FULL)
    if n_test <= 0:
        raise ValueError(f"n_vectors must be positive, got {n_vectors}")
    kv_path = Path(kv_path) if kv_path is not None else DEFAULT_KV_PATH
    if threads is None:
        threads = QUICK_THREADS if quick else THREADS
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    old_faiss = None
    try:
        import faiss

        old_faiss = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(threads)
    except Exception:  # noqa: BLE001 - faiss is only for the PQ codecs
        pass
    try:
        import e8vllm.codecs as codecs

        try:
            from e8vllm.codecs import peers as _peers

            peers_unavailable = dict(getattr(_peers, "UNAVAILABLE", {}) or {})
        except Exception as e:  # noqa: BLE001
            peers_unavailable = {"(peers module)": f"{type(e).__name__}: {e}"}
        registered = codecs.names()
        names = [n for n in registered if codec_names is None or n in codec_names]
        conditions = {
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "n_vectors": n_test,
            "n_train": n_train, "head_dim": HEAD_DIM, "quick": quick, "seed": seed,
            "kv_path": str(kv_path), "kv_exists": kv_path.is_file(), "codecs": len(names),
        }
        src = (f"gaussian iid N(0,1) seed {seed}; smollm2-k/v from {kv_path}"
               + ("" if conditions["kv_exists"] else f" (missing: will run dump_kv, {DUMP_TOKENS} tokens)"))
        conditions["data_sources"] = src
        conditions["line"] = (f"{conditions['date']} | CPU {conditions['cpu']} ({conditions['cpu_count']} cores) | "
                              f"torch {conditions['torch']} | threads {conditions['threads']} | n_vectors {n_test} "
                              f"(train {n_train}) | head_dim {HEAD_DIM} | quick {quick} | {len(names)} codecs | "
                              f"data: {src}")
        console.print("[bold]conditions[/bold] " + escape(conditions["line"]))

        if not kv_path.is_file():
            from e8vllm.kvdump import dump_kv

            dump_kv(out=kv_path, num_tokens=DUMP_TOKENS)
        t_load = time.perf_counter()
        datasets = [gaussian_dataset(n_test, n_train, HEAD_DIM, seed)]
        datasets += kv_datasets(kv_path, n_test, n_train, seed)
        conditions["data_load_s"] = time.perf_counter() - t_load
        for ds in datasets:
            console.print(f"[bold]data[/bold] {ds.name}: " + escape(ds.source)
                          + f"; train {ds.train.shape[0]}, test {ds.test.shape[0]}")
        console.print(f"data loaded in {conditions['data_load_s']:.1f} s")
        if peers_unavailable:
            console.print("[yellow]peers unavailable:[/yellow] "
                          + escape("; ".join(f"{k}: {v}" for k, v in peers_unavailable.items())))

        results: dict[str, dict[str, dict]] = {}
        slow: dict[str, str] = {}
        for ds in datasets:
            t_ds = time.perf_counter()
            results[ds.name] = {}
            for name in names:
                slow_before = set(slow)
                if name in slow:
                    inf = codecs.info(name)
                    row = {"codec": name, "family": inf.family, "nominal_bits": float(inf.nominal_bits),
                           "codec_id": inf.codec_id, "dataset": ds.name, "status": "skipped", "error": slow[name],
                           "bits_per_value": None, "train_s": None}
                else:
                    row = bench_codec(name, ds, limit_s=QUICK_LIMIT_S if quick else None,
                                      timed_runs=1 if quick else 3)
                    if quick and (row["cpu_s"] > QUICK_SLOW_S or row["status"] == "skipped"):
                        how = ", interrupted" if row["status"] == "skipped" else ""
                        slow[name] = (f"quick mode: used {row['cpu_s']:.1f} CPU s on {ds.name} "
                                      f"(> {QUICK_SLOW_S:g} s){how}")
                results[ds.name][name] = row
                if row["status"] == "skipped" and name not in slow_before:
                    console.print(f"[yellow]skipped[/yellow] {escape(ds.name)} / {escape(name)}: "
                                  + escape(row["error"]))
                if row["status"] == "failed":
                    console.print(f"[red]FAILED[/red] {escape(ds.name)} / {escape(name)}: {escape(row['error'])}")
            ds.info["bench_s"] = time.perf_counter() - t_ds
            _print_table(console, {"name": ds.name, "info": ds.info}, results[ds.name])

        findings = compute_findings(results, names)
        console.print("[bold]findings[/bold] " + escape(METHOD))
        for s in findings["sentences"]:
            console.print(" • " + escape(s))
        conditions["elapsed_s"] = time.perf_counter() - t_start
        report = {
            "conditions": conditions,
            "datasets": [{"name": d.name, "source": d.source, "info": d.info} for d in datasets],
            "codecs": {n: {"family": codecs.info(n).family, "nominal_bits": codecs.info(n).nominal_bits,
                           "codec_id": codecs.info(n).codec_id, "summary": codecs.info(n).summary,
                           "describe": next((results[d][n].get("describe") for d in results
                                             if results[d][n].get("describe")), None)} for n in names},
            "peers_unavailable": peers_unavailable,
            "rd_bound": {"db_per_bit": DB_PER_BIT, "formula": "SNR_dB = 20 log10(2) * bits (iid Gaussian, MSE)"},
            "results": results,
            "findings": findings,
        }
        report = _clean(report)
        (out_dir / "quant.json").write_text(json.dumps(report, indent=1))
        write_markdown(out_dir / "quant.md", report)
        write_plot(out_dir / "quant.png", report)
        console.print(f"wrote {out_dir / 'quant.json'}, quant.md, quant.png in {conditions['elapsed_s']:.1f} s")
        return report
    finally:
        torch.set_num_threads(old_threads)
        if old_faiss is not None:
            import faiss

            faiss.omp_set_num_threads(old_faiss)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m e8vllm.bench.quant", description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=Path("results"), help="where to write quant.json/.md/.png")
    p.add_argument("--n-vectors", type=int, default=20000, help="test vectors per data set")
    p.add_argument("--quick", action="store_true", help="small sizes (CI smoke run)")
    p.add_argument("--kv-path", type=Path, default=None, help=f"KV dump (default {DEFAULT_KV_PATH})")
    p.add_argument("--codecs", default=None, help="comma-separated codec names (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch/faiss threads (default 2; 1 with --quick)")
    p.add_argument("--seed", type=int, default=SEED, help="data seed")
    a = p.parse_args(argv)
    return run(out_dir=a.out_dir, n_vectors=a.n_vectors, quick=a.quick, kv_path=a.kv_path,
               codec_names=a.codecs.split(",") if a.codecs else None, threads=a.threads, seed=a.seed)


if __name__ == "__main__":
    main()
