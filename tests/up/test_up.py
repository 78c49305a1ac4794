"""``hpcgate up``: the whole stack on one machine answers an OpenAI client, then stops cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import re
import signal
import socket
import sys
from pathlib import Path

import asyncpg
import httpx
import openai
import pytest

from hpcgate.up_state import proc_start
from tests.support.procs import HPCGATE, child_env, hpcgate_cmd, wait_until

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
TRIBUNAL_DOC = ROOT / "docs" / "tribunal.md"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _read_until(stream: asyncio.StreamReader, pattern: re.Pattern[str], seen: list[str],
                      timeout: float) -> re.Match[str]:
    async def scan() -> re.Match[str]:
        while line := (await stream.readline()).decode():
            seen.append(line)
            if match := pattern.search(line):
                return match
        raise AssertionError("hpcgate up exited early:\n" + "".join(seen))

    return await asyncio.wait_for(scan(), timeout)


def _command_lines() -> list[str]:
    """Every process's command line on this machine, as ``ps`` shows them to any user."""
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                lines.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:  # it ended meanwhile
                continue
    return lines


async def _no_secret_in_a_command_line(pg_dsn: str, data_dir: Path, key: str) -> list[str]:
    """The admin token, the key-hash secret, the API key and the instances' bearer tokens of the
    running stack appear in no process's argv (they travel in environments and files)."""
    secrets = json.loads((data_dir / "secrets.json").read_text())
    conn = await asyncpg.connect(pg_dsn)
    try:
        bearers = [r["bearer_token"] for r in await conn.fetch(
            """SELECT e.bearer_token FROM ai_model_endpoints e JOIN ai_model_configurations m USING (model_id)
                WHERE m.name = 'up-demo'""")]
    finally:
        await conn.close()
    assert bearers, "no registered instance to check"
    wanted = {"admin token": secrets["admin_token"], "key-hash secret": secrets["key_hash_secret"],
              "API key": key, **{f"bearer token {i}": b for i, b in enumerate(bearers)}}
    lines = _command_lines()
    assert any("hpcgate" in line and " sim " in line for line in lines), "no simulated instance running"
    for what, secret in wanted.items():
        leaks = [line for line in lines if secret in line]
        assert not leaks, f"the {what} is on a command line: {leaks}"
    return bearers


async def _errors_and_admin_calls(url: str, key: str, env: dict[str, str], cwd: Path) -> str:
    """What a session does besides the happy path: wrong, revoked and missing keys, bad bodies,
    unknown models, admin calls that succeed and fail. Returns the key an admin call created."""
    good = openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0)
    await good.embeddings.create(model="up-demo", input="hello")
    with pytest.raises(openai.NotFoundError):
        await good.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        await good.chat.completions.create(model="up-demo", messages="not a list")  # type: ignore[arg-type]
    await good.close()
    async with httpx.AsyncClient(timeout=10) as client:
        for headers, body in (({"authorization": f"Bearer {key}x"}, b"{}"),  # a wrong key
                              ({"authorization": f"Bearer {key}"}, b"{not json"),
                              ({}, b"{}")):
            reply = await client.post(f"{url}/chat/completions", content=body,
                                      headers={**headers, "content-type": "application/json"})
            assert 400 <= reply.status_code < 500, reply.text
    rc, out, err = await _run(hpcgate_cmd("admin", "tenant", "create", "up-other"), env, cwd)
    assert rc == 0, err
    rc, out, err = await _run(hpcgate_cmd("admin", "--json", "key", "create", "up-other"), env, cwd)
    assert rc == 0, err
    created = json.loads(out)
    rc, _, err = await _run(hpcgate_cmd("admin", "--token", "wrong-admin-token", "tenant", "list"), env, cwd)
    assert rc == 1 and "401" in err
    key_id = str(created["api_key"]["key_id"])
    rc, _, err = await _run(hpcgate_cmd("admin", "key", "revoke", key_id), env, cwd)
    assert rc == 0, err
    revoked = openai.AsyncOpenAI(base_url=url, api_key=created["key"], max_retries=0)

    async def refused() -> bool:
        try:
            await revoked.models.list()
        except openai.AuthenticationError:
            return True
        return False

    await wait_until(refused, 10, "the revoked key to be refused")
    await revoked.close()
    return str(created["key"])


