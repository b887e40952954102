-- One row per task: ok, failed (with its DLQ entry) or shed.
-- Rows of messages too malformed to name their camera keep what could be read; task_id is always known.
CREATE TABLE detfleet_results (
    task_id          uuid PRIMARY KEY,
    camera_id        text,
    site             text,
    lane             text CHECK (lane IN ('realtime', 'bulk')),
    captured_at      timestamptz,
    received_at      timestamptz NOT NULL,
    completed_at     timestamptz NOT NULL,
    status           text NOT NULL CHECK (status IN ('ok', 'failed', 'shed')),
    reason           text,
    attempt          integer NOT NULL DEFAULT 1,
    redeliveries     integer NOT NULL DEFAULT 0,
    consumer_id      text NOT NULL,
    model_name       text,
    model_sha256     text,
    provider         text,
    queue_wait_ms    double precision,
    decode_ms        double precision,
    inference_ms     double precision,
    sink_ms          double precision,
    end_to_end_ms    double precision,
    image_width      integer,
    image_height     integer,
    detections       jsonb,
    trace_id         text
);

CREATE INDEX detfleet_results_camera_captured ON detfleet_results (camera_id, captured_at);
CREATE INDEX detfleet_results_status_completed ON detfleet_results (status, completed_at);
