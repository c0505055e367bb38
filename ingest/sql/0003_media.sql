-- Media uploads: declared, then uploaded straight to S3 with a presigned URL, then completed
-- once ingest verified the object's size and sha256 (MediaUploaded is appended then).
CREATE TABLE ingest.media_uploads (
    media_id     uuid        PRIMARY KEY,
    uploader_id  uuid        NOT NULL,
    content_type text        NOT NULL,
    size         bigint      NOT NULL,
    sha256       text        NOT NULL,
    filename     text,
    object_key   text        NOT NULL,
    created_at   timestamptz NOT NULL,
    completed_at timestamptz
);
CREATE INDEX media_uploads_by_uploader ON ingest.media_uploads (uploader_id);
