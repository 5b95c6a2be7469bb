"""Bounded load on the real e8_k4v4 server: ``E8VLLM_LOAD_CLIENTS`` (32) concurrent streaming clients
for ``E8VLLM_LOAD_SECONDS`` (60 s); every third client disconnects after its second event.

Asserted: no 5xx and no transport errors, every completed stream ends with ``data: [DONE]``, after
the run the engine has no request left (front end and scheduler), /health is 200, and a fresh
request is served. Reported (``-s``): requests, throughput, p50/p99 time to first token."""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import time

import httpx
import pytest

from .conftest import MODEL

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

CLIENTS = int(os.environ.get("E8VLLM_LOAD_CLIENTS", "32"))
SECONDS = float(os.environ.get("E8VLLM_LOAD_SECONDS", "60"))
PROMPTS = ["Tell me about the ocean.", "Write a haiku about autumn.", "What is 17 times 3?",
           "List three programming languages.", "Describe a cat in one sentence.", "Why is the sky blue?"]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


async def _client(i: int, url: str, headers: dict, stop_at: float, stats: dict) -> None:
    rng = random.Random(i)
    disconnect = i % 3 == 0
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), headers=headers) as c:
        while time.monotonic() < stop_at:
            body = {"model": MODEL, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                    "max_tokens": rng.randint(8, 32), "temperature": 0.7, "stream": True,
                    "stream_options": {"include_usage": True}}
            t0 = time.monotonic()
            try:
                async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
                    stats["status"][r.status_code] = stats["status"].get(r.status_code, 0) + 1
                    if r.status_code != 200:
                        await r.aread()
                        stats["bad_bodies"].append(r.text[:300])
                        continue
                    events, first, done = 0, None, False
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            done = True
                            break
                        obj = json.loads(line[6:])
                        if "error" in obj:
                            stats["stream_errors"].append(obj)
                        if first is None and obj.get("choices"):
                            first = time.monotonic() - t0
                            stats["ttft"].append(first)
                        if obj.get("usage") and not obj.get("choices"):
                            stats["tokens"] += obj["usage"]["completion_tokens"]
                        events += 1
                        if disconnect and events >= 2:
                            break
                    if disconnect and not done:
                        stats["disconnected"] += 1
                    elif done:
                        stats["completed"] += 1
                    else:
                        stats["truncated"] += 1
            except httpx.HTTPError as e:
                stats["transport_errors"].append(repr(e))


def test_concurrent_streams_with_disconnects(e8_server) -> None:
    stats: dict = {"status": {}, "ttft": [], "tokens": 0, "completed": 0, "disconnected": 0, "truncated": 0,
                   "stream_errors": [], "transport_errors": [], "bad_bodies": []}
    t0 = time.monotonic()

    async def main() -> None:
        stop_at = time.monotonic() + SECONDS
        await asyncio.gather(*(_client(i, e8_server.url, e8_server.headers, stop_at, stats) for i in range(CLIENTS)))

    asyncio.run(main())
    wall = time.monotonic() - t0
    report = {"clients": CLIENTS, "seconds": round(wall, 1), "requests": sum(stats["status"].values()),
              "completed": stats["completed"], "disconnected": stats["disconnected"],
              "status": stats["status"], "completed_tokens": stats["tokens"],
              "req_per_s": round(stats["completed"] / wall, 3), "tok_per_s": round(stats["tokens"] / wall, 2),
              "ttft_p50_s": round(_pct(stats["ttft"], 0.5), 3), "ttft_p99_s": round(_pct(stats["ttft"], 0.99), 3),
              "ttft_mean_s": round(statistics.fmean(stats["ttft"]), 3) if stats["ttft"] else None}
    print("\nload test:", json.dumps(report))
    assert not stats["transport_errors"], stats["transport_errors"][:3]
    assert not any(s >= 500 for s in stats["status"]), (stats["status"], stats["bad_bodies"][:3])
    assert set(stats["status"]) == {200}, (stats["status"], stats["bad_bodies"][:3])
    assert not stats["stream_errors"], stats["stream_errors"][:3]
    assert stats["truncated"] == 0
    assert stats["completed"] >= CLIENTS // 2 and stats["disconnected"] >= CLIENTS // 3
    # nothing left running: the front end's table and vLLM's scheduler both drain to 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        h = e8_server.health()
        if h["engine_unfinished_requests"] == 0 and h["scheduler_running"] == 0 and h["scheduler_waiting"] == 0 \
                and h["requests_in_flight"] == 0:
            break
        time.sleep(0.5)
    assert h["status"] == "ok"
    assert (h["engine_unfinished_requests"], h["scheduler_running"], h["scheduler_waiting"],
            h["requests_in_flight"]) == (0, 0, 0, 0), h
    r = e8_server.client().completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2
