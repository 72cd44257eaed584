-- Tamper-evident audit trail (DESIGN §4, docs/adr/0008-audit-trail.md).
--
-- Records are written in the same transaction as the change they record. They form hash chains:
-- each chain is written by one writer at a time (one transaction of one broker process), so a
-- record's predecessor hash is known without a table-wide lock. Checkpoints sign every chain's
-- head with an Ed25519 key that lives outside the database.

CREATE TABLE sb_audit_chains (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance    text NOT NULL,              -- the broker process (or CLI run) that writes it
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Partitioned by month of ``at`` so a retention period is exported and dropped whole
-- (docs/operations.md, "Audit retention"). Only two indexes: the chain order (export, verify,
-- head recovery) and the message id (``audit trail``); other searches scan the months asked for.
CREATE TABLE sb_audit (
    chain         bigint NOT NULL,
    seq           bigint NOT NULL,
    at            timestamptz NOT NULL,
    event         text NOT NULL,
    outcome       text NOT NULL,
    actor_cert    text NOT NULL,
    actor_sub     text,
    origin_addr   text NOT NULL,
    origin_proto  text NOT NULL,
    topic         text,
    subscription  text,
    message_id    uuid,
    key_id        text,
    trace_id      text,
    detail        text,                     -- canonical JSON (sorted keys); cast to jsonb to query
    prev_hash     bytea NOT NULL,
    hash          bytea NOT NULL
) PARTITION BY RANGE (at);
CREATE INDEX sb_audit_chain_seq ON sb_audit (chain, seq);
CREATE INDEX sb_audit_message ON sb_audit (message_id) WHERE message_id IS NOT NULL;
-- Catches anything outside the monthly partitions the broker creates ahead of time.
CREATE TABLE sb_audit_default PARTITION OF sb_audit DEFAULT;

-- Append-only: ordinary sessions cannot change or remove records. (A superuser can bypass
-- triggers; the hash chain and the signed checkpoints are what detect that.) Retention drops
-- whole monthly partitions, which is DDL and not affected.
CREATE FUNCTION sb_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER sb_audit_no_change BEFORE UPDATE OR DELETE ON sb_audit
    FOR EACH ROW EXECUTE FUNCTION sb_audit_append_only();
CREATE TRIGGER sb_audit_no_truncate BEFORE TRUNCATE ON sb_audit
    FOR EACH STATEMENT EXECUTE FUNCTION sb_audit_append_only();

-- Create the partition holding month ``month_start`` (the first day of a month) if missing.
-- Names are built with format('%I') from a date, never from client input. If the default
-- partition already holds rows of that month (the broker was down while it began), the month
-- stays there (a warning, NULL): it is still exported and verified, only not prunable whole.
CREATE FUNCTION sb_audit_ensure_partition(month_start date) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    first date := date_trunc('month', month_start)::date;
    part text := format('sb_audit_p%s', to_char(first, 'YYYYMM'));
BEGIN
    IF to_regclass(part) IS NULL THEN
        BEGIN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF sb_audit FOR VALUES FROM (%L) TO (%L)',
                part, first::timestamp AT TIME ZONE 'UTC',
                (first + interval '1 month')::timestamp AT TIME ZONE 'UTC');
        EXCEPTION WHEN check_violation THEN
            RAISE WARNING 'audit month % stays in the default partition', to_char(first, 'YYYY-MM');
            RETURN NULL;
        END;
    END IF;
    RETURN part;
END
$$;

-- Retention (``securebroker audit prune``) on the partition of ``month_start``: step 'lock'
-- blocks its writers until the transaction ends (prune checks the month against a verified
-- export first), step 'drop' drops it. False if the partition does not exist.
CREATE FUNCTION sb_audit_prune_partition(month_start date, step text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    part text := format('sb_audit_p%s', to_char(date_trunc('month', month_start), 'YYYYMM'));
BEGIN
    IF to_regclass(part) IS NULL THEN
        RETURN false;
    END IF;
    IF step = 'lock' THEN
        EXECUTE format('LOCK TABLE %I IN SHARE MODE', part);
    ELSIF step = 'drop' THEN
        EXECUTE format('DROP TABLE %I', part);
    ELSE
        RAISE EXCEPTION 'unknown partition step %', step;
    END IF;
    RETURN true;
END
$$;

-- Months dropped by retention, with the export that holds them.
CREATE TABLE sb_audit_pruned (
    month          date PRIMARY KEY,
    records        bigint NOT NULL,
    bundle_sha256  text NOT NULL,
    pruned_at      timestamptz NOT NULL DEFAULT now()
);

-- Signed checkpoints: one row per signature; ``body`` holds the exact signed bytes.
CREATE TABLE sb_audit_checkpoints (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance   text NOT NULL,
    n          bigint NOT NULL,
    at         timestamptz NOT NULL,
    body       bytea NOT NULL,
    signature  bytea NOT NULL,
    key_id     text NOT NULL,
    UNIQUE (instance, n)
);
CREATE INDEX sb_audit_checkpoints_at ON sb_audit_checkpoints (at);
CREATE TRIGGER sb_audit_checkpoints_no_change BEFORE UPDATE OR DELETE ON sb_audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION sb_audit_append_only();
CREATE TRIGGER sb_audit_checkpoints_no_truncate BEFORE TRUNCATE ON sb_audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION sb_audit_append_only();

-- Public halves of the checkpoint signing keys, so an export is self-contained. (An auditor
-- should still pin the key id out of band: ``audit verify --public-key``.)
CREATE TABLE sb_audit_keys (
    key_id      text PRIMARY KEY,
    public_key  bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
