-- autopilot schema v3: the queue's claim checks an agent's jobs in flight by index.
CREATE INDEX IF NOT EXISTS jobs_leased ON jobs (agent_id) WHERE status = 'leased';
