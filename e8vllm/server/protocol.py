"""Request models of the OpenAI-compatible API (pydantic v2). Responses are plain dicts built by the
routes in OpenAI's shapes. Unknown fields are ignored (as OpenAI and vLLM do); fields of OpenAI's or
vLLM's API that this server does not implement (:data:`UNSUPPORTED`, ``logit_bias``, ``echo``, ...)
are rejected with 400 when set to anything but their default, never silently dropped. ``null`` means
the default for every field (as in vLLM), and a missing ``model`` means the served one."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator

__all__ = ["StreamOptions", "CompletionRequest", "ChatMessage", "ChatRequest", "SamplingFields", "UNSUPPORTED",
           "CHAT_UNSUPPORTED"]

MAX_N = 16
MAX_STOP = 8
SEED_MAX = 2**63 - 1


#: vLLM / OpenAI request fields this server does not implement, with the values that mean "not used"
#: (a request with any other value gets 400 naming the field): structured outputs, beam search,
#: prompt logprobs, prompt truncation, LoRA, priorities, token-id outputs
UNSUPPORTED: dict[str, tuple] = {
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "guided_decoding_backend": (None,), "guided_whitespace_pattern": (None,), "structural_tag": (None,),
    "structured_outputs": (None,), "use_beam_search": (None, False), "length_penalty": (None, 1, 1.0),
    "prompt_logprobs": (None,), "truncate_prompt_tokens": (None,), "lora_request": (None,),
    "priority": (None, 0), "logits_processors": (None, []),
    "return_tokens_as_token_ids": (None, False), "return_token_ids": (None, False),
}
#: the same for chat requests only (completions ignore chat fields, as vLLM's do): a request's own
#: template, documents, multimodal settings, function calling
CHAT_UNSUPPORTED: dict[str, tuple] = {
    "chat_template": (None,), "documents": (None, []), "mm_processor_kwargs": (None, {}),
    "parallel_tool_calls": (None, True, False), "functions": (None, []), "function_call": (None, "none", "auto"),
}
#: ``chat_template_kwargs`` keys that would override the server's own arguments to the template
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "tools", "documents", "chat_template", "add_generation_prompt", "continue_final_message",
    "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs"})


def _check_unsupported(data: object, table: dict[str, tuple]) -> None:
    if isinstance(data, dict):
        for name, unused in table.items():
            v = data.get(name)
            if not any(type(v) is type(u) and v == u for u in unused):
                raise ValueError(f"{name} is not supported by this server")


def _nulls_are_defaults(data: object) -> object:
    """``{"n": null}`` means ``n``'s default (vLLM's models take null for every field)."""
    if isinstance(data, dict):
        return {k: v for k, v in data.items() if v is not None}
    return data


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: object) -> object:
        return _nulls_are_defaults(data)

    @model_validator(mode="after")
    def _unsupported(self) -> "StreamOptions":
        if self.continuous_usage_stats:
            raise ValueError("stream_options.continuous_usage_stats is not supported")
        return self


Stop = Union[StrictStr, Annotated[list[StrictStr], Field(max_length=MAX_STOP)], None]


class SamplingFields(BaseModel):
    """Fields shared by completions and chat."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: Stop = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: StrictInt | None = Field(None, ge=0, le=SEED_MAX)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    user: StrictStr | None = None
    # vLLM extras (extra_body)
    top_k: StrictInt | None = Field(None, ge=-1, le=1 << 20)
    min_p: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, allow_inf_nan=False)
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = Field(0, ge=0, le=1 << 20)
    stop_token_ids: Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(max_length=256)] | None = None
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    spaces_between_special_tokens: StrictBool = True
    bad_words: Annotated[list[StrictStr], Field(max_length=256)] | None = None
    allowed_token_ids: Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)] | None = None
    # OpenAI fields we reject when used
    logit_bias: dict[str, float] | None = None
    response_format: dict | None = None

    @model_validator(mode="before")
    @classmethod
    def _before(cls, data: object) -> object:
        data = _nulls_are_defaults(data)
        _check_unsupported(data, UNSUPPORTED)
        return data

    @field_validator("stop")
    @classmethod
    def _stop_nonempty(cls, v: Stop) -> Stop:
        items = [v] if isinstance(v, str) else (v or [])
        if any(s == "" for s in items):
            raise ValueError("stop strings must not be empty")
        return v

    @model_validator(mode="after")
    def _checks(self) -> "SamplingFields":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("response_format other than text (structured outputs) is not supported")
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


PromptIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``. ``prompt``: a string, a list of strings, a list of token ids, or a
    list of token-id lists (one choice block of ``n`` per prompt)."""

    prompt: Union[StrictStr, Annotated[list[StrictStr], Field(min_length=1, max_length=64)], PromptIds,
                  Annotated[list[PromptIds], Field(min_length=1, max_length=64)]]
    max_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> "CompletionRequest":
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (it must be unset or equal to n)")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, Annotated[list[TextPart], Field(max_length=256)], None] = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)  # vLLM's separator for text parts


class ChatRequest(SamplingFields):
    """``POST /v1/chat/completions`` (text only; the prompt is the tokenizer's chat template)."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    tools: list | None = None
    tool_choice: object | None = None
    echo: StrictBool = False
    # vLLM's chat-template controls
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template_kwargs: dict[StrictStr, object] | None = None

    @model_validator(mode="before")
    @classmethod
    def _chat_before(cls, data: object) -> object:
        _check_unsupported(data, CHAT_UNSUPPORTED)  # null counts as unused: every table allows None
        return data

    @model_validator(mode="after")
    def _unsupported(self) -> "ChatRequest":
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        bad = RESERVED_TEMPLATE_KWARGS & set(self.chat_template_kwargs or {})
        if bad:
            raise ValueError(f"chat_template_kwargs must not set {', '.join(sorted(bad))}")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        if self.tools:
            raise ValueError("tools are not supported")
        if self.tool_choice not in (None, "none", "auto"):
            raise ValueError("tool_choice is not supported (no tools)")
        if self.echo:
            raise ValueError("echo is not supported")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
