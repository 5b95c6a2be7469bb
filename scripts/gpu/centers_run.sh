#!/usr/bin/env bash
# On the device machine (after .gpu-bundle/part2/device-setup.sh): the CUDA correctness tests,
# including position-dependent key centers (key bias in both tile kernels, centering ops in a CUDA
# graph, greedy tokens of the Triton path = PyTorch path with a RoPE calibration), then the decode
# kernel with and without the key bias in one run. Logs go to $OUT.
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD:${PYTHONPATH:-}" E8_BENCH_OUT="$OUT"
timeout ${TESTS_TIMEOUT:-300} python tests/gpu/test_triton_e8_gpu.py test_write_codes_cuda test_attention_mixed_cuda \
  test_attention_decode_segments_cuda test_attention_key_bias_cuda test_centering_ops_capture_in_cuda_graph \
  test_tokens_match_reference_path_with_rope_centers > "$OUT/gpu_tests_centers.log" 2>&1; echo "tests exit $?"
grep -E "^(PASS|FAIL)|identical|max\|" "$OUT/gpu_tests_centers.log" | cut -c1-220
timeout ${KERNEL_TIMEOUT:-150} python -m e8vllm.bench.gpu kernel --batches 64,8 --contexts 8192,32768 \
  --dtypes e8_k4v4,e8_k4v4+centers,auto > "$OUT/kernel_centers.log" 2>&1; echo "kernel exit $?"
grep -E "B=|copy" "$OUT/kernel_centers.log" | cut -c1-200
[ -f "$OUT/kernel.json" ] && mv "$OUT/kernel.json" "$OUT/kernel_centers.json"
true
