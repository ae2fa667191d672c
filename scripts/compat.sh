#!/usr/bin/env bash
# Build the wheel and the sdist, then install the wheel into fresh virtual environments beside
# the training stacks users have, and run scripts/smoke.sh in each (outside the repository):
#   stack4   lowest Python, transformers 4.x and the newest MLflow 2.x client
#   newest   highest Python, the newest release of everything
#   lowest   lowest Python, every dependency at the floor pyproject.toml declares
#   bash scripts/compat.sh [JOB...]       # default: all three
# COMPAT_DIR keeps the environments and the built files (default: a temporary directory,
# removed afterwards); TORCH_SPEC is the torch build installed first in each (as scripts/dev.sh);
# PY310 / PY313 name the interpreters (default: pyenv's), COMPAT_PYTHON one for every job. pip's
# cache makes reruns fast.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
jobs=("${@:-stack4 newest lowest}")
read -r -a jobs <<<"${jobs[*]}"

find_python() {
    # An interpreter of that minor version: the variable, then pyenv's, then PATH's.
    local minor="$1" given="$2" root
    if [ -n "$given" ]; then echo "$given" && return; fi
    root="$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"
    for candidate in "$root"/versions/"$minor".*/bin/python "$(command -v "python$minor" || true)"; do
        if [ -x "$candidate" ]; then echo "$candidate" && return; fi
    done
    echo "compat: no Python $minor found (set PY${minor/./})" >&2
    exit 2
}

if [ -n "${COMPAT_DIR:-}" ]; then
    work="$COMPAT_DIR"
    mkdir -p "$work"
else
    work="$(mktemp -d "${TMPDIR:-/tmp}/dynaudit-compat.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
fi
quiet_pip() {
    # pip's notes about unused local indexes are noise; real failures still fail the script.
    "$1" -m pip install --quiet "${@:2}" 2> >(grep -v "^WARNING: Location" >&2)
}

echo "== compat: build (wheel from the sdist)"
rm -rf "$work/tools" "$work/dist"
python3 -m venv "$work/tools"
quiet_pip "$work/tools/bin/python" build
if ! "$work/tools/bin/python" -m build --outdir "$work/dist" "$repo" >"$work/build.log" 2>&1; then
    cat "$work/build.log" >&2
    exit 1
fi
wheel="$(ls "$work"/dist/dynaudit-*.whl)"
ls "$work/dist"

floors() {
    # Every runtime requirement of the wheel pinned at its declared floor (torch excepted: it
    # is installed first, as users do), for pip's --constraint.
    "$work/tools/bin/python" - "$wheel" <<'EOF'
import sys, zipfile
from packaging.requirements import Requirement

with zipfile.ZipFile(sys.argv[1]) as wheel:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    lines = wheel.read(name).decode().splitlines()
for line in lines:
    if not line.startswith("Requires-Dist: "):
        continue
    req = Requirement(line.removeprefix("Requires-Dist: "))
    if req.marker is not None and "extra" in str(req.marker) or req.name == "torch":
        continue
    floor = [s.version for s in req.specifier if s.operator == ">="]
    if not floor:
        sys.exit(f"{req}: no floor declared")
    print(f"{req.name}=={floor[0]}" + (f"; {req.marker}" if req.marker else ""))
EOF
}

job() {
    # job NAME PYTHON PIP-ARGS...: a fresh environment, torch first, then the wheel beside the
    # stack, then the smoke set.
    local name="$1" python="$2" venv="$work/$1" start=$SECONDS
    shift 2
    echo
    echo "== compat: $name ($("$python" --version), load: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null))"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    quiet_pip "$venv/bin/python" "$torch_spec"
    quiet_pip "$venv/bin/python" "$wheel" "$@"
    "$venv/bin/python" -m pip check
    bash "$repo/scripts/smoke.sh" "$venv/bin/python"
    echo "== compat: $name passed in $((SECONDS - start)) s"
}

server_python() {
    # The servers' Python (the full `mlflow` at the tests' pin): the repository's .venv when
    # it has it, else an environment of its own.
    if [ -n "${SMOKE_SERVER_PYTHON:-}" ]; then return; fi
    if "$repo/.venv/bin/python" -c "import mlflow.server" 2>/dev/null; then
        export SMOKE_SERVER_PYTHON="$repo/.venv/bin/python"
        return
    fi
    python3 -m venv "$work/server"
    quiet_pip "$work/server/bin/python" "$(grep -o '"mlflow==[^"]*"' "$repo/pyproject.toml" | tr -d '"')"
    export SMOKE_SERVER_PYTHON="$work/server/bin/python"
}

server_python
# COMPAT_PYTHON runs every job on one interpreter (.ci/run: the default Python, whose CPU torch
# build is at hand; the hosted CI's matrix runs them on 3.10 and 3.13).
py310() { echo "${COMPAT_PYTHON:-$(find_python 3.10 "${PY310:-}")}"; }
py313() { echo "${COMPAT_PYTHON:-$(find_python 3.13 "${PY313:-}")}"; }
for name in "${jobs[@]}"; do
    case "$name" in
        stack4)
            job stack4 "$(py310)" "transformers>=4.57,<5" "mlflow-skinny>=2.16,<3"
            ;;
        newest)
            job newest "$(py313)" transformers mlflow-skinny  # a fresh venv: the newest of each
            ;;
        lowest)
            floors >"$work/floors.txt"
            cat "$work/floors.txt"
            job lowest "$(py310)" --constraint "$work/floors.txt"
            ;;
        *)
            echo "compat: unknown job $name (stack4, newest, lowest)" >&2
            exit 2
            ;;
    esac
done
echo
echo "compat passed: ${jobs[*]}"
