"""The official `openai` Python package against a running Spillway.

Run by tests/e2e/clients.rs with the server's inference URL, an embedding model
(MiniLM) and a generation model (SmolLM2, float32) registered. Checks what a client
of the OpenAI API sees: the model list, embeddings equal to /predictions' (float and
base64), greedy chat completions equal to the reference continuations in
../shared/refs/smollm2_dev_refs.json, streamed chunks that add up to the whole
answer, usage, and errors raised as the client's own exception types.
"""

import base64
import json
import struct
import sys

import openai

import common  # tests/clients/common.py
from common import check

base, refs_path, embedder, generator = sys.argv[1:5]
client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
refs = json.load(open(refs_path))


def predictions(model, body):
    return common.predictions(base, model, body)


ids = sorted(m.id for m in client.models.list())
check("models.list names the registered models", ids == sorted([embedder, generator]), ids)

sentences = ["hello world", "The quick brown fox jumps over the lazy dog."]
want = predictions(embedder, {"inputs": sentences})
for encoding in ["default", "float", "base64"]:
    if encoding == "default":  # the client asks for base64 and decodes it itself
        got = client.embeddings.create(model=embedder, input=sentences)
    else:
        got = client.embeddings.create(model=embedder, input=sentences, encoding_format=encoding)
    vectors = [d.embedding for d in got.data]
    if encoding == "base64":  # asked for explicitly, it is left to the caller to decode
        vectors = [list(struct.unpack(f"<{len(base64.b64decode(v)) // 4}f", base64.b64decode(v))) for v in vectors]
    worst = max(abs(a - b) for v, w in zip(vectors, want) for a, b in zip(v, w))
    check(f"embeddings ({encoding}) equal /predictions' to 1e-6", worst <= 1e-6, worst)
    check(f"embeddings ({encoding}) usage counts the tokens", got.usage.prompt_tokens >= 4, got.usage)
# Token ids from the model's own tokenizer: [CLS] hello world [SEP] is "hello world".
ids = client.embeddings.create(model=embedder, input=[[101, 7592, 2088, 102]], encoding_format="float")
worst = max(abs(a - b) for a, b in zip(ids.data[0].embedding, want[0]))
check("token-id input embeds as its text does", worst <= 1e-6 and ids.usage.prompt_tokens == 4, worst)
single = client.embeddings.create(model=embedder, input="hello world", encoding_format="float")
check("a single string input", len(single.data) == 1 and len(single.data[0].embedding) == 384)

for case in [c for c in refs["cases"] if c["kind"] == "chat"]:
    messages = [{"role": "user", "content": case["user_text"]}]
    want_tokens = case["greedy_new_token_ids"]
    want_text = case["greedy_text"].replace("<|im_end|>", "")
    answer = client.chat.completions.create(
        model=generator, messages=messages, temperature=0, max_tokens=32
    )
    text = answer.choices[0].message.content
    check(f"greedy chat of {case['user_text']!r} is the reference", text == want_text, repr(text))
    check(
        "its prompt is the reference's (the template adds the default system message)",
        answer.usage.prompt_tokens == len(case["prompt_token_ids"]),
        answer.usage,
    )
    check("its completion tokens are the reference's count", answer.usage.completion_tokens == len(want_tokens), answer.usage)
    reason = "stop" if case["stopped_at_eos"] else "length"
    check("its finish reason", answer.choices[0].finish_reason == reason, answer.choices[0].finish_reason)

    stream = client.chat.completions.create(
        model=generator,
        messages=messages,
        temperature=0,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, reasons, usage = [], [], None
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
        if chunk.usage:
            usage = chunk.usage
    check("streamed chunks add up to the whole answer", "".join(pieces) == text, repr("".join(pieces)))
    check("the stream has more than one piece", len(pieces) > 1, pieces)
    check("the stream ends with its finish reason", reasons == [reason], reasons)
    check("include_usage sends the usage", usage is not None and usage.completion_tokens == len(want_tokens), usage)

raw = refs["cases"][0]
completion = client.completions.create(model=generator, prompt=raw["prompt"], temperature=0, max_tokens=8)
want = predictions(generator, {"inputs": raw["prompt"], "parameters": {"max_new_tokens": 8}})
check("a greedy completion equals /predictions' generation", completion.choices[0].text == want["generated_text"], completion)

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    check("an unknown model is an error", False)
except openai.NotFoundError as e:
    check("an unknown model is the client's NotFoundError", "no-such-model" in str(e), e)
# Log-probabilities: one entry per generated token (the end-of-sequence token too);
# greedy picks each step's most likely token; streamed, the same entries arrive.
chat = [{"role": "user", "content": "What is 2 + 2?"}]
scored = client.chat.completions.create(
    model=generator, messages=chat, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3
)
content = scored.choices[0].logprobs.content
check("a log-probability per generated token", len(content) == scored.usage.completion_tokens, len(content))
check(
    "greedy tokens are each step's most likely",
    all(e.token == e.top_logprobs[0].token and e.logprob == e.top_logprobs[0].logprob for e in content),
)
check(
    "alternatives come most likely first, three of them, as probabilities",
    all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.top_logprobs[2].logprob <= 0 for e in content),
)
check(
    "the tokens spell the answer",
    "".join(e.token for e in content).startswith(scored.choices[0].message.content),
    [e.token for e in content],
)
check("bytes are the token's UTF-8", all(bytes(e.bytes).decode() == e.token for e in content))
streamed_entries = []
for chunk in client.chat.completions.create(
    model=generator, messages=chat, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3, stream=True
):
    for choice in chunk.choices:
        if choice.logprobs and choice.logprobs.content:
            streamed_entries.extend(choice.logprobs.content)
check(
    "streamed log-probabilities equal the whole answer's",
    [(e.token, e.logprob) for e in streamed_entries] == [(e.token, e.logprob) for e in content],
)
scored_completion = client.completions.create(model=generator, prompt=raw["prompt"], temperature=0, max_tokens=4, logprobs=2)
lp = scored_completion.choices[0].logprobs
check(
    "completions' logprobs: tokens, their log-probabilities, two alternatives each",
    len(lp.tokens) == 4 and len(lp.token_logprobs) == 4 and all(len(t) <= 2 for t in lp.top_logprobs),
    lp,
)

for name, extra in [("n > 1", {"n": 2}), ("top_logprobs > 20", {"logprobs": True, "top_logprobs": 21})]:
    try:
        client.chat.completions.create(
            model=generator, messages=[{"role": "user", "content": "hi"}], max_tokens=1, **extra
        )
        check(f"{name} is refused", False)
    except openai.BadRequestError as e:
        check(f"{name} is refused as a BadRequestError", e.status_code == 400, e)
try:
    client.embeddings.create(model=generator, input="x")
    check("embeddings of a generation model are refused", False)
except openai.BadRequestError:
    check("embeddings of a generation model are the client's BadRequestError", True)
print("all OpenAI client checks passed")
