"""The registration API against a real ``hpcgate control api`` and PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest

from tests.control.conftest import Stack
from tests.control.daemons import Daemon, http


async def test_register_assigns_a_port_and_marks_the_job_registered(stack: Stack, api: Daemon) -> None:
    model_id = await stack.add_model("reg/basic")
    job_id, token = await stack.add_job(model_id)
    status, body = await stack.register(job_id, token, "reg/basic", launcher_job_id="4242", bearer="tok-1")
    assert status == 200, body
    start = int(stack.env["HPCGATE_API_PORT_RANGE_START"])
    assert start <= body["port"] <= start + 99
    assert body["model"] == "reg/basic"

    (job,) = await stack.sql(
        "SELECT state, launcher_job_id, registered_at, registration_used_at FROM ai_model_endpoint_jobs"
        " WHERE endpoint_job_id = $1",
        job_id,
    )
    assert job["state"] == "registered" and job["launcher_job_id"] == "4242"
    assert job["registered_at"] is not None and job["registration_used_at"] is not None
    (ep,) = await stack.sql("SELECT * FROM ai_model_endpoints WHERE endpoint_job_id = $1", job_id)
    assert (ep["endpoint_id"], ep["node"], ep["port"], ep["bearer_token"]) == (
        body["endpoint_id"],
        "127.0.0.1",
        body["port"],
        "tok-1",
    )
    assert ep["capabilities"] == ["chat"]


async def test_repeating_the_same_claim_returns_the_same_port(stack: Stack, api: Daemon) -> None:
    model_id = await stack.add_model("reg/idem")
    job_id, token = await stack.add_job(model_id)
    first = await stack.register(job_id, token, "reg/idem", launcher_job_id="77")
    again = await stack.register(job_id, token, "reg/idem", launcher_job_id="77")
    assert first == again and first[0] == 200
    rows = await stack.sql("SELECT count(*) AS n FROM ai_model_endpoints WHERE endpoint_job_id = $1", job_id)
    assert rows[0]["n"] == 1

    other_node = await stack.register(job_id, token, "reg/idem", launcher_job_id="77", node="node9")
    other_job = await stack.register(job_id, token, "reg/idem", launcher_job_id="78")
    assert other_node[0] == 409 and other_job[0] == 409


async def test_bad_claims_are_refused_with_the_right_status(stack: Stack, api: Daemon) -> None:
    model_id = await stack.add_model("reg/bad")
    job_id, token = await stack.add_job(model_id)

    assert (await stack.register(job_id, token + "x", "reg/bad"))[0] == 401
    assert (await stack.register(10**12, token, "reg/bad"))[0] == 401
    status, body = await stack.register(job_id, token, "reg/other")
    assert status == 409 and body["path"] == "$.model"

    expired_job, expired_token = await stack.add_job(model_id, expires_in_s=-1)
    status, body = await stack.register(expired_job, expired_token, "reg/bad")
    assert status == 401 and "expired" in body["message"]

    ended_job, ended_token = await stack.add_job(model_id, state="cancelling")
    assert (await stack.register(ended_job, ended_token, "reg/bad"))[0] == 409

    # the refused attempts left the job registrable
    assert (await stack.register(job_id, token, "reg/bad"))[0] == 200


@pytest.mark.parametrize(
    ("patch", "path"),
    [
        ({"endpoint_job_id": "one"}, "$.endpoint_job_id"),
        ({"endpoint_job_id": 0}, "$.endpoint_job_id"),
        ({"node": "bad node"}, "$.node"),
        ({"bearer_token": "has\r\nnewline"}, "$.bearer_token"),
        ({"capabilities": "chat"}, "$.capabilities"),
        ({"unexpected": 1}, None),
    ],
)
async def test_invalid_bodies_get_422_naming_the_field(
    stack: Stack, api: Daemon, patch: dict[str, object], path: str | None
) -> None:
    body = {
        "endpoint_job_id": 1,
        "registration_token": "t",
        "launcher_job_id": "1",
        "node": "n1",
        "model": "m",
        "bearer_token": "b",
        **patch,
    }
    status, answer = await http("POST", f"{stack.api_url}/v1/register", body)
    assert status == 422, answer
    assert answer["error"] == "validation_error"
    if path:
        assert answer["path"] == path


async def test_malformed_json_is_400_and_never_5xx(stack: Stack, api: Daemon) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
    payload = b'{"endpoint_job_id": 1,'
    writer.write(
        b"POST /v1/register HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
    )
    raw = await reader.read()
    writer.close()
    assert raw.startswith(b"HTTP/1.1 400")


async def test_fifty_concurrent_registrations_on_one_node_get_fifty_ports(stack: Stack, api: Daemon) -> None:
    model_id = await stack.add_model("reg/fifty")
    jobs = [await stack.add_job(model_id) for _ in range(50)]
    results = await asyncio.gather(
        *(stack.register(job_id, token, "reg/fifty", node="busy-node") for job_id, token in jobs)
    )
    assert all(status == 200 for status, _ in results), results
    ports = {body["port"] for _, body in results}
    assert len(ports) == 50
    start = int(stack.env["HPCGATE_API_PORT_RANGE_START"])
    assert ports == set(range(start, start + 50))  # lowest free ports, no gaps

    # the range has 100 ports: the 101st registration on that node is refused, not given a duplicate
    more = [await stack.add_job(model_id) for _ in range(51)]
    results = await asyncio.gather(
        *(stack.register(job_id, token, "reg/fifty", node="busy-node") for job_id, token in more)
    )
    assert sorted(status for status, _ in results) == [200] * 50 + [409]


async def test_a_removed_endpoints_port_is_not_handed_out_next(stack: Stack, api: Daemon) -> None:
    """A port a foreign process holds breaks one job, not every job after it."""
    model_id = await stack.add_model("reg/rotate")
    first_job, first_token = await stack.add_job(model_id)
    status, first = await stack.register(first_job, first_token, "reg/rotate", node="rot-node")
    assert status == 200
    # the job failed on its port and its endpoint was removed (as the Endpoint Worker does)
    await stack.sql("DELETE FROM ai_model_endpoints WHERE endpoint_job_id = $1", first_job)
    second_job, second_token = await stack.add_job(model_id)
    status, second = await stack.register(second_job, second_token, "reg/rotate", node="rot-node")
    assert status == 200
    assert second["port"] == first["port"] + 1
