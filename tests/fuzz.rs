//! Fuzz targets, as property tests: webhook body parsing, sender authentication
//! (signature headers, Standard Webhooks, basic auth) and config parsing. Each asserts
//! that nothing panics, plus cheap invariants.
//!
//! `cargo test` runs each target with proptest's default case count (or
//! `PROPTEST_CASES`); `scripts/fuzz` runs them in release mode with many cases under a
//! time bound (`FUZZ_TARGET_SECONDS` stops each target's cases after that many seconds).
//! A failure is shrunk to a minimal input, printed, and saved under
//! `tests/fuzz.proptest-regressions`, which is replayed first on every later run.

use autopilot::config::{Config, HmacAlgo, SigEncoding, SourceAuth};
use autopilot::http::auth::{self, Offered, Verdict};
use autopilot::http::{body_kind_of, parse_body, BodyKind};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use base64::Engine;
use hmac::{Hmac, Mac};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{
    Config as RunnerConfig, FileFailurePersistence, TestCaseError, TestError, TestRunner,
};
use secrecy::SecretString;
use serde_json::{Map, Value};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// The harness: a proptest runner per target, stopped early by FUZZ_TARGET_SECONDS.

/// Runs `test` on values of `strategy` with proptest's configured case count; failures
/// are shrunk, persisted and replayed like `proptest!`'s. With `FUZZ_TARGET_SECONDS`,
/// new cases stop once that much time is spent (a failure found is still shrunk).
fn fuzz<S: Strategy>(
    name: &'static str,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let budget = std::env::var("FUZZ_TARGET_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .map(Duration::from_secs_f64);
    let config = RunnerConfig {
        source_file: Some(file!()),
        // tests/fuzz.proptest-regressions, committed: replayed before new cases.
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        test_name: Some(name),
        ..RunnerConfig::default()
    };
    let cases = config.cases;
    let mut runner = TestRunner::new(config);
    let start = Instant::now();
    let ran = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let out_of_time = || budget.is_some_and(|b| start.elapsed() > b);
    let result = runner.run(&strategy, |value| {
        // Out of time: reject the remaining cases, which makes the runner give up soon
        // (after `max_global_rejects`); but never while shrinking a failure.
        if !failed.load(Ordering::Relaxed) && out_of_time() {
            return Err(TestCaseError::reject("time budget spent"));
        }
        ran.fetch_add(1, Ordering::Relaxed);
        match std::panic::catch_unwind(AssertUnwindSafe(|| test(value))) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                if matches!(e, TestCaseError::Fail(_)) {
                    failed.store(true, Ordering::Relaxed);
                }
                Err(e)
            }
            Err(panic) => {
                failed.store(true, Ordering::Relaxed);
                std::panic::resume_unwind(panic)
            }
        }
    });
    println!(
        "fuzz target {name}: {} inputs run (of {cases} cases, with replays and shrinking) in {:.1}s",
        ran.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64()
    );
    match result {
        Ok(_) => {}
        Err(TestError::Abort(_)) if out_of_time() && !failed.load(Ordering::Relaxed) => {}
        Err(e) => panic!("fuzz target {name}: {e}"),
    }
}

/// Arbitrary text, biased towards the characters that matter to the parsers.
fn text(alphabet: &'static str, max: usize) -> BoxedStrategy<String> {
    prop_oneof![
        2 => proptest::collection::vec(
            proptest::sample::select(alphabet.chars().collect::<Vec<_>>()),
            0..max
        )
        .prop_map(|c| c.into_iter().collect::<String>()),
        1 => proptest::collection::vec(any::<char>(), 0..max)
            .prop_map(|c| c.into_iter().collect()),
    ]
    .boxed()
}

// ---------------------------------------------------------------------------------------
// 1. Body parsing.

fn content_type() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("application/json".to_string()),
        Just("application/x-www-form-urlencoded".to_string()),
        "(?i)application/(json|x-www-form-urlencoded|[a-z.-]{0,12}\\+json)( ?; ?charset=[a-z0-9-]{0,10})?",
        " *[a-zA-Z/+;= .-]{0,40}",
        any::<String>(),
    ]
}

#[test]
fn body_arbitrary_bytes() {
    let body = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        text("{}[]\":,0123456789.eE+-tfnrulsa\\ \n\r\t=&%", 256).prop_map(String::into_bytes),
    ];
    fuzz(
        "body_arbitrary_bytes",
        (content_type(), body),
        |(ct, body)| {
            let kind = match body_kind_of(&ct) {
                Ok(kind) => kind,
                Err(e) => {
                    prop_assert_eq!(e.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
                    return Ok(());
                }
            };
            let mime = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            match kind {
                BodyKind::Json => {
                    prop_assert!(mime.starts_with("application/") && mime.ends_with("json"))
                }
                BodyKind::Form => {
                    prop_assert_eq!(mime.as_str(), "application/x-www-form-urlencoded")
                }
            }
            match parse_body(kind, &body) {
                Ok(v) => {
                    prop_assert!(v.is_object());
                    if kind == BodyKind::Json {
                        let direct = serde_json::from_slice::<Value>(&body).ok();
                        prop_assert_eq!(Some(&v), direct.as_ref());
                    }
                }
                Err(e) => {
                    prop_assert_eq!(e.status(), StatusCode::BAD_REQUEST);
                    prop_assert_eq!(kind, BodyKind::Json, "a form body always parses");
                }
            }
            Ok(())
        },
    );
}

/// JSON values without floats that would not survive a round trip exactly.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1_000_000i32..1_000_000).prop_map(|n| Value::from(f64::from(n) / 64.0)),
        any::<String>().prop_map(Value::String),
        "[a-z_/~0-9]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{0,6}|\\PC{0,6}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[derive(Debug, Clone)]
