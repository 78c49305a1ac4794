-- hpcgate initial schema, after Trappen et al.'s management-layer tables.
-- Constraints, not application code, make the races impossible: unique names, unique
-- (node, port), unique launcher job ids, single-use registration tokens.

CREATE TABLE identity_tenants (
    tenant_id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name                    text NOT NULL UNIQUE
                            CHECK (name ~ '^[a-z0-9][a-z0-9_.-]{0,62}$'),
    enabled                 boolean NOT NULL DEFAULT true,
    allowed_models          text[],               -- NULL: every model
    max_concurrent_requests integer CHECK (max_concurrent_requests > 0),
    tokens_per_minute       integer CHECK (tokens_per_minute > 0),
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now()
);

-- API keys: only a keyed hash (HMAC-SHA256) and a short visible prefix are stored.
CREATE TABLE identity_tenant_authentications (
    authentication_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id         bigint NOT NULL REFERENCES identity_tenants (tenant_id) ON DELETE CASCADE,
    key_prefix        text NOT NULL CHECK (length(key_prefix) BETWEEN 4 AND 16),
    key_hash          bytea NOT NULL UNIQUE CHECK (octet_length(key_hash) = 32),
    description       text NOT NULL DEFAULT '',
    created_at        timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz,
    revoked_at        timestamptz,
    CHECK (expires_at IS NULL OR expires_at > created_at)
);
CREATE INDEX identity_tenant_authentications_prefix ON identity_tenant_authentications (key_prefix);
CREATE INDEX identity_tenant_authentications_tenant ON identity_tenant_authentications (tenant_id);

CREATE TABLE ai_model_configurations (
    model_id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name                text NOT NULL UNIQUE
                        CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_./:-]{0,127}$'),
    engine_args         jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(engine_args) = 'array'),
    slurm_template      text NOT NULL DEFAULT 'sim',
    slurm_resources     jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(slurm_resources) = 'object'),
    min_instances       integer NOT NULL DEFAULT 0 CHECK (min_instances >= 0),
    max_instances       integer NOT NULL DEFAULT 1 CHECK (max_instances >= min_instances),
    desired_instances   integer NOT NULL DEFAULT 0,
    startup_timeout_s   integer NOT NULL DEFAULT 1800 CHECK (startup_timeout_s > 0),
    max_model_len       integer CHECK (max_model_len > 0),
    state               text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'draining', 'failed')),
    state_reason        text,
    generation          bigint NOT NULL DEFAULT 1,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CHECK (desired_instances BETWEEN min_instances AND max_instances)
);

-- One namespace for model names and aliases: an alias is unique across all models.
CREATE TABLE ai_model_aliases (
    alias    text PRIMARY KEY CHECK (alias ~ '^[A-Za-z0-9][A-Za-z0-9_./:-]{0,127}$'),
    model_id bigint NOT NULL REFERENCES ai_model_configurations (model_id) ON DELETE CASCADE
);
CREATE INDEX ai_model_aliases_model ON ai_model_aliases (model_id);

CREATE TABLE ai_model_endpoint_jobs (
    endpoint_job_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    model_id                 bigint NOT NULL REFERENCES ai_model_configurations (model_id),
    generation               bigint NOT NULL,
    launcher                 text NOT NULL CHECK (launcher IN ('slurm', 'slurmrest', 'local')),
    launcher_job_id          text,                 -- NULL until the launcher accepted it
    state                    text NOT NULL DEFAULT 'pending'
                             CHECK (state IN ('pending', 'submitted', 'registered', 'ready',
                                              'draining', 'cancelling', 'ended', 'failed')),
    state_reason             text,
    registration_token_hash  bytea NOT NULL CHECK (octet_length(registration_token_hash) = 32),
    registration_expires_at  timestamptz NOT NULL,
    registration_used_at     timestamptz,
    walltime_s               integer CHECK (walltime_s > 0),
    created_at               timestamptz NOT NULL DEFAULT now(),
    submitted_at             timestamptz,
    registered_at            timestamptz,
    ready_at                 timestamptz,
    ended_at                 timestamptz,
    UNIQUE (launcher, launcher_job_id)
);
CREATE INDEX ai_model_endpoint_jobs_live ON ai_model_endpoint_jobs (model_id)
    WHERE state NOT IN ('ended', 'failed');

CREATE TABLE ai_model_endpoints (
    endpoint_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint_job_id      bigint NOT NULL UNIQUE
                         REFERENCES ai_model_endpoint_jobs (endpoint_job_id) ON DELETE CASCADE,
    model_id             bigint NOT NULL REFERENCES ai_model_configurations (model_id),
    node                 text NOT NULL CHECK (node ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,252}$'),
    port                 integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
    bearer_token         text NOT NULL,   -- the gateway presents it to the vLLM behind
    capabilities         text[] NOT NULL DEFAULT '{}',
    registered_at        timestamptz NOT NULL DEFAULT now(),
    ready_at             timestamptz,
    last_probe_at        timestamptz,
    consecutive_failures integer NOT NULL DEFAULT 0,
    draining             boolean NOT NULL DEFAULT false,
    UNIQUE (node, port)
);

-- Token usage, aggregated by the gateways into time buckets and upserted in batches.
CREATE TABLE usage_records (
    tenant_id         bigint NOT NULL REFERENCES identity_tenants (tenant_id) ON DELETE CASCADE,
    model             text NOT NULL,
    bucket_start      timestamptz NOT NULL,
    requests          bigint NOT NULL DEFAULT 0 CHECK (requests >= 0),
    errors            bigint NOT NULL DEFAULT 0 CHECK (errors >= 0),
    prompt_tokens     bigint NOT NULL DEFAULT 0 CHECK (prompt_tokens >= 0),
    completion_tokens bigint NOT NULL DEFAULT 0 CHECK (completion_tokens >= 0),
    PRIMARY KEY (tenant_id, model, bucket_start)
);

-- Versions of the published snapshots: a sequence only grows, across restarts and publishers.
CREATE SEQUENCE published_table_version;
