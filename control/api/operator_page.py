"""The operator page's HTML, rendered on the server from one snapshot of the service.

Pure: :func:`render` turns an :class:`OperatorView` (gathered by :mod:`control.api.ui`) into a
complete HTML document, with no I/O and no clock of its own (ages are taken against
``view.generated_at``), so it is unit-tested by feeding it data. Every value from the database
or an engine is escaped. No script, no external resource, no build chain: one document with
inline CSS that refreshes itself, which a site can put behind any proxy and any browser can show.

An engine load that could not be scraped is shown as "unknown", never as zero.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape

from control.wire import Endpoint, Job, Model, Usage
from hpcgate.metrics_text import EngineLoad

REFRESH_S = 15
_UNKNOWN = '<span class="muted">unknown</span>'


@dataclass(frozen=True, slots=True)
class OperatorView:
    generated_at: datetime
    models: Sequence[Model]
    jobs: Sequence[Job]  # live jobs and those that ended recently, newest first
    endpoints: Sequence[tuple[Endpoint, EngineLoad | None]]  # None: the scrape failed
    usage: Usage  # per tenant and model since midnight UTC


def age(since: datetime | None, now: datetime) -> str:
    """``"3d 4h"``, ``"2h 5m"``, ``"7m 3s"`` or ``"12s"``; an empty string for no time."""
    if since is None:
        return ""
    seconds = max(0, int((now - since).total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {seconds}s"
    return f"{seconds}s"


def _cell(value: object) -> str:
    return f"<td>{escape(str(value))}</td>" if value is not None else "<td></td>"


def _number(value: float | None, fmt: str = "{:g}") -> str:
    return f'<td class="num">{fmt.format(value)}</td>' if value is not None else f"<td>{_UNKNOWN}</td>"


def _table(title: str, headers: Iterable[str], rows: list[str], empty: str) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(f"<tr>{r}</tr>" for r in rows) if rows else (
        f'<tr><td class="muted" colspan="99">{escape(empty)}</td></tr>')
    anchor = title.lower().replace(" ", "-")
    return f'<section id="{anchor}"><h2>{escape(title)}</h2><table><thead><tr>{head}</tr></thead>' \
           f"<tbody>{body}</tbody></table></section>"


def _state(state: str) -> str:
    return f'<td><span class="state {escape(state)}">{escape(state)}</span></td>'


def _models(view: OperatorView) -> str:
    pending = {m.name: 0 for m in view.models}
    for job in view.jobs:
        if job.state in ("pending", "submitted", "registered") and job.model in pending:
            pending[job.model] += 1
    rows = [
        f"{_cell(m.name)}{_state(m.state)}<td class=\"num\">{m.min_instances}-{m.max_instances}</td>"
        f"<td class=\"num\">{m.desired_instances}</td><td class=\"num\">{m.ready_endpoints}</td>"
        f"<td class=\"num\">{pending[m.name]}</td>{_cell(m.state_reason)}"
        for m in view.models
    ]
    return _table("Models", ("model", "state", "min-max", "desired", "ready", "pending", "reason"), rows,
                  "no model configured (hpcgate admin model create …)")


def _jobs(view: OperatorView) -> str:
    now = view.generated_at
    rows = [
        f"{_cell(j.endpoint_job_id)}{_cell(j.model)}{_cell(j.launcher)}{_cell(j.launcher_job_id)}"
        f"{_state(j.state)}{_cell(age(j.created_at, now))}"
        f"{_cell(f'{j.node}:{j.port}' if j.node and j.port else None)}{_cell(j.state_reason)}"
        for j in view.jobs
    ]
    return _table("Jobs", ("job", "model", "launcher", "launcher id", "state", "age", "node:port", "reason"),
                  rows, "no live job")


def _endpoints(view: OperatorView) -> str:
    now = view.generated_at
    rows = []
    for ep, load in view.endpoints:
        state = "draining" if ep.draining else ep.job_state
        kv = None if load is None or load.kv_usage is None else load.kv_usage * 100
        rows.append(
            f"{_cell(ep.endpoint_id)}{_cell(ep.model)}{_cell(f'{ep.node}:{ep.port}')}{_state(state)}"
            f"{_number(None if load is None else load.running)}"
            f"{_number(None if load is None else load.waiting)}{_number(kv, '{:.0f} %')}"
            f"<td class=\"num\">{ep.consecutive_failures}</td>{_cell(age(ep.ready_at, now))}"
            f"{_cell(age(ep.last_probe_at, now))}"
        )
    return _table("Endpoints", ("endpoint", "model", "address", "state", "running", "waiting", "KV cache",
                                "failed probes", "ready for", "last probe"),
                  rows, "no registered endpoint")


def _usage(view: OperatorView) -> str:
    rows = [
        f"{_cell(r.tenant)}{_cell(r.model)}<td class=\"num\">{r.requests}</td>"
        f"<td class=\"num\">{r.errors}</td><td class=\"num\">{r.prompt_tokens}</td>"
        f"<td class=\"num\">{r.completion_tokens}</td>"
        for r in view.usage.rows
    ]
    return _table("Usage today", ("tenant", "model", "requests", "errors", "prompt tokens",
                                  "completion tokens"), rows, "no request since midnight UTC")


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2330;background:#fafbfc}
h1{font-size:1.4em;margin:0 0 .2em} h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;min-width:40em}
th,td{border:1px solid #d5dae3;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#eef1f6;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#7a8394} .state{padding:0 .4em;border-radius:.3em;background:#e4e7ee}
.ready,.active{background:#cdeccf} .failed{background:#f6c9c9}
.pending,.submitted,.registered{background:#fbe7b5} .draining,.cancelling{background:#d9e2f7}
""".strip()


def render(view: OperatorView) -> str:
    stamp = view.generated_at.strftime("%Y-%m-%d %H:%M:%S %Z")
    return (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta http-equiv=\"refresh\" content=\"{REFRESH_S}\">"
        "<meta name=\"viewport\" content=\"width=device-width\"><title>hpcgate operator</title>"
        f"<style>{_STYLE}</style></head><body>"
        f"<h1>hpcgate</h1><p class=\"muted\">Read-only view, generated {escape(stamp)};"
        f" refreshes every {REFRESH_S} s.</p>"
        f"{_models(view)}{_jobs(view)}{_endpoints(view)}{_usage(view)}"
        "</body></html>"
    )
