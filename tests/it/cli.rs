//! The real binary: `check` on good and bad configs.

use std::process::Command;

fn autopilot() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_autopilot"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

#[test]
fn check_passes_on_the_shipped_configs_and_prints_next_fires() {
    let out = autopilot()
        .args(["check", "--config", "config/autopilot.toml"])
        .env("CONVIRZA_TOKEN", "t")
        .env("CONVIRZA_WEBHOOK_SECRET", "s")
        .env("GATEWAY_SECRET", "g")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("rule \"night greeting\""), "{stdout}");
    assert_eq!(
        stdout.matches("    next ").count(),
        6,
        "3 fires for each of 2 scheduled rules:\n{stdout}"
    );
    assert!(
        stdout.contains("18:00 EST") || stdout.contains("18:00 EDT"),
        "{stdout}"
    );

    let out = autopilot()
        .args(["check", "--config", "config/demo.toml"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_fails_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[platform]\nbase_url = \"http://x/v3\"\ntoken = { value = \"x\" }\n[[rules]]\nname = \"r\"\nschedule = { cron = \"0 18 * * *\", timezone = \"Mars/Base\" }\nagents = [1]\nset = { greeting = \"hi\" }\n",
    )
    .unwrap();
    let out = autopilot()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let p = path.display();
    assert!(
        stderr.contains(&format!("{p}:6:46: unknown time zone \"Mars/Base\"")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{p}:8:9: unknown PATCH field `greeting`; did you mean `greetings`?"
        )),
        "{stderr}"
    );
}

#[test]
fn check_on_shipped_config_without_secrets_names_each_missing_variable() {
    let out = autopilot()
        .args(["check", "--config", "config/autopilot.toml"])
        .env_remove("CONVIRZA_TOKEN")
        .env_remove("CONVIRZA_WEBHOOK_SECRET")
        .env_remove("GATEWAY_SECRET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for var in [
        "CONVIRZA_TOKEN",
        "CONVIRZA_WEBHOOK_SECRET",
        "GATEWAY_SECRET",
    ] {
        assert!(
            stderr.contains(&format!("environment variable {var} is not set")),
            "{stderr}"
        );
    }
}

