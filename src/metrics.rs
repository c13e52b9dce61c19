//! The daemon's metrics, rendered in the Prometheus text format at `GET /metrics`.
//!
//! One registry per running app (no process-wide state, so tests that run several apps
//! in one process see only their own). Counters and histograms live here; the gauges
//! that describe the database (jobs by state, oldest due job, dead letters) are read
//! from it at scrape time, so they cannot drift from the truth.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// Every metric: name, type and help line. Rendering only emits metrics listed here.
pub const CATALOG: &[(&str, &str, &str)] = &[
    ("autopilot_deliveries_received_total", "counter", "Webhook deliveries authenticated and committed, per source."),
    ("autopilot_deliveries_duplicate_total", "counter", "Webhook deliveries recognised as duplicates (answered 200, no effect), per source."),
    ("autopilot_deliveries_rejected_total", "counter", "Webhook deliveries refused, per source and reason (unauthorized, unknown_source, too_large, unsupported_type, bad_body, rate_limited, storage_unavailable)."),
    ("autopilot_ingest_commits_total", "counter", "Transactions of the group committer that held deliveries and committed (each one fsync)."),
    ("autopilot_ingest_committed_deliveries_total", "counter", "Deliveries those transactions stored (duplicates and failures not counted)."),
    ("autopilot_ingest_busy_seconds_total", "counter", "Time the group committer spent writing batches of deliveries, claims and outcomes (waiting for the writer included); its rate near 1 means the daemon is bound by the writer."),
    ("autopilot_rule_fires_total", "counter", "Rule runs recorded, per rule and trigger (schedule, webhook, shift, manual)."),
    ("autopilot_rule_skips_total", "counter", "Agents or fires a rule did not act on when it was evaluated, per rule and reason (missed, condition, in_place)."),
    ("autopilot_rule_catchups_total", "counter", "Scheduled fires run late, inside the rule's catch-up window, per rule."),
    ("autopilot_jobs", "gauge", "Jobs in the database, per state."),
    ("autopilot_oldest_due_job_age_seconds", "gauge", "How long the oldest pending job has been due (0 when none is)."),
    ("autopilot_dead_letters", "gauge", "Jobs that gave up (state dead) and wait for an operator."),
    ("autopilot_patch_attempts_total", "counter", "PATCH attempts, per outcome class (2xx, 4xx, 5xx, timeout, network)."),
    ("autopilot_patch_duration_seconds", "histogram", "Time from sending a PATCH to its answer."),
    ("autopilot_token_refreshes_total", "counter", "Platform token renewals, per kind (refresh, login, file) and result (ok, failed)."),
    ("autopilot_config_reloads_total", "counter", "Configuration reloads, per result (ok, failed)."),
    ("autopilot_config_last_reload_success", "gauge", "1 if the last reload attempt succeeded (or none was tried), 0 if it failed."),
    ("autopilot_scheduler_last_tick_timestamp_seconds", "gauge", "When the scheduler last woke up, Unix seconds."),
];

/// Histogram bucket upper bounds, in seconds.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub type Labels = Vec<(&'static str, String)>;

