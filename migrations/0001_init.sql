-- autopilot schema v1. Times are milliseconds since the Unix epoch, UTC.

-- Webhook deliveries, committed before the sender gets its 2xx.
CREATE TABLE deliveries (
    id           INTEGER PRIMARY KEY,
    source       TEXT    NOT NULL,
    dedupe_key   TEXT    NOT NULL,
    received_at  INTEGER NOT NULL,
    content_type TEXT    NOT NULL,
    -- The parsed body with the static auth parameter removed.
    payload      TEXT    NOT NULL,
    CONSTRAINT deliveries_dedupe UNIQUE (source, dedupe_key)
);

-- The freshest known state of each agent (the `data` of the last 200, or a GET).
CREATE TABLE agent_states (
    agent_id    INTEGER PRIMARY KEY,
    state       TEXT    NOT NULL,
    observed_at INTEGER NOT NULL,
    origin      TEXT    NOT NULL CHECK (origin IN ('patch', 'get'))
);

-- The audit trail: every time a rule was triggered and what it decided.
CREATE TABLE rule_runs (
    id            INTEGER PRIMARY KEY,
    rule          TEXT    NOT NULL,
    trigger       TEXT    NOT NULL CHECK (trigger IN ('schedule', 'webhook', 'shift')),
    delivery_id   INTEGER REFERENCES deliveries (id),
    scheduled_for INTEGER,
    happened_at   INTEGER NOT NULL,
    decision      TEXT    NOT NULL CHECK (decision IN ('enqueued', 'skipped', 'partial')),
    detail        TEXT,
    created_at    INTEGER NOT NULL
);
-- A cause fires a rule once: one run per (rule, fire instant) and per (rule, delivery).
CREATE UNIQUE INDEX rule_runs_fire ON rule_runs (rule, scheduled_for) WHERE scheduled_for IS NOT NULL;
CREATE UNIQUE INDEX rule_runs_delivery ON rule_runs (rule, delivery_id) WHERE delivery_id IS NOT NULL;

-- The outbox: one PATCH to send, written in the same transaction as its run.
CREATE TABLE jobs (
    id              INTEGER PRIMARY KEY,
    run_id          INTEGER NOT NULL REFERENCES rule_runs (id),
    agent_id        INTEGER NOT NULL,
    fields          TEXT    NOT NULL,
    guard           TEXT,
    cause_at        INTEGER NOT NULL,
    valid_until     INTEGER,
    status          TEXT    NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'leased', 'done', 'dead', 'expired', 'skipped', 'discarded')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    lease_owner     TEXT,
    lease_until     INTEGER,
    last_status     INTEGER,
    last_error      TEXT,
    request_id      TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
CREATE INDEX jobs_due ON jobs (status, next_attempt_at);
CREATE INDEX jobs_line ON jobs (agent_id, cause_at, id) WHERE status IN ('pending', 'leased');

-- Every attempt to send a job, kept for the audit.
CREATE TABLE job_attempts (
    id          INTEGER PRIMARY KEY,
    job_id      INTEGER NOT NULL REFERENCES jobs (id),
    attempt     INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER NOT NULL,
    http_status INTEGER,
    request_id  TEXT,
    outcome     TEXT    NOT NULL,
    error       TEXT
);
CREATE INDEX job_attempts_job ON job_attempts (job_id);

-- The last scheduled instant each rule fired at (or, for a rule that never fired, the
-- instant the scheduler first saw it): the scheduler resumes from it.
CREATE TABLE rule_fires (
    rule               TEXT PRIMARY KEY,
    last_scheduled_for INTEGER NOT NULL
);

-- The platform's OAuth token pair (login config only). Refresh tokens are single-use:
-- the new pair replaces the old in one statement before it is used.
CREATE TABLE oauth_tokens (
    id                 INTEGER PRIMARY KEY CHECK (id = 1),
    access_token       TEXT    NOT NULL,
    refresh_token      TEXT    NOT NULL,
    expires_at         INTEGER NOT NULL,
    refresh_expires_at INTEGER NOT NULL,
    obtained_at        INTEGER NOT NULL
);

-- The newest event time applied per (source, agent), for sources with `event_time`: an
-- older delivery arriving later is recorded as stale and changes nothing.
CREATE TABLE agent_event_times (
    source   TEXT    NOT NULL,
    agent_id INTEGER NOT NULL,
    event_at INTEGER NOT NULL,
    PRIMARY KEY (source, agent_id)
);
