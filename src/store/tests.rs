//! The group committer's batches, driven directly: the bulk path, copies inside one
//! batch, and the fallback to one savepoint per delivery when the bulk insert fails.

use super::*;
use serde_json::json;

fn delivery(key: &str, event_at: Option<DateTime<Utc>>) -> NewDelivery {
    NewDelivery {
        event_at,
        source: "s".into(),
        dedupe_key: format!("id:{key}"),
        received_at: Utc::now(),
        content_type: "json".into(),
        payload: json!({"call_id": key}),
    }
}

fn run(agents: &[i64]) -> NewRun {
    NewRun {
        rule: "r".into(),
        trigger: "webhook",
        scheduled_for: None,
        happened_at: Utc::now(),
        detail: None,
        skipped: 0,
        jobs: agents
            .iter()
            .map(|a| NewJob {
                agent_id: *a,
                fields: json!({"status": "inactive"}),
                guard: None,
                cause_at: Utc::now(),
                valid_until: None,
            })
            .collect(),
    }
}

fn pending(d: NewDelivery, runs: Vec<NewRun>) -> PendingDelivery {
    let (reply, _) = oneshot::channel();
    PendingDelivery {
        delivery: d,
        runs,
        reply,
    }
}

async fn count(store: &Store, table: &str) -> i64 {
    let sql = match table {
        "deliveries" => "SELECT COUNT(*) FROM deliveries",
        "rule_runs" => "SELECT COUNT(*) FROM rule_runs",
        _ => "SELECT COUNT(*) FROM jobs",
    };
    sqlx::query_scalar(sql)
        .fetch_one(&store.read)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_batch_is_written_in_bulk_with_copies_as_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("t.db")).await.unwrap();
    let batch = vec![
        pending(delivery("a", None), vec![run(&[1, 2])]),
        pending(delivery("b", None), vec![]),
        pending(delivery("a", None), vec![run(&[1, 2])]),
        pending(delivery("c", None), vec![run(&[3])]),
    ];
    let out: Vec<_> = commit_batch(&store.write, &batch)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(
        matches!(out[0], DeliveryOutcome::Accepted { jobs: 2, .. }),
        "{out:?}"
    );
    assert!(
        matches!(out[1], DeliveryOutcome::Accepted { jobs: 0, .. }),
        "{out:?}"
    );
    assert_eq!(out[2], DeliveryOutcome::Duplicate);
    assert!(
        matches!(out[3], DeliveryOutcome::Accepted { jobs: 1, .. }),
        "{out:?}"
    );
    assert_eq!(count(&store, "deliveries").await, 3);
    assert_eq!(count(&store, "rule_runs").await, 2);
    assert_eq!(count(&store, "jobs").await, 3);
    // The jobs hang off the right runs, and the runs off the right deliveries.
    let jobs = store.jobs(None, None).await.unwrap();
    let runs = store.runs(None).await.unwrap();
    let DeliveryOutcome::Accepted { delivery_id: c, .. } = out[3] else {
        unreachable!()
    };
    let run_c = runs.iter().find(|r| r.delivery_id == Some(c)).unwrap();
    assert_eq!(
        jobs.iter()
            .filter(|j| j.run_id == run_c.id)
            .map(|j| j.agent_id)
            .collect::<Vec<_>>(),
        vec![3]
    );
    assert_eq!(run_c.decision, "enqueued");
    // A later batch with a stored key: duplicate.
    let again = commit_batch(
        &store.write,
        &[
            pending(delivery("c", None), vec![run(&[3])]),
            pending(delivery("d", None), vec![]),
        ],
    )
    .await;
    assert_eq!(again[0].as_ref().unwrap(), &DeliveryOutcome::Duplicate);
    assert!(matches!(again[1], Ok(DeliveryOutcome::Accepted { .. })));
}

#[tokio::test]
async fn one_refused_delivery_falls_back_to_one_savepoint_each() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("t.db")).await.unwrap();
    sqlx::query(
        "CREATE TRIGGER refuse_bad BEFORE INSERT ON deliveries WHEN NEW.dedupe_key = 'id:bad'
         BEGIN SELECT RAISE(ABORT, 'refused'); END",
    )
    .execute(&store.write)
    .await
    .unwrap();
    let batch = vec![
        pending(delivery("ok-1", None), vec![run(&[1])]),
        pending(delivery("bad", None), vec![run(&[2])]),
        pending(delivery("ok-2", None), vec![run(&[3])]),
        pending(delivery("timed", Some(Utc::now())), vec![run(&[4])]),
    ];
    let out = commit_batch(&store.write, &batch).await;
    assert!(
        matches!(out[0], Ok(DeliveryOutcome::Accepted { jobs: 1, .. })),
        "{out:?}"
    );
    assert!(out[1].is_err(), "{out:?}");
    assert!(
        matches!(out[2], Ok(DeliveryOutcome::Accepted { jobs: 1, .. })),
        "{out:?}"
    );
    assert!(
        matches!(out[3], Ok(DeliveryOutcome::Accepted { jobs: 1, .. })),
        "{out:?}"
    );
    assert_eq!(count(&store, "deliveries").await, 3);
    assert_eq!(count(&store, "rule_runs").await, 3);
    assert_eq!(count(&store, "jobs").await, 3);
}
