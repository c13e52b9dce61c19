//! Dispatch throughput: how fast the queue drains PATCH jobs into the bundled simulator,
//! as a ratio to the simulator's own throughput measured in the same run with the same
//! concurrency (a plain reqwest loop sending the same PATCH). Run with
//! `cargo bench --bench dispatch`; it prints the figures the README quotes.

use autopilot::app::App;
use autopilot::clock::SystemClock;
use autopilot::config::Config;
use autopilot::platform::sim::{SimOptions, Simulator};
use autopilot::store::{NewDelivery, NewJob, NewRun, Store};
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const JOBS: usize = 3000;
const AGENTS: i64 = 64;
const WORKERS: usize = 8;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let agents: Vec<_> = (1..=AGENTS).map(|id| json!({"id": id})).collect();
    let sim = Simulator::new(SimOptions {
        agents: Some(agents),
        ..SimOptions::default()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sim_addr = listener.local_addr()?;
    let cancel = CancellationToken::new();
    tokio::spawn(sim.clone().serve(listener, cancel.clone()));

    // Baseline: the simulator driven directly, WORKERS requests in flight.
    let http = reqwest::Client::new();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let http = http.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..JOBS).step_by(WORKERS) {
                let agent = 1 + (i as i64 % AGENTS);
                let form =
                    reqwest::multipart::Form::new().text("more_information", format!("job {i}"));
                let r = http
                    .patch(format!("http://{sim_addr}/v3/ai-voice-agents/{agent}"))
                    .bearer_auth("sim-token")
                    .multipart(form)
                    .send()
                    .await
                    .expect("baseline request");
                assert!(r.status().is_success());
                r.bytes().await.expect("baseline body");
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let baseline = JOBS as f64 / started.elapsed().as_secs_f64();

    // autopilot: JOBS jobs already committed, then the workers drain them.
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("bench.db");
    let store = Store::open(&db).await?;
    let now = chrono::Utc::now();
    for chunk in 0..JOBS / 100 {
        let runs: Vec<NewRun> = (0..100)
            .map(|k| {
                let i = chunk * 100 + k;
                NewRun {
                    rule: format!("bench {i}"),
                    trigger: "webhook",
                    scheduled_for: None,
                    happened_at: now,
                    detail: None,
                    skipped: 0,
                    jobs: vec![NewJob {
                        agent_id: 1 + (i as i64 % AGENTS),
                        fields: json!({"more_information": format!("job {i}")}),
                        guard: None,
                        cause_at: now,
                        valid_until: None,
                    }],
                }
            })
            .collect();
        store
            .record_delivery(
                &NewDelivery {
                    event_at: None,
                    source: "bench".into(),
                    dedupe_key: format!("chunk {chunk}"),
                    received_at: now,
                    content_type: "json".into(),
                    payload: json!({}),
                },
                &runs,
            )
            .await?;
    }
    store.close().await;
    let config_text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[database]\npath = {:?}\n[platform]\nbase_url = \"http://{sim_addr}/v3\"\ntoken = {{ value = \"sim-token\" }}\n[queue]\nworkers = {WORKERS}\n",
        db.display().to_string()
    );
    let config = Config::from_toml(&config_text, Path::new("bench.toml"), &[])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let app_cancel = CancellationToken::new();
    let started = Instant::now();
    let app = App::start(config, Arc::new(SystemClock), app_cancel.clone()).await?;
    while app.store().open_jobs().await? > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let done = app.store().jobs(Some("done"), None).await?.len();
    app.shutdown().await;
    cancel.cancel();
    assert_eq!(done, JOBS, "every job must be done");
    let rate = JOBS as f64 / elapsed;
    println!("dispatch bench: {JOBS} PATCH jobs, {AGENTS} agents, {WORKERS} workers/connections");
    println!("  simulator driven directly: {baseline:>8.0} requests/s");
    println!("  autopilot queue:           {rate:>8.0} jobs/s (claim, send, record each attempt durably)");
    println!("  ratio autopilot/direct:    {:>8.2}", rate / baseline);
    println!(
        "  per-job overhead:          {:>8.2} ms of wall time per job per worker",
        (1.0 / rate - 1.0 / baseline) * 1000.0 * WORKERS as f64
    );
    Ok(())
}
