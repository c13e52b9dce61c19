//! Sender authentication for webhook sources. Every comparison is constant-time; a
//! failure says only "unauthorized" to the sender, and nothing about the secret to logs.

use crate::config::{HmacAlgo, SigEncoding, SourceAuth};
use base64::Engine;
use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use serde_json::Value;
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// What the request offers to prove who sent it.
pub struct Offered<'a> {
    pub headers: &'a axum::http::HeaderMap,
    pub query: Option<&'a str>,
    pub raw_body: &'a [u8],
    /// Now, in Unix seconds (for timestamped schemes).
    pub now: i64,
    /// The secret path segment of `/webhooks/{source}/{token}`, if the URL had one.
    pub path_token: Option<&'a str>,
}

/// Checks what can be checked before the body is parsed (HMAC, basic, query). Static
/// body fields are checked by [`check_static_body`] after parsing.
pub fn verify_raw(auth: &SourceAuth, offered: &Offered<'_>) -> Verdict {
    // A secret path segment belongs to `path` sources only.
    if offered.path_token.is_some() != matches!(auth, SourceAuth::PathToken { .. }) {
        return Verdict::Denied("path token present on a source that does not use one, or missing");
    }
    match auth {
        SourceAuth::PathToken { secret } => {
            let given = offered.path_token.unwrap_or_default();
            if ct_eq(given.as_bytes(), secret.expose_secret().as_bytes()) {
                Verdict::Allowed
            } else {
                Verdict::Denied("path token mismatch")
            }
        }
        SourceAuth::Hmac {
            algo,
            header,
            encoding,
            prefix,
            secrets,
        } => {
            let Some(value) = offered
                .headers
                .get(header.as_str())
                .and_then(|v| v.to_str().ok())
            else {
                return Verdict::Denied("signature header missing");
            };
            let given = signatures(value, prefix, *encoding);
            if given.is_empty() {
                return Verdict::Denied("no readable signature in the header");
            }
            // Any signature under any active secret passes (rotation, several signers).
            let ok = secrets.iter().any(|secret| {
                let key = secret.expose_secret().as_bytes();
                given
                    .iter()
                    .any(|sig| verify_mac(*algo, key, offered.raw_body, sig))
            });
            if ok {
                Verdict::Allowed
            } else {
                Verdict::Denied("signature mismatch")
            }
        }
        SourceAuth::StandardWebhooks { keys, tolerance } => {
            let header = |name: &str| offered.headers.get(name).and_then(|v| v.to_str().ok());
            let (Some(id), Some(ts), Some(sigs)) = (
                header("webhook-id"),
                header("webhook-timestamp"),
                header("webhook-signature"),
            ) else {
                return Verdict::Denied("standard-webhooks headers missing");
            };
            let Ok(ts_secs) = ts.trim().parse::<i64>() else {
                return Verdict::Denied("webhook-timestamp is not a number");
            };
            // abs_diff: a timestamp near i64::MIN must not overflow the subtraction.
            if offered.now.abs_diff(ts_secs) > tolerance.as_secs() {
                return Verdict::Denied("webhook-timestamp outside the tolerance (replay?)");
            }
            let given: Vec<Vec<u8>> = sigs
                .split_whitespace()
                .filter_map(|e| e.strip_prefix("v1,"))
                .filter_map(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .collect();
            let mut signed = Vec::with_capacity(id.len() + ts.len() + offered.raw_body.len() + 2);
            signed.extend_from_slice(id.as_bytes());
            signed.push(b'.');
            signed.extend_from_slice(ts.as_bytes());
            signed.push(b'.');
            signed.extend_from_slice(offered.raw_body);
            let ok = keys.iter().any(|k| {
                let Ok(key) = base64::engine::general_purpose::STANDARD.decode(k.expose_secret())
                else {
                    return false;
                };
                given
                    .iter()
                    .any(|sig| verify_mac(HmacAlgo::Sha256, &key, &signed, sig))
            });
            if ok {
                Verdict::Allowed
            } else {
                Verdict::Denied("signature mismatch")
            }
        }
        SourceAuth::Basic { username, password } => {
            let Some(h) = offered
                .headers
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
            else {
                return Verdict::Denied("authorization header missing");
            };
            let Some(b64) = h
                .split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
                .map(|(_, rest)| rest)
            else {
                return Verdict::Denied("not basic authorization");
            };
            let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else {
                return Verdict::Denied("basic credentials are not base64");
            };
            let expected = format!("{username}:{}", password.expose_secret());
            if ct_eq(&decoded, expected.as_bytes()) {
                Verdict::Allowed
            } else {
                Verdict::Denied("basic credentials mismatch")
            }
        }
        SourceAuth::Static { query, secret, .. } => {
            if let (Some(name), Some(q)) = (query, offered.query) {
                for (k, v) in form_urlencoded::parse(q.as_bytes()) {
                    if k == name.as_str() {
                        return if ct_eq(v.as_bytes(), secret.expose_secret().as_bytes()) {
                            Verdict::Allowed
                        } else {
                            Verdict::Denied("static parameter mismatch")
                        };
                    }
                }
            }
            Verdict::NeedsBody
        }
    }
}

/// The signatures in a header value: entries separated by commas or white space, each
/// with the prefix (matched without regard to case; entries without it are ignored when
/// one is configured), decoded from hex or base64. Unreadable entries are ignored.
pub fn signatures(value: &str, prefix: &str, encoding: SigEncoding) -> Vec<Vec<u8>> {
    value
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .filter_map(|t| {
            let body = t
                .get(..prefix.len())
                .filter(|p| p.eq_ignore_ascii_case(prefix))?;
            let sig = &t[body.len()..];
            match encoding {
                SigEncoding::Hex => hex::decode(sig).ok(),
                SigEncoding::Base64 => base64::engine::general_purpose::STANDARD.decode(sig).ok(),
            }
        })
        .collect()
}

/// Constant-time check of one signature (`verify_slice` compares in constant time).
fn verify_mac(algo: HmacAlgo, key: &[u8], body: &[u8], sig: &[u8]) -> bool {
    fn check<M: Mac + hmac::digest::KeyInit>(key: &[u8], body: &[u8], sig: &[u8]) -> bool {
        let Ok(mut mac) = <M as hmac::digest::KeyInit>::new_from_slice(key) else {
            return false;
        };
        mac.update(body);
        mac.verify_slice(sig).is_ok()
    }
    match algo {
        HmacAlgo::Sha1 => check::<Hmac<sha1::Sha1>>(key, body, sig),
        HmacAlgo::Sha256 => check::<Hmac<Sha256>>(key, body, sig),
        HmacAlgo::Sha512 => check::<Hmac<sha2::Sha512>>(key, body, sig),
    }
}

/// The static parameter in a parsed body: a JSON pointer for JSON bodies, a plain field
/// name for form bodies.
pub fn check_static_body(auth: &SourceAuth, payload: &Value, is_form: bool) -> Verdict {
    let SourceAuth::Static {
        field,
        form_field,
        secret,
        ..
    } = auth
    else {
        return Verdict::Allowed;
    };
    let found = if is_form {
        form_field.as_ref().and_then(|f| payload.get(f.as_str()))
    } else {
        field.as_ref().and_then(|p| payload.pointer(p))
    };
    match found.and_then(Value::as_str) {
        Some(v) if ct_eq(v.as_bytes(), secret.expose_secret().as_bytes()) => Verdict::Allowed,
        Some(_) => Verdict::Denied("static parameter mismatch"),
        None => Verdict::Denied("static parameter missing"),
    }
}

/// Removes the static secret from a payload before it is stored. Returns whether the
/// source carries its secret in the body at all.
pub fn redact(auth: &SourceAuth, payload: &mut Value, is_form: bool) -> bool {
    let SourceAuth::Static {
        field, form_field, ..
    } = auth
    else {
        return false;
    };
    let target = if is_form {
        form_field
            .as_ref()
            .and_then(|f| payload.get_mut(f.as_str()))
    } else {
        field.as_ref().and_then(|p| payload.pointer_mut(p))
    };
    if let Some(v) = target {
        *v = Value::String("[redacted]".into());
    }
    true
}

/// Constant-time equality that does not reveal the secret's length either: both sides
/// are hashed first, and the digests are compared in constant time.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::Digest;
    let (da, db) = (Sha256::digest(a), Sha256::digest(b));
    bool::from(da.as_slice().ct_eq(db.as_slice()))
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// The reason is for the debug log only; the sender sees a generic 401.
    Denied(&'static str),
    NeedsBody,
}
