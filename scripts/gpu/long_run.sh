#!/usr/bin/env bash
# On the device machine (after .gpu-bundle/part2/device-setup.sh): the CUDA correctness tests with the
# default kernel settings (no engine tokens check), then the 8 x 32k engine runs. Logs go to $OUT.
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD:${PYTHONPATH:-}" E8_BENCH_OUT="$OUT"
timeout ${TESTS_TIMEOUT:-60} python tests/gpu/test_triton_e8_gpu.py test_write_codes_cuda test_attention_mixed_cuda \
  test_attention_decode_segments_cuda > "$OUT/gpu_tests_defaults.log" 2>&1; echo "tests exit $?"
grep -E "^(PASS|FAIL)|identical|max\|" "$OUT/gpu_tests_defaults.log" | cut -c1-200
timeout ${ENGINE_TIMEOUT:-200} python -m e8vllm.bench.gpu engine --runs ${ENGINE_RUNS:-e8_k4v4:CUSTOM auto:TRITON_ATTN} \
  --seqs 8 --prompt 32768 --gen 128 > "$OUT/engine_8x32768.log" 2>&1; echo "engine exit $?"
grep -E "RESULT|exit" "$OUT/engine_8x32768.log" | cut -c1-330
