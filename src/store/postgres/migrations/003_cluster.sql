-- flowthrough store schema, version 3: several nodes on one database (issue 22). Applied once,
-- in one transaction, under the migration lock. Never edit a released migration: add the next.

-- Each 429 a node meets raises limited_seq and pushes paused_until: the others see it at their
-- next claim or look for work, pause as long, and learn their own share of the pace from it.
ALTER TABLE control ADD COLUMN limited_seq bigint NOT NULL DEFAULT 0;

-- While Webex fails, one user on one node probes; the others wait for it (every node's users).
-- A probe not renewed by probe_until (its node died) lets another node's user probe.
ALTER TABLE control ADD COLUMN probe_owner text, ADD COLUMN probe_until timestamptz;

-- The nodes sharing this store: who they are, which release they run, when each last said it was
-- alive (the database's clock). `flowthrough cluster status`, /status and /metrics read it;
-- stopped_at is set by a node leaving on SIGTERM, and cleared when it starts again.
CREATE TABLE nodes (
    node_id      text PRIMARY KEY,
    version      text NOT NULL,
    started_at   timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL,
    stopped_at   timestamptz,
    -- Its pace under Webex's rate limit (attempts per second), while it keeps one: each node
    -- paces at the average of the live nodes' paces, so the nodes split the limit evenly.
    pace_per_s   double precision
);
