-- flowthrough store schema, version 2: what import and reconcile need (issue 23). Applied once,
-- in one transaction, under the migration lock. Never edit a released migration: add the next.

-- Where an entry comes from: 'live' (a command of the AS) or 'bulk' (`flowthrough import`,
-- `reconcile --repair`). Delivery takes users with live work before users with only bulk work.
-- Rows written before this version are the AS's: the default makes them live.
ALTER TABLE outbox ADD COLUMN origin text NOT NULL DEFAULT 'live'
    CHECK (origin IN ('live', 'bulk'));

-- The counts of the last `flowthrough reconcile` run, exported by /metrics. One row.
CREATE TABLE reconcile_report (
    id     boolean PRIMARY KEY DEFAULT true CHECK (id),
    report json NOT NULL
);