_TOKEN_LIKE = re.compile(rb"[A-Za-z0-9_-]{43,}")  # runs that could hold a 43-character token


async def _no_secret_in_the_logs(pg_dsn: str, data_dir: Path, keys: dict[str, str],
                                 bearers: list[str]) -> None:
    """No log of the session (daemons, gateway, instances, ``up`` itself) holds the admin token,
    the key-hash secret, an API key, an instance's bearer token, or a registration token (only
    their hashes are stored: every 43-character token-like string of the logs is hashed and
    compared)."""
    secrets = json.loads((data_dir / "secrets.json").read_text())
    conn = await asyncpg.connect(pg_dsn)
    try:
        registration_hashes = {bytes(r["h"]) for r in await conn.fetch(
            "SELECT registration_token_hash AS h FROM ai_model_endpoint_jobs")}
    finally:
        await conn.close()
    assert bearers and registration_hashes, "no instance registered: nothing to look for"  # (bearers:
    # taken while the instances ran; an ended job's endpoint row is gone)
    wanted = {"admin token": secrets["admin_token"], "key-hash secret": secrets["key_hash_secret"], **keys,
              **{f"bearer token {i}": b for i, b in enumerate(bearers)}}
    await asyncio.to_thread(_scan_logs, data_dir, wanted, registration_hashes)


def _scan_logs(data_dir: Path, wanted: dict[str, str], registration_hashes: set[bytes]) -> None:
    logs = [p for p in data_dir.rglob("*") if p.is_file() and p.name not in ("secrets.json", "env.sh")]
    assert any(p.suffix == ".log" for p in logs), logs
    for path in logs:
        text = path.read_bytes()
        for what, secret in wanted.items():
            assert secret.encode() not in text, f"the {what} is in {path}"
        for run in _TOKEN_LIKE.findall(text):
            for i in range(len(run) - 42):  # every 43-character window (a token glued to a name)
                leaked = hashlib.sha256(run[i:i + 43]).digest() in registration_hashes
                assert not leaked, f"a registration token is in {path}"


