-- Per-subject data keys for personal-data encryption (crypto-shredding).
-- A row with wrapped = NULL is an erased subject: the key is gone and can never be recreated.
CREATE TABLE data_keys (
    subject       uuid PRIMARY KEY,
    master_key_id text,
    wrapped       bytea,
    created_at    timestamptz NOT NULL DEFAULT now(),
    erased_at     timestamptz,
    CONSTRAINT data_keys_erased_has_no_key CHECK ((erased_at IS NULL) = (wrapped IS NOT NULL))
);

-- The log's epoch: changes when the log is restored into a new cluster, so that cursors
-- issued against the old log are recognised as stale.
CREATE TABLE log_meta (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    epoch     integer NOT NULL CHECK (epoch > 0)
);
INSERT INTO log_meta (singleton, epoch) VALUES (true, 1);