enum ByteEdit {
    Truncate(Index),
    Delete(Index),
    Insert(Index, u8),
    Replace(Index, u8),
    InsertToken(Index, &'static str),
}

/// JSON fragments at the edges of what parsers accept.
const JSON_TOKENS: &[&str] = &[
    "1e400",
    "-1e400",
    "1e-400",
    "-0",
    "18446744073709551616",
    "-9223372036854775809",
    "0.1e",
    "01",
    "NaN",
    "Infinity",
    "\"\\ud800\"",
    "\"\\udc00\\ud800\"",
    "\"\\u0000\"",
    "\"\\uZZZZ\"",
    "\"\u{7f}\"",
    "true",
    "null",
    ",",
    ":",
    "[",
    "]",
    "{",
    "}",
    "\"",
    "\\",
    "\u{feff}",
    "\u{0}",
];

fn byte_edits() -> impl Strategy<Value = Vec<ByteEdit>> {
    let byte = prop_oneof![
        any::<u8>(),
        proptest::sample::select(b"{}[]\",:\\0123456789eE.-+ \n".to_vec()),
    ];
    let edit = prop_oneof![
        any::<Index>().prop_map(ByteEdit::Truncate),
        any::<Index>().prop_map(ByteEdit::Delete),
        (any::<Index>(), byte.clone()).prop_map(|(i, b)| ByteEdit::Insert(i, b)),
        (any::<Index>(), byte).prop_map(|(i, b)| ByteEdit::Replace(i, b)),
        (any::<Index>(), proptest::sample::select(JSON_TOKENS))
            .prop_map(|(i, t)| ByteEdit::InsertToken(i, t)),
    ];
    proptest::collection::vec(edit, 0..4)
}

fn apply_byte_edits(mut bytes: Vec<u8>, edits: &[ByteEdit]) -> Vec<u8> {
    for e in edits {
        let n = bytes.len();
        match e {
            ByteEdit::Truncate(i) => bytes.truncate(i.index(n + 1)),
            ByteEdit::Delete(i) if n > 0 => {
                bytes.remove(i.index(n));
            }
            ByteEdit::Insert(i, b) => bytes.insert(i.index(n + 1), *b),
            ByteEdit::Replace(i, b) if n > 0 => bytes[i.index(n)] = *b,
            ByteEdit::InsertToken(i, t) => {
                let at = i.index(n + 1);
                bytes.splice(at..at, t.bytes());
            }
            _ => {}
        }
    }
    bytes
}

#[test]
fn body_structured_json() {
    let object = proptest::collection::btree_map("[a-z_]{1,8}", json_value(), 0..8)
        .prop_map(|m| Value::Object(m.into_iter().collect()));
    fuzz(
        "body_structured_json",
        (object, any::<bool>(), byte_edits()),
        |(value, pretty, edits)| {
            let text = if pretty {
                serde_json::to_vec_pretty(&value).unwrap()
            } else {
                serde_json::to_vec(&value).unwrap()
            };
            let intact = edits.is_empty();
            let body = apply_byte_edits(text, &edits);
            match parse_body(BodyKind::Json, &body) {
                Ok(v) => {
                    prop_assert!(v.is_object());
                    if intact {
                        prop_assert_eq!(v, value);
                    }
                }
                Err(e) => {
                    prop_assert!(!intact, "valid JSON object refused: {:?}", e);
                    prop_assert_eq!(e.status(), StatusCode::BAD_REQUEST);
                }
            }
            Ok(())
        },
    );
}

#[test]
fn body_deeply_nested_json() {
    fuzz(
        "body_deeply_nested_json",
        (0usize..2000, any::<u64>(), any::<bool>()),
        |(depth, shape, close)| {
            // Each level is an array or an object, as the bits of `shape` say.
            let array = |i: usize| shape >> (i % 64) & 1 == 1;
            let mut body = String::from("{\"x\":");
            for i in 0..depth {
                body.push_str(if array(i) { "[" } else { "{\"a\":" });
            }
            body.push('1');
            if close {
                for i in (0..depth).rev() {
                    body.push(if array(i) { ']' } else { '}' });
                }
                body.push('}');
            }
            // serde_json's recursion limit (128) turns deep nesting into an error, not a
            // stack overflow.
            match parse_body(BodyKind::Json, body.as_bytes()) {
                Ok(v) => prop_assert!(close && v.is_object()),
                Err(e) => {
                    prop_assert_eq!(e.status(), StatusCode::BAD_REQUEST);
                    prop_assert!(!close || depth > 100, "{e:?}");
                }
            }
            Ok(())
        },
    );
}

#[test]
fn body_structured_form() {
    let key = prop_oneof![3 => "[a-c]", 1 => any::<String>(), 1 => "[a-z_ &=%+]{0,6}"];
    let value = prop_oneof![3 => "[a-z0-9 ]{0,6}", 1 => any::<String>(), 1 => "[&=%+\r\n ]{0,6}"];
    fuzz(
        "body_structured_form",
        (
            proptest::collection::vec((key, value), 0..12),
            "[\r\n]{0,3}",
        ),
        |(pairs, trailer)| {
            let mut body = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(&pairs)
                .finish();
            body.push_str(&trailer);
            let v = parse_body(BodyKind::Form, body.as_bytes())
                .map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
            let map = v.as_object().expect("an object");
            // Each field's values, in order: one value is a string, several a list.
            let mut expected: Map<String, Value> = Map::new();
            for (k, val) in &pairs {
                let val = Value::String(val.clone());
                match expected.get_mut(k) {
                    Some(Value::Array(items)) => items.push(val),
                    Some(existing) => *existing = Value::Array(vec![existing.take(), val]),
                    None => {
                        expected.insert(k.clone(), val);
                    }
                }
            }
            prop_assert_eq!(map, &expected);
            Ok(())
        },
    );
}

#[test]
fn body_raw_form() {
    let body = prop_oneof![
        text("ab=&%+0123456789ABCDEFabcdef\r\n ", 128).prop_map(String::into_bytes),
        proptest::collection::vec(any::<u8>(), 0..256),
    ];
    fuzz("body_raw_form", body, |body| {
        let v =
            parse_body(BodyKind::Form, &body).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        for (_, field) in v.as_object().expect("an object") {
            match field {
                Value::String(_) => {}
                Value::Array(items) => {
                    prop_assert!(items.len() >= 2 && items.iter().all(Value::is_string))
                }
                other => prop_assert!(false, "form field is {other:?}"),
            }
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------
// 2. Sender authentication.

const NOW: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z

fn secret(s: &str) -> SecretString {
    SecretString::from(s.to_string())
}

fn algo() -> impl Strategy<Value = HmacAlgo> {
    prop_oneof![
        Just(HmacAlgo::Sha1),
        Just(HmacAlgo::Sha256),
        Just(HmacAlgo::Sha512)
    ]
}

fn encoding() -> impl Strategy<Value = SigEncoding> {
    prop_oneof![Just(SigEncoding::Hex), Just(SigEncoding::Base64)]
}

fn prefix() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("sha256=".to_string()),
        Just("sha1=".to_string()),
        Just("v1=".to_string()),
        "[a-zA-Z0-9=:_-]{1,8}",
    ]
}

fn mac(algo: HmacAlgo, key: &[u8], body: &[u8]) -> Vec<u8> {
    fn go<M: Mac + hmac::digest::KeyInit>(key: &[u8], body: &[u8]) -> Vec<u8> {
        let mut m = <M as hmac::digest::KeyInit>::new_from_slice(key).expect("any key length");
        m.update(body);
        m.finalize().into_bytes().to_vec()
    }
    match algo {
        HmacAlgo::Sha1 => go::<Hmac<sha1::Sha1>>(key, body),
        HmacAlgo::Sha256 => go::<Hmac<sha2::Sha256>>(key, body),
        HmacAlgo::Sha512 => go::<Hmac<sha2::Sha512>>(key, body),
    }
}

fn encode(encoding: SigEncoding, sig: &[u8], upper: bool) -> String {
    match encoding {
        SigEncoding::Hex if upper => hex::encode_upper(sig),
        SigEncoding::Hex => hex::encode(sig),
        SigEncoding::Base64 => base64::engine::general_purpose::STANDARD.encode(sig),
    }
}

/// Flips the case of the ASCII letters selected by `mask`.
fn recase(s: &str, mask: u64) -> String {
    s.chars()
        .enumerate()
        .map(|(i, c)| {
            if mask >> (i % 64) & 1 == 1 {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

/// A garbage signature-header entry: visible ASCII, shaped like the real ones or not.
fn garbage_entry() -> impl Strategy<Value = String> {
    prop_oneof![
        "[!-~]{0,40}",
        "[0-9a-fA-F]{0,140}",
        "[A-Za-z0-9+/]{0,90}={0,2}",
        "(sha256=|sha1=|v1=|v1,|v0,|V1,)[0-9a-zA-Z+/=]{0,90}",
    ]
}

fn separator() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just(","), Just(" "), Just(", "), Just("\t"), Just(" ,  ")]
}

fn offered<'a>(headers: &'a HeaderMap, body: &'a [u8], query: Option<&'a str>) -> Offered<'a> {
    Offered {
        headers,
        query,
        raw_body: body,
        now: NOW,
        path_token: None,
    }
}

fn header_map(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), v);
        }
    }
    h
}

