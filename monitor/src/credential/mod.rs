//! Credentials found in requests, reduced to a keyed fingerprint and non-secret claims.

pub mod fingerprint;

use base64::{Engine, engine::general_purpose::STANDARD};
use serde::Serialize;
use zeroize::Zeroizing;

pub use fingerprint::Fingerprinter;

use crate::parse::Header;

/// What leaves the parser: never the secret itself.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Credential {
    /// Header it was found in (lower case).
    pub header: String,
    pub kind: &'static str,
    pub fingerprint: String,
    /// Non-secret identity carried by the credential (basic-auth user name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// A compact JWS: three base64url parts, the first a JSON object with `alg`.
fn is_jwt(token: &[u8]) -> bool {
    let mut parts = token.split(|&b| b == b'.');
    let (Some(h), Some(p), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    if p.is_empty() {
        return false;
    }
    let Ok(header) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(h) else {
        return false;
    };
    let header = Zeroizing::new(header);
    serde_json::from_slice::<serde_json::Value>(&header).is_ok_and(|v| v.get("alg").is_some())
}

/// Extracts credentials from request headers.
pub fn extract(headers: &[Header], fp: &Fingerprinter) -> Vec<Credential> {
    let mut out = Vec::new();
    for h in headers {
        if (h.name == "authorization" || h.name == "proxy-authorization")
            && let Some(c) = authorization(&h.name, &h.value, fp)
        {
            out.push(c);
        }
    }
    out
}

fn authorization(header: &str, value: &[u8], fp: &Fingerprinter) -> Option<Credential> {
    let value = trim(value);
    let sp = value.iter().position(|&b| b == b' ').unwrap_or(value.len());
    let scheme = String::from_utf8_lossy(&value[..sp]).to_ascii_lowercase();
    let secret = trim(&value[sp..]);
    if secret.is_empty() {
        return None;
    }
    let cred = |kind, user| Credential {
        header: header.to_string(),
        kind,
        fingerprint: fp.fingerprint(secret),
        user,
    };
    Some(match scheme.as_str() {
        "bearer" if is_jwt(secret) => cred("bearer-jwt", None),
        "bearer" => cred("bearer", None),
        "basic" => {
            // Fingerprint the decoded user:password so that encodings of it agree.
            let decoded = Zeroizing::new(STANDARD.decode(secret).ok()?);
            let user = decoded
                .split(|&b| b == b':')
                .next()
                .map(|u| String::from_utf8_lossy(u).into_owned());
            Credential {
                header: header.to_string(),
                kind: "basic",
                fingerprint: fp.fingerprint(&decoded),
                user,
            }
        }
        _ => cred("authorization", None),
    })
}

fn trim(v: &[u8]) -> &[u8] {
    let s = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let e = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(s, |e| e + 1);
    &v[s..e]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp() -> Fingerprinter {
        Fingerprinter::from_key(b"0123456789abcdef")
    }

    fn one(name: &str, value: &str) -> Vec<Credential> {
        extract(&[Header::new(name, value.as_bytes())], &fp())
    }

    #[test]
    fn bearer_fingerprint_is_hmac_of_the_token() {
        let c = one("Authorization", "Bearer abc.def");
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].kind, "bearer");
        assert_eq!(c[0].fingerprint, fp().fingerprint(b"abc.def"));
    }

    #[test]
    fn jwt_and_basic() {
        // {"alg":"HS256"} . {"sub":"x"} . sig
        let c = one(
            "authorization",
            "bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln",
        );
        assert_eq!(c[0].kind, "bearer-jwt");
        let c = one("Authorization", "Basic dXNlcjpwYXNz");
        assert_eq!((c[0].kind, c[0].user.as_deref()), ("basic", Some("user")));
        assert_eq!(c[0].fingerprint, fp().fingerprint(b"user:pass"));
    }

    #[test]
    fn garbage_is_not_a_panic_and_secret_not_in_output() {
        assert!(one("authorization", "Bearer ").is_empty());
        assert!(one("authorization", "Basic %%%").is_empty());
        let c = one("authorization", "Bearer not.a.jwt!!");
        assert_eq!(c[0].kind, "bearer");
        let json = serde_json::to_string(&c).unwrap();
        assert!(!json.contains("not.a.jwt"));
    }
}
