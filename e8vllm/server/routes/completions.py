"""``POST /v1/completions``: text (or token-id) prompts, OpenAI's ``text_completion`` objects."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from ..protocol import CompletionRequest
from . import common

router = APIRouter()

#: OpenAI's default max_tokens for completions
DEFAULT_MAX_TOKENS = 16


def _choice(i: int, text: str, lp: Any, finish: str | None, first: bool) -> dict:
    return {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}


def _final(i: int, text: str, lp: Any, finish: str | None) -> dict:
    return {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}


FORMAT = common.Formatter("text_completion", "text_completion", _choice, _final, common.completion_logprobs,
                          common.merge_completion_logprobs)


def _prompts(tok: Any, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        return [tok.encode(prompt)]
    if prompt and isinstance(prompt[0], str):
        return [tok.encode(p) for p in prompt]
    if prompt and isinstance(prompt[0], int):
        return [list(prompt)]
    return [list(p) for p in prompt]


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    t0 = time.monotonic()
    ctx = common.context(request)
    handle = ctx.ready()
    common.check_model(handle, body.model)
    prompts = await handle.tokenize(_prompts, body.prompt)
    budgets = []
    for p in prompts:
        common.check_token_ids(handle, p)
        budgets.append(common.prompt_budget(handle, len(p), body.max_tokens, DEFAULT_MAX_TOKENS))
    params = common.sampling_params(body, min(budgets), body.logprobs, handle.sampling_defaults)
    return await common.run(request, ctx, handle, body, prompts, params, FORMAT, body.logprobs, t0)
