#!/usr/bin/env bash
# Smoke-test an installed dynaudit the way a user meets it: outside the repository, in a fresh
# directory, against a real `mlflow server` and a local Hugging Face–compatible endpoint.
#   bash scripts/smoke.sh PYTHON
# PYTHON is the interpreter of a virtual environment that already holds the built wheel (and
# whatever training stack is being tested beside it). The two servers run in another Python,
# SMOKE_SERVER_PYTHON (default: the repository's .venv, which has the full `mlflow`), so the
# environment under test needs nothing but its own packages: an MLflow 2.x client meets a
# version 3 server, as it does in teams that upgraded the server first.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
py="$(cd "$(dirname "${1:?usage: bash scripts/smoke.sh PYTHON}")" && pwd)/$(basename "$1")"
bin="$(dirname "$py")"
server_py="${SMOKE_SERVER_PYTHON:-$repo/.venv/bin/python}"
fast=(--q-dim 16 --pieces 4 --steps 20)

work="$(mktemp -d "${TMPDIR:-/tmp}/dynaudit-smoke.XXXXXX")"
servers=()
cleanup() {
    local pid
    for pid in "${servers[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
cd "$work"  # nothing of the repository is importable from here
export DYNAUDIT_CACHE_DIR="$work/cache" HF_HOME="$work/hf-home" MLFLOW_HTTP_REQUEST_MAX_RETRIES=0
unset HF_ENDPOINT HF_HUB_OFFLINE MLFLOW_TRACKING_URI PYTHONPATH

step() { printf '\n== smoke: %s\n' "$*"; }
fail() {
    echo "smoke FAILED: $*" >&2
    exit 1
}
# Run dynaudit, keep its stderr, and insist on the exit code; a warning line fails the smoke
# too, since side channels (MLflow) only warn when they break.
run() {
    local want="$1" code=0
    shift
    "$bin/dynaudit" "$@" 2>"$work/stderr" || code=$?
    cat "$work/stderr" >&2
    [ "$code" = "$want" ] || fail "dynaudit $* exited $code, expected $want"
    if grep -qiE "warning|traceback" "$work/stderr"; then
        fail "dynaudit $* warned: $(head -c 400 "$work/stderr")"
    fi
}

step "environment"
"$py" - <<'EOF'
import importlib.metadata as md, sys
import dynaudit
assert "site-packages" in dynaudit.__file__, f"dynaudit imported from {dynaudit.__file__}"
names = ["dynaudit", "torch", "huggingface-hub", "mlflow-skinny", "mlflow", "transformers",
         "typer", "click", "numpy", "pydantic", "safetensors"]
found = []
for name in names:
    try:
        found.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        pass
print(f"Python {sys.version.split()[0]}: " + ", ".join(found))
EOF

step "help and demo"
run 0 --help >/dev/null
run 0 demo --out demo >/dev/null

step "checkpoints from real producers"
"$py" - <<'EOF'
"""A torch module saved with safetensors, a damaged copy of it (two matrices zeroed), and,
when transformers is installed, a tiny LLaMA written by save_pretrained."""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8))
state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
for name, damaged in (("clean", False), ("damaged", True)):
    out = Path(name)
    out.mkdir()
    tensors = dict(state)
    if damaged:
        tensors["0.weight"] = torch.zeros_like(tensors["0.weight"])
        tensors["2.weight"] = torch.zeros_like(tensors["2.weight"])
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"model_type": "mlp"}))
try:
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError:
    print("transformers not installed: no save_pretrained checkpoint")
else:
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    LlamaForCausalLM(config).save_pretrained("llama", max_shard_size="40KB")
    print("save_pretrained: llama/")
EOF

step "measure, baseline, check"
run 0 measure clean/model.safetensors "${fast[@]}" --json measure.json >/dev/null
"$py" -c "import json; r = json.load(open('measure.json')); assert r['layers'], r"
if [ -d llama ]; then
    run 0 measure llama "${fast[@]}" >/dev/null
