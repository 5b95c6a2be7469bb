"""The server's engine-free parts: config validation, error mapping, auth / body-cap / shutdown-gate
middleware (through FastAPI's ASGI app with no engine), request models, and the KV metric exposition."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from e8vllm import telemetry
from e8vllm.server.config import ServerConfig, parse_engine_arg
from e8vllm.server.errors import APIError, engine_error
from e8vllm.server.metrics import KVCollector, telemetry_summary
from e8vllm.server.protocol import ChatRequest, CompletionRequest


def test_config_validation() -> None:
    c = ServerConfig(api_keys=["a"], engine_args={"max_num_batched_tokens": 512})
    assert c.api_keys == ("a",) and c.engine_kwargs("/m")["max_num_batched_tokens"] == 512
    assert c.engine_kwargs("/m")["kv_cache_dtype"] == "e8_k4v4"
    for bad in ({"port": 0}, {"kv_cache_dtype": "e8_k9v9"}, {"api_keys": ("",)}, {"max_model_len": 0},
                {"gpu_memory_utilization": 1.5}, {"max_request_bytes": 10}, {"shutdown_timeout_s": -1},
                {"engine_args": {"model": "x"}}, {"max_logprobs": 50}):
        with pytest.raises(ValueError):
            ServerConfig(**bad)
    assert parse_engine_arg("max-num-seqs=8") == ("max_num_seqs", 8)
    assert parse_engine_arg("swap_space=abc") == ("swap_space", "abc")
    with pytest.raises(ValueError):
        parse_engine_arg("novalue")
    with pytest.raises(ValueError, match="int4_per_token_head"):  # packed stock formats: refused, not misreported
        ServerConfig(kv_cache_dtype="int4_per_token_head")
    assert ServerConfig(kv_cache_dtype="fp8").kv_cache_dtype == "fp8"
    env = ServerConfig.from_env({"E8VLLM_SERVE_KV_CACHE_DTYPE": "auto", "VLLM_API_KEY": "k1,k2",
                                 "E8VLLM_SERVE_ENGINE_ARGS": '{"max_num_seqs": 4}'})
    assert env.kv_cache_dtype == "auto" and env.api_keys == ("k1", "k2") and env.engine_args == {"max_num_seqs": 4}


def test_e8_on_cuda_selects_the_custom_backend_unless_one_is_named() -> None:
    """On CUDA vLLM serves e8 dtypes only from its CUSTOM slot and never picks it by itself."""
    kw = lambda **c: ServerConfig(**c).engine_kwargs("/m", cuda=True)  # noqa: E731
    assert kw()["attention_config"] == {"backend": "CUSTOM"}
    assert "attention_config" not in ServerConfig().engine_kwargs("/m")  # CPU: the CPU_ATTN override
    assert "attention_config" not in kw(kv_cache_dtype="auto")  # stock dtypes: vLLM's own choice
    # a config without a backend keeps its other fields; a named backend is the user's choice
    assert kw(engine_args={"attention_config": {"flash_attn_version": 2}})["attention_config"] == {
        "flash_attn_version": 2, "backend": "CUSTOM"}
    assert kw(engine_args={"attention_config": {"backend": "TRITON_ATTN"}})["attention_config"] == {
        "backend": "TRITON_ATTN"}
    named = kw(engine_args={"attention_backend": "FLASH_ATTN"})
    assert named["attention_backend"] == "FLASH_ATTN" and "attention_config" not in named


def test_engine_error_mapping() -> None:
    class VLLMClientError(Exception):
        pass

    class VLLMValidationError(VLLMClientError):
        pass

    class EngineDeadError(Exception):
        pass

    class EngineGenerateError(Exception):
        pass

    assert engine_error(ValueError("prompt too long")).status == 400
    assert engine_error(VLLMValidationError("n must be 1")).status == 400
    assert engine_error(EngineDeadError()).status == 503
    wrapped = EngineGenerateError()
    wrapped.__cause__ = ValueError("bad")
    assert engine_error(wrapped).status == 400
    assert engine_error(RuntimeError("boom")).status == 500
    e = APIError(404, "x", code="model_not_found")
    assert engine_error(e) is e and e.type == "not_found_error"


def test_request_models() -> None:
    CompletionRequest(model="m", prompt=[1, 2, 3])
    CompletionRequest(model="m", prompt=[[1], [2, 3]], stop="x")
    for bad in ({"prompt": []}, {"prompt": "x", "n": 0}, {"prompt": "x", "temperature": float("nan")},
                {"prompt": "x", "echo": True}, {"prompt": "x", "stream_options": {"include_usage": True}},
                {"prompt": "x", "stop": ""}, {"prompt": "x", "seed": -1}, {"prompt": "x", "max_tokens": True},
                {"prompt": "x", "logit_bias": {"5": 1.0}}, {"prompt": [-1]}):
        with pytest.raises(ValueError):
            CompletionRequest(model="m", **bad)
    r = ChatRequest(model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                        {"type": "text", "text": "b"}]}],
                    max_completion_tokens=3, max_tokens=9)
    assert r.messages[0].text() == "a\nb" and r.token_limit() == 3
    with pytest.raises(ValueError):
        ChatRequest(model="m", messages=[{"role": "user", "content": "a"}], top_logprobs=2)


def _app(**kw):
    from e8vllm.server.app import build_app

    return build_app(ServerConfig(**kw))


def _call(app, method: str, path: str, **kw) -> httpx.Response:
    async def go() -> httpx.Response:
        # no lifespan: the engine is never started, so /v1 routes that pass the middleware answer 503
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.request(method, path, **kw)

    return asyncio.run(go())


def test_middleware_without_engine() -> None:
    app = _app(api_keys=("secret",), max_request_bytes=2048)
    r = _call(app, "GET", "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert _call(app, "GET", "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    ok = {"Authorization": "Bearer secret"}
    r = _call(app, "GET", "/v1/models", headers=ok)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_not_ready"
    assert _call(app, "GET", "/health").status_code == 503  # open, but not ready
    assert _call(app, "GET", "/metrics").status_code == 200
    r = _call(app, "POST", "/v1/completions", headers=ok, content=b"x" * 4096)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = _call(app, "POST", "/v1/completions", headers={**ok, "content-type": "application/json"}, content=b"{")
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = _call(app, "POST", "/v1/completions", headers=ok, json={"model": "m", "prompt": "x", "temperature": 9})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    app.state.ctx.state.shutting_down = True
    r = _call(app, "POST", "/v1/completions", headers=ok, json={"model": "m", "prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    assert _call(app, "GET", "/health").json()["error"]["code"] == "shutting_down"
    no_auth = _app()
    assert _call(no_auth, "GET", "/v1/models").status_code == 503  # auth off: straight to the route


def _kv(**over) -> dict:
    kv = {"model": "m", "kv_cache_dtype": "e8_k4v4", "codec_key": "e8-4bit", "codec_value": "e8-3bit",
          "bits_key": 4.25, "bits_value": 3.25, "rotation": "hadamard(seed=0)", "kv_cache_bytes": 100,
          "model_dtype_bytes": 400, "bytes_saved": 300, "compression_ratio": 4.0, "head_size": 64,
          "capacity_tokens": {"e8": 1000, "model_dtype": 250}, "max_concurrency": {"e8": 1.0, "model_dtype": 0.25}}
    kv.update(over)
    return kv


def test_kv_collector_exposition() -> None:
    s = telemetry.TensorStats(2.0, 200.0, 5.0, 4.99, (0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 2.0, 0.0, 2.0, 0.0, 0.0))
    snap = telemetry.Snapshot({"key": s, "value": telemetry.TensorStats()}, [], 1)
    reg = CollectorRegistry()
    reg.register(KVCollector(lambda: _kv(), lambda: snap))
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(reg).decode())}
    samples = [x for f in fams.values() for x in f.samples]
    val = lambda name, **lab: next(x.value for x in samples  # noqa: E731
                                   if x.name == name and all(x.labels.get(k) == v for k, v in lab.items()))
    assert fams["e8kv_quant_squared_error"].type == "counter"
    assert val("e8kv_quant_squared_error_total", tensor="key") == 2.0
    assert val("e8kv_quant_sampled_vectors_total", tensor="key") == 5.0
    h = {x.labels["le"]: x.value for x in fams["e8kv_quant_cosine_similarity"].samples
         if x.name.endswith("_bucket") and x.labels["tensor"] == "key"}
    assert h["0.99"] == 1.0 and h["0.999"] == 3.0 and h["0.9999"] == 5.0 and h["+Inf"] == 5.0
    assert val("e8kv_kv_cache_capacity_tokens", cache="model_dtype") == 250
    assert val("e8kv_bits_per_value", tensor="value") == 3.25
    (info,) = fams["e8kv_config_info"].samples
    assert info.labels["codec_value"] == "e8-3bit" and info.value == 1.0
    summ = telemetry_summary(snap, 64)
    assert summ["key"]["snr_db"] == pytest.approx(20.0) and summ["key"]["mse_per_value"] == 2.0 / (5 * 64)
    assert summ["value"]["snr_db"] is None


def test_unfinished_count_on_vllm_026_and_032_engines() -> None:
    """AsyncLLM.get_num_unfinished_requests exists in 0.32 only; 0.26 has it on the output processor."""
    from types import SimpleNamespace

    from e8vllm.server.engine import EngineHandle, SchedulerCounts

    def handle(engine: object) -> EngineHandle:
        return EngineHandle(engine=engine, tokenizer=None, model_name="m", model_path="/m", max_model_len=8,
                            kv={}, counts=SchedulerCounts(), telemetry_dir=None)

    v026 = SimpleNamespace(output_processor=SimpleNamespace(get_num_unfinished_requests=lambda: 3))
    v032 = SimpleNamespace(get_num_unfinished_requests=lambda: 2, output_processor=None)
    assert handle(v026).unfinished() == 3 and handle(v032).unfinished() == 2


def test_sampling_params_greedy_threshold_and_vllm_validation() -> None:
    """vLLM treats temperature < 1e-5 as greedy (n > 1 then runs as n greedy copies); vLLM's own
    validation errors (VLLMValidationError in 0.32, not a ValueError) become OpenAI 400s."""
    from e8vllm.server.routes.common import sampling_params

    sp = sampling_params(CompletionRequest(model="m", prompt="x", temperature=1e-6, n=2), 4, None)
    assert sp.n == 1
    sp = sampling_params(CompletionRequest(model="m", prompt="x", temperature=0.5, n=2, seed=1), 4, None)
    assert sp.n == 2
    import vllm.sampling_params as vsp
    from vllm.exceptions import VLLMValidationError

    req = CompletionRequest(model="m", prompt="x", temperature=0.5)
    real = vsp.SamplingParams
    try:
        for exc, status in ((VLLMValidationError("bad value"), 400), (ValueError("bad"), 400)):
            def boom(*a: object, _e: Exception = exc, **k: object) -> None:
                raise _e
            vsp.SamplingParams = boom  # type: ignore[assignment]
            with pytest.raises(APIError) as ei:
                sampling_params(req, 4, None)
            assert ei.value.status == status
        vsp.SamplingParams = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bug"))  # type: ignore[assignment]
        with pytest.raises(RuntimeError):  # not the client's fault: not turned into a 400
            sampling_params(req, 4, None)
    finally:
        vsp.SamplingParams = real  # type: ignore[assignment]


def test_requests_take_null_as_default_and_a_missing_model_as_the_served_one() -> None:
    """vLLM's request models take null for every field; clients that send all fields depend on it."""
    r = ChatRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "n": None, "stream": None,
                                    "logprobs": None, "temperature": None, "model": None})
    assert (r.model, r.n, r.stream, r.logprobs, r.temperature) == (None, 1, False, False, None)
    c = CompletionRequest.model_validate({"prompt": "x", "echo": None, "stream": None, "ignore_eos": None,
                                          "stream_options": None})
    assert (c.model, c.echo, c.stream, c.ignore_eos) == (None, False, False, False)
    parts = ChatRequest.model_validate({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert parts.messages[0].text() == "a\nb"  # vLLM joins text parts with a newline
    from types import SimpleNamespace

    from e8vllm.server.routes.common import check_model

    served = SimpleNamespace(model_name="org/model")
    for ok in (None, "", "org/model"):
        check_model(served, ok)  # type: ignore[arg-type]
    with pytest.raises(APIError) as ei:
        check_model(served, "model")  # type: ignore[arg-type]
    assert ei.value.status == 404


@pytest.mark.parametrize("field,value", [
    ("guided_json", {"type": "object"}), ("guided_regex", "a+"), ("guided_choice", ["a", "b"]),
    ("structured_outputs", {"json": {}}), ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
    ("use_beam_search", True), ("prompt_logprobs", 1), ("truncate_prompt_tokens", 10),
    ("stream_options", {"include_usage": True, "continuous_usage_stats": True}),
    ("tool_choice", "required"), ("echo", True), ("priority", 1), ("return_token_ids", True),
    ("chat_template", "{{ messages }}"), ("functions", [{"name": "f"}]),
])
def test_vllm_fields_this_server_does_not_implement_get_400_not_silence(field: str, value: object) -> None:
    body = {"model": "m", "stream": True, field: value}
    chat_only = field in ("tool_choice", "chat_template", "functions")  # completions ignore them, as vLLM's do
    for model, extra in ((ChatRequest, {"messages": [{"role": "user", "content": "hi"}]}),
                         (CompletionRequest, {"prompt": "x"})):
        if model is CompletionRequest and chat_only:
            model.model_validate({**body, **extra})
            continue
        with pytest.raises(ValueError, match=field.split("_")[0]):
            model.model_validate({**body, **extra})
    # their defaults are fine
    ok = {"guided_json": None, "use_beam_search": False, "priority": 0, "tool_choice": "auto",
          "response_format": {"type": "text"}, "functions": [], "parallel_tool_calls": True}
    ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **ok})