#[test]
fn signatures_arbitrary_header_values() {
    fuzz(
        "signatures_arbitrary_header_values",
        (
            text(", \t=:0123456789abcdefABCDEF+/shav1", 200),
            prop_oneof![prefix(), any::<String>()],
            encoding(),
        ),
        |(value, prefix, encoding)| {
            let sigs = auth::signatures(&value, &prefix, encoding);
            let entries = value
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|t| !t.is_empty())
                .count();
            prop_assert!(sigs.len() <= entries);
            Ok(())
        },
    );
}

#[derive(Debug, Clone)]
struct HmacCase {
    algo: HmacAlgo,
    encoding: SigEncoding,
    prefix: String,
    secrets: Vec<String>,
    body: Vec<u8>,
}

fn hmac_case() -> impl Strategy<Value = HmacCase> {
    (
        algo(),
        encoding(),
        prefix(),
        proptest::collection::vec("[!-~]{1,40}", 1..3),
        proptest::collection::vec(any::<u8>(), 0..256),
    )
        .prop_map(|(algo, encoding, prefix, secrets, body)| HmacCase {
            algo,
            encoding,
            prefix,
            secrets,
            body,
        })
}

fn hmac_auth(c: &HmacCase) -> SourceAuth {
    SourceAuth::Hmac {
        algo: c.algo,
        header: "x-signature".into(),
        encoding: c.encoding,
        prefix: c.prefix.clone(),
        secrets: c.secrets.iter().map(|s| secret(s)).collect(),
    }
}

#[test]
fn hmac_random_header_never_verifies() {
    let header = prop_oneof![
        proptest::collection::vec(garbage_entry(), 0..6).prop_map(|e| e.join(",")),
        any::<String>(),
    ];
    fuzz(
        "hmac_random_header_never_verifies",
        (hmac_case(), header),
        |(case, header)| {
            let auth = hmac_auth(&case);
            let headers = header_map(&[("x-signature", &header)]);
            let verdict = auth::verify_raw(&auth, &offered(&headers, &case.body, None));
            prop_assert!(matches!(verdict, Verdict::Denied(_)), "{verdict:?}");
            Ok(())
        },
    );
}

