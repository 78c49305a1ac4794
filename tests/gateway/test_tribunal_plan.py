"""The tribunal's pure logic, fed data: prompts, request checks, anonymisation, deadlines, usage."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import ApiError
from gateway.tribunal_plan import (
    Tally,
    anonymised,
    judge_messages,
    juror_messages,
    parse_request,
    phase_budget,
    phases,
    render_prompt,
    step_body,
)
from hpcgate.schemas import Juror, TribunalEntry
from hpcgate.schemas.tribunal import PLACEHOLDERS, prompt_error

T = TribunalEntry(name="t", jurors=(Juror(model="a"), Juror(model="b")), judge="j", rounds=2,
                  peer_review=True, juror_timeout_s=10, judge_timeout_s=20, deadline_s=60)


def body(**fields: object) -> bytes:
    doc = {"model": "tribunal/t", "messages": [{"role": "system", "content": "s"},
                                               {"role": "user", "content": "q?"}], **fields}
    return msgspec.json.encode(doc)


def test_default_prompts_are_valid_and_errors_name_the_reason() -> None:
    for field in PLACEHOLDERS:
        assert prompt_error(field, getattr(T, field)) is None
    assert "unknown placeholder {peers}" in (prompt_error("judge_prompt", "{peers}") or "")
    assert "'{}'" in (prompt_error("judge_prompt", "{}") or "")
    assert "format spec" in (prompt_error("judge_prompt", "{answers:>10}") or "")
    assert "literal brace" in (prompt_error("judge_prompt", "{answers") or "")
    assert prompt_error("judge_prompt", "{{literal}} {answers}") is None


def test_values_are_never_read_as_placeholders() -> None:
    assert render_prompt("A: {answer}", answer="{critique} {0}") == "A: {critique} {0}"


def test_request_checks_and_step_bodies() -> None:
    req = parse_request(body(stream=True, stream_options={"include_usage": True}, max_tokens=5,
                             deliberation=True, temperature=0.5), T)
    assert req.stream and req.include_usage and req.deliberation and req.question == "q?"
    one = msgspec.json.decode(step_body(req, "a", juror_messages(req, "be brief"), stream=False,
                                        temperature=0.1))
    assert one["model"] == "a" and one["temperature"] == 0.1 and one["max_tokens"] == 5
    assert "stream" not in one and "deliberation" not in one and "stream_options" not in one
    assert one["messages"][0] == {"role": "system", "content": "be brief"} and len(one["messages"]) == 3
    judge = msgspec.json.decode(step_body(req, "j", judge_messages(req, "P"), stream=True))
    assert judge["stream"] is True and judge["stream_options"] == {"include_usage": True}
    assert judge["temperature"] == 0.5 and judge["messages"][-1] == {"role": "user", "content": "P"}
    assert len(judge["messages"]) == 2  # the question's turn replaced by the rendered prompt
    assert parse_request(body(), msgspec.structs.replace(T, show_deliberation=True)).deliberation
    for bad in ({"n": 2}, {"deliberation": 1}, {"messages": []}, {"messages": ["x"]}, {"tools": [{}]}):
        with pytest.raises(ApiError) as err:
            parse_request(body(**bad), T)
        assert err.value.status == 400


_scalar = st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=4)
_value = _scalar | st.lists(_scalar, max_size=2) | st.dictionaries(
    st.sampled_from(["role", "content", "text", "include_usage"]), _scalar, max_size=2)
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", 3]),
                                  "content": _value | st.lists(st.fixed_dictionaries({"text": _scalar}))})
_FIELDS = ["n", "tools", "deliberation", "stream", "stream_options", "max_tokens"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(_FIELDS), _value, max_size=4), st.lists(_message, max_size=3) | _value)
def test_any_json_body_is_a_request_or_a_400(fields: dict[str, object], messages: object) -> None:
    try:
        req = parse_request(msgspec.json.encode({"model": "tribunal/t", "messages": messages, **fields}), T)
    except ApiError as exc:
        assert exc.status == 400
        return
    step_body(req, "a", judge_messages(req, "P"), stream=req.stream)  # and its steps can be built


def test_anonymised_answers_hide_the_order_but_keep_every_answer() -> None:
    answers = [f"answer of juror {i}" for i in range(6)]
    text = anonymised(answers, 7)
    assert all(a in text for a in answers) and text.startswith("Answer 1:\n")
    assert anonymised(answers, 7) == text  # deterministic per request
    assert {anonymised(answers, s) for s in range(10)} != {text}  # but not the configured order


def test_phases_of_a_tribunal() -> None:
    assert phases(T) == [10, 10, 20, 10, 20, 10, 20]  # jurors, review, 2 x (critique, revise), verdict


@given(st.floats(0, 1000), st.lists(st.floats(0.01, 500), min_size=1, max_size=12))
def test_phase_budgets_never_exceed_the_deadline(remaining: float, timeouts: list[float]) -> None:
    left, total = remaining, 0.0
    for i in range(len(timeouts)):
        b = phase_budget(left, timeouts[i:])
        assert 0.0 <= b <= timeouts[i] + 1e-9
        total += b
        left -= b  # a phase that used all of its budget
    assert total <= remaining + 1e-6


def test_a_phase_keeps_a_share_for_the_later_ones() -> None:
    assert phase_budget(60, [60, 60]) == 30  # not all of it: the verdict keeps its share
    assert phase_budget(60, [60, 5]) == 55  # a quick later phase needs only its timeout
    assert phase_budget(0, [10]) == 0


def test_usage_is_summed_per_model() -> None:
    t = Tally()
    t.add("a", 10, 2)
    t.add("a", 5, 1)
    t.add("j", 30, 7)
    assert t.usage() == {"prompt_tokens": 45, "completion_tokens": 10, "total_tokens": 55}
    assert t.per_model()["a"] == {"prompt_tokens": 15, "completion_tokens": 3, "total_tokens": 18}
