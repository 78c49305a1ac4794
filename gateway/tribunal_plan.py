"""The tribunal's pure logic: request checks, step bodies, anonymisation, deadlines, usage sums.

No I/O here (the orchestration is :mod:`gateway.tribunal`): every function takes data and
returns data, so the protocol is unit-tested by feeding it values.

The protocol of one request (``rounds`` R, peer review P):

1. jurors answer the conversation concurrently (each with its own system prompt/temperature);
2. if P: each juror that answered revises against the other answers, anonymised;
3. R times: the judge critiques the anonymised answers, each juror revises against it;
4. the judge (or the fallback judge) writes the final answer from the anonymised answers.

Deadlines: the request has one total deadline; each phase gets at most its step timeout and
never so much that a later phase would get less than its fair share of what is left
(:func:`phase_budget`), so step timeouts never add up past the deadline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import msgspec

from gateway.errors import ApiError
from hpcgate.schemas.tribunal import TribunalEntry, render

# The fields of a client's body a step does not forward: the gateway sets them per step, or
# they are this feature's own extension.
_STEP_DROPPED = ("stream", "stream_options", "deliberation", "n", "model", "messages")

_decode_body = msgspec.json.Decoder(dict[str, Any]).decode
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class TribunalRequest:
    base: dict[str, Any]  # the client's body without the fields a step sets
    messages: list[Any]
    question: str
    stream: bool
    include_usage: bool
    deliberation: bool


def parse_request(body: bytes, tribunal: TribunalEntry) -> TribunalRequest:
    """The client's chat body (already checked for JSON, ``model`` and ``messages`` by the
    routing view); 400 for what a tribunal cannot do."""
    try:
        doc = _decode_body(body)
    except (msgspec.DecodeError, UnicodeDecodeError):  # the routing view decoded it already: rare
        raise ApiError(400, "request body must be a JSON object", "invalid_body") from None
    messages = doc.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "'messages' must be a non-empty array of message objects", "invalid_body",
                       "messages")
    if doc.get("n", 1) not in (1, None):
        raise ApiError(400, "a tribunal answers with one choice: 'n' must be 1", "invalid_body", "n")
    if doc.get("tools") or doc.get("functions"):
        raise ApiError(400, "a tribunal does not call tools", "invalid_body", "tools")
    flag = doc.get("deliberation", False)
    if not isinstance(flag, bool):
        raise ApiError(400, "'deliberation' must be true or false", "invalid_body", "deliberation")
    opts = doc.get("stream_options")
    include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
    base = {k: v for k, v in doc.items() if k not in _STEP_DROPPED}
    return TribunalRequest(base, messages, question_of(messages), bool(doc.get("stream")), include_usage,
                           flag or tribunal.show_deliberation)


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def question_of(messages: list[Any]) -> str:
    """The last user message's text (what ``{question}`` stands for)."""
    for m in reversed(messages):
        if m.get("role") == "user":
            return _text(m.get("content"))
    return ""


def step_body(req: TribunalRequest, model: str, messages: list[Any], *, stream: bool,
              temperature: float | None = None) -> bytes:
    """One step's upstream body: the client's parameters, this step's model and messages."""
    doc = dict(req.base)
    doc["model"] = model
    doc["messages"] = messages
    if temperature is not None:
        doc["temperature"] = temperature
    if stream:
        doc["stream"] = True
        doc["stream_options"] = {"include_usage": True}  # exact usage, summed per model
    return _encode(doc)


def juror_messages(req: TribunalRequest, system_prompt: str | None) -> list[Any]:
    if system_prompt is None:
        return req.messages
    return [{"role": "system", "content": system_prompt}, *req.messages]


def revise_messages(req: TribunalRequest, system_prompt: str | None, prompt: str) -> list[Any]:
    """A juror's revision: its conversation, then the revision request (the prompt carries its
    previous answer and the critique or the peers' answers)."""
    return [*juror_messages(req, system_prompt), {"role": "user", "content": prompt}]


def judge_messages(req: TribunalRequest, prompt: str) -> list[Any]:
    """The judge sees the conversation and, as the last user turn, the rendered prompt."""
    return [*req.messages[:-1], {"role": "user", "content": prompt}] if req.messages[-1].get(
        "role") == "user" else [*req.messages, {"role": "user", "content": prompt}]


def anonymised(answers: list[str], seed: int) -> str:
    """The answers numbered in a shuffled order: which juror (model) wrote which is not told."""
    order = list(range(len(answers)))
    random.Random(seed).shuffle(order)
    return "\n\n".join(f"Answer {n}:\n{answers[i]}" for n, i in enumerate(order, start=1))


def render_prompt(template: str, **values: object) -> str:
    return render(template, values)


def phases(t: TribunalEntry) -> list[float]:
    """The step timeout of each sequential phase, in order."""
    out = [t.juror_timeout_s]
    if t.peer_review:
        out.append(t.juror_timeout_s)
    for _ in range(t.rounds):
        out += [t.judge_timeout_s, t.juror_timeout_s]
    out.append(t.judge_timeout_s)
    return out


def phase_budget(remaining: float, timeouts: list[float]) -> float:
    """Seconds for the first of ``timeouts`` (the phases left, this one first): its own timeout,
    less what the later phases are owed (each the smaller of its timeout and an equal share of
    ``remaining``). Never negative; the budgets of all phases never sum past ``remaining``."""
    if remaining <= 0 or not timeouts:
        return 0.0
    share = remaining / len(timeouts)
    owed = sum(min(t, share) for t in timeouts[1:])
    return max(0.0, min(timeouts[0], remaining - owed))


@dataclass(slots=True)
class Tally:
    """Token usage summed per underlying model."""

    by_model: dict[str, list[int]] = field(default_factory=dict)

    def add(self, model: str, prompt: int, completion: int) -> None:
        row = self.by_model.setdefault(model, [0, 0])
        row[0] += prompt
        row[1] += completion

    @property
    def prompt(self) -> int:
        return sum(r[0] for r in self.by_model.values())

    @property
    def completion(self) -> int:
        return sum(r[1] for r in self.by_model.values())

    def usage(self) -> dict[str, int]:
        p, c = self.prompt, self.completion
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def per_model(self) -> dict[str, dict[str, int]]:
        return {m: {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
                for m, (p, c) in sorted(self.by_model.items())}


def quorum_lost(t: TribunalEntry, answered: int, asked: int, failures: list[tuple[str, str]],
                stage: str) -> ApiError:
    failed = "; ".join(f"{m}: {why}" for m, why in failures) or "none"
    return ApiError(502, f"tribunal {t.model!r}: {answered} of {asked} jurors answered ({stage}), quorum is "
                    f"{t.quorum}; failed: {failed}", "tribunal_quorum_lost")


def judge_failed(t: TribunalEntry, failures: list[tuple[str, str]]) -> ApiError:
    failed = "; ".join(f"{m}: {why}" for m, why in failures)
    return ApiError(502, f"tribunal {t.model!r}: the judge failed ({failed})", "tribunal_judge_failed")
