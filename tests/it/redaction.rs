//! The real binary at debug log level, fed failed and successful deliveries, admin API
//! calls with wrong and right tokens, and a SIGHUP reload: no configured secret and no
//! MAC computed from one appears anywhere in what it logs.

use hmac::{Hmac, Mac};
use std::io::BufRead;
use std::process::{Command, Stdio};

const SECRETS: [&str; 6] = [
    "hunter2-basic-pass",
    "whsec-log-test",
    "static-log-secret",
    "sim-token",
    "admin-log-token-0123456789",
    "whsec_c3RhbmRhcmQtd2ViaG9va3Mta2V5",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_computed_mac_reaches_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let sim = autopilot::platform::sim::Simulator::new(Default::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim_addr = listener.local_addr().unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    tokio::spawn(sim.serve(listener, cancel.clone()));
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            r#"[server]
listen = "127.0.0.1:0"
[database]
path = "{}"
[platform]
base_url = "http://{sim_addr}/v3"
token = {{ value = "sim-token" }}
[admin]
listen = "127.0.0.1:0"
token = {{ value = "admin-log-token-0123456789" }}
[[sources]]
name = "sw"
auth = {{ kind = "standard-webhooks", secret = {{ value = "whsec_c3RhbmRhcmQtd2ViaG9va3Mta2V5" }} }}
[[sources]]
name = "h"
auth = {{ kind = "hmac-sha256", header = "X-Signature", secret = {{ value = "whsec-log-test" }} }}
[[sources]]
name = "s"
auth = {{ kind = "static", field = "/auth", secret = {{ value = "static-log-secret" }} }}
[[sources]]
name = "b"
auth = {{ kind = "basic", username = "ops", password = {{ value = "hunter2-basic-pass" }} }}
[[rules]]
name = "r"
webhook = {{ source = "s" }}
agent = "/agent"
set = {{ status = "inactive" }}
"#,
            dir.path().join("r.db").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_autopilot"))
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "debug")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Read the start-up lines up to the one that names the address, keep everything.
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    let (addr, admin): (std::net::SocketAddr, std::net::SocketAddr) = loop {
        let line = lines
            .next()
            .expect("autopilot exited before it started")
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        seen.push(line);
        if v["fields"]["message"] == "autopilot started" {
            let admin = v["fields"]["admin"].as_str().unwrap();
            break (
                v["fields"]["addr"].as_str().unwrap().parse().unwrap(),
                admin.parse().unwrap(),
            );
        }
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        let _ = tx.send(rest);
    });
    let http = reqwest::Client::new();
    let body = br#"{"auth":"static-log-secret","agent":101}"#.to_vec();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"whsec-log-test").unwrap();
    mac.update(&body);
    let computed = hex::encode(mac.finalize().into_bytes());
    for (path, header, value) in [
        ("/webhooks/h", "X-Signature", "deadbeef".to_string()),
        ("/webhooks/h", "X-Signature", computed.clone()),
        ("/webhooks/s", "X-Ignored", "x".to_string()),
        (
            "/webhooks/b",
            "Authorization",
            "Basic b3BzOmh1bnRlcjItYmFzaWMtcGFzcw==".to_string(),
        ),
        (
            "/webhooks/b",
            "Authorization",
            "Basic b3BzOndyb25n".to_string(),
        ),
    ] {
        let _ = http
            .post(format!("http://{addr}{path}"))
            .header("content-type", "application/json")
            .header(header, value)
            .body(body.clone())
            .send()
            .await
            .unwrap();
    }
    let wrong = br#"{"auth":"static-log-secreX","agent":101}"#.to_vec();
    let r = http
        .post(format!("http://{addr}/webhooks/s"))
        .header("content-type", "application/json")
        .body(wrong)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Standard Webhooks with a forged signature.
    let r = http
        .post(format!("http://{addr}/webhooks/sw"))
        .header("content-type", "application/json")
        .header("webhook-id", "msg_1")
        .header(
            "webhook-timestamp",
            chrono::Utc::now().timestamp().to_string(),
        )
        .header("webhook-signature", "v1,Zm9yZ2Vk")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // The admin API with a wrong, then the right token.
    for (token, status) in [
        ("admin-log-token-012345678X", 401),
        ("admin-log-token-0123456789", 200),
    ] {
        let r = http
            .get(format!("http://{admin}/api/status"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status);
    }
    // A reload by SIGHUP re-reads every secret.
    let _ = Command::new("kill")
        .arg("-HUP")
        .arg(child.id().to_string())
        .status();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let r = http
        .get(format!("http://{admin}/api/status"))
        .bearer_auth("admin-log-token-0123456789")
        .send()
        .await
        .unwrap();
    let status: serde_json::Value = r.json().await.unwrap();
    assert_eq!(status["reload"]["reloads"], 1, "SIGHUP reloaded: {status}");
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    seen.extend(rx.recv().unwrap());
    let logs = seen.join("\n");
    assert!(
        logs.contains("webhook rejected"),
        "the run logged its rejections:\n{logs}"
    );
    assert!(
        logs.contains("configuration reloaded"),
        "the run logged its reload:\n{logs}"
    );
    assert!(
        logs.contains("admin API: request without the right token refused"),
        "the run logged the refused admin call:\n{logs}"
    );
    for needle in SECRETS
        .iter()
        .map(|s| s.to_string())
        .chain([computed, "b3BzOmh1bnRlcjItYmFzaWMtcGFzcw".into()])
    {
        assert!(!logs.contains(&needle), "{needle:?} appears in the logs");
    }
    cancel.cancel();
}
