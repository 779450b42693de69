#!/usr/bin/env bash
# Lints template.yaml offline, with no AWS credentials:
#   1. `sam validate --lint` (SAM CLI, from .venv-sam: it pins its own dependencies)
#   2. `cfn-lint`            (from the project venv .venv)
# Creates either venv if it is missing. Exits non-zero on any lint error.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

export AWS_DEFAULT_REGION=us-east-1
export AWS_REGION=us-east-1
export SAM_CLI_TELEMETRY=0
export SAM_CLI_CONTACT_TELEMETRY=0
export PIP_DISABLE_PIP_VERSION_CHECK=1

template=template.yaml

log() { printf '[check_template] %s\n' "$*" >&2; }

# ensure_venv DIR REQUIREMENTS PROBE: make DIR a venv with REQUIREMENTS installed,
# unless DIR/bin/PROBE already exists. Another process may be building the same venv
# at the same moment (e.g. `make venv`), so pip is retried if the two collide.
ensure_venv() {
    local dir=$1 req=$2 probe=$3 attempt lock_fd lock
    [[ -x "$dir/bin/$probe" ]] && return 0
    # Serialises concurrent runs of this script (the lock lives outside the repo and is
    # never removed); other writers are handled by retrying pip.
    lock="${TMPDIR:-/tmp}/chainrun-$(printf '%s' "$PWD/$dir" | cksum | cut -d' ' -f1).lock"
    exec {lock_fd}>"$lock"
    flock "$lock_fd"
    if [[ ! -x "$dir/bin/$probe" ]]; then
        for attempt in 1 2 3 4 5; do
            log "installing $req into $dir (attempt $attempt)"
            if { [[ -x "$dir/bin/python" ]] || python3 -m venv "$dir"; } \
                && "$dir/bin/python" -m pip install --quiet -r "$req" \
                && [[ -x "$dir/bin/$probe" ]]; then
                break
            fi
            if [[ $attempt -eq 5 ]]; then
                log "could not install $req into $dir"
                exit 2
            fi
            sleep $((attempt * 3))
        done
    fi
    exec {lock_fd}>&-
}

ensure_venv .venv infra/requirements.txt cfn-lint
ensure_venv .venv-sam infra/requirements-sam.txt sam

status=0

log "sam validate --lint ($(.venv-sam/bin/sam --version))"
if ! .venv-sam/bin/sam validate --lint --template "$template"; then
    status=1
fi

log "cfn-lint ($(.venv/bin/cfn-lint --version))"
if ! .venv/bin/cfn-lint "$template"; then
    status=1
fi

if [[ $status -eq 0 ]]; then
    log "template OK"
else
    log "template has lint errors"
fi
exit "$status"
