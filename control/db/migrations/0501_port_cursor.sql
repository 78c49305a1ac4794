-- The last port handed out on each node. The next registration searches above it first (and
-- wraps around), so a port that a process unknown to hpcgate holds is not handed out again
-- to the very next job after the job it broke has been removed.
CREATE TABLE ai_node_port_cursors (
    node      text PRIMARY KEY,
    last_port integer NOT NULL CHECK (last_port BETWEEN 1 AND 65535)
);
