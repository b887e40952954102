-- The tasks the HTTP gateway accepted (the broker confirmed their frame), so that GET /v1/tasks/{id} tells
-- "accepted, no row yet" from "unknown" on every replica and after a restart. One row per task id; a frame
-- sent again is the same task and keeps its first acceptance. Rows are small and pruned by age
-- (detfleet_gateway_tasks_accepted serves that).
CREATE TABLE detfleet_gateway_tasks (
    task_id      uuid PRIMARY KEY,
    site         text NOT NULL,
    camera_id    text NOT NULL,
    lane         text NOT NULL CHECK (lane IN ('realtime', 'bulk')),
    accepted_at  timestamptz NOT NULL DEFAULT now(),
    gateway      text
);

CREATE INDEX detfleet_gateway_tasks_accepted ON detfleet_gateway_tasks (accepted_at);

-- 0004's default privileges grant these already where the same role migrates; said here too, so that an
-- operator who ran 0004 as another role gets them all the same. The gateway connects as detfleet_writer.
GRANT SELECT, INSERT, UPDATE ON detfleet_gateway_tasks TO detfleet_writer;
GRANT SELECT ON detfleet_gateway_tasks TO detfleet_reader;
