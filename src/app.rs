//! Wires the daemon together under one cancellation token: HTTP server, scheduler and
//! queue workers, on one store.

use crate::clock::SharedClock;
use crate::config::Config;
use crate::http::{self, AppState};
use crate::platform::PlatformClient;
use crate::queue::{Queue, RetryPolicy};
use crate::reload::{self, LiveConfig};
use crate::schedule::Scheduler;
use crate::store::{DbLock, Store};
use anyhow::Context;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub struct App {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    live: Arc<LiveConfig>,
    clock: SharedClock,
    /// Asks the config watcher for a reload (SIGHUP).
    hup: Arc<Notify>,
    /// After cancellation, how long open connections may hold up the exit.
    grace: std::time::Duration,
    store: Store,
    cancel: CancellationToken,
    /// The HTTP servers (webhooks, admin API): on shutdown they get the grace period.
    servers: Vec<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
    lock: Option<DbLock>,
}

impl App {
    /// Takes the database lock, migrates, binds the listener (port 0 picks a free port)
    /// and starts every task. Everything stops when `cancel` is cancelled.
    pub async fn start(
        config: Config,
        clock: SharedClock,
        cancel: CancellationToken,
    ) -> anyhow::Result<App> {
        let lock = DbLock::acquire(&config.database.path).map_err(anyhow::Error::msg)?;
        let store = Store::open_with(&config.database.path, config.database.busy_timeout)
            .await
            .with_context(|| format!("opening database {}", config.database.path.display()))?;
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let client = PlatformClient::new(
            &config.platform,
            store.clone(),
            clock.clone(),
            metrics.clone(),
        )
        .context("building the platform client")?;
        let listener = tokio::net::TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.server.listen))?;
        let addr = listener.local_addr()?;
        let admin_listener = match &config.admin.token {
            Some(_) => Some(
                tokio::net::TcpListener::bind(config.admin.listen)
                    .await
                    .with_context(|| {
                        format!("cannot listen on {} (admin API)", config.admin.listen)
                    })?,
            ),
            None => None,
        };
        let admin_addr = admin_listener
            .as_ref()
            .map(tokio::net::TcpListener::local_addr)
            .transpose()?;
        let live = LiveConfig::new(config, clock.now(), metrics.clone());
        let config = live.current();
        let queue_notify = Arc::new(Notify::new());
        let mut tasks = Vec::new();
        // The scheduler counts as ticked from the start; it ticks again at once.
        metrics.set(
            "autopilot_scheduler_last_tick_timestamp_seconds",
            &[],
            clock.now().timestamp() as f64,
        );

        let state = AppState {
            limits: Arc::default(),
            live: live.clone(),
            store: store.clone(),
            clock: clock.clone(),
            queue_notify: queue_notify.clone(),
            metrics: metrics.clone(),
        };
        let mut servers = vec![serve(listener, http::router(state.clone()), cancel.clone())];
        if let Some(listener) = admin_listener {
            servers.push(serve(listener, http::admin::router(state), cancel.clone()));
        }

        let scheduler = Scheduler {
            live: live.clone(),
            store: store.clone(),
            clock: clock.clone(),
            queue_notify: queue_notify.clone(),
            metrics: metrics.clone(),
        };
        let first_fires = scheduler
            .first_fires()
            .await
            .context("reading the rules' last fires")?;
        tasks.push(tokio::spawn(scheduler.run(first_fires, cancel.clone())));

        let queue = Queue {
            store: store.clone(),
            client,
            clock,
            policy: RetryPolicy::from_config(&config.queue, config.platform.timeout),
            lease: config.queue.lease,
            shutdown_grace: config.queue.shutdown_grace,
            notify: queue_notify,
        };
        let owner = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
        queue
            .store
            .rescue_expired(queue.clock.now())
            .await
            .context("rescuing jobs of a previous run")?;
        tasks.push(tokio::spawn(queue.clone().rescue_loop(cancel.clone())));
        tasks.push(tokio::spawn(prune_loop(
            store.clone(),
            queue.clock.clone(),
            config.database.retention,
            cancel.clone(),
        )));
        for i in 0..config.queue.workers {
            tasks.push(tokio::spawn(
                queue.clone().run(format!("{owner}-w{i}"), cancel.clone()),
            ));
        }
        let admin = admin_addr.map_or_else(|| "off".to_string(), |a| a.to_string());
        info!(%addr, %admin, rules = config.rules.len(), sources = config.sources.len(), workers = config.queue.workers, "autopilot started");
        Ok(App {
            addr,
            admin_addr,
            live,
            clock: queue.clock.clone(),
            hup: Arc::new(Notify::new()),
            grace: config.queue.shutdown_grace,
            store,
            cancel,
            servers,
            tasks,
            lock: Some(lock),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the admin API listens, when it is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    pub fn live(&self) -> &Arc<LiveConfig> {
        &self.live
    }

    /// Reloads the config at `path` on [`App::request_reload`] and whenever its
    /// directory changes, until the app stops.
    pub fn watch_config(&mut self, path: PathBuf, env: Vec<(String, String)>) {
        self.tasks.push(tokio::spawn(reload::watch(
            self.live.clone(),
            path,
            env,
            self.clock.clone(),
            self.hup.clone(),
            self.cancel.clone(),
        )));
    }

    /// What SIGHUP does: reload the watched config.
    pub fn request_reload(&self) {
        self.hup.notify_one();
    }

    /// A handle that requests reloads (for the SIGHUP handler).
    pub fn reload_trigger(&self) -> Arc<Notify> {
        self.hup.clone()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Waits for every task to end (after the token is cancelled), then closes the store.
    pub async fn wait(mut self) {
        // The HTTP server drains open connections, but a client that never finishes its
        // request must not keep the process (and the database lock) alive.
        let cancel = self.cancel.clone();
        let grace = self.grace + std::time::Duration::from_secs(1);
        let aborts: Vec<_> = self.servers.iter().map(JoinHandle::abort_handle).collect();
        let mut servers = std::mem::take(&mut self.servers);
        let all_done = async {
            for server in servers.iter_mut() {
                let _ = server.await;
            }
        };
        tokio::select! {
            _ = all_done => {}
            _ = async { cancel.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!("connections still open after the shutdown grace; closing them");
                aborts.iter().for_each(tokio::task::AbortHandle::abort);
            }
        }
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        self.store.close().await;
        self.lock.take();
    }

    /// Cancels and drains.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.wait().await;
    }

    /// Stops every task at once, mid-request, without releasing leases: what a crash
    /// (or `kill -9`) leaves behind. For tests.
    pub async fn kill(mut self) {
        for t in self.servers.drain(..).chain(self.tasks.drain(..)) {
            t.abort();
            let _ = t.await;
        }
        self.store.close().await;
        self.lock.take();
    }
}

/// Deletes history older than the retention at start and then hourly.
async fn prune_loop(
    store: Store,
    clock: SharedClock,
    retention: std::time::Duration,
    cancel: CancellationToken,
) {
    let retention = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    loop {
        let before = clock.now() - retention;
        match store.prune(before).await {
            Ok(p) if p != Default::default() => {
                info!(deliveries = p.deliveries, runs = p.runs, jobs = p.jobs, %before, "pruned history older than the retention")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "pruning old history failed; trying again in an hour")
            }
        }
        // The clock wakes sleepers at least once a minute: sleep until the hour is up.
        let next = clock.now() + chrono::Duration::hours(1);
        while clock.now() < next {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = clock.sleep_until(next) => {}
            }
        }
    }
}

/// Serves `router` on `listener` until `cancel`; open connections then drain.
fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    cancel: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "http server failed");
        }
    })
}
