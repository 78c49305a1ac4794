-- This database's deployment identity: a random id drawn once. The Endpoint Worker claims its
-- Redis prefix with it (and `hpcgate up` checks the claim), so a second deployment with another
-- database but the same HPCGATE_REDIS_PREFIX is refused instead of publishing its tables over
-- this one's: its gateways would route to the other's instances and accept the other's keys.
CREATE TABLE deployment_identity (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    deployment_id uuid NOT NULL DEFAULT gen_random_uuid(),
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO deployment_identity DEFAULT VALUES;