fi
run 0 baseline clean --out base --seeds 2 "${fast[@]}"
run 0 check clean --baseline base --json check-pass.json --junit check.xml >/dev/null
"$py" -c "import json; assert json.load(open('check-pass.json'))['verdict']['verdict'] == 'pass'"
run 1 check damaged --baseline base --json check-fail.json >/dev/null
"$py" -c "import json; assert json.load(open('check-fail.json'))['verdict']['verdict'] == 'fail'"

step "MLflow: a real server"
port="$("$py" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")"
mkdir -p mlflow/artifacts
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false "$server_py" -m mlflow server \
    --backend-store-uri "sqlite:///$work/mlflow/mlflow.db" \
    --artifacts-destination "file://$work/mlflow/artifacts" \
    --host 127.0.0.1 --port "$port" --workers 1 >"$work/mlflow/server.log" 2>&1 &
servers+=("$!")
export MLFLOW_TRACKING_URI="http://127.0.0.1:$port"
for _ in $(seq 180); do
    if "$py" -c "import urllib.request as u; u.urlopen('$MLFLOW_TRACKING_URI/health', timeout=2)" 2>/dev/null; then
        break
    fi
    kill -0 "${servers[-1]}" 2>/dev/null || fail "mlflow server exited: $(tail -c 2000 "$work/mlflow/server.log")"
    sleep 0.5
done
run 0 measure clean "${fast[@]}" --no-cache --mlflow --json - >measure-stdout.json
# stdout is the report's: nothing MLflow prints may follow the JSON there
"$py" -c "import json; json.load(open('measure-stdout.json'))" ||
    fail "measure --json - --mlflow: stdout is not only the JSON: $(tail -c 400 measure-stdout.json)"
run 0 baseline clean --seeds 2 "${fast[@]}" --mlflow >baseline.out
cat baseline.out
stored="$(grep -o 'runs:/[^ ]*' baseline.out | head -n 1 | sed 's/:$//')"  # the URI, not the colon after it
[ -n "$stored" ] || fail "baseline --mlflow printed no runs:/ URI"
run 1 check damaged --baseline "$stored" --mlflow >/dev/null
"$py" - <<'EOF'
"""The runs really landed: ask the server over its REST API, not through dynaudit."""
import json, os, urllib.request

uri = os.environ["MLFLOW_TRACKING_URI"]
def post(path, body):
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)
experiments = post("experiments/search", {"max_results": 100})["experiments"]
ids = [e["experiment_id"] for e in experiments]
runs = post("runs/search", {"experiment_ids": ids, "max_results": 100}).get("runs", [])
assert len(runs) >= 3, f"expected 3 runs (measure, baseline, check), found {len(runs)}"
print(f"MLflow server holds {len(runs)} runs")
EOF

step "Hugging Face Hub: the local endpoint"
"$server_py" - "$repo/tests" "$work/clean" "$work/hub" >"$work/hub.url" 2>"$work/hub.log" <<'EOF' &
"""Serve the clean checkpoint as smoke/tiny until killed; print the endpoint's URL."""
import sys, threading
from pathlib import Path

sys.path.insert(0, sys.argv[1])
from hubserver import LocalHub

storage = Path(sys.argv[3])
storage.mkdir()
hub = LocalHub(storage).start()
hub.add("smoke/tiny", Path(sys.argv[2]))
print(hub.url, flush=True)
threading.Event().wait()
EOF
servers+=("$!")
for _ in $(seq 100); do
    [ -s "$work/hub.url" ] && break
    kill -0 "${servers[-1]}" 2>/dev/null || fail "hub server exited: $(cat "$work/hub.log")"
    sleep 0.2
done
endpoint="$(head -n 1 "$work/hub.url")"
[ -n "$endpoint" ] || fail "the hub server printed no URL"
run 0 inspect hf://smoke/tiny --hf-endpoint "$endpoint" >/dev/null
run 0 measure hf://smoke/tiny --hf-endpoint "$endpoint" "${fast[@]}" --json hub.json >/dev/null
run 0 check hf://smoke/tiny --hf-endpoint "$endpoint" --baseline base >/dev/null

echo
echo "smoke passed: $("$bin/dynaudit" --help >/dev/null && "$py" -c 'import sys; print(sys.version.split()[0])')"
