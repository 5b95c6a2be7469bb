"""OpenAI's error envelope and the exception handlers that produce it.

Every error response is ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status:

=====  ==========================  =============================================================
 400   ``invalid_request_error``   bad JSON, bad or unsupported parameters (FastAPI's 422 is mapped
                                   to 400), prompt + max_tokens longer than the context
 401   ``authentication_error``    missing or wrong API key
 404   ``not_found_error``         unknown ``model`` or path
 405   ``invalid_request_error``   wrong HTTP method
 413   ``invalid_request_error``   request body over ``--max-request-bytes`` (code ``request_too_large``)
 503   ``service_unavailable``     shutting down, or the engine is dead
 500   ``server_error``            anything else (a bug: tests assert it never happens)
=====  ==========================  =============================================================
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["APIError", "error_body", "error_response", "install_handlers", "engine_error"]

log = logging.getLogger("e8vllm.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error to return to the client as ``status`` with the envelope."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None,
               type: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type or _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, **kw: Any) -> JSONResponse:
    return JSONResponse(error_body(status, message, **kw), status_code=status)


def error_bytes(status: int, message: str, **kw: Any) -> bytes:
    return json.dumps(error_body(status, message, **kw)).encode()


def engine_error(exc: BaseException) -> APIError:
    """Map an exception from vLLM (or our own checks) to an APIError: ValueError/TypeError (bad
    parameters, prompt too long) -> 400, engine dead -> 503, anything else -> 500."""
    if isinstance(exc, APIError):
        return exc
    cause: BaseException | None = exc
    seen = 0
    while cause is not None and seen < 5:
        name = type(cause).__name__
        mro = {c.__name__ for c in type(cause).__mro__}
        if name == "EngineDeadError":
            return APIError(503, "the inference engine is dead; the server must be restarted",
                            code="engine_dead")
        if "GracefulHTTPError" in mro:  # vLLM's own status (queue full: 429/503)
            status = int(getattr(cause, "http_status", 503))
            return APIError(status, str(cause) or name, code=None)
        if "VLLMNotFoundError" in mro:
            return APIError(404, str(cause) or name, code="not_found")
        if "VLLMClientError" in mro:  # VLLMValidationError etc.: the request's fault
            return APIError(400, str(cause) or name, code="invalid_value")
        if isinstance(cause, (ValueError, TypeError, OverflowError)):
            msg = str(cause) or type(cause).__name__
            code = "context_length_exceeded" if "context length" in msg or "too long" in msg else None
            return APIError(400, msg, code=code)
        cause, seen = cause.__cause__, seen + 1
    log.exception("internal error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}", code="internal_error")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    if errs[0].get("type") == "json_invalid":
        return f"the request body is not valid JSON: {errs[0].get('ctx', {}).get('error', 'decode error')}", None
    parts = []
    for e in errs[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg', 'invalid')}")
    first = [str(x) for x in errs[0].get("loc", ()) if x != "body"]
    return "; ".join(parts), (first[0] if first else None)


def install_handlers(app: FastAPI) -> None:
    """Envelope for our APIError, FastAPI's validation errors (400), HTTP errors, and the rest (500)."""

    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code, type=exc.type)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = _validation_message(exc)
        return error_response(400, msg, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), code=None)

    @app.exception_handler(Exception)
    async def _other(_: Request, exc: Exception) -> JSONResponse:
        err = engine_error(exc)
        return error_response(err.status, err.message, param=err.param, code=err.code, type=err.type)
