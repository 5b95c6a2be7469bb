"""Fuzzing the real server with hypothesis: request bodies built from the API's own fields with
values of the right and of wrong types, out-of-range numbers, odd unicode, and raw garbage bodies.

Every response must be a 2xx or 4xx (never 5xx), errors must carry OpenAI's envelope, streams must
end with ``data: [DONE]``, and the server must stay healthy. ``E8VLLM_FUZZ_EXAMPLES`` (default 60)
bounds the run; generated requests ask for at most 3 new tokens (or an invalid amount)."""

from __future__ import annotations

import json
import os

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import MODEL

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

EXAMPLES = int(os.environ.get("E8VLLM_FUZZ_EXAMPLES", "60"))

junk = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=20), st.lists(st.integers(-5, 5), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                                 st.integers(), max_size=2))
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


nonempty = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)

# valid values of every field the server reads
GOOD = {
    "model": st.just(MODEL),
    "max_tokens": st.integers(1, 3),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.05, 1),
    "n": st.integers(1, 3),
    "stop": st.one_of(nonempty, st.lists(nonempty, max_size=3)),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "seed": st.integers(0, 2**63 - 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "top_k": st.integers(-1, 50),
    "min_p": st.floats(0, 1),
    "repetition_penalty": st.floats(0.5, 2),
    "ignore_eos": st.booleans(),
    "user": text,
}
COMPLETION = {**GOOD, "prompt": st.one_of(nonempty, st.lists(nonempty, min_size=1, max_size=2),
                                          st.lists(st.integers(0, 49151), min_size=1, max_size=8)),
              "logprobs": st.integers(0, 5)}
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                 "content": st.one_of(text, st.lists(st.fixed_dictionaries(
                                     {"type": st.just("text"), "text": text}), max_size=2))})
CHAT = {**GOOD, "messages": st.lists(message, min_size=1, max_size=3), "logprobs": st.booleans(),
        "top_logprobs": st.integers(0, 5), "max_completion_tokens": st.integers(1, 3)}
# invalid values: out of range, wrong types, odd structures (never a missing/None max_tokens:
# chat's default is the rest of the context, far too slow for a fuzz run)
BAD = {
    "max_tokens": st.one_of(st.integers(-3, 0), st.integers(10**6, 10**12), junk.filter(lambda v: v is not None)),
    "max_completion_tokens": st.one_of(st.integers(-3, 0), st.integers(10**6, 10**12),
                                       junk.filter(lambda v: v is not None)),
    "temperature": st.one_of(st.floats(2.0001, 1e9), st.floats(-1e9, -0.0001), junk),
    "top_p": st.one_of(st.floats(1.0001, 10), st.floats(-10, 0), junk),
    "n": st.one_of(st.integers(-5, 0), st.integers(17, 10**9), junk),
    "seed": st.one_of(st.integers(-2**70, -1), st.integers(2**63, 2**70), junk),
    "logprobs": st.one_of(st.integers(21, 10**6), st.integers(-5, -1), junk),
    "top_logprobs": st.one_of(st.integers(21, 10**6), junk),
    "prompt": st.one_of(st.just(""), st.lists(st.integers(-10, 10**7), max_size=4), st.just([[]]), junk),
    "messages": st.one_of(st.just([]), st.lists(st.fixed_dictionaries({"role": text, "content": junk}),
                                                min_size=1, max_size=2), junk),
    "stop": st.one_of(st.just(""), st.lists(st.just(""), min_size=1, max_size=2), st.lists(text, min_size=9), junk),
}


@st.composite
def bodies(draw: st.DrawFn, good: dict, required: tuple[str, ...]) -> dict:
    """A valid body with 0-2 fields replaced by invalid values (and now and then a required one gone)."""
    b = {k: draw(v) for k, v in good.items() if k in required or draw(st.integers(0, 3)) == 0}
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2]))):
        k = draw(st.sampled_from(sorted(good)))
        b[k] = draw(BAD.get(k, junk))
    if draw(st.integers(0, 11)) == 0:
        b.pop(draw(st.sampled_from([r for r in required if r != "max_tokens"])), None)
    if draw(st.integers(0, 11)) == 0:
        b[draw(text)] = draw(junk)  # unknown field: ignored
    return b


def _check(r: httpx.Response, raw: str) -> None:
    assert r.status_code < 500, (r.status_code, raw[:300])
    if r.status_code >= 400:
        e = r.json()["error"]
        assert set(e) == {"message", "type", "param", "code"}
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
        assert '"error"' not in raw, raw[:300]
    else:
        assert r.json()["choices"]


def _post(server, path: str, content: bytes) -> int:
    h = {**server.headers, "content-type": "application/json"}
    with httpx.stream("POST", server.url + path, content=content, headers=h, timeout=120) as r:
        raw = r.read().decode("utf-8", "replace")
    _check(r, raw)
    return r.status_code


SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def test_fuzz_completions(e8_server) -> None:
    seen: list[int] = []

    @SETTINGS
    @given(bodies(COMPLETION, ("model", "prompt", "max_tokens")))
    def run(b: dict) -> None:
        seen.append(_post(e8_server, "/v1/completions", json.dumps(b, allow_nan=True).encode()))

    run()
    assert e8_server.health()["status"] == "ok"
    print(f"\ncompletions fuzz: {sorted((s, seen.count(s)) for s in set(seen))}")
    assert seen.count(200) >= 3 and seen.count(400) >= 3  # both valid and invalid requests were exercised


def test_fuzz_chat(e8_server) -> None:
    seen: list[int] = []

    @SETTINGS
    @given(bodies(CHAT, ("model", "messages", "max_tokens")))
    def run(b: dict) -> None:
        seen.append(_post(e8_server, "/v1/chat/completions", json.dumps(b, allow_nan=True).encode()))

    run()
    assert e8_server.health()["status"] == "ok"
    print(f"\nchat fuzz: {sorted((s, seen.count(s)) for s in set(seen))}")
    assert seen.count(200) >= 3 and seen.count(400) >= 3


def test_fuzz_raw_bodies(e8_server) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None)
    @given(st.one_of(st.binary(max_size=200), st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                                                            lambda c: st.lists(c) | st.dictionaries(st.text(), c),
                                                            max_leaves=20).map(lambda v: json.dumps(v).encode())),
           st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    def run(raw: bytes, path: str) -> None:
        _post(e8_server, path, raw)

    run()
    assert e8_server.health()["status"] == "ok"
