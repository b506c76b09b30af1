"""The official `openai` Python client against a node: what it sends is honoured, or
refused with a 400 that names the parameter. Usage: openai_client.py BASE_URL MODEL"""
import json
import math
import sys

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="unused")
question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]

r = client.chat.completions.create(model=model, messages=question, max_tokens=16, temperature=0)
full = r.choices[0].message.content
assert "Paris" in full, full
assert r.usage.completion_tokens > 0, r.usage

r = client.chat.completions.create(model=model, messages=question, max_tokens=16, temperature=0, stop=["Paris"], seed=1)
assert "Paris" not in r.choices[0].message.content, r.choices[0].message.content

chunks = list(client.chat.completions.create(
    model=model, messages=question, max_tokens=16, temperature=0, stream=True,
    stream_options={"include_usage": True}))
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert "Paris" in text, text
assert any(c.usage and c.usage.completion_tokens > 0 for c in chunks), "no usage in the stream"

r = client.completions.create(model=model, prompt="The sky is", max_tokens=5, temperature=0)
assert r.choices[0].text.strip(), r

assert client.models.retrieve(model).id == model
assert [m.id for m in client.models.list().data] == [model]

# Log-probabilities: natural logarithms; with greedy decoding the chosen token is the
# most likely alternative; the alternatives are text, most likely first.
r = client.chat.completions.create(
    model=model, messages=question, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
tokens = r.choices[0].logprobs.content
assert tokens, r
assert "Paris" in "".join(t.token for t in tokens), tokens
for t in tokens:
    assert t.logprob <= 1e-6 and t.bytes == list(t.token.encode()), t
    assert 1 <= len(t.top_logprobs) <= 3, t
    alternatives = [a.logprob for a in t.top_logprobs]
    assert alternatives == sorted(alternatives, reverse=True), t
    assert t.top_logprobs[0].token == t.token and abs(t.top_logprobs[0].logprob - t.logprob) < 1e-3, t
    assert sum(math.exp(a) for a in alternatives) <= 1.0 + 1e-3, t
# "Paris" is a confident answer: well above an even chance.
assert max(math.exp(t.logprob) for t in tokens if "Paris" in t.token) > 0.5, tokens

chunks = list(client.chat.completions.create(
    model=model, messages=question, max_tokens=8, temperature=0, stream=True, logprobs=True, top_logprobs=2))
streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
assert streamed and all(t.logprob <= 1e-6 and len(t.top_logprobs) <= 2 for t in streamed), streamed

r = client.chat.completions.create(
    model=model, messages=question, max_tokens=8, temperature=0.8, logprobs=True)
assert all(t.logprob <= 1e-6 and t.top_logprobs == [] for t in r.choices[0].logprobs.content), r

# seed with sampling: the same seed gets the same answer, streamed or not, whatever ran
# before; other seeds get other answers.
story = [{"role": "user", "content": "Write one sentence about a cat."}]


def seeded(seed, **kwargs):
    r = client.chat.completions.create(model=model, messages=story, max_tokens=24, temperature=1.0, seed=seed, **kwargs)
    return r.choices[0].message.content


first = seeded(42)
seeded(7)  # another request in between
assert seeded(42) == first, first
streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
    model=model, messages=story, max_tokens=24, temperature=1.0, seed=42, stream=True) if c.choices)
assert streamed == first, (streamed, first)
others = {seeded(s) for s in (1, 2, 3)}
assert others - {first}, f"three other seeds all answered {first!r}"
r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=9)
assert r.choices[0].text == client.completions.create(
    model=model, prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=9).choices[0].text, r
# A seeded token's logprob is the probability it was drawn with: where it is also among
# the alternatives, the two figures agree.
r = client.chat.completions.create(
    model=model, messages=story, max_tokens=16, temperature=1.3, top_p=0.9, seed=5, logprobs=True, top_logprobs=5)
tokens = r.choices[0].logprobs.content
assert tokens and all(t.logprob <= 1e-6 for t in tokens), tokens
matched = [(t.logprob, a.logprob) for t in tokens for a in t.top_logprobs if a.token == t.token]
assert matched and all(abs(x - y) < 1e-3 for x, y in matched), matched

# JSON answers, by the engine's constrained decoding.
capital = {
    "type": "object",
    "properties": {"capital": {"type": "string", "maxLength": 24}},
    "required": ["capital"],
    "additionalProperties": False,
}
r = client.chat.completions.create(
    model=model, max_tokens=64, temperature=0,
    messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
    response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": capital}})
answer = json.loads(r.choices[0].message.content)
assert list(answer) == ["capital"] and isinstance(answer["capital"], str), answer

r = client.chat.completions.create(
    model=model, max_tokens=96, temperature=0,
    messages=[{"role": "user", "content": "Describe Paris in JSON with a name and a country."}],
    response_format={"type": "json_object"})
assert isinstance(json.loads(r.choices[0].message.content), dict), r.choices[0].message.content

# Function calling: a call when one is required (or named), then the result goes back.
weather = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 32}},
                   "required": ["city"], "additionalProperties": False}}}]
ask = [{"role": "user", "content": "What is the weather in Paris?"}]
for choice in ["required", {"type": "function", "function": {"name": "get_weather"}}]:
    r = client.chat.completions.create(
        model=model, messages=ask, tools=weather, tool_choice=choice, max_tokens=48, temperature=0)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and message.content is None, r
    call = message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id, call
    assert isinstance(json.loads(call.function.arguments)["city"], str), call
history = ask + [message, {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
r = client.chat.completions.create(
    model=model, messages=history, tools=weather, tool_choice="none", max_tokens=24, temperature=0)
assert r.choices[0].message.content and not r.choices[0].message.tool_calls, r
# Left to the model ("auto"): a call or text, each in its own shape.
r = client.chat.completions.create(model=model, messages=ask, tools=weather, max_tokens=48, temperature=0)
message = r.choices[0].message
assert (message.tool_calls and message.content is None and r.choices[0].finish_reason == "tool_calls") or (
    message.content and not message.tool_calls), r
# Streamed: the call comes as one tool_calls delta.
chunks = list(client.chat.completions.create(
    model=model, messages=ask, tools=weather, tool_choice="required", max_tokens=48, temperature=0, stream=True))
calls = [t for c in chunks if c.choices and c.choices[0].delta.tool_calls for t in c.choices[0].delta.tool_calls]
assert len(calls) == 1 and calls[0].function.name == "get_weather", chunks
assert json.loads(calls[0].function.arguments)["city"], calls
assert any(c.choices and c.choices[0].finish_reason == "tool_calls" for c in chunks), chunks

for kwargs, param in [
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "two words"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": weather, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"seed": 1.5, "temperature": 0.7}, "seed"),
]:
    try:
        client.chat.completions.create(model=model, messages=question, max_tokens=4, **kwargs)
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.body.get("param") == param, (kwargs, e.body)
    else:
        raise AssertionError(f"{kwargs} was accepted")

try:
    client.models.retrieve("gpt-9")
except openai.NotFoundError:
    pass
else:
    raise AssertionError("an unknown model was found")
print("ok")
