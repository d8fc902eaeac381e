-- flowthrough store schema, version 5: each node's share of Webex's rate limit (issue 22).
-- Applied once, in one transaction, under the migration lock. Never edit a released migration:
-- add the next.

-- The pace a node's own answers from Webex support (attempts per second), while it keeps one:
-- learned at its 429s from what Webex took from it, moved by its own raises. Every node paces
-- at the average of the live nodes' shares, so the nodes keep together the sum of what Webex
-- took from each. nodes.pace_per_s (003) held each node's pace, which took up that average and
-- so lost the node's own measure; releases before this one still read and write it.
ALTER TABLE nodes ADD COLUMN share_per_s double precision;

-- When the latest 429 was noted: a node that hears of it only after its own pause (it claims
-- nothing while paused) knows it for one of the same second it already learned from, and does
-- not learn its share again from a second it spent paused.
ALTER TABLE control ADD COLUMN limited_at timestamptz;
