-- One NOTIFY per queue per INSERT statement instead of one per row. apalis' row trigger
-- (and our row trigger for future-dated jobs) sent one notification per job: a bulk
-- enqueue of 5 000 jobs queued 5 000 notifications that every listener had to read.
-- Pools only need to know that their queue has new work; an idle pool then re-reads its
-- next due time, so future-dated jobs are covered by the same wake-up.
DROP TRIGGER IF EXISTS notify_workers ON apalis.jobs;
DROP TRIGGER IF EXISTS molecule_notify_scheduled ON apalis.jobs;
DROP FUNCTION IF EXISTS apalis.molecule_notify_scheduled();

CREATE OR REPLACE FUNCTION apalis.molecule_notify_inserted() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('apalis::job::insert', json_build_object('job_type', q.job_type)::text)
    FROM (SELECT DISTINCT job_type FROM inserted) q;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS molecule_notify_inserted ON apalis.jobs;
CREATE TRIGGER molecule_notify_inserted
    AFTER INSERT ON apalis.jobs
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT
    EXECUTE FUNCTION apalis.molecule_notify_inserted();
