//! Running headless: /metrics, /readyz, the admin API, hot reload.

use crate::helpers::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;

async fn metrics_text(t: &TestApp) -> String {
    let r = t
        .http
        .get(format!("http://{}/metrics", t.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    r.text().await.unwrap()
}

/// The value of one series in a Prometheus text exposition.
fn series(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

#[tokio::test]
async fn metrics_count_deliveries_patches_and_jobs() {
    let t = spawn().await;
    t.know_active(101).await;
    let post_call = sample("post-call.json");
    assert_eq!(
        t.post("convirza", "application/json", post_call.clone(), &[])
            .await
            .status(),
        202
    );
    assert_eq!(
        t.post("convirza", "application/json", post_call, &[])
            .await
            .status(),
        200
    );
    let forged = json!({"event": "post_call", "static": {"auth_token": "wrong"}});
    assert_eq!(t.post_json("convirza", &forged).await.status(), 401);
    assert_eq!(t.post_json("nosuchsource", &forged).await.status(), 404);
    t.settle().await;

    let text = metrics_text(&t).await;
    let get = |s: &str| series(&text, s).unwrap_or_else(|| panic!("no {s} in:\n{text}"));
    assert_eq!(
        get("autopilot_deliveries_received_total{source=\"convirza\"}"),
        1.0
    );
    assert_eq!(
        get("autopilot_deliveries_duplicate_total{source=\"convirza\"}"),
        1.0
    );
    assert_eq!(
        get("autopilot_deliveries_rejected_total{source=\"convirza\",reason=\"unauthorized\"}"),
        1.0
    );
    // A made-up source name is not a label value.
    assert_eq!(
        get("autopilot_deliveries_rejected_total{source=\"\",reason=\"unknown_source\"}"),
        1.0
    );
    assert!(!text.contains("nosuchsource"));
    assert_eq!(
        get("autopilot_rule_fires_total{rule=\"note hot leads\",trigger=\"webhook\"}"),
        1.0
    );
    assert_eq!(get("autopilot_patch_attempts_total{class=\"2xx\"}"), 1.0);
    assert_eq!(get("autopilot_patch_duration_seconds_count"), 1.0);
    assert_eq!(get("autopilot_jobs{state=\"done\"}"), 1.0);
    assert_eq!(get("autopilot_jobs{state=\"pending\"}"), 0.0);
    assert_eq!(get("autopilot_dead_letters"), 0.0);
    assert_eq!(get("autopilot_oldest_due_job_age_seconds"), 0.0);
    assert!(get("autopilot_ingest_commits_total") >= 1.0);
    assert_eq!(
        get("autopilot_ingest_committed_deliveries_total"),
        1.0,
        "the duplicate is not counted"
    );
    assert_eq!(get("autopilot_config_last_reload_success"), 1.0);
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut parts = line.split(' ').skip(2);
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        assert!(name.starts_with("autopilot_"), "{line}");
        if kind == "counter" {
            assert!(name.ends_with("_total"), "{line}");
        }
    }
}

#[tokio::test]
async fn concurrent_deliveries_share_commits() {
    let t = spawn().await;
    let mut tasks = Vec::new();
    for i in 0..100 {
        let http = t.http.clone();
        let url = format!("http://{}/webhooks/convirza", t.addr);
        tasks.push(tokio::spawn(async move {
            let body = json!({"event": "post_call", "call_id": format!("c{i}"), "ai_voice_agent_id": 101,
                              "static": {"auth_token": STATIC_SECRET}});
            http.post(url).json(&body).send().await.unwrap().status()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 202);
    }
    let text = metrics_text(&t).await;
    let commits = series(&text, "autopilot_ingest_commits_total").unwrap();
    let committed = series(&text, "autopilot_ingest_committed_deliveries_total").unwrap();
    assert_eq!(committed, 100.0);
    assert!(
        commits < committed,
        "100 concurrent deliveries took {commits} commits: no batching"
    );
}

#[tokio::test]
async fn readyz_names_what_is_wrong() {
    let t = spawn_with(Options {
        manual_clock: Some("2026-12-01T12:00:00Z".parse().unwrap()),
        queue: "workers = 1\nready_max_due_age = \"5m\"\n".into(),
        ..Options::default()
    })
    .await;
    let (status, body) = t.readyz().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ready");
    assert_eq!(body["checks"]["database"], "ok");

    // The only worker is stuck on a platform that does not answer; a second job
    // becomes due and stays unsent.
    t.fault(json!({"delay_ms": 30000, "count": 1})).await;
    t.know_active(101).await;
    t.know_active(102).await;
    for agent in [101, 102] {
        let body = json!({"event": "post_call", "call_id": format!("stuck-{agent}"), "ai_voice_agent_id": agent,
                          "indicators": {"lead_quality": 95}, "static": {"auth_token": STATIC_SECRET}});
        assert_eq!(t.post_json("convirza", &body).await.status(), 202);
    }
    eventually("the worker is stuck", || async {
        !t.store()
            .jobs(Some("leased"), None)
            .await
            .unwrap()
            .is_empty()
    })
    .await;
    t.manual.as_ref().unwrap().advance(Duration::from_secs(400));
    eventually("readyz reports the stuck job", || async {
        let (status, body) = t.readyz().await;
        status == 503
            && body["problems"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p.as_str().unwrap().contains("due job has waited"))
    })
    .await;

    // The scheduler is alive (it ticks on the manual clock too); a stall would show up
    // as its own problem with the seconds since the last tick.
    let (_, body) = t.readyz().await;
    assert!(
        body["checks"]["scheduler_last_tick_seconds_ago"]
            .as_i64()
            .unwrap()
            <= 120
    );
}

#[tokio::test]
async fn readyz_fails_while_the_database_is_locked_by_another_process() {
    let t = spawn_with(Options {
        database_extra: "busy_timeout = \"200ms\"\n".into(),
        ..Options::default()
    })
    .await;
    let mut other = t.other_connection().await;
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut other)
        .await
        .unwrap();
    let (status, body) = t.readyz().await;
    assert_eq!(status, 503);
    assert!(body["problems"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p == "database is not writable"));
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
}

#[tokio::test]
async fn admin_api_is_off_without_a_token() {
    let t = spawn().await;
    assert!(t.app().admin_addr().is_none());
    // Nor is it reachable on the webhook port.
    let r = t
        .http
        .get(format!("http://{}/api/rules", t.addr))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn admin_api_needs_the_right_bearer_token() {
    let t = spawn_with(Options {
        admin: true,
        ..Options::default()
    })
    .await;
    let addr = t.app().admin_addr().unwrap();
    assert!(addr.ip().is_loopback());
    let url = format!("http://{addr}/api/rules");
    let missing = t.http.get(&url).send().await.unwrap();
    assert_eq!(missing.status(), 401);
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");
    let body: Value = missing.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("bearer token"));
    for wrong in [
        "nope",
        &ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1],
        &format!("{ADMIN_TOKEN}x"),
    ] {
        let r = t.http.get(&url).bearer_auth(wrong).send().await.unwrap();
        assert_eq!(r.status(), 401, "token {wrong:?}");
        let text = r.text().await.unwrap();
        assert!(!text.contains(ADMIN_TOKEN), "the token is never echoed");
    }
    let basic = t
        .http
        .get(&url)
        .basic_auth("admin", Some(ADMIN_TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 401, "only the bearer scheme");
    let right = t.admin(Method::GET, "/api/rules").send().await.unwrap();
    assert_eq!(right.status(), 200);
}

const SCHEDULED: &str = r#"
[[rules]]
name = "night greeting"
schedule = { cron = "0 18 * * *", timezone = "America/New_York" }
agents = [101, 102]
set = { greetings = "We are closed." }

[[shifts]]
name = "front desk"
timezone = "America/New_York"
agents = [103]
windows = [{ days = "mon-fri", from = "08:00", to = "17:00", set = { status = "active" } }]
otherwise = { status = "inactive" }
"#;

#[tokio::test]
async fn admin_api_rules_runs_jobs_agents_and_fire_now() {
    let t = spawn_with(Options {
        admin: true,
        rules: format!("{RULES}{SCHEDULED}"),
        ..Options::default()
    })
    .await;
    // Rules with their next fires; shifts with the stretch in force.
    let rules: Value = t.admin_json("/api/rules").await;
    let night = rules["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "night greeting")
        .unwrap();
    assert_eq!(night["kind"], "schedule");
    assert_eq!(night["timezone"], "America/New_York");
    assert_eq!(night["next_fires"].as_array().unwrap().len(), 3);
    assert!(night["next_fires"][0]["local"]
        .as_str()
        .unwrap()
        .contains("T18:00:00-0"));
    assert_eq!(rules["shifts"][0]["name"], "front desk");

    // Whether to send must be said: no live fire by default.
    let r = t
        .admin(Method::POST, "/api/rules/night%20greeting/fire")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("dry_run"));
    let r = t
        .admin(Method::GET, "/api/status?verbose=1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // A dry run answers the PATCHes and records nothing.
    let dry: Value = t
        .admin(Method::POST, "/api/rules/night%20greeting/fire")
        .json(&json!({"dry_run": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["patches"].as_array().unwrap().len(), 2, "{dry}");
    assert_eq!(dry["patches"][0]["fields"]["greetings"], "We are closed.");
    assert!(t
        .store()
        .runs(Some("night greeting"))
        .await
        .unwrap()
        .is_empty());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(t
        .patches()
        .await
        .iter()
        .all(|p| p["fields"]["greetings"] != "We are closed."));

    // Fired for real: recorded and sent.
    let r = t
        .admin(Method::POST, "/api/rules/night%20greeting/fire")
        .json(&json!({"dry_run": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let fired: Value = r.json().await.unwrap();
    assert_eq!(fired["jobs"], 2);
    eventually("both PATCHes arrive", || async {
        t.patches()
            .await
            .iter()
            .filter(|p| p["fields"]["greetings"] == "We are closed.")
            .count()
            == 2
    })
    .await;
    t.settle().await;

    // A webhook rule needs the delivery to evaluate.
    let r = t
        .admin(Method::POST, "/api/rules/note%20hot%20leads/fire")
        .json(&json!({"dry_run": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("payload"));
    let payload: Value = serde_json::from_slice(&sample("post-call.json")).unwrap();
    let dry: Value = t
        .admin(Method::POST, "/api/rules/note%20hot%20leads/fire")
        .json(&json!({"dry_run": true, "payload": payload}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(dry["patches"][0]["agent_id"], 101, "{dry}");
    let r = t
        .admin(Method::POST, "/api/rules/night%20greeting/fire")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("not valid JSON"),
        "{body}"
    );
    let r = t
        .admin(Method::POST, "/api/rules/night%20greeting/fire")
        .json(&json!({"dry_run": "yes"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = t
        .admin(Method::POST, "/api/rules/no%20such%20rule/fire")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.json::<Value>().await.unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("no rule named"));

    // The audit trail, filtered by rule and by agent, with the jobs' outcomes.
    let runs: Value = t.admin_json("/api/runs?rule=night%20greeting").await;
    let runs = runs["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1);
    assert!(runs[0]["detail"].as_str().unwrap().contains("admin API"));
    assert_eq!(runs[0]["jobs"].as_array().unwrap().len(), 2);
    assert!(runs[0]["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|j| j["status"] == "done"));
    let by_agent: Value = t.admin_json("/api/runs?agent=102").await;
    assert!(by_agent["runs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["agent_id"] == 102)));
    let future: Value = t.admin_json("/api/runs?since=2099-01-01T00:00:00Z").await;
    assert!(future["runs"].as_array().unwrap().is_empty());
    let bad = t
        .admin(Method::GET, "/api/runs?since=yesterday")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert!(bad.text().await.unwrap().contains("RFC 3339"));
    let garbled = t
        .admin(Method::GET, "/api/runs?limit=%FF")
        .send()
        .await
        .unwrap();
    assert_eq!(garbled.status(), 400);
    assert!(garbled.json::<Value>().await.unwrap()["error"].is_string());
    let typo = t
        .admin(Method::GET, "/api/runs?rules=x")
        .send()
        .await
        .unwrap();
    assert_eq!(typo.status(), 400);

    // Jobs by state; one job with its attempts; the agent's state and history.
    let done: Value = t.admin_json("/api/jobs?state=done").await;
    let done = done["jobs"].as_array().unwrap();
    assert!(done.len() >= 2);
    let id = done[0]["id"].as_i64().unwrap();
    let job: Value = t.admin_json(&format!("/api/jobs/{id}")).await;
    assert_eq!(job["attempts"][0]["http_status"], 200);
    let bad = t
        .admin(Method::GET, "/api/jobs?state=finished")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let agent: Value = t.admin_json("/api/agents/102").await;
    assert_eq!(
        agent["last_known"]["settings"]["greetings"],
        "We are closed."
    );
    assert_eq!(agent["last_known"]["origin"], "patch");
    assert_eq!(agent["history"][0]["fields"]["greetings"], "We are closed.");
    let unknown = t
        .admin(Method::GET, "/api/agents/999")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
}

#[tokio::test]
async fn admin_api_retries_and_discards_dead_jobs() {
    let t = spawn_with(Options {
        admin: true,
        queue: "max_attempts = 1\n".into(),
        ..Options::default()
    })
    .await;
    t.fault(json!({"status": 500, "count": 2})).await;
    t.know_active(101).await;
    t.know_active(102).await;
    for agent in [101, 102] {
        let body = json!({"event": "post_call", "call_id": format!("dead-{agent}"), "ai_voice_agent_id": agent,
                          "indicators": {"lead_quality": 95}, "static": {"auth_token": STATIC_SECRET}});
        assert_eq!(t.post_json("convirza", &body).await.status(), 202);
    }
    eventually("both jobs are dead", || async {
        t.store().jobs(Some("dead"), None).await.unwrap().len() == 2
    })
    .await;
    let dead = t.store().jobs(Some("dead"), None).await.unwrap();
    let (a, b) = (dead[0].id, dead[1].id);

    let r = t
        .admin(Method::POST, &format!("/api/jobs/{a}/retry"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    eventually("the retried job is sent", || async {
        t.store().job(a).await.unwrap().unwrap().status == "done"
    })
    .await;
    let r = t
        .admin(Method::POST, &format!("/api/jobs/{b}/discard"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap()["job"]["status"],
        "discarded"
    );
    // A done job cannot be retried; an unknown one is 404; a bad id is 400.
    let r = t
        .admin(Method::POST, &format!("/api/jobs/{a}/retry"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert!(r.json::<Value>().await.unwrap()["error"].is_string());
    let r = t
        .admin(Method::POST, "/api/jobs/99999/retry")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = t
        .admin(Method::POST, "/api/jobs/abc/retry")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = t
        .admin(Method::GET, "/api/jobs/1/retry")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
}

/// Waits for the app to have done `n` reload attempts in all.
async fn reloaded(t: &TestApp, ok: u64) {
    eventually("the config is reloaded", || async {
        t.app().live().status().reloads >= ok
    })
    .await;
}

fn replace_rules(config: &str, from: &str, to: &str) -> String {
    assert!(config.contains(from), "{from:?} not in the config");
    config.replace(from, to)
}

#[tokio::test]
async fn reload_in_place_rename_over_and_invalid() {
    let mut t = spawn().await;
    let path = t.watch_config_file().await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Written in place: a new rule takes effect.
    let v1 = replace_rules(
        &t.config_text,
        "set = { greetings = \"Hello, Seattle! How can I help?\" }",
        "set = { greetings = \"Hi Seattle, v1\" }",
    );
    std::fs::write(&path, &v1).unwrap();
    reloaded(&t, 1).await;
    let seattle = |call: &str| {
        json!({"event": "pre_call", "call_id": call, "caller_id": "+12065550100", "ai_voice_agent_id": 102,
               "static": {"auth_token": STATIC_SECRET}})
    };
    assert_eq!(t.post_json("convirza", &seattle("r1")).await.status(), 202);
    eventually("the reloaded greeting is sent", || async {
        t.patches()
            .await
            .iter()
            .any(|p| p["fields"]["greetings"] == "Hi Seattle, v1")
    })
    .await;

    // Saved by rename, as editors do.
    let v2 = v1.replace("Hi Seattle, v1", "Hi Seattle, v2");
    let tmp = path.with_file_name(".autopilot.toml.swp");
    std::fs::write(&tmp, &v2).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    reloaded(&t, 2).await;
    assert_eq!(t.post_json("convirza", &seattle("r2")).await.status(), 202);
    eventually("the renamed-over greeting is sent", || async {
        t.patches()
            .await
            .iter()
            .any(|p| p["fields"]["greetings"] == "Hi Seattle, v2")
    })
    .await;

    // Invalid: the old config keeps running; the error is in readyz and the metrics.
    std::fs::write(
        &path,
        v2.replace(
            "set = { greetings = \"Hi Seattle, v2\" }",
            "set = { greeting = \"typo\" }",
        ),
    )
    .unwrap();
    eventually("the failed reload is reported", || async {
        t.app().live().status().last_error.is_some()
    })
    .await;
    // Neither a FIFO (it would block the read) nor anything else but a file is read.
    let fifo = t.dir.path().join("fifo.toml");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let refused = t
        .app()
        .live()
        .reload(&fifo, &[], chrono::Utc::now())
        .unwrap_err();
    assert!(refused.contains("not a regular file"), "{refused}");
    std::fs::write(
        &path,
        v2.replace(
            "set = { greetings = \"Hi Seattle, v2\" }",
            "set = { greeting = \"typo\" }",
        ),
    )
    .unwrap();
    eventually("the typo is reported", || async {
        t.app()
            .live()
            .status()
            .last_error
            .is_some_and(|e| e.contains("greetings"))
    })
    .await;
    let err = t.app().live().status().last_error.unwrap();
    assert!(
        err.contains("autopilot.toml:") && err.contains("greetings"),
        "{err}"
    );
    let (_, ready) = t.readyz().await;
    assert_eq!(
        ready["status"], "ready",
        "a bad reload does not take the daemon out"
    );
    assert!(
        ready["warnings"][0]
            .as_str()
            .unwrap()
            .contains("reload failed"),
        "{ready}"
    );
    let text = metrics_text(&t).await;
    // The FIFO and the typo (seen once or twice: written twice).
    assert!(series(&text, "autopilot_config_reloads_total{result=\"failed\"}").unwrap() >= 2.0);
    assert_eq!(
        series(&text, "autopilot_config_last_reload_success"),
        Some(0.0)
    );
    assert_eq!(t.post_json("convirza", &seattle("r3")).await.status(), 202);
    eventually("v2 still runs", || async {
        t.patches()
            .await
            .iter()
            .filter(|p| p["fields"]["greetings"] == "Hi Seattle, v2")
            .count()
            == 2
    })
    .await;
}

#[tokio::test]
async fn reload_sees_a_kubernetes_symlink_swap() {
    let mut t = spawn().await;
    // The ConfigMap layout: autopilot.toml -> ..data/autopilot.toml, ..data -> ..v1.
    let conf = t.dir.path().join("k8s");
    std::fs::create_dir_all(conf.join("..v1")).unwrap();
    std::fs::write(conf.join("..v1/autopilot.toml"), &t.config_text).unwrap();
    std::os::unix::fs::symlink("..v1", conf.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/autopilot.toml", conf.join("autopilot.toml")).unwrap();
    let path = conf.join("autopilot.toml");
    t.app.as_mut().unwrap().watch_config(path, Vec::new());
    tokio::time::sleep(Duration::from_millis(100)).await;

    // The swap: a new directory, a new symlink renamed over ..data.
    let v2 = t
        .config_text
        .replace("Hello, Seattle! How can I help?", "Hello from the swap");
    std::fs::create_dir_all(conf.join("..v2")).unwrap();
    std::fs::write(conf.join("..v2/autopilot.toml"), &v2).unwrap();
    std::os::unix::fs::symlink("..v2", conf.join("..data_tmp")).unwrap();
    std::fs::rename(conf.join("..data_tmp"), conf.join("..data")).unwrap();
    reloaded(&t, 1).await;
    let body = json!({"event": "pre_call", "call_id": "k1", "caller_id": "+12065550100", "ai_voice_agent_id": 102,
                      "static": {"auth_token": STATIC_SECRET}});
    assert_eq!(t.post_json("convirza", &body).await.status(), 202);
    eventually("the swapped config is used", || async {
        t.patches()
            .await
            .iter()
            .any(|p| p["fields"]["greetings"] == "Hello from the swap")
    })
    .await;
}

#[tokio::test]
async fn reload_on_request_never_fires_an_unchanged_rule_again_and_reapplies_a_changed_shift() {
    // Tuesday 2026-12-01 17:59:50 in New York, then 18:00:30: the night rule fires; the
    // front desk shift is in its "otherwise" stretch (inactive).
    let mut t = spawn_with(Options {
        rules: SCHEDULED.into(),
        manual_clock: Some("2026-12-01T22:59:50Z".parse().unwrap()),
        ..Options::default()
    })
    .await;
    let path = t.watch_config_file().await;
    t.manual
        .as_ref()
        .unwrap()
        .set("2026-12-01T23:00:30Z".parse().unwrap());
    eventually("the night rule fires and the shift applies", || async {
        t.store().runs(Some("night greeting")).await.unwrap().len() == 1
            && t.store()
                .runs(Some("shift:front desk"))
                .await
                .unwrap()
                .len()
                == 1
    })
    .await;
    t.settle().await;

    // The same rules plus a new one, and the shift's evening setting changed; reloaded
    // by request (what SIGHUP does), not by the watcher.
    let changed = format!(
        "{}\n[[rules]]\nname = \"every minute\"\nschedule = {{ cron = \"* * * * *\", timezone = \"UTC\" }}\nagents = [101]\nset = {{ notification_time = 15 }}\n",
        t.config_text.replace(
            "otherwise = { status = \"inactive\" }",
            "otherwise = { status = \"inactive\", greetings = \"Front desk closed\" }"
        )
    );
    // Written where the watcher looks, then also requested: one or two reloads.
    std::fs::write(&path, &changed).unwrap();
    t.app().request_reload();
    reloaded(&t, 1).await;
    eventually("the changed shift is applied again", || async {
        t.patches()
            .await
            .iter()
            .any(|p| p["fields"]["greetings"] == "Front desk closed")
    })
    .await;
    // Recorded before the clock jumps a minute: a lease still open then would run out
    // (the attempt counted lost, the PATCH sent again).
    t.settle().await;
    t.manual.as_ref().unwrap().advance(Duration::from_secs(60));
    eventually("the new rule fires", || async {
        !t.store()
            .runs(Some("every minute"))
            .await
            .unwrap()
            .is_empty()
    })
    .await;
    t.settle().await;
    assert_eq!(
        t.store().runs(Some("night greeting")).await.unwrap().len(),
        1,
        "the unchanged rule did not fire again"
    );
    let shift_patches: Vec<Value> = t
        .patches()
        .await
        .into_iter()
        .filter(|p| p["path"] == "/v3/ai-voice-agents/103")
        .collect();
    // The first apply set status; the re-apply sent only the new field.
    assert_eq!(shift_patches.len(), 2, "{shift_patches:?}");
    assert_eq!(field_names(&shift_patches[1]), vec!["greetings"]);
}

#[tokio::test]
async fn shutdown_drains_an_in_flight_patch() {
    let mut t = spawn().await;
    t.fault(json!({"delay_ms": 800, "count": 1})).await;
    t.know_active(101).await;
    let r = t
        .post(
            "convirza",
            "application/json",
            sample("post-call.json"),
            &[],
        )
        .await;
    assert_eq!(r.status(), 202);
    eventually("the PATCH is in flight", || async {
        !t.store()
            .jobs(Some("leased"), None)
            .await
            .unwrap()
            .is_empty()
    })
    .await;
    t.shutdown().await;
    let store = autopilot::store::Store::open(&t.db_path()).await.unwrap();
    let jobs = store.jobs(None, None).await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        jobs[0].status, "done",
        "the in-flight PATCH finished before the exit"
    );
    assert_eq!(t.patches().await.len(), 1);
}

#[tokio::test]
async fn editing_a_rules_schedule_never_fires_it_at_once() {
    // 17:27:48 UTC: a rule that fires once a year.
    let mut t = spawn_with(Options {
        rules: "[[rules]]\nname = \"edited\"\nschedule = { cron = \"0 0 1 1 *\", timezone = \"UTC\" }\nagents = [103]\nset = { notification_time = 20 }\n".into(),
        manual_clock: Some("2026-12-03T17:27:48Z".parse().unwrap()),
        ..Options::default()
    })
    .await;
    let path = t.watch_config_file().await;
    t.manual
        .as_ref()
        .unwrap()
        .set("2026-12-03T17:29:30Z".parse().unwrap());
    // Edited to 17:28 daily: 17:28 today is before the edit, not a missed fire.
    std::fs::write(&path, t.config_text.replace("0 0 1 1 *", "28 17 * * *")).unwrap();
    reloaded(&t, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(t.store().runs(Some("edited")).await.unwrap().is_empty());
    // Tomorrow at 17:28 it fires.
    t.manual
        .as_ref()
        .unwrap()
        .set("2026-12-04T17:28:05Z".parse().unwrap());
    eventually("the edited rule fires at its new time", || async {
        t.store().runs(Some("edited")).await.unwrap().len() == 1
    })
    .await;
}
