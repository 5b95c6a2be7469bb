#!/usr/bin/env bash
# On the device machine (after .gpu-bundle/part2/device-setup.sh), one run for every comparison:
# decode/prefill kernel settings (bench.gpu tune, the fastest are exported), the engine benchmark of
# every dtype ($ENGINE_RUNS), then the kernel-level table. Logs and JSON go to $OUT.
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD:${PYTHONPATH:-}" E8_BENCH_OUT="$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
timeout ${TUNE_TIMEOUT:-150} python -m e8vllm.bench.gpu tune > "$OUT/tune.log" 2>&1; echo "tune exit $?"
grep -E "BEST" "$OUT/tune.log" | cut -c1-300
if [ -s "$OUT/decode_config.json" ]; then export E8VLLM_DECODE_CONFIG="$(cat "$OUT/decode_config.json")"; fi
if [ -s "$OUT/prefill_config.json" ]; then export E8VLLM_PREFILL_CONFIG="$(cat "$OUT/prefill_config.json")"; fi
timeout ${ENGINE_TIMEOUT:-330} python -m e8vllm.bench.gpu engine \
  --runs ${ENGINE_RUNS:-e8_k4v4:CUSTOM auto:TRITON_ATTN fp8:TRITON_ATTN int4_per_token_head:TRITON_ATTN} \
  > "$OUT/engine.log" 2>&1; echo "engine exit $?"
grep -E "RESULT|exit" "$OUT/engine.log" | cut -c1-330
timeout ${KERNEL_TIMEOUT:-100} python -m e8vllm.bench.gpu kernel ${KERNEL_ARGS:---batches 64,8,1 --contexts 8192,32768} \
  > "$OUT/kernel.log" 2>&1; echo "kernel exit $?"
grep -E "^B=|copy bandwidth" "$OUT/kernel.log"
