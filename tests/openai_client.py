"""The official `openai` Python client against a node: what it sends is honoured, or
refused with a 400 that names the parameter. Usage: openai_client.py BASE_URL MODEL"""
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

for kwargs, param in [
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logprobs": True}, "logprobs"),
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
