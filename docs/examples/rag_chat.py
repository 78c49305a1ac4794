"""A small retrieval-augmented chatbot on hpcgate: embeddings, in-memory retrieval, streaming chat.

    export OPENAI_BASE_URL=http://127.0.0.1:8080/v1 OPENAI_API_KEY=hpg_...   # what `hpcgate up` printed
    python docs/examples/rag_chat.py "How are GPU jobs scheduled?"
    python docs/examples/rag_chat.py --model tribunal/panel --deliberation "How are GPU jobs scheduled?"

1. The documents (``--docs DIR`` of .txt/.md files, else the few built in below) are embedded
   once through the gateway's ``/v1/embeddings`` (``--embedding-model``).
2. The question is embedded the same way; the ``--top`` documents with the highest cosine
   similarity are retrieved (all in memory: a list of vectors, no vector database).
3. ``/v1/chat/completions`` answers with those documents as context, streamed token by token.
   Any model works, a tribunal too (``--model tribunal/NAME``); ``--deliberation`` asks a
   tribunal for its deliberation, printed to stderr as it streams (``reasoning_content``).

Only the ``openai`` package is needed. Against ``hpcgate sim`` the answer is simulated text, but
retrieval is real: the simulator's embeddings are a hashed bag of words (docs/simulator.md).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from openai import OpenAI

BUILT_IN = {
    "slurm.md": "Slurm schedules the GPU jobs of the cluster: each model instance is a batch job "
                "submitted with sbatch to a GPU partition, and scancel stops it.",
    "keys.md": "Every user calls the API with an API key. Keys belong to tenants; a tenant may be "
               "limited to some models, to concurrent requests and to tokens per minute.",
    "tribunal.md": "A tribunal is a virtual model: several juror models answer, a judge model reads "
                   "their anonymised answers and writes the final answer.",
    "bread.md": "Bake bread with flour, water, salt and yeast; let the dough rise twice.",
}


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def load_docs(directory: str | None) -> dict[str, str]:
    if directory is None:
        return BUILT_IN
    paths = sorted(p for p in Path(directory).iterdir() if p.suffix in (".txt", ".md"))
    return {p.name: p.read_text() for p in paths}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("question")
    p.add_argument("--model", default="demo", help="chat model, or tribunal/NAME (default demo)")
    p.add_argument("--embedding-model", default="demo", help="model for /v1/embeddings (default demo)")
    p.add_argument("--docs", help="a directory of .txt/.md documents (default: a few built in)")
    p.add_argument("--top", type=int, default=2, help="documents given as context (default 2)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--deliberation", action="store_true", help="a tribunal's deliberation, to stderr")
    args = p.parse_args(argv)

    client = OpenAI()  # OPENAI_BASE_URL and OPENAI_API_KEY
    docs = load_docs(args.docs)
    names = list(docs)
    vectors = [d.embedding for d in client.embeddings.create(model=args.embedding_model,
                                                              input=[docs[n] for n in names]).data]
    query = client.embeddings.create(model=args.embedding_model, input=[args.question]).data[0].embedding
    ranked = sorted(zip(names, vectors, strict=True), key=lambda nv: cosine(query, nv[1]), reverse=True)
    chosen = [name for name, _ in ranked[: args.top]]
    print("retrieved:", ", ".join(chosen), flush=True)

    context = "\n\n".join(f"[{name}]\n{docs[name]}" for name in chosen)
    messages = [
        {"role": "system", "content": "Answer from the documents below; say so if they do not answer "
                                      f"the question.\n\n{context}"},
        {"role": "user", "content": args.question},
    ]
    stream = client.chat.completions.create(
        model=args.model, messages=messages, stream=True, max_tokens=args.max_tokens,  # type: ignore[arg-type]
        extra_body={"deliberation": True} if args.deliberation else None)
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        thinking = getattr(delta, "reasoning_content", None)
        if thinking:
            print(thinking, end="", file=sys.stderr, flush=True)
        if delta.content:
            print(delta.content, end="", flush=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
