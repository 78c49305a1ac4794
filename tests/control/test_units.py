"""Pure parts of the control plane, fed data: plans, table building, parsers, routing, rendering."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import msgspec
import pytest

from control.admin_cli import _resource
from control.admin_render import render, render_table
from control.api.app import ApiEdge, build_app
from control.api.decoding import routing_path
from control.api.errors import ApiError, validation_error
from control.api.security import sd_guards
from control.health.plan import EndpointState, MarkReady, RecordProbe, Remove, plan_endpoint, plan_round
from control.health.probe import ProbeResult, probe
from control.publish.tables import (
    EndpointRow,
    KeyRow,
    ModelRow,
    TenantRow,
    build_endpoint_table,
    build_key_table,
)
from control.reconcile_rhythm import ReconcileRhythm
from control.settings import ApiSettings
from control.store.db import Database
from control.store.tokens import hash_registration_token, new_registration_token
from control.wire import ModelCreate, RegisterRequest, Tenant
from hpcgate.logs import get_logger
from hpcgate.schemas import KeyTable, ModelLimit, decode_model_limits

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
OK = ProbeResult(ok=True, status=200)
DOWN = ProbeResult(ok=False, error="ConnectionRefusedError")


def ep(**kw: object) -> EndpointState:
    base: dict[str, object] = dict(
        endpoint_id=1,
        endpoint_job_id=10,
        node="n1",
        port=20000,
        bearer_token="b",
        job_state="registered",
        launcher="slurm",
        launcher_job_id="77",
        registered_at=NOW - timedelta(seconds=5),
        ready=False,
        consecutive_failures=0,
        startup_timeout_s=60,
    )
    base.update(kw)
    return EndpointState(**base)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- plan


def test_first_200_marks_ready_later_ones_do_nothing() -> None:
    assert plan_endpoint(ep(), OK, False, NOW, dead_after=3) == MarkReady(1, 10)
    assert plan_endpoint(ep(ready=True, job_state="ready"), OK, False, NOW, dead_after=3) is None
    assert plan_endpoint(ep(ready=True, consecutive_failures=2), OK, False, NOW, dead_after=3) == RecordProbe(
        1, 0
    )


def test_failures_count_then_kill_a_ready_endpoint() -> None:
    assert plan_endpoint(ep(ready=True), DOWN, False, NOW, dead_after=3) == RecordProbe(1, 1)
    action = plan_endpoint(ep(ready=True, consecutive_failures=2), DOWN, False, NOW, dead_after=3)
    assert isinstance(action, Remove) and action.job_state == "failed" and "unresponsive" in action.reason


def test_startup_timeout_counts_from_registration() -> None:
    young = ep(registered_at=NOW - timedelta(seconds=59))
    assert plan_endpoint(young, DOWN, False, NOW, dead_after=3) == RecordProbe(1, 1)
    old = ep(registered_at=NOW - timedelta(seconds=61), consecutive_failures=200)
    action = plan_endpoint(old, DOWN, False, NOW, dead_after=3)
    assert isinstance(action, Remove) and action.job_state == "failed"
    assert "startup_timeout_s=60" in action.reason
    # an endpoint that never became ready is not killed by dead_after, only by the timeout
    assert isinstance(plan_endpoint(ep(consecutive_failures=50), DOWN, False, NOW, dead_after=3), RecordProbe)


def test_ended_jobs_and_jobs_the_launcher_lost_are_removed() -> None:
    assert plan_endpoint(ep(job_state="ended"), None, False, NOW, dead_after=3) == Remove(
        1, 10, None, "job ended"
    )
    gone = plan_endpoint(ep(job_state="ready", ready=True), OK, True, NOW, dead_after=3)
    assert isinstance(gone, Remove) and gone.job_state == "failed"
    drained = plan_endpoint(ep(job_state="draining", ready=True), OK, True, NOW, dead_after=3)
    assert isinstance(drained, Remove) and drained.job_state == "ended"


def test_plan_round_keys_results_by_endpoint() -> None:
    eps = [ep(endpoint_id=1, endpoint_job_id=10), ep(endpoint_id=2, endpoint_job_id=20, ready=True)]
    actions = plan_round(eps, {1: OK, 2: OK}, frozenset({20}), NOW, dead_after=3)
    assert actions == [MarkReady(1, 10), Remove(2, 20, "failed", "launcher reports the job gone")]


# ----------------------------------------------------------------------------- tables


def model(name: str, **kw: object) -> ModelRow:
    base: dict[str, object] = dict(
        name=name, aliases=(), state="active", state_reason=None, desired_instances=1, max_model_len=None
    )
    base.update(kw)
    return ModelRow(**base)  # type: ignore[arg-type]


def row(endpoint_id: int, model_name: str, **kw: object) -> EndpointRow:
    base: dict[str, object] = dict(
        endpoint_id=endpoint_id,
        endpoint_job_id=endpoint_id * 10,
        model=model_name,
        node="n1",
        port=20000 + endpoint_id,
        launcher_job_id=None,
        bearer_token="b",
        consecutive_failures=0,
        draining=False,
    )
    base.update(kw)
    return EndpointRow(**base)  # type: ignore[arg-type]


def test_endpoint_table_states_and_routability() -> None:
    models = [
        model("a", aliases=("a1",)),
        model("b"),
        model("c", desired_instances=0),
        model("d", state="failed", state_reason="boom"),
        model("e", state="draining"),
    ]
    rows = [
        row(2, "a"),
        row(1, "a", consecutive_failures=1),
        row(3, "b", draining=True),
        row(4, "e", draining=True),
    ]
    table = build_endpoint_table(models, rows, unroutable_after=1, version=7, generated_at=1.5)
    assert table.version == 7 and [e.endpoint_id for e in table.endpoints] == [1, 2, 3, 4]
    assert [e.ready for e in table.endpoints] == [False, True, True, True]
    assert table.endpoints[0].url == "http://n1:20001"
    states = {m.name: (m.state, m.reason) for m in table.models}
    assert states == {
        "a": ("ready", None),
        "b": ("starting", None),
        "c": ("stopped", "scaled to zero"),
        "d": ("failed", "boom"),
        "e": ("stopped", "draining"),
    }
    assert table.models[0].aliases == ("a1",)


def test_key_table_leaves_out_keys_of_disabled_tenants() -> None:
    tenants = [
        TenantRow(
            tenant_id=1, name="t1", allowed_models=("m",), max_concurrent_requests=None, tokens_per_minute=5,
            model_limits=decode_model_limits('{"m": {"tokens_per_minute": 2}}'), monthly_token_quota=9,
        )
    ]
    keys = [
        KeyRow(key_hash=b"\x01" * 32, prefix="hpg_a", tenant_id=1, expires_at=NOW),
        KeyRow(key_hash=b"\x02" * 32, prefix="hpg_b", tenant_id=2, expires_at=None),
    ]
    table = build_key_table(tenants, keys, version=3)
    assert [k.key_hash for k in table.keys] == ["01" * 32]
    assert table.keys[0].expires_at == NOW.timestamp()
    assert table.tenants[0].allowed_models == ("m",) and table.tenants[0].tokens_per_minute == 5
    # per-model limits and the quota reach the gateways through the published snapshot
    wire = msgspec.json.decode(msgspec.json.encode(table), type=KeyTable)
    assert wire.tenants[0].model_limits == {"m": ModelLimit(tokens_per_minute=2)}
    assert wire.tenants[0].monthly_token_quota == 9


# ----------------------------------------------------------------------------- probe, tokens


async def test_probe_maps_every_answer_to_a_result_and_never_raises() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        port = request.url.port
        if port == 1:
            return httpx.Response(200, text="ok")
        if port == 2:
            return httpx.Response(503)
        raise httpx.ConnectError("refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        assert await probe(client, "n1", 1, "t0k", 1.0) == ProbeResult(ok=True, status=200)
        assert await probe(client, "n1", 2, None, 1.0) == ProbeResult(False, 503, "status_503")
        assert await probe(client, "::1", 3, None, 1.0) == ProbeResult(ok=False, error="ConnectError")
    assert seen[0].url == "http://n1:1/health" and seen[0].headers["authorization"] == "Bearer t0k"
    assert "authorization" not in seen[1].headers
    assert str(seen[2].url) == "http://[::1]:3/health"


def test_registration_tokens_are_random_and_hashed() -> None:
    a, b = new_registration_token(), new_registration_token()
    assert a != b and len(a) >= 43
    assert hash_registration_token(a) == hash_registration_token(a) != hash_registration_token(b)
    assert len(hash_registration_token(a)) == 32


# ----------------------------------------------------------------------------- the API's edges, wire types


async def _call(
    app: ApiEdge, method: str, raw_path: bytes, token: str | None = None
) -> tuple[int, dict[str, str], Any]:
    """One request through the ASGI app, no sockets: status, headers, decoded JSON body."""
    sent: list[dict[str, Any]] = []
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    raw_path, _, query = raw_path.partition(b"?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "server": ("127.0.0.1", 8081), "client": ("127.0.0.1", 5000),
             "root_path": "", "path": raw_path.decode("latin-1"), "raw_path": raw_path, "query_string": query,
             "headers": headers}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    head = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    return sent[0]["status"], head, msgspec.json.decode(b"".join(m.get("body", b"") for m in sent[1:]))


def test_routing_path_keeps_encoded_slashes_inside_their_segment() -> None:
    assert routing_path(b"/admin/models/org%2Fm/drain?x=1") == "/admin/models/org%2Fm/drain"
    assert routing_path(b"/admin/models/a%25b%20c") == "/admin/models/a%25b c"  # "%" stays escaped
    assert routing_path(b"/admin/models/%FF") is None


async def test_routes_errors_and_guards_answer_error_bodies() -> None:
    settings = ApiSettings(admin_token="adm", sd_token="sdt", key_hash_secret="k")
    app = build_app(Database(settings.database_url), settings)  # never opened: no route below reaches it
    status, _, body = await _call(app, "GET", b"/admin/models/org%2Fm")  # routed: its guard answers
    assert (status, body["error"]) == (401, "unauthorized")
    status, head, body = await _call(app, "PUT", b"/admin/models/x", "adm")
    assert (status, body["error"]) == (405, "method_not_allowed") and "GET" in head["allow"]
    status, _, body = await _call(app, "GET", b"/admin/nothing", "adm")
    assert (status, body) == (404, {"error": "not_found", "message": "no such route", "path": None})
    status, _, body = await _call(app, "GET", b"/admin/models/%FF", "adm")
    assert (status, body["error"]) == (404, "not_found")
    status, _, body = await _call(app, "GET", b"/admin/jobs/abc", "adm")
    assert (status, body["error"], body["path"]) == (422, "validation_error", "path.job_id")
    assert [(await _call(app, "GET", b"/sd/vllm", t))[0] for t in (None, "x")] == [401, 401]
    bad_queries = ((b"state=bogus", "query.state"), (b"limit=0", "query.limit"), (b"all=maybe", "query.all"))
    for query, path in bad_queries:
        status, _, body = await _call(app, "GET", b"/admin/jobs?" + query, "adm")
        assert (status, body["path"]) == (422, path), body
    status, _, body = await _call(app, "GET", b"/admin/usage?since=2026-01-01T00:00:00", "adm")  # no zone
    assert (status, body["path"]) == (422, "query.since"), body


def test_validation_errors_name_the_field() -> None:
    with pytest.raises(msgspec.ValidationError) as exc:
        msgspec.json.decode(b'{"name": "m", "min_instances": -1}', type=ModelCreate)
    err = validation_error(exc.value)
    assert err.status == 422 and err.body.path == "$.min_instances"
    with pytest.raises(msgspec.DecodeError) as bad:
        msgspec.json.decode(b"{", type=ModelCreate)
    assert validation_error(bad.value).status == 400


@pytest.mark.parametrize("token", ["a b", "a\r\nX-Injected: 1", "", "x" * 513])
def test_bearer_tokens_that_could_break_a_header_are_rejected(token: str) -> None:
    body = {
        "endpoint_job_id": 1,
        "registration_token": "t",
        "launcher_job_id": "1",
        "node": "n",
        "model": "m",
        "bearer_token": token,
    }
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(body, RegisterRequest)


def test_cli_rendering_and_resource_parsing() -> None:
    assert _resource("gpus=2") == ("gpus", 2)
    assert _resource("exclusive=true") == ("exclusive", True)
    assert _resource("partition=gpu") == ("partition", "gpu")
    text = render_table(("a", "bb"), [[1, None], [True, ["x", "y"]]])
    assert text.splitlines() == ["A    BB", "1    -", "yes  x,y"]
    tenant = Tenant(
        tenant_id=1,
        name="t",
        enabled=True,
        allowed_models=None,
        max_concurrent_requests=None,
        tokens_per_minute=None,
        active_keys=0,
        created_at=NOW,
        updated_at=NOW,
    )
    assert "NAME" in render([tenant]) and "t" in render([tenant]).splitlines()[1]
    assert render([]) == "(none)"


def test_sd_token_when_set_admits_it_or_the_admin_token() -> None:
    class Connection:
        def __init__(self, auth: str | None) -> None:
            self.headers = {"authorization": auth} if auth else {}

    def admitted(guards: list[Any], auth: str | None) -> bool:
        try:
            for guard in guards:
                guard(Connection(auth), None)
        except ApiError as exc:
            assert exc.status == 401 and exc.headers == {"www-authenticate": "Bearer"}
            return False
        return True

    closed = sd_guards("sdt", "adm")
    assert [admitted(closed, a) for a in (None, "Bearer x", "Bearer sdt", "bearer adm", "Basic sdt")] == [
        False, False, True, True, False]
    assert admitted(sd_guards("", "adm"), None)  # open unless sd_token is set


async def test_launcher_observer_judges_only_jobs_older_than_its_look() -> None:
    from control.health.observer import LauncherObserver, LiveJob
    from control.launchers.base import JobState, ObservedJob

    class FakeLauncher:
        kind = "slurm"

        def __init__(self) -> None:
            self.calls = 0
            self.jobs = [
                ObservedJob(launcher_job_id="1", name="p-a", state=JobState.RUNNING),
                ObservedJob(launcher_job_id="2", name="p-b", state=JobState.ENDED),
            ]

        async def observe(self, name_prefix: str) -> list[ObservedJob]:
            self.calls += 1
            return self.jobs

    now = [1000.0]
    launcher = FakeLauncher()
    observer = LauncherObserver(launcher, "p-", min_interval_s=10, clock=lambda: now[0], skew_s=5)  # type: ignore[arg-type]
    jobs = [
        LiveJob(10, "slurm", "1", 900.0),
        LiveJob(20, "slurm", "2", 900.0),
        LiveJob(30, "slurm", "3", 999.0),
        LiveJob(40, "local", "x", 900.0),
    ]
    assert await observer.gone(jobs) == frozenset({20})  # 30 registered after the look started (minus skew)
    now[0] = 1005.0
    assert await observer.gone(jobs) == frozenset({20}) and launcher.calls == 1  # cached
    now[0] = 1011.0
    assert await observer.gone(jobs) == frozenset({20, 30}) and launcher.calls == 2


def test_endpoint_table_announces_priority_scheduling() -> None:
    rows = [row(1, "a"), row(2, "a", capabilities=("chat", "completions", "priority"))]
    table = build_endpoint_table([model("a")], rows, unroutable_after=1)
    assert [e.priority for e in table.endpoints] == [False, True]


def test_a_daemon_outage_is_logged_once_backs_off_and_its_end_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hpcgate.test.rhythm")
    rhythm = ReconcileRhythm("worker", get_logger("hpcgate.test.rhythm"), interval_s=2.0, backoff_cap_s=4.0)
    assert rhythm.after_success() == 2.0 and not caplog.records
    delays = [rhythm.after_failure(ConnectionRefusedError("db down")) for _ in range(6)]
    assert 0.25 <= delays[0] <= 0.5 and all(d <= 4.0 for d in delays) and max(delays) >= 2.0  # grows, capped
    delays.append(rhythm.after_failure(TimeoutError()))
    assert rhythm.failing == "TimeoutError"
    assert rhythm.after_success() == 2.0 and rhythm.after_success() == 2.0
    said = [(r.getMessage(), getattr(r, "fields", {})) for r in caplog.records]
    assert said == [
        ("worker_degraded", {"error": "db down", "error_type": "ConnectionRefusedError"}),
        ("worker_recovered", {"was": "TimeoutError"}),
    ]
    assert rhythm.failing is None and 0.25 <= rhythm.after_failure(OSError()) <= 0.5  # backoff starts over
