-- flowthrough store schema, version 4: a dead entry holds its user's lane (SPEC §11). Applied
-- once, in one transaction, under the migration lock. Never edit a released migration: add the
-- next.

-- A user's queue is its pending entries and, at their head, the dead entry that holds its lane
-- until the operator retries it (pending again, holds_lane cleared) or drops it (the row goes).
-- Entries that died before this version hold nothing: their users' later commands were
-- delivered already, and holding now would stop commands the AS sends next behind an end
-- nobody is looking at any more.
ALTER TABLE outbox ADD COLUMN holds_lane boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT outbox_holds_lane_dead CHECK (NOT holds_lane OR state = 'dead');
-- Few rows (one per held user): the head of a queue and the claim look here beside the pending
-- index.
CREATE INDEX outbox_held ON outbox (user_id, id) WHERE holds_lane;
