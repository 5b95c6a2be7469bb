"""The E8 half of an attention impl, shared by the CPU (``CPU_ATTN``) and GPU (``CUSTOM``) backends.

:class:`E8ImplMixin` holds everything that does not depend on the platform: the per-layer
checks, the page-layout self-check, the write path and attention over the packed cache
(:mod:`e8vllm.kernels.reference`). A platform impl calls :meth:`_e8_setup` from ``__init__`` and
delegates ``do_kv_cache_update`` / ``forward`` to :meth:`_e8_write` / :meth:`_e8_forward` when
``self.e8`` is true, and to vLLM's stock impl otherwise.

KV calibration (:mod:`e8vllm.calibration`): when the model has a calibration file, the layer
stores ``a ⊙ (k − μ_K − c(p))`` and ``b ⊙ (v − μ_V)``, attends with ``q ⊘ a`` plus the logit term
``q·c(p_j)`` of every key (c(p) = R_p μ_R + [p = 0] s_K: the key center that turns with RoPE and the
attention sink's; the kernels take it as a :class:`~e8vllm.kernels.reference.KeyBias`) and maps the output back with
``o ⊘ b + μ_V`` (exact: softmax is shift-invariant). The positions p of the tokens written come
from the layer's attention metadata (``query_start_loc``, ``seq_lens``), on the device.

Shapes (vLLM conventions): query [T, H_q, D], key/value [T, H_kv, D], output [T, H_q, D];
kv_cache uint8 [num_blocks, H_kv, block_size, slot_bytes].
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from e8vllm import telemetry
from e8vllm.kernels.reference import KeyBias, check_cache_layout, paged_attention, write_kv_cache

from e8vllm import calibration

from . import spec as e8spec

logger = logging.getLogger("e8vllm.vllm_plugin")
#: models this process already warned about (no calibration file): once per model, not per layer
_UNCALIBRATED_WARNED: set[str] = set()


def _warn_uncalibrated(model: Any) -> None:
    """Running without key/value centers is a quality choice the user should see (SmolLM2 e8_k4v4:
    +5.48 % perplexity uncentered, +0.24 % calibrated); silent only when turned off on purpose."""
    env = os.environ.get(calibration.CALIBRATION_ENV, "").strip().lower()
    key = str(model)
    if env in calibration.OFF_VALUES or key in _UNCALIBRATED_WARNED:
        return
    _UNCALIBRATED_WARNED.add(key)
    logger.warning(
        "e8vllm: no KV calibration for model %r: the E8 cache runs uncentered (more quantization error: "
        "SmolLM2 e8_k4v4 +5.48 %% perplexity instead of +0.24 %%). For a local model directory run "
        "`e8vllm calibrate DIR` once (Hugging Face ids: download to a directory first), or set %s to a "
        "calibration file; %s=none silences this.", model, calibration.CALIBRATION_ENV, calibration.CALIBRATION_ENV)


def token_positions(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Position in its sequence of each of ``num_tokens`` batch rows: int64 [num_tokens].

    Row t of sequence i (rows ``query_start_loc[i]:query_start_loc[i+1]``, the last q_i of its
    ``seq_lens[i]`` tokens) sits at ``seq_lens[i] - (query_start_loc[i+1] - t)``. Rows past the
    batch (padding) get 0. Device ops only (no host sync; CUDA-graph safe)."""
    qsl = query_start_loc.to(torch.int64)
    b = qsl.shape[0] - 1
    t = torch.arange(num_tokens, device=qsl.device, dtype=torch.int64)
    seq = torch.searchsorted(qsl[1:].contiguous(), t, right=True).clamp(max=max(b - 1, 0))
    pos = seq_lens.to(torch.int64)[seq] - (qsl[seq + 1] - t)
    return torch.where((t < qsl[-1]) & (pos >= 0), pos, torch.zeros_like(pos))


def _layer_metadata(layer: Any) -> Any:
    """The current forward's attention metadata of ``layer`` (vLLM's forward context), or None."""
    try:
        from vllm.forward_context import get_forward_context

        meta = get_forward_context().attn_metadata
    except Exception:  # noqa: BLE001 - no forward context (unit tests)
        return None
    if isinstance(meta, list):  # speculative decoding: [0] is the base model's dict
        meta = meta[0] if meta else None
    if isinstance(meta, dict):
        meta = meta.get(getattr(layer, "layer_name", None))
    return meta

__all__ = ["E8ImplMixin"]