def test_chat_template_controls_reach_the_template() -> None:
    """add_generation_prompt, continue_final_message and chat_template_kwargs (e.g. Qwen3's
    enable_thinking) go to the tokenizer's template as in vLLM; contradictions and keys that would
    override the server's own arguments get 400."""
    from e8vllm.server.routes.chat import chat_prompt

    seen = {}

    class Tok:
        chat_template = "t"

        def apply_chat_template(self, msgs, **kw):
            seen.update(kw, msgs=msgs)
            return "text"

        def encode(self, text, add_special_tokens=True):
            return [1, 2]

    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Once"}]
    assert chat_prompt(Tok(), ChatRequest(messages=msgs)) == [1, 2]
    assert seen["add_generation_prompt"] is True and seen["continue_final_message"] is False
    chat_prompt(Tok(), ChatRequest(messages=msgs, add_generation_prompt=False, continue_final_message=True,
                                   chat_template_kwargs={"enable_thinking": False}))
    assert (seen["add_generation_prompt"], seen["continue_final_message"], seen["enable_thinking"]) == (False, True, False)
    with pytest.raises(ValueError, match="cannot both be true"):
        ChatRequest(messages=msgs, continue_final_message=True)
    with pytest.raises(ValueError, match="tokenize"):
        ChatRequest(messages=msgs, chat_template_kwargs={"tokenize": True})


