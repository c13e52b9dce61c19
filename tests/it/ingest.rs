//! Ingest under pressure: a database that cannot commit, group commit, retention.

use crate::helpers::*;
use serde_json::json;

/// A delivery no rule matches: stored, but no job.
fn unmatched(call_id: &str) -> serde_json::Value {
    json!({
        "event": "post_call",
        "call_id": call_id,
        "ai_voice_agent_id": 101,
        "disposition": "ANSWERED",
        "static": {"auth_token": STATIC_SECRET}
    })
}

#[tokio::test]
async fn a_database_that_cannot_commit_gets_503_and_the_retry_is_stored_once() {
    let t = spawn_with(Options {
        database_extra: "busy_timeout = \"300ms\"\n".into(),
        ..Options::default()
    })
    .await;
    // Another process holds the write lock longer than our busy timeout.
    let mut other = t.other_connection().await;
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .unwrap();
    let r = t.post_json("convirza", &unmatched("locked-1")).await;
    assert_eq!(r.status(), 503);
    assert!(
        r.text().await.unwrap().contains("retry"),
        "the answer tells the sender to retry"
    );
    assert_eq!(t.store().delivery_count("convirza").await.unwrap(), 0);

    // The lock goes away; the sender's retry is stored, once.
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    let r = t.post_json("convirza", &unmatched("locked-1")).await;
    assert_eq!(r.status(), 202);
    let r = t.post_json("convirza", &unmatched("locked-1")).await;
    assert_eq!(r.status(), 200, "the second copy is a duplicate");
    assert_eq!(t.store().delivery_count("convirza").await.unwrap(), 1);
}

#[tokio::test]
async fn a_delivery_the_database_refuses_gets_503_and_never_a_2xx() {
    let t = spawn().await;
    // Another process makes every insert fail, as a full disk would.
    let mut other = t.other_connection().await;
    sqlx::query("CREATE TRIGGER no_more BEFORE INSERT ON deliveries BEGIN SELECT RAISE(ABORT, 'disk full (simulated)'); END")
        .execute(&mut other)
        .await
        .unwrap();
    let r = t.post_json("convirza", &unmatched("refused-1")).await;
    assert_eq!(r.status(), 503);
    assert_eq!(t.store().delivery_count("convirza").await.unwrap(), 0);
    // Readiness says so while it lasts.
    let (status, body) = t.readyz().await;
    assert_eq!(status, 503);
    assert!(
        body["problems"][0]
            .as_str()
            .unwrap()
            .contains("cannot be stored"),
        "{body}"
    );
    sqlx::query("DROP TRIGGER no_more")
        .execute(&mut other)
        .await
        .unwrap();
    let r = t.post_json("convirza", &unmatched("refused-1")).await;
    assert_eq!(r.status(), 202);
    assert_eq!(
        t.readyz().await.0,
        200,
        "ready again once a delivery is stored"
    );
}

#[tokio::test]
async fn concurrent_deliveries_are_all_committed_and_each_answered_once() {
    let t = spawn().await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let http = t.http.clone();
        let url = format!("http://{}/webhooks/convirza", t.addr);
        // One delivery in ten is a copy of the one before it, sent at the same moment.
        let n = if i % 10 == 1 { i - 1 } else { i };
        let call = format!("burst-{n}");
        tasks.push(tokio::spawn(async move {
            http.post(url)
                .json(&unmatched(&call))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    let accepted = statuses.iter().filter(|s| **s == 202).count();
    let duplicates = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(accepted + duplicates, 200, "{statuses:?}");
    assert_eq!(duplicates, 20, "one copy in ten is a duplicate");
    assert_eq!(
        t.store().delivery_count("convirza").await.unwrap(),
        accepted as i64
    );
}

#[tokio::test]
async fn deliveries_older_than_the_retention_are_pruned_and_then_no_longer_duplicates() {
    let t = spawn().await;
    t.know_active(101).await;
    // One delivery with a PATCH (its job finishes), one that matches no rule.
    let r = t
        .post(
            "convirza",
            "application/json",
            sample("post-call.json"),
            &[],
        )
        .await;
    assert_eq!(r.status(), 202);
    assert_eq!(
        t.post_json("convirza", &unmatched("old-1")).await.status(),
        202
    );
    t.settle().await;
    assert_eq!(
        t.post_json("convirza", &unmatched("old-1")).await.status(),
        200
    );

    // Nothing is younger than the cutoff in the past: nothing goes.
    let kept = t
        .store()
        .prune(chrono::Utc::now() - chrono::Duration::hours(1))
        .await
        .unwrap();
    assert_eq!(kept, Default::default());

    let pruned = t
        .store()
        .prune(chrono::Utc::now() + chrono::Duration::seconds(1))
        .await
        .unwrap();
    assert_eq!(pruned.deliveries, 2, "{pruned:?}");
    assert_eq!(pruned.jobs, 1, "{pruned:?}");
    assert!(pruned.runs >= 1, "{pruned:?}");
    assert_eq!(t.store().delivery_count("convirza").await.unwrap(), 0);
    assert_eq!(
        t.post_json("convirza", &unmatched("old-1")).await.status(),
        202,
        "past the retention a redelivery is new again"
    );
}

#[tokio::test]
async fn an_open_job_keeps_its_delivery_however_old() {
    let t = spawn_with(Options {
        queue: "max_attempts = 10\ninitial_backoff = \"1h\"\nmax_backoff = \"2h\"\n".into(),
        ..Options::default()
    })
    .await;
    // The platform refuses the PATCH and the retry is an hour away: the job stays open.
    t.fault(json!({"status": 500, "count": 1000})).await;
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
    eventually("the first attempt fails", || async {
        !t.patches().await.is_empty()
    })
    .await;
    let pruned = t
        .store()
        .prune(chrono::Utc::now() + chrono::Duration::seconds(1))
        .await
        .unwrap();
    assert_eq!(pruned.deliveries, 0, "{pruned:?}");
    assert_eq!(pruned.runs, 0, "{pruned:?}");
    assert_eq!(t.store().delivery_count("convirza").await.unwrap(), 1);
}

#[tokio::test]
async fn a_sender_that_trickles_its_body_gets_408_in_json() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = spawn_with(Options {
        server_extra: "request_timeout = \"300ms\"\n".into(),
        ..Options::default()
    })
    .await;
    let mut conn = tokio::net::TcpStream::connect(t.addr).await.unwrap();
    conn.write_all(
        b"POST /webhooks/convirza HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"event\":",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        conn.read_to_end(&mut answer),
    )
    .await
    .expect("answered and closed within the timeout")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"error\":"), "{answer}");
    assert_eq!(t.store().delivery_count("convirza").await.unwrap(), 0);
}