#[tokio::test]
async fn jobs_cli_lists_retries_and_discards_beside_a_running_daemon() {
    use crate::helpers::*;
    let t = spawn().await;
    // Agent 999 does not exist: its job dies with a 404.
    let body = serde_json::json!({"event": "post_call", "call_id": 1, "indicators": {"lead_quality": 99},
        "ai_voice_agent_id": 999, "static": {"auth_token": STATIC_SECRET}});
    assert_eq!(t.post_json("convirza", &body).await.status(), 202);
    t.settle().await;
    let db = t.db_path();
    // Awaited, not blocking: the daemon runs on this test's single runtime thread, and
    // a write of its caught mid-transaction would hold the lock until the CLI gave up.
    let run = |args: &[&str]| {
        let mut cmd = tokio::process::Command::from(autopilot());
        cmd.args(args).arg("--db").arg(&db);
        async move {
            let out = cmd.output().await.unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).to_string(),
                String::from_utf8_lossy(&out.stderr).to_string(),
            )
        }
    };
    let (code, out, _) = run(&["jobs", "list", "--status", "dead", "--json"]).await;
    assert_eq!(code, Some(0));
    let dead: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["last_status"], 404);
    let id = dead[0]["id"].as_i64().unwrap().to_string();

    let (code, out, _) = run(&["jobs", "list"]).await;
    assert_eq!(code, Some(0));
    assert!(
        out.contains("dead") && out.contains("note hot leads") && out.contains("1 job(s)"),
        "{out}"
    );

    // Retry: the running daemon picks it up again (and it dies again: still a 404).
    let (code, out, err) = run(&["jobs", "retry", &id]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("back in line"));
    eventually("the retried job is sent again", || async {
        t.patches().await.len() == 2
    })
    .await;
    t.settle().await;
    let attempts = t
        .store()
        .attempts(dead[0]["id"].as_i64().unwrap())
        .await
        .unwrap();
    assert_eq!(attempts.len(), 2, "both attempts stay in the audit");

    let (code, _, err) = run(&["jobs", "discard", &id]).await;
    assert_eq!(code, Some(0), "{err}");
    let (code, out, _) = run(&["jobs", "list", "--status", "discarded", "--json"]).await;
    assert_eq!((code, out.lines().count()), (Some(0), 1));

    // Clear refusals.
    let (code, _, err) = run(&["jobs", "retry", "4242"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("no job 4242"), "{err}");
    let (code, _, err) = run(&["jobs", "list", "--status", "deadd"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("unknown job status \"deadd\""), "{err}");
    let (code, out, _) = run(&["jobs", "retry", "--all-dead"]).await;
    assert_eq!(code, Some(0));
    assert!(out.contains("0 dead job(s)"), "{out}");
}

#[test]
fn jobs_cli_refuses_a_database_that_is_not_autopilots() {
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.db");
    std::fs::write(&other, b"").unwrap();
    let out = autopilot()
        .args(["jobs", "list", "--db"])
        .arg(&other)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not an autopilot database"), "{err}");
    assert_eq!(
        std::fs::metadata(&other).unwrap().len(),
        0,
        "the file was not touched"
    );
}

#[test]
fn plan_lists_every_scheduled_patch_across_a_dst_change() {
    // No secrets set: plan reads only the config and contacts nothing.
    let out = autopilot()
        .args([
            "plan",
            "--config",
            "config/autopilot.toml",
            "--from",
            "2026-03-06",
            "--for",
            "4d",
            "--json",
        ])
        .env_remove("CONVIRZA_TOKEN")
        .env_remove("CONVIRZA_WEBHOOK_SECRET")
        .env_remove("GATEWAY_SECRET")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Fri 6 March: day + night; Mon 9 March (after the spring change): day + night.
    let summary: Vec<(String, String, String)> = lines
        .iter()
        .map(|l| {
            (
                l["at"].as_str().unwrap().to_string(),
                l["local"].as_str().unwrap().to_string(),
                l["rule"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                "2026-03-06T13:00:00Z".into(),
                "2026-03-06T08:00:00-05:00".into(),
                "day greeting".into()
            ),
            (
                "2026-03-06T23:00:00Z".into(),
                "2026-03-06T18:00:00-05:00".into(),
                "night greeting".into()
            ),
            (
                "2026-03-09T12:00:00Z".into(),
                "2026-03-09T08:00:00-04:00".into(),
                "day greeting".into()
            ),
            (
                "2026-03-09T22:00:00Z".into(),
                "2026-03-09T18:00:00-04:00".into(),
                "night greeting".into()
            ),
        ]
    );
    assert_eq!(lines[0]["agents"], serde_json::json!([101, 102]));
    assert_eq!(lines[1]["set"]["max_call_duration"], 180);

    let out = autopilot()
        .args([
            "plan",
            "--config",
            "config/autopilot.toml",
            "--from",
            "yesterday",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("--from \"yesterday\" is not an RFC 3339 time"));
}

#[test]
fn check_points_out_surprising_expressions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[platform]\nbase_url = \"http://x/v3\"\ntoken = { value = \"x\" }\n[[rules]]\nname = \"r\"\nschedule = { cron = \"18 * * * *\", timezone = \"UTC\" }\nagents = [1]\nset = { status = \"active\" }\n",
    )
    .unwrap();
    let out = autopilot()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("note: fires every hour at minute 18"),
        "{stdout}"
    );
    assert!(stdout.contains("(interval)"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_asks_the_running_daemon() {
    let t = crate::helpers::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    // The same daemon, as a config file whose listen address is the test app's port;
    // its secrets are not needed by healthcheck.
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"0.0.0.0:{}\"\n[platform]\nbase_url = \"http://x/v3\"\ntoken = {{ env = \"NOT_SET_FOR_HEALTHCHECK\" }}\n",
            t.addr.port()
        ),
    )
    .unwrap();
    let out = autopilot()
        .args(["healthcheck", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ready"));
    // A broken edit on disk (the daemon keeps its old config) does not fail the check.
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("garbage = [\n");
    std::fs::write(&config, text).unwrap();
    let out = autopilot()
        .args(["healthcheck", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not load"));
    drop(t);
    let closed = dir.path().join("closed.toml");
    std::fs::write(&closed, "[server]\nlisten = \"127.0.0.1:9\"\n[platform]\nbase_url = \"http://x/v3\"\ntoken = { value = \"x\" }\n").unwrap();
    let out = autopilot()
        .args(["healthcheck", "--config"])
        .arg(&closed)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}
