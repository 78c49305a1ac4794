"""Locust load test of an OpenAI-compatible endpoint (the gateway on Kubernetes, or ``hpcgate sim``).

    locust -f bench/locustfile.py --host http://GATEWAY:8000 --model NAME --api-key KEY \
        --headless -u 200 -r 20 -t 5m

Each user streams chat completions and reports two entries: the whole request (type ``POST``,
name ``chat``: time until the stream ends) and the time to first token as its own metric
(type ``TTFT``, name ``chat``), fired when the first SSE ``data:`` line with a non-empty
``choices`` arrives. Options: ``--model``, ``--api-key``, ``--max-tokens``, ``--prompt-words``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from locust import HttpUser, between, events, task


@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def _options(parser: Any) -> None:
    parser.add_argument("--model", default="sim-model", help="model name to request")
    parser.add_argument("--api-key", default="none", help="bearer token")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request")
    parser.add_argument("--prompt-words", type=int, default=200, help="prompt length in words")


class OpenAIStreamingUser(HttpUser):
    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.model = getattr(opts, "model", "sim-model")
        self.max_tokens = int(getattr(opts, "max_tokens", 64))
        words = int(getattr(opts, "prompt_words", 200))
        self.prompt = " ".join(["load"] + ["test"] * (words - 1))
        self.headers = {"authorization": f"Bearer {getattr(opts, 'api_key', 'none')}"}

    @task
    def chat(self) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": self.prompt}],
                "max_tokens": self.max_tokens, "stream": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        first: float | None = None
        with self.client.post("/v1/chat/completions", json=body, headers=self.headers, stream=True,
                              catch_response=True, name="chat") as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            done = False
            for line in resp.iter_lines():
                if not line or not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                if first is None and json.loads(data).get("choices"):
                    first = time.perf_counter()
                    self.environment.events.request.fire(
                        request_type="TTFT", name="chat", response_time=(first - start) * 1000.0,
                        response_length=0, exception=None, context={})
            if not done:
                resp.failure("stream ended without [DONE]")
            elif first is None:
                resp.failure("no token in the stream")
            else:
                resp.success()
