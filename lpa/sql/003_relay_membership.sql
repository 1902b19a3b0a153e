-- lpa relay membership: which relays are alive, and which relay follows which agent.
--
-- Run by `lpa db migrate` after 001 (and 002) in the same transaction; idempotent and additive:
-- two new tables of the relay's own, nothing of the manager's is touched.  The design (heartbeats
-- on the database clock, one lease per agent, self-fencing) is in docs/architecture.rst.
--
-- UNLOGGED, as River's leader table: the rows are rewritten every few seconds and describe only
-- the relays running now, so they need no WAL and no crash recovery; after a server crash the
-- tables come back empty and the live relays register again at their next heartbeat.

-- one row per running relay process; expires_at is renewed by every heartbeat (database clock)
CREATE UNLOGGED TABLE IF NOT EXISTS relay_members (
    relay_id     TEXT PRIMARY KEY,            -- [worker] ws_relay_id (default: host name + pid)
    incarnation  UUID NOT NULL,               -- one per process: two live relays cannot share an id
    hostname     TEXT NOT NULL DEFAULT '',
    pid          INT,
    started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at   TIMESTAMPTZ NOT NULL
);

-- one row per agent (the address the relay dials) that a relay follows; a lease lives exactly as
-- long as its relay's membership row (ON DELETE CASCADE: an expired or departed relay's rows go)
CREATE UNLOGGED TABLE IF NOT EXISTS relay_agent_leases (
    agent_host TEXT NOT NULL,                 -- hosts.fqdn, else host(hosts.ip_address)
    agent_port INT NOT NULL,                  -- hosts.agent_port
    relay_id   TEXT NOT NULL REFERENCES relay_members (relay_id) ON DELETE CASCADE,
    claimed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (agent_host, agent_port)
);

CREATE INDEX IF NOT EXISTS relay_agent_leases_relay_id ON relay_agent_leases (relay_id);