def test_sampling_params_vllm_extras_and_the_models_defaults() -> None:
    """stop_token_ids & co. reach vLLM; generation-config defaults fill what the request leaves unset."""
    from e8vllm.server.routes.common import sampling_params

    req = CompletionRequest(model="m", prompt="x", stop_token_ids=[5, 7], include_stop_str_in_output=True,
                            skip_special_tokens=False, spaces_between_special_tokens=False, bad_words=["zz"],
                            allowed_token_ids=[1, 2, 3], temperature=0.3)
    sp = sampling_params(req, 4, None, {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1})
    assert sp.stop_token_ids == [5, 7] and sp.include_stop_str_in_output and not sp.skip_special_tokens
    assert not sp.spaces_between_special_tokens and sp.bad_words == ["zz"] and sp.allowed_token_ids == [1, 2, 3]
    assert (sp.temperature, sp.top_p, sp.top_k, sp.repetition_penalty) == (0.3, 0.9, 20, 1.1)  # request first
    plain = sampling_params(CompletionRequest(model="m", prompt="x"), 4, None)
    assert (plain.temperature, plain.top_p, plain.top_k, plain.min_p, plain.repetition_penalty) == (1.0, 1.0, 0, 0.0, 1.0)
    # a greedy model default: n > 1 then runs as n greedy copies, as for a greedy request
    assert sampling_params(CompletionRequest(model="m", prompt="x", n=3), 4, None, {"temperature": 0.0}).n == 1


