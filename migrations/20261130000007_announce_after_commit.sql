-- A NOTIFY in a transaction serializes the commits of all notifying transactions:
-- PostgreSQL takes one server-wide lock when such a transaction commits and keeps it until
-- the commit is flushed, so they never share a WAL flush (64 clients inserting a row:
-- 13,762 TPS here; inserting and notifying: 4,008). An enqueuing statement may say
-- that its caller announces the job itself after the commit (jobs/src/announce.rs: one
-- autocommit pg_notify per queue for many jobs): it sets `molecule.announce` to
-- `after_commit` for its transaction, and this trigger then stays quiet. Every other
-- enqueuing statement of ours sets it back to '' first; inserts that set nothing (apalis'
-- own push) are announced here as before, unless a quiet enqueue of ours ran earlier in
-- the same transaction.
CREATE OR REPLACE FUNCTION apalis.molecule_notify_inserted() RETURNS trigger AS $$
BEGIN
    IF current_setting('molecule.announce', true) = 'after_commit' THEN
        RETURN NULL;
    END IF;
    PERFORM pg_notify('apalis::job::insert', json_build_object('job_type', q.job_type)::text)
    FROM (SELECT DISTINCT job_type FROM inserted) q;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
