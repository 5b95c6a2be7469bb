"""The FastAPI application and the process that runs it.

* :func:`build_app` (``ServerConfig`` -> FastAPI): middleware (auth, shutdown gate, body cap),
  routes, error handlers, and a lifespan that starts vLLM's ``AsyncLLM`` (blocking, before the
  port accepts connections) and shuts it down.
* :func:`serve` runs it under uvicorn with a draining SIGTERM/SIGINT handler: the first signal
  turns ``/health`` and new ``/v1`` requests into 503, lets in-flight requests finish for up to
  ``shutdown_timeout_s``, then aborts what still runs in the engine (streams end with
  ``finish_reason: "abort"`` and ``data: [DONE]``) and exits; a second SIGINT exits at once.
* :func:`create_app` is the uvicorn factory: ``uvicorn --factory e8vllm.server.app:create_app``
  (configuration from ``E8VLLM_SERVE_*`` variables, :meth:`ServerConfig.from_env`). Under plain
  uvicorn the drain is uvicorn's own (``--timeout-graceful-shutdown``).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import tempfile
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI

from e8vllm import telemetry

from .auth import AuthMiddleware, BodyLimitMiddleware, GateMiddleware, ServerState
from .config import ServerConfig
from .engine import start_engine
from .errors import install_handlers
from .metrics import ServerMetrics
from .routes import ROUTERS
from .routes.common import AppContext

__all__ = ["build_app", "create_app", "serve", "drain"]

log = logging.getLogger("e8vllm.server")


def build_app(config: ServerConfig) -> FastAPI:
    """The app; the engine starts in its lifespan."""
    ctx = AppContext(config=config, state=ServerState())

    def kv() -> dict | None:
        return ctx.handle.kv if ctx.handle is not None else None

    def snap() -> telemetry.Snapshot | None:
        h = ctx.handle
        return telemetry.read_dir(h.telemetry_dir) if h is not None and h.telemetry_dir is not None else None

    def counts() -> tuple[int, int] | None:
        h = ctx.handle
        return (h.counts.num_running, h.counts.num_waiting) if h is not None else None

    ctx.metrics = ServerMetrics(kv, snap, counts)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tdir = Path(tempfile.mkdtemp(prefix="e8vllm-telemetry-"))
        t0 = time.monotonic()
        try:
            ctx.handle = start_engine(config, tdir)
        except BaseException:
            shutil.rmtree(tdir, ignore_errors=True)
            raise
        ctx.telemetry_dir = ctx.handle.telemetry_dir
        if ctx.telemetry_dir is None:
            shutil.rmtree(tdir, ignore_errors=True)
        kvs = ctx.handle.kv
        log.info("e8vllm server ready in %.1f s: model %s, kv_cache_dtype %s (%s/%s, %.2f/%.2f bits), "
                 "%d tokens of KV cache, %.2fx vs %s", time.monotonic() - t0, ctx.handle.model_name,
                 kvs["kv_cache_dtype"], kvs["codec_key"], kvs["codec_value"], kvs["bits_key"], kvs["bits_value"],
                 kvs["capacity_tokens"]["e8"], kvs["compression_ratio"], kvs["model_dtype"])
        try:
            yield
        finally:
            ctx.state.shutting_down = True
            h = ctx.handle
            if h is not None:
                if ctx.active:
                    try:
                        await h.engine.abort(list(ctx.active))
                    except Exception:  # noqa: BLE001
                        pass
                h.engine.shutdown()
                h.stop_tokenizing()
            if tdir.exists():
                shutil.rmtree(tdir, ignore_errors=True)

    app = FastAPI(title="e8vllm", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible server over vLLM with an E8-lattice KV cache.")
    app.state.ctx = ctx
    install_handlers(app)
    for r in ROUTERS:
        app.include_router(r)
    # added innermost first: requests pass Auth -> Gate -> BodyLimit -> routes
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_request_bytes)
    app.add_middleware(GateMiddleware, state=ctx.state)
    app.add_middleware(AuthMiddleware, api_keys=config.api_keys)
    return app


def create_app() -> FastAPI:
    """uvicorn factory (configuration from the environment)."""
    return build_app(ServerConfig.from_env())


async def drain(ctx: AppContext, timeout_s: float) -> int:
    """Refuse new work, wait up to ``timeout_s`` for in-flight requests, abort the rest.
    Returns the number of engine requests aborted."""
    ctx.state.shutting_down = True
    deadline = time.monotonic() + timeout_s
    while ctx.state.inflight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    aborted = 0
    if ctx.active and ctx.handle is not None:
        ids = list(ctx.active)
        aborted = len(ids)
        log.info("shutdown: aborting %d request(s) still running after %.1f s", aborted, timeout_s)
        try:
            await ctx.handle.engine.abort(ids)
        except Exception as e:  # noqa: BLE001 - the engine may be gone already; shut down anyway
            log.warning("shutdown: aborting the engine requests failed: %r", e)
        end = time.monotonic() + 5.0
        while ctx.state.inflight > 0 and time.monotonic() < end:
            await asyncio.sleep(0.05)
    return aborted


def serve(config: ServerConfig) -> None:
    """Run the server until SIGTERM/SIGINT (draining, see the module docstring)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    app = build_app(config)
    ctx: AppContext = app.state.ctx

    class DrainingServer(uvicorn.Server):
        _draining = False

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self._draining:
                if sig == signal.SIGINT:
                    super().handle_exit(sig, frame)
                return
            self._draining = True
            ctx.state.shutting_down = True
            log.info("signal %s: draining (up to %.1f s)", sig, config.shutdown_timeout_s)
            loop = self._loop

            async def _go() -> None:
                try:
                    await drain(ctx, config.shutdown_timeout_s)
                finally:
                    self.should_exit = True

            # keep a reference: the event loop holds tasks weakly, and a drain task collected while it
            # awaits the engine would leave the server draining forever
            loop.call_soon_threadsafe(lambda: setattr(self, "_drain_task", loop.create_task(_go())))

        async def serve(self, sockets: Any = None) -> None:  # noqa: D401 - uvicorn API
            self._loop = asyncio.get_running_loop()
            await super().serve(sockets)

    uconf = uvicorn.Config(app, host=config.host, port=config.port, log_level="info", timeout_keep_alive=5,
                           timeout_graceful_shutdown=5)
    DrainingServer(uconf).run()
