#!/usr/bin/env bash
# On the device machine (after .gpu-bundle/part2/device-setup.sh): the Gluon decode kernel's GPU
# tests first, then the decode tune at 64 x 8k (TUNE=0: none) (its best setting also goes to
# /tmp/e8_decode_config.json for a later call's E8VLLM_DECODE_CONFIG), then optionally more GPU tests
# (TESTS_ALL), the write benchmark (WRITE_ARGS) and the kernel benchmark (KERNEL_ARGS).
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD:${PYTHONPATH:-}" E8_BENCH_OUT="$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/nvidia_smi.txt"
timeout ${G_TIMEOUT:-150} python tests/gpu/test_triton_e8_gpu.py test_gluon_decode_cuda > "$OUT/gluon_tests.log" 2>&1
echo "gluon tests exit $?"; cp "$OUT/gpu_tests.json" "$OUT/gluon_tests.json" 2>/dev/null
grep -E "^(PASS|FAIL)|max\||Error|error" "$OUT/gluon_tests.log" | cut -c1-260 | head -40
if [ "${TUNE:-1}" = 1 ]; then
  timeout ${TUNE_TIMEOUT:-200} python -m e8vllm.bench.gpu tune --what decode ${TUNE_ARGS:-} > "$OUT/tune.log" 2>&1
  echo "tune exit $?"; grep -E "^  \{|BEST" "$OUT/tune.log" | cut -c1-300
  [ -f "$OUT/decode_config.json" ] && cp "$OUT/decode_config.json" /tmp/e8_decode_config.json
fi
if [ -n "${TESTS_ALL:-}" ]; then
  timeout ${TESTS_TIMEOUT:-150} python tests/gpu/test_triton_e8_gpu.py $TESTS_ALL > "$OUT/gpu_tests.log" 2>&1; echo "tests exit $?"
  grep -E "^(PASS|FAIL)|identical|max\||tokens_check" "$OUT/gpu_tests.log" | cut -c1-300 | head -30
fi
if [ -n "${WRITE_ARGS:-}" ]; then
  timeout ${WRITE_TIMEOUT:-100} python -m e8vllm.bench.gpu write $WRITE_ARGS > "$OUT/write.log" 2>&1; echo "write exit $?"
  grep -E "^write" "$OUT/write.log" | cut -c1-200
  # the fastest small-write setting at 64 tokens that the environment can select, for a later call's
  # engine runs: `source /tmp/e8_write_env`
  python - "$OUT/write.json" > /tmp/e8_write_env <<'PY'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["rows"] if r["tokens"] == 64 and r["block_rows"] < 16
        and r["parallel_scales"] == (r["block_rows"] == 1) and r.get("candidates") in (None, "floor")]
b = min(rows, key=lambda r: r["time_s"])
# rows and rotation only: the warps stay chosen by size (e8_kv.small_write_warps); the best at 64 tokens is in the log
print(f"export E8VLLM_SMALL_WRITE_ROWS={b['block_rows']} E8VLLM_WRITE_ROTATION={b['rotation']}"
      f"  # {b['time_s'] * 1e6:.1f} us with {b['warps']} warps")
PY
  cat /tmp/e8_write_env
fi
if [ -n "${KERNEL_ARGS:-}" ]; then
  timeout ${KERNEL_TIMEOUT:-170} python -m e8vllm.bench.gpu kernel $KERNEL_ARGS > "$OUT/kernel.log" 2>&1; echo "kernel exit $?"
  grep -E "^B=|copy bandwidth" "$OUT/kernel.log" | cut -c1-200
fi
true
