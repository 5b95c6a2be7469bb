"""Real KV-cache data: SmolLM2's per-layer K (after RoPE) and V on real English text.

The codec benchmarks need the vectors a KV cache actually holds.  :func:`dump_kv` runs
SmolLM2-135M-Instruct (``transformers``, float32, CPU) over real text and saves, for every
layer ``i``, the cached keys and values as float32 tensors ``layer{i}.k`` and ``layer{i}.v``
of shape ``[num_tokens, num_kv_heads, head_dim]`` in one safetensors file.

* K is taken **after** the rotary embedding, which is what vLLM (and the Hugging Face
  ``DynamicCache``) stores; it is read from ``past_key_values`` of a ``use_cache=True``
  forward pass, so there is no re-implementation of the model involved.
* The token stream is cut into chunks of ``chunk`` tokens; each chunk is an independent
  sequence starting at position 0 (so positions in the file are ``index % chunk``).

Text
----
Debian ships the full text of the common free-software licenses in
``/usr/share/common-licenses`` (:func:`default_text_files`): long, plain, real English.
:func:`split_texts` splits them into two disjoint sets:

* ``kv``: every file except the ones below: the source of the KV dumps (codec tuning and
  SNR benchmarks).  About 30k tokens.
* ``perplexity``: the files whose names start with ``GPL-3`` or ``LGPL`` (GPL-3, LGPL-2,
  LGPL-2.1, LGPL-3): held out for the perplexity evaluation, so that codecs are never
  scored on text whose KV vectors they were tuned on.  About 20k tokens.

Caveat: license texts repeat each other (LGPL-2 and LGPL-2.1 are near-identical, GFDL-1.2
and GFDL-1.3 too, GPL-2 shares phrases with the LGPLs).  The split is by file, so no file
is in both sets, but some sentences appear (with small changes) on both sides.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

logger = logging.getLogger(__name__)

LICENSES_DIR = Path("/usr/share/common-licenses")
"""Debian's directory of common license texts."""

PERPLEXITY_PREFIXES: tuple[str, ...] = ("GPL-3", "LGPL")
"""Files whose names start with one of these are held out for perplexity."""

TEXT_SEPARATOR = "\n\n"
"""What goes between two text files when they are concatenated."""

KV_FORMAT_VERSION = "1"


class TextSplit(NamedTuple):
    """Two disjoint lists of text files."""

    kv: list[Path]
    """For KV extraction (codec benchmarks)."""
    perplexity: list[Path]
    """Held out for perplexity evaluation."""


