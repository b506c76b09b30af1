#!/usr/bin/env bash
# The test command of the README: every test of the workspace, built in a persistent
# target folder outside the clone so that later runs build incrementally.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/slmesh-target}"
cargo test --workspace --locked "$@"
