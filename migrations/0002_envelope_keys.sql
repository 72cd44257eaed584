-- Envelope encryption: data-encryption keys (DEKs), stored only wrapped by a key-encryption key
-- (KEK) version of the keyring. KEKs never touch the database. See docs/adr/0007.
-- A message's payload column holds the sealed envelope (format byte, DEK id, nonce,
-- AES-256-GCM ciphertext); the DEK id inside it points here.
CREATE TABLE sb_deks (
    id            uuid PRIMARY KEY,
    scope         text NOT NULL,            -- "topic:<name>" or "<attribute>:<value>"
    kek_version   integer NOT NULL CHECK (kek_version >= 1),
    wrapped       bytea,                    -- NULL once destroyed (crypto-shredding)
    created_at    timestamptz NOT NULL,
    destroyed_at  timestamptz,
    CHECK ((wrapped IS NULL) = (destroyed_at IS NOT NULL))
);
CREATE INDEX sb_deks_scope ON sb_deks (scope);
CREATE INDEX sb_deks_live_kek ON sb_deks (kek_version) WHERE wrapped IS NOT NULL;
