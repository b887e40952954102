-- What `detfleet dlq` did to each DLQ entry. A replay records each copy it sent, after the broker confirmed
-- it and before it removes the entry, so an interrupted replay resumes without sending a task twice; a purge
-- records what it deleted, so `dlq list` can tell which payloads are no longer parked.
CREATE TABLE detfleet_dlq_ledger (
    task_id       uuid NOT NULL,
    -- replayed: the x-detfleet-replays value the copy sent carries; purged: the entry's own value.
    replay        integer NOT NULL,
    action        text NOT NULL CHECK (action IN ('replayed', 'purged')),
    at            timestamptz NOT NULL DEFAULT now(),
    routing_key   text,
    payload_bytes integer,
    PRIMARY KEY (task_id, replay, action)
);

-- Filled by the consumer when it writes a failed row (NULL until then, and on rows written before):
-- `dlq list` shows them, and derives the routing key from lane, site and camera where they are NULL.
ALTER TABLE detfleet_results ADD COLUMN original_routing_key text;
ALTER TABLE detfleet_results ADD COLUMN payload_bytes integer;
