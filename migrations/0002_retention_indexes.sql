-- autopilot schema v2: indexes for retention pruning and the admin API's lookups.

CREATE INDEX deliveries_received ON deliveries (received_at);
CREATE INDEX rule_runs_created ON rule_runs (created_at);
CREATE INDEX rule_runs_delivery_id ON rule_runs (delivery_id) WHERE delivery_id IS NOT NULL;
CREATE INDEX jobs_run ON jobs (run_id);
CREATE INDEX jobs_agent ON jobs (agent_id, id);
CREATE INDEX jobs_finished ON jobs (updated_at) WHERE status NOT IN ('pending', 'leased');
