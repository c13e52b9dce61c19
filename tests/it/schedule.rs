use crate::helpers::*;
use chrono::{DateTime, Utc};
use std::time::Duration;

const NIGHT_AND_DAY: &str = r#"
[[rules]]
name = "night greeting"
schedule = { cron = "0 18 * * mon-fri", timezone = "America/New_York" }
agents = [101, 102]
set = { greetings = "We are closed.", max_call_duration = 180, config = { volume = 0.7 } }

[[rules]]
name = "day greeting"
schedule = { cron = "0 8 * * mon-fri", timezone = "America/New_York" }
agents = [101, 102]
set = { greetings = "Good morning!", max_call_duration = 300 }
"#;

fn at(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

async fn spawn_at(start: &str) -> TestApp {
    spawn_with(Options {
        rules: NIGHT_AND_DAY.into(),
        manual_clock: Some(at(start)),
        ..Options::default()
    })
    .await
}

#[tokio::test]
async fn cron_rule_patches_at_its_fire_time_in_its_zone() {
    // Monday 2026-11-30, 17:59:30 in New York (EST, UTC-5).
    let t = spawn_at("2026-11-30T22:59:30Z").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(t.patches().await.is_empty(), "nothing before 18:00");

    t.manual.as_ref().unwrap().set(at("2026-11-30T23:00:00Z"));
    eventually("both agents are patched", || async {
        t.patches().await.len() == 2
    })
    .await;
    t.settle().await;
    let patches = t.patches().await;
    let mut paths: Vec<_> = patches
        .iter()
        .map(|p| p["path"].as_str().unwrap().to_string())
        .collect();
    paths.sort();
    assert_eq!(
        paths,
        vec!["/v3/ai-voice-agents/101", "/v3/ai-voice-agents/102"]
    );
    for p in &patches {
        assert_eq!(
            field_names(p),
            vec!["config", "greetings", "max_call_duration"]
        );
        assert_eq!(p["fields"]["greetings"], "We are closed.");
        // config is the agent's known config with the rule's keys laid over it.
        let config: serde_json::Value =
            serde_json::from_str(p["fields"]["config"].as_str().unwrap()).unwrap();
        assert_eq!(config["volume"], 0.7);
        assert_eq!(
            config["background_noise"], false,
            "other config keys are kept"
        );
    }
    let runs = t.store().runs(Some("night greeting")).await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].scheduled_for, Some(at("2026-11-30T23:00:00Z")));
    // The night change is valid until the next day greeting: 08:00 EST = 13:00Z.
    let jobs = t.store().jobs(None, Some(101)).await.unwrap();
    assert_eq!(jobs[0].valid_until, Some(at("2026-12-01T13:00:00Z")));
}

