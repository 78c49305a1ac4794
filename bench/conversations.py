"""Workloads for prefix caching and cache-aware routing, synthesized offline (pure, no downloads).

Every workload is a list of conversations; a conversation is a system prompt and the user
messages of its turns. A client runs a conversation's turns one after the other, each turn
resending the whole history (system, every earlier question and the answer it received) plus
the next question, as chat clients do; it waits ``think_s`` between turns.

- ``multi-turn``: many conversations of several turns; a conversation shares its history with
  its own later turns only (each has its own system prompt).
- ``shared-prefix``: groups of one-turn requests whose long system prompt is the same within a
  group (a RAG application, a tribunal's jurors) and different between groups.
- ``no-sharing``: one-turn requests with nothing in common, the control.

The default sizes are chosen so that what the workload shares does not fit every instance's KV
cache at once (64 conversations growing to ~3,700 tokens; 32 prefixes of 4,000 tokens; the
``gpu-l`` profile holds 120,000 tokens): spread over all instances, as least-queue spreads it,
prefixes are evicted and recomputed; kept together, each instance holds its share.

Texts are built from :func:`bench.sim.textgen.make_prompt`, so their length in tokens is exact
under the simulator's rule (one token per word); ``seed`` shifts the words so two workloads of
the same shape differ.
"""

from __future__ import annotations

import msgspec

from bench.sim.textgen import make_prompt


class Conversation(msgspec.Struct, frozen=True):
    system: str
    questions: tuple[str, ...]  # one user message per turn


class ConversationWorkload(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str
    conversations: tuple[Conversation, ...]
    answer_tokens: int  # max_tokens of every turn (sent with ignore_eos)
    think_s: float = 0.0

    @property
    def requests(self) -> int:
        return sum(len(c.questions) for c in self.conversations)


WORKLOADS = ("multi-turn", "shared-prefix", "no-sharing")


def _text(tokens: int, tag: str, offset: int) -> str:
    return tag + " " + make_prompt(tokens - 1, offset=offset)


def multi_turn(conversations: int = 64, turns: int = 8, *, system_tokens: int = 1000,
               question_tokens: int = 300, answer_tokens: int = 32, think_s: float = 0.1,
               seed: int = 0) -> ConversationWorkload:
    convs = tuple(
        Conversation(_text(system_tokens, f"conversation-{seed}-{c}", seed + c),
                     tuple(_text(question_tokens, f"question-{c}-{t}", seed + 7 * c + t)
                           for t in range(turns)))
        for c in range(conversations))
    return ConversationWorkload(
        name="multi-turn", conversations=convs, answer_tokens=answer_tokens, think_s=think_s,
        description=f"{conversations} conversations x {turns} turns; system {system_tokens} tokens, "
                    f"question {question_tokens}, answer {answer_tokens}, think {think_s} s")


def shared_prefix(groups: int = 32, per_group: int = 16, *, prefix_tokens: int = 4000,
                  question_tokens: int = 100, answer_tokens: int = 32, seed: int = 0) -> ConversationWorkload:
    prefixes = [_text(prefix_tokens, f"group-{seed}-{g}", seed + g) for g in range(groups)]
    # interleaved, so a group's requests arrive spread over the run, not back to back
    convs = tuple(Conversation(prefixes[i % groups], (_text(question_tokens, f"request-{i}", seed + i),))
                  for i in range(groups * per_group))
    return ConversationWorkload(
        name="shared-prefix", conversations=convs, answer_tokens=answer_tokens,
        description=f"{groups} groups x {per_group} requests; shared prefix {prefix_tokens} tokens, "
                    f"question {question_tokens}, answer {answer_tokens}")


def no_sharing(requests: int = 192, *, prompt_tokens: int = 1500, answer_tokens: int = 32,
               seed: int = 0) -> ConversationWorkload:
    convs = tuple(Conversation(_text(prompt_tokens, f"unique-{seed}-{i}", seed + i), ("go on",))
                  for i in range(requests))
    return ConversationWorkload(
        name="no-sharing", conversations=convs, answer_tokens=answer_tokens,
        description=f"{requests} unrelated requests of {prompt_tokens + 2} tokens, answer {answer_tokens}")


def build(name: str, seed: int = 0, scale: float = 1.0) -> ConversationWorkload:
    """A workload by name; ``scale`` multiplies its number of conversations (tests use less)."""
    def n(x: int) -> int:
        return max(1, round(x * scale))

    if name == "multi-turn":
        return multi_turn(n(64), seed=seed)
    if name == "shared-prefix":
        return shared_prefix(32, n(16), seed=seed)
    if name == "no-sharing":
        return no_sharing(n(192), seed=seed)
    raise ValueError(f"unknown workload {name!r}: one of {', '.join(WORKLOADS)}")
