"""The vLLM side of the server: start ``AsyncLLM`` with our plugin, describe its KV cache, run requests.

* :func:`start_engine` sets the environment the engine processes inherit (``VLLM_PLUGINS=e8vllm``
  unless set, ``VLLM_CPU_KVCACHE_SPACE``, the telemetry directory and sampling rate of
  :mod:`e8vllm.telemetry`) and builds ``AsyncLLM.from_engine_args`` with a stat logger that
  keeps the scheduler's running / waiting counts.
* :func:`kv_summary` computes the KV numbers from what vLLM decided (``cache_config.num_gpu_blocks``
  x ``block_size`` tokens) and the slot sizes: the E8 slot from the plugin's format, the model
  dtype's ``2 * head_size * itemsize``.
* :class:`Generation` fans one HTTP request out to engine requests (one per prompt, each with
  ``n`` samples) and yields their deltas in arrival order; closing it aborts whatever still runs.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, TypeVar

from . import config as _config

__all__ = ["EngineHandle", "SchedulerCounts", "start_engine", "kv_summary", "Generation", "Delta"]

log = logging.getLogger("e8vllm.server")
T = TypeVar("T")

#: CPU KV-cache budget (GiB) when neither --kv-cache-space-gib nor VLLM_CPU_KVCACHE_SPACE is given
DEFAULT_CPU_KV_GIB = 1


@dataclass
class SchedulerCounts:
    """The latest scheduler stats vLLM reported (summed over engines)."""

    running: dict[int, int] = field(default_factory=dict)
    waiting: dict[int, int] = field(default_factory=dict)

    @property
    def num_running(self) -> int:
        return sum(self.running.values())

    @property
    def num_waiting(self) -> int:
        return sum(self.waiting.values())


def _stat_logger_factory(counts: SchedulerCounts) -> Any:
    from vllm.v1.metrics.loggers import StatLoggerBase

    class E8SchedulerStatLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                counts.running[engine_idx] = int(scheduler_stats.num_running_reqs)
                counts.waiting[engine_idx] = int(scheduler_stats.num_waiting_reqs) + int(
                    getattr(scheduler_stats, "num_skipped_waiting_reqs", 0) or 0)

        def log_engine_initialized(self) -> None:
            pass

    return E8SchedulerStatLogger


@dataclass
class EngineHandle:
    """A started engine and what the routes need from it."""

    engine: Any
    tokenizer: Any
    model_name: str
    model_path: str
    max_model_len: int
    kv: dict[str, Any]
    counts: SchedulerCounts
    telemetry_dir: Path | None
    vocab_size: int = 0
    #: the model's sampling defaults (``generation_config.json``: temperature, top_p, top_k, min_p,
    #: penalties, max_tokens), as vLLM's ``ModelConfig.get_diff_sampling_param`` reads them; a
    #: request's own values win, OpenAI's defaults fill the rest (vLLM's order)
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    _tok_pool: ThreadPoolExecutor | None = field(default=None, repr=False)
    _tok_copy: Any = field(default=None, repr=False)

    async def tokenize(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(tokenizer, *args)`` (tokenizing, chat templating) off the event loop, one call at a
        time, on a private deep copy of the tokenizer: a long prompt must not stall every other
        stream, and a Rust tokenizer used by two threads at once (here and vLLM's own detokenizer
        and ``bad_words`` encoding on the event loop) can fail with "Already borrowed" (vLLM keeps a
        pool of copies for the same reason)."""
        if self._tok_pool is None:
            self._tok_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="e8vllm-tokenize")
            try:
                self._tok_copy = copy.deepcopy(self.tokenizer)
            except Exception as e:  # noqa: BLE001 - an uncopyable tokenizer: shared, still one call at a time
                log.warning("the tokenizer cannot be copied (%r): the tokenizing thread shares it", e)
                self._tok_copy = self.tokenizer
        return await asyncio.get_running_loop().run_in_executor(
            self._tok_pool, functools.partial(fn, self._tok_copy, *args))

    def stop_tokenizing(self) -> None:
        """Shut the tokenizing thread down (server shutdown); queued calls are cancelled."""
        if self._tok_pool is not None:
            self._tok_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def dead(self) -> bool:
        try:
            return bool(self.engine.errored)
        except Exception:  # noqa: BLE001 - a broken engine object is a dead engine
            return True

    def unfinished(self) -> int:
        """Requests the front end still tracks (0 = nothing left running in the engine).

        ``AsyncLLM.get_num_unfinished_requests`` exists in vLLM 0.32 but not in 0.26, where the
        output processor (present in both) has it."""
        fn = getattr(self.engine, "get_num_unfinished_requests", None)
        if fn is None:
            fn = self.engine.output_processor.get_num_unfinished_requests
        return int(fn())


