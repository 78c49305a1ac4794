"""TLS on the gateway's own port, for sites without a terminating proxy in front.

Off unless both ``tls_cert_file`` and ``tls_key_file`` are set; then every connection on the
port is TLS (TLS 1.2 or newer, the ssl module's secure defaults, HTTP/1.1 by ALPN). The C stream
relay writes plain bytes to the socket, so with TLS it steps aside and the event loop relays
every stream (``/ready`` says ``"stream_relay": "event-loop"``). The files are loaded when the
settings are, so a missing file or a key that does not match its certificate stops the process
at start with the reason.
"""

from __future__ import annotations

import ssl


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context for ``cert_file`` (PEM, the chain after the leaf) and ``key_file``;
    ``ValueError`` with the reason when they cannot be used."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(cert_file, key_file)
    except FileNotFoundError as exc:
        raise ValueError(f"{exc.filename or cert_file}: no such file") from None
    except PermissionError as exc:
        raise ValueError(f"{exc.filename or key_file}: permission denied") from None
    except ssl.SSLError as exc:
        raise ValueError(f"cannot use {cert_file} with {key_file}: {exc.reason or exc}") from None
    return context
