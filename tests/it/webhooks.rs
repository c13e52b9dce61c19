use crate::helpers::*;
use serde_json::json;

/// Signature of tests/data/webhooks/post-call.json under HMAC_KEY, computed with
/// `openssl dgst -sha256 -hmac whsec-test-key -hex post-call.json` (not by our code).
const POST_CALL_SIG: &str = "e1e5f933575893d19abeb0f4ae557e0a9be24565c71d6b84cf95fbe9e70bf4e4";

#[tokio::test]
async fn post_call_sample_sends_exactly_the_rules_fields() {
    let t = spawn().await;
    let r = t
        .post(
            "convirza",
            "application/json",
            sample("post-call.json"),
            &[],
        )
        .await;
    assert_eq!(r.status(), 202);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["jobs"], 1, "{body}");
    eventually("a PATCH arrives", || async {
        !t.patches().await.is_empty()
    })
    .await;
    t.settle().await;
    let patches = t.patches().await;
    assert_eq!(patches.len(), 1);
    let p = &patches[0];
    assert_eq!(p["path"], "/v3/ai-voice-agents/101");
    assert_eq!(p["status"], 200);
    assert_eq!(field_names(p), vec!["more_information"]);
    assert_eq!(
        p["fields"]["more_information"],
        "Last caller was a hot lead: offer a demo."
    );
    // The returned agent is stored as its freshest known state.
    let state = t.store().agent_state(101).await.unwrap().unwrap();
    assert_eq!(
        state["more_information"],
        "Last caller was a hot lead: offer a demo."
    );
    let jobs = t.store().jobs(Some("done"), None).await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert!(
        jobs[0].request_id.is_some(),
        "the platform's request_id is kept"
    );
}

#[tokio::test]
async fn pre_call_form_sample_is_authenticated_by_its_plain_field() {
    let t = spawn().await;
    let r = t
        .post(
            "convirza",
            "application/x-www-form-urlencoded",
            sample("pre-call.form"),
            &[],
        )
        .await;
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    eventually("a PATCH arrives", || async {
        !t.patches().await.is_empty()
    })
    .await;
    t.settle().await;
    let patches = t.patches().await;
    assert_eq!(patches.len(), 1);
    assert_eq!(patches[0]["path"], "/v3/ai-voice-agents/101");
    assert_eq!(field_names(&patches[0]), vec!["greetings"]);
    assert_eq!(
        patches[0]["fields"]["greetings"],
        "Hello, Seattle! How can I help?"
    );
}

#[tokio::test]
async fn stored_delivery_does_not_keep_the_static_secret() {
    let t = spawn().await;
    t.post(
        "convirza",
        "application/json",
        sample("post-call.json"),
        &[],
    )
    .await;
    let db = std::fs::read(t.db_path()).unwrap();
    let wal = std::fs::read(t.db_path().with_extension("db-wal")).unwrap_or_default();
    let hay = [db, wal].concat();
    assert!(
        !hay.windows(STATIC_SECRET.len())
            .any(|w| w == STATIC_SECRET.as_bytes()),
        "the static secret was written to the database"
    );
}

