-- Prompt republishing of the gateway tables (control plane, issue 5).
-- Any committed change to the rows a published table is built from sends a NOTIFY, whoever
-- made it (admin API, Job Worker, psql): hpcgate_key_table for tenants and keys,
-- hpcgate_endpoint_table for models, aliases, jobs and endpoints. NOTIFY is transactional
-- (delivered at commit, collapsed within a transaction), so listeners never see uncommitted
-- state. The Endpoint Worker LISTENs on both and republishes within milliseconds; its
-- periodic full publish covers notifications lost while it was disconnected.

CREATE FUNCTION hpcgate_notify_table_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], TG_TABLE_NAME);
    RETURN NULL;
END;
$$;

CREATE TRIGGER identity_tenants_notify AFTER INSERT OR UPDATE OR DELETE ON identity_tenants
    FOR EACH STATEMENT EXECUTE FUNCTION hpcgate_notify_table_change('hpcgate_key_table');
CREATE TRIGGER identity_tenant_authentications_notify
    AFTER INSERT OR UPDATE OR DELETE ON identity_tenant_authentications
    FOR EACH STATEMENT EXECUTE FUNCTION hpcgate_notify_table_change('hpcgate_key_table');

CREATE TRIGGER ai_model_configurations_notify
    AFTER INSERT OR UPDATE OR DELETE ON ai_model_configurations
    FOR EACH STATEMENT EXECUTE FUNCTION hpcgate_notify_table_change('hpcgate_endpoint_table');
CREATE TRIGGER ai_model_aliases_notify AFTER INSERT OR UPDATE OR DELETE ON ai_model_aliases
    FOR EACH STATEMENT EXECUTE FUNCTION hpcgate_notify_table_change('hpcgate_endpoint_table');
CREATE TRIGGER ai_model_endpoint_jobs_notify AFTER INSERT OR UPDATE OR DELETE ON ai_model_endpoint_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION hpcgate_notify_table_change('hpcgate_endpoint_table');
-- The Endpoint Worker's own bookkeeping (last_probe_at, consecutive_failures) also fires this;
-- it skips publishing when the rebuilt table is unchanged, so this cannot loop.
CREATE TRIGGER ai_model_endpoints_notify AFTER INSERT OR UPDATE OR DELETE ON ai_model_endpoints
    FOR EACH STATEMENT EXECUTE FUNCTION hpcgate_notify_table_change('hpcgate_endpoint_table');

-- Usage queries of the admin API filter by time first.
CREATE INDEX usage_records_bucket ON usage_records (bucket_start);
