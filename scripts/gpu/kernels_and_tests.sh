#!/usr/bin/env bash
# On the device machine (after .gpu-bundle/part2/device-setup.sh): GPU correctness tests, then the
# kernel-level benchmark. Logs and JSON go to $OUT.
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD:${PYTHONPATH:-}" E8_BENCH_OUT="$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/nvidia_smi.txt"
timeout ${TESTS_TIMEOUT:-240} python tests/gpu/test_triton_e8_gpu.py ${TESTS:-} 2>&1 | tee "$OUT/gpu_tests.log" | grep -v "^INFO\|^WARNING\|^\[" | tail -40
timeout ${BENCH_TIMEOUT:-300} python -m e8vllm.bench.gpu kernel ${KERNEL_ARGS:-} 2>&1 | tee "$OUT/kernel.log" | grep -v "^INFO\|^WARNING" | tail -80
