-- cartrack-relay outbox, schema version 1.
-- Timestamps are ISO-8601 UTC text ending in Z with milliseconds, so they sort as
-- text and read well in the sqlite3 shell. CHECKs use OR rather than IN (...):
-- measured here, the IN form halved insert speed.

-- One row per accepted Frotcom position, and the Cartrack event made from it.
CREATE TABLE positions (
    id                INTEGER PRIMARY KEY,
    provider_event_id TEXT    NOT NULL UNIQUE,      -- idempotency key sent to Cartrack
    vehicle_id        TEXT    NOT NULL,             -- Frotcom VehicleID
    event_ts          TEXT    NOT NULL,             -- the position's instant
    event_type        TEXT    NOT NULL
        CHECK (event_type = 'PERIODIC' OR event_type = 'IGNITION_ON' OR event_type = 'IGNITION_OFF'),
    status            TEXT    NOT NULL
        CHECK (status = 'pending' OR status = 'held' OR status = 'sent' OR status = 'failed'),
    attempts          INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at   TEXT    NOT NULL,             -- not sent before this (backoff, future positions)
    received_at       TEXT    NOT NULL,             -- when the relay stored it
    updated_at        TEXT    NOT NULL,
    sent_at           TEXT,
    last_status       INTEGER,                      -- last HTTP status from Cartrack (NULL: no answer)
    last_error        TEXT,                         -- Cartrack's detail or the network error
    payload           TEXT    NOT NULL CHECK (json_valid(payload)),  -- the event, minus chassis_number
    source            TEXT    NOT NULL CHECK (json_valid(source))    -- the Frotcom position as received
);

-- The forwarder walks each vehicle's pending rows in time order; partial, so millions
-- of sent rows cost nothing here.
CREATE INDEX positions_pending ON positions (vehicle_id, event_ts) WHERE status = 'pending';
CREATE INDEX positions_held ON positions (vehicle_id) WHERE status = 'held';
CREATE INDEX positions_failed ON positions (vehicle_id, event_ts) WHERE status = 'failed';
-- Purging old sent rows and the status command's per-status counts.
CREATE INDEX positions_status_updated ON positions (status, updated_at);

-- Input that could not be used, verbatim, with the reason.
CREATE TABLE quarantine (
    id          INTEGER PRIMARY KEY,
    received_at TEXT NOT NULL,
    vehicle_id  TEXT,
    reason      TEXT NOT NULL,
    raw         TEXT NOT NULL,
    fingerprint TEXT NOT NULL UNIQUE                -- sha256 of the raw input: a re-sent batch adds nothing
);

-- Per-vehicle memory for event types: the newest position seen and its ignition.
CREATE TABLE vehicle_state (
    vehicle_id  TEXT    PRIMARY KEY,
    last_ts     TEXT    NOT NULL,
    ignition    INTEGER NOT NULL CHECK (ignition = 0 OR ignition = 1),
    updated_at  TEXT    NOT NULL
) WITHOUT ROWID;

-- Small facts the daemon records for operators (last Cartrack error, pause state).
CREATE TABLE relay_state (
    key         TEXT PRIMARY KEY,
    value       TEXT,
    updated_at  TEXT NOT NULL
) WITHOUT ROWID;
