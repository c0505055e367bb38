-- Media are served from a copy, never from where the upload URL writes. `complete` copies the
-- uploaded object to a key of its own (verified_key, out of the presigned PUT's reach),
-- verifies that copy against the declared size and sha256, and records it together with the
-- position of its MediaUploaded event (completed_position): a retried complete answers that
-- position again instead of appending a second event. Uploads completed before this migration
-- were verified at object_key itself; their upload URLs expire 15 minutes after they were
-- declared, so that key is their verified copy from then on. They have no recorded position:
-- completing one again answers 409.
ALTER TABLE ingest.media_uploads
    ADD COLUMN verified_key       text,
    ADD COLUMN completed_position text;
UPDATE ingest.media_uploads SET verified_key = object_key WHERE completed_at IS NOT NULL;
