#!/usr/bin/env bash
# On the device machine (after .gpu-bundle/part2/device-setup.sh): time the kernel settings
# (bench.gpu tune $TUNE_ARGS), then, with the fastest, the engine benchmark ($ENGINE_RUNS), the GPU
# tests ($TESTS: names, default all) and, with $KERNEL_ARGS set, the kernel-level benchmark. Logs and
# JSON go to $OUT; the chosen settings are $OUT/{decode,prefill}_config.json, also kept in /tmp/e8cfg
# for later calls on the same warm machine (engine_tuned.sh).
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD:${PYTHONPATH:-}" E8_BENCH_OUT="$OUT"
mkdir -p /tmp/e8cfg
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/nvidia_smi.txt"
timeout ${TUNE_TIMEOUT:-240} python -m e8vllm.bench.gpu tune ${TUNE_ARGS:-} > "$OUT/tune.log" 2>&1; echo "tune exit $?"
grep -E "BEST|error" "$OUT/tune.log" | cut -c1-300 | head -12
for f in decode_config.json prefill_config.json; do [ -s "$OUT/$f" ] && cp "$OUT/$f" /tmp/e8cfg/; done
if [ -s /tmp/e8cfg/decode_config.json ]; then export E8VLLM_DECODE_CONFIG="$(cat /tmp/e8cfg/decode_config.json)"; fi
if [ -s /tmp/e8cfg/prefill_config.json ]; then export E8VLLM_PREFILL_CONFIG="$(cat /tmp/e8cfg/prefill_config.json)"; fi
echo "E8VLLM_DECODE_CONFIG=${E8VLLM_DECODE_CONFIG:-} E8VLLM_PREFILL_CONFIG=${E8VLLM_PREFILL_CONFIG:-}"
if [ -n "${ENGINE_RUNS:-}" ]; then
  timeout ${ENGINE_TIMEOUT:-200} python -m e8vllm.bench.gpu engine --runs $ENGINE_RUNS > "$OUT/engine.log" 2>&1; echo "engine exit $?"
  grep -E "RESULT|CAPACITY|Error|exit" "$OUT/engine.log" | cut -c1-400
fi
timeout ${TESTS_TIMEOUT:-150} python tests/gpu/test_triton_e8_gpu.py ${TESTS:-} > "$OUT/gpu_tests.log" 2>&1; echo "tests exit $?"
grep -E "^(PASS|FAIL)|identical|max\||tokens_check" "$OUT/gpu_tests.log" | cut -c1-300 | head -20
if [ -n "${KERNEL_ARGS:-}" ]; then
  timeout ${KERNEL_TIMEOUT:-170} python -m e8vllm.bench.gpu kernel $KERNEL_ARGS > "$OUT/kernel.log" 2>&1; echo "kernel exit $?"
  grep -E "^B=|copy bandwidth" "$OUT/kernel.log" | cut -c1-200
fi
true