class E8ImplMixin:
    """Mixed into a vLLM ``AttentionImpl`` subclass (which provides num_heads, head_size, ...)."""

    e8: bool = False
    num_heads: int
    head_size: int
    num_kv_heads: int
    scale: float
    kv_cache_dtype: str
    _e8_telemetry: "telemetry.Sampler | None" = None

    def _e8_check_layer(self, kv_cache_dtype: str, *, num_heads: int, head_size: int, num_kv_heads: int,
                        alibi_slopes: Any, sliding_window: Any, logits_soft_cap: Any, attn_type: Any,
                        sinks: Any, kv_sharing_target_layer_name: str | None = None) -> bool:
        """True for an e8 dtype the layer can serve; E8UnsupportedError naming every reason otherwise."""
        self.e8 = e8spec.is_e8_dtype(kv_cache_dtype)
        if self.e8:
            e8spec.parse_e8_dtype(kv_cache_dtype)
            e8spec.raise_if_unsupported(kv_cache_dtype, e8spec.layer_unsupported_reasons(
                kv_cache_dtype, head_size=head_size, alibi_slopes=alibi_slopes,
                sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                attn_type=str(getattr(attn_type, "value", attn_type)), sinks=sinks,
                num_heads=num_heads, num_kv_heads=num_kv_heads,
                kv_sharing_target_layer_name=kv_sharing_target_layer_name), "attention layer")
        return self.e8

    def _e8_setup(self, kv_cache_dtype: str, head_size: int) -> None:
        """After the stock constructor: the packed format, and the process's active dtype."""
        self.kv_cache_dtype = kv_cache_dtype
        self.fmt = e8spec.kv_format(kv_cache_dtype, head_size)
        e8spec.set_active_dtype(kv_cache_dtype)
        self._layout_checked = False
        # live error telemetry (e8vllm.telemetry): None, i.e. no cost, unless the server turned it on
        self._e8_telemetry = telemetry.sampler()
        self._centers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._centers_done = False
        self._scaled = False
        self._rotary = False
        self._sink = False
        self._k_mapped = False
        self._v_mapped = False
        self._trig: torch.Tensor | None = None
        self._e8_model: str | None = None
        self._e8_max_len = 0
        # the engine's shape, for compiling the GPU kernels' variants ahead of inference (gpu.py)
        self._e8_block_size = 16
        self._e8_max_seqs = 1 << 12
        self._e8_dtype: torch.dtype | None = None
        try:  # the model path, for its calibration file (constructors run under the vLLM config)
            from vllm.config import get_current_vllm_config

            cfg = get_current_vllm_config()
            mc = cfg.model_config
            self._e8_model = str(mc.model)
            self._e8_max_len = int(getattr(mc, "max_model_len", 0) or 0)
        except Exception:  # noqa: BLE001 - no config (unit tests): no centering unless the env names a file
            self._e8_model = None
        else:  # the warm-up's shape; a config without these fields keeps the defaults above
            dt = getattr(mc, "dtype", None)
            self._e8_dtype = dt if isinstance(dt, torch.dtype) else None
            self._e8_block_size = int(getattr(getattr(cfg, "cache_config", None), "block_size", None) or 16)
            self._e8_max_seqs = int(getattr(getattr(cfg, "scheduler_config", None), "max_num_seqs", None)
                                    or self._e8_max_seqs)

    def _e8_centers(self, layer: Any, device: torch.device) -> dict[str, torch.Tensor] | None:
        """This layer's calibration for its local KV heads, or None (no calibration file).

        ``{"k_mean", "k_scale", "v_mean", "v_scale", "k_rope", "k_sink"}`` float32 [H_kv, D], plus
        ``q_inv`` (1 / k_scale per query head) [H_q, D], ``v_inv`` (1 / v_scale) [H_kv, D], ``q_rope``
        and ``q_sink`` (k_rope, k_sink per query head) [H_q, D], and for each side with a linear map
        ``k_map`` / ``v_map``, its inverse ``k_inv_map`` / ``v_inv_map`` [H_kv, D, D] (keys: also
        ``q_map`` [H_q, D, D]);
        with position-dependent centers the RoPE table is built here too (:meth:`_e8_rope_table`).
        Resolved once, at the first
        call with the layer (its ``layer_name`` gives the index, the tensor-parallel rank the heads).
        A calibration that does not fit the model is an error.
        """
        if self._centers_done:
            return self._centers
        path = calibration.find_calibration(self._e8_model)
        if path is None:
            _warn_uncalibrated(self._e8_model)
        if path is not None and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("e8vllm: the KV calibration must be loaded before CUDA-graph capture "
                               "(vLLM runs warm-up passes first; this layer saw none)")
        if path is not None:
            name = getattr(layer, "layer_name", None)
            if not isinstance(name, str):
                raise RuntimeError("e8vllm: the KV calibration needs the attention layer's name")
            c = calibration.load_centers(str(path))
            if c.head_dim != self.head_size:
                raise e8spec.E8UnsupportedError(
                    f"e8vllm: calibration {path} has head_dim {c.head_dim}, the model {self.head_size}")
            try:
                from vllm.distributed import (get_tensor_model_parallel_rank,
                                              get_tensor_model_parallel_world_size)

                rank, size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
            except Exception:  # noqa: BLE001 - no distributed state (unit tests)
                rank, size = 0, 1
            heads = calibration.local_kv_heads(c.num_kv_heads, self.num_kv_heads, rank, size)
            t = {k: v.to(device) for k, v in c.for_layer(calibration.layer_index(name), heads).items()}
            grp = self.num_heads // self.num_kv_heads
            t["q_inv"] = (1.0 / t["k_scale"]).repeat_interleave(grp, dim=0)
            t["v_inv"] = 1.0 / t["v_scale"]
            t["q_rope"] = t["k_rope"].repeat_interleave(grp, dim=0)
            t["q_sink"] = t["k_sink"].repeat_interleave(grp, dim=0)
            self._scaled = bool((t["k_scale"] != 1).any() or (t["v_scale"] != 1).any())  # else centers only
            self._rotary = bool((t["k_rope"] != 0).any())
            self._sink = bool((t["k_sink"] != 0).any())
            self._k_mapped, self._v_mapped = "k_map" in t, "v_map" in t  # the default maps the keys only
            if self._k_mapped:  # inverses once (float64)
                t["k_inv_map"] = torch.linalg.inv(t["k_map"].double()).float()
                t["q_map"] = t["k_inv_map"].repeat_interleave(grp, dim=0)  # q' = q M⁻¹ (row vectors)
            if self._v_mapped:
                t["v_inv_map"] = torch.linalg.inv(t["v_map"].double()).float()
            self._rope = (c.rope_inv_freq.to(device), float(c.rope_scale))
            self._centers = t
            if self._rotary and self._e8_max_len > 0:  # the whole table now, before any graph capture
                self._e8_rope_table(self._e8_max_len, device)
        self._centers_done = True
        return self._centers

    def _e8_rope_table(self, need: int, device: torch.device) -> torch.Tensor:
        """[ρ cos(pθ), ρ sin(pθ)] rows for positions 0..P-1, P >= need: [P, D], float32 (fp16 on CUDA),
        built once for max_model_len when the vLLM config gives it, else grown to the longest
        sequence seen."""
        if self._trig is None or self._trig.shape[0] < need:
            size = max(need, self._e8_max_len)
            t = calibration.rope_table(self._rope[0], self._rope[1], torch.arange(size, device=device))
            # fp16 on GPUs (the kernels' dot operand; half the bytes read per key); the write path
            # subtracts the centers of the same table the kernels add back, so the identity holds
            self._trig = t.half() if device.type == "cuda" else t
        return self._trig

    def _e8_trig(self, device: torch.device, longest: Callable[[], int]) -> torch.Tensor:
        """The RoPE table for this call: on CPU (and before any table exists) grown to ``longest()``
        positions, a host sync; on CUDA the table built at the first call (max_model_len) as is,
        so the hot path has no sync (CUDA-graph safe)."""
        if device.type == "cpu" or self._trig is None:
            return self._e8_rope_table(longest(), device)
        return self._trig

    def _e8_write_positions(self, layer: Any, n: int, device: torch.device) -> torch.Tensor:
        """Positions [n] of the rows being written, from the layer's attention metadata."""
        meta = _layer_metadata(layer)
        if meta is None or getattr(meta, "query_start_loc", None) is None:
            raise RuntimeError("e8vllm: position-dependent key centers need the token positions, and the "
                               "forward context has no attention metadata for this layer")
        return token_positions(meta.query_start_loc.to(device), meta.seq_lens.to(device), n)

    def _check_layout(self, kv_cache: torch.Tensor) -> None:
        if not self._layout_checked:
            check_cache_layout(kv_cache, self.num_kv_heads, self.fmt,
                               f"{self.kv_cache_dtype}, head_size {self.head_size}")
            self._layout_checked = True

    def _e8_write(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                  slot_mapping: torch.Tensor | None, layer: Any = None,
                  positions: torch.Tensor | None = None) -> None:
        """Encode key/value [T, H_kv, D] (centered) and scatter the codes by ``slot_mapping`` [T] (-1 skipped).

        ``positions`` [T] (the rows' positions in their sequences) are needed only with
        position-dependent key centers; by default they come from the forward context."""
        if kv_cache.numel() == 0 or slot_mapping is None:
            return
        self._check_layout(kv_cache)
        centers = self._e8_centers(layer, key.device)
        k_in, v_in = key, value
        if centers is not None:  # a ⊙ (k − μ_K − c(p)), b ⊙ (v − μ_V)
            key = key.float() - centers["k_mean"]
            if self._rotary or self._sink:
                n = key.shape[0]
                if positions is None:
                    positions = self._e8_write_positions(layer, n, key.device)
                positions = positions[:n]
                rows = None
                if self._rotary:
                    rows = self._e8_trig(key.device, lambda: int(positions.max().item()) + 1 if n else 1)[positions]
                mp = calibration.key_centers(centers, rows, positions)  # [T, H_kv, D]
                key = key - mp
                centers = dict(centers, k_pos=mp)
            value = value.float() - centers["v_mean"]
            if self._scaled:
                key, value = key * centers["k_scale"], value * centers["v_scale"]
            if self._k_mapped:  # k' = M (k − c), v' = N (v − μ_V) per head
                key = torch.einsum("thd,hed->the", key, centers["k_map"])
            if self._v_mapped:
                value = torch.einsum("thd,hed->the", value, centers["v_map"])
        self._e8_write_codes(key, value, kv_cache, slot_mapping)
        if self._e8_telemetry is not None:  # error against the model's own K/V (centers added back)
            self._e8_telemetry.after_write(k_in, v_in, kv_cache, slot_mapping, self.fmt, centers, id(self))

    # kernel hooks: the PyTorch reference here; the GPU impl overrides them with fused kernels
    def _e8_write_codes(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> None:
        """Encode key/value [T, H_kv, D] (already mapped) and scatter by ``slot_mapping``."""
        write_kv_cache(key, value, kv_cache, slot_mapping, self.fmt)

    def _e8_attend(self, q: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: Any, out: torch.Tensor,
                   key_bias: KeyBias | None = None) -> None:
        """Attention of q [n, H_q, D] over the packed cache into out [n, H_q, D], plus the logit
        terms of ``key_bias`` (position-dependent key centers)."""
        paged_attention(q, kv_cache, attn_metadata.query_start_loc, attn_metadata.seq_lens,
                        attn_metadata.block_table, self.fmt, num_kv_heads=self.num_kv_heads,
                        scale=self.scale, out=out, key_bias=key_bias)

    def _e8_forward(self, query: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: Any,
                    output: torch.Tensor, output_scale: Any = None, output_block_scale: Any = None,
                    layer: Any = None) -> torch.Tensor:
        """Attention over the packed cache into ``output`` [T, H_q, D] (rows < num_actual_tokens)."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("e8vllm: fused output quantization is not supported")
        if attn_metadata is None or kv_cache.numel() == 0:  # profiling / warm-up
            return output
        self._check_layout(kv_cache)
        n = attn_metadata.num_actual_tokens
        q = query[:n].view(n, self.num_heads, self.head_size)
        out = output[:n].view(n, self.num_heads, self.head_size)
        c = self._e8_centers(layer, query.device)
        key_bias = None
        if c is not None and (self._rotary or self._sink):  # + q·c(p_j) per key (before q is scaled)
            coef = table = first = None
            if self._rotary:
                table = self._e8_trig(query.device, lambda: int(attn_metadata.seq_lens.max().item()))
                coef = calibration.rope_bias_coeffs(q, c["q_rope"])
            if self._sink:
                first = (q.float() * c["q_sink"]).sum(-1)  # [n, H_q]
            key_bias = KeyBias(coef, table, first)
        if c is not None and self._scaled:  # q ⊘ a: the same logits up to a per-query shift
            q = (q.float() * c["q_inv"]).to(q.dtype)
        if c is not None and self._k_mapped:  # q' = q M⁻¹: q'·k' = q·(k − c)
            q = torch.einsum("thd,hde->the", q.float(), c["q_map"]).to(q.dtype)
        self._e8_attend(q, kv_cache, attn_metadata, out, key_bias)
        if c is not None:  # o ⊘ b + μ_V (or N⁻¹ o + μ_V), per KV head's group of query heads
            g = self.num_heads // self.num_kv_heads
            o = out.view(n, self.num_kv_heads, g, self.head_size)
            of = o.float() * c["v_inv"][None, :, None, :] if self._scaled else o.float()
            if self._v_mapped:
                of = torch.einsum("tgkd,ged->tgke", of, c["v_inv_map"])
            o.copy_(of + c["v_mean"][None, :, None, :])
        return output
