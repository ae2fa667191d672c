#!/usr/bin/env bash
# Set up a virtual environment with everything dynaudit needs, then run a demo or the tests.
#   bash scripts/dev.sh demo    # install, then audit a tiny checkpoint built locally
#   bash scripts/dev.sh test    # install, then lint, type-check and run every test
# DYNAUDIT_VENV picks the environment's folder (default .venv); TORCH_SPEC the torch build.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${DYNAUDIT_VENV:-.venv}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
pip_install() {
    # pip's notes about unused local indexes are noise; real failures still fail the script.
    "$venv/bin/python" -m pip install --quiet "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
pip_install "$torch_spec"
pip_install -e ".[test,lint,bench]"

case "${1:-}" in
    demo)
        "$venv/bin/dynaudit" demo
        ;;
    test)
        "$venv/bin/ruff" check .
        "$venv/bin/ruff" format --check .
        "$venv/bin/mypy"
        # Two workers of one thread each: the test fits are small, so two processes use the
        # two cores better than one process with two threads; a file stays on one worker, so
        # its module fixtures are built once (PYTEST_WORKERS=0: no workers).
        OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" \
            "$venv/bin/python" -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile "${@:2}"
        ;;
    *)
        echo "usage: bash scripts/dev.sh demo|test [pytest args]" >&2
        exit 2
        ;;
esac
