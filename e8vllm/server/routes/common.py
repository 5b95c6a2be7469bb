"""What completions and chat share: the app context, checks, sampling parameters, logprobs, request
metrics, disconnect handling, and the streamed (SSE) / collected response loop.

A request is validated completely (model, prompt length, sampling parameters) before it reaches
the engine; a streamed response is only started once the first output has arrived, so errors the
engine raises while admitting the request still get a proper status code. Later errors end the
stream with an error event and ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..auth import ServerState
from ..config import ServerConfig
from ..engine import Delta, EngineHandle, Generation
from ..errors import APIError, engine_error
from ..metrics import ServerMetrics
from ..protocol import SamplingFields

log = logging.getLogger("e8vllm.server")

__all__ = ["AppContext", "context", "check_model", "sampling_params", "prompt_budget", "run", "Formatter",
           "MAX_CHOICES"]

#: prompts x n per request
MAX_CHOICES = 64
_NEG = -9999.0  # JSON has no -inf: what vLLM reports for impossible tokens


@dataclass
class AppContext:
    """Everything the routes share (``app.state.ctx``)."""

    config: ServerConfig
    state: ServerState
    metrics: ServerMetrics | None = None
    handle: EngineHandle | None = None
    telemetry_dir: Path | None = None
    active: set[str] = field(default_factory=set)

    def ready(self) -> EngineHandle:
        if self.state.shutting_down:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if self.handle is None:
            raise APIError(503, "the engine is not started", code="engine_not_ready")
        if self.handle.dead:
            raise APIError(503, "the inference engine is dead; the server must be restarted", code="engine_dead")
        return self.handle


def context(request: Request) -> AppContext:
    return request.app.state.ctx


def check_model(handle: EngineHandle, model: str | None) -> None:
    """404 unless ``model`` is the served name (a request without ``model``, or with ``""``, means
    that one, as in vLLM)."""
    if model and model != handle.model_name:
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{handle.model_name}'",
                       param="model", code="model_not_found")


def prompt_budget(handle: EngineHandle, prompt_len: int, requested: int | None, default: int | None) -> int:
    """max_tokens for a prompt of ``prompt_len`` tokens; 400 when it does not fit the context."""
    room = handle.max_model_len - prompt_len
    if prompt_len == 0:
        raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {handle.max_model_len} tokens, but the "
                       f"prompt has {prompt_len} tokens (no room for a completion).", param="prompt",
                       code="context_length_exceeded")
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise APIError(400, f"This model's maximum context length is {handle.max_model_len} tokens. However, "
                       f"you requested {prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} "
                       f"for the completion). Please reduce the prompt or max_tokens.", param="max_tokens",
                       code="context_length_exceeded")
    return requested


def check_token_ids(handle: EngineHandle, ids: list[int]) -> None:
    vocab = handle.vocab_size
    if vocab and any(t >= vocab for t in ids):
        raise APIError(400, f"token id out of range (vocabulary size {vocab})", param="prompt", code="invalid_value")


_GREEDY_EPS = 1e-5
"""vLLM's ``_SAMPLING_EPS``: below it a temperature means greedy sampling."""


#: the sampling fields a model's generation config may default, and OpenAI's / vLLM's neutral values
_NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
            "presence_penalty": 0.0, "frequency_penalty": 0.0}


