//! The live configuration and its hot reload.
//!
//! [`LiveConfig`] holds the configuration every task reads. A reload (SIGHUP, a change in
//! the config file's directory, or [`LiveConfig::reload`]) parses and validates the file
//! first and swaps only a valid result, in one step; an invalid file leaves the running
//! configuration alone and is reported in the log, `/readyz` and the metrics.
//!
//! What a reload changes: sources (auth, secrets, rate limits), rules and shifts. What it
//! cannot change while running — `[server]`, `[database]`, `[platform]`, `[queue]`,
//! `[admin]` — keeps its running value and is named in a warning: it takes a restart.
//!
//! The directory is watched, not the file: editors that save by renaming a temporary
//! file over it, `git checkout`, and Kubernetes' `..data` symlink swap all show up as
//! events in the directory. Events are debounced and every reload reads the file anew.

use crate::clock::SharedClock;
use crate::config::Config;
use crate::metrics::Metrics;
use chrono::{DateTime, Utc};
use notify::Watcher;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// How the last reload went, for `/readyz` and the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadStatus {
    /// When the running configuration was loaded.
    pub loaded_at: DateTime<Utc>,
    pub reloads: u64,
    /// The error of the last attempt, if it failed (the previous config still runs).
    pub last_error: Option<String>,
    pub last_attempt_at: Option<DateTime<Utc>>,
}

/// What a successful reload changed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadReport {
    pub rules_added: Vec<String>,
    pub rules_changed: Vec<String>,
    pub rules_removed: Vec<String>,
    /// Changed rules whose schedule itself changed (they start over from the reload).
    pub schedules_changed: Vec<String>,
    /// New or changed shifts.
    pub shifts_changed: Vec<String>,
    /// Sections that differ in the file but only take effect at the next restart.
    pub needs_restart: Vec<&'static str>,
}

pub struct LiveConfig {
    tx: watch::Sender<Arc<Config>>,
    status: Mutex<ReloadStatus>,
    metrics: Arc<Metrics>,
}

impl LiveConfig {
    pub fn new(config: Config, now: DateTime<Utc>, metrics: Arc<Metrics>) -> Arc<LiveConfig> {
        metrics.set("autopilot_config_last_reload_success", &[], 1.0);
        Arc::new(LiveConfig {
            tx: watch::Sender::new(Arc::new(config)),
            status: Mutex::new(ReloadStatus {
                loaded_at: now,
                reloads: 0,
                last_error: None,
                last_attempt_at: None,
            }),
            metrics,
        })
    }

    /// The configuration to use now. Cheap; take it once per unit of work.
    pub fn current(&self) -> Arc<Config> {
        self.tx.borrow().clone()
    }

    /// Sees every swap.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Config>> {
        self.tx.subscribe()
    }

    pub fn status(&self) -> ReloadStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads, validates and swaps in the configuration at `path`. On error nothing
    /// changes and the error (with file:line:col) is returned and remembered.
    pub fn reload(
        &self,
        path: &Path,
        env: &[(String, String)],
        now: DateTime<Utc>,
    ) -> Result<ReloadReport, String> {
        // Only a regular file of sane size: a FIFO would block the read for ever, a huge
        // file would eat the memory. (metadata follows symlinks and does not block.)
        let loaded = match std::fs::metadata(path) {
            Ok(m) if !m.is_file() => Err(format!("{} is not a regular file", path.display())),
            Ok(m) if m.len() > MAX_CONFIG_BYTES => Err(format!(
                "{} is {} bytes; a config is at most {MAX_CONFIG_BYTES}",
                path.display(),
                m.len()
            )),
            Ok(_) => Config::load(path, env).map_err(|e| e.to_string()),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        };
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.last_attempt_at = Some(now);
        let mut new = match loaded {
            Ok(c) => c,
            Err(msg) => {
                status.last_error = Some(msg.clone());
                self.metrics
                    .inc("autopilot_config_reloads_total", &[("result", "failed")]);
                self.metrics
                    .set("autopilot_config_last_reload_success", &[], 0.0);
                return Err(msg);
            }
        };
        let old = self.current();
        let report = compare(&old, &new);
        // What only a restart can change keeps its running value.
        new.server = old.server.clone();
        new.database = old.database.clone();
        new.platform = old.platform.clone();
        new.queue = old.queue.clone();
        new.admin = old.admin.clone();
        self.tx.send_replace(Arc::new(new));
        status.loaded_at = now;
        status.reloads += 1;
        status.last_error = None;
        self.metrics
            .inc("autopilot_config_reloads_total", &[("result", "ok")]);
        self.metrics
            .set("autopilot_config_last_reload_success", &[], 1.0);
        Ok(report)
    }

    /// Reloads and logs the outcome.
    pub fn reload_and_log(&self, path: &Path, env: &[(String, String)], now: DateTime<Utc>) {
        match self.reload(path, env, now) {
            Ok(r) => {
                info!(
                    added = ?r.rules_added, changed = ?r.rules_changed, removed = ?r.rules_removed,
                    shifts_changed = ?r.shifts_changed, "configuration reloaded"
                );
                if !r.needs_restart.is_empty() {
                    warn!(sections = ?r.needs_restart, "these settings changed but only take effect at the next restart");
                }
            }
            Err(e) => {
                error!(error = %e, path = %path.display(), "configuration reload failed; the previous configuration keeps running")
            }
        }
    }
}

