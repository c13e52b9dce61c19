//! The real binary, killed with SIGKILL mid-send several times: nothing accepted is lost.

use crate::helpers::eventually;
use autopilot::platform::sim::{SimOptions, Simulator};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
[database]
path = "DB"
[platform]
base_url = "BASE"
token = { value = "sim-token" }
timeout = "1s"
[queue]
workers = 4
max_attempts = 20
initial_backoff = "20ms"
max_backoff = "200ms"
lease = "6s"
[[sources]]
name = "s"
auth = { kind = "static", query = "key", secret = { value = "k" } }
id = "/id"
[[rules]]
name = "note"
webhook = { source = "s" }
agent = "/agent"
set = { more_information = "seen" }
"#;

/// Starts `autopilot serve` and reads its address from its JSON start-up log line.
fn start(config: &Path) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_autopilot"))
        .args(["--log-format", "json", "serve", "--config"])
        .arg(config)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn autopilot");
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("autopilot exited before it started")
            .unwrap();
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if v["fields"]["message"] == "autopilot started" {
            break v["fields"]["addr"].as_str().unwrap().parse().unwrap();
        }
    };
    // Keep draining its logs so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

fn jobs(db: &Path) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_autopilot"))
        .args(["jobs", "list", "--json", "--db"])
        .arg(db)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_mid_send_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::new(SimOptions::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim_addr = listener.local_addr().unwrap();
    let cancel = CancellationToken::new();
    tokio::spawn(sim.clone().serve(listener, cancel.clone()));
    let db = dir.path().join("crash.db");
    let config = dir.path().join("crash.toml");
    std::fs::write(
        &config,
        CONFIG
            .replace("DB", &db.display().to_string())
            .replace("BASE", &format!("http://{sim_addr}/v3")),
    )
    .unwrap();
    let http = reqwest::Client::new();
    // Slow PATCHes, so kills land mid-send.
    http.post(format!("http://{sim_addr}/_sim/faults"))
        .json(&json!({"delay_ms": 300, "count": 60}))
        .send()
        .await
        .unwrap();

    let mut accepted = 0;
    let mut id = 0;
    for round in 0..3 {
        let (mut child, addr) = start(&config);
        for _ in 0..40 {
            id += 1;
            let r = http
                .post(format!("http://{addr}/webhooks/s?key=k"))
                .json(&json!({"id": id, "agent": 101 + (id % 3)}))
                .send()
                .await
                .unwrap();
            if r.status().as_u16() == 202 {
                accepted += 1;
            }
        }
        // Let some PATCHes go out, then SIGKILL while others are in flight.
        eventually("some PATCHes in flight", || async {
            jobs(&db).iter().any(|j| j["status"] == "leased")
        })
        .await;
        child.kill().unwrap();
        child.wait().unwrap();
        let _ = round;
    }
    assert_eq!(accepted, 120);

    let (mut child, _) = start(&config);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let all = jobs(&db);
        if all.len() == 120 && all.iter().all(|j| j["status"] == "done") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not all jobs done: {:?}",
            all.iter()
                .filter(|j| j["status"] != "done")
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Every job reached the platform at least once; crashed attempts were counted.
    let patched = sim
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH" && r.status == 200)
        .count();
    assert!(patched >= 120, "{patched}");
    cancel.cancel();
}
