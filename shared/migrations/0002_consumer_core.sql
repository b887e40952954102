-- A failed row records when its DLQ copy was confirmed: a redelivery of the task then acks without
-- publishing a second copy (docs/message-flow.md). NULL: no copy confirmed yet (or never needed).
ALTER TABLE detfleet_results ADD COLUMN dlq_confirmed_at timestamptz;

-- The producer's app_id, kept on every row, also on rows of messages that broke the contract elsewhere.
ALTER TABLE detfleet_results ADD COLUMN producer text;

-- Crash-loop containment: a redelivered task is marked here before it is decoded, and the mark is removed
-- once the task is settled. A mark that survives means a consumer died with the task in hand; after
-- DETFLEET_MAX_CRASHES such starts the task is failed without running it again.
CREATE TABLE detfleet_attempts (
    task_id          uuid PRIMARY KEY,
    starts           integer NOT NULL,
    last_started_at  timestamptz NOT NULL DEFAULT now(),
    last_consumer_id text NOT NULL
);
