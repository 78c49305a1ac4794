"""A tribunal request (``model: tribunal/<name>``): jurors concurrently, then the judge.

Runs in the request's task (the connection cancels it when the client leaves). Every step is
an upstream request through the gateway's own routing, as a normal request would go: the
least-loaded backend (:func:`gateway.balancer.choose`), the model's FIFO queue when all are
saturated, retries on another backend for failures before the first byte (the worker's retry
budget), ejection of failing backends, the tenant's limits (each step is admitted and charged
like a request), usage booked per underlying model. The protocol, deadlines and usage sums are
pure logic in :mod:`gateway.tribunal_plan`.

Invariants: every step task is finished (done or cancelled) before :meth:`TribunalCall.run`
returns, and a cancelled step aborts its upstream connection, so the engine frees the slot
(a client that disconnects, a straggler after the grace, a step past its budget); each step's
backend in-flight count and tenant admission are released exactly once (``finally``).
Responses: an error before anything was written is an OpenAI-shaped JSON error; once a stream
started, an error ends it with an SSE error event.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from time import perf_counter, time
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.auth import Principal
from gateway.balancer import choose
from gateway.errors import ApiError, sse_error_event
from gateway.http_server import HttpConnection
from gateway.request_view import with_model
from gateway.tenant_admission import Admission
from gateway.tenant_limits import estimate_tokens
from gateway.tribunal_plan import (
    Tally,
    TribunalRequest,
    anonymised,
    judge_failed,
    judge_messages,
    juror_messages,
    parse_request,
    phase_budget,
    phases,
    quorum_lost,
    render_prompt,
    revise_messages,
    step_body,
)
from gateway.upstream_client import UpstreamConnection, UpstreamError, build_request
from hpcgate.logs import get_logger
from hpcgate.schemas.tribunal import TribunalEntry

if TYPE_CHECKING:
    from gateway.app import Gateway

log = get_logger("hpcgate.gateway.tribunal")

_CHAT = b"/v1/chat/completions"
_POST = b"POST"
_SSE = b"text/event-stream"
_encode = msgspec.json.Encoder().encode


class TribunalHandoff(Exception):  # noqa: N818 - a signal, not an error
    """Raised by the proxy's prelude when the model is a tribunal: the request continues here."""

    def __init__(self, tribunal: TribunalEntry, principal: Principal) -> None:
        super().__init__(tribunal.model)
        self.tribunal = tribunal
        self.principal = principal


class StepFailedError(Exception):
    """A step failed; the message says why (it reaches the client in a quorum or judge error)."""


