r"""Live quantization error of the KV cache, measured where K and V are written, read by the server.

Why a file per process
----------------------
K and V are encoded in vLLM's engine-core / worker processes (one per tensor-parallel rank),
while ``/metrics`` is served by the API-server process. The server creates a directory and
passes it to every engine process through ``$E8VLLM_TELEMETRY_DIR`` (child processes inherit
the environment). Each process that writes the cache owns exactly one file in it,
``stats-<pid>.f64``: a small array of float64 counters in a shared ``mmap``; the server sums
all files at scrape time (:func:`read_dir`). Each process also writes ``info-<pid>.json`` once,
naming the codecs and the rotation it actually runs, so the server reports what is running,
not what it asked for. No sockets, no RPC, no locks between processes: one writer per file,
and a sequence counter (a seqlock) lets the reader retry a torn read.

What is measured
----------------
One in ``$E8VLLM_TELEMETRY_SAMPLE_EVERY`` calls of the write path **of each layer** (default 64;
a call = one layer's new tokens of one engine step; counted per layer, so every layer is sampled
whatever the number of layers, and staggered, layer k at its calls 1 - k mod 64, so the samples
form a steady stream across steps instead of a burst every 64 steps) takes up to
``$E8VLLM_TELEMETRY_MAX_TOKENS`` (default 8) of the tokens just written, spread evenly over the
batch (so prefill samples come from the whole prompt and from every request, not the first tokens),
reads their codes back **from the cache**, decodes them and un-rotates them to the original
domain, and compares with the K and V the model produced (per (token, kv-head) vector x, x̂):

* ``squared_error`` += Σ‖x − x̂‖², ``signal_energy`` += Σ‖x‖², ``vectors`` += N,
* ``cosine`` histogram of cos(x, x̂) with buckets :data:`COSINE_BUCKETS` (dense near 1),
  plus the cosine sum.

So over any window MSE per value = Δsquared_error / (Δvectors · D) and
SNR = 10 log10(Δsignal_energy / Δsquared_error) dB. All sums are float64.

Cost: with telemetry off (the variable unset) :func:`sampler` returns None and the write path
pays one attribute test. When on, a non-sampled call costs one integer increment; a sampled
call decodes a few dozen vectors. On CUDA a sampled call synchronizes the stream (it copies a
few floats to the host), and calls made while a CUDA graph is being captured are skipped, so
with CUDA graphs only eager steps (prefill, and decode when ``enforce_eager``) are sampled.

This module imports torch and numpy, never vLLM.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DIR_ENV", "SAMPLE_EVERY_ENV", "MAX_TOKENS_ENV", "COSINE_BUCKETS", "TENSORS", "TelemetryConfig",
    "TensorStats", "Snapshot", "StatsFile", "error_stats", "read_dir", "sampler", "Sampler",
]

DIR_ENV = "E8VLLM_TELEMETRY_DIR"
SAMPLE_EVERY_ENV = "E8VLLM_TELEMETRY_SAMPLE_EVERY"
MAX_TOKENS_ENV = "E8VLLM_TELEMETRY_MAX_TOKENS"

#: Upper bounds of the cosine-similarity histogram (a final +Inf bucket is implied).
COSINE_BUCKETS: tuple[float, ...] = (0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999, 1.0)
TENSORS: tuple[str, ...] = ("key", "value")

_MAGIC = 8.0e8 + 8.0  # arbitrary marker in slot 0
_VERSION = 1.0
_HEADER = 4  # magic, version, seq, pid
_NB = len(COSINE_BUCKETS) + 1  # + the +Inf bucket
_BLOCK = 4 + _NB  # squared_error, signal_energy, vectors, cosine_sum, buckets
_LEN = _HEADER + len(TENSORS) * _BLOCK


@dataclass(frozen=True)
class TelemetryConfig:
    """Sampling settings (from the environment by :meth:`from_env`).

    Attributes:
        directory: where the per-process files go.
        sample_every: sample one write call in this many (>= 1).
        max_tokens: tokens measured per sampled call (>= 1).
    """

    directory: Path
    sample_every: int = 64
    max_tokens: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.sample_every, int) or self.sample_every < 1:
            raise ValueError(f"sample_every must be an int >= 1, got {self.sample_every!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")

    @classmethod
    def from_env(cls, env: Any = None) -> "TelemetryConfig | None":
        """None when ``$E8VLLM_TELEMETRY_DIR`` is unset or empty; ValueError on bad numbers."""
        env = os.environ if env is None else env
        d = env.get(DIR_ENV, "")
        if not d:
            return None

        def _int(name: str, default: int) -> int:
            raw = env.get(name, "")
            try:
                return int(raw) if raw.strip() else default
            except ValueError:
                raise ValueError(f"{name} must be an integer, got {raw!r}") from None

        return cls(Path(d), _int(SAMPLE_EVERY_ENV, 64), _int(MAX_TOKENS_ENV, 8))


@dataclass(frozen=True)
class TensorStats:
    """Sums for one tensor (key or value). ``buckets`` are per-bucket counts (not cumulative),
    aligned with :data:`COSINE_BUCKETS` plus a final +Inf bucket."""

    squared_error: float = 0.0
    signal_energy: float = 0.0
    vectors: float = 0.0
    cosine_sum: float = 0.0
    buckets: tuple[float, ...] = field(default=(0.0,) * _NB)

    def __add__(self, other: "TensorStats") -> "TensorStats":
        return TensorStats(self.squared_error + other.squared_error, self.signal_energy + other.signal_energy,
                           self.vectors + other.vectors, self.cosine_sum + other.cosine_sum,
                           tuple(a + b for a, b in zip(self.buckets, other.buckets)))

    @property
    def snr_db(self) -> float | None:
        """10 log10(signal / error), None without samples or error."""
        if self.squared_error <= 0 or self.signal_energy <= 0:
            return None
        return 10.0 * math.log10(self.signal_energy / self.squared_error)

    def as_array(self) -> np.ndarray:
        return np.array([self.squared_error, self.signal_energy, self.vectors, self.cosine_sum, *self.buckets])


@dataclass(frozen=True)
class Snapshot:
    """Summed stats of every process, and what they said they run (``info``: one dict per process)."""

    stats: dict[str, TensorStats]
    info: list[dict[str, Any]]
    files: int


def error_stats(x: Any, x_hat: Any) -> TensorStats:
    """Error sums of vectors ``x`` [N, D] against their reconstructions ``x_hat`` [N, D] (float64).

    Cosine of a pair with a zero vector: 1 if both are zero, else 0. Cosines are clamped to
    [-1, 1] before bucketing (rounding can exceed 1 by an ulp). Pairs with a NaN or Inf (the
    model's own overflow, stored clamped by the write path) are left out: they are not quantization
    error, and one would turn the process's counters into NaN for good.
    """
    import torch

    x = torch.as_tensor(x).detach().to(torch.float64)
    y = torch.as_tensor(x_hat).detach().to(torch.float64).to(x.device)
    if x.dim() != 2 or x.shape != y.shape:
        raise ValueError(f"x and x_hat must both be [N, D], got {tuple(x.shape)} and {tuple(y.shape)}")
    keep = torch.isfinite(x).all(dim=1) & torch.isfinite(y).all(dim=1)
    x, y = x[keep], y[keep]
    n = x.shape[0]
    if n == 0:
        return TensorStats()
    err = (x - y).pow(2).sum(dim=1)
    nx, ny = x.norm(dim=1), y.norm(dim=1)
    denom = nx * ny
    both_zero = (nx == 0) & (ny == 0)
    cos = torch.where(denom > 0, (x * y).sum(dim=1) / torch.where(denom > 0, denom, torch.ones_like(denom)),
                      torch.where(both_zero, torch.ones_like(denom), torch.zeros_like(denom))).clamp(-1.0, 1.0)
    bounds = torch.tensor(COSINE_BUCKETS, dtype=torch.float64, device=x.device)
    idx = torch.bucketize(cos, bounds, right=False)  # first bound >= cos; len(bounds) = +Inf bucket
    counts = torch.bincount(idx, minlength=_NB).to(torch.float64)
    host = torch.cat([torch.stack([err.sum(), x.pow(2).sum(), cos.sum()]), counts]).cpu().tolist()
    return TensorStats(host[0], host[1], float(n), host[2], tuple(host[3:]))


class StatsFile:
    """One process's counters: float64 [_LEN] in a shared mapping of ``path`` (one writer)."""

    def __init__(self, path: Path, create: bool = True) -> None:
        self.path = Path(path)
        if create:
            with open(self.path, "wb") as f:
                f.write(np.array([_MAGIC, _VERSION, 0.0, float(os.getpid())] + [0.0] * (_LEN - _HEADER)).tobytes())
        with open(self.path, "r+b" if create else "rb") as f:
            self._mm = mmap.mmap(f.fileno(), _LEN * 8, access=mmap.ACCESS_WRITE if create else mmap.ACCESS_READ)
        self._a = np.frombuffer(self._mm, dtype=np.float64, count=_LEN)
        if self._a[0] != _MAGIC or self._a[1] != _VERSION:
            raise ValueError(f"{self.path} is not an e8vllm telemetry file (version {_VERSION:g})")
        self._lock = threading.Lock()

    def add(self, tensor: str, s: TensorStats) -> None:
        """Add ``s`` to ``tensor``'s counters (seqlock: seq odd while writing)."""
        i = _HEADER + TENSORS.index(tensor) * _BLOCK
        with self._lock:
            a = self._a
            a[2] += 1.0
            a[i:i + _BLOCK] += s.as_array()
            a[2] += 1.0

    def read(self, retries: int = 1000) -> dict[str, TensorStats]:
        """A consistent copy (retries while the writer is mid-update)."""
        a = self._a
        for _ in range(retries):
            s1 = a[2]
            if s1 % 2 == 0:
                snap = a.copy()
                if a[2] == s1:
                    break
        else:  # pragma: no cover - a writer stuck mid-update (killed): take what is there
            snap = a.copy()
        out = {}
        for k, t in enumerate(TENSORS):
            b = snap[_HEADER + k * _BLOCK: _HEADER + (k + 1) * _BLOCK]
            out[t] = TensorStats(float(b[0]), float(b[1]), float(b[2]), float(b[3]), tuple(float(v) for v in b[4:]))
        return out

    def close(self) -> None:
        del self._a
        self._mm.close()


def read_dir(directory: Path) -> Snapshot:
    """Sum of every ``stats-*.f64`` in ``directory`` (files of exited processes included: counters
    never go down), plus every ``info-*.json``. Unreadable files are skipped."""
    directory = Path(directory)
    total = {t: TensorStats() for t in TENSORS}
    files = 0
    for p in sorted(directory.glob("stats-*.f64")):
        try:
            sf = StatsFile(p, create=False)
        except (OSError, ValueError):
            continue
        try:
            for t, s in sf.read().items():
                total[t] = total[t] + s
            files += 1
        finally:
            sf.close()
    info = []
    for p in sorted(directory.glob("info-*.json")):
        try:
            info.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return Snapshot(total, info, files)


def _format_info(fmt: Any) -> dict[str, Any]:
    """What a slot format runs: codec names, bits per value, rotation."""
    def rot(r: Any) -> str:
        return "none" if r is None else f"hadamard(seed={getattr(r, 'seed', '?')})"

    d = fmt.head_size
    return {"pid": os.getpid(), "head_size": d,
            "codec_key": getattr(fmt.k_codec, "name", type(fmt.k_codec).__name__),
            "codec_value": getattr(fmt.v_codec, "name", type(fmt.v_codec).__name__),
            "bits_key": fmt.k_bytes * 8 / d, "bits_value": fmt.v_bytes * 8 / d,
            "rotation_key": rot(fmt.k_rotation), "rotation_value": rot(fmt.v_rotation)}


class Sampler:
    """The write-path hook of one process: counts calls, measures every ``sample_every``-th."""

    def __init__(self, cfg: TelemetryConfig) -> None:
        self.cfg = cfg
        cfg.directory.mkdir(parents=True, exist_ok=True)
        self.file = StatsFile(cfg.directory / f"stats-{os.getpid()}.f64")
        self.calls: dict[Any, int] = {}
        self.offsets: dict[Any, int] = {}
        self._info_written = False

    def after_write(self, key: Any, value: Any, kv_cache: Any, slot_mapping: Any, fmt: Any,
                    centers: dict[str, Any] | None = None, layer: Any = None) -> None:
        """Called right after the write path stored ``key`` / ``value`` (mapped by ``centers``, the
        layer's KV calibration ``{"k_mean", "k_scale", "v_mean", "v_scale"}`` [H, D] each, when set:
        :mod:`e8vllm.calibration`, plus ``k_pos`` [T, H, D], the position-dependent key centers of
        the rows written, when the calibration has them) into ``kv_cache``."""
        # per layer (``layer``: any key naming the calling layer), staggered: the k-th layer seen is
        # sampled at its calls n with (n - 1 + k) % S == 0, so every layer is covered and, with
        # L <= S layers, about L of every S engine steps carry one layer's sample (a steady stream)
        n = self.calls.get(layer, 0) + 1
        self.calls[layer] = n
        k = self.offsets.setdefault(layer, len(self.offsets) % self.cfg.sample_every)
        if (n - 1 + k) % self.cfg.sample_every:
            return
        import torch

        if key.is_cuda and torch.cuda.is_current_stream_capturing():
            return
        if not self._info_written:
            info = _format_info(fmt)
            info["sample_every"] = self.cfg.sample_every
            info["max_tokens"] = self.cfg.max_tokens
            tmp = self.cfg.directory / f".info-{os.getpid()}.tmp"
            tmp.write_text(json.dumps(info))
            os.replace(tmp, self.cfg.directory / f"info-{os.getpid()}.json")
            self._info_written = True
        k, v = measure(key, value, kv_cache, slot_mapping, fmt, self.cfg.max_tokens, centers)
        if k.vectors:
            self.file.add("key", k)
            self.file.add("value", v)


def measure(key: Any, value: Any, kv_cache: Any, slot_mapping: Any, fmt: Any,
            max_tokens: int, centers: dict[str, Any] | None = None) -> tuple[TensorStats, TensorStats]:
    """Error stats of up to ``max_tokens`` tokens just written: codes read back from ``kv_cache``
    (uint8 [num_blocks, H, block_size, slot_bytes]) at ``slot_mapping`` [T] (-1 = skipped),
    decoded, un-rotated (and mapped back by ``centers``, the KV calibration, if the write path used one), against
    the model's ``key`` / ``value`` [T', H, D] (T' >= T)."""
    import torch

    with torch.no_grad():
        t = slot_mapping.shape[0]
        slots = slot_mapping[:t].to(torch.int64)
        idx = (slots >= 0).nonzero().squeeze(1)
        if idx.numel() == 0:
            return TensorStats(), TensorStats()
        if idx.numel() > max_tokens:  # evenly spread over the batch, first and last included
            pick = torch.linspace(0, idx.numel() - 1, max_tokens, device=idx.device).round().long()
            idx = idx[pick]
        s = slots[idx]
        bs = kv_cache.shape[2]
        codes = kv_cache[s // bs, :, s % bs, :]  # [n, H, slot_bytes]
        d = fmt.head_size
        k_rot, v_rot = fmt.decode_kv_rotated(codes)
        k_rot, v_rot = k_rot.reshape(-1, d), v_rot.reshape(-1, d)
        k_hat = k_rot if fmt.k_rotation is None else fmt.k_rotation.inverse(k_rot)
        v_hat = v_rot if fmt.v_rotation is None else fmt.v_rotation.inverse(v_rot)
        if centers is not None:  # undo the KV calibration map: x = x' / scale + mean
            h = codes.shape[1]
            k_hat = k_hat.reshape(-1, h, d)
            if centers.get("k_inv_map") is not None:  # linear maps: x = N⁻¹ x' + mean
                k_hat = torch.einsum("nhd,hed->nhe", k_hat, centers["k_inv_map"].float())
            if centers.get("v_inv_map") is not None:
                v_hat = torch.einsum("nhd,hed->nhe", v_hat.reshape(-1, h, d), centers["v_inv_map"].float()).reshape(-1, d)
            k_hat = k_hat / centers["k_scale"].float() + centers["k_mean"].float()
            if centers.get("k_pos") is not None:  # position-dependent key centers [T, H, D]
                k_hat = k_hat + centers["k_pos"][idx].float()
            k_hat = k_hat.reshape(-1, d)
            v_hat = (v_hat.reshape(-1, h, d) / centers["v_scale"].float() + centers["v_mean"].float()).reshape(-1, d)
        k = key[idx].reshape(-1, d)
        v = value[idx].reshape(-1, d)
        return error_stats(k, k_hat), error_stats(v, v_hat)


_SAMPLER: dict[str, Any] = {"pid": None, "sampler": None}


def sampler() -> Sampler | None:
    """This process's sampler (created on first use), or None when telemetry is off."""
    pid = os.getpid()
    if _SAMPLER["pid"] != pid:
        cfg = TelemetryConfig.from_env()
        _SAMPLER["sampler"] = Sampler(cfg) if cfg is not None else None
        _SAMPLER["pid"] = pid
    return _SAMPLER["sampler"]
