"""Structured logging: one JSON object per line on stderr, with a stable ``event`` name.

Use :func:`get_logger` and call ``log.info("endpoint_ready", endpoint_id=3, old="probing",
new="ready")``: the first argument is the event name (snake_case, never formatted), keyword
arguments are the fields. Standard-library records from other libraries are emitted the same
way with their message as ``event``. The hot path logs one access record per request, nothing
per chunk.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats a record as ``{"ts", "level", "logger", "event", ...fields}``."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage() if record.args else str(record.msg),
        }
        fields = getattr(record, "fields", None)
        if fields:
            doc.update(fields)
        for key, value in record.__dict__.items():
            if key not in _RESERVED and key != "fields":
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class EventLogger:
    """A thin wrapper that turns keyword arguments into structured fields."""

    __slots__ = ("_log",)

    def __init__(self, log: logging.Logger) -> None:
        self._log = log

    def _emit(self, level: int, event: str, fields: dict[str, Any], exc_info: bool = False) -> None:
        if self._log.isEnabledFor(level):
            self._log.log(level, event, extra={"fields": fields}, exc_info=exc_info, stacklevel=3)

    def debug(self, event: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._emit(logging.ERROR, event, fields, exc_info=True)

    def is_enabled(self, level: int) -> bool:
        return self._log.isEnabledFor(level)


def get_logger(name: str) -> EventLogger:
    return EventLogger(logging.getLogger(name))


def setup_logging(level: str = "info", stream: Any = None) -> None:
    """Install the JSON formatter on the root logger (idempotent)."""
    root = logging.getLogger()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.Formatter.converter = time.gmtime
