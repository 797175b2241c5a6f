"""Structured outputs and tool calling with the official `openai` package against a
running Spillway serving SmolLM2 (tests/e2e/clients.rs runs it).

Checks what a client sees: `response_format` json_schema answers that validate against
their schema (`jsonschema` from PyPI) for several prompts and schemas, greedy and
sampled, on /v1/chat/completions, /v1/completions (vLLM's guided_json) and /predictions
(TGI's grammar); `json_object` answers that parse; a required tool call and a named one
whose arguments validate; a multi-turn tool conversation that goes back through the
template; streamed deltas that add up to the whole answer (tool calls included); and
fields that are refused by name.
"""

import json
import sys

import jsonschema
import openai

import common  # tests/clients/common.py
from common import check

base, generator = sys.argv[1:3]
client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)

person = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "languages": {"type": "array", "items": {"enum": ["en", "fr", "de"]}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "languages"],
    "additionalProperties": False,
}
answer_schema = {
    "type": "object",
    "properties": {"answer": {"type": "integer"}, "sure": {"type": "boolean"}},
    "required": ["answer", "sure"],
    "additionalProperties": False,
}
cases = [
    ("Describe a person as JSON.", person),
    ("Invent a French speaker.", person),
    ("What is 2 + 2? Answer in JSON.", answer_schema),
]
for prompt, schema in cases:
    for sampled in [False, True]:
        extra = {"temperature": 0.8, "seed": 11} if sampled else {"temperature": 0}
        answer = client.chat.completions.create(
            model=generator,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=120,
            response_format={"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}},
            **extra,
        )
        text = answer.choices[0].message.content
        label = f"{prompt!r} ({'sampled' if sampled else 'greedy'})"
        check(f"{label}: the answer ends by itself", answer.choices[0].finish_reason == "stop", answer.choices[0])
        try:
            jsonschema.validate(json.loads(text), schema)
            valid = True
        except Exception as e:  # noqa: BLE001 - any failure is the check's
            valid = e
        check(f"{label}: the answer validates against its schema", valid is True, (text, valid))

for prompt in ["Return a JSON object with the keys city and country for Paris.", "Return a JSON object with the keys name and age for Ann, who is 30."]:
    obj = client.chat.completions.create(
        model=generator,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=120,
        temperature=0,
        response_format={"type": "json_object"},
    )
    text = obj.choices[0].message.content
    check(f"json_object {prompt!r}: the answer ends by itself", obj.choices[0].finish_reason == "stop", obj)
    check(f"json_object {prompt!r}: the answer parses as an object", isinstance(json.loads(text), dict), text)

completion = client.completions.create(
    model=generator, prompt="A person, as JSON:", max_tokens=120, temperature=0, extra_body={"guided_json": person}
)
jsonschema.validate(json.loads(completion.choices[0].text), person)
check("completions with vLLM's guided_json validate", True)
choice = client.completions.create(
    model=generator, prompt="Is the sky blue?", max_tokens=5, temperature=0, extra_body={"guided_choice": ["yes", "no"]}
)
check("guided_choice answers one of the choices", choice.choices[0].text in ["yes", "no"], choice.choices[0].text)
regex = client.chat.completions.create(
    model=generator,
    messages=[{"role": "user", "content": "A date?"}],
    max_tokens=20,
    temperature=0,
    extra_body={"guided_regex": "[0-9]{4}-[0-9]{2}-[0-9]{2}"},
)
import re  # noqa: E402

check("guided_regex answers match", re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", regex.choices[0].message.content), regex)

tgi = common.predictions(
    base,
    generator,
    {"inputs": "A person, as JSON:", "parameters": {"max_new_tokens": 120, "grammar": {"type": "json", "value": person}}},
)
jsonschema.validate(json.loads(tgi["generated_text"]), person)
check("/predictions with TGI's grammar validates", True)

# Streaming: the deltas add up to the whole (greedy) answer.
messages = [{"role": "user", "content": "Describe a person as JSON."}]
fmt = {"type": "json_schema", "json_schema": {"name": "out", "schema": person}}
whole = client.chat.completions.create(model=generator, messages=messages, max_tokens=120, temperature=0, response_format=fmt)
pieces = []
for chunk in client.chat.completions.create(
    model=generator, messages=messages, max_tokens=120, temperature=0, response_format=fmt, stream=True
):
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
check("streamed constrained deltas add up to the whole answer", "".join(pieces) == whole.choices[0].message.content, pieces)

# Tools.
weather = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
time_tool = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 30}}, "required": ["zone"]},
    },
}
ask = [{"role": "user", "content": "What is the weather in Paris?"}]
# One call per answer (parallel_tool_calls false): offered more, SmolLM2-135M repeats its
# call until max_tokens (checked below).
for tool_choice in ["required", {"type": "function", "function": {"name": "get_weather"}}]:
    called = client.chat.completions.create(
        model=generator,
        messages=ask,
        tools=[weather, time_tool],
        tool_choice=tool_choice,
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=100,
    )
    message = called.choices[0].message
    check(f"tool_choice {tool_choice}: finish_reason tool_calls", called.choices[0].finish_reason == "tool_calls", called)
    check(f"tool_choice {tool_choice}: calls come back", bool(message.tool_calls), message)
    for call in message.tool_calls:
        schema = {"get_weather": weather, "get_time": time_tool}[call.function.name]["function"]["parameters"]
        jsonschema.validate(json.loads(call.function.arguments), schema)
        check(f"tool_choice {tool_choice}: {call.function.name}'s arguments validate", call.id.startswith("call_"))
    if isinstance(tool_choice, dict):
        check("a named function is the one called", all(c.function.name == "get_weather" for c in message.tool_calls))

