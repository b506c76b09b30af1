#!/usr/bin/env bash
# The demo: an operator key, one enrolled node, and a signed, verified manifest of the
# demo model (SmolLM2-135M-Instruct, GGUF Q4_1). The mesh, serving and rollouts join
# this script as their issues land.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/slmesh-target}"
echo "== building slmesh (first build: 15-25 minutes)"
cargo build --locked --quiet -p slmesh --manifest-path "$repo/Cargo.toml"
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
