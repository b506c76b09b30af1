#!/usr/bin/env bash
# Runs every fuzz target of slmesh-protocol for SECONDS (default 30) each.
set -euo pipefail
secs="${1:-30}"
cd "$(dirname "$0")/../protocol"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
for t in $(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v slmesh-protocol-fuzz); do
  echo "== $t ($secs s)"
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" -- -max_total_time="$secs" -rss_limit_mb=4096
done
