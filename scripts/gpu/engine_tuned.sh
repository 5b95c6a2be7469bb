#!/usr/bin/env bash
# On the device machine, after tune_run.sh on the same (warm) machine: the engine benchmark
# with the tuned kernel settings from /tmp/e8cfg. Usage: engine_tuned.sh SEQS PROMPT NAME RUN...
set -u
cd "$(dirname "$0")/../.."
[ -s /tmp/e8cfg/decode_config.json ] && export E8VLLM_DECODE_CONFIG="$(cat /tmp/e8cfg/decode_config.json)"
[ -s /tmp/e8cfg/prefill_config.json ] && export E8VLLM_PREFILL_CONFIG="$(cat /tmp/e8cfg/prefill_config.json)"
echo "decode ${E8VLLM_DECODE_CONFIG:-default} prefill ${E8VLLM_PREFILL_CONFIG:-default}"
bash scripts/gpu/engine_run.sh "$@"