def default_text_files(directory: Path = LICENSES_DIR) -> list[Path]:
    """All license texts in ``directory``, sorted by name, symlinks (aliases such as
    ``GPL -> GPL-3``) skipped, as are exact duplicates of an earlier file.

    Raises:
        FileNotFoundError: the directory is missing or holds no regular file.
    """
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} not found (it ships with Debian's base-files package)")
    files: list[Path] = []
    seen: set[bytes] = set()
    for path in sorted(directory.iterdir(), key=lambda p: p.name):
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if data in seen:
            continue
        seen.add(data)
        files.append(path)
    if not files:
        raise FileNotFoundError(f"no text files in {directory}")
    return files


def split_texts(files: Sequence[Path] | None = None) -> TextSplit:
    """Split ``files`` (default :func:`default_text_files`) into KV and perplexity sets.

    Files whose names start with ``GPL-3`` or ``LGPL`` go to ``perplexity``, all others to
    ``kv``.  Both lists are sorted and disjoint.

    Raises:
        ValueError: one of the two sets comes out empty.
    """
    files = sorted(files if files is not None else default_text_files(), key=lambda p: p.name)
    ppl = [f for f in files if f.name.startswith(PERPLEXITY_PREFIXES)]
    kv = [f for f in files if not f.name.startswith(PERPLEXITY_PREFIXES)]
    if not kv or not ppl:
        raise ValueError(f"text split is degenerate: {len(kv)} KV files, {len(ppl)} perplexity files")
    return TextSplit(kv=kv, perplexity=ppl)


def read_texts(files: Sequence[Path]) -> str:
    """The files' contents (UTF-8, undecodable bytes replaced), stripped and joined by
    :data:`TEXT_SEPARATOR`."""
    return TEXT_SEPARATOR.join(Path(f).read_text(encoding="utf-8", errors="replace").strip() for f in files)


def resolve_text_files(text_path: Path | None) -> list[Path]:
    """The text files to read: the KV split when ``text_path`` is None, the file itself,
    or the sorted regular files of a directory."""
    if text_path is None:
        return split_texts().kv
    text_path = Path(text_path)
    if text_path.is_dir():
        files = sorted((p for p in text_path.iterdir() if p.is_file()), key=lambda p: p.name)
        if not files:
            raise FileNotFoundError(f"no files in {text_path}")
        return files
    if not text_path.is_file():
        raise FileNotFoundError(f"text file {text_path} not found")
    return [text_path]


def text_token_ids(tokenizer: Any, files: Sequence[Path], num_tokens: int | None = None) -> torch.Tensor:
    """Token ids (int64, 1-D) of the concatenated ``files``, no special tokens added,
    truncated to ``num_tokens``.

    Raises:
        ValueError: the text is shorter than ``num_tokens`` tokens.
    """
    # verbose=False: no "longer than the maximum sequence length" warning (chunks are short).
    ids = tokenizer(read_texts(files), add_special_tokens=False, verbose=False)["input_ids"]
    if num_tokens is not None:
        if len(ids) < num_tokens:
            names = ", ".join(Path(f).name for f in files)
            raise ValueError(f"the text ({names}) has only {len(ids)} tokens, {num_tokens} were asked for")
        ids = ids[:num_tokens]
    return torch.tensor(ids, dtype=torch.long)


def _cache_layer(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of one layer of a transformers cache, each [batch, heads, seq, dim]."""
    if hasattr(cache, "layers"):  # transformers >= 4.56 DynamicCache
        entry = cache.layers[layer]
        return entry.keys, entry.values
    if hasattr(cache, "key_cache"):  # older DynamicCache
        return cache.key_cache[layer], cache.value_cache[layer]
    k, v = cache[layer][:2]  # legacy tuple of tuples
    return k, v


def load_model(model_dir: Path | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) from ``model_dir`` (default :func:`e8vllm.models.prepare_model`),
    float32, eval mode, CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from e8vllm.models import prepare_model

    model_dir = Path(model_dir) if model_dir is not None else prepare_model()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    return model, tokenizer


@torch.inference_mode()
def compute_kv(model: Any, token_ids: torch.Tensor, chunk: int = 1024) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (K after RoPE, V), each float32 ``[len(token_ids), kv_heads, head_dim]``.

    ``token_ids`` is cut into pieces of ``chunk`` tokens (the last may be shorter), each run
    as an independent sequence from position 0.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    n_layers = model.config.num_hidden_layers
    ks: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    vs: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    starts = list(range(0, len(token_ids), chunk))
    columns = (TextColumn("[bold]KV[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    from rich.console import Console

    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task(f"{len(token_ids)} tokens", total=len(starts))
        for s in starts:
            piece = token_ids[s : s + chunk].unsqueeze(0)
            # logits_to_keep=1: the LM head over every position is a fifth of the work, unused.
            out = model(input_ids=piece, use_cache=True, logits_to_keep=1)
            for i in range(n_layers):
                k, v = _cache_layer(out.past_key_values, i)
                # [1, heads, seq, dim] -> [seq, heads, dim]
                ks[i].append(k[0].transpose(0, 1).to(torch.float32).contiguous())
                vs[i].append(v[0].transpose(0, 1).to(torch.float32).contiguous())
            del out
            progress.advance(task)
    return [(torch.cat(k), torch.cat(v)) for k, v in zip(ks, vs)]


def dump_kv(
    out: Path,
    num_tokens: int = 4096,
    text_path: Path | None = None,
    model_dir: Path | None = None,
    chunk: int = 1024,
) -> Path:
    """Run SmolLM2 on real text and save per-layer K (after RoPE) and V.

    Args:
        out: output ``.safetensors`` file (parent directories are created).
        num_tokens: number of text tokens (the first ``num_tokens`` of the text).
        text_path: a text file or a directory of them; default: the ``kv`` set of
            :func:`split_texts`.
        model_dir: model directory; default :func:`e8vllm.models.prepare_model`.
        chunk: tokens per independent sequence (each starts at position 0).

    Returns:
        ``out``.  Tensors ``layer{i}.k`` / ``layer{i}.v``: float32
        ``[num_tokens, num_kv_heads, head_dim]``; metadata (all strings): ``model``,
        ``text_files`` (JSON list), ``num_tokens``, ``chunk``, ``num_layers``,
        ``num_kv_heads``, ``head_dim``, ``rope_theta``, ``k_after_rope``, ...
    """
    from safetensors.torch import save_file

    from e8vllm.models import DEFAULT_MODEL_NAME

    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    t0 = time.perf_counter()
    out = Path(out)
    files = resolve_text_files(text_path)
    model, tokenizer = load_model(model_dir)
    ids = text_token_ids(tokenizer, files, num_tokens)
    t1 = time.perf_counter()
    kv = compute_kv(model, ids, chunk=chunk)
    t_run = time.perf_counter() - t1

    cfg = model.config
    tensors: dict[str, torch.Tensor] = {}
    for i, (k, v) in enumerate(kv):
        tensors[f"layer{i}.k"] = k
        tensors[f"layer{i}.v"] = v
    rope_params = getattr(cfg, "rope_parameters", None) or {}
    rope_theta = rope_params.get("rope_theta", getattr(cfg, "rope_theta", None))
    metadata = {
        "format": "pt",
        "e8vllm_kv_format": KV_FORMAT_VERSION,
        "model": DEFAULT_MODEL_NAME,
        "text_files": json.dumps([str(f) for f in files]),
        "num_tokens": str(num_tokens),
        "chunk": str(chunk),
        "num_layers": str(cfg.num_hidden_layers),
        "num_kv_heads": str(cfg.num_key_value_heads),
        "head_dim": str(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads),
        "rope_theta": str(rope_theta),
        "k_after_rope": "true",
        "positions": "index % chunk (each chunk is an independent sequence from position 0)",
        "dtype": "float32",
        "layout": "[num_tokens, num_kv_heads, head_dim]",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp_name, metadata=metadata)
        os.replace(tmp_name, out)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    os.chmod(out, 0o644)
    dt = time.perf_counter() - t0
    msg = f"KV of {num_tokens} tokens x {cfg.num_hidden_layers} layers -> {out} ({t_run:.1f} s model, {dt:.1f} s total)"
    logger.info(msg)
    from rich.console import Console

    Console(stderr=True).print(msg)
    return out


# --------------------------------------------------------------------------- readers


def load_kv(path: Path | str) -> dict[str, torch.Tensor]:
    """All tensors of a :func:`dump_kv` file (``layer{i}.k`` / ``layer{i}.v``)."""
    from safetensors.torch import load_file

    return load_file(str(path))


def kv_metadata(path: Path | str) -> dict[str, str]:
    """The string metadata of a :func:`dump_kv` file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def num_layers(kv: Mapping[str, torch.Tensor]) -> int:
    """Number of layers in a loaded KV dict."""
    return sum(1 for name in kv if name.startswith("layer") and name.endswith(".k"))


def kv_vectors(
    path: Path | str | Mapping[str, torch.Tensor],
    which: Literal["k", "v"] = "k",
    layers: Sequence[int] | None = None,
) -> torch.Tensor:
    """Head vectors of a :func:`dump_kv` file as one float32 ``[N, head_dim]`` matrix.

    Args:
        path: the file, or the dict :func:`load_kv` returned.
        which: ``"k"`` (keys, after RoPE) or ``"v"``.
        layers: layer indices (default all); rows are ordered layer, token, head.

    Returns:
        ``N = len(layers) * num_tokens * num_kv_heads`` rows.
    """
    if which not in ("k", "v"):
        raise ValueError(f"which must be 'k' or 'v', got {which!r}")
    kv = load_kv(path) if isinstance(path, (str, Path)) else path
    if layers is None:
        layers = range(num_layers(kv))
    parts = []
    for i in layers:
        name = f"layer{i}.{which}"
        if name not in kv:
            raise KeyError(f"{name} not in the KV file (layers 0..{num_layers(kv) - 1})")
        t = kv[name]
        parts.append(t.reshape(-1, t.shape[-1]))
    if not parts:
        raise ValueError("no layers selected")
    return torch.cat(parts).to(torch.float32)
