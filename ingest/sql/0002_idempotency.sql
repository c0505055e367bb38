-- client_msg_id idempotency: the same sender + client_msg_id always answers the same message.
-- The row is written before the event; `position` once Kafka acknowledged it. A row without a
-- position (a crash or a failed write in between) makes a retry re-send the SAME message_id,
-- which every consumer deduplicates.
CREATE SCHEMA IF NOT EXISTS ingest;

CREATE TABLE ingest.sent_messages (
    sender_id       uuid        NOT NULL,
    client_msg_id   text        NOT NULL,
    conversation_id uuid        NOT NULL,
    message_id      uuid        NOT NULL,
    position        text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sender_id, client_msg_id)
);
