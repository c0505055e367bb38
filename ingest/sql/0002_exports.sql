-- Personal-data exports (GDPR art. 15/20): one row per request; the archive itself is a JSON
-- object in the exports bucket, offered through a short-lived presigned URL.
CREATE TABLE ingest.exports (
    export_id   uuid        PRIMARY KEY,
    user_id     uuid        NOT NULL,
    state       text        NOT NULL CHECK (state IN ('running', 'done', 'failed')),
    object_key  text,
    error       text,
    created_at  timestamptz NOT NULL,
    finished_at timestamptz
);
CREATE INDEX exports_by_user ON ingest.exports (user_id, created_at);

-- Every session of a user, not only the live ones (exports list them all).
CREATE INDEX sessions_by_user ON ingest.sessions (user_id);
