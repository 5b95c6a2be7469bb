r"""KV calibration: a per-(layer, KV head) affine map applied before E8 coding and undone exactly.

The math
--------
For one head, a query q and softmax scale s, attention is

    o = Σ_j p_j v_j,     p = softmax_j(s q·k_j).

For any fixed vectors μ_K, μ_V and positive per-channel scales a, b (diagonal maps), store

    k'_j = a ⊙ (k_j − μ_K),      v'_j = b ⊙ (v_j − μ_V)

and attend with the query q' = q ⊘ a. Then q'·k'_j = q·k_j − q·μ_K: the same logits up to a
term that does not depend on j, so softmax gives the same p (shift invariance), and

    o = (Σ_j p_j v'_j) ⊘ b + μ_V        (Σ_j p_j = 1).

So the identity holds for every μ and every a, b > 0: the calibration never makes attention
wrong, only more or less accurate, and nothing but the stored codes changes.

**Rotary keys: a center that turns with the position.** Keys are cached after RoPE, k_p = R_p κ_p
(R_p rotates channel pair (i, i + D/2) by the angle p θ_i, neox style). A static μ_K only removes
what survives the average over positions (the slowest pairs); the mean of the *pre-RoPE* keys,
μ_R = E[κ], turns with each key: m(p) = R_p μ_R. So keys are stored as

    k'_j = a ⊙ (k_j − μ_K − m(p_j))

and the term the softmax no longer drops, q·m(p_j), is added back to each logit:

    q·m(p) = Σ_i c_i(p) (q_i μ_i + q_i' μ_i') + s_i(p) (q_i' μ_i − q_i μ_i'),
    c_i(p) = ρ cos(p θ_i), s_i(p) = ρ sin(p θ_i)         (i' = i + D/2, ρ the RoPE attention scaling)

i.e. one more dot product per (query, key) between a per-query coefficient vector
(:func:`rope_bias_coeffs`) and a per-position table shared by every layer and head
(:func:`rope_table`). Exact like the rest (attention is unchanged without quantization).
SmolLM2-135M (8,192 tokens of the KV-side texts, means from the first half, energies on the
second): the key energy left to code is 42.0 % of the raw keys with a static center and 22.2 %
with the turning one (2.8 dB less), and fitting both jointly leaves the same 22.2 %.

**The attention sink.** The key at position 0 hardly depends on the token there (SmolLM2: its
residual after the centers above is 3.5x a typical token's, and 0.05x after subtracting the mean
position-0 key, leave-one-out over 8 sequences). So position 0 gets one more center s_K, stored
as k'_0 = a ⊙ (k_0 − μ_K − m(0) − s_K), and its logit gains q·s_K. Attention gives the sink a large
weight, so its coding error matters more than a typical key's.

All three pieces are one position-dependent key center c(p) = μ_K + m(p) + [p = 0] s_K, and the
logit of the key at position p gains q·(m(p) + [p = 0] s_K) (:class:`e8vllm.kernels.reference.KeyBias`).
Good parameters make the rate-limited E8 code (after the randomized Hadamard rotation, whose
error is isotropic in the coded domain) spend its error where attention is least sensitive:

* **Centers** μ = per-head means. Real keys carry a large common component (SmolLM2-135M:
  43-69 % of the key energy per layer), which the per-vector scale would otherwise have to cover.
* **Scales.** With isotropic coding error σ² ∝ Σ_i a_i² E[(k_i − μ_i)²] in the scaled domain,
  the logit error E[(q·e)²] ∝ (Σ_i E[q_i²] / a_i²)(Σ_i a_i² E[(k_i−μ_i)²]); by Cauchy-Schwarz it is
  smallest for a_i² ∝ sqrt(E[q_i²] / E[(k_i−μ_i)²]) (query energy from the heads of the group).
  For values the error reaches the model through the output projection W_o, so the weight of
  channel i is w_i = Σ_g ‖W_o[:, col(g, i)]‖² over the group's query heads and
  b_i² ∝ sqrt(w_i / E[(v_i−μ_i)²]). Scales are normalized to mean a_i² = 1 and clipped to
  [1/8, 8].

Measured on SmolLM2-135M (calibration: 4,096 tokens of the KV-side license texts; test: 1,024
held-out tokens, e8-4bit): the logit error q·(k̂ − k) falls by 3.4 dB with centering alone and by
5.6 dB with centering and scales. Perplexity does not follow the second step: in vLLM with
``e8_k4v4`` (10,240 held-out tokens, ΔPPL vs the bf16 cache) no calibration +4.59 %, centers
+2.53 %, centers + key scales +3.16 %, centers + value scales +2.80 %, both +3.04 %. So the
default calibration has no scales (all ones); ``scales=True`` (``e8vllm calibrate --scales``)
writes them for experiments.

**Key maps (the default): the same idea with a full matrix, at three-quarter strength.** Keys are
stored as k' = M (k − c(p)) per head and the queries read as q' = q M⁻¹ (q'·k' = q·(k − c(p))).
With the rotation and per-vector scale the code's error e' is isotropic in the mapped space with
variance ∝ |k'|², so the error the model sees, M⁻¹ e', costs ∝ tr(P Σ) tr(P⁻¹ W) in a metric W
(P = MᵀM, Σ the residual key covariance): minimal at P = Σ⁻¹ # W, the matrix geometric mean
(:func:`metric_maps`). For keys the metric is the logit error's, W = E[q qᵀ] over the group's
query heads ("moment"); "attn" weighs each query by how much a key error moves its output
(:func:`_attention_query_metric`). The model's optimum (strength 1) overshoots in practice; the
default is M = P^(3/8) (strength 0.75), chosen in session 7 on validation text (the KV-side texts
after the calibration tokens, never the perplexity benchmark's): e8_k3v3 with e8-3bit codes
+7.35 / +5.91 / **+5.39** / +6.24 % at strength 0.35 / 0.5 / 0.75 / 1 ("attn" at 0.5: +6.32 %),
and with the e8s-3bit codes +4.45 % at 0.5, **+3.63 %** at 0.75
(``results/experiments/holdout_s7_quality.md``). Sessions 5-6 used 0.5, chosen on the benchmark's
own tokens (below). Values get no map. Measured on SmolLM2 in vLLM 0.32 CPU (20,480 held-out tokens, ΔPPL vs the bf16
cache, all with the RoPE and sink centers): e8_k3v3 +7.04 % without a key map; "attn" at
strength 0.35 / 0.5 / 0.75 / 1: +6.15 / +5.06 / +5.22 / +5.54 %; "attn" fitted on 16,384
tokens at 0.5: +6.23 %; "moment" at 0.5: **+4.92 %** (then the default; chosen among these on the
same tokens, and their spread, about one point, is as large as the differences between them). On
other text (20 KV-side windows after the calibration tokens) strength 0.5 gives e8_k3v3 +5.91 %
against +7.49 % without a key map.
e8_k4v4: +1.50 % without, +1.14 % with "attn" at strength 1. Value maps raised the perplexity:
e8_k4v4 with K and V maps at strength 1 (values in the W_oᵀW_o metric) +2.24 % ("moment" keys)
and +2.53 % ("attn" keys), against +1.14 % with the key map alone; PCA maps of K and V (M = diag(λ^(-1/4)) Uᵀ,
−1.05 dB squared key error offline): 17.9457 against 17.9394 without. The diagonal scales above
are the diagonal special case of the metric maps at full strength.

The same map must be used for every key of a sequence (and of sequences sharing a cached
prefix), so it is static per model: calibrated once on real text, stored beside the model.

The file
--------
``<model dir>/e8vllm/kv_calibration.safetensors`` (:data:`CALIBRATION_FILE`): float32 tensors
``k_mean``, ``k_scale``, ``v_mean``, ``v_scale``, ``k_rope`` (μ_R, zeros when off) of shape
``[num_layers, num_kv_heads, head_dim]`` in the model's own head order (unsharded; ``k_mean`` is
the static part of the center of keys after RoPE, as vLLM caches them), ``rope_inv_freq``
[head_dim / 2] and ``rope_scale`` [1] (θ_i and ρ, read from the model's rotary embedding and
checked against the angles the model really used), and string metadata (format version, tokens,
text files, model). Format 2 files (no ``k_rope``) still load, as static centers. :func:`calibrate` writes it (``e8vllm
calibrate MODEL``); :func:`e8vllm.models.prepare_model` does it for the default model, on the
KV side of the text split (never the held-out perplexity texts). The environment variable
:data:`CALIBRATION_ENV` points to another file, or turns the map off with ``none``.

Where it is applied: :class:`e8vllm.vllm_plugin.impl.E8ImplMixin` maps K and V before the write
path, divides the queries by ``a`` and maps the attention output back, so every kernel (the
PyTorch reference, the Triton kernels) stores and reads the mapped codes unchanged.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["CALIBRATION_FILE", "CALIBRATION_ENV", "KVCenters", "compute_centers", "calibrate",
           "find_calibration", "load_centers", "local_kv_heads", "layer_index"]

CALIBRATION_FILE = "e8vllm/kv_calibration.safetensors"
"""Where the centers live inside a model directory (a subdirectory: vLLM loads every top-level
``*.safetensors`` file of a model directory as weights)."""

CALIBRATION_ENV = "E8VLLM_KV_CALIBRATION"
"""A path to a calibration file, or ``none`` / ``off`` / ``0`` to disable centering."""

FORMAT_VERSION = "4"
_READABLE = ("2", "3", "4")
OFF_VALUES = ("none", "off", "0", "false", "no")
"""Values of :data:`CALIBRATION_ENV` that turn the calibration off."""


_FIELDS = ("k_mean", "k_scale", "v_mean", "v_scale")
_ROPE_FIELDS = ("k_rope", "rope_inv_freq", "rope_scale", "k_sink")
_MAP_FIELDS = ("k_map", "v_map")
KEY_MAPS = ("moment", "attn", "pca", "none")
"""Key maps :func:`compute_centers` can fit: the metric maps of :func:`metric_maps` with the
query second moment E[q qᵀ] ("moment", the default) or the attention-weighted query metric of
:func:`_attention_query_metric` ("attn"); PCA whitening ("pca"); none."""
VALUE_MAPS = ("none", "wo", "pca")
"""Value maps: none (the default), the metric map with W_oᵀW_o ("wo"), PCA whitening ("pca")."""
DEFAULT_KEY_MAP = "moment"
DEFAULT_KEY_MAP_STRENGTH = 0.75
#: tokens of the KV-side texts a calibration runs the model over (their first ones)
DEFAULT_NUM_TOKENS = 4096
"""The metric key map is applied at this strength (M = P^(s/2), :func:`metric_maps`)."""
SCALE_CLIP = 8.0
"""Scales are clipped to [1/SCALE_CLIP, SCALE_CLIP] (after normalizing to mean square 1)."""
ROPE_CHECK_TOL = 1e-4
"""Largest relative difference allowed between the model's RoPE keys and ours (else static centers)."""


