#!/usr/bin/env bash
# On the device machine (after .gpu-bundle/part2/device-setup.sh): time every decode-kernel setting
# (bench.gpu tune), then, with the fastest, the engine benchmark ($ENGINE_RUNS) and the GPU tests.
# Logs and JSON go to $OUT; the chosen setting is $OUT/decode_config.json.
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD:${PYTHONPATH:-}" E8_BENCH_OUT="$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
timeout ${TUNE_TIMEOUT:-240} python -m e8vllm.bench.gpu tune ${TUNE_ARGS:-} > "$OUT/tune.log" 2>&1; echo "tune exit $?"
grep -E "BEST|error" "$OUT/tune.log" | cut -c1-300 | head -12
if [ -s "$OUT/decode_config.json" ]; then export E8VLLM_DECODE_CONFIG="$(cat "$OUT/decode_config.json")"; fi
if [ -s "$OUT/prefill_config.json" ]; then export E8VLLM_PREFILL_CONFIG="$(cat "$OUT/prefill_config.json")"; fi
echo "E8VLLM_DECODE_CONFIG=${E8VLLM_DECODE_CONFIG:-} E8VLLM_PREFILL_CONFIG=${E8VLLM_PREFILL_CONFIG:-}"
if [ -n "${ENGINE_RUNS:-}" ]; then
  timeout ${ENGINE_TIMEOUT:-200} python -m e8vllm.bench.gpu engine --runs $ENGINE_RUNS > "$OUT/engine.log" 2>&1; echo "engine exit $?"
  grep -E "RESULT|CAPACITY|Error|exit" "$OUT/engine.log" | cut -c1-400
fi
timeout ${TESTS_TIMEOUT:-150} python tests/gpu/test_triton_e8_gpu.py > "$OUT/gpu_tests.log" 2>&1; echo "tests exit $?"
grep -E "^(PASS|FAIL)|identical|max\||tokens_check" "$OUT/gpu_tests.log" | cut -c1-300 | head -20
