use crate::helpers::*;
use serde_json::json;
use std::fmt::Write;
use std::time::Duration;

fn abandoned(call_id: i64, agent: i64) -> serde_json::Value {
    json!({"event": "post_call", "call_id": call_id, "disposition": "ABANDONED",
           "ai_voice_agent_id": agent, "static": {"auth_token": STATIC_SECRET}})
}

#[tokio::test]
async fn two_500s_then_200_is_delivered_on_the_third_attempt() {
    let t = spawn().await;
    // Known state first, so the only requests are the PATCH attempts.
    t.know_active(101).await;
    t.fault(json!({"status": 500, "count": 2})).await;
    assert_eq!(
        t.post_json("convirza", &abandoned(1, 101)).await.status(),
        202
    );
    t.settle().await;
    let jobs = t.store().jobs(None, None).await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].status, "done");
    assert_eq!(jobs[0].attempts, 3);
    assert_eq!(jobs[0].last_status, Some(200));
    let attempts = t.store().attempts(jobs[0].id).await.unwrap();
    let statuses: Vec<_> = attempts
        .iter()
        .map(|a| (a.attempt, a.http_status, a.outcome.as_str()))
        .collect();
    assert_eq!(
        statuses,
        vec![
            (1, Some(500), "pending"),
            (2, Some(500), "pending"),
            (3, Some(200), "done")
        ]
    );
    assert!(
        attempts.iter().all(|a| a.request_id.is_some()),
        "every attempt keeps the platform's request_id"
    );
    let patches = t.patches().await;
    assert_eq!(
        patches
            .iter()
            .map(|p| p["status"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![500, 500, 200]
    );
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let t = spawn().await;
    t.know_active(101).await;
    t.fault(json!({"status": 429, "retry_after": 1, "count": 1}))
        .await;
    assert_eq!(
        t.post_json("convirza", &abandoned(1, 101)).await.status(),
        202
    );
    t.settle().await;
    let patches = t.patches().await;
    assert_eq!(patches.len(), 2);
    let at = |i: usize| {
        chrono::DateTime::parse_from_rfc3339(patches[i]["at"].as_str().unwrap()).unwrap()
    };
    assert!(
        at(1) - at(0) >= chrono::Duration::milliseconds(950),
        "waited {:?}",
        at(1) - at(0)
    );
}

#[tokio::test]
async fn unknown_agent_is_dead_after_one_attempt() {
    let t = spawn().await;
    let body = json!({"event": "post_call", "call_id": 1, "indicators": {"lead_quality": 99},
                      "ai_voice_agent_id": 999, "static": {"auth_token": STATIC_SECRET}});
    assert_eq!(t.post_json("convirza", &body).await.status(), 202);
    t.settle().await;
    let jobs = t.store().jobs(None, None).await.unwrap();
    assert_eq!(jobs[0].status, "dead");
    assert_eq!(jobs[0].attempts, 1);
    assert_eq!(jobs[0].last_status, Some(404));
    assert!(jobs[0].request_id.is_some());
    assert!(
        jobs[0].last_error.as_deref().unwrap().contains("404"),
        "{:?}",
        jobs[0].last_error
    );
    assert_eq!(t.patches().await.len(), 1);
}

#[tokio::test]
async fn retries_stop_at_max_attempts() {
    let t = spawn().await;
    t.know_active(101).await;
    t.fault(json!({"status": 503, "count": 10})).await;
    assert_eq!(
        t.post_json("convirza", &abandoned(1, 101)).await.status(),
        202
    );
    t.settle().await;
    let jobs = t.store().jobs(None, None).await.unwrap();
    assert_eq!(jobs[0].status, "dead");
    assert_eq!(jobs[0].attempts, 5, "max_attempts = 5 in the test config");
    assert_eq!(t.patches().await.len(), 5);
}

/// Rules that each set a distinct value, so the order PATCHes arrive in is visible.
fn step_rules(n: usize) -> String {
    let mut rules = String::from(
        "[[sources]]\nname = \"s\"\nauth = { kind = \"static\", query = \"key\", secret = { value = \"k\" } }\nid = \"/id\"\n",
    );
    for i in 0..n {
        write!(
            rules,
            "[[rules]]\nname = \"step {i}\"\nwebhook = {{ source = \"s\", match = {{ \"/step\" = {i} }} }}\nagent = \"/agent\"\nset = {{ more_information = \"step {i}\" }}\n"
        )
        .unwrap();
    }
    rules
}

#[tokio::test]
async fn one_agent_one_line_in_cause_order() {
    let t = spawn_with(Options {
        rules: step_rules(6),
        ..Options::default()
    })
    .await;
    // Every PATCH takes 150 ms: were two in flight for one agent, they would overlap.
    t.fault(json!({"delay_ms": 150, "count": 6, "path_contains": "/101"}))
        .await;
    for i in 0..6 {
        for agent in [101, 102] {
            let r = t
                .http
                .post(format!("http://{}/webhooks/s?key=k", t.addr))
                .json(&json!({"id": format!("{agent}-{i}"), "step": i, "agent": agent}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202);
        }
    }
    t.settle().await;
    let patches = t.patches().await;
    for agent in [101, 102] {
        let mine: Vec<_> = patches
            .iter()
            .filter(|p| p["path"] == format!("/v3/ai-voice-agents/{agent}"))
            .collect();
        let steps: Vec<_> = mine
            .iter()
            .map(|p| p["fields"]["more_information"].as_str().unwrap())
            .collect();
        assert_eq!(
            steps,
            (0..6).map(|i| format!("step {i}")).collect::<Vec<_>>(),
            "agent {agent}"
        );
        if agent == 101 {
            for pair in mine.windows(2) {
                let a =
                    chrono::DateTime::parse_from_rfc3339(pair[0]["at"].as_str().unwrap()).unwrap();
                let b =
                    chrono::DateTime::parse_from_rfc3339(pair[1]["at"].as_str().unwrap()).unwrap();
                assert!(
                    b - a >= chrono::Duration::milliseconds(140),
                    "two PATCHes for one agent overlapped"
                );
            }
        }
    }
}

#[tokio::test]
async fn a_crash_mid_send_loses_nothing() {
    let mut t = spawn_with(Options {
        queue: "workers = 2\nmax_attempts = 5\ninitial_backoff = \"20ms\"\nmax_backoff = \"100ms\"\nlease = \"7s\"\n".into(),
        ..Options::default()
    })
    .await;
    t.know_active(101).await;
    // The platform hangs on the first PATCH; the app dies while it waits.
    t.fault(json!({"delay_ms": 1500, "count": 1})).await;
    assert_eq!(
        t.post_json("convirza", &abandoned(1, 101)).await.status(),
        202
    );
    eventually("the job is leased", || async {
        t.store().jobs(Some("leased"), None).await.unwrap().len() == 1
    })
    .await;
    t.kill().await;

    // Started again on the same database: the job's lease runs out and it is sent.
    t.start().await;
    let jobs = t.store().jobs(None, None).await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        jobs[0].status, "leased",
        "the dead process's lease still holds"
    );
    eventually("the job is delivered after the lease runs out", || async {
        t.store().jobs(Some("done"), None).await.unwrap().len() == 1
    })
    .await;
    let job = &t.store().jobs(None, None).await.unwrap()[0];
    assert_eq!(job.attempts, 2, "the crashed attempt is counted");
    let attempts = t.store().attempts(job.id).await.unwrap();
    let outcomes: Vec<_> = attempts
        .iter()
        .map(|a| (a.attempt, a.outcome.as_str()))
        .collect();
    assert_eq!(
        outcomes,
        vec![(1, "lost"), (2, "done")],
        "the lost attempt has its row"
    );
}

#[tokio::test]
async fn a_second_app_on_the_same_database_is_refused() {
    let t = spawn().await;
    let err = autopilot::app::App::start(
        t.config(),
        t.clock.clone(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .err()
    .expect("second instance must fail");
    let msg = format!("{err:#}");
    assert!(msg.contains("in use by another autopilot process"), "{msg}");
    assert!(
        msg.contains(&std::process::id().to_string()),
        "names the holder's pid: {msg}"
    );
}

#[tokio::test]
async fn graceful_shutdown_then_restart_keeps_pending_jobs() {
    let mut t = spawn().await;
    t.know_active(101).await;
    t.fault(json!({"status": 503, "retry_after": 3, "count": 1}))
        .await;
    assert_eq!(
        t.post_json("convirza", &abandoned(1, 101)).await.status(),
        202
    );
    eventually("the first attempt fails", || async {
        t.patches().await.len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    t.shutdown().await;
    t.start().await;
    t.settle().await;
    let jobs = t.store().jobs(None, None).await.unwrap();
    assert_eq!(jobs[0].status, "done");
    assert_eq!(jobs[0].attempts, 2);
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_patch_finish() {
    let mut t = spawn().await;
    t.know_active(101).await;
    t.fault(json!({"delay_ms": 800, "count": 1})).await;
    assert_eq!(
        t.post_json("convirza", &abandoned(1, 101)).await.status(),
        202
    );
    eventually("the PATCH is in flight", || async {
        t.store().jobs(Some("leased"), None).await.unwrap().len() == 1
    })
    .await;
    t.shutdown().await;
    let store = autopilot::store::Store::open(&t.db_path()).await.unwrap();
    let jobs = store.jobs(None, None).await.unwrap();
    store.close().await;
    assert_eq!(
        jobs[0].status, "done",
        "the in-flight PATCH finished before exit"
    );
}

#[tokio::test]
async fn shutdown_grace_cuts_off_a_slow_patch_and_requeues_it() {
    let mut t = spawn_with(Options {
        queue: "workers = 1\nmax_attempts = 5\ninitial_backoff = \"20ms\"\nmax_backoff = \"100ms\"\nshutdown_grace = \"100ms\"\n".into(),
        ..Options::default()
    })
    .await;
    t.know_active(101).await;
    t.fault(json!({"delay_ms": 1500, "count": 1})).await;
    assert_eq!(
        t.post_json("convirza", &abandoned(1, 101)).await.status(),
        202
    );
    eventually("the PATCH is in flight", || async {
        t.store().jobs(Some("leased"), None).await.unwrap().len() == 1
    })
    .await;
    t.shutdown().await;
    let store = autopilot::store::Store::open(&t.db_path()).await.unwrap();
    let jobs = store.jobs(None, None).await.unwrap();
    store.close().await;
    assert_eq!(jobs[0].status, "pending");
    assert!(jobs[0]
        .last_error
        .as_deref()
        .unwrap()
        .contains("interrupted by shutdown"));
    // The next start sends it at once (no lease to wait out).
    t.start().await;
    t.settle().await;
    assert_eq!(t.store().jobs(None, None).await.unwrap()[0].status, "done");
}

#[tokio::test]
async fn requests_per_second_spaces_out_patches() {
    let t = spawn_with(Options {
        rules: step_rules(1),
        queue:
            "workers = 8\nmax_attempts = 5\ninitial_backoff = \"20ms\"\nmax_backoff = \"100ms\"\n"
                .into(),
        platform_extra: "requests_per_second = 20\n".into(),
        ..Options::default()
    })
    .await;
    for agent in 101..=110 {
        let r = t
            .http
            .post(format!("http://{}/webhooks/s?key=k", t.addr))
            .json(&json!({"id": agent, "step": 0, "agent": agent}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    t.settle().await;
    let mut at: Vec<_> = t
        .patches()
        .await
        .iter()
        .map(|p| chrono::DateTime::parse_from_rfc3339(p["at"].as_str().unwrap()).unwrap())
        .collect();
    at.sort();
    // 10 requests at 20/s take at least 9 intervals of 50 ms.
    assert_eq!(at.len(), 10);
    assert!(
        at[9] - at[0] >= chrono::Duration::milliseconds(430),
        "{:?}",
        at[9] - at[0]
    );
}

#[tokio::test]
async fn the_lock_follows_the_file_not_the_name() {
    let t = spawn().await;
    let alias = t.dir.path().join("alias.db");
    std::os::unix::fs::symlink(t.db_path(), &alias).unwrap();
    let mut config = t.config();
    config.database.path = alias;
    let err = autopilot::app::App::start(
        config,
        t.clock.clone(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .err()
    .expect("a second instance through a symlink must fail");
    assert!(format!("{err:#}").contains("in use by another autopilot process"));
}

#[tokio::test]
async fn a_retried_patch_never_attaches_a_file_twice() {
    let files = tempfile::tempdir().unwrap();
    let guide = files.path().join("night-guide.txt");
    std::fs::write(&guide, "Escalate urgent calls to the on-call manager.").unwrap();
    let rules = format!(
        "[[sources]]\nname = \"s\"\nauth = {{ kind = \"static\", query = \"key\", secret = {{ value = \"k\" }} }}\nid = \"/id\"\n\
         [[rules]]\nname = \"attach the night guide\"\nwebhook = {{ source = \"s\" }}\nagent = \"/agent\"\nset = {{ files = [{:?}], notification_time = 30 }}\n",
        guide.display().to_string()
    );
    let t = spawn_with(Options {
        rules,
        ..Options::default()
    })
    .await;
    // The platform applies the first PATCH, then the connection breaks: the outcome is
    // unknown to autopilot, which must retry without attaching the file again.
    t.fault(json!({"drop": true, "count": 1, "path_contains": "/101"}))
        .await;
    let r = t
        .http
        .post(format!("http://{}/webhooks/s?key=k", t.addr))
        .json(&json!({"id": 1, "agent": 101}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    t.settle().await;
    let agent = t.sim_agent(101).await;
    let listed: Vec<_> = agent["knowledgebase_files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| *f == "night-guide.txt")
        .collect();
    assert_eq!(listed.len(), 1, "{agent}");
    let jobs = t.store().jobs(None, None).await.unwrap();
    assert_eq!((jobs[0].status.as_str(), jobs[0].attempts), ("done", 2));
    let patches = t.patches().await;
    assert_eq!(patches.len(), 2, "the retry still sends the other field");
    assert_eq!(
        patches[0]["fields"]["files"],
        json!({"filename": "night-guide.txt"})
    );
    assert!(
        patches[1]["fields"].get("files").is_none(),
        "{}",
        patches[1]
    );
    assert_eq!(patches[1]["fields"]["notification_time"], "30");
}