parallel = client.chat.completions.create(
    model=generator, messages=ask, tools=[weather, time_tool], tool_choice="required", temperature=0, max_tokens=100
)
calls = parallel.choices[0].message.tool_calls or []
check("parallel calls: at least one whole call", len(calls) >= 1, parallel)
for c in calls:
    schema = {"get_weather": weather, "get_time": time_tool}[c.function.name]["function"]["parameters"]
    jsonschema.validate(json.loads(c.function.arguments), schema)
check("parallel calls: each one's arguments validate", True)

# The call and its result go back through the template for the next turn.
call = message.tool_calls[0]
follow = client.chat.completions.create(
    model=generator,
    messages=ask
    + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "clear"})},
    ],
    tools=[weather, time_tool],
    tool_choice="none",
    temperature=0,
    max_tokens=30,
)
check("a tool conversation's next turn is answered as text", bool(follow.choices[0].message.content), follow)
check("tool_choice none makes no calls", not follow.choices[0].message.tool_calls, follow)
alone = client.chat.completions.create(model=generator, messages=ask, max_tokens=1, temperature=0)
check(
    "the call and its result were in the prompt",
    follow.usage.prompt_tokens > alone.usage.prompt_tokens + 20,
    (follow.usage, alone.usage),
)

# Streamed, a required call arrives as a tool_calls delta.
streamed_calls, reasons = [], []
for chunk in client.chat.completions.create(
    model=generator,
    messages=ask,
    tools=[weather],
    tool_choice="required",
    parallel_tool_calls=False,
    temperature=0,
    max_tokens=100,
    stream=True,
):
    for c in chunk.choices:
        if c.delta.tool_calls:
            streamed_calls.extend(c.delta.tool_calls)
        if c.finish_reason:
            reasons.append(c.finish_reason)
whole_calls = client.chat.completions.create(
    model=generator, messages=ask, tools=[weather], tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=100
).choices[0].message.tool_calls
check(
    "streamed tool calls equal the whole answer's",
    [(c.function.name, c.function.arguments) for c in streamed_calls]
    == [(c.function.name, c.function.arguments) for c in whole_calls],
    (streamed_calls, whole_calls),
)
check("the stream ends with finish_reason tool_calls", reasons == ["tool_calls"], reasons)

# Nothing silently ignored.
for name, extra in [
    ("an unknown field", {"extra_body": {"frobnicate": 1}}),
    ("store: true", {"store": True}),
    ("two grammars", {"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}}),
    ("a bad schema keyword", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}}),
    ("logit_bias past the vocabulary", {"logit_bias": {"999999": 5}}),
    ("presence_penalty out of range", {"presence_penalty": 3}),
]:
    try:
        client.chat.completions.create(model=generator, messages=ask, max_tokens=2, **extra)
        check(f"{name} is refused", False)
    except openai.BadRequestError as e:
        check(f"{name} is refused as a BadRequestError", e.status_code == 400, e)
try:
    client.chat.completions.create(model=generator, messages=ask, max_tokens=2, extra_body={"frobnicate": 1})
    check("an unknown field is refused", False)
except openai.BadRequestError as e:
    check("the refusal names the field", "frobnicate" in str(e), e)
biased = client.chat.completions.create(
    model=generator, messages=ask, max_tokens=4, temperature=0, logit_bias={"28": 100}
)
forced = client.chat.completions.create(model=generator, messages=ask, max_tokens=4, temperature=0, logprobs=True)
check("logit_bias +100 on a token makes greedy decoding pick it", biased.choices[0].message.content != forced.choices[0].message.content, biased)
print("all structured-output checks passed")