async def _start_up(env: dict[str, str], cwd: Path, gateway_port: int, api_port: int
                    ) -> tuple[asyncio.subprocess.Process, list[str], str, str]:
    proc = await asyncio.create_subprocess_exec(
        *hpcgate_cmd("up", "--gateway-port", str(gateway_port), "--api-port", str(api_port),
                     "--instances", "2"),
        env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        url = (await _read_until(proc.stdout, re.compile(r"gateway URL : (\S+)"), seen, 90)).group(1)
        key = (await _read_until(proc.stdout, re.compile(r"API key     : (hpg_\S+)"), seen, 5)).group(1)
        await _read_until(proc.stdout, re.compile(r"Ctrl-C stops everything"), seen, 5)
    except BaseException:
        await _stop_up(proc, seen)
        raise
    return proc, seen, url, key


async def _stop_up(proc: asyncio.subprocess.Process, seen: list[str]) -> None:
    assert proc.stdout is not None
    if proc.returncode is None:
        proc.send_signal(signal.SIGINT)
    seen.append((await asyncio.wait_for(proc.stdout.read(), 60)).decode())
    await proc.wait()
    assert proc.returncode == 0, "".join(seen)


async def _run(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*argv, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode(), err.decode()


def _doc_block(doc: Path, lang: str, marker: str) -> str:
    blocks = re.findall(rf"^```{lang}\n(.*?)^```", doc.read_text(), re.MULTILINE | re.DOTALL)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"{doc.name} lost its {lang} example with {marker!r}"
    return str(found[0]).replace("demo", "up-demo")  # this stack's model is named up-demo


def _readme_block(lang: str, marker: str) -> str:
    return _doc_block(README, lang, marker)


async def _tribunal_examples(url: str, key: str, cwd: Path) -> None:
    """README's tribunal example and the RAG example (docs/examples/rag_chat.py), as written,
    against this stack: configured through the admin CLI, published, served by the gateway."""
    bare = child_env(PATH=f"{Path(HPCGATE).parent}:/usr/bin:/bin")  # `hpcgate` as a user runs it
    create = _readme_block("sh", "tribunal create")
    assert create == _doc_block(TRIBUNAL_DOC, "sh", "tribunal create")  # one example, shown twice
    rc, out, err = await _run(["bash", "-c", create], bare, cwd)
    assert rc == 0 and "tribunal/panel" in out, err
    client = openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0)

    async def listed() -> bool:
        return "tribunal/panel" in [m.id for m in (await client.models.list()).data]

    await wait_until(listed, 20, "the tribunal in the gateway's /v1/models")
    await client.close()
    env = child_env(OPENAI_BASE_URL=url, OPENAI_API_KEY=key)
    rc, out, err = await _run([sys.executable, "-c", _readme_block("python", "tribunal/panel")], env, cwd)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] and [ln.split()[:3] for ln in lines[1:]][-1] == ["judge", "up-demo", "True"], out
    assert len(lines) == 1 + 6  # two jurors, a critique, two revisions, the verdict
    # docs/tribunal.md's RAG commands, with this stack's URL and key for the placeholders
    script = _doc_block(TRIBUNAL_DOC, "sh", "rag_chat.py").replace("http://127.0.0.1:8080/v1", url).replace(
        "hpg_...", key).replace("python ", f"{sys.executable} ")
    rc, out, err = await _run(["bash", "-euc", script], bare, ROOT)
    assert rc == 0, err
    assert out.startswith("retrieved: slurm.md, ") and 1 <= len(out.splitlines()[1].split()) <= 128, out
    assert "[Juror 1, answer]" in err and "[Judge, critique 1]" in err  # the deliberation, streamed


