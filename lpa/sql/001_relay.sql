-- lpa relay schema: the manager's tables the relay reads and writes, plus the relay's own columns.
--
-- Run by `lpa db migrate --dsn DSN` in ONE transaction with a lock_timeout (see lpa/relay/schema.py),
-- with the files after it; or by hand, from the top of a checkout, through etc/schema.sql:
--   psql -v ON_ERROR_STOP=1 --single-transaction -f etc/schema.sql "$DATABASE_URL"
--
-- Safe against a live Linux-Patch-Manager database and idempotent (run twice = no change):
--   * every manager object is created only when ABSENT; an existing manager table is never altered
--     except for the additive relay_* columns on patch_job_hosts, and those ALTERs only run when the
--     column is missing (so a second run takes no lock on the table at all);
--   * enum values the manager added in later migrations are added only if missing.
--
-- Shapes follow the manager's migrations (001, 003, 008, 017, 021, 023, 027, 032, 034, 035, 036, 040).
-- Left out on purpose, because the relay does not create those tables: the foreign keys
-- patch_jobs.created_by_user_id -> users(id) and patch_jobs.maintenance_window_id ->
-- maintenance_windows(id), and the trg_job_enqueued trigger (job_executor's business).

-- enums ------------------------------------------------------------------------------------------
DO $$
BEGIN
    IF to_regtype('job_status') IS NULL THEN
        CREATE TYPE job_status AS ENUM
            ('queued', 'pending', 'running', 'succeeded', 'failed', 'cancelled', 'waiting_health_check');
    ELSIF NOT EXISTS (SELECT 1 FROM pg_enum
                      WHERE enumtypid = 'job_status'::regtype AND enumlabel = 'waiting_health_check') THEN
        ALTER TYPE job_status ADD VALUE IF NOT EXISTS 'waiting_health_check';  -- manager migration 008
    END IF;

    IF to_regtype('job_kind') IS NULL THEN
        CREATE TYPE job_kind AS ENUM ('patch_apply', 'patch_remove', 'reboot', 'rollback', 'self_upgrade');
    ELSIF NOT EXISTS (SELECT 1 FROM pg_enum
                      WHERE enumtypid = 'job_kind'::regtype AND enumlabel = 'self_upgrade') THEN
        ALTER TYPE job_kind ADD VALUE IF NOT EXISTS 'self_upgrade';  -- manager migration 023
    END IF;

    IF to_regtype('host_health_status') IS NULL THEN
        CREATE TYPE host_health_status AS ENUM ('pending', 'healthy', 'degraded', 'unreachable');
    END IF;
END
$$;

-- hosts (001 + 017, 021, 032, 034, 040) ----------------------------------------------------------
DO $$
BEGIN
    IF to_regclass('hosts') IS NULL THEN
        CREATE TABLE hosts (
            id                   UUID PRIMARY KEY DEFAULT gen_random_uuid(),
            fqdn                 TEXT NOT NULL,
            ip_address           INET NOT NULL,
            display_name         TEXT NOT NULL DEFAULT '',
            os_family            TEXT,
            os_name              TEXT,
            arch                 TEXT,
            agent_version        TEXT,
            health_status        host_health_status NOT NULL DEFAULT 'pending',
            last_health_at       TIMESTAMPTZ,
            last_patch_at        TIMESTAMPTZ,
            agent_port           INTEGER NOT NULL DEFAULT 12443,
            notes                TEXT,
            registered_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
            updated_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
            machine_id           TEXT,
            crl_status           TEXT,
            crl_age_seconds      BIGINT,
            crl_next_update      TIMESTAMPTZ,
            consecutive_failures INT NOT NULL DEFAULT 0,
            pending_reboot       BOOLEAN NOT NULL DEFAULT false,
            package_db_clean     BOOLEAN NOT NULL DEFAULT true,
            reboot_paused        BOOLEAN NOT NULL DEFAULT false,
            UNIQUE (fqdn, ip_address)
        );
    END IF;
END
$$;

-- patch_jobs (001 + 027, 035, 036) -------------------------------------------------------------
DO $$
BEGIN
    IF to_regclass('patch_jobs') IS NULL THEN
        CREATE TABLE patch_jobs (
            id                    UUID PRIMARY KEY DEFAULT gen_random_uuid(),
            kind                  job_kind NOT NULL DEFAULT 'patch_apply',
            status                job_status NOT NULL DEFAULT 'queued',
            created_by_user_id    UUID,  -- manager: REFERENCES users(id); users is not ours
            parent_job_id         UUID REFERENCES patch_jobs (id),
            maintenance_window_id UUID,  -- manager: REFERENCES maintenance_windows(id); not ours
            immediate             BOOLEAN NOT NULL DEFAULT false,
            patch_selection       JSONB NOT NULL DEFAULT '[]',
            notes                 TEXT NOT NULL DEFAULT '',
            created_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
            started_at            TIMESTAMPTZ,
            completed_at          TIMESTAMPTZ,
            auto_host_id          UUID,
            allow_reboot          BOOLEAN NOT NULL DEFAULT true,
            reboot_delay_seconds  BIGINT NOT NULL DEFAULT 0
        );
        -- 027: one active automatic job per maintenance window and host
        CREATE UNIQUE INDEX patch_jobs_active_auto_uniq ON patch_jobs (maintenance_window_id, auto_host_id)
            WHERE auto_host_id IS NOT NULL AND status NOT IN ('succeeded', 'failed', 'cancelled');
    END IF;
END
$$;

-- patch_job_hosts (001 + 003) --------------------------------------------------------------------
DO $$
BEGIN
    IF to_regclass('patch_job_hosts') IS NULL THEN
        CREATE TABLE patch_job_hosts (
            id            UUID PRIMARY KEY DEFAULT gen_random_uuid(),
            job_id        UUID NOT NULL REFERENCES patch_jobs (id) ON DELETE CASCADE,
            host_id       UUID NOT NULL REFERENCES hosts (id),
            status        job_status NOT NULL DEFAULT 'queued',
            agent_job_id  TEXT,
            retry_count   INT NOT NULL DEFAULT 0,
            output        TEXT NOT NULL DEFAULT '',
            error_message TEXT,
            started_at    TIMESTAMPTZ,
            completed_at  TIMESTAMPTZ,
            retry_next_at TIMESTAMPTZ,
            last_error    TEXT,
            UNIQUE (job_id, host_id)
        );
        CREATE INDEX idx_patch_job_hosts_job_id ON patch_job_hosts (job_id);
        CREATE INDEX idx_patch_job_hosts_host_id ON patch_job_hosts (host_id);
        CREATE INDEX idx_patch_job_hosts_status ON patch_job_hosts (status);
        CREATE INDEX idx_patch_job_hosts_retry_next_at ON patch_job_hosts (retry_next_at);
    END IF;
END
$$;

-- the relay's own columns (additive; the manager ignores them) -----------------------------------
--   relay_last_seq      the last agent event seq applied to the row: the relay resubscribes from it
--                       after a restart or reconnect, and skips duplicates at or below it
--   relay_agent_job_id  the agent job relay_last_seq counts for: job_executor may re-dispatch the
--                       row to a new agent job (numbered from 1 again), so a seq only counts while
--                       this equals agent_job_id
--   relay_transport     'ws' or 'poll': how the last applied event arrived
--   relay_last_event_at when the relay last changed the row
--   relay_progress      the agent's progress percentage (0..100) from the last event
--   relay_message       the agent's last status message (output lines go to `output`)
DO $$
DECLARE
    wanted CONSTANT TEXT[][] := ARRAY[
        ['relay_last_seq',      'BIGINT NOT NULL DEFAULT 0'],
        ['relay_agent_job_id',  'TEXT'],
        ['relay_transport',     'TEXT'],
        ['relay_last_event_at', 'TIMESTAMPTZ'],
        ['relay_progress',      'INT'],
        ['relay_message',       'TEXT']];
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
