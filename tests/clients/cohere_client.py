"""Cohere's Python SDK (`cohere`, the client LangChain's and LlamaIndex's Cohere rerankers
wrap) against a running Spillway's `POST /v1/rerank`.

Run by tests/e2e/encoders.rs with the server's inference URL and a cross-encoder
registered as text_classification. The ranking and scores the client parses must equal
what TEI's `/rerank` answers on the same server for the same pairs; a field Spillway does
not serve is the client's BadRequestError.
"""

import json
import sys
import urllib.request

import cohere

from common import check

base, model = sys.argv[1:3]
query = "the quick brown fox"
documents = ["hello world", "the quick brown fox jumps", "rust model server"]

request = urllib.request.Request(
    f"{base}/rerank",
    data=json.dumps({"model": model, "query": query, "texts": documents}).encode(),
    headers={"content-type": "application/json"},
)
want = json.load(urllib.request.urlopen(request))

client = cohere.Client(api_key="unused", base_url=base)
answer = client.rerank(model=model, query=query, documents=documents, top_n=2,
                       return_documents=True)
check("top_n results", len(answer.results) == 2, answer)
check("best first, as /rerank ranks",
      [r.index for r in answer.results] == [w["index"] for w in want[:2]], (answer, want))
check("relevance scores are /rerank's",
      all(abs(r.relevance_score - w["score"]) < 1e-6 for r, w in zip(answer.results, want)),
      (answer, want))
check("documents come back", [r.document.text for r in answer.results]
      == [documents[w["index"]] for w in want[:2]], answer)
answer = client.rerank(model=model, query=query, documents=[{"text": d} for d in documents],
                       return_documents=False)
check("structured documents, all ranked, none returned",
      len(answer.results) == 3 and all(r.document is None for r in answer.results), answer)
try:
    client.rerank(model=model, query=query, documents=documents, max_chunks_per_doc=4)
    check("an unserved field is refused", False, "answered")
except cohere.errors.BadRequestError as error:
    check("an unserved field is refused by name", "max_chunks_per_doc" in str(error.body), error)
print("done")
