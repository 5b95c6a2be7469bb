"""HTTP routes: ``completions``, ``chat``, ``system`` (health, version, metrics, models, kv_cache)."""

from . import chat, completions, system

ROUTERS = (completions.router, chat.router, system.router)

__all__ = ["ROUTERS"]
