-- lpa relay: when the relay first got no usable answer from a row's agent (the unreachable deadline).
--
-- Run by `lpa db migrate` after the earlier files, in the same transaction; additive and
-- idempotent like 004_relay_deadline.sql (the ALTER runs only when a column is missing, so a
-- second run takes no lock on the table).
--
--   relay_unreachable_since        when a relay's poll of this row's agent job first failed
--                                  (database clock); the row ends failed once it is older than
--                                  ws_relay_unreachable_deadline_secs, also across relay restarts
--                                  and when another relay takes the agent over.  NULL: the agent
--                                  answers.
--   relay_unreachable_agent_job_id the agent job relay_unreachable_since counts for (a
--                                  re-dispatched row starts again)
DO $$
DECLARE
    wanted CONSTANT TEXT[][] := ARRAY[
        ['relay_unreachable_since',        'TIMESTAMPTZ'],
        ['relay_unreachable_agent_job_id', 'TEXT']];
    i INT;
BEGIN
    FOR i IN 1 .. array_length(wanted, 1) LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_attribute
                       WHERE attrelid = 'patch_job_hosts'::regclass
                         AND attname = wanted[i][1] AND NOT attisdropped) THEN
            EXECUTE format('ALTER TABLE patch_job_hosts ADD COLUMN IF NOT EXISTS %I %s',
                           wanted[i][1], wanted[i][2]);
        END IF;
    END LOOP;
END
$$;