#[test]
fn hmac_correct_signature_among_garbage_verifies() {
    fuzz(
        "hmac_correct_signature_among_garbage_verifies",
        (
            hmac_case(),
            any::<Index>(),
            proptest::collection::vec(garbage_entry(), 0..5),
            any::<Index>(),
            separator(),
            any::<u64>(),
            any::<bool>(),
            any::<Index>(),
        ),
        |(case, which_secret, mut garbage, at, sep, case_mask, upper, flip)| {
            let auth = hmac_auth(&case);
            let key = &case.secrets[which_secret.index(case.secrets.len())];
            let sig = mac(case.algo, key.as_bytes(), &case.body);
            // The prefix matches without regard to case; so does hex.
            let entry = format!(
                "{}{}",
                recase(&case.prefix, case_mask),
                encode(case.encoding, &sig, upper)
            );
            garbage.insert(at.index(garbage.len() + 1), entry);
            let header = garbage.join(sep);
            let headers = header_map(&[("x-signature", &header)]);
            let verdict = auth::verify_raw(&auth, &offered(&headers, &case.body, None));
            prop_assert_eq!(verdict, Verdict::Allowed, "header {:?}", header);

            // The same header over a body changed in one bit does not verify.
            let mut other = case.body.clone();
            if other.is_empty() {
                other.push(0);
            } else {
                let i = flip.index(other.len());
                other[i] ^= 1;
            }
            let verdict = auth::verify_raw(&auth, &offered(&headers, &other, None));
            prop_assert!(matches!(verdict, Verdict::Denied(_)), "{verdict:?}");
            Ok(())
        },
    );
}

#[derive(Debug, Clone)]
struct StdCase {
    keys: Vec<Vec<u8>>,
    id: String,
    body: Vec<u8>,
    tolerance: u64,
}

fn std_case() -> impl Strategy<Value = StdCase> {
    (
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..64), 1..3),
        "[!-~]{0,40}",
        proptest::collection::vec(any::<u8>(), 0..256),
        0u64..100_000,
    )
        .prop_map(|(keys, id, body, tolerance)| StdCase {
            keys,
            id,
            body,
            tolerance,
        })
}

fn std_auth(c: &StdCase) -> SourceAuth {
    let b64 = base64::engine::general_purpose::STANDARD;
    SourceAuth::StandardWebhooks {
        keys: c.keys.iter().map(|k| secret(&b64.encode(k))).collect(),
        tolerance: Duration::from_secs(c.tolerance),
    }
}

fn timestamp() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(i64::MIN.to_string()),
        Just(i64::MAX.to_string()),
        Just((i64::MIN + NOW - 1).to_string()),
        Just(u64::MAX.to_string()),
        any::<i64>().prop_map(|t| t.to_string()),
        (-200_000i64..200_000).prop_map(|d| (NOW + d).to_string()),
        (-200_000i64..200_000).prop_map(|d| format!(" {} ", NOW + d)),
        "[-+ 0-9a-z.]{0,24}",
        any::<String>(),
    ]
}

#[test]
fn standard_webhooks_random_headers_never_verify() {
    let sigs = prop_oneof![
        proptest::collection::vec(garbage_entry(), 0..6).prop_map(|e| e.join(" ")),
        any::<String>(),
    ];
    fuzz(
        "standard_webhooks_random_headers_never_verify",
        (std_case(), timestamp(), sigs),
        |(case, ts, sigs)| {
            let auth = std_auth(&case);
            let headers = header_map(&[
                ("webhook-id", &case.id),
                ("webhook-timestamp", &ts),
                ("webhook-signature", &sigs),
            ]);
            let verdict = auth::verify_raw(&auth, &offered(&headers, &case.body, None));
            prop_assert!(matches!(verdict, Verdict::Denied(_)), "{verdict:?}");
            Ok(())
        },
    );
}

/// Found by `standard_webhooks_random_headers_never_verify`: `now - timestamp` overflowed
/// (a panic in debug builds) for a timestamp near `i64::MIN`.
#[test]
fn standard_webhooks_extreme_timestamps_are_refused() {
    let case = StdCase {
        keys: vec![vec![0]],
        id: "msg_1".into(),
        body: b"{}".to_vec(),
        tolerance: 300,
    };
    for ts in [i64::MIN, i64::MIN + 1, -NOW, i64::MAX] {
        let ts = ts.to_string();
        let headers = header_map(&[
            ("webhook-id", "msg_1"),
            ("webhook-timestamp", &ts),
            ("webhook-signature", "v1,AAAA"),
        ]);
        let verdict = auth::verify_raw(&std_auth(&case), &offered(&headers, b"{}", None));
        assert_eq!(
            verdict,
            Verdict::Denied("webhook-timestamp outside the tolerance (replay?)"),
            "{ts}"
        );
    }
}

