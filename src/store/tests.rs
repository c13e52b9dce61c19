//! The group committer's batches, driven directly: the bulk path, copies inside one
//! batch, the fallback to one savepoint per delivery when the bulk insert fails, and the
//! queue's claims and outcomes sharing a batch with deliveries.

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

fn deliveries(list: Vec<PendingDelivery>) -> Batch {
    Batch {
        deliveries: list,
        ..Batch::default()
    }
}

fn claim(owner: &str) -> PendingClaim {
    let (reply, _) = oneshot::channel();
    PendingClaim {
        owner: owner.into(),
        now: Utc::now(),
        lease: Duration::from_secs(60),
        reply,
    }
}

fn finish(job: &ClaimedJob) -> PendingFinish {
    let (reply, _) = oneshot::channel();
    PendingFinish {
        job: job.clone(),
        finish: Finish {
            status: JobStatus::Done,
            next_attempt_at: None,
            http_status: Some(200),
            error: None,
            request_id: Some("req-1".into()),
            started_at: Utc::now(),
            finished_at: Utc::now(),
            new_state: Some(json!({"id": job.agent_id, "status": "inactive"})),
            attempted: true,
        },
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
    let out: Vec<_> = commit_batch(&store.write, &deliveries(batch))
        .await
        .deliveries
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
        &deliveries(vec![
            pending(delivery("c", None), vec![run(&[3])]),
            pending(delivery("d", None), vec![]),
        ]),
    )
    .await
    .deliveries;
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
    let out = commit_batch(&store.write, &deliveries(batch))
        .await
        .deliveries;
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

#[tokio::test]
async fn claims_and_outcomes_share_a_batch_with_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("t.db")).await.unwrap();
    // Two agents' jobs arrive in the same batch as three claims: the claims see them (the
    // deliveries go first), one job per agent, and the third claim finds nothing.
    let out = commit_batch(
        &store.write,
        &Batch {
            deliveries: vec![
                pending(delivery("a", None), vec![run(&[1])]),
                pending(delivery("b", None), vec![run(&[2, 1])]),
            ],
            claims: vec![claim("w1"), claim("w2"), claim("w3")],
            ..Batch::default()
        },
    )
    .await;
    assert!(
        out.deliveries.iter().all(Result::is_ok),
        "{:?}",
        out.deliveries
    );
    let claimed: Vec<ClaimedJob> = out
        .claims
        .into_iter()
        .map(Result::unwrap)
        .take(2)
        .map(Option::unwrap)
        .collect();
    let mut agents: Vec<i64> = claimed.iter().map(|j| j.agent_id).collect();
    agents.sort();
    assert_eq!(agents, vec![1, 2]);
    let leased = store.jobs(Some("leased"), None).await.unwrap();
    assert_eq!(leased.len(), 2);
    // Agent 1's outcome and the next claim in one batch: the outcome goes first, so the
    // claim finds agent 1's second job; the agent's new state is cached after the commit.
    let first = claimed.iter().find(|j| j.agent_id == 1).unwrap();
    let out = commit_batch(
        &store.write,
        &Batch {
            finishes: vec![finish(first)],
            claims: vec![claim("w1")],
            ..Batch::default()
        },
    )
    .await;
    assert!(matches!(out.finishes[..], [Ok(true)]), "{:?}", out.finishes);
    let next = out.claims.into_iter().next().unwrap().unwrap().unwrap();
    assert_eq!(next.agent_id, 1);
    assert_ne!(next.id, first.id);
    assert_eq!(store.attempts(first.id).await.unwrap().len(), 1);
    // The same outcome again: the lease is gone, nothing changes.
    let out = commit_batch(
        &store.write,
        &Batch {
            finishes: vec![finish(first)],
            ..Batch::default()
        },
    )
    .await;
    assert!(
        matches!(out.finishes[..], [Ok(false)]),
        "{:?}",
        out.finishes
    );
    assert_eq!(store.attempts(first.id).await.unwrap().len(), 1);
}

