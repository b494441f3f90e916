-- The NOTIFY for inserted jobs names the claim shards they are in, one bit each (the claim
-- index's `hashtext(id) & 1`: jobs/src/store/claim.rs), so an idle pool wakes the fetcher
-- whose shard has new work and not the other (a single job is in one shard; the other
-- fetcher's claims, from its cursor and its head, and its next-due read found nothing).
-- A payload without `shards` (an announcement, a retry, this trigger before now) still
-- wakes every fetcher of the queue; listeners of versions before this ignore the field.
CREATE OR REPLACE FUNCTION apalis.molecule_notify_inserted() RETURNS trigger AS $$
BEGIN
    IF current_setting('molecule.announce', true) = 'after_commit' THEN
        RETURN NULL;
    END IF;
    PERFORM pg_notify('apalis::job::insert', json_build_object('job_type', q.job_type, 'shards', q.shards)::text)
    FROM (SELECT job_type, bit_or(1 << (hashtext(id) & 1)) AS shards FROM inserted GROUP BY job_type) q;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