/// A value read at scrape time: metric name, labels, value.
pub type Gauge = (&'static str, Labels, f64);

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Debug, Default)]
struct Registry {
    counters: BTreeMap<(&'static str, Labels), f64>,
    histograms: BTreeMap<(&'static str, Labels), Histogram>,
}

#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Registry>,
}

fn labels(l: &[(&'static str, &str)]) -> Labels {
    l.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::default()
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds one to a counter.
    pub fn inc(&self, name: &'static str, l: &[(&'static str, &str)]) {
        self.add(name, l, 1.0);
    }

    pub fn add(&self, name: &'static str, l: &[(&'static str, &str)], by: f64) {
        *self
            .registry()
            .counters
            .entry((name, labels(l)))
            .or_default() += by;
    }

    /// Sets a gauge (kept with the counters: a gauge is a value that may go down).
    pub fn set(&self, name: &'static str, l: &[(&'static str, &str)], to: f64) {
        self.registry().counters.insert((name, labels(l)), to);
    }

    pub fn observe(&self, name: &'static str, l: &[(&'static str, &str)], seconds: f64) {
        let mut reg = self.registry();
        let h = reg.histograms.entry((name, labels(l))).or_default();
        for (i, upper) in BUCKETS.iter().enumerate() {
            if seconds <= *upper {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += seconds;
    }

    /// A counter's or gauge's current value (0 when never touched). For tests and readyz.
    pub fn value(&self, name: &'static str, l: &[(&'static str, &str)]) -> f64 {
        self.registry()
            .counters
            .get(&(name, labels(l)))
            .copied()
            .unwrap_or(0.0)
    }

    /// The Prometheus text exposition of everything recorded plus `gauges` (read from the
    /// database by the caller).
    pub fn render(&self, gauges: &[Gauge]) -> String {
        let reg = self.registry();
        let mut out = String::new();
        for (name, kind, help) in CATALOG {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let series = reg
                .counters
                .iter()
                .filter(|((n, _), _)| n == name)
                .map(|((_, l), v)| (l, *v))
                .chain(
                    gauges
                        .iter()
                        .filter(|(n, _, _)| n == name)
                        .map(|(_, l, v)| (l, *v)),
                );
            for (l, v) in series {
                let _ = writeln!(out, "{name}{} {}", render_labels(l, None), number(v));
            }
            for ((_, l), h) in reg.histograms.iter().filter(|((n, _), _)| n == name) {
                for (i, upper) in BUCKETS.iter().enumerate() {
                    let le = number(*upper);
                    let _ = writeln!(
                        out,
                        "{name}_bucket{} {}",
                        render_labels(l, Some(&le)),
                        h.counts[i]
                    );
                }
                let _ = writeln!(
                    out,
                    "{name}_bucket{} {}",
                    render_labels(l, Some("+Inf")),
                    h.count
                );
                let _ = writeln!(
                    out,
                    "{name}_sum{} {}",
                    render_labels(l, None),
                    number(h.sum)
                );
                let _ = writeln!(out, "{name}_count{} {}", render_labels(l, None), h.count);
            }
        }
        out
    }
}

fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn render_labels(l: &Labels, le: Option<&str>) -> String {
    let mut parts: Vec<String> = l
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

/// Label values escape backslash, double quote and line feed.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The outcome class of a PATCH attempt, for `autopilot_patch_attempts_total`.
pub fn status_class(status: Option<u16>, timed_out: bool) -> &'static str {
    match status {
        Some(200..=299) => "2xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        Some(_) => "other",
        None if timed_out => "timeout",
        None => "network",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_histograms_in_text_format() {
        let m = Metrics::new();
        m.inc("autopilot_deliveries_received_total", &[("source", "a\"b")]);
        m.inc("autopilot_deliveries_received_total", &[("source", "a\"b")]);
        m.observe("autopilot_patch_duration_seconds", &[], 0.02);
        m.observe("autopilot_patch_duration_seconds", &[], 3.0);
        let text = m.render(&[("autopilot_jobs", vec![("state", "dead".into())], 2.0)]);
        assert!(
            text.contains("autopilot_deliveries_received_total{source=\"a\\\"b\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("autopilot_jobs{state=\"dead\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("autopilot_patch_duration_seconds_bucket{le=\"0.01\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("autopilot_patch_duration_seconds_bucket{le=\"0.025\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("autopilot_patch_duration_seconds_bucket{le=\"+Inf\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("autopilot_patch_duration_seconds_sum 3.02\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE autopilot_patch_duration_seconds histogram\n"),
            "{text}"
        );
        for (name, _, _) in CATALOG {
            assert!(name.starts_with("autopilot_"), "{name}");
            assert!(text.contains(&format!("# HELP {name} ")), "{name}");
        }
    }

    #[test]
    fn status_classes() {
        assert_eq!(status_class(Some(204), false), "2xx");
        assert_eq!(status_class(Some(429), false), "4xx");
        assert_eq!(status_class(Some(503), false), "5xx");
        assert_eq!(status_class(None, true), "timeout");
        assert_eq!(status_class(None, false), "network");
    }
}
