"""e8vllm: E8-lattice quantization of the LLM KV cache, inside vLLM."""

__version__ = "0.1.0"
