-- Per-model limits of a tenant (a large model capped lower than a small one) and a monthly
-- token quota, enforced by the gateways like the tenant-wide limits (docs/gateway.md).
-- model_limits: {"<model name>": {"max_concurrent_requests": N, "tokens_per_minute": N}, ...}
ALTER TABLE identity_tenants
    ADD COLUMN model_limits jsonb NOT NULL DEFAULT '{}'
        CHECK (jsonb_typeof(model_limits) = 'object'),
    ADD COLUMN monthly_token_quota bigint CHECK (monthly_token_quota > 0);
