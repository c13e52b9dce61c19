//! The command line: `serve`, `check`, `sim`, `demo`, `migrate`.

use crate::app::App;
use crate::clock::{SharedClock, SystemClock};
use crate::config::{Config, TokenSource};
use crate::platform::sim::{SimOptions, Simulator};
use crate::rules::Trigger;
use crate::store::Store;
use crate::telemetry::LogFormat;
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// The demo configuration, embedded so `autopilot demo` works from any directory.
pub const DEMO_CONFIG: &str = include_str!("../config/demo.toml");

#[derive(Debug, Parser)]
#[command(
    name = "autopilot",
    version,
    about = "Keeps Convirza AI voice agents configured on schedule and on webhook events"
)]
pub struct Cli {
    /// Log format (default: pretty on a terminal, JSON otherwise). RUST_LOG sets the filter.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: webhooks, schedules and the PATCH queue.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config; print each scheduled rule's next 3 fires. Exit 0 only when valid.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the bundled platform simulator (a fake Convirza API) on ADDR.
    Sim {
        #[arg(long, default_value = "127.0.0.1:18089")]
        listen: SocketAddr,
        /// The bearer token the simulator accepts.
        #[arg(long, default_value = crate::platform::sim::DEFAULT_TOKEN)]
        token: String,
        /// A JSON array of agents to serve instead of the seeded 101, 102 and 103.
        #[arg(long)]
        agents: Option<PathBuf>,
    },
    /// Try it with no account: the daemon and the simulator in one process, on the demo config.
    Demo {
        /// Another config to run instead of the embedded config/demo.toml.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Where the daemon listens (default: the config's server.listen).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Create or upgrade the database schema, then exit.
    Migrate {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Exit 0 if the daemon of this config answers /readyz with 200 (for Docker's HEALTHCHECK).
    Healthcheck {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Every PATCH the schedules would send in a time range. Reads only the config.
    Plan {
        #[arg(long, short)]
        config: PathBuf,
        /// Start (RFC 3339, or a date taken as 00:00 UTC). Default: now.
        #[arg(long)]
        from: Option<String>,
        /// End (RFC 3339 or a date). Default: --for after --from.
        #[arg(long, conflicts_with = "for_")]
        until: Option<String>,
        /// Length of the range, e.g. 7d, 12h.
        #[arg(long = "for", default_value = "7d")]
        for_: String,
        /// One JSON object a line: at, local, rule, agents, set.
        #[arg(long)]
        json: bool,
    },
    /// Inspect and repair the PATCH queue; safe beside a running daemon.
    Jobs {
        #[command(subcommand)]
        action: JobsAction,
    },
}

/// Which database: `--db FILE`, or the `[database] path` of `--config FILE` (only that key
/// is read, so secrets need not be set).
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct DbArgs {
    /// The daemon's config file (only its [database] path is read).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The SQLite database file itself.
    #[arg(long)]
    pub db: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum JobsAction {
    /// List jobs, newest last.
    List {
        #[command(flatten)]
        db: DbArgs,
        /// pending, leased, done, dead, expired, skipped or discarded
        #[arg(long)]
        status: Option<String>,
        /// Only this agent's jobs.
        #[arg(long)]
        agent: Option<i64>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Put a dead (or expired, skipped, discarded) job back in line, or every dead job.
    Retry {
        #[command(flatten)]
        db: DbArgs,
        /// The job id (see `jobs list`).
        #[arg(required_unless_present = "all_dead", conflicts_with = "all_dead")]
        id: Option<i64>,
        /// Every dead job.
        #[arg(long)]
        all_dead: bool,
    },
    /// Never send this job.
    Discard {
        #[command(flatten)]
        db: DbArgs,
        /// The job id (see `jobs list`).
        id: i64,
    },
}

pub fn run(cli: Cli) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Serve { config } => serve(&config).await,
            Command::Check { config } => check(&config),
            Command::Sim {
                listen,
                token,
                agents,
            } => sim(listen, token, agents).await,
            Command::Demo { config, listen } => demo(config, listen).await,
            Command::Migrate { config } => migrate(&config).await,
            Command::Jobs { action } => jobs(action).await,
            Command::Healthcheck { config } => healthcheck(&config).await,
            Command::Plan {
                config,
                from,
                until,
                for_,
                json,
            } => plan(&config, from, until, &for_, json),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The environment, as text. A variable whose name or value is not UTF-8 cannot be a
/// setting or a secret reference: it is left out (an `AUTOPILOT_*` one is reported).
fn env_vars() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| match (k.into_string(), v.into_string()) {
            (Ok(k), Ok(v)) => Some((k, v)),
            (Ok(k), Err(_)) if k.starts_with("AUTOPILOT_") => {
                eprintln!("warning: ignoring {k}: its value is not UTF-8");
                None
            }
            _ => None,
        })
        .collect()
}

fn load(path: &Path) -> anyhow::Result<Config> {
    Config::load(path, &env_vars()).map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))
}

/// Cancels the token on SIGINT or SIGTERM.
fn cancel_on_signals(cancel: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = ctrl_c.await;
                        cancel.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested: finishing in-flight work");
        cancel.cancel();
    });
}