#[tokio::test]
async fn hmac_signed_sample_over_raw_bytes() {
    let t = spawn().await;
    let sig = format!("sha256={POST_CALL_SIG}");
    let r = t
        .post(
            "gateway",
            "application/json",
            sample("post-call.json"),
            &[("X-Signature", &sig)],
        )
        .await;
    assert_eq!(r.status(), 202);
    eventually("a PATCH arrives", || async {
        !t.patches().await.is_empty()
    })
    .await;
    t.settle().await;
    let p = &t.patches().await[0];
    assert_eq!(
        field_names(p),
        vec!["max_call_duration", "notification_time"]
    );
    assert_eq!(p["fields"]["max_call_duration"], "600");

    // The same JSON re-serialized (no trailing newline, other spacing) fails under the
    // signature of the original bytes.
    let v: serde_json::Value = serde_json::from_slice(&sample("post-call.json")).unwrap();
    let r = t
        .post(
            "gateway",
            "application/json",
            serde_json::to_vec(&v).unwrap(),
            &[("X-Signature", &sig)],
        )
        .await;
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn bad_or_missing_auth_is_401_and_stores_nothing() {
    let t = spawn().await;
    let wrong_static = String::from_utf8(sample("post-call.json"))
        .unwrap()
        .replace(STATIC_SECRET, "guess");
    let no_static = json!({"event": "post_call", "call_id": 5, "disposition": "ABANDONED", "ai_voice_agent_id": 101});
    type Case<'a> = (&'a str, &'a str, Vec<u8>, Vec<(&'a str, &'a str)>);
    let cases: Vec<Case> = vec![
        (
            "convirza",
            "application/json",
            wrong_static.into_bytes(),
            vec![],
        ),
        (
            "convirza",
            "application/json",
            serde_json::to_vec(&no_static).unwrap(),
            vec![],
        ),
        (
            "convirza",
            "application/x-www-form-urlencoded",
            b"event=pre_call&ai_voice_agent_id=101&auth_token=nope".to_vec(),
            vec![],
        ),
        (
            "gateway",
            "application/json",
            sample("post-call.json"),
            vec![],
        ),
        (
            "gateway",
            "application/json",
            sample("post-call.json"),
            vec![("X-Signature", "sha256=00ff")],
        ),
        (
            "gateway",
            "application/json",
            sample("post-call.json"),
            vec![("X-Signature", POST_CALL_SIG)],
        ),
        (
            "ops",
            "application/json",
            br#"{"action":"resume","agent":101}"#.to_vec(),
            vec![],
        ),
        (
            "ops",
            "application/json",
            br#"{"action":"resume","agent":101}"#.to_vec(),
            vec![("Authorization", "Basic b3BzOndyb25n")],
        ),
    ];
    for (source, ct, body, headers) in cases {
        let r = t.post(source, ct, body, &headers).await;
        assert_eq!(r.status(), 401, "{source} {headers:?}");
        let text = r.text().await.unwrap();
        assert_eq!(text, r#"{"error":"unauthorized"}"#);
    }
    for s in ["convirza", "gateway", "ops"] {
        assert_eq!(t.store().delivery_count(s).await.unwrap(), 0, "{s}");
    }
    assert!(t.store().runs(None).await.unwrap().is_empty());
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(t.patches().await.is_empty());

    // And the right basic credentials pass: ops:hunter2-basic.
    let r = t
        .post(
            "ops",
            "application/json",
            br#"{"action":"resume","agent":101}"#.to_vec(),
            &[("Authorization", "Basic b3BzOmh1bnRlcjItYmFzaWM=")],
        )
        .await;
    assert_eq!(r.status(), 202);
}

#[tokio::test]
async fn duplicate_delivery_causes_one_patch() {
    let t = spawn().await;
    for _ in 0..3 {
        let r = t
            .post(
                "convirza",
                "application/json",
                sample("post-call.json"),
                &[],
            )
            .await;
        assert!(r.status().is_success());
    }
    // Same call_id, different bytes: still the same delivery.
    let mut v: serde_json::Value = serde_json::from_slice(&sample("post-call.json")).unwrap();
    v["caller_name"] = json!("SOMEONE ELSE");
    let r = t.post_json("convirza", &v).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["status"],
        "duplicate"
    );
    eventually("a PATCH arrives", || async {
        !t.patches().await.is_empty()
    })
    .await;
    t.settle().await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(t.patches().await.len(), 1);
    assert_eq!(t.store().delivery_count("convirza").await.unwrap(), 1);

    // A source without `id` dedupes on the body hash.
    let sig = format!("sha256={POST_CALL_SIG}");
    for _ in 0..2 {
        let r = t
            .post(
                "gateway",
                "application/json",
                sample("post-call.json"),
                &[("X-Signature", &sig)],
            )
            .await;
        assert!(r.status().is_success());
    }
    assert_eq!(t.store().delivery_count("gateway").await.unwrap(), 1);
}

#[tokio::test]
async fn when_false_sends_nothing() {
    let t = spawn().await;
    let abandoned = |call_id: i64| {
        json!({"event": "post_call", "call_id": call_id, "disposition": "ABANDONED",
               "ai_voice_agent_id": 103, "static": {"auth_token": STATIC_SECRET}})
    };
    assert_eq!(t.post_json("convirza", &abandoned(1)).await.status(), 202);
    eventually("first pause lands", || async {
        t.patches().await.len() == 1
    })
    .await;
    t.settle().await;
    assert_eq!(t.sim_agent(103).await["status"], "inactive");

    // The agent is now known to be inactive: `when = { status = "active" }` is false.
    assert_eq!(t.post_json("convirza", &abandoned(2)).await.status(), 202);
    t.settle().await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(t.patches().await.len(), 1, "no second PATCH");
    let runs = t
        .store()
        .runs(Some("pause after abandoned calls"))
        .await
        .unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[1].decision, "skipped");
    assert!(
        runs[1].detail.as_deref().unwrap().contains("status"),
        "{:?}",
        runs[1].detail
    );
}

