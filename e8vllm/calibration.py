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
default calibration is **centers only** (scales all ones); ``scales=True``
(``e8vllm calibrate --scales``) writes the scales for experiments.

The same map must be used for every key of a sequence (and of sequences sharing a cached
prefix), so it is static per model: calibrated once on real text, stored beside the model.

The file
--------
``<model dir>/e8vllm/kv_calibration.safetensors`` (:data:`CALIBRATION_FILE`): float32 tensors
``k_mean``, ``k_scale``, ``v_mean``, ``v_scale`` of shape ``[num_layers, num_kv_heads, head_dim]``
in the model's own head order (unsharded; keys after RoPE, as vLLM caches them) and string
metadata (format version, tokens, text files, model). :func:`calibrate` writes it (``e8vllm
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

FORMAT_VERSION = "2"
_OFF = ("none", "off", "0", "false", "no")


_FIELDS = ("k_mean", "k_scale", "v_mean", "v_scale")
SCALE_CLIP = 8.0
"""Scales are clipped to [1/SCALE_CLIP, SCALE_CLIP] (after normalizing to mean square 1)."""


@dataclass(frozen=True)
class KVCenters:
    """Per-(layer, KV head) calibration: centers and per-channel scales for keys and values.

    Attributes:
        k_mean, v_mean: float32 [L, H_kv, D] (keys after RoPE).
        k_scale, v_scale: float32 [L, H_kv, D], positive (all ones = centering only).
        meta: string metadata (format, tokens, text, model).
    """

    k_mean: torch.Tensor
    v_mean: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("k_scale", "v_scale"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, torch.ones_like(self.k_mean, dtype=torch.float32))
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
        meta = {"format": "pt", "e8vllm_kv_calibration": FORMAT_VERSION, **self.meta}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            save_file({n: getattr(self, n).float().contiguous() for n in _FIELDS}, tmp, metadata=meta)
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
            if meta.get("e8vllm_kv_calibration") != FORMAT_VERSION or set(f.keys()) != set(_FIELDS):
                raise ValueError(f"{path} is not an e8vllm KV calibration file (format {FORMAT_VERSION})")
            t = {n: f.get_tensor(n) for n in _FIELDS}
        meta.pop("format", None)
        meta.pop("e8vllm_kv_calibration", None)
        return cls(t["k_mean"], t["v_mean"], t["k_scale"], t["v_scale"], meta)

    def for_layer(self, layer: int, heads: list[int]) -> dict[str, torch.Tensor]:
        """``{"k_mean", "k_scale", "v_mean", "v_scale"}`` of ``layer`` for the given KV heads,
        each float32 [len(heads), D]."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is not in the calibration ({self.num_layers} layers)")
        if any(not 0 <= h < self.num_kv_heads for h in heads):
            raise ValueError(f"KV heads {heads} are not all in the calibration ({self.num_kv_heads} heads)")
        idx = torch.tensor(heads, dtype=torch.long)
        return {n: getattr(self, n)[layer].index_select(0, idx).float() for n in _FIELDS}


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


@torch.inference_mode()
def compute_centers(model_dir: Path | str, num_tokens: int = 4096, chunk: int = 1024,
                    text_path: Path | None = None, scales: bool = False) -> KVCenters:
    """Calibrate the KV map of a (Llama-like, transformers) model on real text.

    Runs the model (float32, CPU) over ``num_tokens`` tokens of ``text_path`` (default: the KV side
    of :func:`e8vllm.kvdump.split_texts`, never the perplexity texts) cut into independent
    sequences of ``chunk`` tokens, capturing queries and keys after RoPE (by wrapping the
    attention module's ``apply_rotary_pos_emb``) and values (the ``v_proj`` outputs). Means,
    channel energies and the output projection's column norms give the centers and, with
    ``scales``, the channel scales (module docstring; off by default: they did not lower
    SmolLM2's perplexity); without ``scales`` they are all ones.
    """
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

    # running sums per layer: Σk, Σk², Σv, Σv², Σq² (over the group's query heads), count
    sk = torch.zeros(n_layers, h_kv, d, dtype=torch.float64)
    sk2, sv, sv2, sq2 = (torch.zeros_like(sk) for _ in range(4))
    count = 0
    calls: list[int] = [0]
    mod = _rope_module(model)
    orig = mod.apply_rotary_pos_emb

    def capture(q: torch.Tensor, k: torch.Tensor, *args: Any, **kw: Any) -> Any:
        qe, ke = orig(q, k, *args, **kw)  # [1, H, T, D]
        layer = calls[0] % n_layers
        calls[0] += 1
        kk = ke[0].transpose(0, 1).double()  # [T, H_kv, D]
        sk[layer] += kk.sum(0)
        sk2[layer] += kk.pow(2).sum(0)
        qq = qe[0].transpose(0, 1).double().reshape(-1, h_kv, grp, d)
        sq2[layer] += qq.pow(2).sum((0, 2))
        return qe, ke

    hooks = []
    for i, layer in enumerate(model.model.layers):
        def vhook(_m: Any, _inp: Any, out: torch.Tensor, i: int = i) -> None:
            vv = out[0].double().reshape(-1, h_kv, d)
            sv[i] += vv.sum(0)
            sv2[i] += vv.pow(2).sum(0)
        hooks.append(layer.self_attn.v_proj.register_forward_hook(vhook))
    mod.apply_rotary_pos_emb = capture
    try:
        for s in range(0, len(ids), chunk):
            piece = ids[s : s + chunk]
            model(input_ids=piece[None], use_cache=False, logits_to_keep=1)
            count += len(piece)
    finally:
        mod.apply_rotary_pos_emb = orig
        for h in hooks:
            h.remove()
    if calls[0] != n_layers * -(-len(ids) // chunk):
        raise RuntimeError(f"captured {calls[0]} RoPE calls, expected {n_layers} per chunk")

    k_mean, v_mean = sk / count, sv / count
    k_energy = sk2 / count - k_mean.pow(2)
    v_energy = sv2 / count - v_mean.pow(2)
    q_energy = sq2 / (count * grp)
    w_o = torch.stack([layer.self_attn.o_proj.weight.detach().double().pow(2).sum(0)
                       .reshape(h_kv, grp, d).sum(1) for layer in model.model.layers])  # [L, H_kv, D]
    meta = {"tokens": str(count), "chunk": str(chunk), "text": ",".join(Path(f).name for f in files),
            "model": str(Path(model_dir).name),
            "scales": "k: sqrt(E[q^2]/var k); v: sqrt(|W_o col|^2/var v)" if scales else "none"}
    if not scales:
        return KVCenters(k_mean.float(), v_mean.float(), None, None, meta)
    return KVCenters(k_mean.float(), v_mean.float(), channel_scales(q_energy, k_energy),
                     channel_scales(w_o, v_energy), meta)


def calibrate(model_dir: Path | str, out: Path | str | None = None, num_tokens: int = 4096,
              force: bool = False, text_path: Path | None = None, scales: bool = False) -> Path:
    """Write the calibration of ``model_dir`` to ``out`` (default ``model_dir/CALIBRATION_FILE``);
    an existing valid file is kept unless ``force``."""
    out = Path(out) if out is not None else Path(model_dir) / CALIBRATION_FILE
    if out.is_file() and not force:
        try:
            KVCenters.load(out)
            return out
        except ValueError:
            logger.warning("replacing invalid or old calibration file %s", out)
    centers = compute_centers(model_dir, num_tokens=num_tokens, text_path=text_path, scales=scales)
    return centers.save(out)


def find_calibration(model: str | os.PathLike[str] | None) -> Path | None:
    """The calibration file to use for ``model`` (a path or a name), or None for no centering.

    ``$E8VLLM_KV_CALIBRATION`` wins: a file path, or ``none``; a set path that does not exist is an
    error (no silent fallback). Otherwise ``<model>/e8vllm/kv_calibration.safetensors`` if
    ``model`` is a local directory that has one.
    """
    env = os.environ.get(CALIBRATION_ENV, "").strip()
    if env:
        if env.lower() in _OFF:
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
    return {"kv_centering": True, "calibration_file": str(path), "layers": c.num_layers,
            "kv_heads": c.num_kv_heads, "head_dim": c.head_dim, **{f"meta_{k}": v for k, v in c.meta.items()}}


def _main() -> None:  # pragma: no cover - thin CLI
    import argparse

    ap = argparse.ArgumentParser(description="Write the KV centers of a model directory.")
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    print(json.dumps(describe(calibrate(a.model_dir, num_tokens=a.tokens, force=a.force))))


if __name__ == "__main__":  # pragma: no cover
    _main()
