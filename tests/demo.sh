#!/usr/bin/env bash
# The demo: an operator key, one enrolled node, and a signed, verified manifest of the
# demo model (SmolLM2-135M-Instruct, GGUF Q4_1). The mesh, serving and rollouts join
# this script as their issues land.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/slmesh-target}"
echo "== building slmesh (first build: 15-25 minutes)"
# The same build as the tests (all targets), so that neither rebuilds the other's dependencies.
cargo build --locked --quiet --workspace --all-targets --manifest-path "$repo/Cargo.toml"
slmesh="$CARGO_TARGET_DIR/debug/slmesh"
echo "== demo model"
gguf="$("$repo/tests/fetch-demo-model.sh")"
echo "$gguf"

work="${SLMESH_DEMO_DIR:-$(mktemp -d)}"
mkdir -p "$work"
cd "$work"
echo "== working in $work"
"$slmesh" publisher keygen --out ops.key
"$slmesh" init --config node1/slmesh.toml --tag site=lab --trust "ops=$(cat ops.key.pub)"
node_id="$("$slmesh" keygen --config node1/slmesh.toml | sed -n 's/^node id: *//p')"
"$slmesh" enroll --publisher-key ops.key --node "$node_id" --tag site=lab --out node1/slmesh-data/node.cert
cp "$gguf" .
model="$(basename "$gguf")"
"$slmesh" manifest create --name smollm2-135m-instruct --version 1 \
  --description "SmolLM2 135M Instruct" --wave 0.34:1m --wave 1:0 "$model" --out v1.toml
"$slmesh" manifest sign --key ops.key v1.toml --out v1.slm
"$slmesh" manifest verify --config node1/slmesh.toml v1.slm --files .
"$slmesh" manifest inspect v1.slm

echo "== serving the verified model on this machine (the mesh and rollouts come with their issues)"
"$slmesh" serve --model "$model" --name smollm2-135m-instruct --http-bind 127.0.0.1:0 > serve.out 2> serve.log &
serve_pid=$!
trap 'kill $serve_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  grep -q '^serving' serve.out 2>/dev/null && break
  kill -0 $serve_pid 2>/dev/null || { cat serve.log; exit 1; }
  sleep 0.5
done
addr="$(sed -n 's|^serving .* on http://||p' serve.out)"
echo "serving on http://$addr"
python3 - "$addr" <<'PY'
import json, sys, urllib.request
body = {"model": "smollm2-135m-instruct", "max_tokens": 40, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]}
req = urllib.request.Request(f"http://{sys.argv[1]}/v1/chat/completions", json.dumps(body).encode(),
                             {"Content-Type": "application/json"})
r = json.load(urllib.request.urlopen(req, timeout=120))
print("answer:", r["choices"][0]["message"]["content"].strip())
print("usage:", r["usage"]["prompt_tokens"], "prompt tokens,", r["usage"]["completion_tokens"], "completion tokens")
PY
