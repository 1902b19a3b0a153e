-- lpa relay schema, part 2: what the relay's group-commit write path needs.
--
-- Run after 001_relay.sql by `lpa db migrate` (one transaction, lock_timeout set; see
-- lpa/relay/schema.py), or by hand: psql -v ON_ERROR_STOP=1 -1 -f 002_relay_writepath.sql "$DSN"
--
-- Additive and idempotent, like 001: columns are added only when missing, the table and the index
-- are created only when absent, so a second run changes nothing and takes no lock on the manager's
-- tables.  The manager ignores all of it.

-- patch_job_hosts: what the relay needs to know about a row's output without reading it ---------
--   relay_output_end       the last character of the row's output ('' when empty), as the relay
--                          last left it: how the next line joins (NULL: not known yet, the relay
--                          reads right(output, 1) once)
--   relay_snapshot_digest  digest of the output when a job snapshot (a poll of an old agent)
--                          last replaced it: an identical snapshot is not news
DO $$
DECLARE
    wanted CONSTANT TEXT[][] := ARRAY[
        ['relay_output_end',      'TEXT'],
        ['relay_snapshot_digest', 'TEXT']];
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

-- patch_jobs: the roll-up's running counts, kept under the parent row's lock ----------------------
--   relay_host_count       host rows of the job when the relay first counted them (NULL: not yet)
--   relay_*_count          of those, how many ended succeeded / failed / cancelled
-- The first host row of a job to end makes the relay count the job's rows once (rows other writers
-- ended before are counted then); each later ending adds one.  Rows ended by other writers after
-- that are found through relay_open_host_rows below.
DO $$
DECLARE
    wanted CONSTANT TEXT[] := ARRAY[
        'relay_host_count', 'relay_succeeded_count', 'relay_failed_count', 'relay_cancelled_count'];
    i INT;
BEGIN
    FOR i IN 1 .. array_length(wanted, 1) LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_attribute
                       WHERE attrelid = 'patch_jobs'::regclass
                         AND attname = wanted[i] AND NOT attisdropped) THEN
            EXECUTE format('ALTER TABLE patch_jobs ADD COLUMN IF NOT EXISTS %I INT', wanted[i]);
        END IF;
    END LOOP;
END
$$;

-- relay_output_pending: output lines applied but not yet appended to patch_job_hosts.output ------
-- A line is written here once; the relay appends a row's lines to its output (and deletes them
-- here) when the row is due a refresh (about every second while it runs) and when it ends.
-- ON DELETE CASCADE: a deleted job takes its waiting lines with it.
DO $$
BEGIN
    IF to_regclass('relay_output_pending') IS NULL THEN
        CREATE TABLE relay_output_pending (
            id     BIGSERIAL PRIMARY KEY,
            row_id UUID NOT NULL REFERENCES patch_job_hosts (id) ON DELETE CASCADE,
            text   TEXT NOT NULL
        );
        CREATE INDEX relay_output_pending_row ON relay_output_pending (row_id, id);
    END IF;
END
$$;

-- relay_open_host_rows: "does this job still have a row that has not ended?" in one index probe --
-- Partial: only rows not terminal are in it, so it stays small however many jobs the table keeps.
-- Building it reads patch_job_hosts once under a SHARE lock (the manager's writes to that table
-- wait meanwhile: about a second per million rows).
DO $$
BEGIN
    IF to_regclass('relay_open_host_rows') IS NULL THEN
        CREATE INDEX relay_open_host_rows ON patch_job_hosts (job_id)
            WHERE status NOT IN ('succeeded', 'failed', 'cancelled');
    END IF;
END
$$;
