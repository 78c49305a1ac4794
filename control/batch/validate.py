"""Validation of a batch's input file, line by line, before any of it runs (pure; no I/O).

Every line is checked: a JSON object with the fields of :class:`~control.batch.wire.InputLine`,
``custom_id`` non-empty and unique in the file, ``method`` POST, ``url`` equal to the batch's
endpoint, ``body`` an object whose ``model`` this tenant may use. Blank lines are skipped (a
trailing newline is not a line). The result is either every line's record (what the runner
stores) or the errors, the first ``max_errors`` of them with their 1-based line numbers: a file
with one bad line starts nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO, NamedTuple

import msgspec

from control.batch.wire import BatchError, InputLine

_decode_line = msgspec.json.Decoder(InputLine).decode


class LineRecord(NamedTuple):
    line_no: int
    custom_id: str
    model: str
    offset: int
    length: int


class Validated(NamedTuple):
    records: list[LineRecord]
    errors: list[BatchError]
    error_count: int  # all errors, of which ``errors`` holds the first max_errors


def split_lines(fh: BinaryIO) -> Iterator[tuple[int, int, bytes]]:
    """(1-based line number, byte offset, bytes without the newline) of each line of ``fh``;
    reads line by line, never the whole file."""
    offset = 0
    for n, raw in enumerate(fh, start=1):
        yield n, offset, raw.rstrip(b"\r\n")
        offset += len(raw)


def _model_of(body: dict[str, object]) -> str | None:
    model = body.get("model")
    return model if isinstance(model, str) and model else None


def validate_lines(
    lines: Iterable[tuple[int, int, bytes]],
    endpoint: str,
    resolve: Callable[[str], tuple[str | None, str]],
    *,
    max_lines: int,
    max_errors: int = 100,
) -> Validated:
    """``resolve(model)`` is (the model's canonical name, "") if the tenant may use ``model``,
    else (None, the reason)."""
    records: list[LineRecord] = []
    errors: list[BatchError] = []
    count = 0
    seen: set[str] = set()

    def bad(line: int | None, code: str, message: str, param: str | None = None) -> None:
        nonlocal count
        count += 1
        if len(errors) < max_errors:
            errors.append(BatchError(code=code, message=message, line=line, param=param))

    n_lines = 0
    for line_no, offset, data in lines:
        if not data.strip():
            continue
        n_lines += 1
        if n_lines > max_lines:
            bad(line_no, "too_many_lines", f"a batch may have at most {max_lines} lines")
            break
        try:
            item = _decode_line(data)
        except msgspec.ValidationError as exc:
            bad(line_no, "invalid_request", f"line is not a valid request: {exc}")
            continue
        except msgspec.DecodeError:
            bad(line_no, "invalid_json", "line is not valid JSON")
            continue
        if not item.custom_id:
            bad(line_no, "missing_custom_id", "custom_id must be a non-empty string", "custom_id")
            continue
        if item.custom_id in seen:
            bad(
                line_no,
                "duplicate_custom_id",
                f"custom_id {item.custom_id!r} appears on an earlier line",
                "custom_id",
            )
            continue
        seen.add(item.custom_id)
        if item.method != "POST":
            bad(line_no, "invalid_method", f"method must be POST, not {item.method!r}", "method")
            continue
        if item.url != endpoint:
            bad(
                line_no, "mismatched_url", f"url {item.url!r} is not the batch's endpoint {endpoint!r}", "url"
            )
            continue
        model = _model_of(item.body)
        if model is None:
            bad(line_no, "missing_model", "body.model must be a non-empty string", "body.model")
            continue
        canonical, reason = resolve(model)
        if canonical is None:
            bad(line_no, "model_not_allowed", reason, "body.model")
            continue
        records.append(LineRecord(line_no, item.custom_id, canonical, offset, len(data)))
    if n_lines == 0:
        bad(None, "empty_file", "the input file has no requests")
    return Validated(records if count == 0 else [], errors, count)
