#!/usr/bin/env bash
# On the device machine (after .gpu-bundle/part2/device-setup.sh): Nsight Compute profiles of one
# Gluon decode launch (64 x 8k, e8_k4v4) and one 64-token write launch (scripts/gpu/ncu_decode.py).
# Writes $OUT/ncu_{decode,write}_{details,source}.txt (the details page; per-SASS-line stall samples).
# E8VLLM_DECODE_CONFIG (JSON) selects the decode setting profiled, e.g. {"gluon_async": 1}.
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "no ncu"; exit 0; }
prof() {  # name kernel-regex args...
  local name=$1 re=$2; shift 2
  timeout ${NCU_TIMEOUT:-240} "$NCU" --clock-control none --set full --import-source no --kernel-name "regex:$re" \
    --launch-skip 1 --launch-count 1 -f -o "/tmp/ncu_$name" python scripts/gpu/ncu_decode.py "$@" > "/tmp/ncu_$name.log" 2>&1
  echo "ncu $name exit $?"; tail -3 "/tmp/ncu_$name.log"
  "$NCU" -i "/tmp/ncu_$name.ncu-rep" --page details > "$OUT/ncu_${name}_details.txt" 2>&1
  "$NCU" -i "/tmp/ncu_$name.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu_${name}_source.csv" 2>&1
  grep -E "Duration|Throughput|Registers|Achieved Occupancy|Theoretical Occupancy|Issue Slots|Eligible|Stall|No Eligible|Executed Ipc" \
    "$OUT/ncu_${name}_details.txt" | head -40
}
prof decode _gl_decode_kernel decode ${NCU_BATCH:-64} ${NCU_CTX:-8192}
prof write _e8_write_kernel write ${NCU_TOKENS:-64}
true