/// Rules and shifts compare by their whole definition (`Debug` holds every field, with
/// secrets redacted); sections by theirs.
pub fn compare(old: &Config, new: &Config) -> ReloadReport {
    let print = |r: &crate::rules::Rule| format!("{r:?}");
    let mut report = ReloadReport::default();
    for r in &new.rules {
        match old.rules.iter().find(|o| o.name == r.name) {
            None => report.rules_added.push(r.name.clone()),
            Some(o) if print(o) != print(r) => {
                report.rules_changed.push(r.name.clone());
                if r.schedule().is_some()
                    && format!("{:?}", o.schedule()) != format!("{:?}", r.schedule())
                {
                    report.schedules_changed.push(r.name.clone());
                }
            }
            Some(_) => {}
        }
    }
    for o in &old.rules {
        if !new.rules.iter().any(|r| r.name == o.name) {
            report.rules_removed.push(o.name.clone());
        }
    }
    for s in &new.shifts {
        let same = old
            .shifts
            .iter()
            .any(|o| o.name == s.name && format!("{o:?}") == format!("{s:?}"));
        if !same {
            report.shifts_changed.push(s.name.clone());
        }
    }
    let sections: [(&'static str, String, String); 5] = [
        (
            "server",
            format!("{:?}", old.server),
            format!("{:?}", new.server),
        ),
        (
            "database",
            format!("{:?}", old.database),
            format!("{:?}", new.database),
        ),
        (
            "platform",
            format!("{:?}", old.platform),
            format!("{:?}", new.platform),
        ),
        (
            "queue",
            format!("{:?}", old.queue),
            format!("{:?}", new.queue),
        ),
        (
            "admin",
            format!("{:?}", old.admin),
            format!("{:?}", new.admin),
        ),
    ];
    report.needs_restart = sections
        .into_iter()
        .filter(|(_, a, b)| a != b)
        .map(|(name, _, _)| name)
        .collect();
    report
}

/// Reloads on `hup` (SIGHUP) and on any change in the directory holding `path`, until
/// cancelled. Bursts of events (an editor's save, a checkout) become one reload.
pub async fn watch(
    live: Arc<LiveConfig>,
    path: PathBuf,
    env: Vec<(String, String)>,
    clock: SharedClock,
    hup: Arc<Notify>,
    cancel: CancellationToken,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // The config file itself (written in place, renamed over, checked out) or a
        // Kubernetes `..data` / `..2026_…` entry; not reads, not other files (a database
        // beside the config must not cause a reload per write).
        let relevant = event.is_ok_and(|e| {
            !e.kind.is_access()
                && e.paths.iter().any(|p| {
                    p.file_name().is_some_and(|f| {
                        f == name.as_os_str() || f.to_string_lossy().starts_with("..")
                    })
                })
        });
        if relevant {
            let _ = tx.send(());
        }
    })
    .and_then(|mut w| {
        w.watch(&dir, notify::RecursiveMode::NonRecursive)
            .map(|()| w)
    });
    let _watcher = match watcher {
        Ok(w) => {
            info!(dir = %dir.display(), "watching the config directory for changes");
            Some(w)
        }
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "cannot watch the config directory; reload with SIGHUP");
            None
        }
    };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = hup.notified() => {
                info!("reload requested");
            }
            Some(()) = rx.recv() => {
                // Wait until the directory has been quiet for DEBOUNCE: a slow writer
                // must not be read half-way.
                loop {
                    tokio::time::sleep(DEBOUNCE).await;
                    let mut more = false;
                    while rx.try_recv().is_ok() {
                        more = true;
                    }
                    if !more {
                        break;
                    }
                }
            }
        }
        // Reading is blocking I/O (and the file may be on a slow mount): off the runtime.
        let (live, path, env, now) = (live.clone(), path.clone(), env.clone(), clock.now());
        let _ = tokio::task::spawn_blocking(move || live.reload_and_log(&path, &env, now)).await;
    }
}

/// Largest config file a reload reads.
pub const MAX_CONFIG_BYTES: u64 = 10 << 20;

/// How long the directory must stay quiet before a reload reads the file.
pub const DEBOUNCE: Duration = Duration::from_millis(250);
