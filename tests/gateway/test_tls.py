"""TLS: the gateway's own TLS port, its settings checks, and the nginx example of docs/gateway.md
run as written in front of a plain gateway, both used with the ``openai`` SDK."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest

from gateway.settings import load_gateway_settings
from hpcgate.settings import SettingsError
from tests.gateway.conftest import running_gateway
from tests.support.procs import wait_until
from tests.support.sim import SimProcess

DOC = Path(__file__).resolve().parents[2] / "docs" / "gateway.md"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl CLI, as a site would make a test one)."""
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key


async def _chat_stream(base_url: str, cert: Path) -> str:
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=cert)) as http:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, http_client=http)
        stream = await client.chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "hello"}], stream=True, max_tokens=12)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def test_the_gateway_serves_tls_itself(sim_a: SimProcess, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    async with running_gateway(static_endpoints=(f"m1={sim_a.url}",), no_auth=True,
                               tls_cert_file=str(cert), tls_key_file=str(key)) as gw:
        assert gw.gateway.stream_relay == "event-loop"  # the C relay writes plain bytes: it steps aside
        assert await _chat_stream(f"https://127.0.0.1:{gw.port}/v1", cert)
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=cert)) as http:
            ready = await http.get(f"https://127.0.0.1:{gw.port}/ready")
        assert ready.json()["stream_relay"] == "event-loop"
        # plain HTTP on the TLS port: refused at once, no hang
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert not (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 200")
        writer.close()


def test_tls_settings_are_checked_at_start(certificate: tuple[Path, Path], tmp_path: Path) -> None:
    cert, key = certificate
    base = {"HPCGATE_GATEWAY_NO_AUTH": "true", "HPCGATE_GATEWAY_STATIC_ENDPOINTS": '["m=http://127.0.0.1:1"]'}
    other_key = tmp_path / "other.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-out", str(other_key)], check=True, capture_output=True)
    cases = {
        (str(cert), None): "set both or neither",
        (str(tmp_path / "missing.pem"), str(key)): "missing.pem: no such file",
        (str(cert), str(other_key)): f"cannot use {cert} with {other_key}",
    }
    for (cert_file, key_file), reason in cases.items():
        env = {**base, "HPCGATE_GATEWAY_TLS_CERT_FILE": cert_file}
        if key_file is not None:
            env["HPCGATE_GATEWAY_TLS_KEY_FILE"] = key_file
        with pytest.raises(SettingsError, match=re.escape(reason)):
            load_gateway_settings(env=env)
    ok = load_gateway_settings(env={**base, "HPCGATE_GATEWAY_TLS_CERT_FILE": str(cert),
                                    "HPCGATE_GATEWAY_TLS_KEY_FILE": str(key)})
    assert ok.tls


def doc_nginx_config() -> str:
    blocks = re.findall(r"^```nginx\n(.*?)^```", DOC.read_text(), re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, "docs/gateway.md lost its nginx TLS example"
    return str(blocks[0])


@pytest.fixture
async def nginx_in_front(sim_a: SimProcess, certificate: tuple[Path, Path],
                         tmp_path: Path) -> AsyncIterator[int]:
    cert, key = certificate
    async with running_gateway(static_endpoints=(f"m1={sim_a.url}",), no_auth=True) as gw:
        port = _free_port()
        config = (doc_nginx_config().replace("GATEWAY_ADDRESS", f"127.0.0.1:{gw.port}")
                  .replace("LISTEN_ADDRESS", f"127.0.0.1:{port}")
                  .replace("CERT_FILE", str(cert)).replace("KEY_FILE", str(key)))
        # what the test adds around the site's file: run unprivileged, in the foreground, here
        prologue = (f"daemon off;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n")
        config = prologue + config.replace(
            "http {", f"http {{\n    access_log off;\n    client_body_temp_path {tmp_path}/body;\n"
                      f"    proxy_temp_path {tmp_path}/proxy;\n", 1)
        (tmp_path / "nginx.conf").write_text(config)
        proc = await asyncio.create_subprocess_exec(
            shutil.which("nginx") or "/usr/sbin/nginx", "-p", str(tmp_path),
            "-c", str(tmp_path / "nginx.conf"), stderr=asyncio.subprocess.PIPE)
        try:
            await wait_until(lambda: _listening(port), 10, "nginx to listen")
            yield port
        finally:
            proc.terminate()
            await proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


async def test_the_documented_nginx_terminates_tls_for_the_gateway(nginx_in_front: int,
                                                                   certificate: tuple[Path, Path]) -> None:
    assert await _chat_stream(f"https://127.0.0.1:{nginx_in_front}/v1", certificate[0])