# -- one upstream step --------------------------------------------------------------------------
class _Msg(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    message: _Msg | None = None
    delta: _Msg | None = None
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Answer(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: Any = None


_decode_answer = msgspec.json.Decoder(_Answer).decode


class _StepSink:
    """The upstream response of one step (a :class:`gateway.upstream_client.ResponseSink`)."""

    __slots__ = ("_events", "_tail", "body", "done", "ended", "size", "status")

    def __init__(self, loop: asyncio.AbstractEventLoop, events: Callable[[bytes], None] | None) -> None:
        self.done: asyncio.Future[None] = loop.create_future()
        self.status = 0
        self.body: list[bytes] = []
        self.size = 0
        self.ended = False
        self._events = events  # a stream: each complete SSE event's data goes here
        self._tail = b""

    def on_head(self, status: int, headers: dict[bytes, bytes]) -> None:
        self.status = status

    def on_data(self, data: bytes) -> None:
        if self._events is None or self.status != 200:
            self.body.append(data)
            self.size += len(data)
            if self.size > 64 * 1024 * 1024:
                self.on_error(UpstreamError("too_large", "step answer too large", False))
            return
        buf = self._tail + data
        *events, self._tail = buf.split(b"\n\n")
        for ev in events:
            if ev.startswith(b"data: "):
                self._events(ev[6:])

    def take_over(self, body: bytes) -> bool:
        return False  # a step is read by the event loop, never by the C relay

    def on_end(self, last: bytes) -> None:
        if last:
            self.on_data(last)
        self.ended = True
        if not self.done.done():
            self.done.set_result(None)

    def on_error(self, exc: UpstreamError) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


class _Backpressure:
    """The client's connection listener while the verdict streams: a full client socket pauses
    reading the judge's answer upstream (the engine's socket pushes back, as for any stream)."""

    __slots__ = ("up",)

    def __init__(self, up: UpstreamConnection) -> None:
        self.up = up

    def client_paused(self) -> None:
        self.up.pause_reading()

    def client_resumed(self) -> None:
        self.up.resume_reading()

    def client_lost(self) -> None:
        pass  # the connection cancels the request's task, which aborts the step


@dataclass(slots=True)
class Step:
    role: str  # juror | review | revise | critique | judge
    model: str
    round: int
    juror: int | None = None  # 1-based juror number
    ok: bool = False
    content: str = ""
    finish_reason: str | None = None
    error: str | None = None
    prompt: int = 0
    completion: int = 0
    duration_s: float = 0.0
    request_id: bytes = b""

    def view(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "model": self.model, "round": self.round, "ok": self.ok,
                               "duration_s": round(self.duration_s, 4),
                               "usage": {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                                         "total_tokens": self.prompt + self.completion}}
        if self.juror is not None:
            out["juror"] = self.juror
        if self.ok:
            out["content"] = self.content
        else:
            out["error"] = self.error
        return out


# -- the request ----------------------------------------------------------------------------------
class TribunalCall:
    def __init__(self, gw: Gateway, conn: HttpConnection, rid: bytes, *, tribunal: TribunalEntry,
                 principal: Principal, body: bytes) -> None:
        self.gw = gw
        self.conn = conn
        self.rid = rid
        self.t = tribunal
        self.principal = principal
        self.body = body
        self.start = perf_counter()
        self.tally = Tally()
        self.steps: list[Step] = []
        self.started = False  # some byte of the response was written
        self.status = 499
        self.error: str | None = None
        self.seed = zlib.crc32(rid)
        self.created = int(time())
        self.id = "chatcmpl-tribunal-" + rid.decode()

    def check(self) -> TribunalRequest:
        """Before anything runs: the key may use the tribunal and every model it calls (403)."""
        p, t, table = self.principal, self.t, self.gw.table
        if not p.may_use(t.model):
            raise ApiError(403, f"this API key may not use model '{t.model}'", "model_not_allowed", "model")
        for m in sorted(t.models):
            route = table.lookup(m)
            if not p.may_use(m, *((route.name,) if route is not None else ())):
                raise ApiError(403, f"this API key may not use model '{m}', which tribunal '{t.model}' calls",
                               "model_not_allowed", "model")
        return parse_request(self.body, t)

    async def run(self) -> None:
        try:
            req = self.check()
            await self._run(req)
            self.status = 200
        except ApiError as exc:
            self.status, self.error = exc.status, exc.message
            if self.started:
                self._write(sse_error_event(exc.message, exc.code or "tribunal_error") + b"data: [DONE]\n\n")
                self._end_stream()
            else:
                self.conn.send_error(exc)
        finally:
            self._book()

    # -- protocol ----------------------------------------------------------------------------------
    async def _run(self, req: TribunalRequest) -> None:
        t = self.t
        loop = self.gw.loop
        deadline = loop.time() + t.deadline_s
        plan = phases(t)

        def budget() -> float:
            return phase_budget(deadline - loop.time(), plan)

        jurors = list(enumerate(t.jurors, start=1))
        answers = await self._juror_phase(
            "juror", 0, budget(), {n: (j.model, juror_messages(req, j.system_prompt), j.temperature)
                                   for n, j in jurors}, req)
        plan.pop(0)
        if t.peer_review:
            calls = {}
            for n, j in jurors:
                if n in answers:
                    peers = anonymised([a for m, a in answers.items() if m != n], self.seed + n)
                    prompt = render_prompt(t.review_prompt, question=req.question, answer=answers[n],
                                           peers=peers)
                    calls[n] = (j.model, revise_messages(req, j.system_prompt, prompt), j.temperature)
            answers = await self._juror_phase("review", 0, budget(), calls, req)
            plan.pop(0)
        for r in range(1, t.rounds + 1):
            prompt = render_prompt(t.critique_prompt, question=req.question, round=r,
                                   answers=anonymised(list(answers.values()), self.seed + r),
                                   answered=len(answers), jurors=len(t.jurors))
            critique = await self._judge(req, "critique", r, prompt, budget(), stream=False)
            plan.pop(0)
            calls = {}
            for n, j in jurors:
                if n in answers:
                    prompt = render_prompt(t.revise_prompt, question=req.question, answer=answers[n],
                                           critique=critique, round=r)
                    calls[n] = (j.model, revise_messages(req, j.system_prompt, prompt), j.temperature)
            answers = await self._juror_phase("revise", r, budget(), calls, req)
            plan.pop(0)
        prompt = render_prompt(t.judge_prompt, question=req.question,
                               answers=anonymised(list(answers.values()), self.seed),
                               answered=len(answers), jurors=len(t.jurors))
        final = await self._judge(req, "judge", t.rounds, prompt, budget(), stream=req.stream)
        if req.stream:
            self._finish_stream(req)
        else:
            self._respond(req, final)

    async def _juror_phase(self, role: str, rnd: int, budget: float,
                           calls: dict[int, tuple[str, list[Any], float | None]],
                           req: TribunalRequest) -> dict[int, str]:
        """Run ``calls`` concurrently; the answers by juror number once the quorum answered and
        the stragglers had their grace (then they are cancelled), or 502 below the quorum."""
        t = self.t
        loop = self.gw.loop
        steps = {n: Step(role, model, rnd, juror=n) for n, (model, _, _) in calls.items()}
        tasks = {loop.create_task(self._step(steps[n], step_body(req, model, msgs, stream=False,
                                                                  temperature=temp))): n
                 for n, (model, msgs, temp) in calls.items()}
        end = loop.time() + budget
        pending = set(tasks)
        answered = 0
        grace_end: float | None = None
        why = "timed out (step budget)"  # what the steps still pending are told
        try:
            while pending:
                timeout = (end if grace_end is None else min(end, grace_end)) - loop.time()
                if timeout <= 0:
                    if grace_end is not None and grace_end < end:
                        why = "cancelled after the quorum's grace"
                    break
                done, pending = await asyncio.wait(pending, timeout=timeout,
                                                   return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    step = steps[tasks[task]]
                    if step.ok:
                        answered += 1
                    self._deliberate(req, step)
                if answered + len(pending) < t.quorum:
                    why = "cancelled: the quorum could no longer be reached"
                    break
                if grace_end is None and answered >= t.quorum:
                    grace_end = loop.time() + t.grace_s
        finally:
            for task in pending:
                steps[tasks[task]].error = why
                task.cancel()  # stragglers: the step aborts its upstream connection
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        for task in pending:
            self._deliberate(req, steps[tasks[task]])
        if answered < t.quorum:
            failures = [(s.model, s.error or "?") for s in steps.values() if not s.ok]
            raise quorum_lost(t, answered, len(calls), failures, role if rnd == 0 else f"{role}, round {rnd}")
        return {n: s.content for n, s in sorted(steps.items()) if s.ok}

    async def _judge(self, req: TribunalRequest, role: str, rnd: int, prompt: str, budget: float, *,
                     stream: bool) -> str:
        """The judge's step (critique or verdict); the fallback judge if it fails before its first
        token; a streamed verdict goes to the client token by token."""
        t = self.t
        loop = self.gw.loop
        end = loop.time() + budget
        failures: list[tuple[str, str]] = []
        emitted = False

        def on_text(text: str) -> None:
            nonlocal emitted
            emitted = True
            self._emit({"content": text})

        for model in (t.judge, t.fallback_judge):
            if model is None:
                continue
            left = end - loop.time()
            if left <= 0:
                failures.append((model, "no time left before the deadline"))
                break
            step = Step(role, model, rnd)
            body = step_body(req, model, judge_messages(req, prompt), stream=stream)
            try:
                async with asyncio.timeout(left):
                    await self._step(step, body, on_text=on_text if stream else None)
            except TimeoutError:
                step.error = f"timed out after {left:.3g}s"
            if step.ok:
                self._deliberate(req, step)
                return step.content
            failures.append((model, step.error or "?"))
            if emitted:  # the client saw part of this answer: no second judge
                break
        raise judge_failed(t, failures)

    async def _step(self, step: Step, body: bytes, *, on_text: Callable[[str], None] | None = None) -> Step:
        """One upstream request through the routing; fills ``step`` (never raises but cancellation)."""
        self.steps.append(step)
        # Each step has its own id at the engine (vLLM refuses a second running request with the
        # same id): the client's request id and the step's number, so the logs still join up.
        step.request_id = b"%b-s%d" % (self.rid, len(self.steps))
        gw = self.gw
        start = perf_counter()
        tstate: Admission | None = None
        try:
            try:
                if self.principal.limited:  # each step is admitted (and reserves) like any request
                    estimate = estimate_tokens(len(body), None, gw.settings.tpm_completion_estimate)
                    tstate = gw.limits.admit(self.principal, step.model, gw.loop.time(), estimate)
                await self._forward(step, body, on_text)
                step.ok = True
            except ApiError as exc:
                step.error = exc.message
            except StepFailedError as exc:
                step.error = str(exc)
            except UpstreamError as exc:
                step.error = f"upstream failed: {exc}"
            except Exception:  # a bug must fail this step, not leave its task's error unread
                log.exception("tribunal_step_failed", model=step.model, role=step.role)
                step.error = "internal gateway error"
        finally:
            step.duration_s = perf_counter() - start
            if tstate is not None:
                tstate.leave(step.prompt + step.completion)
            if step.error is None and not step.ok:
                step.error = "cancelled"
            self.tally.add(step.model, step.prompt, step.completion)
            gw.metrics.observe(step.model, 200 if step.ok else 502, None, step.duration_s,
                               prompt=step.prompt, completion=step.completion)
            if self.principal.tenant_id:
                gw.usage.add(self.principal.tenant_id, step.model, time(), ok=step.ok, prompt=step.prompt,
                             completion=step.completion)
        return step

    async def _forward(self, step: Step, body: bytes, on_text: Callable[[str], None] | None) -> None:
        gw = self.gw
        s = gw.settings
        route = gw.table.lookup(step.model)
        if route is None:
            raise StepFailedError(f"model '{step.model}' does not exist")
        if not route.backends:
            raise StepFailedError(f"model '{route.name}' has no ready instance ({route.state})")
        if route.name != step.model:  # configured by alias: the engine serves the canonical name
            body = with_model(body, route.name)
        tried: list[Any] = []
        last = "no endpoint available"
        stale_retried = False
        while True:
            backend = choose(route.backends, gw.loop.time(), stale_after=gw.stale_after,
                             max_inflight=s.endpoint_max_inflight, exclude=tried)
            if backend is None:
                if tried:
                    raise StepFailedError(last)
                await gw.queues.wait(route.name, s.queue_max, s.queue_timeout_s)
                continue
            backend.inflight += 1
            backend.since_scrape += 1
            up: UpstreamConnection | None = None
            sink = _StepSink(gw.loop, self._events(step, on_text) if on_text is not None else None)
            reused = False
            try:
                up = backend.pool.take_idle() or await backend.pool.acquire()
                reused = up.reused
                if on_text is not None:  # the verdict, streamed to the client
                    self.conn.listener = _Backpressure(up)
                up.send(build_request(_POST, _CHAT, backend.host_header, backend.auth_line, body,
                                      request_id=step.request_id), sink)
                if on_text is not None and self.conn.write_paused:
                    up.pause_reading()
                await sink.done
                status = sink.status
                if status < 500:
                    backend.record_success()
                    if on_text is None or status != 200:
                        self._parse_answer(step, status, b"".join(sink.body))
                    elif step.error is not None:  # an error event in the stream
                        raise StepFailedError(step.error)
                    return
                err: UpstreamError | None = None
            except UpstreamError as exc:
                err, status = exc, 0
                if not exc.before_head:  # part of the answer came: not retried
                    gw.upstream_failed(backend, exc.kind)
                    raise
            finally:
                if on_text is not None:
                    self.conn.listener = None
                if not sink.ended and up is not None:
                    up.abort()  # cancelled or failed mid-answer: the engine frees the slot
                gw.release(backend)
            if err is not None and err.kind == "closed" and reused and not stale_retried:
                stale_retried = True  # a keep-alive connection the engine had closed
                continue
            last = str(err) if err is not None else f"{backend.label} answered {status}"
            gw.upstream_failed(backend, err.kind if err is not None else f"http_{status}")
            tried.append(backend)
            if len(tried) > s.max_retries or gw.retry_tokens < 1.0:
                raise StepFailedError(last)
            gw.retry_tokens -= 1.0
            gw.metrics.retry(route.name)

    @staticmethod
    def _parse_answer(step: Step, status: int, body: bytes) -> None:
        try:
            answer = _decode_answer(body)
        except msgspec.DecodeError:
            raise StepFailedError(f"{step.model} answered {status} with a body that is not JSON") from None
        if answer.usage is not None:
            step.prompt, step.completion = answer.usage.prompt_tokens, answer.usage.completion_tokens
        if status != 200 or not answer.choices or answer.choices[0].message is None:
            detail = answer.error.get("message") if isinstance(answer.error, dict) else answer.error
            raise StepFailedError(f"{step.model} answered {status}" + (f": {detail}" if detail else ""))
        choice = answer.choices[0]
        step.content = (choice.message.content or "") if choice.message is not None else ""
        step.finish_reason = choice.finish_reason

    def _events(self, step: Step, on_text: Callable[[str], None]) -> Callable[[bytes], None]:
        """A streamed judge: each event's text to ``on_text``, its usage to ``step``."""
        parts: list[str] = []

        def event(data: bytes) -> None:
            if data.startswith(b"[DONE]"):
                step.content = "".join(parts)
                return
            try:
                ev = _decode_answer(data)
            except msgspec.DecodeError:
                return
            if ev.error is not None:
                raise_later = ev.error.get("message") if isinstance(ev.error, dict) else str(ev.error)
                step.error = f"{step.model} failed mid-answer: {raise_later}"
                return
            if ev.usage is not None:
                step.prompt, step.completion = ev.usage.prompt_tokens, ev.usage.completion_tokens
            for c in ev.choices:
                d = c.delta
                if d is not None and d.content:
                    parts.append(d.content)
                    on_text(d.content)
                if c.finish_reason:
                    step.finish_reason = c.finish_reason
            step.content = "".join(parts)

        return event

    # -- the client's response ---------------------------------------------------------------------
    def _deliberate(self, req: TribunalRequest, step: Step) -> None:
        """A finished deliberation step as a ``reasoning_content`` delta (streams that asked)."""
        if not (req.stream and req.deliberation) or step.role == "judge":
            return
        who = f"Juror {step.juror}" if step.juror is not None else "Judge"
        what = {"juror": "answer", "review": "answer after peer review", "revise": f"revision {step.round}",
                "critique": f"critique {step.round}"}[step.role]
        text = step.content if step.ok else f"(failed: {step.error})"
        self._emit({"reasoning_content": f"[{who}, {what}]\n{text}\n\n"})

    def _emit(self, delta: dict[str, Any], finish: str | None = None) -> None:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.t.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        self._write(b"data: " + _encode(chunk) + b"\n\n")

    def _write(self, data: bytes) -> None:
        conn = self.conn
        if conn.transport is None or conn.closed:
            return
        if not self.started:
            self.started = True
            conn.response_started = True
            head = conn.chunked_head(200, _SSE, b"cache-control: no-cache\r\n")
            conn.transport.write(head + b"%x\r\n%b\r\n" % (len(data), data))
        else:
            conn.transport.write(b"%x\r\n%b\r\n" % (len(data), data))

    def _end_stream(self) -> None:
        if self.conn.transport is not None and not self.conn.closed:
            self.conn.transport.write(b"0\r\n\r\n")

    def _finish_stream(self, req: TribunalRequest) -> None:
        judge = self._last_judge()
        self._emit({}, finish=judge.finish_reason or "stop")
        if req.include_usage:
            chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                     "model": self.t.model, "choices": [], "usage": self.tally.usage()}
            self._write(b"data: " + _encode(chunk) + b"\n\n")
        self._write(b"data: [DONE]\n\n")
        self._end_stream()

    def _last_judge(self) -> Step:
        return next(s for s in reversed(self.steps) if s.role == "judge" and s.ok)

    def _respond(self, req: TribunalRequest, final: str) -> None:
        judge = self._last_judge()
        doc: dict[str, Any] = {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.t.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": final},
                         "finish_reason": judge.finish_reason or "stop"}],
            "usage": self.tally.usage(),
        }
        if req.deliberation:
            doc["tribunal"] = self.extension(judge)
        self.conn.send_full(200, _encode(doc))

    def extension(self, judge: Step) -> dict[str, Any]:
        answered = sum(1 for s in self.steps if s.ok and s.role in ("juror",))
        return {"jurors": len(self.t.jurors), "answered": answered, "judge": judge.model,
                "rounds": self.t.rounds, "steps": [s.view() for s in self.steps],
                "usage_by_model": self.tally.per_model()}

    def _book(self) -> None:
        """The tribunal request itself: metrics and access log (its tokens were booked per step)."""
        gw = self.gw
        duration = perf_counter() - self.start
        gw.metrics.observe(self.t.model, self.status, None, duration, prompt=0, completion=0)
        if self.principal.tenant_id:
            gw.usage.add(self.principal.tenant_id, self.t.model, time(), ok=self.status < 400, prompt=0,
                         completion=0)
        if gw.access_log is not None:
            gw.access_log.access(self.rid, tenant=self.principal.name, model=self.t.model, backend=None,
                                 status=self.status, ttft_s=None, duration_s=duration,
                                 prompt=self.tally.prompt, completion=self.tally.completion, error=self.error)


def tribunal_call(gw: Gateway, conn: HttpConnection, rid: bytes, handoff: TribunalHandoff,
                  body: bytes) -> Coroutine[Any, Any, None]:
    call = TribunalCall(gw, conn, rid, tribunal=handoff.tribunal, principal=handoff.principal, body=body)
    return call.run()