#[tokio::test]
async fn when_reads_the_agent_with_a_get_when_nothing_is_known() {
    let t = spawn().await;
    let body = json!({"event": "post_call", "call_id": 9, "disposition": "NO ANSWER",
                      "ai_voice_agent_id": 102, "static": {"auth_token": STATIC_SECRET}});
    assert_eq!(t.post_json("convirza", &body).await.status(), 202);
    eventually("a PATCH arrives", || async {
        !t.patches().await.is_empty()
    })
    .await;
    let reqs = t.sim_requests().await;
    let methods: Vec<_> = reqs
        .iter()
        .map(|r| r["method"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        methods,
        vec!["GET", "PATCH"],
        "the unknown agent is read first"
    );
}

#[tokio::test]
async fn http_errors_are_clear() {
    let t = spawn().await;
    let r = t
        .post("nope", "application/json", b"{}".to_vec(), &[])
        .await;
    assert_eq!(r.status(), 404);
    let r = t
        .post("convirza", "text/plain", b"hello".to_vec(), &[])
        .await;
    assert_eq!(r.status(), 415);
    assert!(r.text().await.unwrap().contains("application/json"));
    let big = vec![b' '; 2 << 20];
    let r = t.post("convirza", "application/json", big, &[]).await;
    assert_eq!(r.status(), 413);
    let r = t
        .post("convirza", "application/json", b"{not json".to_vec(), &[])
        .await;
    assert_eq!(r.status(), 400);
    assert_eq!(t.store().delivery_count("convirza").await.unwrap(), 0);
}

#[tokio::test]
async fn every_error_answer_is_json() {
    let t = spawn().await;
    let big = vec![b' '; 2 << 20];
    let r = t.post("convirza", "application/json", big, &[]).await;
    assert_eq!(r.status(), 413);
    let v: serde_json::Value = r.json().await.expect("413 is JSON");
    assert!(v["error"].as_str().unwrap().contains("length limit"), "{v}");
    let r = t
        .http
        .get(format!("http://{}/no/such/thing", t.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"],
        "no such endpoint"
    );
    let r = t
        .http
        .get(format!("http://{}/webhooks/convirza", t.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert!(r.json::<serde_json::Value>().await.unwrap()["error"].is_string());
}

#[tokio::test]
async fn basic_scheme_and_hmac_prefix_ignore_case() {
    let t = spawn().await;
    let r = t
        .post(
            "ops",
            "application/json",
            br#"{"action":"resume","agent":101}"#.to_vec(),
            &[("Authorization", "BASIC b3BzOmh1bnRlcjItYmFzaWM=")],
        )
        .await;
    assert_eq!(r.status(), 202);
    let sig = format!("SHA256={POST_CALL_SIG}");
    let r = t
        .post(
            "gateway",
            "application/json",
            sample("post-call.json"),
            &[("X-Signature", &sig)],
        )
        .await;
    assert_eq!(r.status(), 202);
}

#[tokio::test]
async fn the_body_hash_of_a_static_source_cannot_confirm_the_secret() {
    use sha2::Digest;
    // The convirza source without an `id`: dedupe falls back to a hash.
    let t = spawn_with(Options {
        rules: RULES.replace("id = \"/call_id\"\n", ""),
        ..Options::default()
    })
    .await;
    let body = sample("pre-call.form");
    let r = t
        .post(
            "convirza",
            "application/x-www-form-urlencoded",
            body.clone(),
            &[],
        )
        .await;
    assert_eq!(r.status(), 202);
    let raw_hash = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&body)));
    let db = std::fs::read(t.db_path()).unwrap();
    let wal = std::fs::read(t.db_path().with_extension("db-wal")).unwrap_or_default();
    let hay = [db, wal].concat();
    assert!(
        !hay.windows(raw_hash.len())
            .any(|w| w == raw_hash.as_bytes()),
        "raw body hash stored"
    );
    // Still deduplicated.
    let r = t
        .post("convirza", "application/x-www-form-urlencoded", body, &[])
        .await;
    assert_eq!(r.status(), 200);
}

/// Computed with `openssl dgst -sha1 -hmac whsec-test-key -hex post-call.json` and
/// `openssl dgst -sha512 -hmac whsec-test-key -binary post-call.json | base64`.
const POST_CALL_SHA1: &str = "4890620380cdd4da74554e2f6d3dcd931d0f5292";
const POST_CALL_SHA512_B64: &str =
    "OwabiIt8SjJ9RZQM1fU4/L6oaoCIa6HhP5VjlRewvt1YJZvaxbCYBjqGL3EhxhDrK/qk0jT+x5YbpfcVx1RhdA==";

const HMAC_SOURCES: &str = r#"
[[sources]]
name = "sha1"
auth = { kind = "hmac-sha1", header = "X-Hub-Signature", prefix = "sha1=", secret = { value = "whsec-test-key" } }
[[sources]]
name = "sha512"
auth = { kind = "hmac-sha512", header = "X-Sig", encoding = "base64", secret = { value = "whsec-test-key" } }
[[sources]]
name = "rotating"
auth = { kind = "hmac-sha256", header = "X-Signature", prefix = "sha256=", secret = { value = "the-new-key" }, previous_secret = { value = "whsec-test-key" } }
"#;

#[tokio::test]
async fn hmac_sha1_sha512_several_signatures_and_rotation() {
    let t = spawn_with(Options {
        rules: HMAC_SOURCES.into(),
        ..Options::default()
    })
    .await;
    let body = sample("post-call.json");
    let post = |source: &'static str, header: &'static str, value: String| {
        let t = &t;
        let body = body.clone();
        async move {
            t.post(source, "application/json", body, &[(header, &value)])
                .await
                .status()
                .as_u16()
        }
    };
    assert_eq!(
        post("sha1", "X-Hub-Signature", format!("sha1={POST_CALL_SHA1}")).await,
        202
    );
    assert_eq!(
        post("sha512", "X-Sig", POST_CALL_SHA512_B64.to_string()).await,
        202
    );
    // Several signatures in one header, the valid one made with the *previous* secret of
    // a rotating source: any match under any active secret passes.
    let several = format!("sha256=00ff, sha256={POST_CALL_SIG} sha256=abcd");
    assert_eq!(post("rotating", "X-Signature", several).await, 202);
    // The same signature over one more byte does not.
    let mut spaced = body.clone();
    spaced.push(b' ');
    let wrong = t
        .post(
            "rotating",
            "application/json",
            spaced,
            &[("X-Signature", &format!("sha256={POST_CALL_SIG}"))],
        )
        .await;
    assert_eq!(wrong.status(), 401, "the signature covers the exact bytes");
    // Nothing readable, wrong algorithm, wrong key.
    assert_eq!(
        post("sha1", "X-Hub-Signature", format!("sha256={POST_CALL_SIG}")).await,
        401
    );
    assert_eq!(
        post("sha512", "X-Sig", "not base64!".to_string()).await,
        401
    );
    assert_eq!(
        post(
            "sha1",
            "X-Hub-Signature",
            "sha1=".to_string() + &"0".repeat(40)
        )
        .await,
        401
    );
}

/// Computed with openssl, not our code:
/// `printf 'msg_p5jXN8AQM9LWM0D4loKWxJek.1796299200.' > m; cat post-call.json >> m;`
/// `openssl dgst -sha256 -mac HMAC -macopt hexkey:$(printf 'standard-webhooks-test-key-32byt' | xxd -p -c 256) -binary m | base64`
const SW_SIG: &str = "04CR/ugenOBinEWuMuB9apsj9TXr2G6T31+H8sdDv00=";
const SW_SOURCE: &str = r#"
[[sources]]
name = "sw"
auth = { kind = "standard-webhooks", secret = { value = "whsec_c3RhbmRhcmQtd2ViaG9va3MtdGVzdC1rZXktMzJieXQ=" } }
"#;

#[tokio::test]
async fn standard_webhooks_signature_timestamp_and_id() {
    // 1796299200 is 2026-12-03T12:00:00Z.
    let t = spawn_with(Options {
        rules: SW_SOURCE.into(),
        manual_clock: Some("2026-12-03T12:02:00Z".parse().unwrap()),
        ..Options::default()
    })
    .await;
    let sig = format!("v1,bm90IHRoaXM= v1,{SW_SIG}");
    let headers = |ts: &'static str, sig: String| {
        vec![
            ("webhook-id", "msg_p5jXN8AQM9LWM0D4loKWxJek".to_string()),
            ("webhook-timestamp", ts.to_string()),
            ("webhook-signature", sig),
        ]
    };
    let send = |h: Vec<(&'static str, String)>| {
        let t = &t;
        async move {
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            t.post("sw", "application/json", sample("post-call.json"), &h)
                .await
                .status()
                .as_u16()
        }
    };
    assert_eq!(send(headers("1796299200", sig.clone())).await, 202);
    // The same message again: deduplicated on webhook-id.
    assert_eq!(send(headers("1796299200", sig.clone())).await, 200);
    // Another timestamp under the same signature does not verify.
    assert_eq!(send(headers("1796299201", sig.clone())).await, 401);
    // Replayed 6 minutes later: outside the 5-minute tolerance.
    t.manual
        .as_ref()
        .unwrap()
        .set("2026-12-03T12:06:01Z".parse().unwrap());
    assert_eq!(send(headers("1796299200", sig)).await, 401);
    assert_eq!(t.store().delivery_count("sw").await.unwrap(), 1);
}

