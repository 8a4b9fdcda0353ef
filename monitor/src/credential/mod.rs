//! Credentials found in requests, reduced to a keyed fingerprint and non-secret claims.

pub mod fingerprint;
pub mod jwt;
pub mod known_formats;

use base64::{Engine, engine::general_purpose::STANDARD};
use serde::Serialize;
use zeroize::Zeroizing;

pub use fingerprint::Fingerprinter;
pub use jwt::Claims;

use crate::parse::{Header, Login};

/// What leaves the parser: never the secret itself.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Credential {
    /// Header it was found in (lower case); `query` for the request's query string; the
    /// message field (`auth`, `password`, `md5-password`) for Redis and PostgreSQL.
    pub header: String,
    pub kind: &'static str,
    pub fingerprint: String,
    /// Non-secret identity carried by the credential: basic-auth, Redis or PostgreSQL user
    /// name, AWS access key id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Cookie name or query parameter that held it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Non-secret claims of a JWT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claims: Option<Box<Claims>>,
}

/// Where credentials are looked for besides `Authorization`. Names compare case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialConfig {
    /// Headers whose whole value is an API key.
    pub api_key_headers: Vec<String>,
    /// Cookies that hold sessions or tokens.
    pub cookie_names: Vec<String>,
    /// Query parameters that hold tokens.
    pub query_keys: Vec<String>,
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_ascii_lowercase()).collect()
}

impl Default for CredentialConfig {
    fn default() -> Self {
        CredentialConfig {
            api_key_headers: strings(&[
                "x-api-key",
                "api-key",
                "apikey",
                "x-apikey",
                "x-auth-token",
                "x-access-token",
                "private-token",
                "x-goog-api-key",
                "x-amz-security-token",
                "ocp-apim-subscription-key",
                "x-functions-key",
                "x-vault-token",
                "x-consul-token",
                "x-nomad-token",
            ]),
            cookie_names: strings(&[
                "session",
                "sessionid",
                "jsessionid",
                "phpsessid",
                "connect.sid",
                "_session",
                "auth_token",
                "access_token",
                "id_token",
                "token",
                "asp.net_sessionid",
                "laravel_session",
                "_oauth2_proxy",
            ]),
            query_keys: strings(&[
                "access_token",
                "id_token",
                "api_key",
                "apikey",
                "api-key",
                "token",
                "key",
                "sig",
                "signature",
                "auth",
                "x-amz-signature",
                "x-goog-signature",
            ]),
        }
    }
}

/// Cookies or query parameters looked at in one request: more is not worth the time.
const MAX_PAIRS: usize = 64;

/// Extracts credentials from a request's headers and the query string of its `path`.
pub fn extract(
    headers: &[Header],
    path: &str,
    cfg: &CredentialConfig,
    fp: &Fingerprinter,
) -> Vec<Credential> {
    let mut out = Vec::new();
    for h in headers {
        let name = h.name.as_str();
        if name == "authorization" || name == "proxy-authorization" {
            out.extend(authorization(name, &h.value, fp));
        } else if name == "cookie" {
            cookies(&h.value, cfg, fp, &mut out);
        } else if cfg.api_key_headers.iter().any(|k| k == name) {
            let v = trim(&h.value);
            if !v.is_empty() {
                out.push(token(name, "api-key", v, fp));
            }
        } else {
            for (kind, t) in known_formats::find(&h.value) {
                out.push(token(name, kind, t, fp));
            }
        }
    }
    query(path, cfg, fp, &mut out);
    out
}

/// The credential of a Redis or PostgreSQL login, if a secret crossed the wire.
pub fn login(l: &Login, fp: &Fingerprinter) -> Option<Credential> {
    let secret = l.secret.as_ref()?;
    Some(Credential {
        header: l.field.to_string(),
        kind: l.kind,
        fingerprint: fp.fingerprint(secret),
        user: l.user.clone(),
        name: None,
        claims: None,
    })
}

/// A token found whole: a vendor format refines `kind`, a JWT brings its claims (and makes a
/// bearer token `bearer-jwt`).
fn token(header: &str, kind: &'static str, v: &[u8], fp: &Fingerprinter) -> Credential {
    let known = known_formats::classify(v);
    let claims = jwt::decode(v).map(Box::new);
    let kind = match (known, &claims) {
        (Some(k), _) => k,
        (None, Some(_)) if kind == "bearer" => "bearer-jwt",
        _ => kind,
    };
    Credential {
        header: header.to_string(),
        kind,
        fingerprint: fp.fingerprint(v),
        // An AWS access key id names the key; it is not the secret.
        user: (known == Some("aws-access-key")).then(|| String::from_utf8_lossy(v).into_owned()),
        name: None,
        claims,
    }
}

