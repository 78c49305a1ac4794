"""The tribunal's configuration as published to gateways, its default prompts and placeholders.

A tribunal is a virtual model ``tribunal/<name>``: jurors answer the conversation
concurrently, a judge reads their anonymised answers and writes the final answer. Rounds let
the judge critique and the jurors revise; peer review lets jurors revise against each other's
anonymised answers first. The control plane validates a configuration (models exist, prompts
use only the placeholders of their role) before storing it; the gateway renders the prompts
with :func:`render`, which substitutes values into the template only (a value containing
braces is never re-read as a placeholder).

Placeholders per role (``{name}``; a literal brace is written ``{{`` or ``}}``):

- ``judge_prompt`` (the final verdict): ``{question}``, ``{answers}``, ``{answered}``, ``{jurors}``
- ``critique_prompt`` (the judge between rounds): same as ``judge_prompt``, and ``{round}``
- ``revise_prompt`` (a juror, after a critique): ``{question}``, ``{answer}``, ``{critique}``, ``{round}``
- ``review_prompt`` (a juror, peer review): ``{question}``, ``{answer}``, ``{peers}``

``{question}`` is the last user message, ``{answers}`` the numbered answers ("Answer 1: ...")
in an order that does not reveal which model wrote which, ``{answered}``/``{jurors}`` how many
jurors answered / were asked, ``{answer}`` the juror's own previous answer, ``{peers}`` the
other jurors' anonymised answers, ``{critique}`` the judge's critique, ``{round}`` the round (1..).
"""

from __future__ import annotations

import string

import msgspec

TRIBUNAL_PREFIX = "tribunal/"

DEFAULT_JUDGE_PROMPT = (
    "You are the judge of a panel. {answered} of {jurors} panel members answered the question "
    "below. Read their answers, weigh them, and write the single best final answer to the "
    "question. Answer the question directly; do not mention the panel.\n\n"
    "Question:\n{question}\n\nPanel answers:\n{answers}"
)
DEFAULT_CRITIQUE_PROMPT = (
    "You are the judge of a panel (round {round}). {answered} of {jurors} panel members answered "
    "the question below. Point out errors, omissions and disagreements in their answers, "
    "briefly, so that they can revise them. Do not write the final answer.\n\n"
    "Question:\n{question}\n\nPanel answers:\n{answers}"
)
DEFAULT_REVISE_PROMPT = (
    "Revise your answer to the question after this critique (round {round}). Write only the "
    "revised answer.\n\nQuestion:\n{question}\n\nYour answer:\n{answer}\n\nCritique:\n{critique}"
)
DEFAULT_REVIEW_PROMPT = (
    "Other panel members answered the same question. Review their answers and revise yours. "
    "Write only the revised answer.\n\nQuestion:\n{question}\n\nYour answer:\n{answer}\n\n"
    "Other answers:\n{peers}"
)

_COMMON = frozenset({"question", "answers", "answered", "jurors"})
PLACEHOLDERS: dict[str, frozenset[str]] = {
    "judge_prompt": _COMMON,
    "critique_prompt": _COMMON | {"round"},
    "revise_prompt": frozenset({"question", "answer", "critique", "round"}),
    "review_prompt": frozenset({"question", "answer", "peers"}),
}


class Juror(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    model: str
    temperature: float | None = None  # None: the client's (or the engine's default)
    system_prompt: str | None = None  # put before the conversation, as a system message


class TribunalEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One tribunal as the gateways hold it (validated by the control plane)."""

    name: str  # exposed as the model "tribunal/<name>"
    jurors: tuple[Juror, ...]
    judge: str
    fallback_judge: str | None = None  # asked when the judge fails
    judge_prompt: str = DEFAULT_JUDGE_PROMPT
    critique_prompt: str = DEFAULT_CRITIQUE_PROMPT
    revise_prompt: str = DEFAULT_REVISE_PROMPT
    review_prompt: str = DEFAULT_REVIEW_PROMPT
    rounds: int = 0  # 0: jurors once, judge once; each round adds a critique and a revision
    quorum: int = 1  # jurors that must answer each juror step
    juror_timeout_s: float = 60.0  # per juror step (capped by what is left of the deadline)
    judge_timeout_s: float = 120.0  # per judge step (critique or verdict)
    deadline_s: float = 300.0  # the whole tribunal request
    grace_s: float = 2.0  # stragglers' time once the quorum answered, then they are cancelled
    peer_review: bool = False
    show_deliberation: bool = False  # stream/return the deliberation even when not asked

    @property
    def model(self) -> str:
        return TRIBUNAL_PREFIX + self.name

    @property
    def models(self) -> frozenset[str]:
        """Every model a request may call."""
        out = {j.model for j in self.jurors} | {self.judge}
        if self.fallback_judge:
            out.add(self.fallback_judge)
        return frozenset(out)


def prompt_error(field: str, template: str) -> str | None:
    """Why ``template`` is not a valid prompt for ``field``; None if it is."""
    allowed = PLACEHOLDERS[field]
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"{field}: {exc} (write a literal brace as '{{{{' or '}}}}')"
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in allowed:
            what = f"{{{name}}}" if name else "'{}'"
            return (f"{field}: unknown placeholder {what}; allowed: "
                    + ", ".join(f"{{{n}}}" for n in sorted(allowed)))
        if spec or conversion:
            return f"{field}: placeholder {{{name}}} takes no format spec or conversion"
    return None


def render(template: str, values: dict[str, object]) -> str:
    """``template`` with its placeholders replaced (the template was validated)."""
    return template.format_map(values)