#[test]
fn standard_webhooks_correct_signature_among_garbage_verifies() {
    fuzz(
        "standard_webhooks_correct_signature_among_garbage_verifies",
        (
            std_case(),
            any::<Index>(),
            any::<Index>(),
            proptest::collection::vec(garbage_entry(), 0..5),
            any::<Index>(),
            prop_oneof![Just(" "), Just("  "), Just("\t"), Just(" \t ")],
        ),
        |(case, which_key, offset, mut garbage, at, sep)| {
            let auth = std_auth(&case);
            let tol = case.tolerance as i64;
            let ts = (NOW - tol + offset.index(2 * tol as usize + 1) as i64).to_string();
            let mut signed = format!("{}.{ts}.", case.id).into_bytes();
            signed.extend_from_slice(&case.body);
            let key = &case.keys[which_key.index(case.keys.len())];
            let sig = mac(HmacAlgo::Sha256, key, &signed);
            let entry = format!(
                "v1,{}",
                base64::engine::general_purpose::STANDARD.encode(sig)
            );
            garbage.insert(at.index(garbage.len() + 1), entry);
            let sigs = garbage.join(sep);
            let mut pairs = vec![
                ("webhook-id", case.id.as_str()),
                ("webhook-timestamp", ts.as_str()),
                ("webhook-signature", sigs.as_str()),
            ];
            let headers = header_map(&pairs);
            let verdict = auth::verify_raw(&auth, &offered(&headers, &case.body, None));
            prop_assert_eq!(verdict, Verdict::Allowed, "signature header {:?}", sigs);

            // Outside the tolerance the same signature is refused (a replay).
            let late = (NOW + tol + 1 + offset.index(1000) as i64).to_string();
            pairs[1].1 = &late;
            let headers = header_map(&pairs);
            let verdict = auth::verify_raw(&auth, &offered(&headers, &case.body, None));
            prop_assert!(matches!(verdict, Verdict::Denied(_)), "{verdict:?}");
            Ok(())
        },
    );
}

#[test]
fn basic_auth_headers() {
    let b64 = base64::engine::general_purpose::STANDARD;
    let random = prop_oneof![
        any::<String>(),
        "(?i)basic {0,3}[A-Za-z0-9+/=]{0,40}",
        "(?i)(basic|bearer|digest)?[ \t]?[!-~]{0,40}",
        "[ -~]{0,60}".prop_map(|s| format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(s)
        )),
    ];
    fuzz(
        "basic_auth_headers",
        (
            "[!-~]{8,16}",
            "[ -~]{8,24}",
            random,
            any::<u64>(),
            " {0,3}",
            " {0,3}",
        ),
        |(username, password, random, case_mask, pad, trail)| {
            let auth = SourceAuth::Basic {
                username: username.clone(),
                password: secret(&password),
            };
            let headers = header_map(&[("authorization", &random)]);
            let verdict = auth::verify_raw(&auth, &offered(&headers, b"", None));
            prop_assert!(matches!(verdict, Verdict::Denied(_)), "{verdict:?}");

            let good = format!(
                "{} {pad}{}{trail}",
                recase("basic", case_mask),
                b64.encode(format!("{username}:{password}"))
            );
            let headers = header_map(&[("authorization", &good)]);
            let verdict = auth::verify_raw(&auth, &offered(&headers, b"", None));
            prop_assert_eq!(verdict, Verdict::Allowed, "header {:?}", good);
            Ok(())
        },
    );
}

