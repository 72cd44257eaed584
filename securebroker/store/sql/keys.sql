-- Named queries for envelope-encryption keys (securebroker/crypto/keystore.py). Bind parameters
-- only. Changes that running brokers must see at once are announced with NOTIFY sb_keys in the
-- same transaction (delivered on commit).

-- name: dek_insert
INSERT INTO sb_deks (id, scope, kek_version, wrapped, created_at) VALUES ($1, $2, $3, $4, $5);

-- name: dek_get_many
SELECT id, scope, kek_version, wrapped FROM sb_deks WHERE id = ANY($1::uuid[]);

-- name: dek_counts
SELECT kek_version,
       count(*) FILTER (WHERE wrapped IS NOT NULL) AS live,
       count(*) FILTER (WHERE wrapped IS NULL) AS destroyed
FROM sb_deks GROUP BY kek_version ORDER BY kek_version;

-- name: dek_live_below
SELECT count(*) FROM sb_deks WHERE wrapped IS NOT NULL AND kek_version < $1;

-- name: dek_rewrap_batch
SELECT id, scope, kek_version, wrapped FROM sb_deks
WHERE wrapped IS NOT NULL AND kek_version < $1
ORDER BY id LIMIT $2;

-- name: dek_rewrap_one
UPDATE sb_deks SET kek_version = $2, wrapped = $3
WHERE id = $1 AND kek_version = $4 AND wrapped IS NOT NULL;

-- name: dek_destroy_scope
UPDATE sb_deks SET wrapped = NULL, destroyed_at = $2
WHERE scope = $1 AND wrapped IS NOT NULL
RETURNING id;

-- name: dek_scope_counts
SELECT scope,
       count(*) FILTER (WHERE wrapped IS NOT NULL) AS live,
       count(*) FILTER (WHERE wrapped IS NULL) AS destroyed
FROM sb_deks WHERE scope = $1 GROUP BY scope;

-- name: keys_notify
SELECT pg_notify('sb_keys', $1);
