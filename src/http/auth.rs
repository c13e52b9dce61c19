//! Sender authentication for webhook sources. Every comparison is constant-time; a
//! failure says only "unauthorized" to the sender, and nothing about the secret to logs.

use crate::config::{SigEncoding, SourceAuth};
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
}

/// Checks what can be checked before the body is parsed (HMAC, basic, query). Static
/// body fields are checked by [`check_static_body`] after parsing.
pub fn verify_raw(auth: &SourceAuth, offered: &Offered<'_>) -> Verdict {
    match auth {
        SourceAuth::HmacSha256 {
            header,
            encoding,
            prefix,
            secret,
        } => {
            let Some(sig) = offered
                .headers
                .get(header.as_str())
                .and_then(|v| v.to_str().ok())
            else {
                return Verdict::Denied("signature header missing");
            };
            let sig = sig.trim();
            // The prefix (e.g. `sha256=`) is matched without regard to case.
            let Some(sig) = sig
                .get(..prefix.len())
                .filter(|p| p.eq_ignore_ascii_case(prefix))
                .map(|_| &sig[prefix.len()..])
            else {
                return Verdict::Denied("signature prefix missing");
            };
            let given = match encoding {
                SigEncoding::Hex => hex::decode(sig.trim()).ok(),
                SigEncoding::Base64 => base64::engine::general_purpose::STANDARD
                    .decode(sig.trim())
                    .ok(),
            };
            let Some(given) = given else {
                return Verdict::Denied("signature is not valid hex/base64");
            };
            let mut mac = match Hmac::<Sha256>::new_from_slice(secret.expose_secret().as_bytes()) {
                Ok(m) => m,
                Err(_) => return Verdict::Denied("hmac key rejected"),
            };
            mac.update(offered.raw_body);
            // verify_slice compares in constant time.
            match mac.verify_slice(&given) {
                Ok(()) => Verdict::Allowed,
                Err(_) => Verdict::Denied("signature mismatch"),
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