#[tokio::test]
async fn a_secret_path_segment_authenticates_its_source_only() {
    let t = spawn_with(Options {
        rules: format!(
            "{RULES}\n[[sources]]\nname = \"hidden\"\nauth = {{ kind = \"path\", secret = {{ value = \"s3cret-seg_42\" }} }}\n"
        ),
        ..Options::default()
    })
    .await;
    let post = |path: &'static str| {
        let t = &t;
        async move {
            t.http
                .post(format!("http://{}{path}", t.addr))
                .json(&json!({"event": "x"}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(post("/webhooks/hidden/s3cret-seg_42").await, 202);
    assert_eq!(post("/webhooks/hidden/s3cret-seg_43").await, 401);
    assert_eq!(post("/webhooks/hidden").await, 401);
    assert_eq!(post("/webhooks/convirza/s3cret-seg_42").await, 401);
    assert_eq!(t.store().delivery_count("hidden").await.unwrap(), 1);
}

#[tokio::test]
async fn a_source_over_its_rate_limit_gets_429_with_retry_after() {
    let t = spawn_with(Options {
        rules: format!(
            "{RULES}\n[[sources]]\nname = \"limited\"\nauth = {{ kind = \"path\", secret = {{ value = \"k\" }} }}\nrate_limit = {{ per_second = 0.5, burst = 2 }}\n"
        ),
        ..Options::default()
    })
    .await;
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for i in 0..4 {
        let r = t
            .http
            .post(format!("http://{}/webhooks/limited/k", t.addr))
            .json(&json!({"n": i}))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 429 {
            retry_after = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
        }
    }
    assert_eq!(statuses, vec![202, 202, 429, 429]);
    assert_eq!(retry_after.as_deref(), Some("2"));
    assert_eq!(
        t.store().delivery_count("limited").await.unwrap(),
        2,
        "a 429 stores nothing"
    );
    // Forged requests do not spend the budget of the real sender.
    let other = t
        .http
        .post(format!("http://{}/webhooks/limited/wrong", t.addr))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 401);
}

#[tokio::test]
async fn an_older_event_arriving_late_is_recorded_as_stale_and_sends_nothing() {
    let t = spawn_with(Options {
        rules: r#"
[[sources]]
name = "calls"
auth = { kind = "path", secret = { value = "k" } }
id = "/call_id"
event_time = "/call_ended"
[[rules]]
name = "last call"
webhook = { source = "calls" }
agent = "/ai_voice_agent_id"
set = { more_information = "updated" }
"#
        .into(),
        ..Options::default()
    })
    .await;
    let send = |call_id: i64, ended: &'static str| {
        let t = &t;
        async move {
            t.http
                .post(format!("http://{}/webhooks/calls/k", t.addr))
                .json(&json!({"call_id": call_id, "call_ended": ended, "ai_voice_agent_id": 101}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(send(2, "2026-11-30T23:46:19Z").await, 202);
    assert_eq!(
        send(1, "2026-11-30T23:40:00Z").await,
        202,
        "accepted and stored"
    );
    t.settle().await;
    assert_eq!(
        t.patches().await.len(),
        1,
        "only the newer event caused a PATCH"
    );
    let runs = t.store().runs(Some("last call")).await.unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[1].decision, "skipped");
    assert!(
        runs[1].detail.as_deref().unwrap().contains("stale"),
        "{:?}",
        runs[1].detail
    );
    assert_eq!(t.store().delivery_count("calls").await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_delivery_posted_twenty_times_at_once_causes_one_effect() {
    let t = spawn().await;
    let body = sample("post-call.json");
    let url = format!("http://{}/webhooks/convirza", t.addr);
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(20));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (http, url, body, barrier) =
            (t.http.clone(), url.clone(), body.clone(), barrier.clone());
        tasks.spawn(async move {
            barrier.wait().await;
            let r = http
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            r.status().as_u16()
        });
    }
    let statuses: Vec<u16> = tasks.join_all().await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 202).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        19,
        "{statuses:?}"
    );
    t.settle().await;
    assert_eq!(t.store().jobs(None, None).await.unwrap().len(), 1);
    assert_eq!(t.patches().await.len(), 1);
}

#[tokio::test]
async fn a_pre_call_and_a_post_call_of_the_same_call_are_both_kept() {
    let t = spawn().await;
    let pre = json!({"event": "pre_call", "call_id": "same-call", "caller_id": "+12065550100",
                     "ai_voice_agent_id": 102, "static": {"auth_token": STATIC_SECRET}});
    let post = json!({"event": "post_call", "call_id": "same-call", "ai_voice_agent_id": 102,
                      "disposition": "ANSWERED", "static": {"auth_token": STATIC_SECRET}});
    assert_eq!(t.post_json("convirza", &pre).await.status(), 202);
    assert_eq!(t.post_json("convirza", &post).await.status(), 202);
    assert_eq!(
        t.post_json("convirza", &post).await.status(),
        200,
        "the same post-call again is a duplicate"
    );
    assert_eq!(t.store().delivery_count("convirza").await.unwrap(), 2);
}
