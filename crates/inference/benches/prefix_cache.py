"""Prompt time of first and follow-up turns, and resident memory over many distinct
conversations, against a running `slmesh serve` (BENCHMARKS.md, "Memory over many
conversations"). Usage: prefix_cache.py BASE_URL PID
(with the pinned `openai` client the tests install under ~/.cache/slmesh-tools)."""
import statistics
import sys

import openai
c = openai.OpenAI(base_url=sys.argv[1], api_key="x")
sysmsg = {"role":"system","content":"You are a helpful assistant who answers in detail. "*4}
first, follow = [], []
for t in ["rivers","owls","chess","tea","maps"]:
    m = [sysmsg, {"role":"user","content":f"Tell me ten interesting facts about {t}, with a sentence on each."}]
    r = c.chat.completions.create(model="", messages=m, max_tokens=64, temperature=0)
    first.append(r.usage.model_extra["total_prompt_time_sec"])
    m += [{"role":"assistant","content":r.choices[0].message.content}, {"role":"user","content":"Now summarise that in one sentence."}]
    r = c.chat.completions.create(model="", messages=m, max_tokens=16, temperature=0)
    follow.append(r.usage.model_extra["total_prompt_time_sec"])
print(f"prompt time: first turn median {1000*statistics.median(first):.0f} ms, follow-up median {1000*statistics.median(follow):.0f} ms")

def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) // 1024

topics = ["rivers", "mountains", "bread", "trains", "owls", "glass", "chess", "tides", "copper", "violins",
          "deserts", "bees", "clocks", "salt", "comets", "bridges", "maps", "tea", "wolves", "paper"]
print(f"resident after the follow-ups: {rss_mib(sys.argv[2])} MiB")
for n in range(2):
    for t in topics:
        c.chat.completions.create(model="", max_tokens=96, temperature=0, messages=[
            sysmsg, {"role": "user", "content": f"Tell me ten interesting facts about {t}, with a sentence on each."}])
    print(f"resident after {20 * (n + 1)} more conversations: {rss_mib(sys.argv[2])} MiB")
