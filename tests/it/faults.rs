//! 1,000 jobs across 20 agents while about 30% of the platform's answers are faults:
//! 500s, 429s with Retry-After, 3-second stalls beyond the 2-second timeout, and
//! connections dropped after the change was applied.

use crate::helpers::*;
use serde_json::json;
use std::collections::HashMap;
use std::fmt::Write;
use std::time::Duration;

const STEPS: usize = 50;
const AGENTS: i64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_jobs_through_thirty_percent_faults() {
    let mut rules = String::from(
        "[[sources]]\nname = \"s\"\nauth = { kind = \"static\", query = \"key\", secret = { value = \"k\" } }\nid = \"/id\"\n",
    );
    for i in 0..STEPS {
        write!(
            rules,
            "[[rules]]\nname = \"step {i}\"\nwebhook = {{ source = \"s\", match = {{ \"/step\" = {i} }} }}\nagent = \"/agent\"\nset = {{ more_information = \"step {i}\" }}\n"
        )
        .unwrap();
    }
    let t = spawn_with(Options {
        rules,
        queue: "workers = 8\nmax_attempts = 40\ninitial_backoff = \"10ms\"\nmax_backoff = \"200ms\"\nmax_retry_after = \"1s\"\n".into(),
        sim: autopilot::platform::sim::SimOptions {
            agents: Some((1..=AGENTS).map(|id| json!({"id": id})).collect()),
            ..Default::default()
        },
        ..Options::default()
    })
    .await;
    t.fault(json!([
        {"status": 500, "probability": 0.09, "count": 100000},
        {"status": 429, "retry_after": 1, "probability": 0.09, "count": 100000},
        {"drop": true, "probability": 0.1, "count": 100000},
        {"delay_ms": 3000, "probability": 0.02, "count": 100000},
    ]))
    .await;

    for step in 0..STEPS {
        for agent in 1..=AGENTS {
            let r = t
                .http
                .post(format!("http://{}/webhooks/s?key=k", t.addr))
                .json(&json!({"id": format!("{agent}-{step}"), "step": step, "agent": agent}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202);
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    loop {
        let open = t.store().jobs(Some("pending"), None).await.unwrap().len()
            + t.store().jobs(Some("leased"), None).await.unwrap().len();
        if open == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{open} jobs still open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Stalled requests are recorded by the simulator when they finally complete.
    tokio::time::sleep(Duration::from_millis(3500)).await;

    let jobs = t.store().jobs(None, None).await.unwrap();
    assert_eq!(jobs.len(), STEPS * AGENTS as usize);
    let not_done: Vec<_> = jobs.iter().filter(|j| j.status != "done").collect();
    assert!(not_done.is_empty(), "every job ends done: {not_done:?}");

    let requests = t.sim_requests().await;
    let faults = requests.iter().filter(|r| !r["fault"].is_null()).count();
    let share = faults as f64 / requests.len() as f64;
    assert!(
        share > 0.15,
        "the run saw real faults: {faults} of {}",
        requests.len()
    );

    // Per agent, PATCHes arrived in cause order (a retry repeats its step, never goes back).
    let mut arrivals: HashMap<i64, Vec<(String, usize)>> = HashMap::new();
    let mut sends: HashMap<(i64, usize), i64> = HashMap::new();
    for r in requests.iter().filter(|r| r["method"] == "PATCH") {
        let agent: i64 = r["path"]
            .as_str()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let step: usize = r["fields"]["more_information"].as_str().unwrap()[5..]
            .parse()
            .unwrap();
        arrivals
            .entry(agent)
            .or_default()
            .push((r["at"].as_str().unwrap().to_string(), step));
        *sends.entry((agent, step)).or_default() += 1;
    }
    for (agent, mut list) in arrivals {
        list.sort();
        let steps: Vec<usize> = list.iter().map(|(_, s)| *s).collect();
        assert!(
            steps.windows(2).all(|w| w[0] <= w[1]),
            "agent {agent} out of order: {steps:?}"
        );
        let mut distinct = steps.clone();
        distinct.dedup();
        assert_eq!(distinct, (0..STEPS).collect::<Vec<_>>(), "agent {agent}");
    }

    // Nothing was sent again after a 2xx was recorded: the platform saw exactly as many
    // sends of each job as the job has attempts, and the 2xx attempt is the last one.
    for j in &jobs {
        let step: usize = j.rule[5..].parse().unwrap();
        let attempts = t.store().attempts(j.id).await.unwrap();
        assert_eq!(attempts.len() as i64, j.attempts);
        assert_eq!(attempts.last().unwrap().outcome, "done", "job {}", j.id);
        assert_eq!(attempts.iter().filter(|a| a.outcome == "done").count(), 1);
        assert_eq!(
            sends.get(&(j.agent_id, step)),
            Some(&j.attempts),
            "job {} ({} step {step})",
            j.id,
            j.agent_id
        );
    }
}