def start_engine(cfg: "_config.ServerConfig", telemetry_dir: Path | None) -> EngineHandle:
    """Start AsyncLLM (blocking, ~40 s on CPU for SmolLM2). Call inside the running event loop."""
    os.environ.setdefault("VLLM_PLUGINS", "e8vllm")
    if cfg.kv_cache_space_gib is not None:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{cfg.kv_cache_space_gib:g}"
    elif "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        from vllm.platforms import current_platform

        if current_platform.is_cpu():  # vLLM's CPU default takes most of the RAM; 1 GiB = 175k E8 tokens
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(DEFAULT_CPU_KV_GIB)
    from e8vllm import telemetry

    if telemetry_dir is not None and cfg.telemetry_sample_every > 0 and cfg.kv_cache_dtype.startswith("e8_"):
        os.environ[telemetry.DIR_ENV] = str(telemetry_dir)
        os.environ[telemetry.SAMPLE_EVERY_ENV] = str(cfg.telemetry_sample_every)
        os.environ[telemetry.MAX_TOKENS_ENV] = str(cfg.telemetry_max_tokens)
    else:
        telemetry_dir = None
        os.environ.pop(telemetry.DIR_ENV, None)

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    if cfg.model is None:
        from e8vllm.models import prepare_model

        model_path = str(prepare_model())
    else:
        model_path = cfg.model
    counts = SchedulerCounts()
    # vLLM's default served name is --model as given; the embedded default model has none: its directory's name
    name = cfg.served_model_name or cfg.model or Path(model_path.rstrip("/")).name or model_path
    from vllm.platforms import current_platform

    kwargs = cfg.engine_kwargs(model_path, cuda=bool(getattr(current_platform, "is_cuda", lambda: False)()))
    kwargs["served_model_name"] = [name]  # vLLM's metrics label model_name = the name clients use
    args = AsyncEngineArgs(**kwargs)
    engine = AsyncLLM.from_engine_args(args, usage_context=UsageContext.OPENAI_API_SERVER,
                                       stat_loggers=[_stat_logger_factory(counts)])
    vc = engine.vllm_config
    running = vc.cache_config.cache_dtype
    if running != cfg.kv_cache_dtype:  # never serve another dtype than the one asked for
        engine.shutdown()
        raise RuntimeError(f"engine runs kv_cache_dtype {running!r}, asked for {cfg.kv_cache_dtype!r}")
    tok = engine.get_tokenizer()
    try:
        defaults = dict(vc.model_config.get_diff_sampling_param())
    except Exception as e:  # noqa: BLE001 - an unreadable generation config: vLLM's neutral defaults
        log.warning("the model's generation config could not be read (%r): OpenAI's sampling defaults apply", e)
        defaults = {}
    if defaults:
        log.info("sampling defaults from the model's generation config: %s", defaults)
    return EngineHandle(engine=engine, tokenizer=tok, model_name=name, model_path=model_path,
                        max_model_len=int(vc.model_config.max_model_len), kv=kv_summary(vc, name),
                        counts=counts, telemetry_dir=telemetry_dir,
                        vocab_size=int(vc.model_config.get_vocab_size()), sampling_defaults=defaults)


def kv_summary(vllm_config: Any, model_name: str) -> dict[str, Any]:
    """KV-cache sizes, capacities and formats of a started engine (JSON-able).

    Bytes count every layer and KV head of the whole engine (all tensor-parallel ranks)."""
    import torch

    cc, mc, pc = vllm_config.cache_config, vllm_config.model_config, vllm_config.parallel_config
    dtype = cc.cache_dtype
    head = int(mc.get_head_size())
    # per rank: this pipeline stage's layers, this tensor-parallel rank's KV heads (vLLM's budget and
    # block count are per rank); the engine's totals: every layer, every rank's heads (replicas too)
    stage_layers = int(mc.get_num_layers(pc))
    total_layers = int(getattr(mc, "get_total_num_hidden_layers", lambda: stage_layers)())
    rank_heads = int(mc.get_num_kv_heads(pc))
    kv_heads = rank_heads * int(pc.tensor_parallel_size)
    block = int(cc.block_size)
    blocks = int(cc.num_gpu_blocks or 0)
    tokens = blocks * block
    model_dtype = mc.dtype
    isz = torch.empty((), dtype=model_dtype).element_size()
    model_slot = 2 * head * isz
    if dtype.startswith("e8_"):
        from e8vllm.vllm_plugin.spec import kv_format

        fmt = kv_format(dtype, head)
        k_bytes, v_bytes = fmt.k_bytes, fmt.v_bytes
        codec_k = getattr(fmt.k_codec, "name", type(fmt.k_codec).__name__)
        codec_v = getattr(fmt.v_codec, "name", type(fmt.v_codec).__name__)
        rot = fmt.k_rotation
        rotation = "none" if rot is None else f"hadamard(seed={getattr(rot, 'seed', '?')})"
        quantized = True
        from e8vllm.calibration import describe, find_calibration

        # the engine processes resolve the same file (same env, same model path): e8vllm.calibration
        calibration = describe(find_calibration(mc.model))
    else:
        from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

        tdt = model_dtype if dtype == "auto" else STR_DTYPE_TO_TORCH_DTYPE[dtype]
        esz = torch.empty((), dtype=tdt).element_size()
        k_bytes = v_bytes = head * esz
        codec_k = codec_v = str(tdt).replace("torch.", "")
        rotation = "none"
        quantized = dtype != "auto"
        calibration = {"kv_centering": False, "calibration_file": None}
    slot = k_bytes + v_bytes
    per_token = total_layers * kv_heads * slot
    per_token_model = total_layers * kv_heads * model_slot
    kv_bytes = tokens * per_token
    model_bytes = tokens * per_token_model
    # the model dtype's capacity in the same memory: vLLM's KV budget per rank when it has one (CPU:
    # VLLM_CPU_KVCACHE_SPACE, or --kv-cache-memory-bytes), else the bytes each rank's cache was given
    rank_per_token_model = stage_layers * rank_heads * model_slot
    budget = int(getattr(cc, "kv_cache_memory_bytes", None) or tokens * stage_layers * rank_heads * slot)
    model_capacity = (budget // rank_per_token_model) // block * block if rank_per_token_model else 0
    mml = int(mc.max_model_len)
    return {
        "model": model_name, "kv_cache_dtype": dtype, "model_dtype": str(model_dtype).replace("torch.", ""),
        "quantized": quantized, "codec_key": codec_k, "codec_value": codec_v,
        "bits_key": k_bytes * 8 / head, "bits_value": v_bytes * 8 / head, "rotation": rotation,
        "kv_calibration": calibration,
        "head_size": head, "num_layers": total_layers, "num_kv_heads": kv_heads, "block_size": block,
        "num_blocks": blocks, "slot_bytes": slot, "model_dtype_slot_bytes": model_slot,
        "kv_cache_bytes": kv_bytes, "model_dtype_bytes": model_bytes, "bytes_saved": model_bytes - kv_bytes,
        "compression_ratio": (model_bytes / kv_bytes) if kv_bytes else 1.0,
        "capacity_tokens": {"e8": tokens, "model_dtype": model_capacity},
        "max_model_len": mml,
        "max_concurrency": {"e8": tokens / mml, "model_dtype": model_capacity / mml},
        "vllm_kv_cache_size_tokens": getattr(cc, "kv_cache_size_tokens", None),
    }


@dataclass
class Delta:
    """New output of one choice: ``choice`` = prompt_index * n + sample index."""

    choice: int
    prompt_index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Any]] | None
    finish_reason: str | None
    prompt_tokens: int


