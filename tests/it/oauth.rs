//! OAuth login, single-flight refresh on expiry, fallback to login, persisted tokens.

use crate::helpers::*;
use serde_json::{json, Value};

fn login_options(password: &str) -> Options {
    Options {
        rules: step_rules(),
        queue: "workers = 8\nmax_attempts = 3\ninitial_backoff = \"20ms\"\nmax_backoff = \"100ms\"\n".into(),
        token: format!("{{ login = {{ email = \"ops@example.com\", password = {{ value = \"{password}\" }} }} }}"),
        oauth: true,
        sim: autopilot::platform::sim::SimOptions {
            agents: Some((101..=130).map(|id| json!({"id": id})).collect()),
            ..Default::default()
        },
        ..Options::default()
    }
}

fn step_rules() -> String {
    "[[sources]]\nname = \"s\"\nauth = { kind = \"static\", query = \"key\", secret = { value = \"k\" } }\nid = \"/id\"\n\
     [[rules]]\nname = \"note\"\nwebhook = { source = \"s\" }\nagent = \"/agent\"\nset = { more_information = \"seen\" }\n"
        .into()
}

async fn send(t: &TestApp, id: &str, agent: i64) {
    let r = t
        .http
        .post(format!("http://{}/webhooks/s?key=k", t.addr))
        .json(&json!({"id": id, "agent": agent}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
}

async fn oauth_counts(t: &TestApp) -> Value {
    t.http
        .get(t.sim_url("/_sim/oauth"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn twenty_jobs_meeting_an_expired_token_cause_exactly_one_refresh() {
    let mut t = spawn_with(login_options("sim-password")).await;
    send(&t, "warm", 101).await;
    t.settle().await;
    assert_eq!(oauth_counts(&t).await["logins"], 1);

    // Every access token dies; 20 jobs for 20 agents meet it at once.
    t.http
        .post(t.sim_url("/_sim/oauth/expire"))
        .send()
        .await
        .unwrap();
    for i in 0..20 {
        send(&t, &format!("job {i}"), 110 + i).await;
    }
    t.settle().await;
    let counts = oauth_counts(&t).await;
    assert_eq!(counts["refreshes"], 1, "{counts}");
    assert_eq!(counts["logins"], 1, "{counts}");
    let done = t.store().jobs(Some("done"), None).await.unwrap();
    assert_eq!(done.len(), 21);

    // The pair is persisted: a restart uses it, no new login.
    t.shutdown().await;
    t.start().await;
    send(&t, "after restart", 101).await;
    t.settle().await;
    let counts = oauth_counts(&t).await;
    assert_eq!(
        (counts["logins"].as_u64(), counts["refreshes"].as_u64()),
        (Some(1), Some(1)),
        "{counts}"
    );
}

#[tokio::test]
async fn a_dead_refresh_token_falls_back_to_login_but_not_twice_a_minute() {
    let mut opts = login_options("sim-password");
    opts.manual_clock = Some(chrono::Utc::now());
    let t = spawn_with(opts).await;
    send(&t, "warm", 101).await;
    t.settle().await;
    t.http
        .post(t.sim_url("/_sim/oauth/expire"))
        .json(&json!({"refresh": true}))
        .send()
        .await
        .unwrap();
    send(&t, "later", 102).await;
    // The refresh fails; logging in again must wait for the minute to pass.
    eventually("the job waits for the login window", || async {
        let jobs = t.store().jobs(Some("pending"), None).await.unwrap();
        jobs.len() == 1
            && jobs[0]
                .last_error
                .as_deref()
                .unwrap_or("")
                .contains("less than a minute ago")
    })
    .await;
    assert_eq!(oauth_counts(&t).await["logins"], 1);
    t.manual
        .as_ref()
        .unwrap()
        .advance(std::time::Duration::from_secs(61));
    t.settle().await;
    let counts = oauth_counts(&t).await;
    assert_eq!(counts["logins"], 2, "{counts}");
    assert_eq!(t.store().jobs(Some("done"), None).await.unwrap().len(), 2);
}

#[tokio::test]
async fn wrong_credentials_kill_the_job_with_the_reason_and_never_loop_on_login() {
    let t = spawn_with(login_options("wrong-password")).await;
    for i in 0..5 {
        send(&t, &format!("j{i}"), 101 + i).await;
    }
    eventually("every job has failed once", || async {
        let jobs = t.store().jobs(None, None).await.unwrap();
        jobs.len() == 5 && jobs.iter().all(|j| j.attempts >= 1 && j.status != "leased")
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let logins = t
        .sim_requests()
        .await
        .into_iter()
        .filter(|r| r["path"] == "/oauth/token")
        .count();
    assert_eq!(logins, 1, "login must not loop");
    let jobs = t.store().jobs(None, None).await.unwrap();
    let dead: Vec<_> = jobs.iter().filter(|j| j.status == "dead").collect();
    assert_eq!(dead.len(), 1, "{jobs:?}");
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("login to the platform failed"),
        "{:?}",
        dead[0].last_error
    );
    // The others wait for the next login window instead of hammering the endpoint.
    let soon = chrono::Utc::now() + chrono::Duration::seconds(30);
    assert!(jobs
        .iter()
        .filter(|j| j.status == "pending")
        .all(|j| j.next_attempt_at > soon));
}
