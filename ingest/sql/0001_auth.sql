-- Credentials, sessions, refresh tokens and API keys of the ingest tier.
-- Written synchronously by ingest (never projected from the log), so login works the instant
-- register answers. Secrets are stored only as hashes: bcrypt for passwords, SHA-256 for the
-- high-entropy refresh tokens and API key secrets.
CREATE SCHEMA IF NOT EXISTS ingest;

-- One row per account. `pending` is a uniqueness reservation made before UserRegistered is
-- written; `active` once the log acknowledged it; `erased` keeps only the id (the name and
-- email are released and the password hash dropped).
CREATE TABLE ingest.accounts (
    user_id       uuid        PRIMARY KEY,
    username_lc   text,
    email_lc      text,
    password_hash text,
    role          text        NOT NULL DEFAULT 'user'
                              CHECK (role IN ('user', 'admin', 'operator')),
    state         text        NOT NULL DEFAULT 'pending'
                              CHECK (state IN ('pending', 'active', 'erased')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- Case-insensitive uniqueness: the columns hold the case-folded forms. NULLs (erased
    -- accounts) never collide, so an erased account's name and email can be taken again.
    CONSTRAINT accounts_username_taken UNIQUE (username_lc),
    CONSTRAINT accounts_email_taken UNIQUE (email_lc),
    CONSTRAINT accounts_live_has_credentials CHECK (
        state = 'erased'
        OR (username_lc IS NOT NULL AND email_lc IS NOT NULL AND password_hash IS NOT NULL)
    ),
    CONSTRAINT accounts_erased_holds_nothing CHECK (
        state <> 'erased' OR (username_lc IS NULL AND email_lc IS NULL AND password_hash IS NULL)
    )
);

CREATE TABLE ingest.sessions (
    session_id uuid        PRIMARY KEY,
    user_id    uuid        NOT NULL,
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz,
    reason     text,
    CONSTRAINT sessions_revocation_has_reason CHECK ((revoked_at IS NULL) = (reason IS NULL))
);
CREATE INDEX sessions_live_by_user ON ingest.sessions (user_id) WHERE revoked_at IS NULL;

-- Every refresh token a session was ever given. Spent rows stay until the session goes: a
-- spent token presented again is how reuse (theft) is recognised.
CREATE TABLE ingest.refresh_tokens (
    token_hash bytea       PRIMARY KEY,
    session_id uuid        NOT NULL REFERENCES ingest.sessions ON DELETE CASCADE,
    issued_at  timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    spent_at   timestamptz
);
CREATE INDEX refresh_tokens_by_session ON ingest.refresh_tokens (session_id);

CREATE TABLE ingest.api_keys (
    key_id       text        PRIMARY KEY,
    owner_id     uuid        NOT NULL,
    name         text        NOT NULL,
    scopes       text[]      NOT NULL,
    secret_hash  bytea       NOT NULL,
    created_at   timestamptz NOT NULL,
    revoked_at   timestamptz,
    last_used_at timestamptz
);
CREATE INDEX api_keys_by_owner ON ingest.api_keys (owner_id);
