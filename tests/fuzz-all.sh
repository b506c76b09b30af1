#!/usr/bin/env bash
# Fuzzes every decoder of slmesh-protocol (`decoders::ALL`, one cargo-fuzz target each) for
# SECONDS (default 30) each, starting from the seed corpus kept in the repository
# (protocol/fuzz/seeds/<target>, made by node/tests/fuzz_seeds.rs) plus what earlier runs
# found on this machine (protocol/fuzz/corpus/<target>, not committed). A crash fails the
# script; its input is left in protocol/fuzz/artifacts/<target>/. `.ci/run` runs it for a
# few seconds per target; run it longer by hand or nightly: tests/fuzz-all.sh 600
set -euo pipefail
secs="${1:-30}"
cd "$(dirname "$0")/../protocol"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/slmesh-target}"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz@0.13.2
targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v slmesh-protocol-fuzz)
# cargo-fuzz needs nightly features; on a stable toolchain RUSTC_BOOTSTRAP=1 lets them through.
echo "== building the fuzz targets"
RUSTC_BOOTSTRAP=1 cargo fuzz build
for t in $targets; do
  [ -d "fuzz/seeds/$t" ] || { echo "no seed corpus for $t: run SLMESH_WRITE_FUZZ_SEEDS=1 cargo test --workspace --test fuzz_seeds"; exit 1; }
  mkdir -p "fuzz/corpus/$t"
  printf '== fuzz %-24s %s s: ' "$t" "$secs"
  log="$(mktemp)"
  if ! RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
      -max_total_time="$secs" -rss_limit_mb=4096 -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz target $t failed: see above and protocol/fuzz/artifacts/$t/"
    exit 1
  fi
  sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tr -d '\n'
  echo " runs"
  rm -f "$log"
done
