-- `molecule-bench-queue --designs`: what one job costs PostgreSQL to claim and complete,
-- per table design, measured inside PostgreSQL (a procedure per design, one transaction
-- per statement, no client in the loop), so the schema's share of drain_vs_raw_best can be
-- told from the runtime's. Batches of `b`, claims with FOR UPDATE SKIP LOCKED in queue
-- order, as the runtime and the raw baseline do.
--
--   current    our claim from the head of the queue (jobs/src/store/claim.rs: CLAIM, what
--              an idle pool runs; a draining pool starts at its cursor instead, which at
--              20k jobs saves little) with its `claims` row, and plain-success ack (ack.rs:
--              ACK_DONE_AT, to the version the claim left) with the batch row's delete, on a copy of apalis.jobs with all its indexes
--              and its fillfactor (the claim index's predicate on lock_at, no running
--              index: migrations/20261201000001_claims.sql). Each claimed batch is acked
--              by one statement here, as the runtime's acker does when a batch's acks
--              arrive together (it deletes a row with the write of the batch's last ack);
--   before     the table and statements of f66f40c (2026-11-30): the claim index's
--              predicate on status, the running index, fillfactor 100, no claims row;
--   hot_ready  the job row without any index on a column a claim or ack changes (so both
--              updates can be HOT; fillfactor 50), waiting jobs in a narrow table the
--              claim deletes from. It leaves out what the lease rescuer and the pruner
--              read (running jobs by worker, finished jobs by age): a lower bound;
--   hot_live   the same, the narrow row (keyed by job id) kept, marked with its worker,
--              until the ack deletes it: the rescuer's access path kept (its job rows
--              share hot_jobs with hot_ready's and ready_claims', and those two share
--              `ready`, each design in its own key range: a design that runs after
--              another in a round finds the shared table no longer freshly vacuumed);
--   our_indexes  a copy of apalis.jobs with all its indexes, driven by raw's statements
--              (the claim sets status and lock_at only; the ack is `status = 'Done' WHERE
--              id = ANY(…)`, no fence, no claims row): current minus this is what our
--              statements cost;
--   apalis_row apalis' row (24 columns, the 26-character text key) with raw's indexes
--              (the key and one claim index) and raw's statements: our_indexes minus
--              this is what our other indexes cost (every non-HOT update adds an entry to
--              each index whose predicate the new version meets: the running jobs' at the
--              claim, the finished jobs' at the ack), this minus raw what the row and key
--              cost;
--   ready_claims  hot_ready with current's `claims` rows: hot_ready's rescuer path.
--              Measured (3 runs of --designs 1 --rounds 7 --batch 500, 2026-11-30, when
--              today's `current` was the design `hot_ack` and `before` was `current`):
--              before 27.8–31.7 µs/job, hot_ack 23.4–26.9, ready_claims 16.8–22.5, raw
--              14.6–15.9. HOT share, read by hand from pg_stat_user_tables after one drain
--              of 20k each: 72 % of hot_ack's acks, 83 % of ready_claims' job-row updates;
--   held       current's table, the claim only locking its batch (FOR UPDATE SKIP LOCKED in
--              a transaction held while the batch runs) and the end writing each job once
--              before the one commit: one row version a job and one commit a batch fewer
--              than current, and no `claims` row. What the claim's own write buys, and
--              held gives up: a Running state others read, the attempt counted before the
--              job runs (a job that kills its worker would come back uncounted, for ever),
--              a claim that outlives its connection (a dropped connection frees the rows
--              while the job may still run: another worker could start it), and no
--              transaction open while jobs run (held keeps one open per batch for as long
--              as its jobs take — an exec up to 120 s, a provision minutes —, holding
--              back every vacuum of the cluster and a connection). 2026-12-01, two
--              sittings of 5 rounds of 20k, claim 500: current 16.7 / 18.2, held 11.2 /
--              11.8, raw 7.2 / 7.4 µs/job;
--   raw        bench/queue's raw baseline table (bigint key, five columns, one index).

DROP SCHEMA IF EXISTS bench_designs CASCADE;
CREATE SCHEMA bench_designs;

-- LIKE copies the indexes, not the storage parameters: apalis.jobs' fillfactor by hand.
CREATE TABLE bench_designs.current_jobs (LIKE apalis.jobs INCLUDING ALL) WITH (fillfactor = 50);

CREATE TABLE bench_designs.before_jobs (LIKE apalis.jobs INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
ALTER TABLE bench_designs.before_jobs ADD PRIMARY KEY (id);
CREATE UNIQUE INDEX ON bench_designs.before_jobs (job_type, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX ON bench_designs.before_jobs (job_type, priority DESC, run_at, id) WHERE status IN ('Pending', 'Failed');
CREATE INDEX ON bench_designs.before_jobs (lock_by) WHERE status IN ('Queued', 'Running');
CREATE INDEX ON bench_designs.before_jobs (org_id, id DESC) WHERE org_id IS NOT NULL;
CREATE INDEX ON bench_designs.before_jobs (workspace_id, job_type, id DESC) WHERE workspace_id IS NOT NULL;

CREATE TABLE bench_designs.hot_jobs (LIKE apalis.jobs INCLUDING DEFAULTS INCLUDING CONSTRAINTS) WITH (fillfactor = 50);
ALTER TABLE bench_designs.hot_jobs ADD PRIMARY KEY (id);
CREATE UNIQUE INDEX ON bench_designs.hot_jobs (job_type, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX ON bench_designs.hot_jobs (org_id, id DESC) WHERE org_id IS NOT NULL;
CREATE INDEX ON bench_designs.hot_jobs (workspace_id, job_type, id DESC) WHERE workspace_id IS NOT NULL;
CREATE TABLE bench_designs.ready (job_type text NOT NULL, priority int NOT NULL, run_at timestamptz NOT NULL, id text NOT NULL);
CREATE INDEX ON bench_designs.ready (job_type, priority DESC, run_at, id);
CREATE TABLE bench_designs.live (job_type text NOT NULL, priority int NOT NULL, run_at timestamptz NOT NULL, id text PRIMARY KEY, lock_by text);
CREATE INDEX ON bench_designs.live (job_type, priority DESC, run_at, id) WHERE lock_by IS NULL;
CREATE INDEX ON bench_designs.live (lock_by) WHERE lock_by IS NOT NULL;

-- One row per claimed batch, until its ack: what a rescuer reads for a dead worker.
CREATE TABLE bench_designs.claims (batch bigserial PRIMARY KEY, worker text NOT NULL, ids text[] NOT NULL);
CREATE INDEX ON bench_designs.claims (worker);

CREATE TABLE bench_designs.held_jobs (LIKE apalis.jobs INCLUDING ALL) WITH (fillfactor = 50);

CREATE TABLE bench_designs.our_indexes (LIKE apalis.jobs INCLUDING ALL);
CREATE TABLE bench_designs.apalis_row (LIKE apalis.jobs INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
ALTER TABLE bench_designs.apalis_row ADD PRIMARY KEY (id);
CREATE INDEX ON bench_designs.apalis_row (job_type, run_at, id) WHERE status = 'Pending';

CREATE TABLE bench_designs.raw (
    id bigserial PRIMARY KEY,
    queue text NOT NULL,
    status text NOT NULL DEFAULT 'available',
    run_at timestamptz NOT NULL DEFAULT now(),
    payload bytea
);
CREATE INDEX ON bench_designs.raw (queue, run_at, id) WHERE status = 'available';

-- Each round starts from vacuumed tables (the bench runs VACUUM ANALYZE after filling):
-- no vacuum of one design's table in the middle of another's drain.
ALTER TABLE bench_designs.current_jobs SET (autovacuum_enabled = false);
ALTER TABLE bench_designs.hot_jobs SET (autovacuum_enabled = false);
ALTER TABLE bench_designs.ready SET (autovacuum_enabled = false);
ALTER TABLE bench_designs.live SET (autovacuum_enabled = false);
ALTER TABLE bench_designs.before_jobs SET (autovacuum_enabled = false);
ALTER TABLE bench_designs.claims SET (autovacuum_enabled = false);
ALTER TABLE bench_designs.our_indexes SET (autovacuum_enabled = false);
ALTER TABLE bench_designs.apalis_row SET (autovacuum_enabled = false);
ALTER TABLE bench_designs.raw SET (autovacuum_enabled = false);
ALTER TABLE bench_designs.held_jobs SET (autovacuum_enabled = false);

-- `n` queued jobs of queue `q` in each design's tables.
CREATE PROCEDURE bench_designs.fill(q text, n int) LANGUAGE sql AS $$
    INSERT INTO bench_designs.current_jobs (id, job_type, job)
        SELECT q || '-' || lpad(i::text, 20, '0'), q, '\x7b7d' FROM generate_series(1, n) i;
    INSERT INTO bench_designs.hot_jobs (id, job_type, job)
        SELECT q || '-' || lpad(i::text, 20, '0'), q, '\x7b7d' FROM generate_series(1, n) i;
    INSERT INTO bench_designs.hot_jobs (id, job_type, job)
        SELECT q || 'L-' || lpad(i::text, 20, '0'), q || 'L', '\x7b7d' FROM generate_series(1, n) i;
    INSERT INTO bench_designs.ready
        SELECT q, 0, now(), q || '-' || lpad(i::text, 20, '0') FROM generate_series(1, n) i;
    INSERT INTO bench_designs.hot_jobs (id, job_type, job)
        SELECT q || 'C-' || lpad(i::text, 20, '0'), q || 'C', '\x7b7d' FROM generate_series(1, n) i;
    INSERT INTO bench_designs.ready
        SELECT q || 'C', 0, now(), q || 'C-' || lpad(i::text, 20, '0') FROM generate_series(1, n) i;
    INSERT INTO bench_designs.live
        SELECT q || 'L', 0, now(), q || 'L-' || lpad(i::text, 20, '0') FROM generate_series(1, n) i;
    INSERT INTO bench_designs.before_jobs (id, job_type, job)
        SELECT q || '-' || lpad(i::text, 20, '0'), q, '\x7b7d' FROM generate_series(1, n) i;
    INSERT INTO bench_designs.our_indexes (id, job_type, job)
        SELECT q || '-' || lpad(i::text, 20, '0'), q, '\x7b7d' FROM generate_series(1, n) i;
    INSERT INTO bench_designs.apalis_row (id, job_type, job)
        SELECT q || '-' || lpad(i::text, 20, '0'), q, '\x7b7d' FROM generate_series(1, n) i;
    INSERT INTO bench_designs.raw (queue, payload) SELECT q, '\x7b7d' FROM generate_series(1, n);
    INSERT INTO bench_designs.held_jobs (id, job_type, job)
        SELECT q || '-' || lpad(i::text, 20, '0'), q, '\x7b7d' FROM generate_series(1, n) i;
$$;

-- One procedure per design with its statements written out, near-copies on purpose: static
-- SQL in PL/pgSQL is planned once per session and reused, as the runtime's prepared
-- statements are; one generic procedure would need EXECUTE format(…), planned on every
-- call, and that planning would be counted in every design's figure.
CREATE PROCEDURE bench_designs.drain_current(q text, b int, INOUT n int) LANGUAGE plpgsql AS $$
DECLARE ids text[]; fences int8[]; tids tid[]; bid int8;
BEGIN
  LOOP
    WITH c AS (
      UPDATE bench_designs.current_jobs AS j
      SET status = 'Running', lock_by = 'w', lock_at = now(), started_at = now(),
          attempts = j.attempts + 1, fence = j.fence + 1
      WHERE j.ctid = ANY(ARRAY(
          SELECT ctid FROM bench_designs.current_jobs
          WHERE job_type = q AND lock_at IS NULL AND status IN ('Pending', 'Failed') AND run_at <= now()
          ORDER BY priority DESC, run_at, id LIMIT b FOR UPDATE SKIP LOCKED))
        AND j.lock_at IS NULL AND j.status IN ('Pending', 'Failed')
      RETURNING j.id, j.job, j.attempts, j.max_attempts, j.org_id, j.workspace_id,
                (j.expires_at IS NOT NULL AND j.expires_at <= now()) AS expired, j.fence, j.ctid),
    rec AS (
      INSERT INTO bench_designs.claims (worker, ids) SELECT 'w', array_agg(id) FROM c HAVING count(*) > 0
      RETURNING batch)
    SELECT array_agg(c.id), array_agg(c.fence), array_agg(c.ctid), (SELECT batch FROM rec) INTO ids, fences, tids, bid FROM c;
    COMMIT;
    EXIT WHEN ids IS NULL;
    n := n + cardinality(ids);
    WITH ended AS (DELETE FROM bench_designs.claims WHERE batch = bid RETURNING batch),
    hit AS MATERIALIZED (
      SELECT cur.tid, r.id, r.fence FROM unnest(ids, fences, tids) AS r(id, fence, tid)
      CROSS JOIN LATERAL (
          (SELECT s.ctid AS tid FROM bench_designs.current_jobs s
           WHERE s.ctid = r.tid AND s.id = r.id AND s.fence = r.fence AND s.status = 'Running')
          UNION ALL
          (SELECT s.ctid FROM bench_designs.current_jobs s
           WHERE s.id = r.id AND s.fence = r.fence AND s.status = 'Running')
          LIMIT 1) AS cur
      WHERE (SELECT count(*) FROM ended) >= 0)
    UPDATE bench_designs.current_jobs AS j
    SET status = 'Done', outcome = 'succeeded', done_at = now(), last_result = '{"Ok": null}'
    WHERE j.ctid = ANY(ARRAY(SELECT tid FROM hit))
      AND ((j.id, j.fence) IN (SELECT id, fence FROM hit)) IS TRUE AND (j.status = 'Running') IS TRUE;
    COMMIT;
  END LOOP;
END $$;

-- f66f40c's statements.
CREATE PROCEDURE bench_designs.drain_before(q text, b int, INOUT n int) LANGUAGE plpgsql AS $$
DECLARE ids text[]; fences int8[];
BEGIN
  LOOP
    WITH c AS (
      UPDATE bench_designs.before_jobs AS j
      SET status = 'Running', lock_by = 'w', lock_at = now(), started_at = now(),
          attempts = j.attempts + 1, fence = j.fence + 1
      WHERE j.id = ANY(ARRAY(
          SELECT id FROM bench_designs.before_jobs
          WHERE job_type = q AND status IN ('Pending', 'Failed') AND run_at <= now()
          ORDER BY priority DESC, run_at, id LIMIT b FOR UPDATE SKIP LOCKED))
      RETURNING j.id, j.job, j.attempts, j.max_attempts, j.org_id, j.workspace_id,
                (j.expires_at IS NOT NULL AND j.expires_at <= now()) AS expired, j.fence)
    SELECT array_agg(id), array_agg(fence) INTO ids, fences FROM c;
    COMMIT;
    EXIT WHEN ids IS NULL;
    n := n + cardinality(ids);
    WITH hit AS MATERIALIZED (
      SELECT r.id, r.fence FROM unnest(ids, fences) AS r(id, fence)
      CROSS JOIN LATERAL (SELECT s.fence, s.status FROM bench_designs.before_jobs s WHERE s.id = r.id OFFSET 0) AS cur
      WHERE cur.fence = r.fence AND cur.status = 'Running')
    UPDATE bench_designs.before_jobs AS j
    SET status = 'Done', outcome = 'succeeded', done_at = now(), last_result = '{"Ok": null}'
    FROM hit
    WHERE j.id = hit.id AND (j.fence = hit.fence) IS TRUE AND (j.status = 'Running') IS TRUE;
    COMMIT;
  END LOOP;
END $$;

CREATE PROCEDURE bench_designs.drain_hot_ready(q text, b int, INOUT n int) LANGUAGE plpgsql AS $$
DECLARE ids text[]; fences int8[];
BEGIN
  LOOP
    WITH r AS (
      DELETE FROM bench_designs.ready WHERE ctid = ANY(ARRAY(
          SELECT ctid FROM bench_designs.ready WHERE job_type = q AND run_at <= now()
          ORDER BY priority DESC, run_at, id LIMIT b FOR UPDATE SKIP LOCKED))
      RETURNING id),
    c AS (
      UPDATE bench_designs.hot_jobs AS j
      SET status = 'Running', lock_by = 'w', lock_at = now(), started_at = now(),
          attempts = j.attempts + 1, fence = j.fence + 1
      WHERE j.id = ANY(ARRAY(SELECT id FROM r))
      RETURNING j.id, j.job, j.fence)
    SELECT array_agg(id), array_agg(fence) INTO ids, fences FROM c;
    COMMIT;
    EXIT WHEN ids IS NULL;
    n := n + cardinality(ids);
    WITH hit AS MATERIALIZED (
      SELECT r.id, r.fence FROM unnest(ids, fences) AS r(id, fence)
      CROSS JOIN LATERAL (SELECT s.fence, s.status FROM bench_designs.hot_jobs s WHERE s.id = r.id OFFSET 0) AS cur
      WHERE cur.fence = r.fence AND cur.status = 'Running')
    UPDATE bench_designs.hot_jobs AS j
    SET status = 'Done', outcome = 'succeeded', done_at = now(), last_result = '{"Ok": null}'
    FROM hit
    WHERE j.id = hit.id AND (j.fence = hit.fence) IS TRUE AND (j.status = 'Running') IS TRUE;
    COMMIT;
  END LOOP;
END $$;

-- hot_ready's statements, and the batch's claims row. Its jobs are queue q || 'C'.
CREATE PROCEDURE bench_designs.drain_ready_claims(q text, b int, INOUT n int) LANGUAGE plpgsql AS $$
DECLARE ids text[]; fences int8[]; bid int8;
BEGIN
  LOOP
    WITH r AS (
      DELETE FROM bench_designs.ready WHERE ctid = ANY(ARRAY(
          SELECT ctid FROM bench_designs.ready WHERE job_type = q || 'C' AND run_at <= now()
          ORDER BY priority DESC, run_at, id LIMIT b FOR UPDATE SKIP LOCKED))
      RETURNING id),
    c AS (
      UPDATE bench_designs.hot_jobs AS j
      SET status = 'Running', lock_by = 'w', lock_at = now(), started_at = now(),
          attempts = j.attempts + 1, fence = j.fence + 1
      WHERE j.id = ANY(ARRAY(SELECT id FROM r))
      RETURNING j.id, j.job, j.fence),
    rec AS (
      INSERT INTO bench_designs.claims (worker, ids) SELECT 'w', array_agg(id) FROM c HAVING count(*) > 0
      RETURNING batch)
    SELECT array_agg(c.id), array_agg(c.fence), (SELECT batch FROM rec) INTO ids, fences, bid FROM c;
    COMMIT;
    EXIT WHEN ids IS NULL;
    n := n + cardinality(ids);
    WITH hit AS MATERIALIZED (
      SELECT r.id, r.fence FROM unnest(ids, fences) AS r(id, fence)
      CROSS JOIN LATERAL (SELECT s.fence, s.status FROM bench_designs.hot_jobs s WHERE s.id = r.id OFFSET 0) AS cur
      WHERE cur.fence = r.fence AND cur.status = 'Running')
    UPDATE bench_designs.hot_jobs AS j
    SET status = 'Done', outcome = 'succeeded', done_at = now(), last_result = '{"Ok": null}'
    FROM hit
    WHERE j.id = hit.id AND (j.fence = hit.fence) IS TRUE AND (j.status = 'Running') IS TRUE;
    DELETE FROM bench_designs.claims WHERE batch = bid;
    COMMIT;
  END LOOP;
END $$;

-- Its jobs are queue q || 'L' (rows of their own in hot_jobs).
CREATE PROCEDURE bench_designs.drain_hot_live(q text, b int, INOUT n int) LANGUAGE plpgsql AS $$
DECLARE ids text[]; fences int8[];
BEGIN
  LOOP
    WITH r AS (
      UPDATE bench_designs.live SET lock_by = 'w' WHERE ctid = ANY(ARRAY(
          SELECT ctid FROM bench_designs.live WHERE job_type = q || 'L' AND lock_by IS NULL AND run_at <= now()
          ORDER BY priority DESC, run_at, id LIMIT b FOR UPDATE SKIP LOCKED))
      RETURNING id),
    c AS (
      UPDATE bench_designs.hot_jobs AS j
      SET status = 'Running', lock_by = 'w', lock_at = now(), started_at = now(),
          attempts = j.attempts + 1, fence = j.fence + 1
      WHERE j.id = ANY(ARRAY(SELECT id FROM r))
      RETURNING j.id, j.job, j.fence)
    SELECT array_agg(id), array_agg(fence) INTO ids, fences FROM c;
    COMMIT;
    EXIT WHEN ids IS NULL;
    n := n + cardinality(ids);
    WITH hit AS MATERIALIZED (
      SELECT r.id, r.fence FROM unnest(ids, fences) AS r(id, fence)
      CROSS JOIN LATERAL (SELECT s.fence, s.status FROM bench_designs.hot_jobs s WHERE s.id = r.id OFFSET 0) AS cur
      WHERE cur.fence = r.fence AND cur.status = 'Running'),
    u AS (
      UPDATE bench_designs.hot_jobs AS j
      SET status = 'Done', outcome = 'succeeded', done_at = now(), last_result = '{"Ok": null}'
      FROM hit
      WHERE j.id = hit.id AND (j.fence = hit.fence) IS TRUE AND (j.status = 'Running') IS TRUE
      RETURNING j.id)
    DELETE FROM bench_designs.live WHERE id = ANY(ARRAY(SELECT id FROM u));
    COMMIT;
  END LOOP;
END $$;

-- raw's statements on a copy of apalis.jobs.
CREATE PROCEDURE bench_designs.drain_our_indexes(q text, b int, INOUT n int) LANGUAGE plpgsql AS $$
DECLARE ids text[];
BEGIN
  LOOP
    WITH c AS (
      UPDATE bench_designs.our_indexes SET status = 'Running', lock_at = now()
      WHERE id = ANY(ARRAY(SELECT id FROM bench_designs.our_indexes
                           WHERE job_type = q AND lock_at IS NULL AND status IN ('Pending', 'Failed') AND run_at <= now()
                           ORDER BY priority DESC, run_at, id LIMIT b FOR UPDATE SKIP LOCKED))
      RETURNING id, job)
    SELECT array_agg(id) INTO ids FROM c;
    COMMIT;
    EXIT WHEN ids IS NULL;
    n := n + cardinality(ids);
    UPDATE bench_designs.our_indexes SET status = 'Done' WHERE id = ANY(ids);
    COMMIT;
  END LOOP;
END $$;

-- raw's statements and indexes on apalis' row.
CREATE PROCEDURE bench_designs.drain_apalis_row(q text, b int, INOUT n int) LANGUAGE plpgsql AS $$
DECLARE ids text[];
BEGIN
  LOOP
    WITH c AS (
      UPDATE bench_designs.apalis_row SET status = 'Running'
      WHERE id = ANY(ARRAY(SELECT id FROM bench_designs.apalis_row WHERE job_type = q AND status = 'Pending' AND run_at <= now()
                           ORDER BY run_at, id LIMIT b FOR UPDATE SKIP LOCKED))
      RETURNING id, job)
    SELECT array_agg(id) INTO ids FROM c;
    COMMIT;
    EXIT WHEN ids IS NULL;
    n := n + cardinality(ids);
    UPDATE bench_designs.apalis_row SET status = 'Done' WHERE id = ANY(ids);
    COMMIT;
  END LOOP;
END $$;

CREATE PROCEDURE bench_designs.drain_raw(q text, b int, INOUT n int) LANGUAGE plpgsql AS $$
DECLARE ids int8[];
BEGIN
  LOOP
    WITH c AS (
      UPDATE bench_designs.raw SET status = 'running'
      WHERE id = ANY(ARRAY(SELECT id FROM bench_designs.raw WHERE queue = q AND status = 'available' AND run_at <= now()
                           ORDER BY run_at, id LIMIT b FOR UPDATE SKIP LOCKED))
      RETURNING id, payload)
    SELECT array_agg(id) INTO ids FROM c;
    COMMIT;
    EXIT WHEN ids IS NULL;
    n := n + cardinality(ids);
    UPDATE bench_designs.raw SET status = 'done' WHERE id = ANY(ids);
    COMMIT;
  END LOOP;
END $$;

-- The claim locks its batch and returns it; the end writes each job once (as the claim
-- and the success ack together would) in the same transaction.
CREATE PROCEDURE bench_designs.drain_held(q text, b int, INOUT n int) LANGUAGE plpgsql AS $$
DECLARE ids text[]; tids tid[]; jobs bytea[];
BEGIN
  LOOP
    SELECT array_agg(s.ctid), array_agg(s.id), array_agg(s.job) INTO tids, ids, jobs FROM (
      SELECT ctid, id, job FROM bench_designs.held_jobs
      WHERE job_type = q AND lock_at IS NULL AND status IN ('Pending', 'Failed') AND run_at <= now()
      ORDER BY priority DESC, run_at, id LIMIT b FOR UPDATE SKIP LOCKED) s;
    EXIT WHEN ids IS NULL;
    n := n + cardinality(ids);
    UPDATE bench_designs.held_jobs AS j
    SET status = 'Done', outcome = 'succeeded', lock_by = 'w', lock_at = now(), started_at = now(),
        attempts = j.attempts + 1, fence = j.fence + 1, done_at = now(), last_result = '{"Ok": null}'
    WHERE j.ctid = ANY(tids);
    COMMIT;
  END LOOP;
END $$;
