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
            let Some(sig) = sig.strip_prefix(prefix.as_str()) else {
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
                .strip_prefix("Basic ")
                .or_else(|| h.strip_prefix("basic "))
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

/// Removes the static secret from a payload before it is stored.
pub fn redact(auth: &SourceAuth, payload: &mut Value, is_form: bool) {
    let SourceAuth::Static {
        field, form_field, ..
    } = auth
    else {
        return;
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
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    // Length is not secret-dependent in a way worth hiding for fixed secrets; the
    // content comparison is constant-time.
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// The reason is for the debug log only; the sender sees a generic 401.
    Denied(&'static str),
    NeedsBody,
}