fn authorization(header: &str, value: &[u8], fp: &Fingerprinter) -> Option<Credential> {
    let value = trim(value);
    let Some(sp) = value.iter().position(|&b| b == b' ') else {
        // No scheme: only a value that is recognisably a token counts.
        return Some(token(header, "bearer", value, fp)).filter(|c| c.kind != "bearer");
    };
    let scheme = String::from_utf8_lossy(&value[..sp]).to_ascii_lowercase();
    let secret = trim(&value[sp..]);
    if secret.is_empty() {
        return None;
    }
    Some(match scheme.as_str() {
        "bearer" => token(header, "bearer", secret, fp),
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
                name: None,
                claims: None,
            }
        }
        "aws4-hmac-sha256" => {
            // Credential=AKID/date/region/service/aws4_request: the signature changes with
            // every request, the access key id is the identity.
            let akid = sigv4_access_key(secret)?;
            Credential {
                header: header.to_string(),
                kind: "aws-sigv4",
                fingerprint: fp.fingerprint(akid),
                user: Some(String::from_utf8_lossy(akid).into_owned()),
                name: None,
                claims: None,
            }
        }
        _ => token(header, "authorization", secret, fp),
    })
}

/// The access key id of SigV4 `Credential=AKID/...` parameters.
fn sigv4_access_key(params: &[u8]) -> Option<&[u8]> {
    params
        .split(|&b| b == b',')
        .map(trim)
        .find_map(|p| p.strip_prefix(b"Credential="))
        .and_then(|c| c.split(|&b| b == b'/').next())
        .filter(|k| !k.is_empty())
}

fn cookies(value: &[u8], cfg: &CredentialConfig, fp: &Fingerprinter, out: &mut Vec<Credential>) {
    for pair in value.split(|&b| b == b';').take(MAX_PAIRS) {
        let Some(eq) = pair.iter().position(|&b| b == b'=') else {
            continue;
        };
        let name = String::from_utf8_lossy(trim(&pair[..eq])).to_ascii_lowercase();
        let mut v = trim(&pair[eq + 1..]);
        if v.len() >= 2 && v[0] == b'"' && v[v.len() - 1] == b'"' {
            v = &v[1..v.len() - 1];
        }
        if v.is_empty() || !cfg.cookie_names.contains(&name) {
            continue;
        }
        out.push(Credential {
            name: Some(name),
            ..token("cookie", "cookie", v, fp)
        });
    }
}

fn query(path: &str, cfg: &CredentialConfig, fp: &Fingerprinter, out: &mut Vec<Credential>) {
    let Some((_, q)) = path.split_once('?') else {
        return;
    };
    let q = q.split('#').next().unwrap_or_default();
    for pair in q.split('&').take(MAX_PAIRS) {
        let Some((k, v)) = pair.split_once('=') else {
            continue;
        };
        let key = Zeroizing::new(percent_decode(k.as_bytes()));
        let key = String::from_utf8_lossy(&key).to_ascii_lowercase();
        // Decoded so that differently encoded copies of a token agree.
        let v = Zeroizing::new(percent_decode(v.as_bytes()));
        if v.is_empty() {
            continue;
        }
        if key == "x-amz-credential" {
            // Presigned URL: AKID/date/region/service/aws4_request.
            if let Some(akid) = v.split(|&b| b == b'/').next().filter(|k| !k.is_empty()) {
                out.push(Credential {
                    header: "query".into(),
                    kind: "aws-sigv4",
                    fingerprint: fp.fingerprint(akid),
                    user: Some(String::from_utf8_lossy(akid).into_owned()),
                    name: Some(key),
                    claims: None,
                });
            }
        } else if cfg.query_keys.contains(&key) {
            out.push(Credential {
                name: Some(key),
                ..token("query", "query", &v, fp)
            });
        }
    }
}

/// The path with the values of credential-bearing query parameters replaced, so that records
/// can show where a request went without the token it carried.
pub fn redact_path<'a>(path: &'a str, cfg: &CredentialConfig) -> std::borrow::Cow<'a, str> {
    let Some((base, q)) = path.split_once('?') else {
        return path.into();
    };
    let secret = |k: &str| {
        let k = String::from_utf8_lossy(&percent_decode(k.as_bytes())).to_ascii_lowercase();
        cfg.query_keys.contains(&k)
    };
    if !q.split('&').take(MAX_PAIRS).any(|p| {
        p.split_once('=')
            .is_some_and(|(k, v)| !v.is_empty() && secret(k))
    }) {
        return path.into();
    }
    let mut out = String::with_capacity(path.len());
    out.push_str(base);
    out.push('?');
    for (i, pair) in q.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((k, v)) if i < MAX_PAIRS && !v.is_empty() && secret(k) => {
                out.push_str(k);
                out.push_str("=REDACTED");
                // A fragment after the value is kept.
                if let Some((_, frag)) = v.split_once('#') {
                    out.push('#');
                    out.push_str(frag);
                }
            }
            _ => out.push_str(pair),
        }
    }
    out.into()
}