#[tokio::test]
async fn a_restart_never_fires_an_instant_twice() {
    let mut t = spawn_at("2026-11-30T22:59:59Z").await;
    t.manual.as_ref().unwrap().set(at("2026-11-30T23:00:00Z"));
    eventually("fired", || async { t.patches().await.len() == 2 }).await;
    t.settle().await;
    t.shutdown().await;
    t.start().await;
    t.manual.as_ref().unwrap().set(at("2026-11-30T23:00:30Z"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        t.store().runs(Some("night greeting")).await.unwrap().len(),
        1
    );
    assert_eq!(t.patches().await.len(), 2);
}

#[tokio::test]
async fn a_missed_fire_inside_the_catch_up_window_runs_once() {
    let mut t = spawn_at("2026-11-30T12:59:00Z").await;
    // Fire the day greeting once so the rule has a last fire on record.
    t.manual.as_ref().unwrap().set(at("2026-11-30T13:00:00Z"));
    eventually("day fired", || async { t.patches().await.len() == 2 }).await;
    t.settle().await;
    t.shutdown().await;

    // Down over the night fire (23:00Z); back 10 minutes later: inside the 15m window.
    t.manual.as_ref().unwrap().set(at("2026-11-30T23:10:00Z"));
    t.start().await;
    eventually("night fired late", || async {
        t.patches().await.len() == 4
    })
    .await;
    let runs = t.store().runs(Some("night greeting")).await.unwrap();
    assert_eq!(runs.len(), 1);
    assert!(
        runs[0].detail.as_deref().unwrap_or("").contains("catch-up"),
        "{:?}",
        runs[0].detail
    );
    t.settle().await;
    t.shutdown().await;

    // Down over the next day fire (13:00Z) and back an hour late: recorded as missed, not sent.
    t.manual.as_ref().unwrap().set(at("2026-12-01T14:00:00Z"));
    t.start().await;
    eventually("the missed fire is recorded", || async {
        t.store().runs(Some("day greeting")).await.unwrap().len() == 2
    })
    .await;
    let runs = t.store().runs(Some("day greeting")).await.unwrap();
    assert_eq!(runs[1].decision, "skipped");
    assert!(
        runs[1].detail.as_deref().unwrap().contains("missed"),
        "{:?}",
        runs[1].detail
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(t.patches().await.len(), 4);
}

#[tokio::test]
async fn a_stale_scheduled_change_expires_instead_of_landing_late() {
    let t = spawn_at("2026-11-30T22:59:59Z").await;
    // The platform is down from the night fire until after the next day fire.
    t.fault(serde_json::json!({"status": 503, "count": 1000}))
        .await;
    t.manual.as_ref().unwrap().set(at("2026-11-30T23:00:00Z"));
    eventually("first attempts fail", || async {
        let jobs = t.store().jobs(Some("pending"), None).await.unwrap();
        jobs.len() == 2
            && jobs
                .iter()
                .all(|j| j.attempts >= 1 && j.last_status == Some(503))
    })
    .await;
    t.http
        .delete(t.sim_url("/_sim/faults"))
        .send()
        .await
        .unwrap();
    // 08:00 EST next day (13:00Z) passes before any retry happens.
    t.manual.as_ref().unwrap().set(at("2026-12-01T13:00:01Z"));
    eventually("night jobs expire", || async {
        t.store().jobs(Some("expired"), None).await.unwrap().len() == 2
    })
    .await;
    let landed: Vec<_> = t
        .patches()
        .await
        .into_iter()
        .filter(|p| p["status"] == 200 && p["fields"]["greetings"] == "We are closed.")
        .collect();
    assert!(
        landed.is_empty(),
        "the night greeting must not land in the morning"
    );
}

const SHIFT: &str = r#"
[[shifts]]
name = "front desk"
agents = [101]
timezone = "America/New_York"
windows = [{ days = "mon-fri", from = "08:00", to = "18:00", set = { greetings = "Good morning!" } }]
otherwise = { greetings = "We are closed." }
"#;

#[tokio::test]
async fn a_shift_puts_on_what_should_hold_now_after_downtime() {
    // Monday 2026-11-30 18:30 EST: the night (otherwise) holds since 18:00.
    let mut t = spawn_with(Options {
        rules: SHIFT.into(),
        manual_clock: Some(at("2026-11-30T23:30:00Z")),
        ..Options::default()
    })
    .await;
    eventually("night is put on at start", || async {
        t.patches().await.len() == 1
    })
    .await;
    t.settle().await;
    assert_eq!(t.sim_agent(101).await["greetings"], "We are closed.");
    t.shutdown().await;

    // Down until Tuesday 10:57: the day greeting goes on at once, not the night one, and
    // the 08:00 boundary missed while down is not replayed separately.
    t.manual.as_ref().unwrap().set(at("2026-12-01T15:57:00Z"));
    t.start().await;
    eventually("day is put on at 10:57", || async {
        t.patches().await.len() == 2
    })
    .await;
    t.settle().await;
    let patches = t.patches().await;
    assert_eq!(patches[1]["fields"]["greetings"], "Good morning!");
    assert_eq!(t.sim_agent(101).await["greetings"], "Good morning!");
    let runs = t.store().runs(Some("shift:front desk")).await.unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(
        runs[1].scheduled_for,
        Some(at("2026-12-01T13:00:00Z")),
        "keyed on the 08:00 boundary"
    );

    // A restart inside the same segment sends nothing again.
    t.shutdown().await;
    t.manual.as_ref().unwrap().set(at("2026-12-01T15:58:00Z"));
    t.start().await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(t.patches().await.len(), 2);

    // At 18:00 the night goes on while running.
    t.manual.as_ref().unwrap().set(at("2026-12-01T23:00:00Z"));
    eventually("night at 18:00", || async { t.patches().await.len() == 3 }).await;
    assert_eq!(
        t.patches().await[2]["fields"]["greetings"],
        "We are closed."
    );
}

#[tokio::test]
async fn a_shift_sends_only_fields_not_already_in_place() {
    let both = SHIFT
        .replace(
            "set = { greetings = \"Good morning!\" }",
            "set = { greetings = \"Good morning!\", max_call_duration = 300 }",
        )
        .replace(
            "otherwise = { greetings = \"We are closed.\" }",
            "otherwise = { greetings = \"We are closed.\", max_call_duration = 300 }",
        );
    let mut t = spawn_with(Options {
        rules: both,
        manual_clock: Some(at("2026-11-30T23:30:00Z")),
        ..Options::default()
    })
    .await;
    eventually("night is put on", || async { t.patches().await.len() == 1 }).await;
    t.settle().await;
    // Nothing known yet: every field of the set went out.
    assert_eq!(
        field_names(&t.patches().await[0]),
        vec!["greetings", "max_call_duration"]
    );
    t.shutdown().await;
    t.manual.as_ref().unwrap().set(at("2026-12-01T15:57:00Z"));
    t.start().await;
    eventually("day is put on", || async { t.patches().await.len() == 2 }).await;
    // The agent's known state already has max_call_duration 300: only greetings is sent.
    assert_eq!(field_names(&t.patches().await[1]), vec!["greetings"]);
}

#[tokio::test]
async fn a_restart_just_before_a_fire_still_fires_it_on_time_once() {
    let mut t = spawn_at("2026-11-30T22:58:00Z").await;
    t.shutdown().await;
    t.manual.as_ref().unwrap().set(at("2026-11-30T22:59:59Z"));
    t.start().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(t.patches().await.is_empty(), "nothing before 18:00");
    t.manual.as_ref().unwrap().set(at("2026-11-30T23:00:00Z"));
    eventually("fired at 18:00", || async { t.patches().await.len() == 2 }).await;
    let runs = t.store().runs(Some("night greeting")).await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].scheduled_for, Some(at("2026-11-30T23:00:00Z")));
    assert!(
        runs[0].detail.is_none(),
        "on time, not a catch-up: {:?}",
        runs[0].detail
    );
}
