"""Pure-ASGI middleware: API-key check, shutdown gate with in-flight counting, request-body cap.

* :class:`AuthMiddleware` (outermost): requests under ``/v1`` need ``Authorization: Bearer <key>``
  matching one of the configured keys (``secrets.compare_digest`` against every key, so the
  time does not depend on which key or how much of it matched); ``/health``, ``/metrics``,
  ``/version`` and CORS pre-flight ``OPTIONS`` stay open. 401 otherwise.
* :class:`GateMiddleware`: while the server shuts down, ``/v1`` requests get 503; counts the
  ``/v1`` requests in flight (the SIGTERM drain waits for this count to reach 0).
* :class:`BodyLimitMiddleware`: reads the body up front (``Content-Length`` checked first) and
  answers 413 past ``max_bytes``; the route then gets the buffered body, and later ``receive()``
  calls reach the server again (so disconnects are still seen).
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any, Awaitable, Callable

from .errors import error_bytes

__all__ = ["AuthMiddleware", "GateMiddleware", "BodyLimitMiddleware", "ServerState"]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ServerState:
    """Mutable process state shared by the middleware, the routes and the shutdown logic."""

    def __init__(self) -> None:
        self.shutting_down = False
        self.inflight = 0


async def _send_error(send: Send, status: int, message: str, code: str | None,
                      headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = error_bytes(status, message, code=code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _guarded(scope: Scope) -> bool:
    return scope["type"] == "http" and scope.get("path", "").startswith("/v1") and scope.get("method") != "OPTIONS"


class AuthMiddleware:
    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...]) -> None:
        self.app = app
        # compare SHA-256 digests: equal lengths, so compare_digest's time leaks nothing, not even the key length
        self.keys = [hashlib.sha256(k.encode()).digest() for k in api_keys]

    def _ok(self, scope: Scope) -> bool:
        auth = b""
        for k, v in scope.get("headers", ()):
            if k.lower() == b"authorization":
                auth = v
                break
        scheme, _, token = auth.partition(b" ")
        token = token.strip()
        ok = False
        digest = hashlib.sha256(token).digest()
        for key in self.keys:  # every key compared, constant time each
            ok |= secrets.compare_digest(digest, key)
        return ok and scheme.lower() == b"bearer"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.keys and _guarded(scope) and not self._ok(scope):
            await _send_error(send, 401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                              "invalid_api_key", [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)


class GateMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not _guarded(scope):
            await self.app(scope, receive, send)
            return
        if self.state.shutting_down:
            await _send_error(send, 503, "the server is shutting down", "shutting_down")
            return
        self.state.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.inflight -= 1


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        too_big = f"request body is larger than the limit of {self.max_bytes} bytes"
        for k, v in scope.get("headers", ()):
            if k.lower() == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    n = -1
                if n > self.max_bytes:
                    await _send_error(send, 413, too_big, "request_too_large")
                    return
        chunks: list[bytes] = []
        total = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            if msg["type"] != "http.request":  # pragma: no cover - not in the ASGI http spec
                continue
            body = msg.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                await _send_error(send, 413, too_big, "request_too_large")
                return
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