def sampling_params(req: SamplingFields, max_tokens: int, logprobs: int | None,
                    defaults: dict[str, Any] | None = None) -> Any:
    """vLLM SamplingParams (DELTA outputs); its own validation errors become 400.

    ``defaults``: the model's generation-config defaults (:attr:`EngineHandle.sampling_defaults`);
    per field the request's value wins, then the model's, then the neutral one (vLLM's order)."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    defaults = defaults or {}
    value = {n: (getattr(req, n) if getattr(req, n) is not None else defaults.get(n, neutral))
             for n, neutral in _NEUTRAL.items()}
    # vLLM treats temperature < 1e-5 as greedy (and then refuses n > 1): the same threshold here
    greedy = value["temperature"] < _GREEDY_EPS
    # vLLM refuses n > 1 with greedy sampling; Generation submits n copies with n=1 instead
    kw: dict[str, Any] = {"n": 1 if greedy else req.n, "max_tokens": max_tokens, "stop": req.stop_list() or None,
                          "seed": req.seed, "logprobs": logprobs, "ignore_eos": req.ignore_eos,
                          "output_kind": RequestOutputKind.DELTA, **value,
                          "stop_token_ids": req.stop_token_ids,
                          "include_stop_str_in_output": req.include_stop_str_in_output,
                          "skip_special_tokens": req.skip_special_tokens,
                          "spaces_between_special_tokens": req.spaces_between_special_tokens}
    if req.bad_words:
        kw["bad_words"] = req.bad_words
    if req.allowed_token_ids:
        kw["allowed_token_ids"] = req.allowed_token_ids
    if req.min_tokens:
        if req.min_tokens > max_tokens:
            raise APIError(400, "min_tokens must not exceed max_tokens", param="min_tokens", code="invalid_value")
        kw["min_tokens"] = req.min_tokens
    try:
        return SamplingParams(**kw)
    except Exception as e:  # noqa: BLE001 - ValueError/TypeError, and vLLM 0.32's VLLMValidationError
        err = engine_error(e)  # the request's fault -> 4xx; anything else stays an internal error
        if err.status < 500:
            raise err from e
        raise


def _lp(v: float) -> float:
    return _NEG if (v is None or math.isnan(v) or math.isinf(v)) else float(v)


def token_text(handle: EngineHandle, tid: int, lp: Any) -> str:
    t = getattr(lp, "decoded_token", None)
    return t if t is not None else handle.tokenizer.decode([tid])


@dataclass
class Formatter:
    """How one endpoint shapes its objects (completions: text + logprobs lists; chat: delta messages)."""

    object_name: str
    chunk_object: str
    choice: Callable[[int, str, Any, str | None, bool], dict]          # streamed choice
    final_choice: Callable[[int, str, Any, str | None], dict]           # collected choice
    logprobs: Callable[[EngineHandle, Delta, int], Any]                 # delta -> logprobs object (or None)
    merge_logprobs: Callable[[Any, Any], Any]                           # accumulate for the collected response


class _Timer:
    """Request metrics: TTFT (the request's first token), ITL (per token, within each choice), E2E,
    token counters. ``t0``: when the request arrived (before tokenizing)."""

    def __init__(self, metrics: ServerMetrics | None, n_choices: int, t0: float | None = None) -> None:
        self.m = metrics
        self.t0 = time.monotonic() if t0 is None else t0
        self.first: float | None = None
        self.last: dict[int, float] = {}
        self.finish: dict[int, str] = {}
        self.n_choices = n_choices
        self.seen_prompt: set[int] = set()

    def on_delta(self, d: Delta) -> None:
        if d.finish_reason is not None:
            self.finish[d.choice] = d.finish_reason
        if self.m is None:
            return
        now = time.monotonic()
        if d.prompt_index not in self.seen_prompt:
            self.seen_prompt.add(d.prompt_index)
            self.m.prompt_tokens.inc(d.prompt_tokens)
        k = len(d.token_ids)
        if k == 0:
            return
        self.m.generation_tokens.inc(k)
        if self.first is None:
            self.first = now
            self.m.ttft.observe(now - self.t0)
        prev = self.last.get(d.choice)
        if prev is not None:  # a choice's first chunk has no gap of its own (its tokens came together)
            for _ in range(k):
                self.m.itl.observe((now - prev) / k)
        self.last[d.choice] = now

    def done(self) -> None:
        """E2E latency of a request whose choices all finished (not aborted, no client gone)."""
        complete = len(self.finish) == self.n_choices and "abort" not in self.finish.values()
        if self.m is not None and self.first is not None and complete:
            self.m.e2e.observe(time.monotonic() - self.t0)


async def _watch_disconnect(request: Request, gen: Generation) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            running = gen.running
            if running:
                log.info("client disconnected: aborting %s", ", ".join(running))
            await gen.close()
            return


def _json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


async def run(request: Request, ctx: AppContext, handle: EngineHandle, req: SamplingFields,
              prompts: list[list[int]], params: Any, fmt: Formatter, logprobs_k: int | None,
              t0: float | None = None) -> Any:
    """Run the request; a JSON response or an SSE stream. ``t0``: the request's arrival
    (``time.monotonic()``), for the latency metrics."""
    if len(prompts) * req.n > MAX_CHOICES:
        raise APIError(400, f"too many choices: prompts x n = {len(prompts) * req.n} > {MAX_CHOICES}",
                       param="n", code="invalid_value")
    rid = f"{'cmpl' if fmt.object_name == 'text_completion' else 'chatcmpl'}-{time.time_ns():x}"
    created = int(time.time())
    timer = _Timer(ctx.metrics, len(prompts) * req.n, t0)
    gen = Generation(handle, prompts, params, ctx.active, n=req.n)
    gen.start()
    watcher = asyncio.create_task(_watch_disconnect(request, gen))
    it = gen.__aiter__()
    n_choices = len(prompts) * req.n
    prompt_tokens = sum(len(p) for p in prompts)
    try:
        first = await it.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException as e:
        watcher.cancel()
        await gen.close()
        if isinstance(e, asyncio.CancelledError):
            raise
        raise engine_error(e) from e

    async def deltas() -> AsyncIterator[Delta]:
        if first is not None:
            yield first
            async for d in it:
                yield d

    if not req.stream:
        texts = [""] * n_choices
        lps: list[Any] = [None] * n_choices
        finish: list[str | None] = [None] * n_choices
        completion_tokens = 0
        try:
            async for d in deltas():
                timer.on_delta(d)
                texts[d.choice] += d.text
                completion_tokens += len(d.token_ids)
                if logprobs_k is not None:
                    lps[d.choice] = fmt.merge_logprobs(lps[d.choice], fmt.logprobs(handle, d, len(texts[d.choice])
                                                                                   - len(d.text)))
                if d.finish_reason is not None:
                    finish[d.choice] = d.finish_reason
        except Exception as e:  # noqa: BLE001
            raise engine_error(e) from e
        finally:
            watcher.cancel()
            await gen.close()
        timer.done()
        body = {"id": rid, "object": fmt.object_name, "created": created, "model": handle.model_name,
                "choices": [fmt.final_choice(i, texts[i], lps[i], finish[i] or "abort") for i in range(n_choices)],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}
        return JSONResponse(body)

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def sse() -> AsyncIterator[str]:
        started = [False] * n_choices
        offsets = [0] * n_choices
        completion_tokens = 0
        try:
            async for d in deltas():
                timer.on_delta(d)
                completion_tokens += len(d.token_ids)
                lp = fmt.logprobs(handle, d, offsets[d.choice]) if logprobs_k is not None else None
                offsets[d.choice] += len(d.text)
                if not d.text and not d.token_ids and d.finish_reason is None and started[d.choice]:
                    continue
                chunk = {"id": rid, "object": fmt.chunk_object, "created": created, "model": handle.model_name,
                         "choices": [fmt.choice(d.choice, d.text, lp, d.finish_reason, not started[d.choice])]}
                if include_usage:
                    chunk["usage"] = None
                started[d.choice] = True
                yield f"data: {_json(chunk)}\n\n"
            timer.done()
            if include_usage:
                usage = {"id": rid, "object": fmt.chunk_object, "created": created, "model": handle.model_name,
                         "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                  "completion_tokens": completion_tokens,
                                                  "total_tokens": prompt_tokens + completion_tokens}}
                yield f"data: {_json(usage)}\n\n"
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - reported in-band, the status line is already sent
            err = engine_error(e)
            yield f"data: {_json({'error': {'message': err.message, 'type': err.type, 'param': err.param, 'code': err.code}})}\n\n"
        finally:
            watcher.cancel()
            await gen.close()
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def completion_logprobs(handle: EngineHandle, d: Delta, offset: int) -> dict | None:
    """OpenAI completions logprobs of a delta: tokens, token_logprobs, top_logprobs, text_offset."""
    if not d.logprobs:
        return None
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    pos = offset
    for tid, lps in zip(d.token_ids, d.logprobs):
        me = lps.get(tid)
        tok = token_text(handle, tid, me)
        out["tokens"].append(tok)
        out["token_logprobs"].append(_lp(me.logprob) if me is not None else _NEG)
        out["top_logprobs"].append({token_text(handle, t, lp): _lp(lp.logprob) for t, lp in lps.items()})
        out["text_offset"].append(pos)
        pos += len(tok)
    return out


def merge_completion_logprobs(acc: dict | None, new: dict | None) -> dict | None:
    if new is None:
        return acc
    if acc is None:
        return new
    for k in acc:
        acc[k].extend(new[k])
    return acc


def chat_logprobs(k: int) -> Callable[[EngineHandle, Delta, int], dict | None]:
    def fn(handle: EngineHandle, d: Delta, offset: int) -> dict | None:
        if not d.logprobs:
            return None
        content = []
        for tid, lps in zip(d.token_ids, d.logprobs):
            me = lps.get(tid)
            tok = token_text(handle, tid, me)
            tops = sorted(((t, lp) for t, lp in lps.items() if getattr(lp, "rank", 1) is not None),
                          key=lambda x: (x[1].rank if x[1].rank is not None else 1 << 30))[:k]
            content.append({"token": tok, "logprob": _lp(me.logprob) if me is not None else _NEG,
                            "bytes": list(tok.encode("utf-8")),
                            "top_logprobs": [{"token": token_text(handle, t, lp), "logprob": _lp(lp.logprob),
                                              "bytes": list(token_text(handle, t, lp).encode("utf-8"))}
                                             for t, lp in tops]})
        return {"content": content}
    return fn


def merge_chat_logprobs(acc: dict | None, new: dict | None) -> dict | None:
    if new is None:
        return acc
    if acc is None:
        return new
    acc["content"].extend(new["content"])
    return acc