@dataclass(frozen=True)
class KVCenters:
    """Per-(layer, KV head) calibration: centers and per-channel scales for keys and values.

    Attributes:
        k_mean, v_mean: float32 [L, H_kv, D] (k_mean: the static part of the key center, after RoPE).
        k_scale, v_scale: float32 [L, H_kv, D], positive (all ones = centering only).
        meta: string metadata (format, tokens, text, model).
        k_rope: float32 [L, H_kv, D], mean of the keys before RoPE (μ_R; None or zeros = static
            centers only); needs rope_inv_freq.
        rope_inv_freq: float32 [D / 2], the RoPE angle per position of channel pair (i, i + D/2).
        rope_scale: the RoPE attention scaling ρ (1 for plain RoPE).
        k_sink: float32 [L, H_kv, D], the extra key center of position 0 (the attention sink; None
            or zeros = none).
        k_map, v_map: float32 [L, H_kv, D, D] invertible linear maps applied after centering
            (k' = M (k − c) per head; None = identity). The default calibration has a key map and
            no value map.
    """

    k_mean: torch.Tensor
    v_mean: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    meta: dict[str, str] = field(default_factory=dict)
    k_rope: torch.Tensor | None = None
    rope_inv_freq: torch.Tensor | None = None
    rope_scale: float = 1.0
    k_sink: torch.Tensor | None = None
    k_map: torch.Tensor | None = None
    v_map: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("k_scale", "v_scale"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, torch.ones_like(self.k_mean, dtype=torch.float32))
        if (self.k_map is not None or self.v_map is not None) and bool(
                (self.k_scale != 1).any() or (self.v_scale != 1).any()):
            raise ValueError("channel scales and linear maps are alternatives: give one or the other")
        for name in ("k_rope", "k_sink"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, torch.zeros_like(self.k_mean, dtype=torch.float32))
        for name in _FIELDS:
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or not t.is_floating_point():
                raise ValueError(f"{name} must be a float tensor [layers, kv_heads, head_dim]")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} has non-finite values")
            if t.shape != self.k_mean.shape:
                raise ValueError(f"{name} {tuple(t.shape)} and k_mean {tuple(self.k_mean.shape)} differ")
        for name in ("k_scale", "v_scale"):
            if not bool((getattr(self, name) > 0).all()):
                raise ValueError(f"{name} must be positive")
        for name in ("k_rope", "k_sink"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.shape != self.k_mean.shape or not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} must be a finite tensor of k_mean's shape {tuple(self.k_mean.shape)}")
        kr = self.k_rope
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} is odd")
        f = self.rope_inv_freq
        if f is None:
            if bool((kr != 0).any()):
                raise ValueError("k_rope (position-dependent key centers) needs rope_inv_freq")
            object.__setattr__(self, "rope_inv_freq", torch.zeros(self.head_dim // 2))
        elif (not isinstance(f, torch.Tensor) or f.shape != (self.head_dim // 2,)
              or not bool(torch.isfinite(f).all())):
            raise ValueError(f"rope_inv_freq must be a finite tensor [{self.head_dim // 2}]")
        if not (math.isfinite(float(self.rope_scale)) and float(self.rope_scale) > 0):
            raise ValueError(f"rope_scale must be a positive number, got {self.rope_scale!r}")
        for name in _MAP_FIELDS:
            m = getattr(self, name)
            if m is None:
                continue
            if (not isinstance(m, torch.Tensor) or m.shape != (*self.k_mean.shape, self.head_dim)
                    or not bool(torch.isfinite(m).all())):
                raise ValueError(f"{name} must be a finite tensor [layers, kv_heads, D, D]")
            sv = torch.linalg.svdvals(m.double())
            if bool((sv.amin(-1) <= 1e-6 * sv.amax(-1)).any()):
                raise ValueError(f"{name} is not invertible")

    @property
    def rotary(self) -> bool:
        """True when keys have position-dependent centers (k_rope not all zeros)."""
        return bool((self.k_rope != 0).any())

    @property
    def sink(self) -> bool:
        """True when position 0 has its own extra key center (k_sink not all zeros)."""
        return bool((self.k_sink != 0).any())

    @property
    def num_layers(self) -> int:
        return int(self.k_mean.shape[0])

    @property
    def num_kv_heads(self) -> int:
        return int(self.k_mean.shape[1])

    @property
    def head_dim(self) -> int:
        return int(self.k_mean.shape[2])

    def save(self, path: Path | str) -> Path:
        """Write atomically (temporary file + rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {**{k: v for k, v in self.meta.items() if k != "version"}, "format": "pt",
                "e8vllm_kv_calibration": FORMAT_VERSION}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            t = {n: getattr(self, n).float().contiguous() for n in _FIELDS}
            t["k_rope"] = self.k_rope.float().contiguous()
            t["rope_inv_freq"] = self.rope_inv_freq.float().contiguous()
            t["rope_scale"] = torch.tensor([float(self.rope_scale)], dtype=torch.float32)
            t["k_sink"] = self.k_sink.float().contiguous()
            for name in _MAP_FIELDS:
                if getattr(self, name) is not None:
                    t[name] = getattr(self, name).float().contiguous()
            save_file(t, tmp, metadata=meta)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: Path | str) -> "KVCenters":
        """Read a file written by :meth:`save`. ValueError if it is not one."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"KV calibration file {path} not found")
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            version = meta.get("e8vllm_kv_calibration")
            want = set(_FIELDS) | (set(_ROPE_FIELDS) if version != "2" else set())
            maps = set(f.keys()) & set(_MAP_FIELDS) if version != "2" else set()
            if version not in _READABLE or set(f.keys()) != want | maps:
                raise ValueError(f"{path} is not an e8vllm KV calibration file (format {FORMAT_VERSION})")
            t = {n: f.get_tensor(n) for n in want | maps}
        meta.pop("format", None)
        meta.pop("e8vllm_kv_calibration", None)
        meta["version"] = version
        rope = {} if version == "2" else {"k_rope": t["k_rope"], "rope_inv_freq": t["rope_inv_freq"],
                                           "rope_scale": float(t["rope_scale"].reshape(-1)[0]), "k_sink": t["k_sink"],
                                           **{n: t[n] for n in maps}}
        return cls(t["k_mean"], t["v_mean"], t["k_scale"], t["v_scale"], meta, **rope)

    def for_layer(self, layer: int, heads: list[int]) -> dict[str, torch.Tensor]:
        """``{"k_mean", "k_scale", "v_mean", "v_scale", "k_rope", "k_sink"}`` of ``layer`` for the
        given KV heads, each float32 [len(heads), D]."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is not in the calibration ({self.num_layers} layers)")
        if any(not 0 <= h < self.num_kv_heads for h in heads):
            raise ValueError(f"KV heads {heads} are not all in the calibration ({self.num_kv_heads} heads)")
        idx = torch.tensor(heads, dtype=torch.long)
        out = {n: getattr(self, n)[layer].index_select(0, idx).float() for n in (*_FIELDS, "k_rope", "k_sink")}
        for n in _MAP_FIELDS:  # {k,v}_map [H, D, D] when set
            if getattr(self, n) is not None:
                out[n] = getattr(self, n)[layer].index_select(0, idx).float()
        return out


# ---------------------------------------------------------------------------------------------
# position-dependent key centers (RoPE, neox pairing: channel i with i + D/2)
# ---------------------------------------------------------------------------------------------
def rope_table(inv_freq: torch.Tensor, scale: float, positions: torch.Tensor) -> torch.Tensor:
    """Rows [ρ cos(p θ), ρ sin(p θ)] for ``positions`` [P]: float32 [P, D] (D = 2 · len(inv_freq)).

    Angles in float32, like the models' own rotary embeddings."""
    ang = positions.to(torch.float32)[:, None] * inv_freq.to(device=positions.device, dtype=torch.float32)[None, :]
    return torch.cat([ang.cos(), ang.sin()], -1) * float(scale)


def rope_centers(k_rope: torch.Tensor, trig: torch.Tensor) -> torch.Tensor:
    """m(p) = R_p μ_R for every row of ``trig`` (:func:`rope_table`, [P, D]) and head of
    ``k_rope`` [H, D]: float32 [P, H, D]."""
    return _rotate(k_rope[None].float(), trig[:, None])


def _rotate(x: torch.Tensor, trig: torch.Tensor) -> torch.Tensor:
    """Neox RoPE of x [..., D] by the angles of ``trig`` rows [..., D] (broadcast)."""
    h = x.shape[-1] // 2
    c, s = trig[..., :h], trig[..., h:]
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def key_centers(c: dict[str, torch.Tensor], trig_rows: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
    """The position-dependent part of the key centers of one layer: m(p) + [p = 0] s_K for tokens at
    ``positions`` [T] (``c``: :meth:`KVCenters.for_layer` with ``k_rope`` / ``k_sink`` [H, D];
    ``trig_rows`` = :func:`rope_table` rows of those positions, None without RoPE centers)
    -> float32 [T, H, D] (μ_K not included)."""
    out = torch.zeros(positions.shape[0], *c["k_sink"].shape, device=positions.device)
    if trig_rows is not None:
        out = out + rope_centers(c["k_rope"], trig_rows.float())
    return out + (positions == 0).to(out.dtype)[:, None, None] * c["k_sink"].float()[None]


def rope_bias_coeffs(q: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
    """Per-query coefficients w with q·m(p) = w · trig(p): q [T, H, D], k_rope [H, D] (per query
    head) -> float32 [T, H, D] = [q_i μ_i + q_i' μ_i', q_i' μ_i − q_i μ_i']."""
    h = q.shape[-1] // 2
    q1, q2 = q[..., :h].float(), q[..., h:].float()
    m1, m2 = k_rope[None, :, :h].float(), k_rope[None, :, h:].float()
    return torch.cat([q1 * m1 + q2 * m2, q2 * m1 - q1 * m2], -1)


def pca_maps(x: torch.Tensor, floor: float = 1e-4) -> torch.Tensor:
    """Per-head maps M = diag(a) Uᵀ, a = λ^(-1/4) (mean a² = 1), from samples x [N, H, D] of
    centered vectors (covariance U diag(λ) Uᵀ per head; λ floored at ``floor`` · max λ): [H, D, D]."""
    xs = x.double()
    cov = torch.einsum("nhd,nhe->hde", xs, xs) / max(1, xs.shape[0])
    lam, u = torch.linalg.eigh(cov)
    lam = torch.maximum(lam, lam.amax(-1, keepdim=True) * floor)
    a = lam.pow(-0.25)
    a = a / a.pow(2).mean(-1, keepdim=True).sqrt()
    return (a[..., :, None] * u.transpose(-1, -2)).float()


def _psd_pow(a: torch.Tensor, p: float, floor: float) -> torch.Tensor:
    """a^p of symmetric PSD matrices [..., D, D] (eigenvalues floored at ``floor`` x the largest)."""
    lam, u = torch.linalg.eigh(a)
    lam = torch.maximum(lam, lam.amax(-1, keepdim=True) * floor)
    return (u * lam.pow(p)[..., None, :]) @ u.transpose(-1, -2)


def metric_maps(cov: torch.Tensor, metric: torch.Tensor, floor: float = 1e-4,
                strength: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Maps M that minimise the error a per-vector-scaled rotated code makes in a quadratic metric.

    A code after a random rotation with a per-vector scale leaves an error e' in the mapped space
    that is isotropic with variance ∝ |M x|²; mapped back, e = M⁻¹ e'. Its cost in the metric W
    (keys: W = E[q qᵀ], the logit error (q·e)²; values: W = W_oᵀ W_o, the output projection's)
    is ∝ tr(P Σ) tr(P⁻¹ W) with P = MᵀM and Σ the covariance of x. The minimum is at P = Σ⁻¹ # W,
    the matrix geometric mean (P Σ P = W): P = Σ^(-1/2) (Σ^(1/2) W Σ^(1/2))^(1/2) Σ^(-1/2), and
    M = P^(1/2) (symmetric), normalised to tr(MΣMᵀ) = tr Σ.

    Args:
        cov: [..., D, D] covariance of the centered vectors.
        metric: [..., D, D] PSD metric of the error.
        floor: eigenvalues below ``floor`` x the largest are raised to it (each matrix power).
        strength: M = P^(strength / 2): 1 is the optimum above, smaller values a partial step
            from the identity (the gain returned is the one of strength 1).
    Returns:
        (M float32 [..., D, D], predicted gain float64 [...]: tr Σ · tr W / (tr (Σ^½ W Σ^½)^½)²,
        the factor by which the metric error falls against M = I).
    """
    c, w = cov.double(), metric.double()
    ch = _psd_pow(c, 0.5, floor)
    chi = _psd_pow(c, -0.5, floor)
    mid = _psd_pow(ch @ w @ ch, 0.5, floor)
    p = chi @ mid @ chi
    m = _psd_pow((p + p.transpose(-1, -2)) / 2, 0.5 * strength, floor)
    energy = torch.einsum("...ij,...jk,...ik->...", m, c, m)
    tr = torch.diagonal(c, dim1=-2, dim2=-1).sum(-1)
    m = m * (tr / energy).sqrt()[..., None, None]
    gain = tr * torch.diagonal(w, dim1=-2, dim2=-1).sum(-1) / torch.diagonal(mid, dim1=-2, dim2=-1).sum(-1).pow(2)
    return m.float(), gain


def _attention_query_metric(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_o: torch.Tensor,
                            scale: float) -> torch.Tensor:
    r"""Σ_t ω_t q_t q_tᵀ per KV head: the metric of a key error e_j seen through one causal sequence.

    A key error e_j moves query t's output by p_tj s (q_t·e_j)(v_j − o_t) (first order), which
    reaches the residual stream through W_o; its squared size summed over the keys is
    (q_t·e)² ω_t with ω_t = s² Σ_j p_tj² ‖W_o (v_j − o_t)‖² for an error e common to the keys.
    So queries that attend sharply to keys whose values differ from their output weigh most.

    Args:
        q: [T, H_kv, G, D] queries after RoPE (G query heads per KV head); k: [T, H_kv, D] keys
        after RoPE; v: [T, H_kv, D]; w_o: [hidden, H_kv * G * D] output projection; scale: s.
    Returns:
        float64 [H_kv, D, D].
    """
    t, h_kv, g, d = q.shape
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    wo = w_o.reshape(w_o.shape[0], h_kv, g, d)
    out = torch.zeros(h_kv, d, d, dtype=torch.float64)
    for h in range(h_kv):
        for j in range(g):
            qh = q[:, h, j]
            p = torch.softmax((scale * qh @ k[:, h].T).masked_fill(~causal, float("-inf")), dim=-1)
            o = p @ v[:, h]
            gram = wo[:, h, j].T @ wo[:, h, j]  # [D, D]
            vg, og = v[:, h] @ gram, o @ gram
            p2 = p.pow(2)
            omega = (p2 @ (vg * v[:, h]).sum(-1) - 2 * (p2 * (og @ v[:, h].T)).sum(-1)
                     + (og * o).sum(-1) * p2.sum(-1)) * scale ** 2
            out[h] += torch.einsum("t,td,te->de", omega.clamp_min(0), qh, qh)
    return out


def _model_rope(model: Any, head_dim: int) -> tuple[torch.Tensor, float] | None:
    """(inv_freq [D/2], attention scaling) of a transformers model's rotary embedding, or None."""
    rot = getattr(getattr(model, "model", None), "rotary_emb", None)
    f = getattr(rot, "inv_freq", None)
    if not isinstance(f, torch.Tensor) or f.numel() != head_dim // 2:
        return None
    return f.detach().float().cpu(), float(getattr(rot, "attention_scaling", 1.0) or 1.0)


def channel_scales(weight: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """Per-channel scales a with a² ∝ sqrt(weight / energy), mean a² = 1, clipped to [1/8, 8].

    Args:
        weight: [..., D] sensitivity per channel (query energy, or output-projection column norms²).
        energy: [..., D] mean squared centered value per channel.
    Returns:
        float32 [..., D], positive.
    """
    w = weight.double().clamp_min(1e-30)
    e = energy.double().clamp_min(1e-30)
    a2 = (w / e).sqrt()
    a2 = a2 / a2.mean(-1, keepdim=True)
    a = a2.sqrt().clamp(1.0 / SCALE_CLIP, SCALE_CLIP)
    return a.float()


def _rope_module(model: Any) -> Any:
    """The Python module of the model's attention class, which must define ``apply_rotary_pos_emb``."""
    import sys

    attn = model.model.layers[0].self_attn
    mod = sys.modules[type(attn).__module__]
    if not callable(getattr(mod, "apply_rotary_pos_emb", None)):
        raise ValueError(f"{type(attn).__name__}: no apply_rotary_pos_emb in {mod.__name__}; cannot "
                         "capture queries and keys after RoPE for calibration")
    return mod


def _check_choices(key_map: str, value_map: str, key_map_strength: float) -> None:
    if key_map not in KEY_MAPS:
        raise ValueError(f"key_map must be one of {KEY_MAPS}, got {key_map!r}")
    if value_map not in VALUE_MAPS:
        raise ValueError(f"value_map must be one of {VALUE_MAPS}, got {value_map!r}")
    if not 0 < key_map_strength <= 1:
        raise ValueError(f"key_map_strength must be in (0, 1], got {key_map_strength}")


def _settings(num_tokens: int, scales: bool, key_map: str, value_map: str, key_map_strength: float,
              text_path: Path | None = None) -> str:
    """What a calibration file was asked for (stored in its metadata; a different ask recomputes it)."""
    strength = f"{key_map_strength:g}" if key_map in ("moment", "attn") else "-"
    return (f"tokens={num_tokens} text={text_path or 'default'} scales={int(scales)} key_map={key_map} "
            f"value_map={value_map} key_map_strength={strength}")


@torch.inference_mode()
def compute_centers(model_dir: Path | str, num_tokens: int = DEFAULT_NUM_TOKENS, chunk: int = 1024,
                    text_path: Path | None = None, scales: bool = False, sink_samples: int = 64,
                    key_map: str = DEFAULT_KEY_MAP, value_map: str = "none",
                    key_map_strength: float = DEFAULT_KEY_MAP_STRENGTH) -> KVCenters:
    """Calibrate the KV map of a (Llama-like, transformers) model on real text.

    Runs the model (float32, CPU) over ``num_tokens`` tokens of ``text_path`` (default: the KV side
    of :func:`e8vllm.kvdump.split_texts`, never the perplexity texts) cut into independent
    sequences of ``chunk`` tokens, capturing queries and keys after RoPE (by wrapping the
    attention module's ``apply_rotary_pos_emb``) and values (the ``v_proj`` outputs). Means,
    channel energies and the output projection's column norms give the centers and, with
    ``scales``, the channel scales (module docstring; off by default: they did not lower
    SmolLM2's perplexity); without ``scales`` they are all ones. The position-0 key center comes
    from the first tokens of ``sink_samples`` more short sequences (4 tokens each, spread over the
    same text); it is kept only where it leaves less than half the position-0 residual energy
    (leave-one-out estimate), else zeros. ``key_map`` / ``value_map`` (:data:`KEY_MAPS`,
    :data:`VALUE_MAPS`) pick the per-head linear maps applied after centering (module docstring);
    ``key_map_strength`` is the strength of the metric key maps.
    """
    _check_choices(key_map, value_map, key_map_strength)
    mapped = key_map != "none" or value_map != "none"
    if scales and mapped:
        raise ValueError("scales and maps are alternatives: use key_map='none', value_map='none' with scales")
    from e8vllm.kvdump import load_model, resolve_text_files, text_token_ids

    if num_tokens <= 0 or chunk <= 0:
        raise ValueError(f"num_tokens and chunk must be positive, got {num_tokens}, {chunk}")
    model, tok = load_model(Path(model_dir))
    cfg = model.config
    n_layers, h_q, h_kv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h_q
    grp = h_q // h_kv
    files = resolve_text_files(text_path)
    ids = text_token_ids(tok, files, None)[:num_tokens]

    # running sums per layer: Σk, Σk², Σv, Σv², Σq² (over the group's query heads), Σκ (keys
    # before RoPE), count; the positions seen (for the mean of m(p)); RoPE convention checks
    sk = torch.zeros(n_layers, h_kv, d, dtype=torch.float64)
    sk2, sv, sv2, sq2, skr = (torch.zeros_like(sk) for _ in range(5))
    sqq = torch.zeros(n_layers, h_kv, d, d, dtype=torch.float64) if key_map in ("moment", "attn") else None
    count = 0
    calls: list[int] = [0]
    rope_err: list[float] = [0.0]
    positions: list[torch.Tensor] = []
    rope = _model_rope(model, d)
    mod = _rope_module(model)
    orig = mod.apply_rotary_pos_emb
    sink: dict[str, Any] = {"on": False, "calls": 0, "keys": [[] for _ in range(n_layers)]}
    kept_k: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]  # with maps: every K / V (float32)
    kept_v: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]

    def capture(q: torch.Tensor, k: torch.Tensor, *args: Any, **kw: Any) -> Any:
        qe, ke = orig(q, k, *args, **kw)  # [1, H, T, D]
        if sink["on"]:  # short sequences: keep only the position-0 keys
            sink["keys"][sink["calls"] % n_layers].append(ke[0, :, 0].double())  # [H_kv, D]
            sink["calls"] += 1
            return qe, ke
        layer = calls[0] % n_layers
        calls[0] += 1
        kk = ke[0].transpose(0, 1).double()  # [T, H_kv, D]
        kp = k[0].transpose(0, 1).double()  # before RoPE
        if key_map != "none":
            kept_k[layer].append(kk.float())
        sk[layer] += kk.sum(0)
        sk2[layer] += kk.pow(2).sum(0)
        skr[layer] += kp.sum(0)
        qq = qe[0].transpose(0, 1).double().reshape(-1, h_kv, grp, d)
        sq2[layer] += qq.pow(2).sum((0, 2))
        if key_map == "moment":
            sqq[layer] += torch.einsum("thgd,thge->hde", qq, qq)
        elif key_map == "attn":
            attn = model.model.layers[layer].self_attn
            sqq[layer] += _attention_query_metric(qq, kk, kept_v[layer][-1].double(), attn.o_proj.weight.detach()
                                                  .double(), float(attn.scaling))
        if rope is not None and layer == 0:  # our neox formula and table reproduce the model's keys
            trig = rope_table(rope[0], rope[1], torch.arange(kk.shape[0]))  # key t sits at position t
            ours = _rotate(kp[:, 0].float(), trig)
            rope_err[0] = max(rope_err[0], ((ours.double() - kk[:, 0]).norm() / kk[:, 0].norm()).item())
        return qe, ke

    hooks = []
    for i, layer in enumerate(model.model.layers):
        def vhook(_m: Any, _inp: Any, out: torch.Tensor, i: int = i) -> None:
            if sink["on"]:
                return
            vv = out[0].double().reshape(-1, h_kv, d)
            if value_map != "none" or key_map == "attn":
                kept_v[i].append(vv.float())
            sv[i] += vv.sum(0)
            sv2[i] += vv.pow(2).sum(0)
        hooks.append(layer.self_attn.v_proj.register_forward_hook(vhook))
    mod.apply_rotary_pos_emb = capture
    try:
        for s in range(0, len(ids), chunk):
            piece = ids[s : s + chunk]
            model(input_ids=piece[None], use_cache=False, logits_to_keep=1)
            count += len(piece)
            positions.append(torch.arange(len(piece)))
        sink["on"] = True
        for j in range(sink_samples):
            s0 = (j * max(1, len(ids) - 4)) // max(1, sink_samples)
            model(input_ids=ids[s0 : s0 + 4][None], use_cache=False, logits_to_keep=1)
    finally:
        mod.apply_rotary_pos_emb = orig
        for h in hooks:
            h.remove()
    if calls[0] != n_layers * -(-len(ids) // chunk) or sink["calls"] != n_layers * sink_samples:
        raise RuntimeError(f"captured {calls[0]} + {sink['calls']} RoPE calls, expected {n_layers} per chunk "
                           f"and per sink sequence")

    k_mean, v_mean = sk / count, sv / count
    k_energy = sk2 / count - k_mean.pow(2)
    v_energy = sv2 / count - v_mean.pow(2)
    q_energy = sq2 / (count * grp)
    w_o = torch.stack([layer.self_attn.o_proj.weight.detach().double().pow(2).sum(0)
                       .reshape(h_kv, grp, d).sum(1) for layer in model.model.layers])  # [L, H_kv, D]
    meta = {"tokens": str(count), "chunk": str(chunk), "text": ",".join(Path(f).name for f in files),
            "model": str(Path(model_dir).name),
            "scales": "k: sqrt(E[q^2]/var k); v: sqrt(|W_o col|^2/var v)" if scales else "none"}
    rope_kw: dict[str, Any] = {}
    if rope is not None and rope_err[0] < ROPE_CHECK_TOL:
        # μ_R = E[κ]; the static part is what is left of the mean: E[k] − E_p[m(p)]
        k_rope = skr / count
        trig_mean = rope_table(rope[0], rope[1], torch.cat(positions)).double().mean(0)  # [D]
        k_mean -= _rotate(k_rope.float(), trig_mean.float()).double()  # every layer and head at once
        rope_kw = {"k_rope": k_rope.float(), "rope_inv_freq": rope[0], "rope_scale": rope[1]}
        meta["rope"] = f"neox, checked on layer 0 (relative error {rope_err[0]:.1e})"
    else:
        why = "no rotary_emb.inv_freq" if rope is None else f"neox check failed ({rope_err[0]:.2e})"
        logger.warning("e8vllm calibration: static key centers only (%s)", why)
        meta["rope"] = f"off: {why}"
    # position 0: residual of the first keys after the centers above; its mean is the sink center
    if sink_samples >= 2:
        m0 = k_mean.clone()
        if "k_rope" in rope_kw:
            m0 += _rotate(rope_kw["k_rope"], rope_table(rope[0], rope[1], torch.zeros(1))[0]).double()
        x = torch.stack([torch.stack(sink["keys"][layer]) for layer in range(n_layers)]) - m0[:, None]  # [L, S, H, D]
        mean = x.mean(1)
        loo = (x.sum(1, keepdim=True) - x) / (x.shape[1] - 1)
        ratio = (x - loo).pow(2).sum((1, 3)) / x.pow(2).sum((1, 3)).clamp_min(1e-30)  # [L, H]
        keep = (ratio < 0.5)[..., None]
        rope_kw["k_sink"] = torch.where(keep, mean, torch.zeros_like(mean)).float()
        meta["sink"] = (f"position 0 from {sink_samples} sequences: kept for {int(keep.sum())} of {keep.numel()} "
                        f"(layer, head); residual energy x{ratio.median().item():.3f} (median, leave-one-out)")
    if mapped:
        pos = torch.cat(positions)
        trig_all = rope_table(rope[0], rope[1], pos) if "k_rope" in rope_kw else None
        km, vm, gains = [], [], []
        for layer in range(n_layers):
            c = {"k_rope": rope_kw.get("k_rope", torch.zeros_like(k_mean.float()))[layer],
                 "k_sink": rope_kw.get("k_sink", torch.zeros_like(k_mean.float()))[layer]}
            if key_map != "none":
                rk = torch.cat(kept_k[layer]) - k_mean[layer].float() - key_centers(c, trig_all, pos)
            if key_map == "pca":
                km.append(pca_maps(rk))
            elif key_map != "none":
                cov_k = torch.einsum("nhd,nhe->hde", rk.double(), rk.double()) / rk.shape[0]
                m, gk = metric_maps(cov_k, sqq[layer] / sqq[layer].diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None],
                                    strength=key_map_strength)
                km.append(m)
                gains.append(gk)
            if value_map != "none":
                rv = torch.cat(kept_v[layer]) - v_mean[layer].float()
            if value_map == "pca":
                vm.append(pca_maps(rv))
            elif value_map == "wo":
                cov_v = torch.einsum("nhd,nhe->hde", rv.double(), rv.double()) / rv.shape[0]
                wo = model.model.layers[layer].self_attn.o_proj.weight.detach().double().reshape(-1, h_kv, grp, d)
                vm.append(metric_maps(cov_v, torch.einsum("ohgd,ohge->hde", wo, wo))[0])
        if km:
            rope_kw["k_map"] = torch.stack(km)
        if vm:
            rope_kw["v_map"] = torch.stack(vm)
        desc = {"attn": f"metric map (strength {key_map_strength:g}), attention-weighted query metric",
                "moment": f"metric map (strength {key_map_strength:g}), E[q q^T]",
                "pca": "PCA whitening diag(lambda^-1/4) U^T", "wo": "metric map, W_o^T W_o", "none": "none"}
        meta["maps"] = f"keys: {desc[key_map]}; values: {desc[value_map]}"
        if gains:
            g = 10 * torch.stack(gains).log10()  # [L, H]
            meta["maps"] += f" (predicted key metric-error gain {g.median().item():.2f} dB, median over heads)"
            logger.info("key maps: predicted metric-error gain per layer (dB): %s",
                        " ".join(f"{x:.2f}" for x in g.mean(1).tolist()))
    if not scales:
        return KVCenters(k_mean.float(), v_mean.float(), None, None, meta, **rope_kw)
    return KVCenters(k_mean.float(), v_mean.float(), channel_scales(q_energy, k_energy),
                     channel_scales(w_o, v_energy), meta, **rope_kw)


def calibrate(model_dir: Path | str, out: Path | str | None = None, num_tokens: int = DEFAULT_NUM_TOKENS,
              force: bool = False, text_path: Path | None = None, scales: bool = False,
              key_map: str = DEFAULT_KEY_MAP, value_map: str = "none",
              key_map_strength: float = DEFAULT_KEY_MAP_STRENGTH) -> Path:
    """Write the calibration of ``model_dir`` to ``out`` (default ``model_dir/CALIBRATION_FILE``);
    an existing valid file of the current format, made with the same settings, is kept unless ``force``."""
    if scales:
        key_map = value_map = "none"
    _check_choices(key_map, value_map, key_map_strength)
    want = _settings(num_tokens, scales, key_map, value_map, key_map_strength, text_path)
    out = Path(out) if out is not None else Path(model_dir) / CALIBRATION_FILE
    if out.is_file() and not force:
        try:
            meta = KVCenters.load(out).meta
            if meta.get("version") == FORMAT_VERSION and meta.get("settings") == want:
                return out
            logger.warning("replacing calibration file %s (format %s, settings %s; asked: %s)", out,
                           meta.get("version"), meta.get("settings"), want)
        except ValueError:
            logger.warning("replacing invalid or old calibration file %s", out)
    centers = compute_centers(model_dir, num_tokens=num_tokens, text_path=text_path, scales=scales,
                              key_map=key_map, value_map=value_map, key_map_strength=key_map_strength)
    centers.meta["settings"] = want
    return centers.save(out)


def find_calibration(model: str | os.PathLike[str] | None) -> Path | None:
    """The calibration file to use for ``model`` (a path or a name), or None for no centering.

    ``$E8VLLM_KV_CALIBRATION`` wins: a file path, or ``none``; a set path that does not exist is an
    error (no silent fallback). Otherwise ``<model>/e8vllm/kv_calibration.safetensors`` if
    ``model`` is a local directory that has one.
    """
    env = os.environ.get(CALIBRATION_ENV, "").strip()
    if env:
        if env.lower() in OFF_VALUES:
            return None
        p = Path(env).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"{CALIBRATION_ENV}={env}: no such file")
        return p
    if model is None:
        return None
    p = Path(os.fspath(model)).expanduser() / CALIBRATION_FILE
    return p if p.is_file() else None


@functools.lru_cache(maxsize=4)
def load_centers(path: str) -> KVCenters:
    """:meth:`KVCenters.load`, cached per process (every attention layer asks)."""
    return KVCenters.load(path)


def local_kv_heads(total_kv_heads: int, num_local: int, tp_rank: int, tp_size: int) -> list[int]:
    """The model's KV head indices a tensor-parallel rank holds, in its local order.

    vLLM's ``QKVParallelLinear`` splits KV heads evenly when ``tp_size <= total_kv_heads``
    (rank r holds ``[r n, (r+1) n)``) and replicates them otherwise (rank r holds head
    ``r // (tp_size / total_kv_heads)``).
    """
    if tp_size <= 0 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"bad tensor-parallel rank {tp_rank} of {tp_size}")
    if tp_size >= total_kv_heads:
        if tp_size % total_kv_heads or num_local != 1:
            raise ValueError(f"{total_kv_heads} KV heads cannot be replicated over {tp_size} ranks "
                             f"with {num_local} local heads")
        return [tp_rank // (tp_size // total_kv_heads)]
    if num_local * tp_size != total_kv_heads:
        raise ValueError(f"{total_kv_heads} KV heads do not split into {tp_size} x {num_local}")
    return list(range(tp_rank * num_local, (tp_rank + 1) * num_local))


_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


def layer_index(layer_name: str) -> int:
    """Decoder-layer index in a vLLM attention layer name (``model.layers.7.self_attn.attn`` -> 7)."""
    m = _LAYER_RE.search(layer_name)
    if m is None:
        nums = re.findall(r"\.(\d+)\.", f".{layer_name}.")
        if len(nums) != 1:
            raise ValueError(f"cannot find the layer index in attention layer name {layer_name!r}")
        return int(nums[0])
    return int(m.group(1))


def describe(path: Path | None) -> dict[str, Any]:
    """A small JSON-able summary: whether centering is on and from which file."""
    if path is None:
        return {"kv_centering": False, "calibration_file": None}
    c = load_centers(str(path))
    return {"kv_centering": True, "kv_rope_centers": c.rotary, "kv_sink_center": c.sink,
            "kv_maps": c.k_map is not None or c.v_map is not None, "calibration_file": str(path), "layers": c.num_layers,
            "kv_heads": c.num_kv_heads, "head_dim": c.head_dim, **{f"meta_{k}": v for k, v in c.meta.items()}}


def _main() -> None:  # pragma: no cover - thin CLI
    import argparse

    ap = argparse.ArgumentParser(description="Write the KV centers of a model directory.")
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--tokens", type=int, default=DEFAULT_NUM_TOKENS)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    print(json.dumps(describe(calibrate(a.model_dir, num_tokens=a.tokens, force=a.force))))


if __name__ == "__main__":  # pragma: no cover
    _main()
