"""Sans-IO reading of the routing field of a ``multipart/form-data`` upload (audio endpoints).

The gateway relays an upload without buffering it: it reads only the beginning of the body
until the form field ``model`` is complete, routes on it, and forwards those bytes and the rest
of the body unchanged. Clients put their text fields before the file (the OpenAI SDKs do,
through httpx), so the field is near the start; a ``model`` field that comes after a file part,
or that does not end within :data:`MAX_PREFIX` bytes, is refused with a 400 saying so.

:func:`boundary_of` reads the boundary from the Content-Type; :func:`model_field` takes the
bytes read so far and returns the model name, or None while more bytes are needed.
"""

from __future__ import annotations

from gateway.errors import ApiError

MAX_PREFIX = 64 * 1024  # bytes read before the model field must have ended
_MULTIPART = b"multipart/form-data"


def boundary_of(content_type: bytes | None) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type; 415/400 otherwise."""
    if content_type is None or content_type.partition(b";")[0].strip().lower() != _MULTIPART:
        raise ApiError(415, "Content-Type must be multipart/form-data", "unsupported_media_type")
    for param in content_type.split(b";")[1:]:
        name, _, value = param.strip().partition(b"=")
        if name.strip().lower() == b"boundary":
            value = value.strip().strip(b'"')
            if 1 <= len(value) <= 70:
                return value
    raise ApiError(400, "multipart/form-data without a valid boundary", "invalid_body")


def model_field(prefix: bytes, boundary: bytes) -> str | None:
    """The ``model`` field's value from the first bytes of the body; None: read more."""
    delimiter = b"--" + boundary
    if not prefix.startswith(delimiter):
        if len(prefix) >= len(delimiter):
            raise ApiError(400, "multipart body does not start with its boundary", "invalid_body")
        return None
    pos = len(delimiter)
    while True:
        head_end = prefix.find(b"\r\n\r\n", pos)
        if head_end < 0:
            _check_size(prefix)
            return None
        headers = prefix[pos:head_end].lower()
        end = prefix.find(b"\r\n" + delimiter, head_end + 4)
        if b'name="model"' in headers and b"filename=" not in headers:
            if end < 0:
                _check_size(prefix)
                return None
            try:
                value = prefix[head_end + 4:end].decode().strip()
            except UnicodeDecodeError:
                raise ApiError(400, "the model field is not UTF-8", "invalid_body", "model") from None
            if not value:
                raise ApiError(400, "'model' must be a non-empty string", "invalid_body", "model")
            return value
        if b"filename=" in headers:
            raise ApiError(400, "the 'model' form field must come before the file", "invalid_body", "model")
        if end < 0:
            _check_size(prefix)
            return None
        pos = end + 2 + len(delimiter)
        if prefix.startswith(b"--", pos):
            raise ApiError(400, "missing required form field 'model'", "invalid_body", "model")


def _check_size(prefix: bytes) -> None:
    if len(prefix) >= MAX_PREFIX:
        raise ApiError(400, f"the 'model' form field must end within the first {MAX_PREFIX} bytes",
                       "invalid_body", "model")
