"""The control API under generated inputs schemathesis does not reach (Hypothesis): registration
tokens, job ids, nodes and ports; ids and names in admin paths (percent-encoded slashes, NULs,
huge numbers); template names (path traversal); tokens in ``Authorization``.

Properties, per example: no 5xx; a registration with a token nobody issued never succeeds; a
template name that could leave the template directories is refused with 422 and stores nothing;
a wrong admin token is a 401 whatever it looks like (400 when it is not a valid header value).
After the run, the API's log holds no ``api_internal_error``. ``HPCGATE_FUZZ_EXAMPLES`` sets the
examples per property (a third of the gateway fuzzer's, at least 20: these go through PostgreSQL).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control.jobs.render import builtin_templates
from tests.control.conftest import Stack
from tests.control.daemons import ADMIN_TOKEN, Daemon

EXAMPLES = max(20, int(os.environ.get("HPCGATE_FUZZ_EXAMPLES") or 300) // 3)
_run = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

_odd = st.sampled_from(["", "\x00", "..", "../..", "/etc/passwd", "a/b", "%2F", "\u202e", "é" * 200, " ",
                        "9" * 40, "-1", "0", "1e3", "0x10", "null", "true", "[]", "{}", "sim\x00",
                        "SIM", "sim ", "../../slurm/templates/sim", "~root", "$(id)", "`id`"])
_text = st.one_of(st.text(max_size=60), _odd)
_number = st.one_of(st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=False, allow_infinity=False), _text)  # JSON has no inf
_value = st.one_of(st.none(), st.booleans(), _number, _text, st.lists(_text, max_size=3))


@st.composite
def _registration(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {
        "endpoint_job_id": draw(st.one_of(st.integers(1, 50), _number)),
        "registration_token": draw(st.one_of(st.text(min_size=43, max_size=43), _text)),
        "launcher_job_id": draw(st.one_of(st.just("local-1"), _text)),
        "node": draw(st.one_of(st.just("127.0.0.1"), st.just("::1"), _text)),
        "model": draw(st.one_of(st.just("fuzz-reg"), _text)),
        "capabilities": draw(st.one_of(st.just(["chat"]), st.lists(_text, max_size=3), _value)),
        "bearer_token": draw(st.one_of(st.just("b" * 20), _value)),
    }
    for name in draw(st.lists(st.sampled_from(sorted(body)), max_size=2)):
        body.pop(name, None)
    if draw(st.booleans()):
        body[draw(_text)] = draw(_value)
    return body


def _client(stack: Stack, token: str = ADMIN_TOKEN) -> httpx.Client:
    return httpx.Client(base_url=stack.api_url, timeout=10, headers={"authorization": f"Bearer {token}"})


def _fuzz_registration(stack: Stack) -> None:
    with _client(stack) as client:
        @_run
        @given(body=_registration())
        def check(body: dict[str, Any]) -> None:
            reply = client.post("/v1/register", json=body)
            assert reply.status_code < 500, (reply.status_code, reply.text, body)
            assert reply.status_code != 200, f"registered with a token nobody issued: {body}"

        check()


def _fuzz_admin_paths(stack: Stack) -> None:
    templates = ("/admin/jobs/{}", "/admin/jobs/{}/cancel", "/admin/keys/{}/revoke", "/admin/tenants/{}",
                 "/admin/models/{}", "/admin/models/{}/drain", "/admin/endpoints/{}/drain",
                 "/admin/tenants/{}/keys", "/admin/tribunals/{}")
    with _client(stack) as client:
        @_run
        @given(template=st.sampled_from(templates), segment=st.one_of(_text, st.integers().map(str)),
               method=st.sampled_from(["GET", "POST", "PATCH", "DELETE"]), raw=st.booleans())
        def check(template: str, segment: str, method: str, raw: bool) -> None:
            plain = raw and not any(c in segment for c in "/?#")  # else percent-encoded, %2F included
            path = template.format(segment if plain else quote(segment, safe=""))
            try:
                reply = client.request(method, path, json={} if method in ("POST", "PATCH") else None)
            except httpx.InvalidURL:
                return  # the client would not send it
            assert reply.status_code < 500, (method, path, reply.status_code, reply.text)

        check()


def _fuzz_template_names(stack: Stack) -> None:
    with _client(stack) as client:
        @_run
        @given(name=st.one_of(_odd, st.text(max_size=70),
                              st.from_regex(r"[a-z0-9./_-]{1,70}", fullmatch=True)))
        def check(name: str) -> None:
            body = {"name": "fuzz-tpl", "slurm_template": name}
            reply = client.post("/admin/models", json=body)
            assert reply.status_code < 500, (reply.status_code, reply.text, name)
            if reply.status_code == 201:
                client.delete("/admin/models/fuzz-tpl")
                assert name in builtin_templates(), f"template {name!r} accepted"
            if "/" in name or ".." in name or "\x00" in name:
                assert reply.status_code == 422, (name, reply.status_code, reply.text)

        check()


def _fuzz_tokens(stack: Stack) -> None:
    @_run
    @given(token=st.one_of(_text, st.text(min_size=1, max_size=200), st.just(ADMIN_TOKEN + "x"),
                           st.just(ADMIN_TOKEN[:-1])))
    def check(token: str) -> None:
        try:
            headers = {"authorization": f"Bearer {token}".encode("utf-8", "surrogateescape")}
            with httpx.Client(base_url=stack.api_url, timeout=10) as client:
                reply = client.get("/admin/tenants", headers=headers)  # type: ignore[arg-type]
        except (httpx.LocalProtocolError, UnicodeEncodeError):
            return  # not a header any client can send
        # 401, or 400 from the HTTP server for a header value with control characters
        assert reply.status_code in (400, 401) or token.strip() == ADMIN_TOKEN, (token, reply.status_code)

    check()


async def test_generated_control_inputs_never_get_a_5xx(stack: Stack, api: Daemon) -> None:
    await stack.add_model("fuzz-reg")
    for fuzz in (_fuzz_registration, _fuzz_admin_paths, _fuzz_template_names, _fuzz_tokens):
        await asyncio.to_thread(fuzz, stack)
    assert not api.events("api_internal_error"), api.events("api_internal_error")[:3]
