"""The prompts of benches/http_vs_direct.rs through llama.cpp (llama-cpp-python) on the
same GGUF: the reference a user would otherwise pick. Prints one JSON line.

Usage: python llama_cpp_reference.py MODEL.gguf (not named llama_cpp.py: that would shadow the module)
"""
import json
import sys
import time

from llama_cpp import Llama

PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about a lighthouse.",
    "List three uses of a paperclip.",
    "What is the capital of Italy, and what is it known for?",
]
MAX_TOKENS = 48
REQUESTS = 8

llm = Llama(model_path=sys.argv[1], n_ctx=2048, n_threads=2, verbose=False)


def one(prompt):
    start = time.perf_counter()
    ttft, tokens = None, 0
    stream = llm.create_chat_completion(
        messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    for chunk in stream:
        if chunk["choices"][0]["delta"].get("content"):
            if ttft is None:
                ttft = time.perf_counter() - start
            tokens += 1  # llama-cpp-python streams one token per chunk
    return tokens, ttft or 0.0


one(PROMPTS[0])  # warm up
start = time.perf_counter()
results = [one(PROMPTS[i % len(PROMPTS)]) for i in range(REQUESTS)]
secs = time.perf_counter() - start
tokens = sum(t for t, _ in results)
print(json.dumps({"tokens": tokens, "secs": secs, "mean_ttft_ms": 1e3 * sum(t for _, t in results) / len(results)}))
