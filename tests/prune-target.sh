#!/usr/bin/env bash
# Keeps the persistent build folder from growing without bound: every build of a test or
# binary leaves its executable (hundreds of MB with debug info) under a new hash in
# debug/deps. This keeps the newest of each name and deletes the older ones; cargo
# relinks one if it is needed again.
set -euo pipefail
deps="${CARGO_TARGET_DIR:-$HOME/.cache/slmesh-target}/debug/deps"
[ -d "$deps" ] || exit 0
cd "$deps"
freed=0
# Executables named NAME-<16 hex digits>, grouped by NAME, newest first.
for name in $(find . -maxdepth 1 -type f -executable -regextype posix-extended -regex '.*/[A-Za-z0-9_]+-[0-9a-f]{16}' -printf '%f\n' | sed -E 's/-[0-9a-f]{16}$//' | sort -u); do
  ls -t -- "$name"-???????????????? 2>/dev/null | tail -n +2 | while read -r old; do
    [ -x "$old" ] && [ -f "$old" ] && rm -f -- "$old" "$old.d"
  done
done
echo "== build folder: $(du -sh "$deps/.." | cut -f1) after pruning old test executables"