#[tokio::test]
async fn an_outcome_goes_through_the_committer_and_updates_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("t.db")).await.unwrap();
    store
        .record_delivery(&delivery("a", None), &[run(&[7])])
        .await
        .unwrap();
    assert_eq!(store.agent_state(7).await.unwrap(), None);
    let job = store
        .claim("w", Utc::now(), Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.agent_id, 7);
    let f = finish(&job).finish;
    assert!(store.finish(&job, &f).await.unwrap());
    assert_eq!(store.agent_state(7).await.unwrap(), f.new_state);
    let row = store.job(job.id).await.unwrap().unwrap();
    assert_eq!(row.status, "done");
}

#[tokio::test]
async fn a_claim_that_cannot_be_decoded_leaves_the_job_unleased() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("t.db")).await.unwrap();
    store
        .record_delivery(&delivery("a", None), &[run(&[1])])
        .await
        .unwrap();
    sqlx::query("UPDATE jobs SET fields = 'not json'")
        .execute(&store.write)
        .await
        .unwrap();
    let out = commit_batch(
        &store.write,
        &Batch {
            deliveries: vec![pending(delivery("b", None), vec![])],
            claims: vec![claim("w1")],
            ..Batch::default()
        },
    )
    .await;
    assert!(out.claims[0].is_err(), "{:?}", out.claims[0].as_ref().err());
    // Its savepoint was undone: the job is not leased (no lost attempt later), and the
    // delivery in the same batch committed.
    assert!(store.jobs(Some("leased"), None).await.unwrap().is_empty());
    assert!(matches!(
        out.deliveries[0],
        Ok(DeliveryOutcome::Accepted { .. })
    ));
    assert_eq!(count(&store, "deliveries").await, 2);
}

#[tokio::test]
async fn bulk_statements_pad_odd_sizes_and_split_long_lists() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("t.db")).await.unwrap();
    // Three deliveries (padded to four rows), one of them with a run of 300 jobs (two
    // statements: 256, then 44 padded to 64).
    let many: Vec<i64> = (1..=300).collect();
    let batch = vec![
        pending(delivery("x", None), vec![run(&[1])]),
        pending(delivery("y", None), vec![run(&many)]),
        pending(delivery("z", None), vec![]),
    ];
    let out: Vec<_> = commit_batch(&store.write, &deliveries(batch))
        .await
        .deliveries
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let jobs: Vec<usize> = out
        .iter()
        .map(|o| match o {
            DeliveryOutcome::Accepted { jobs, .. } => *jobs,
            DeliveryOutcome::Duplicate => usize::MAX,
        })
        .collect();
    assert_eq!(jobs, vec![1, 300, 0]);
    assert_eq!(count(&store, "deliveries").await, 3);
    assert_eq!(count(&store, "rule_runs").await, 2);
    assert_eq!(count(&store, "jobs").await, 301);
    // No padding row slipped in, and every job of y hangs off y's run.
    let runs = store.runs(None).await.unwrap();
    let DeliveryOutcome::Accepted { delivery_id: y, .. } = out[1] else {
        unreachable!()
    };
    let run_y = runs.iter().find(|r| r.delivery_id == Some(y)).unwrap();
    let of_y = sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM jobs WHERE run_id = ?")
        .bind(run_y.id)
        .fetch_one(&store.read)
        .await
        .unwrap();
    assert_eq!(of_y, 300);
}

#[tokio::test]
async fn of_two_copies_in_one_batch_the_first_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("t.db")).await.unwrap();
    let mut second = delivery("a", None);
    second.payload = json!({"call_id": "a", "copy": 2});
    let batch = vec![
        pending(delivery("b", None), vec![]),
        pending(delivery("a", None), vec![]),
        pending(second, vec![]),
    ];
    let out = commit_batch(&store.write, &deliveries(batch))
        .await
        .deliveries;
    assert!(
        matches!(out[1], Ok(DeliveryOutcome::Accepted { .. })),
        "{out:?}"
    );
    assert!(matches!(out[2], Ok(DeliveryOutcome::Duplicate)), "{out:?}");
    let stored: String =
        sqlx::query_scalar("SELECT payload FROM deliveries WHERE dedupe_key = 'id:a'")
            .fetch_one(&store.read)
            .await
            .unwrap();
    assert_eq!(stored, json!({"call_id": "a"}).to_string());
}