fn percent_decode(s: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%'
            && let (Some(h), Some(l)) = (
                s.get(i + 1).copied().and_then(hex),
                s.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(h << 4 | l);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
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
    use crate::credential::jwt::tests::token as jwt;

    fn fp() -> Fingerprinter {
        Fingerprinter::from_key(b"0123456789abcdef")
    }

    fn all(headers: &[(&str, &str)], path: &str) -> Vec<Credential> {
        let hs: Vec<Header> = headers
            .iter()
            .map(|(n, v)| Header::new(n, v.as_bytes()))
            .collect();
        extract(&hs, path, &CredentialConfig::default(), &fp())
    }

    fn one(name: &str, value: &str) -> Vec<Credential> {
        all(&[(name, value)], "/")
    }

    #[test]
    fn bearer_fingerprint_is_hmac_of_the_token() {
        let c = one("Authorization", "Bearer abc.def");
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].kind, "bearer");
        assert_eq!(c[0].fingerprint, fp().fingerprint(b"abc.def"));
        assert_eq!(c[0].claims, None);
    }

    #[test]
    fn jwt_and_basic() {
        // {"alg":"HS256"} . {"sub":"x"} . sig
        let c = one(
            "authorization",
            "bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln",
        );
        assert_eq!(c[0].kind, "bearer-jwt");
        assert_eq!(c[0].claims.as_ref().unwrap().sub.as_deref(), Some("x"));
        let c = one("Authorization", "Basic dXNlcjpwYXNz");
        assert_eq!((c[0].kind, c[0].user.as_deref()), ("basic", Some("user")));
        assert_eq!(c[0].fingerprint, fp().fingerprint(b"user:pass"));
    }

    #[test]
    fn bearer_jwt_keeps_claims_not_the_token() {
        let t = jwt(
            r#"{"alg":"RS256","kid":"k"}"#,
            r#"{"iss":"https://idp","sub":"svc","exp":2000000000}"#,
        );
        let c = one("authorization", &format!("Bearer {t}"));
        assert_eq!(c[0].kind, "bearer-jwt");
        assert_eq!(c[0].fingerprint, fp().fingerprint(t.as_bytes()));
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains(r#""iss":"https://idp""#), "{json}");
        assert!(!json.contains(&t) && !json.contains("c2lnbmF0dXJl"));
        // A bare JWT in Authorization (no scheme) is still one.
        assert_eq!(one("authorization", &t)[0].kind, "bearer-jwt");
    }

    #[test]
    fn api_key_headers_are_configurable() {
        let c = one("X-API-Key", "k-123");
        assert_eq!((c[0].kind, c[0].header.as_str()), ("api-key", "x-api-key"));
        assert_eq!(c[0].fingerprint, fp().fingerprint(b"k-123"));
        assert_eq!(one("private-token", "glpat-x")[0].kind, "api-key");
        let cfg = CredentialConfig {
            api_key_headers: vec!["x-custom".into()],
            ..CredentialConfig::default()
        };
        let hs = [
            Header::new("X-Custom", b"v"),
            Header::new("x-api-key", b"v"),
        ];
        let c = extract(&hs, "/", &cfg, &fp());
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].header, "x-custom");
    }

    #[test]
    fn cookies_by_name() {
        let c = one(
            "Cookie",
            "theme=dark; JSESSIONID=abc123; session=\"q\"; other=x; token=",
        );
        let got: Vec<_> = c.iter().map(|c| (c.kind, c.name.as_deref())).collect();
        assert_eq!(
            got,
            [("cookie", Some("jsessionid")), ("cookie", Some("session"))]
        );
        assert_eq!(c[0].fingerprint, fp().fingerprint(b"abc123"));
        assert_eq!(c[1].fingerprint, fp().fingerprint(b"q"));
    }

    #[test]
    fn query_keys_are_decoded_before_fingerprinting() {
        let c = all(&[], "/cb?x=1&access_token=a%2Fb&API_KEY=k#frag");
        let got: Vec<_> = c.iter().map(|c| (c.kind, c.name.as_deref())).collect();
        assert_eq!(
            got,
            [("query", Some("access_token")), ("query", Some("api_key"))]
        );
        assert_eq!(c[0].fingerprint, fp().fingerprint(b"a/b"));
        assert_eq!(c[1].fingerprint, fp().fingerprint(b"k"));
        assert!(all(&[], "/no-query").is_empty());
        let cfg = CredentialConfig::default();
        assert_eq!(
            redact_path("/cb?x=1&access_token=a%2Fb&API_KEY=k#frag", &cfg),
            "/cb?x=1&access_token=REDACTED&API_KEY=REDACTED#frag"
        );
        assert!(matches!(
            redact_path("/a?x=1&token=", &cfg),
            std::borrow::Cow::Borrowed(_)
        ));
        assert!(all(&[], "/?token=&%zz=%").is_empty());
    }

    #[test]
    fn aws_sigv4_identity_is_the_access_key_id() {
        let v = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, \
                 SignedHeaders=host;x-amz-date, Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7";
        let c = one("Authorization", v);
        assert_eq!(c[0].kind, "aws-sigv4");
        assert_eq!(c[0].user.as_deref(), Some("AKIDEXAMPLE"));
        assert_eq!(c[0].fingerprint, fp().fingerprint(b"AKIDEXAMPLE"));
        assert!(!serde_json::to_string(&c).unwrap().contains("5d672d79"));
        let c = all(
            &[],
            "/b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20150830%2Fus-east-1%2Fs3%2Faws4_request",
        );
        assert_eq!(
            (c[0].kind, c[0].user.as_deref()),
            ("aws-sigv4", Some("AKIDEXAMPLE"))
        );
    }

    #[test]
    fn vendor_formats_in_any_header() {
        let gh = format!("ghp_{}", "x".repeat(36));
        let c = one("X-Forwarded-Token", &format!("token={gh}"));
        assert_eq!(c[0].kind, "github-token");
        assert_eq!(c[0].fingerprint, fp().fingerprint(gh.as_bytes()));
        assert_eq!(
            one("authorization", &format!("token {gh}"))[0].kind,
            "github-token"
        );
        assert_eq!(
            one("authorization", &format!("Bearer {gh}"))[0].kind,
            "github-token"
        );
        assert_eq!(
            one("x-slack", "xoxb-123456789012-abc")[0].kind,
            "slack-token"
        );
        assert_eq!(
            one("x-api-key", "sk_live_0123456789abcdefABCD")[0].kind,
            "stripe-key"
        );
        let c = one("x-amz-thing", "AKIAIOSFODNN7EXAMPLE");
        assert_eq!(
            (c[0].kind, c[0].user.as_deref()),
            ("aws-access-key", Some("AKIAIOSFODNN7EXAMPLE"))
        );
        assert!(one("user-agent", "curl/8.5.0").is_empty());
    }

    #[test]
    fn logins() {
        let l = Login {
            protocol: "redis",
            command: "AUTH",
            user: Some("app".into()),
            database: None,
            secret: Some(Zeroizing::new(b"pw".to_vec())),
            kind: "redis-auth",
            field: "auth",
        };
        let c = login(&l, &fp()).unwrap();
        assert_eq!((c.kind, c.user.as_deref()), ("redis-auth", Some("app")));
        assert_eq!(c.fingerprint, fp().fingerprint(b"pw"));
        assert!(!format!("{l:?}").contains("pw\""));
        let l = Login {
            protocol: "postgres",
            command: "PASSWORD",
            user: Some("u".into()),
            database: Some("d".into()),
            secret: Some(Zeroizing::new(b"md5abc".to_vec())),
            kind: "postgres-password",
            field: "md5-password",
        };
        let c = login(&l, &fp()).unwrap();
        assert_eq!(
            (c.kind, c.header.as_str()),
            ("postgres-password", "md5-password")
        );
        assert!(login(&Login { secret: None, ..l }, &fp()).is_none());
    }

    #[test]
    fn garbage_is_not_a_panic_and_secret_not_in_output() {
        assert!(one("authorization", "Bearer ").is_empty());
        assert!(one("authorization", "Basic %%%").is_empty());
        assert!(one("authorization", "Bearer").is_empty());
        assert!(one("authorization", "AWS4-HMAC-SHA256 Signature=x").is_empty());
        let c = one("authorization", "Bearer not.a.jwt!!");
        assert_eq!(c[0].kind, "bearer");
        // Garbage base64 in each JWT part.
        for t in ["%%.e30.x", "eyJhbGciOiJIUzI1NiJ9.%%%.x", "eyJhbGciOi.e30.x"] {
            let c = one("authorization", &format!("Bearer {t}"));
            assert!(c[0].kind == "bearer" || c[0].claims.as_ref().unwrap().sub.is_none());
        }
        let json = serde_json::to_string(&c).unwrap();
        assert!(!json.contains("not.a.jwt"));
        assert!(!format!("{c:?}").contains("not.a.jwt"));
    }
}
