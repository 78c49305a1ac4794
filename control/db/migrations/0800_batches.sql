-- The Files and Batch APIs (docs/batch.md): uploaded files, batches, and each batch line's
-- progress. A line's result is stored with its row in the same transaction that marks it done,
-- so a runner killed at any point loses nothing and writes nothing twice: the output and error
-- files are written from these rows when the batch is finalised.

CREATE TABLE batch_files (
    seq         bigint GENERATED ALWAYS AS IDENTITY UNIQUE,  -- list order and paging cursor
    file_id     text PRIMARY KEY,
    tenant_id   bigint NOT NULL REFERENCES identity_tenants (tenant_id) ON DELETE CASCADE,
    purpose     text NOT NULL,
    filename    text NOT NULL,
    bytes       bigint NOT NULL CHECK (bytes >= 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    deleted     boolean NOT NULL DEFAULT false
);
CREATE INDEX batch_files_tenant ON batch_files (tenant_id, seq DESC) WHERE NOT deleted;

CREATE TABLE batches (
    seq               bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    batch_id          text PRIMARY KEY,
    tenant_id         bigint NOT NULL REFERENCES identity_tenants (tenant_id) ON DELETE CASCADE,
    endpoint          text NOT NULL,
    input_file_id     text NOT NULL,
    completion_window text NOT NULL,
    status            text NOT NULL DEFAULT 'validating' CHECK (status IN (
                        'validating', 'failed', 'in_progress', 'finalizing', 'completed',
                        'expired', 'cancelling', 'cancelled')),
    final_status      text,  -- while finalizing: completed, expired or cancelled
    metadata          jsonb,
    errors            jsonb,
    output_file_id    text,
    error_file_id     text,
    total             integer NOT NULL DEFAULT 0,
    completed         integer NOT NULL DEFAULT 0,
    failed            integer NOT NULL DEFAULT 0,
    prompt_tokens     bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz NOT NULL,
    in_progress_at    timestamptz,
    finalizing_at     timestamptz,
    completed_at      timestamptz,
    failed_at         timestamptz,
    expired_at        timestamptz,
    cancelling_at     timestamptz,
    cancelled_at      timestamptz
);
CREATE INDEX batches_tenant ON batches (tenant_id, seq DESC);
CREATE INDEX batches_active ON batches (status) WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling');

CREATE TABLE batch_lines (
    batch_id     text NOT NULL REFERENCES batches (batch_id) ON DELETE CASCADE,
    line_no      integer NOT NULL,      -- 1-based line number in the input file
    custom_id    text NOT NULL,
    model        text NOT NULL,
    byte_offset  bigint NOT NULL,       -- where the line's bytes are in the input file
    byte_length  integer NOT NULL,
    state        text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'claimed', 'done')),
    claim        uuid,                  -- the claim that may write the result (see runner)
    lease_until  timestamptz,
    ok           boolean,
    done_by      text,                  -- the runner that wrote the result (operators, tests)
    result       bytea,
    PRIMARY KEY (batch_id, line_no),
    UNIQUE (batch_id, custom_id)
);
CREATE INDEX batch_lines_todo ON batch_lines (batch_id, line_no) WHERE state <> 'done';
