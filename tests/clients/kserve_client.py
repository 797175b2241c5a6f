"""NVIDIA's `tritonclient[http]` (a KServe v2 / Open Inference Protocol client) against a
running Spillway.

Run by tests/e2e/clients.rs with the server's inference URL, an embedding model
(MiniLM) and a generation model (SmolLM2) registered. Checks health, metadata,
readiness, and inference with the binary tensor extension (the client's default) and
with JSON tensors: embeddings equal /predictions', generated text equal to
/predictions' greedy answer, and errors raised as the client's exception.
"""

import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import common  # tests/clients/common.py
from common import check

base, embedder, generator = sys.argv[1:4]
client = httpclient.InferenceServerClient(url=base.removeprefix("http://"))


def predictions(model, body):
    return common.predictions(base, model, body)


check("the server is live", client.is_server_live())
check("the server is ready", client.is_server_ready())
check("server metadata names it", client.get_server_metadata()["name"] == "spillway")
check("the embedding model is ready", client.is_model_ready(embedder))
check("an unknown model is not ready", not client.is_model_ready("no-such-model"))

metadata = client.get_model_metadata(embedder)
check("metadata names the model", metadata["name"] == embedder, metadata)
check(
    "metadata gives the input and output tensors",
    metadata["inputs"][0]["datatype"] == "BYTES" and metadata["outputs"][0]["name"] == "embedding",
    metadata,
)

sentences = ["hello world", "The quick brown fox jumps over the lazy dog.", "ünïcödé"]
want = np.array(predictions(embedder, {"inputs": sentences}), dtype=np.float32)
for binary in [True, False]:
    text = httpclient.InferInput("text", [len(sentences)], "BYTES")
    text.set_data_from_numpy(np.array([s.encode() for s in sentences], dtype=object), binary_data=binary)
    output = httpclient.InferRequestedOutput("embedding", binary_data=binary)
    result = client.infer(embedder, [text], outputs=[output], request_id="r1")
    got = result.as_numpy("embedding")
    mode = "binary" if binary else "JSON"
    check(f"embeddings ({mode} tensors) have shape [n, 384]", got.shape == (3, 384), got.shape)
    worst = float(np.abs(got - want).max())
    check(f"embeddings ({mode} tensors) equal /predictions' to 1e-6", worst <= 1e-6, worst)
    check(f"the response carries the request id ({mode})", result.get_response()["id"] == "r1")

prompt = "The capital of France is"
want_text = predictions(generator, {"inputs": prompt, "parameters": {"max_new_tokens": 8}})["generated_text"]
text_input = httpclient.InferInput("text_input", [1], "BYTES")
text_input.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
result = client.infer(generator, [text_input], parameters={"max_new_tokens": 8})
generated = result.as_numpy("text_output")[0].decode()
check("generated text equals /predictions' greedy answer", generated == want_text, repr(generated))

try:
    client.infer("no-such-model", [text])
    check("an unknown model is an error", False)
except InferenceServerException as e:
    check("an unknown model is the client's InferenceServerException", "no-such-model" in str(e), e)
wrong = httpclient.InferInput("text", [1], "BYTES")
wrong.set_data_from_numpy(np.array([b"one"], dtype=object), binary_data=False)
wrong.set_shape([2])  # a shape that disagrees with the data
try:
    client.infer(embedder, [wrong])
    check("a shape that disagrees with the data is an error", False)
except InferenceServerException as e:
    check("a shape that disagrees with the data is refused", "shape" in str(e), e)
print("all KServe v2 client checks passed")
