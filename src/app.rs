//! Wires the daemon together under one cancellation token: HTTP server, scheduler and
//! queue workers, on one store.

use crate::clock::SharedClock;
use crate::config::Config;
use crate::http::{self, AppState};
use crate::platform::PlatformClient;
use crate::queue::{Queue, RetryPolicy};
use crate::schedule::Scheduler;
use crate::store::{DbLock, Store};
use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub struct App {
    addr: SocketAddr,
    /// After cancellation, how long open connections may hold up the exit.
    grace: std::time::Duration,
    store: Store,
    cancel: CancellationToken,
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
        let client = PlatformClient::new(&config.platform, store.clone(), clock.clone())
            .context("building the platform client")?;
        let listener = tokio::net::TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.server.listen))?;
        let addr = listener.local_addr()?;
        let config = Arc::new(config);
        let queue_notify = Arc::new(Notify::new());
        let mut tasks = Vec::new();

        let state = AppState {
            limits: Arc::new(http::buckets(&config)),
            config: config.clone(),
            store: store.clone(),
            clock: clock.clone(),
            queue_notify: queue_notify.clone(),
        };
        let router = http::router(state);
        let server_cancel = cancel.clone();
        tasks.push(tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(server_cancel.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "http server failed");
            }
        }));

        let scheduler = Scheduler {
            config: config.clone(),
            store: store.clone(),
            clock: clock.clone(),
            queue_notify: queue_notify.clone(),
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
        info!(%addr, rules = config.rules.len(), sources = config.sources.len(), workers = config.queue.workers, "autopilot started");
        Ok(App {
            addr,
            grace: config.queue.shutdown_grace,
            store,
            cancel,
            tasks,
            lock: Some(lock),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Waits for every task to end (after the token is cancelled), then closes the store.
    pub async fn wait(mut self) {
        // The HTTP server drains open connections, but a client that never finishes its
        // request must not keep the process (and the database lock) alive.
        let mut server = self.tasks.remove(0);
        let cancel = self.cancel.clone();
        let grace = self.grace + std::time::Duration::from_secs(1);
        tokio::select! {
            _ = &mut server => {}
            _ = async { cancel.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!("connections still open after the shutdown grace; closing them");
                server.abort();
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
        for t in self.tasks.drain(..) {
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
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = clock.sleep_until(clock.now() + chrono::Duration::hours(1)) => {}
        }
    }
}
