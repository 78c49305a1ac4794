-- Tribunals: virtual models "tribunal/<name>" (issue 17). The configuration is one JSON
-- document (hpcgate.schemas.TribunalEntry without its name), validated by the admin API before
-- it is written (models exist, prompt placeholders known). It is published with the endpoint
-- table, so a change fires the same NOTIFY as a model change.
CREATE TABLE gateway_tribunals (
    name       text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'),
    config     jsonb NOT NULL CHECK (jsonb_typeof(config) = 'object'),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TRIGGER gateway_tribunals_notify AFTER INSERT OR UPDATE OR DELETE ON gateway_tribunals
    FOR EACH STATEMENT EXECUTE FUNCTION hpcgate_notify_table_change('hpcgate_endpoint_table');