class Generation:
    """Run ``prompts`` (token-id lists) with ``params`` (n samples each); iterate the deltas.

    Engine failures surface as exceptions from the iteration. :meth:`close` (also on
    cancellation) aborts every engine request still running."""

    def __init__(self, handle: EngineHandle, prompts: list[list[int]], params: Any, active: set[str],
                 n: int | None = None) -> None:
        """``n``: choices per prompt. When it is larger than ``params.n`` (vLLM refuses n > 1 with
        greedy sampling), each prompt is submitted ``n // params.n`` times."""
        self.handle, self.prompts, self.params = handle, prompts, params
        self.n = int(params.n) if n is None else int(n)
        copies = self.n // int(params.n)
        if copies * int(params.n) != self.n:
            raise ValueError(f"n={self.n} is not a multiple of the engine's n={params.n}")
        # one engine request per (prompt, copy): (prompt index, first choice index)
        self.entries = [(i, i * self.n + c * int(params.n)) for i in range(len(prompts)) for c in range(copies)]
        base = uuid.uuid4().hex
        self.request_ids = [f"e8-{base}-{k}" for k in range(len(self.entries))]
        self._q: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._active = active
        self._open = len(self.entries)

    async def _pump(self, k: int) -> None:
        rid = self.request_ids[k]
        i = self.entries[k][0]
        try:
            gen = self.handle.engine.generate({"prompt_token_ids": self.prompts[i]}, self.params, rid)
            async for out in gen:
                await self._q.put((k, out))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await self._q.put((k, e))
        finally:
            self._q.put_nowait((k, None))

    def start(self) -> None:
        self._active.update(self.request_ids)
        self._tasks = [asyncio.create_task(self._pump(k)) for k in range(len(self.entries))]

    async def __aiter__(self) -> AsyncIterator[Delta]:
        while self._open:
            k, item = await self._q.get()
            if item is None:
                self._open -= 1
                self._active.discard(self.request_ids[k])
                continue
            if isinstance(item, BaseException):
                raise item
            i, first_choice = self.entries[k]
            for o in item.outputs:
                yield Delta(choice=first_choice + int(o.index), prompt_index=i, text=o.text,
                            token_ids=list(o.token_ids), logprobs=list(o.logprobs) if o.logprobs else None,
                            finish_reason=o.finish_reason, prompt_tokens=len(self.prompts[i]))

    @property
    def running(self) -> list[str]:
        """Engine request ids of this generation that have not finished."""
        return [r for r in self.request_ids if r in self._active]

    async def close(self) -> None:
        for t in self._tasks:
            if not t.done():
                t.cancel()
        live = self.running
        if live:
            try:
                await self.handle.engine.abort(live)
            except Exception:  # noqa: BLE001 - engine gone: nothing left to abort
                pass
        self._active.difference_update(self.request_ids)
        for t in self._tasks:
            try:
                await t
            except BaseException:  # noqa: BLE001 - cancelled / failed pumps
                pass