async fn serve(path: &Path) -> anyhow::Result<()> {
    let config = load(path)?;
    let cancel = CancellationToken::new();
    cancel_on_signals(cancel.clone());
    let clock: SharedClock = Arc::new(SystemClock);
    let mut app = App::start(config, clock, cancel.clone()).await?;
    app.watch_config(path.to_path_buf(), env_vars());
    reload_on_sighup(&app, cancel);
    app.wait().await;
    Ok(())
}

/// SIGHUP asks the config watcher for a reload.
fn reload_on_sighup(app: &App, cancel: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let hup = app.reload_trigger();
        match signal(SignalKind::hangup()) {
            Ok(mut s) => {
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            _ = cancel.cancelled() => break,
                            got = s.recv() => match got {
                                Some(()) => hup.notify_one(),
                                None => break,
                            },
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot handle SIGHUP; the config directory is still watched")
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (app, cancel);
}

fn check(path: &Path) -> anyhow::Result<()> {
    let config = load(path)?;
    use std::fmt::Write as _;
    let mut out = String::new();
    writeln!(out, "{}: valid", path.display())?;
    writeln!(
        out,
        "  listen {}, database {}, platform {}, {} source(s), {} rule(s)",
        config.server.listen,
        config.database.path.display(),
        config.platform.base_url,
        config.sources.len(),
        config.rules.len()
    )?;
    let now = chrono::Utc::now();
    for rule in &config.rules {
        match &rule.trigger {
            Trigger::Schedule(s) => {
                writeln!(
                    out,
                    "  rule {:?}: cron {:?} in {} ({})",
                    rule.name,
                    s.expr,
                    s.zone,
                    if s.is_interval() {
                        "interval"
                    } else {
                        "fixed time"
                    }
                )?;
                for note in s.surprises() {
                    writeln!(out, "    note: {note}")?;
                }
                let mut t = now;
                for _ in 0..3 {
                    match s.next_after(t) {
                        Some(n) => {
                            writeln!(
                                out,
                                "    next {}  ({})",
                                n.with_timezone(&s.zone).format("%Y-%m-%d %H:%M %Z (%:z)"),
                                n.format("%Y-%m-%dT%H:%M:%SZ")
                            )?;
                            t = n;
                        }
                        None => {
                            writeln!(out, "    never fires again")?;
                            break;
                        }
                    }
                }
            }
            Trigger::Webhook { source, conditions } => {
                writeln!(
                    out,
                    "  rule {:?}: on webhook {source:?} when {} condition(s) match",
                    rule.name,
                    conditions.len()
                )?;
            }
        }
    }
    // A closed pipe (`check … | head`) is not an error worth a panic.
    use std::io::Write as _;
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
    Ok(())
}

/// Needs only `[database] path`: no secrets. Safe while the daemon runs (it already
/// migrated at its start; this is then a no-op).
async fn migrate(path: &Path) -> anyhow::Result<()> {
    let db = crate::config::database_path(path, &env_vars())
        .map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?;
    let store = Store::open(&db)
        .await
        .with_context(|| format!("opening {}", db.display()))?;
    store.close().await;
    println!("{}: schema is up to date", db.display());
    Ok(())
}

async fn sim(listen: SocketAddr, token: String, agents: Option<PathBuf>) -> anyhow::Result<()> {
    let agents = match agents {
        Some(p) => Some(Simulator::load_agents_file(&p)?),
        None => None,
    };
    let sim = Simulator::new(SimOptions {
        token,
        agents,
        ..SimOptions::default()
    });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let cancel = CancellationToken::new();
    cancel_on_signals(cancel.clone());
    eprintln!(
        "simulator listening on http://{}/v3 (token via --token); requests at /_sim/requests",
        listener.local_addr()?
    );
    sim.serve(listener, cancel).await?;
    Ok(())
}

async fn demo(config_path: Option<PathBuf>, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    let (text, origin) = match &config_path {
        Some(p) => (
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            p.clone(),
        ),
        None => (DEMO_CONFIG.to_string(), PathBuf::from("config/demo.toml")),
    };
    let mut config = Config::from_toml(&text, &origin, &env_vars())
        .map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?;

    // The simulator, in-process, on a free port; the daemon talks to it.
    let sim = Simulator::new(SimOptions::default());
    let sim_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sim_addr = sim_listener.local_addr()?;
    let cancel = CancellationToken::new();
    cancel_on_signals(cancel.clone());
    tokio::spawn(sim.clone().serve(sim_listener, cancel.clone()));
    config.platform.base_url = format!("http://{sim_addr}/v3");
    config.platform.token =
        TokenSource::Static(crate::platform::sim::DEFAULT_TOKEN.to_string().into());
    if let Some(l) = listen {
        config.server.listen = l;
    }
    let dir = std::env::temp_dir().join(format!("autopilot-demo-{}", std::process::id()));
    config.database.path = dir.join("demo.db");
    let schedules: Vec<String> = config
        .rules
        .iter()
        .filter_map(|r| {
            let s = r.schedule()?;
            let next = s.next_after(chrono::Utc::now())?;
            Some(format!(
                "  - {:?} ({}) next fires at {}",
                r.name,
                s.expr,
                next.with_timezone(&s.zone).format("%H:%M:%S %Z")
            ))
        })
        .collect();

    let mut requests = sim.subscribe();
    let app = App::start(config, Arc::new(SystemClock), cancel.clone()).await.with_context(|| {
        "starting the demo daemon (is the port taken? try `autopilot demo --listen 127.0.0.1:0`)"
    })?;
    let addr = app.local_addr();
    println!("autopilot demo: daemon on http://{addr}, simulated platform on http://{sim_addr}/v3");
    println!(
        "  database: {} (removed on exit)",
        dir.join("demo.db").display()
    );
    println!("scheduled rules:");
    for s in &schedules {
        println!("{s}");
    }
    println!("send a post-call webhook (an abandoned call pauses agent 101):");
    println!(
        "  curl -sS -X POST http://{addr}/webhooks/convirza -H 'content-type: application/json' -d '{{\"event\":\"post_call\",\"call_id\":1,\"disposition\":\"ABANDONED\",\"ai_voice_agent_id\":101,\"static\":{{\"auth_token\":\"demo-secret\"}}}}'"
    );
    println!("PATCHes arriving at the simulator appear below. Ctrl-C stops.");
    let printer = tokio::spawn(async move {
        while let Ok(r) = requests.recv().await {
            let fields = serde_json::Value::Object(r.fields.clone());
            println!(
                "[sim] {} {} {} -> {} {}",
                r.at.format("%H:%M:%S"),
                r.method,
                r.path,
                r.status,
                if r.fields.is_empty() {
                    String::new()
                } else {
                    fields.to_string()
                }
            );
        }
    });
    app.wait().await;
    printer.abort();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

async fn open_db(args: &DbArgs) -> anyhow::Result<Store> {
    let path = match (&args.db, &args.config) {
        (Some(db), _) => db.clone(),
        (None, Some(config)) => crate::config::database_path(config, &env_vars())
            .map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?,
        (None, None) => anyhow::bail!("give --config FILE or --db FILE"),
    };
    if !path.exists() {
        anyhow::bail!(
            "no database at {} (has the daemon run yet?)",
            path.display()
        );
    }
    Store::open_existing(&path)
        .await
        .with_context(|| format!("opening {}", path.display()))
}

async fn jobs(action: JobsAction) -> anyhow::Result<()> {
    let now = chrono::Utc::now();
    match action {
        JobsAction::List {
            db,
            status,
            agent,
            json,
        } => {
            if let Some(s) = &status {
                s.parse::<crate::store::JobStatus>()
                    .map_err(anyhow::Error::msg)?;
            }
            let store = open_db(&db).await?;
            let jobs = store.jobs(status.as_deref(), agent).await?;
            store.close().await;
            // Written, not printed: a closed pipe (`| head`) is an error, not a panic.
            use std::io::Write as _;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            if json {
                for j in &jobs {
                    writeln!(out, "{}", serde_json::to_string(j)?)?;
                }
                out.flush()?;
                return Ok(());
            }
            writeln!(
                out,
                "{:>6}  {:<9}  {:>8}  {:<28}  {:>3}  {:>4}  {:<20}  LAST ERROR",
                "ID", "STATUS", "AGENT", "RULE", "TRY", "HTTP", "UPDATED (UTC)"
            )?;
            for j in &jobs {
                writeln!(
                    out,
                    "{:>6}  {:<9}  {:>8}  {:<28}  {:>3}  {:>4}  {:<20}  {}",
                    j.id,
                    j.status,
                    j.agent_id,
                    clip(&j.rule, 28),
                    j.attempts,
                    j.last_status
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "-".into()),
                    j.updated_at.format("%Y-%m-%d %H:%M:%S"),
                    clip(j.last_error.as_deref().unwrap_or(""), 60)
                )?;
            }
            writeln!(out, "{} job(s)", jobs.len())?;
            out.flush()?;
        }
        JobsAction::Retry { db, id, all_dead } => {
            let store = open_db(&db).await?;
            let result = if all_dead {
                let ids = store.retry_all_dead(now).await?;
                println!("{} dead job(s) back in line: {ids:?}", ids.len());
                Ok(())
            } else {
                let id = id.expect("clap requires an id without --all-dead");
                store
                    .retry_job(id, now)
                    .await?
                    .map(|()| println!("job {id} is back in line"))
            };
            store.close().await;
            result.map_err(anyhow::Error::msg)?;
        }
        JobsAction::Discard { db, id } => {
            let store = open_db(&db).await?;
            let result = store.discard_job(id, now).await?;
            store.close().await;
            result.map_err(anyhow::Error::msg)?;
            println!("job {id} discarded");
        }
    }
    Ok(())
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(n.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

fn parse_instant(s: &str, what: &str) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    anyhow::bail!(
        "{what} {s:?} is not an RFC 3339 time (2026-12-03T18:00:00-05:00) or a date (2026-12-03)"
    )
}

fn plan(
    path: &Path,
    from: Option<String>,
    until: Option<String>,
    for_: &str,
    json: bool,
) -> anyhow::Result<()> {
    let config = Config::load_offline(path, &env_vars())
        .map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?;
    let from = match from {
        Some(f) => parse_instant(&f, "--from")?,
        None => chrono::Utc::now(),
    };
    let until = match until {
        Some(u) => parse_instant(&u, "--until")?,
        None => {
            let d = humantime::parse_duration(for_)
                .map_err(|e| anyhow::anyhow!("--for {for_:?}: {e} (write e.g. 7d, 12h)"))?;
            if d > crate::config::MAX_DURATION {
                anyhow::bail!("--for {for_:?} is longer than 366 days");
            }
            from + chrono::Duration::from_std(d)?
        }
    };
    if until <= from {
        anyhow::bail!("the range is empty: --until must be after --from");
    }
    if until - from > chrono::Duration::days(366) {
        anyhow::bail!("the range is longer than 366 days; plan a year at a time");
    }
    let fires = crate::schedule::plan(&config.rules, &config.shifts, from, until);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    use std::io::Write;
    for f in &fires {
        if json {
            writeln!(
                out,
                "{}",
                serde_json::json!({
                    "at": f.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    "local": f.local.to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
                    "rule": f.rule,
                    "agents": f.agents,
                    "set": f.set,
                })
            )?;
        } else {
            let agents: Vec<String> = f.agents.iter().map(|a| a.to_string()).collect();
            writeln!(
                out,
                "{}  {}  {:<28}  agents {}  {}",
                f.at.format("%Y-%m-%dT%H:%M:%SZ"),
                f.local.format("%Y-%m-%d %H:%M %:z"),
                f.rule,
                agents.join(","),
                f.set
            )?;
        }
    }
    if !json {
        writeln!(
            out,
            "{} PATCH fire(s) from {from} until {until}",
            fires.len()
        )?;
    }
    Ok(())
}

/// Asks the running daemon (at the config's `server.listen`, loopback for a wildcard
/// address) whether it is ready. Needs no secrets.
async fn healthcheck(path: &Path) -> anyhow::Result<()> {
    // The daemon keeps running on its old config when the file on disk is broken (a
    // failed reload): the health check must still find it, not fail on the file.
    let env = env_vars();
    let mut addr = match Config::load_offline(path, &env) {
        Ok(config) => config.server.listen,
        Err(e) => {
            let addr = crate::config::listen_lenient(path, &env);
            eprintln!(
                "warning: {} does not load ({} error(s)); asking the daemon at {addr}",
                path.display(),
                e.to_string().lines().count()
            );
            addr
        }
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let url = format!("http://{addr}/readyz");
    let reply = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(3))
        .build()?
        .get(&url)
        .send()
        .await
        .with_context(|| format!("no answer from {url}"))?;
    let status = reply.status();
    let body = reply.text().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!("{url} answered {status}: {body}");
    }
    println!("{url}: {body}");
    Ok(())
}
