#!/usr/bin/env bash
# On the device machine (after .gpu-bundle/part2/device-setup.sh): GPU tests (kernels + dummy-model
# tokens), the E8 engine benchmark, then the kernel benchmark. Logs and JSON go to $OUT.
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD:${PYTHONPATH:-}" E8_BENCH_OUT="$OUT"
timeout ${TESTS_TIMEOUT:-200} python tests/gpu/test_triton_e8_gpu.py 2>&1 > "$OUT/gpu_tests.log"; echo "tests exit $?"
grep -E "^(PASS|FAIL)|identical|max\||tokens_check|E8 CALLS" "$OUT/gpu_tests.log" | cut -c1-400
timeout ${ENGINE_TIMEOUT:-240} python -m e8vllm.bench.gpu engine --runs ${ENGINE_RUNS:-e8_k4v4:CUSTOM} > "$OUT/engine.log" 2>&1; echo "engine exit $?"
grep -E "RESULT|CAPACITY|Error" "$OUT/engine.log" | cut -c1-500
timeout ${BENCH_TIMEOUT:-150} python -m e8vllm.bench.gpu kernel ${KERNEL_ARGS:-} > "$OUT/kernel.log" 2>&1; echo "kernel exit $?"
grep -E "^B=|copy bandwidth" "$OUT/kernel.log"
