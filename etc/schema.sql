-- The relay's schema, for psql from a checkout: every lpa/sql/NNN_*.sql in order, in ONE
-- transaction, as `lpa db migrate --dsn "$DATABASE_URL"` applies them (which also prints what each
-- file created or added).  From the top of the checkout:
--
--     psql -v ON_ERROR_STOP=1 --single-transaction -f etc/schema.sql "$DATABASE_URL"
--
-- Every file is idempotent and additive (see the comments in each).  The lock timeout makes the
-- whole run give up, with nothing changed, rather than queue behind the manager's writers on a
-- busy database.  A new migration file gets its own \ir line below, in order.
SET lock_timeout = '5s';
\ir ../lpa/sql/001_relay.sql
\ir ../lpa/sql/002_relay_writepath.sql
\ir ../lpa/sql/003_relay_membership.sql
\ir ../lpa/sql/004_relay_deadline.sql
\ir ../lpa/sql/005_relay_unreachable.sql
