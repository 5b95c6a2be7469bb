"""``POST /v1/chat/completions``: the prompt is the tokenizer's own chat template."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from ..errors import APIError
from ..protocol import ChatRequest
from . import common

router = APIRouter()


def _choice(i: int, text: str, lp: Any, finish: str | None, first: bool) -> dict:
    delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
    return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}


def _final(i: int, text: str, lp: Any, finish: str | None) -> dict:
    return {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
            "finish_reason": finish}


def chat_prompt(tok: Any, body: ChatRequest) -> list[int]:
    """Token ids of the conversation through ``tok``'s chat template (``add_generation_prompt`` /
    ``continue_final_message`` / ``chat_template_kwargs`` as the request says, vLLM's defaults
    otherwise); 400 if it cannot render."""
    if not getattr(tok, "chat_template", None):
        raise APIError(400, "the model's tokenizer has no chat template; use /v1/completions", code="no_chat_template")
    msgs = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        text = tok.apply_chat_template(msgs, add_generation_prompt=body.add_generation_prompt,
                                       continue_final_message=body.continue_final_message, tokenize=False,
                                       **(body.chat_template_kwargs or {}))
    except Exception as e:  # noqa: BLE001 - a template that rejects the conversation (jinja raise_exception)
        raise APIError(400, f"the chat template rejected the messages: {e}", param="messages",
                       code="invalid_value") from e
    return list(tok.encode(text, add_special_tokens=False))


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request) -> Any:
    t0 = time.monotonic()
    ctx = common.context(request)
    handle = ctx.ready()
    common.check_model(handle, body.model)
    ids = await handle.tokenize(chat_prompt, body)
    max_tokens = common.prompt_budget(handle, len(ids), body.token_limit(), handle.sampling_defaults.get("max_tokens"))
    k = (body.top_logprobs or 0) if body.logprobs else None
    fmt = common.Formatter("chat.completion", "chat.completion.chunk", _choice, _final,
                           common.chat_logprobs(k or 0), common.merge_chat_logprobs)
    params = common.sampling_params(body, max_tokens, k, handle.sampling_defaults)
    return await common.run(request, ctx, handle, body, [ids], params, fmt, k, t0)
