r"""Compiled CPU encoder of the 2-coset block codes (numba): the same search as
:meth:`e8vllm.codecs.e8.E8Codec.encode_rotated`, one pass per vector instead of tensor ops.

Per vector y ∈ R^D (rotated) and each of its candidate fp16 scales s_f (computed by the caller
exactly as the reference does: s = fp16(RMS(y)·f), 1 where 0): u = y / s (float32), per 8-block
and coset c the nearest level of every coordinate (count of table midpoints below u_i; the last
coordinate uses its own table), then, where the coset has the parity rule and Σ v_i is odd, the
one coordinate whose move to a neighbouring level costs least (first one on ties, up before down
on ties) moves; the better coset wins (coset 1 only when strictly better). The factor with the
smallest s²·Σ errors wins (first one on ties). All arithmetic is float32 like the reference, but
sums run in plain order where torch may vectorize, so codes can differ where two candidates tie
within float32 rounding (tests: ≥ 99.9 % identical vectors, same MSE).

Why: the reference's tensor ops (9 factors x 2 cosets of bucketize, gather, where...) made the
CPU write path ~80 % of E8 prefill time; this is the CPU engine's default encoder when numba is
installed (``E8VLLM_CPU_ENCODER=torch`` selects the reference).

Rows are independent, and the compiled functions release the GIL: a write of at least
:data:`PARALLEL_MIN_ROWS` rows is split into contiguous row ranges encoded on
``E8VLLM_CPU_ENCODER_THREADS`` threads (default ``torch.get_num_threads()``: the cores vLLM's CPU
worker uses for its own ops, idle while the encoder runs). The codes do not depend on the split.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

try:  # optional: the ``cpu`` extra installs numba
    import numba
except ImportError:  # pragma: no cover - exercised where numba is missing
    numba = None

__all__ = ["available", "encode_rotated", "encode_switched", "encoder_threads"]

#: writes of fewer rows run on the calling thread (a decode step's few rows: no hand-off cost)
PARALLEL_MIN_ROWS = 64
_POOL: ThreadPoolExecutor | None = None
_LOG = logging.getLogger("e8vllm")
_LOGGED_THREADS: set[int] = set()


def encoder_threads() -> int:
    """Threads of one encode call: ``E8VLLM_CPU_ENCODER_THREADS`` (a positive integer), else
    ``torch.get_num_threads()``."""
    text = os.environ.get("E8VLLM_CPU_ENCODER_THREADS", "").strip()
    if not text:
        return max(1, torch.get_num_threads())
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"E8VLLM_CPU_ENCODER_THREADS must be a positive integer, not {text!r}")
    return n


def _unpin() -> None:
    """A pool thread may run on every CPU of the machine's cgroup: vLLM's CPU worker pins its OpenMP
    threads (the calling thread included) to its cores, and a new thread inherits that pin."""
    try:
        os.sched_setaffinity(0, _allowed_cpus())
    except (AttributeError, OSError, ValueError):  # pragma: no cover - not Linux, or not allowed
        pass


def _allowed_cpus() -> set[int]:
    try:  # cgroup v2 cpuset of this container, else every online CPU
        text = open("/sys/fs/cgroup/cpuset.cpus.effective").read().strip()
        cpus: set[int] = set()
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
        if cpus:
            return cpus
    except (OSError, ValueError):
        pass
    return set(range(os.cpu_count() or 1))


def _row_parallel(fn, n_rows: int, rows: tuple, shared: tuple) -> None:  # noqa: ANN001
    """fn(*(a[lo:hi] for a in rows), *shared) over contiguous row ranges, on up to
    :func:`encoder_threads` threads (one range, on this thread, below :data:`PARALLEL_MIN_ROWS`).
    ``rows`` are arrays whose first axis is the row (outputs included: slices are views)."""
    global _POOL
    k = min(encoder_threads(), max(1, n_rows // (PARALLEL_MIN_ROWS // 2)))
    if k <= 1 or n_rows < PARALLEL_MIN_ROWS:
        fn(*rows, *shared)
        return
    if _POOL is None or _POOL._max_workers < k:  # noqa: SLF001 - grow the pool when asked for more threads
        _POOL = ThreadPoolExecutor(max_workers=k, thread_name_prefix="e8vllm-encode", initializer=_unpin)
    if k not in _LOGGED_THREADS:
        _LOGGED_THREADS.add(k)
        _LOG.info("e8vllm: the CPU encoder splits writes of %d rows or more over %d threads "
                  "(E8VLLM_CPU_ENCODER_THREADS; torch threads %d)", PARALLEL_MIN_ROWS, k, torch.get_num_threads())
    bounds = [n_rows * i // k for i in range(k + 1)]
    futs = [_POOL.submit(fn, *(a[lo:hi] for a in rows), *shared) for lo, hi in zip(bounds[1:-1], bounds[2:])]
    fn(*(a[: bounds[1]] for a in rows), *shared)  # the first range on this thread
    for f in futs:
        f.result()


def available() -> bool:
    """True when the compiled encoder can run (numba importable, not disabled by the environment)."""
    choice = os.environ.get("E8VLLM_CPU_ENCODER", "numba").strip().lower()
    if choice not in ("numba", "torch"):
        raise ValueError(f"E8VLLM_CPU_ENCODER must be 'numba' or 'torch', not {choice!r}")
    return numba is not None and choice == "numba"


if numba is not None:
    _F32_INF = np.float32(np.inf)

    @numba.njit(cache=True, nogil=True, inline="always")
    def _costs(x, v, table, off, n):  # pragma: no cover - compiled
        """x at level v of table[off:off+n] -> (squared error, extra cost of level v+1, of level v-1;
        inf where there is none); selects, not branches."""
        d = x - table[off + v]
        base = d * d
        e1 = x - table[off + min(v + 1, n - 1)]
        e0 = x - table[off + max(v - 1, 0)]
        up = e1 * e1 - base if v + 1 < n else _F32_INF
        dn = e0 * e0 - base if v >= 1 else _F32_INF
        return base, up, dn

    @numba.njit(cache=True, nogil=True, inline="always")
    def _nearest(x, table, mids, off, n):  # pragma: no cover - compiled
        if n <= 32:  # v = #{k < n-1 : mids[k] < x}, branch-free (random data defeats a search's branches)
            v = 0
            for k in range(n - 1):
                v += np.int64(x > mids[off + k])
        else:  # 8-bit tables: binary search
            lo = 0
            hi = n - 1
            while lo < hi:
                mid = (lo + hi) >> 1
                if x > mids[off + mid]:
                    lo = mid + 1
                else:
                    hi = mid
            v = lo
        base, up, dn = _costs(x, v, table, off, n)
        return v, base, up, dn

    @numba.njit(cache=True, nogil=True, inline="always")
    def _coset(u, o, c, main, mmid, last, lmid, k, nlast, parity, same7, vout, ups, dns):  # pragma: no cover
        """Block u[o:o+8] in coset c -> levels in vout[0:8], squared error (float32); ups / dns: scratch [8].
        Tables flat: coset c's levels at c*k (main, last), midpoints at c*k (mmid, lmid); same7: the last
        coordinate's table is the main one. Up to 32 levels the level counts #{midpoints < x} run
        midpoint by midpoint over the 8 coordinates at once (SIMD compares) and the neighbours' costs
        are selects, not branches: 2.6x faster than one coordinate at a time, the same results."""
        err = np.float32(0.0)  # summed in coordinate order 0..7
        s = 0
        n_vec = 0  # coordinates whose levels the SIMD count found
        if k <= 32:
            off = c * k
            for i in range(8):
                vout[i] = 0
            for kk in range(k - 1):
                m = mmid[off + kk]
                for i in range(8):
                    vout[i] += np.int64(u[o + i] > m)
            n_vec = 8 if same7 else 7
            for i in range(n_vec):
                b, ups[i], dns[i] = _costs(u[o + i], vout[i], main, off, k)
                err += b
                s += vout[i]
        for i in range(n_vec, 8):
            if i < 7:
                v, b, up, dn = _nearest(u[o + i], main, mmid, c * k, k)
            else:
                v, b, up, dn = _nearest(u[o + 7], last, lmid, c * k, nlast[c])
            vout[i] = v
            err += b
            ups[i] = up
            dns[i] = dn
            s += v
        if parity[c] and (s & 1) == 1:
            bi = 0
            bm = min(ups[0], dns[0])
            for i in range(1, 8):
                m = min(ups[i], dns[i])
                if m < bm:
                    bm = m
                    bi = i
            vout[bi] += 1 if ups[bi] <= dns[bi] else -1
            err = err + bm
        return err

    @numba.njit(cache=True, nogil=True, inline="always")
    def _block(u, o, main, mmid, last, lmid, k, nlast, parity, same7, va, vb, ups, dns, out):  # pragma: no cover
        """Block u[o:o+8]: the better coset (coset 1 only when strictly better) -> its 8 fields into
        out[o:o+8] (field 7 = (v_7 without its parity bit) << 1 | c); returns its squared error."""
        ea = _coset(u, o, 0, main, mmid, last, lmid, k, nlast, parity, same7, va, ups, dns)
        eb = _coset(u, o, 1, main, mmid, last, lmid, k, nlast, parity, same7, vb, ups, dns)
        c = 1 if eb < ea else 0
        vv = vb if c == 1 else va
        for i in range(7):
            out[o + i] = vv[i]
        f7 = (vv[7] >> 1) if parity[c] else vv[7]
        out[o + 7] = (f7 << 1) | c
        return min(ea, eb)

    @numba.njit(cache=True, nogil=True)
    def _encode(y, scales, main, mmid, last, lmid, k, nlast, parity, same7, fields, best_scale):  # pragma: no cover
        n, d = y.shape
        nf = scales.shape[1]
        g = d // 8
        u = np.empty(d, np.float32)
        cur = np.empty(d, np.int64)
        va = np.empty(8, np.int64)
        vb = np.empty(8, np.int64)
        blk = np.empty(g, np.float32)
        ups = np.empty(8, np.float32)
        dns = np.empty(8, np.float32)
        for r in range(n):
            best = _F32_INF
            for fi in range(nf):
                s = scales[r, fi]
                for j in range(d):
                    u[j] = y[r, j] / s
                for q in range(g):
                    blk[q] = _block(u, 8 * q, main, mmid, last, lmid, k, nlast, parity, same7, va, vb, ups, dns,
                                    cur)
                tot = np.float32(0.0)
                for q in range(g):
                    tot += blk[q]
                tot = tot * (s * s)
                if tot < best:
                    best = tot
                    best_scale[r] = s
                    for j in range(d):
                        fields[r, j] = cur[j]

    @numba.njit(cache=True, nogil=True)
    def _encode_sw(y, cand, stab, t0, t1, gb, fields, sw_out, e_out):  # pragma: no cover - compiled
        """Two codes (t0, t1: _build_tables tuples' arrays), exponent candidates cand [N, F] into
        the scale table stab; per group of gb blocks the code with the smaller error (code 0 on ties)."""
        n, d = y.shape
        nf = cand.shape[1]
        g = d // 8
        ng = (g + gb - 1) // gb
        u = np.empty(d, np.float32)
        cur = np.empty((2, d), np.int64)
        va = np.empty(8, np.int64)
        vb = np.empty(8, np.int64)
        blk = np.empty((2, g), np.float32)
        ups = np.empty(8, np.float32)
        dns = np.empty(8, np.float32)
        for r in range(n):
            best = _F32_INF
            for fi in range(nf):
                e = cand[r, fi]
                s = stab[e]
                for j in range(d):
                    u[j] = y[r, j] / s
                for t in range(2):
                    if t == 0:
                        main, mmid, last, lmid, k, nlast, parity, same7 = t0
                    else:
                        main, mmid, last, lmid, k, nlast, parity, same7 = t1
                    for q in range(g):
                        blk[t, q] = _block(u, 8 * q, main, mmid, last, lmid, k, nlast, parity, same7, va, vb, ups, dns,
                                           cur[t])
                tot = np.float32(0.0)
                sw = 0
                for h in range(ng):
                    e0 = np.float32(0.0)
                    e1 = np.float32(0.0)
                    for q in range(h * gb, min(g, (h + 1) * gb)):
                        e0 += blk[0, q]
                        e1 += blk[1, q]
                    if e1 < e0:
                        sw |= 1 << h
                        tot += e1
                    else:
                        tot += e0
                tot = tot * (s * s)
                if tot < best:
                    best = tot
                    sw_out[r] = sw
                    e_out[r] = e
                    for q in range(g):
                        t = (sw >> (q // gb)) & 1
                        for i in range(8):
                            fields[r, 8 * q + i] = cur[t, 8 * q + i]


def encode_rotated(code, y: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """Rotated vectors y float32 [N, D] and candidate scales float32 [N, F] -> (fields int64 [N, D],
    chosen scale float32 [N]); ``code`` is the codec's :class:`~e8vllm.codecs.e8.BlockCode`."""
    if numba is None:
        raise RuntimeError("numba is not installed (pip install 'e8vllm[cpu]')")
    yn = np.ascontiguousarray(y.detach().float().cpu().numpy())
    sn = np.ascontiguousarray(scales.detach().float().cpu().numpy())
    fields = np.zeros(yn.shape, dtype=np.int64)
    best = np.zeros(yn.shape[0], dtype=np.float32)
    _row_parallel(lambda y_, s_, f_, b_, *t: _encode(y_, s_, *t, f_, b_), yn.shape[0], (yn, sn, fields, best),
                  _tables(code))
    return torch.from_numpy(fields), torch.from_numpy(best)


_TABLES: dict[int, tuple] = {}  # id(code) -> (code, arrays): block_code() returns one object per code


def _tables(code) -> tuple:  # noqa: ANN001 - BlockCode
    """The code's tables as the compiled encoder takes them (flat float32 levels and midpoints per
    coset, the level count, last-coordinate level counts, parity flags, whether the last coordinate's
    table is the main one); built once per code object."""
    hit = _TABLES.get(id(code))
    if hit is None or hit[0] is not code:
        hit = _TABLES[id(code)] = (code, _build_tables(code))
    return hit[1]


def _build_tables(code) -> tuple:  # noqa: ANN001 - BlockCode
    main = code.main.float().numpy()
    last = code.last.float().numpy()
    k = main.shape[1]
    mmid = np.zeros_like(main)
    mmid[:, :-1] = (main[:, 1:] + main[:, :-1]) * np.float32(0.5)
    nlast = np.array([code.last_levels(0), code.last_levels(1)], dtype=np.int64)
    lmid = np.zeros_like(last)
    for c in (0, 1):
        t = last[c, : nlast[c]]
        lmid[c, : nlast[c] - 1] = (t[1:] + t[:-1]) * np.float32(0.5)
    same7 = bool(nlast[0] == k and nlast[1] == k and np.array_equal(last, main))
    return (main.reshape(-1), mmid.reshape(-1), last.reshape(-1), lmid.reshape(-1), k, nlast,
            np.array(code.parity, dtype=np.bool_), same7)


def encode_switched(code, y: torch.Tensor, cand: torch.Tensor, gb: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """:func:`e8vllm.codecs.e8s.encode_switched`, compiled: y float32 [N, D], exponent candidates
    int64 [N, F], gb blocks per switch bit -> (fields int64 [N, D], switch int64 [N], exponent int64 [N])."""
    if numba is None:
        raise RuntimeError("numba is not installed (pip install 'e8vllm[cpu]')")
    from .e8s import scale_table

    yn = np.ascontiguousarray(y.detach().float().cpu().numpy())
    cn = np.ascontiguousarray(cand.detach().cpu().numpy().astype(np.int64))
    stab = scale_table().numpy()
    fields = np.zeros(yn.shape, dtype=np.int64)
    sw = np.zeros(yn.shape[0], dtype=np.int64)
    ex = np.zeros(yn.shape[0], dtype=np.int64)
    t0, t1 = _tables(code.codes[0]), _tables(code.codes[1])
    _row_parallel(lambda y_, c_, f_, s_, e_: _encode_sw(y_, c_, stab, t0, t1, int(gb), f_, s_, e_), yn.shape[0],
                  (yn, cn, fields, sw, ex), ())
    return torch.from_numpy(fields), torch.from_numpy(sw), torch.from_numpy(ex)
