"""One reconcile pass of the Job Worker: read desired and observed state, plan, apply.

``JobWorker.reconcile_once`` reads every model and live job row (PostgreSQL) and every launcher
job with this deployment's name prefix, scrapes in-flight counts of draining endpoints, runs the
pure planner (:mod:`control.jobs.plan`) per model and applies its actions — models concurrently,
the actions of one model in order. Each action is idempotent, so a pass cut short by a crash or
an outage is simply redone by the next one. Launcher errors are temporary (the pass ends, the
next one retries); a job the scheduler refuses and an invalid configuration are terminal and
written to the job's / model's ``state_reason``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import msgspec

from control.http_client import daemon_client
from control.jobs import store
from control.jobs.inflight import scrape_in_flight
from control.jobs.naming import endpoint_job_id_of, name_prefix
from control.jobs.plan import (
    Action,
    Adopt,
    Cancel,
    CancelOrphan,
    Create,
    Drain,
    FailModel,
    Finish,
    JobView,
    ModelView,
    PlanParams,
    ResetFailures,
    Submit,
    index_observed,
    plan_model,
    plan_orphans,
)
from control.jobs.render import JobContext, LaunchConfig, prepare, render_text
from control.jobs.resources import ResourceError
from control.jobs.settings import JobsSettings
from control.launchers.base import JobSpec, Launcher, LauncherError, ObservedJob, SubmitRejectedError
from control.store.tokens import hash_registration_token, new_registration_token
from hpcgate.logs import get_logger

log = get_logger("hpcgate.control.jobs")
_OUTPUT_TAIL = 1500


class _Prepared(msgspec.Struct, frozen=True):
    template_text: str
    ctx_base: JobContext  # name/ids filled in per job


class JobWorker:
    def __init__(self, settings: JobsSettings, pool: asyncpg.Pool, launcher: Launcher) -> None:
        self.settings = settings
        self.pool = pool
        self.launcher = launcher
        self.prefix = settings.job_name_prefix
        self.params = PlanParams(walltime_lead_s=settings.walltime_lead_s,
                                 drain_timeout_s=settings.drain_timeout_s,
                                 drain_grace_s=settings.drain_grace_s, cancel_retry_s=settings.cancel_retry_s)
        self.policy = store.FailurePolicy(max_failures=settings.max_failures,
                                          backoff_base_s=settings.backoff_base_s,
                                          backoff_max_s=settings.backoff_max_s)
        self.output_dir = settings.resolved_output_dir()
        self.template_dirs = tuple(Path(d) for d in settings.template_dirs)

    # --- observe -------------------------------------------------------------------------

    def _prepare(self, model: store.ModelRow) -> _Prepared:
        """Validate a model's launch configuration into a render-ready context (ResourceError)."""
        config = LaunchConfig(model=model.name, generation=model.generation, template=model.slurm_template,
                              resources=model.slurm_resources, engine_args=model.engine_args)
        text, ctx = prepare(config, self.template_dirs, control_url=self.settings.control_url,
                            hpcgate_bin=self.settings.resolved_hpcgate_bin())
        return _Prepared(text, ctx)

    async def reconcile_once(self) -> None:
        """One full pass. Raises LauncherError / database errors for the caller to back off."""
        async with self.pool.acquire() as conn:
            models = await store.load_models(conn)
            # An admin set a failed model back to active: count its failures afresh. (Only
            # touch rows that need it: every UPDATE statement notifies the table listeners.)
            stale = [m.model_id for m in models
                     if m.state == "active" and m.consecutive_failures >= self.settings.max_failures]
            for model_id in stale:
                await store.reset_failures(conn, model_id)
            if stale:
                models = await store.load_models(conn)
            rows = await store.load_live_jobs(conn, self.launcher.kind)
        observed_list = await self.launcher.observe(name_prefix(self.prefix))
        ids_of = {o.name: eid for o in observed_list
                  if (eid := endpoint_job_id_of(self.prefix, o.name)) is not None}
        observed, dup_actions = index_observed(observed_list, ids_of,
                                               {r.endpoint_job_id: r.launcher_job_id for r in rows})
        live_ids = {r.endpoint_job_id for r in rows}
        claimed = {r.launcher_job_id for r in rows if r.launcher_job_id}
        global_actions = dup_actions + plan_orphans(observed, live_ids, claimed)

        in_flight = await self._scrape_draining(rows)
        now = time.time()
        prepared: dict[int, _Prepared | ResourceError] = {}
        for m in models:
            try:
                prepared[m.model_id] = self._prepare(m)
            except ResourceError as exc:
                prepared[m.model_id] = exc

        by_model: dict[int, list[store.JobRow]] = {}
        for r in rows:
            by_model.setdefault(r.model_id, []).append(r)
        tasks = []
        for m in models:
            prep = prepared[m.model_id]
            view = ModelView(
                model_id=m.model_id, name=m.name, state=m.state, desired=m.desired_instances,
                generation=m.generation, startup_timeout_s=float(m.startup_timeout_s),
                retry_not_before=m.retry_not_before, failures=m.consecutive_failures,
                config_error=str(prep) if isinstance(prep, ResourceError) else None,
            )
            jobs = [JobView(endpoint_job_id=r.endpoint_job_id, generation=r.generation, state=r.state,
                            launcher_job_id=r.launcher_job_id, created_at=r.created_at, ready_at=r.ready_at,
                            replaces=r.replaces, draining_since=r.draining_since,
                            cancel_requested_at=r.cancel_requested_at, has_endpoint=r.endpoint_id is not None,
                            in_flight=in_flight.get(r.endpoint_job_id))
                    for r in by_model.get(m.model_id, [])]
            actions = plan_model(view, jobs, observed, now, self.params)
            if actions:
                tasks.append(self._apply_all(m, prep, actions, observed))
        if global_actions:
            tasks.append(self._apply_all(None, None, global_actions, observed))
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    async def _scrape_draining(self, rows: list[store.JobRow]) -> dict[int, int | None]:
        targets = [r for r in rows if r.state == "draining" and r.node and r.port]
        if not targets:
            return {}
        timeout = self.settings.metrics_timeout_s
        async with daemon_client(timeout) as client:
            scrapes = (scrape_in_flight(client, r.node or "", r.port or 0, r.bearer_token, timeout)
                       for r in targets)
            counts = await asyncio.gather(*scrapes)
        return {r.endpoint_job_id: c for r, c in zip(targets, counts, strict=True)}

    # --- apply ---------------------------------------------------------------------------

    async def _apply_all(self, model: store.ModelRow | None, prep: _Prepared | ResourceError | None,
                         actions: list[Action], observed: dict[int, ObservedJob]) -> None:
        backing_off = False
        for action in actions:
            if backing_off and isinstance(action, (Create, Submit)):
                continue  # planned before this pass's failure set the model's backoff (or failed it)
            failed = await self._apply(model, prep, action, observed)
            backing_off = backing_off or failed or (isinstance(action, Finish) and action.failure)

    async def _apply(self, model: store.ModelRow | None, prep: _Prepared | ResourceError | None,
                     action: Action, observed: dict[int, ObservedJob]) -> bool:
        """Apply one action; True when a submission was refused (counts as a start failure)."""
        if isinstance(action, (Create, Submit)):
            assert model is not None and isinstance(prep, _Prepared)
            return await self._create_or_submit(model, prep, action)
        elif isinstance(action, Adopt):
            async with self.pool.acquire() as conn:
                await store.record_submitted(conn, action.endpoint_job_id, action.launcher_job_id)
            log.info("job_adopted", endpoint_job_id=action.endpoint_job_id,
                     launcher_job_id=action.launcher_job_id, old="pending", new="submitted",
                     reason="found at the launcher by name after a restart")
        elif isinstance(action, Drain):
            async with self.pool.acquire() as conn:
                old = await store.set_draining(conn, action.endpoint_job_id, action.reason)
            if old is not None and old != "draining":
                log.info("job_draining", endpoint_job_id=action.endpoint_job_id, old=old, new="draining",
                         reason=action.reason)
        elif isinstance(action, Cancel):
            async with self.pool.acquire() as conn:
                old = await store.set_cancelling(conn, action.endpoint_job_id, action.reason)
            if old is None:
                return False
            if action.launcher_job_id is not None:
                await self.launcher.cancel(action.launcher_job_id)
            log.info("job_cancelling", endpoint_job_id=action.endpoint_job_id,
                     launcher_job_id=action.launcher_job_id, old=old, new="cancelling", reason=action.reason)
        elif isinstance(action, Finish):
            await self._finish(action, observed.get(action.endpoint_job_id))
        elif isinstance(action, CancelOrphan):
            await self.launcher.cancel(action.launcher_job_id)
            log.warning("orphan_cancelled", launcher_job_id=action.launcher_job_id, job_name=action.name,
                        reason=action.reason)
        elif isinstance(action, FailModel):
            async with self.pool.acquire() as conn:
                changed = await store.fail_model(conn, action.model_id, action.reason)
            if changed:
                log.error("model_failed", model_id=action.model_id, old="active", new="failed",
                          reason=action.reason)
        elif isinstance(action, ResetFailures):
            async with self.pool.acquire() as conn:
                await store.reset_failures(conn, action.model_id)
        return False

    async def _finish(self, action: Finish, obs: ObservedJob | None) -> None:
        reason = action.reason
        if action.cancel_launcher_job is not None:
            try:
                await self.launcher.cancel(action.cancel_launcher_job)
            except LauncherError as exc:
                log.warning("cancel_failed", launcher_job_id=action.cancel_launcher_job, error=str(exc))
        if action.read_output and obs is not None:
            if obs.output_path is None:  # squeue's fixed format has no output path; we chose it
                obs = msgspec.structs.replace(obs, output_path=str(self.output_dir / f"{obs.name}.out"))
            tail = await self.launcher.read_output(obs, 8192)
            if tail:
                reason = f"{reason}; output: {_last_lines(tail)}"
        async with self.pool.acquire() as conn:
            old, model_state = await store.finish_job(conn, action.endpoint_job_id, action.state, reason,
                                                      failure=action.failure, policy=self.policy)
        if old is None:
            return
        event = "job_failed" if action.state == "failed" else "job_ended"
        log.info(event, endpoint_job_id=action.endpoint_job_id, old=old, new=action.state, reason=reason)
        if model_state == "failed":
            log.error("model_failed", endpoint_job_id=action.endpoint_job_id, old="active", new="failed",
                      reason=f"{self.policy.max_failures} job starts failed in a row")

    async def _create_or_submit(self, model: store.ModelRow, prep: _Prepared,
                                action: Create | Submit) -> bool:
        token = new_registration_token()
        token_hash = hash_registration_token(token)
        ttl = self.settings.registration_ttl_s
        async with self.pool.acquire() as conn:
            if isinstance(action, Create):
                job_id, name = await store.create_job(
                    conn, model_id=model.model_id, model=model.name, generation=model.generation,
                    launcher=self.launcher.kind, prefix=self.prefix, replaces=action.replaces,
                    walltime_s=prep.ctx_base.walltime_s, token_hash=token_hash, token_ttl_s=ttl)
                log.info("job_created", endpoint_job_id=job_id, model=model.name, job_name=name,
                         replaces=action.replaces, old=None, new="pending",
                         reason="replacement" if action.replaces else "below desired instances")
            else:
                job_id = action.endpoint_job_id
                row_name = await conn.fetchval(
                    "SELECT job_name FROM ai_model_endpoint_jobs WHERE endpoint_job_id = $1", job_id)
                if not await store.rotate_token(conn, job_id, token_hash, ttl) or row_name is None:
                    return False  # no longer pending: someone (registration, an admin) moved it on
                name = str(row_name)
        output = str(self.output_dir / f"{name}.out")
        ctx = msgspec.structs.replace(prep.ctx_base, name=name, endpoint_job_id=job_id, output_path=output)
        script = render_text(prep.template_text, ctx)
        spec = JobSpec(name=name, script=script, output_path=output, workdir=str(self.output_dir),
                       time_limit_s=ctx.walltime_s,
                       secret_env={"HPCGATE_JOB_REGISTRATION_TOKEN": token})
        try:
            launcher_job_id = await self.launcher.submit(spec)
        except SubmitRejectedError as exc:
            await self._finish(Finish(job_id, "failed", str(exc), failure=True), None)
            return True
        async with self.pool.acquire() as conn:
            await store.record_submitted(conn, job_id, launcher_job_id)
        log.info("job_submitted", endpoint_job_id=job_id, launcher_job_id=launcher_job_id, job_name=name,
                 model=model.name, old="pending", new="submitted",
                 reason="submitted to " + self.launcher.kind)
        return False


def _last_lines(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()][-8:]
    return " | ".join(lines)[-_OUTPUT_TAIL:]
