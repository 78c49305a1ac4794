-- Job Worker bookkeeping (issue 6).
-- Jobs: the launcher job name (how a restarted worker finds a job it submitted but did not
-- record), the job a walltime/generation replacement stands in for, and the drain/cancel
-- timestamps that make draining and cancelling resumable after a restart.
-- Models: consecutive start failures and the backoff before the next attempt; reaching the
-- limit sets state 'failed' with the reason (the admin API's "state: active" clears it).

ALTER TABLE ai_model_endpoint_jobs
    ADD COLUMN job_name text,
    ADD COLUMN replaces_endpoint_job_id bigint
        REFERENCES ai_model_endpoint_jobs (endpoint_job_id) ON DELETE SET NULL,
    ADD COLUMN draining_since timestamptz,
    ADD COLUMN cancel_requested_at timestamptz;

CREATE UNIQUE INDEX ai_model_endpoint_jobs_job_name ON ai_model_endpoint_jobs (job_name)
    WHERE job_name IS NOT NULL;

ALTER TABLE ai_model_configurations
    ADD COLUMN consecutive_failures integer NOT NULL DEFAULT 0 CHECK (consecutive_failures >= 0),
    ADD COLUMN retry_not_before timestamptz;
