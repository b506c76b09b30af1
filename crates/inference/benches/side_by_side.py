"""`slmesh serve` against llama.cpp's llama-server on the same GGUF files, the same
OpenAI streaming requests, rounds interleaved: decode tokens/s, time to first token for
a prompt of about 40 tokens, aggregate tokens/s at concurrency 4 against 1, and each
server's resident memory. `slmesh serve` runs twice: as built, and with
one setting changed (BASELINE, by default MISTRALRS_ENGINE_IN_POOL=0: the engine's thread
outside rayon's pool, as mistral.rs 0.8.1 released it; crates/vendor/README.md), the
baseline of the same run.

Usage: python side_by_side.py SLMESH LLAMA_SERVER MODEL.gguf [MODEL.gguf ...]
  SLMESH: the slmesh binary; LLAMA_SERVER: llama.cpp's llama-server (BENCHMARKS.md says
  how it was built here), or `-` to compare the two slmesh servers alone. Environment: ROUNDS (default 5), THREADS (default 2),
  MAX_CONCURRENT (slmesh's --max-concurrent; default its own: 4 on a machine with 8 GiB of
  memory or more, else 2, when four requests at once decode two at a time), BASELINE (the second slmesh server's environment, one
  VAR=value; default MISTRALRS_ENGINE_IN_POOL=0).
Prints one table row per server and file, in BENCHMARKS.md's form.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROUNDS = int(os.environ.get("ROUNDS", "5"))
THREADS = os.environ.get("THREADS", "2")
# The second slmesh server's one setting: the baseline of the same run.
BASELINE = os.environ.get("BASELINE", "MISTRALRS_ENGINE_IN_POOL=0")
DECODE_TOKENS = 64
# About 40 tokens with the chat template's own.
TTFT_PROMPT = (
    "A lighthouse keeper on a small rocky island writes in her logbook every evening. "
    "Tonight the fog is thick and a ship is late. What does she write?"
)
STORY_PROMPT = "Write a long story about a lighthouse keeper."


def post(port, model, prompt, max_tokens):
    """One streamed request: (seconds to the first token, completion tokens, seconds
    from the first token to the last)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    start = time.perf_counter()
    first = last = None
    chunks, usage = 0, None
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("usage"):
                usage = d["usage"].get("completion_tokens")
            for c in d.get("choices") or []:
                if c.get("delta", {}).get("content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    chunks += 1
    if first is None:
        raise RuntimeError(f"no tokens from port {port}")
    return first - start, usage or chunks, last - first


class Server:
    def __init__(self, name, argv, port, env=None):
        self.name, self.port = name, port
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                    self.model = json.load(r)["data"][0]["id"]
                # llama-server lists its model while it still loads: wait for /health.
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.log.seek(0)
                    raise RuntimeError(f"{name} did not start:\n{self.log.read().decode()[-2000:]}")
                time.sleep(0.5)

    def rss_mib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


def concurrent_rate(server, n):
    """Completion tokens per second of wall time, n story requests at once."""
    results = [None] * n

    def one(i):
        try:
            results[i] = post(server.port, server.model, STORY_PROMPT, DECODE_TOKENS)
        except Exception as e:  # reported below, with the server's name
            results[i] = e

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    for i, r in enumerate(results):
        if isinstance(r, Exception):
            raise RuntimeError(f"{server.name}: request {i + 1} of {n} at once failed: {r!r}")
    return sum(r[1] for r in results) / elapsed


def main():
    slmesh, llama_server, models = sys.argv[1], sys.argv[2], sys.argv[3:]
    print(f"rounds {ROUNDS}, threads {THREADS}, {DECODE_TOKENS} tokens decoded, medians")
    print("| file | server | decode tok/s | TTFT, ~40-token prompt | conc. 4 ÷ conc. 1 | RSS MiB |")
    print("|---|---|---:|---:|---:|---:|")
    for model in models:
        common = ["serve", "--model", model, "--threads", THREADS]
        if os.environ.get("MAX_CONCURRENT"):
            common += ["--max-concurrent", os.environ["MAX_CONCURRENT"]]
        servers = [
            Server("slmesh", [slmesh, *common, "--http-bind", "127.0.0.1:18101"], 18101),
            Server(
                f"slmesh, {BASELINE}",
                [slmesh, *common, "--http-bind", "127.0.0.1:18102"],
                18102,
                dict([BASELINE.split("=", 1)]),
            ),
        ]
        if llama_server != "-":
            servers.append(
                Server(
                    "llama.cpp",
                    [llama_server, "-m", model, "-t", THREADS, "-c", "4096", "--port", "18103", "--parallel", "4"],
                    18103,
                )
            )
        try:
            decode = {s.name: [] for s in servers}
            ttft = {s.name: [] for s in servers}
            for s in servers:  # warm up
                post(s.port, s.model, STORY_PROMPT, 8)
            for _ in range(ROUNDS):
                for s in servers:
                    _, tokens, secs = post(s.port, s.model, STORY_PROMPT, DECODE_TOKENS)
                    decode[s.name].append((tokens - 1) / secs)
                    # A prompt new to the server each time: no cache of an earlier one helps.
                    first, _, _ = post(s.port, s.model, f"({time.time_ns() % 1000003}) {TTFT_PROMPT}", 1)
                    ttft[s.name].append(first)
            for s in servers:
                one = statistics.median(concurrent_rate(s, 1) for _ in range(2))
                four = statistics.median(concurrent_rate(s, 4) for _ in range(2))
                print(
                    f"| {os.path.basename(model)} | {s.name} | {statistics.median(decode[s.name]):.1f} "
                    f"| {statistics.median(ttft[s.name]) * 1000:.0f} ms | {four / one:.2f}× "
                    f"({one:.0f} → {four:.0f} tok/s) | {s.rss_mib():.0f} |",
                    flush=True,
                )
        finally:
            for s in servers:
                s.stop()


if __name__ == "__main__":
    main()
