-- Refresh-token reuse interval: a token spent moments ago may be presented again (a retry after
-- a lost answer, two tabs refreshing at once) and is then answered with its successor instead
-- of revoking the session. Each spent token records which token replaced it (its digest) and,
-- for the interval's sake, that token sealed (AES-256-GCM) under a key derived from the spent
-- token itself, which the server never stores: a database leak yields no usable token.
-- Spending the successor clears the sealed copy. Rows spent before this migration have
-- neither, and their reuse revokes the session as before.
ALTER TABLE ingest.refresh_tokens
    ADD COLUMN successor_hash   bytea,
    ADD COLUMN successor_sealed bytea;
