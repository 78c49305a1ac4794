-- The autoscaler (issue 14).
-- ai_model_autoscaling: per-model policy overrides (admin API; keys are PolicyConfig fields), the
-- off-hours schedule, and
-- the autoscaler's last observation of the model (signals, what it held on and why), which the
-- admin API and the control API's /metrics show. No NOTIFY trigger: nothing published depends on it.
-- ai_model_scaling_decisions: every change of desired_instances the autoscaler or the webhook
-- made, with its rule and inputs; bounded per model by the writer (oldest rows trimmed).

CREATE TABLE ai_model_autoscaling (
    model_id         bigint PRIMARY KEY REFERENCES ai_model_configurations (model_id) ON DELETE CASCADE,
    policy           jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(policy) = 'object'),
    schedule         text,  -- control/autoscale/schedule.py syntax; validated by the admin API
    observed_at      timestamptz,
    signals          jsonb,
    hold             text,
    detail           text,
    pending_overdue  boolean NOT NULL DEFAULT false,
    -- decisions applied so far by "source:reason": never trimmed, so /metrics can export counters
    decision_counts  jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(decision_counts) = 'object'),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ai_model_scaling_decisions (
    decision_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    model_id        bigint NOT NULL REFERENCES ai_model_configurations (model_id) ON DELETE CASCADE,
    decided_at      timestamptz NOT NULL DEFAULT now(),
    from_instances  integer NOT NULL CHECK (from_instances >= 0),
    to_instances    integer NOT NULL CHECK (to_instances >= 0),
    reason          text NOT NULL,
    source          text NOT NULL CHECK (source IN ('autoscaler', 'webhook', 'schedule')),
    detail          text NOT NULL DEFAULT '',
    signals         jsonb
);
CREATE INDEX ai_model_scaling_decisions_model ON ai_model_scaling_decisions (model_id, decision_id DESC);

-- Alerts the Grafana webhook (POST /hooks/grafana) has handled, so a re-sent notification of the
-- same alert (same fingerprint, same firing episode, same status) changes nothing a second time.
-- The API deletes rows older than a week when it writes one.
CREATE TABLE ai_autoscaler_webhook_events (
    fingerprint  text NOT NULL,
    starts_at    text NOT NULL,
    status       text NOT NULL CHECK (status IN ('firing', 'resolved')),
    model        text,
    outcome      text NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (fingerprint, starts_at, status)
);
CREATE INDEX ai_autoscaler_webhook_events_received ON ai_autoscaler_webhook_events (received_at);