/// Any scheme, random everything: never a panic, never a pass.
#[test]
fn any_auth_random_request_never_verifies() {
    let auth = prop_oneof![
        hmac_case().prop_map(|c| hmac_auth(&c)),
        std_case().prop_map(|c| std_auth(&c)),
        ("[!-~]{8,16}", "[ -~]{8,24}").prop_map(|(u, p)| SourceAuth::Basic {
            username: u,
            password: secret(&p)
        }),
        "[A-Za-z0-9._~-]{8,32}".prop_map(|s| SourceAuth::PathToken { secret: secret(&s) }),
        (
            proptest::option::of("(/[a-z_~0-9]{0,8}){0,3}"),
            proptest::option::of("[a-z_]{1,8}"),
            proptest::option::of("[a-z_]{1,8}"),
            "[!-~]{8,32}"
        )
            .prop_map(|(field, form_field, query, s)| SourceAuth::Static {
                field,
                form_field,
                query,
                secret: secret(&s)
            }),
    ];
    let header_name = prop_oneof![
        Just("authorization"),
        Just("x-signature"),
        Just("webhook-id"),
        Just("webhook-timestamp"),
        Just("webhook-signature"),
    ];
    let headers = proptest::collection::vec(
        (
            header_name,
            prop_oneof![garbage_entry(), any::<String>(), timestamp()],
        ),
        0..6,
    );
    let payload = prop_oneof![
        json_value(),
        proptest::collection::btree_map("[a-z_]{1,8}", json_value(), 0..6)
            .prop_map(|m| Value::Object(m.into_iter().collect())),
    ];
    fuzz(
        "any_auth_random_request_never_verifies",
        (
            auth,
            headers,
            proptest::option::of(text("abcxyz_=&%+0123456789", 64)),
            proptest::option::of("[!-~]{0,32}"),
            any::<i64>(),
            proptest::collection::vec(any::<u8>(), 0..64),
            payload,
            any::<bool>(),
        ),
        |(auth, headers, query, path_token, now, body, mut payload, is_form)| {
            let pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let headers = header_map(&pairs);
            let offered = Offered {
                headers: &headers,
                query: query.as_deref(),
                raw_body: &body,
                now,
                path_token: path_token.as_deref(),
            };
            let verdict = auth::verify_raw(&auth, &offered);
            prop_assert!(verdict != Verdict::Allowed, "{verdict:?}");
            let verdict = auth::check_static_body(&auth, &payload, is_form);
            let is_static = matches!(auth, SourceAuth::Static { .. });
            prop_assert!(verdict != Verdict::Allowed || !is_static, "{verdict:?}");
            prop_assert_eq!(auth::redact(&auth, &mut payload, is_form), is_static);
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------
// 3. Config parsing.

/// A config using every section and every kind of source, rule and shift.
const FULL: &str = r#"
[server]
listen = "127.0.0.1:0"
max_body_bytes = 65536
request_timeout = "30s"

[database]
path = "data/fuzz.db"
busy_timeout = "5s"
retention = "30d"

[platform]
base_url = "http://127.0.0.1:18089/v3"
token = { value = "sim-token" }
timeout = "5s"
requests_per_second = 10.5
max_in_flight = 4

[queue]
workers = 2
max_attempts = 5
initial_backoff = "500ms"
max_backoff = "10s"
lease = "40s"
max_retry_after = "10m"
max_age = "24h"
shutdown_grace = "15s"

[defaults]
timezone = "Europe/Berlin"

[[sources]]
name = "convirza"
auth = { kind = "static", field = "/static/auth_token", form_field = "auth_token", secret = { value = "s3cr3t-static" } }
id = "/call_id"
event_time = "/timestamp"
rate_limit = { per_second = 20, burst = 40 }

[[sources]]
name = "gateway"
auth = { kind = "hmac-sha256", header = "X-Signature", encoding = "hex", prefix = "sha256=", secret = { value = "k1" }, previous_secret = { value = "k0" } }

[[sources]]
name = "sha1"
auth = { kind = "hmac-sha1", header = "X-Hub-Signature", encoding = "base64", secret = { value = "k2" } }

[[sources]]
name = "std"
auth = { kind = "standard-webhooks", secret = { value = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw" }, tolerance = "5m" }

[[sources]]
name = "ops"
auth = { kind = "basic", username = "ops", password = { value = "hunter2" } }

[[sources]]
name = "legacy"
auth = { kind = "path", secret = { value = "abc-123.x~y" } }
id_header = "X-Request-Id"

[[rules]]
name = "night greeting"
schedule = { cron = "0 18 * * mon-fri", timezone = "America/New_York" }
agents = [101, 102]
set = { greetings = "Closed.", max_call_duration = 180, config = { volume = 0.7 } }
catch_up = "1h"

[[rules]]
name = "month end"
schedule = { cron = "30 23 L * *" }
agents = [103]
set = { prompt = "Month end.", notification_time = 30 }

[[rules]]
name = "second friday"
schedule = { cron = "0 9 * 1-6,9 fri#2" }
agents = [101]
set = { status = "inactive" }
catch_up = "0s"

[[rules]]
name = "pause after abandoned calls"
webhook = { source = "convirza", match = { "/event" = "post_call", "/disposition" = { in = ["ABANDONED", "NO ANSWER"] } } }
agent = "/ai_voice_agent_id"
when = { status = "active" }
set = { status = "inactive" }

[[rules]]
name = "hot leads"
webhook = { source = "gateway", match = { "/indicators/lead_quality" = { gte = 80 }, "/duration" = { lt = 600 }, "/caller_id" = { regex = "^\\+1206" }, "/vip" = { exists = true } } }
agent = "/agent"
set = { more_information = "Hot lead.", urls = ["https://example.com"] }

[[rules]]
name = "ops resume"
webhook = { source = "ops" }
agents = [101, 102, 103]
set = { status = "active", voiceagent_name = "Front desk" }

[[shifts]]
name = "front desk"
agents = [104, 105]
timezone = "America/New_York"
windows = [
  { days = "mon-fri", from = "08:00", to = "18:00", set = { greetings = "Good morning!" } },
  { days = "sat", from = "22:00", to = "02:00", set = { greetings = "Late Saturday line." } },
]
otherwise = { greetings = "We are closed." }
overrides = [ { date = "2026-12-25", set = { greetings = "Merry Christmas!" } } ]
"#;

const SEEDS: [&str; 3] = ["demo.toml", "autopilot.toml", "full.toml"];

/// A valid config to mutate, by name (so that failures print short).
fn seed(name: &str) -> &'static str {
    match name {
        "demo.toml" => include_str!("../config/demo.toml"),
        "autopilot.toml" => include_str!("../config/autopilot.toml"),
        _ => FULL,
    }
}

fn seed_env() -> Vec<(String, String)> {
    vec![
        ("CONVIRZA_TOKEN".into(), "t".into()),
        ("CONVIRZA_WEBHOOK_SECRET".into(), "s".into()),
        ("GATEWAY_SECRET".into(), "g".into()),
    ]
}

/// Every error names `fuzz.toml:LINE:COL` with a line of the text and a column ≥ 1.
fn check_located(
    text: &str,
    result: Result<Config, autopilot::config::ConfigErrors>,
) -> Result<(), TestCaseError> {
    let Err(errors) = result else {
        return Ok(());
    };
    let messages = errors.messages();
    prop_assert!(!messages.is_empty());
    prop_assert_eq!(errors.to_string(), messages.join("\n"));
    for m in messages {
        located(text, &m).map_err(TestCaseError::fail)?;
    }
    Ok(())
}

/// `fuzz.toml:LINE:COL: message`, with a line of `text` and a column ≥ 1.
fn located(text: &str, m: &str) -> Result<(), String> {
    let lines = text.matches('\n').count() + 1;
    let rest = m
        .strip_prefix("fuzz.toml:")
        .ok_or_else(|| format!("error without the file: {m:?}"))?;
    let mut parts = rest.splitn(3, ':');
    let line = parts.next().and_then(|l| l.parse::<usize>().ok());
    let col = parts.next().and_then(|c| c.parse::<usize>().ok());
    match (line, col, parts.next()) {
        (Some(line), Some(col), Some(msg))
            if (1..=lines).contains(&line) && col >= 1 && msg.len() > 1 =>
        {
            Ok(())
        }
        _ => Err(format!("error without a valid line:col: {m:?}")),
    }
}

#[test]
fn seed_configs_are_valid() {
    for name in SEEDS {
        if let Err(e) = Config::from_toml(seed(name), Path::new(name), &seed_env()) {
            panic!("{name} is not valid:\n{e}");
        }
    }
}

#[test]
fn config_arbitrary_text() {
    let text = prop_oneof![
        text("[]{}=\"'.,#\n abcdefghijklmnopqrstuvwxyz_0123456789-:", 300),
        any::<String>(),
    ];
    fuzz("config_arbitrary_text", text, |text| {
        check_located(&text, Config::from_toml(&text, Path::new("fuzz.toml"), &[]))
    });
}

/// Values that make the validators work: cron fields, durations, zones, regexes, times,
/// dates, pointers, numbers at the edges.
const VALUES: &[&str] = &[
    "\"\"",
    "\"*\"",
    "\"* * * * *\"",
    "\"*/0 * * * *\"",
    "\"0-59/1000 * * * *\"",
    "\"60 * * * *\"",
    "\"0 24 * * *\"",
    "\"0 0 31 2 *\"",
    "\"0 0 30 2 *\"",
    "\"0 0 29 2 *\"",
    "\"0 0 L 2 *\"",
    "\"0 0 LW * *\"",
    "\"0 0 L-3 * *\"",
    "\"0 0 15W * *\"",
    "\"0 0 * * 5#6\"",
    "\"0 0 * * 7#5\"",
    "\"0 0 * * sun-mon\"",
    "\"0 0 ? * *\"",
    "\"@daily\"",
    "\"@reboot\"",
    "\"0 0 0 * * *\"",
    "\"99999999999999999999 * * * *\"",
    "\"0 2 * 3 sun#2\"",
    "\"0 30 2 * *\"",
    "\"*/7 */5 1-31/3 */2 *\"",
    "\"0s\"",
    "\"1ns\"",
    "\"366d\"",
    "\"367d\"",
    "\"1y\"",
    "\"-1s\"",
    "\"99999999999999999999s\"",
    "\"18446744073709551615ns\"",
    "\"5m 5m 5m\"",
    "\"UTC\"",
    "\"Etc/GMT+14\"",
    "\"Etc/GMT-14\"",
    "\"America/New_York\"",
    "\"Europe/Dublin\"",
    "\"Australia/Lord_Howe\"",
    "\"Pacific/Apia\"",
    "\"local\"",
    "\"(\"",
    "\"a{1000}{1000}{1000}\"",
    "\"\\\\p{Foo}\"",
    "\"/\"",
    "\"~2\"",
    "\"/a~\"",
    "\"/a/~1/~0\"",
    "\"00:00\"",
    "\"24:00\"",
    "\"23:59\"",
    "\"23:60\"",
    "\"25:00\"",
    "\"12:00:00\"",
    "\"-1:00\"",
    "\"mon\"",
    "\"sun-sat\"",
    "\"sat-sun\"",
    "\"fri-mon\"",
    "\"mon-\"",
    "\"mon,wed,fri\"",
    "\"daily\"",
    "\"2026-02-30\"",
    "\"2026-02-29\"",
    "\"9999-12-31\"",
    "\"0000-01-01\"",
    "\"+262143-12-31\"",
    "2026-12-25",
    "2026-03-08T02:30:00",
    "1979-05-27T07:32:00Z",
    "07:32:00",
    "0",
    "-1",
    "1",
    "-9223372036854775808",
    "9223372036854775807",
    "18446744073709551615",
    "1e400",
    "-0.0",
    "nan",
    "inf",
    "-inf",
    "0.001",
    "true",
    "[]",
    "[1, 2, 1]",
    "[-1, 0]",
    "{}",
    "{ env = \"NOPE\" }",
    "{ value = \"\" }",
    "{ file = \"/nonexistent/secret\" }",
    "\"whsec_\"",
    "\"whsec_!!\"",
    "\"http://\"",
    "\"http://[::1]:99999/v3\"",
    "\"127.0.0.1:99999\"",
    "\"::\"",
    "'''\nmulti\nline'''",
    "\"\\u00e9\\ud800\"",
];

#[derive(Debug, Clone)]
enum Edit {
    DeleteChar(Index),
    InsertChar(Index, char),
    ReplaceChar(Index, char),
    DeleteLine(Index),
    DuplicateLine(Index),
    SwapLines(Index, Index),
    /// Replaces the value of a `key = value` (the rest of the line).
    ReplaceValue(Index, String),
    /// Replaces the contents of a quoted string.
    ReplaceString(Index, String),
}

fn edit() -> impl Strategy<Value = Edit> {
    let ch = prop_oneof![
        3 => proptest::sample::select("[]{}=\"',.#\n 0123456789-:*/~\\".chars().collect::<Vec<_>>()),
        1 => any::<char>(),
    ];
    let value = prop_oneof![
        3 => proptest::sample::select(VALUES).prop_map(str::to_string),
        1 => "\"[ -~]{0,20}\"",
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<f64>().prop_map(|f| format!("{f:?}")),
    ];
    let string = prop_oneof![
        3 => proptest::sample::select(VALUES)
            .prop_filter_map("a string", |v| Some(v.strip_prefix('"')?.strip_suffix('"')?.to_string())),
        1 => "[a-zA-Z0-9 */,#LW?:@+-]{0,20}",
        1 => "\\PC{0,12}".prop_map(|s| s.replace(['"', '\\', '\n', '\r'], "")),
    ];
    prop_oneof![
        1 => any::<Index>().prop_map(Edit::DeleteChar),
        1 => (any::<Index>(), ch.clone()).prop_map(|(i, c)| Edit::InsertChar(i, c)),
        1 => (any::<Index>(), ch).prop_map(|(i, c)| Edit::ReplaceChar(i, c)),
        1 => any::<Index>().prop_map(Edit::DeleteLine),
        1 => any::<Index>().prop_map(Edit::DuplicateLine),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Edit::SwapLines(a, b)),
        4 => (any::<Index>(), value).prop_map(|(i, v)| Edit::ReplaceValue(i, v)),
        6 => (any::<Index>(), string).prop_map(|(i, s)| Edit::ReplaceString(i, s)),
    ]
}

fn apply_edit(text: &str, edit: &Edit) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    let mut lines: Vec<String> = text.split_inclusive('\n').map(str::to_string).collect();
    match edit {
        Edit::DeleteChar(i) if !chars.is_empty() => {
            chars.remove(i.index(chars.len()));
            chars.into_iter().collect()
        }
        Edit::InsertChar(i, c) => {
            chars.insert(i.index(chars.len() + 1), *c);
            chars.into_iter().collect()
        }
        Edit::ReplaceChar(i, c) if !chars.is_empty() => {
            let i = i.index(chars.len());
            chars[i] = *c;
            chars.into_iter().collect()
        }
        Edit::DeleteLine(i) if !lines.is_empty() => {
            lines.remove(i.index(lines.len()));
            lines.concat()
        }
        Edit::DuplicateLine(i) if !lines.is_empty() => {
            let i = i.index(lines.len());
            let line = lines[i].clone();
            lines.insert(i, line);
            lines.concat()
        }
        Edit::SwapLines(a, b) if !lines.is_empty() => {
            let (a, b) = (a.index(lines.len()), b.index(lines.len()));
            lines.swap(a, b);
            lines.concat()
        }
        Edit::ReplaceValue(i, v) => {
            let assignments: Vec<usize> = (0..lines.len())
                .filter(|&n| lines[n].contains(" = ") && !lines[n].trim_start().starts_with('#'))
                .collect();
            if assignments.is_empty() {
                return text.to_string();
            }
            let n = assignments[i.index(assignments.len())];
            let at = lines[n].find(" = ").unwrap() + 3;
            lines[n] = format!("{}{v}\n", &lines[n][..at]);
            lines.concat()
        }
        Edit::ReplaceString(i, s) => {
            // The byte offsets of the quotes that open a string.
            let quotes: Vec<usize> = text.match_indices('"').map(|(at, _)| at).collect();
            if quotes.len() < 2 {
                return text.to_string();
            }
            // Quotes pair up (the seeds escape none), so an even one opens a string.
            let k = 2 * i.index(quotes.len() / 2);
            let (open, close) = (quotes[k], quotes[k + 1]);
            format!("{}{s}{}", &text[..=open], &text[close..])
        }
        _ => text.to_string(),
    }
}

#[test]
fn config_mutations() {
    fuzz(
        "config_mutations",
        (
            proptest::sample::select(&SEEDS[..]),
            proptest::collection::vec(edit(), 1..5),
        ),
        |(name, edits)| {
            let mut text = seed(name).to_string();
            for e in &edits {
                text = apply_edit(&text, e);
            }
            let r = Config::from_toml(&text, Path::new("fuzz.toml"), &seed_env());
            check_located(&text, r)
        },
    );
}

/// A mutated config with an `AUTOPILOT_*` override set (as in a container): an error
/// either has its place in the file or names the override that caused it.
#[test]
fn config_mutations_with_override() {
    let var = prop_oneof![
        Just(("AUTOPILOT_QUEUE__WORKERS", "3")),
        Just(("AUTOPILOT_SERVER__LISTEN", "0.0.0.0:8080")),
        Just(("AUTOPILOT_PLATFORM__TOKEN", "{ value = \"t\" }")),
        Just(("AUTOPILOT_RULES__0__CATCH_UP", "1h")),
    ];
    fuzz(
        "config_mutations_with_override",
        (
            proptest::sample::select(&SEEDS[..]),
            proptest::collection::vec(edit(), 1..5),
            var,
        ),
        |(name, edits, (key, value))| {
            let mut text = seed(name).to_string();
            for e in &edits {
                text = apply_edit(&text, e);
            }
            let mut env = seed_env();
            env.push((key.to_string(), value.to_string()));
            let Err(errors) = Config::from_toml(&text, Path::new("fuzz.toml"), &env) else {
                return Ok(());
            };
            for m in errors.messages() {
                let ok = located(&text, &m).is_ok() || m.contains("AUTOPILOT_");
                prop_assert!(ok, "error neither located nor naming an override: {:?}", m);
            }
            Ok(())
        },
    );
}

/// `AUTOPILOT_*` overrides on a valid config: never a panic; an error either has its
/// place in the file or names the override that caused it.
#[test]
fn config_env_overrides() {
    let key = prop_oneof![
        "AUTOPILOT_(SERVER|DATABASE|PLATFORM|QUEUE|DEFAULTS)__[A-Z_]{1,16}",
        "AUTOPILOT_(SOURCES|RULES|SHIFTS)__[0-9]{1,2}__(NAME|AUTH|CATCH_UP|AGENTS|SET|WEBHOOK|SCHEDULE|ID|AUTH__KIND|SCHEDULE__CRON|WINDOWS__0__FROM)",
        "AUTOPILOT_[A-Z_0-9]{0,20}",
        "AUTOPILOT_.{0,12}",
    ];
    let value = prop_oneof![
        proptest::sample::select(VALUES).prop_map(str::to_string),
        "[ -~]{0,24}",
        any::<String>(),
    ];
    fuzz(
        "config_env_overrides",
        (
            proptest::sample::select(&SEEDS[..]),
            proptest::collection::vec((key, value), 1..4),
        ),
        |(name, vars)| {
            let seed = seed(name);
            let mut env = seed_env();
            env.extend(vars.iter().cloned());
            let Err(errors) = Config::from_toml(seed, Path::new("fuzz.toml"), &env) else {
                return Ok(());
            };
            for m in errors.messages() {
                let ok = located(seed, &m).is_ok() || m.contains("AUTOPILOT_");
                prop_assert!(ok, "error neither located nor naming an override: {:?}", m);
            }
            Ok(())
        },
    );
}
