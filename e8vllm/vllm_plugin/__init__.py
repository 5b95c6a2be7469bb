"""vLLM plugin: E8-lattice kv-cache dtypes (``e8_k4v4`` ...) and the attention backend serving them.

Entry point (pyproject ``[project.entry-points."vllm.general_plugins"]``):
``e8vllm = "e8vllm.vllm_plugin:register"``. Usage once installed::

    LLM(model=..., kv_cache_dtype="e8_k4v4")            # or --kv-cache-dtype e8_k4v4

Modules: :mod:`.register` (entry point, dtype registration, feature-detected shims, start-up
check), :mod:`.spec` (dtype names, page sizing hooks, serving constraints), :mod:`.cpu` (the
``CPU_ATTN`` override; imported lazily by vLLM through its class path).

Note: the attribute ``register`` of this package is the entry-point *function*; reach the module
with ``importlib.import_module("e8vllm.vllm_plugin.register")``.
"""

from .register import register, state as registration_state
from .spec import E8_DTYPES, E8UnsupportedError, is_e8_dtype, parse_e8_dtype, slot_bytes

__all__ = ["register", "registration_state", "E8_DTYPES", "E8UnsupportedError", "is_e8_dtype", "parse_e8_dtype", "slot_bytes"]
