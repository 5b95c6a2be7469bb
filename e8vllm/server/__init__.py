"""OpenAI-compatible HTTP server over vLLM's ``AsyncLLM`` with the e8vllm KV-cache plugin.

Modules: :mod:`.config` (``ServerConfig``), :mod:`.app` (``build_app``, ``serve``, ``create_app``),
:mod:`.protocol` (request models), :mod:`.routes` (completions, chat, system), :mod:`.errors`
(OpenAI error envelope), :mod:`.auth` (API key, shutdown gate, body cap), :mod:`.metrics`
(``e8kv_*`` Prometheus metrics), :mod:`.engine` (AsyncLLM start-up, KV summary, request fan-out).

The code lives in ``e8vllm/server/``; the top-level ``server/`` of the repository is a symlink to
it (the design card's path), and the import name is ``e8vllm.server`` (a generic top-level name
``server`` would collide in users' environments).
"""

from .config import ServerConfig

__all__ = ["ServerConfig", "build_app", "serve"]


def __getattr__(name: str):  # lazy: importing the config must not import FastAPI/vLLM
    if name in ("build_app", "serve", "create_app"):
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
