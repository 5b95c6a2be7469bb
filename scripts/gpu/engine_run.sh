#!/usr/bin/env bash
# On the device machine (after .gpu-bundle/part2/device-setup.sh): vLLM 0.26 engine runs of the
# dummy-weight Llama-3-8B shape. Usage: engine_run.sh SEQS PROMPT NAME RUN... (RUN = dtype:backend,
# e.g. auto:TRITON_ATTN e8_k4v4+centers:CUSTOM). Log and JSON lines go to $OUT/NAME.{log,jsonl}.
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD:${PYTHONPATH:-}" E8_BENCH_OUT="$OUT"
seqs=$1 prompt=$2 name=$3; shift 3
timeout ${ENGINE_TIMEOUT:-560} python -m e8vllm.bench.gpu engine --runs "$@" --seqs "$seqs" --prompt "$prompt" \
  --gen 128 > "$OUT/$name.log" 2>&1; echo "engine exit $?"
[ -f "$OUT/engine_${seqs}x${prompt}.jsonl" ] && mv "$OUT/engine_${seqs}x${prompt}.jsonl" "$OUT/$name.jsonl"
grep -E "^RESULT|exit" "$OUT/$name.log" | cut -c1-330
true
