#!/usr/bin/env bash
# On the device machine (after .gpu-bundle/part2/device-setup.sh), one call: tune the decode and
# prefill kernel settings (the fastest are kept in /tmp/e8cfg for later calls on the same machine),
# the CUDA correctness tests with those settings, then the kernel-level benchmark. Logs and JSON go to $OUT.
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD:${PYTHONPATH:-}" E8_BENCH_OUT="$OUT"
mkdir -p /tmp/e8cfg
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/nvidia_smi.txt"
timeout ${TUNE_TIMEOUT:-150} python -m e8vllm.bench.gpu tune ${TUNE_ARGS:-} > "$OUT/tune.log" 2>&1; echo "tune exit $?"
grep -E "BEST|error" "$OUT/tune.log" | cut -c1-300
for f in decode_config.json prefill_config.json; do [ -s "$OUT/$f" ] && cp "$OUT/$f" /tmp/e8cfg/; done
[ -s /tmp/e8cfg/decode_config.json ] && export E8VLLM_DECODE_CONFIG="$(cat /tmp/e8cfg/decode_config.json)"
[ -s /tmp/e8cfg/prefill_config.json ] && export E8VLLM_PREFILL_CONFIG="$(cat /tmp/e8cfg/prefill_config.json)"
timeout ${TESTS_TIMEOUT:-200} python tests/gpu/test_triton_e8_gpu.py ${TESTS:-} > "$OUT/gpu_tests.log" 2>&1
echo "tests exit $?"; grep -v "^INFO\|^WARNING\|^\[\|^(" "$OUT/gpu_tests.log" | tail -25
timeout ${KERNEL_TIMEOUT:-170} python -m e8vllm.bench.gpu kernel ${KERNEL_ARGS:---batches 64,8,1 --contexts 8192,32768} \
  > "$OUT/kernel.log" 2>&1; echo "kernel exit $?"
grep -E "^B=|copy bandwidth" "$OUT/kernel.log" | cut -c1-200
true