async def test_up_serves_openai_then_stops(pg_dsn: str, redis_prefix: str, tmp_path: Path) -> None:
    """Also: the admin CLI works right after `up` with nothing exported (it reads the data dir
    `up` uses by default, ./var/up), `env.sh` sets up any other shell, and a second `up`
    reuses the demo key instead of leaving another one behind."""
    gateway_port, api_port = _free_port(), _free_port()
    base = random.randrange(21000, 29000, 100)
    env = child_env(
        HPCGATE_DATABASE_URL=pg_dsn, HPCGATE_REDIS_PREFIX=f"{redis_prefix}up:",
        HPCGATE_UP_MODEL="up-demo", HPCGATE_UP_TENANT="up-demo", HPCGATE_UP_STOP_GRACE_S="1",
        # instance ports of a block of its own: other test runs on this machine use the default range
        HPCGATE_API_PORT_RANGE_START=str(base), HPCGATE_API_PORT_RANGE_END=str(base + 99),
    )
    data_dir = tmp_path / "var" / "up"
    proc, seen, url, key = await _start_up(env, tmp_path, gateway_port, api_port)
    try:
        assert url == f"http://127.0.0.1:{gateway_port}/v1"

        client = openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0)
        stream = await client.chat.completions.create(
            model="up-demo", messages=[{"role": "user", "content": "hello"}], stream=True, max_tokens=8,
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text
        models = await client.models.list()
        assert "up-demo" in [m.id for m in models.data]
        await client.close()
        bearers = await _no_secret_in_a_command_line(pg_dsn, data_dir, key)
        await _tribunal_examples(url, key, tmp_path)

        bare = child_env()  # no HPCGATE_* at all, as in a fresh shell
        other_key = await _errors_and_admin_calls(url, key, bare, tmp_path)
        rc, out, err = await _run(hpcgate_cmd("admin", "model", "list"), bare, tmp_path)
        assert rc == 0 and "up-demo" in out, err
        rc, out, err = await _run(["bash", "-c", f". {data_dir}/env.sh && cd / && "
                                   f"{' '.join(hpcgate_cmd('admin', 'tenant', 'show', 'up-demo'))}"],
                                  bare, tmp_path)
        assert rc == 0 and "up-demo" in out, err
        assert "admin CLI   : hpcgate admin model list" in "".join(seen)
        assert "operator    : hpcgate admin ui" in "".join(seen)
        rc, out, err = await _run(hpcgate_cmd("admin", "ui"), bare, tmp_path)  # the link it prints works
        assert rc == 0, err
        async with httpx.AsyncClient(follow_redirects=True, timeout=30) as browser:
            page = await browser.get(out.strip())
        assert page.status_code == 200 and "<td>up-demo</td>" in page.text, page.text[:300]
        assert oct((data_dir / "env.sh").stat().st_mode & 0o777) == "0o600"
        rc, _, err = await _run(hpcgate_cmd("admin", "model", "list"), bare, tmp_path / "var")
        assert rc == 2 and "HPCGATE_ADMIN_TOKEN" in err and "HPCGATE_DATA_DIR" in err
    finally:
        await _stop_up(proc, seen)

    proc, seen, _, key_again = await _start_up(env, tmp_path, gateway_port, api_port)
    # Ctrl-C during a long stream: after the drain grace (1 s here) the instances are cancelled,
    # whatever is in flight, and up says what it waits for.
    instances = [(r["pid"], r["proc_start"]) for r in (json.loads(p.read_text()) for p in
                 (data_dir / "jobs" / "local-state").glob("*.json")) if r["pid"]]
    client = openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0)
    stream = await client.chat.completions.create(
        model="up-demo", messages=[{"role": "user", "content": "long"}], stream=True, max_tokens=30_000,
        extra_body={"ignore_eos": True})
    await stream.__anext__()
    await _stop_up(proc, seen)
    with contextlib.suppress(openai.APIError):
        async for _ in stream:
            pass
    await client.close()
    assert key_again == key
    await _no_secret_in_the_logs(pg_dsn, data_dir, {"API key": key, "admin-created key": other_key}, bearers)
    assert re.search(r"draining: job \d+ of 'up-demo' \(local local-\w+, draining\)", "".join(seen))
    assert all(proc_start(pid) != start for pid, start in instances)

    # Ctrl-C scaled the demo model to zero: none of its jobs is left running; one key in all.
    conn = await asyncpg.connect(pg_dsn)
    try:
        states = await conn.fetch(
            """SELECT j.state FROM ai_model_endpoint_jobs j JOIN ai_model_configurations m USING (model_id)
               WHERE m.name = 'up-demo'""")
        keys = await conn.fetchval(
            """SELECT count(*) FROM identity_tenant_authentications k
                 JOIN identity_tenants t USING (tenant_id) WHERE t.name = 'up-demo'""")
    finally:
        await conn.close()
    assert len(states) >= 2
    assert {r["state"] for r in states} <= {"ended", "failed"}, states
    assert keys == 1


async def test_up_says_what_failed_reaching_postgresql(tmp_path: Path) -> None:
    """A wrong database user is an authentication failure for that user, not "is it running?"."""
    cases = {
        "postgresql://hpcgate_no_such_user@127.0.0.1:5432/hpcgate":
            "refused authentication for user 'hpcgate_no_such_user'",
        f"postgresql://postgres@127.0.0.1:{_free_port()}/hpcgate": "cannot reach PostgreSQL at 127.0.0.1:",
    }
    for dsn, expected in cases.items():
        env = child_env(HPCGATE_DATABASE_URL=dsn, HPCGATE_DATA_DIR=str(tmp_path))
        rc, out, err = await _run(hpcgate_cmd("up"), env, tmp_path)
        assert rc == 1 and expected in out, out + err
        assert ("running" in out) == ("cannot reach" in expected)
