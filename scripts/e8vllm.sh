#!/usr/bin/env bash
# The single entry point on a fresh machine (builds/reuses the venv via scripts/env.sh):
#
#   bash scripts/e8vllm.sh test [pytest args]   python -m pytest -q [args] (default: tests/);
#                                               "no tests collected" counts as a failure
#   bash scripts/e8vllm.sh <command> [args]     python -m e8vllm <command> [args]
#                                               (e.g. `bench quant`, `prepare-model`)
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)

# shellcheck source=scripts/env.sh
source "$ROOT/scripts/env.sh" || exit 1

export VLLM_TARGET_DEVICE="${VLLM_TARGET_DEVICE:-cpu}"
# Load only our vLLM plugin: the peer package glq (installed for the codec benchmark) ships a
# vllm.general_plugins entry point of its own that would otherwise run in every vLLM process.
export VLLM_PLUGINS="${VLLM_PLUGINS:-e8vllm}"
# OMP_NUM_THREADS and TRITON_INTERPRET are deliberately left as the caller has them
# (tests that need TRITON_INTERPRET=1 set it themselves).

if [[ ${1:-} == test ]]; then
    shift
    cd "$ROOT"
    # Default to tests/ unless the arguments name a test path themselves.
    targets=(tests)
    prev=
    for a in "$@"; do
        case $prev in
            -k | -m | -p | -o | -c | -W | -n | --rootdir | --confcutdir | --ignore | --deselect | --basetemp | --timeout | --junitxml | --junit-xml) ;;
            *) if [[ $a != -* && -e ${a%%::*} ]]; then targets=(); fi ;;
        esac
        prev=$a
    done
    set +e
    "$E8VLLM_PY" -m pytest "${targets[@]}" -q "$@"
    rc=$?
    set -e
    if [[ $rc == 5 ]]; then
        echo "e8vllm test: ERROR: pytest collected no tests (pytest exit code 5); treating that as a failure" >&2
        exit 1
    fi
    exit "$rc"
fi

exec "$E8VLLM_PY" -m e8vllm "$@"
