"""A client that goes away aborts its engine request (streamed and not streamed).

Each request asks for 900 tokens with ``ignore_eos``: far more than the ~5 s the test waits (the
CPU E8 path decodes ~10-20 tokens/s for one sequence), so ``engine_unfinished_requests`` on
``/health`` only returns to 0 in time if the server aborted the request when the client left.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from .conftest import MODEL

BODY = {"model": MODEL, "prompt": "Write a very long story about a lighthouse keeper.", "max_tokens": 900,
        "ignore_eos": True, "temperature": 0.0}


def _unfinished(url: str) -> int:
    return int(httpx.get(url + "/health", timeout=10).json()["engine_unfinished_requests"])


def _wait_idle(url: str, within_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < within_s:
        if _unfinished(url) == 0:
            return time.monotonic() - t0
        time.sleep(0.1)
    pytest.fail(f"engine still has {_unfinished(url)} unfinished request(s) {within_s} s after the client left")


def _stream_then_leave(server) -> tuple[bool, str]:
    """Stream BODY, leave after the first text. (late client, why) when the request was no longer
    running as the client left, else (False, ""). A late client: the rest of the stream is the whole
    request, finished normally (``length`` after every token), so the server did nothing wrong."""
    _wait_idle(server.url, 30)
    t0 = time.monotonic()
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", server.url + "/v1/completions", headers=server.headers,
                      json={**BODY, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # keep the iterator referenced: closing it closes the connection
            events = []
            for line in lines:
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
                    if events[-1]["choices"] and events[-1]["choices"][0]["text"]:
                        break
            assert events[-1]["choices"][0]["finish_reason"] is None, events
            t_text = time.monotonic() - t0
            h = httpx.get(server.url + "/health", timeout=10).json()
            if h["engine_unfinished_requests"] != 1:  # not running now: read what the server sent
                err = None
                try:
                    events += [json.loads(x[6:]) for x in lines if x.startswith("data: ") and x != "data: [DONE]"]
                except httpx.HTTPError as e:
                    err = repr(e)
                fin = [e["choices"][0]["finish_reason"] for e in events
                       if e.get("choices") and e["choices"][0]["finish_reason"]]
                n_tokens = sum(1 for e in events if e.get("choices") and e["choices"][0]["text"] is not None)
                late = err is None and fin == ["length"] and n_tokens >= BODY["max_tokens"]
                return late, (f"{h}: first text after {t_text:.1f} s, then the stream had {len(events)} events, "
                              f"finish {fin}, read error {err}\n{server.log_tail(30)}")
            del lines
        # leaving the block closes the connection after one event
    _wait_idle(server.url, 5.0)
    return False, ""


def test_streaming_disconnect_aborts(e8_server) -> None:
    late, why = _stream_then_leave(e8_server)
    if late:  # the whole request ran before this client read (a loaded machine): once more
        late, why = _stream_then_leave(e8_server)
    assert not why, why


def test_non_streaming_disconnect_aborts(e8_server) -> None:
    _wait_idle(e8_server.url, 30)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(e8_server.url + "/v1/completions", headers=e8_server.headers, json=BODY, timeout=3.0)
    _wait_idle(e8_server.url, 5.0)