def test_tokenizing_runs_off_the_event_loop_one_call_at_a_time() -> None:
    """A long prompt's tokenization must not stall other streams; calls never overlap (a Rust
    tokenizer shared by two threads can fail with "Already borrowed")."""
    import threading
    import time as _time

    from e8vllm.server.engine import EngineHandle, SchedulerCounts

    h = EngineHandle(engine=None, tokenizer=None, model_name="m", model_path="/m", max_model_len=8, kv={},
                     counts=SchedulerCounts(), telemetry_dir=None)
    busy, overlaps, threads = [0], [0], set()

    h = EngineHandle(engine=None, tokenizer={"vocab": [1]}, model_name="m", model_path="/m", max_model_len=8,
                     kv={}, counts=SchedulerCounts(), telemetry_dir=None)
    toks = set()

    def slow(tok: dict, x: int) -> int:
        toks.add(id(tok))
        assert tok == {"vocab": [1]} and tok is not h.tokenizer  # a private copy
        busy[0] += 1
        overlaps[0] = max(overlaps[0], busy[0])
        threads.add(threading.current_thread().name)
        _time.sleep(0.05)
        busy[0] -= 1
        return x * 2

    async def main() -> tuple[list[int], int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        t = asyncio.create_task(ticker())
        out = await asyncio.gather(*(h.tokenize(slow, i) for i in range(4)))
        t.cancel()
        return out, ticks

    out, ticks = asyncio.run(main())
    assert out == [0, 2, 4, 6] and overlaps[0] == 1 and ticks >= 10  # the loop kept running meanwhile
    assert threads and all(n.startswith("e8vllm-tokenize") for n in threads) and len(toks) == 1
    h.stop_tokenizing()


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_kv_summary_counts_every_rank_and_stage(tp: int, pp: int) -> None:
    """vLLM's KV budget and block count are per rank (one pipeline stage's layers, one tensor-parallel
    rank's heads); the byte totals cover the whole engine. With `auto`, the model-dtype capacity in the
    same budget equals vLLM's own."""
    from types import SimpleNamespace

    import torch

    from e8vllm.server.engine import kv_summary

    layers, heads, head, block = 30, 4, 64, 16

    def cfg(dtype: str, blocks: int) -> SimpleNamespace:
        mc = SimpleNamespace(get_head_size=lambda: head, get_num_layers=lambda pc: layers // pp,
                             get_total_num_hidden_layers=lambda: layers, get_num_kv_heads=lambda pc: heads // tp,
                             dtype=torch.bfloat16, max_model_len=1024, model="/nonexistent")
        budget = blocks * block * (layers // pp) * (heads // tp) * 2 * head * 2
        cc = SimpleNamespace(cache_dtype=dtype, block_size=block, num_gpu_blocks=blocks,
                             kv_cache_memory_bytes=budget if dtype == "auto" else None)
        return SimpleNamespace(cache_config=cc, model_config=mc,
                               parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp))

    s = kv_summary(cfg("auto", 100), "m")
    assert s["capacity_tokens"] == {"e8": 1600, "model_dtype": 1600}
    assert s["kv_cache_bytes"] == 1600 * layers * heads * 2 * head * 2 and s["bytes_saved"] == 0
    e8 = kv_summary(cfg("e8_k4v4", 376), "m")  # 68 B per token-head instead of 256
    assert e8["kv_cache_bytes"] == 376 * block * layers * heads * 68
    assert e8["capacity_tokens"]["model_dtype"] == (376 * block * 68 // 256) // block * block
    assert e8["compression_ratio"] == pytest.approx(256 / 68)


def test_request_timer_skips_aborted_requests_and_first_chunks() -> None:
    """E2E latency only for requests whose choices all finished (not aborted, client not gone); no
    inter-token samples for a choice's first chunk (its tokens came together, and its wait is not a
    gap after another choice's token); TTFT from the request's arrival."""
    from types import SimpleNamespace

    from e8vllm.server.engine import Delta
    from e8vllm.server.routes.common import _Timer

    class H:
        def __init__(self) -> None:
            self.values: list[float] = []

        def observe(self, v: float) -> None:
            self.values.append(v)

        def inc(self, v: float = 1) -> None:
            self.values.append(v)

    def metrics() -> SimpleNamespace:
        return SimpleNamespace(ttft=H(), itl=H(), e2e=H(), prompt_tokens=H(), generation_tokens=H())

    def d(choice: int, k: int, finish: str | None = None) -> Delta:
        return Delta(choice=choice, prompt_index=0, text="", token_ids=[1] * k, logprobs=None,
                     finish_reason=finish, prompt_tokens=5)

    m = metrics()
    t = _Timer(m, 2, t0=time.monotonic() - 1.0)  # arrived a second ago (tokenizing, queueing)
    for delta in (d(0, 3), d(1, 1), d(0, 2), d(1, 1, "stop"), d(0, 1, "length")):
        t.on_delta(delta)
    t.done()
    assert len(m.ttft.values) == 1 and m.ttft.values[0] >= 1.0
    assert len(m.itl.values) == 2 + 1 + 1  # choice 0: 2 then 1 token after its first chunk; choice 1: 1
    assert len(m.e2e.values) == 1 and m.generation_tokens.values == [3, 1, 2, 1, 1]
    for finals in ([d(0, 1, "abort"), d(1, 1, "stop")], [d(0, 1, "stop")]):  # an abort; a choice never ended
        m = metrics()
        t = _Timer(m, 2)
        for delta in finals:
            t.on_delta(delta)
        t.done()
        assert m.e2e.values == [] and len(m.ttft.values) == 1
