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
                "refresh_token",
                "api_key",
                "apikey",
                "api-key",
                "token",
                "auth_token",
                "key",
                "sig",
                "signature",
                "auth",
                "client_secret",
                "secret",
                "password",
                "passwd",
                "pwd",
                "session",
                "sessionid",
                "jsessionid",
                "private_token",
                "x-amz-signature",
                "x-amz-security-token",
                "x-goog-signature",
            ]),
        }
    }
}

/// Query parameters whose values are hidden from the printed path although they are not
/// fingerprinted: secret, but not something a workload presents again and again (an OAuth
/// code is used once, a SAS or OAuth 1 signature changes with every request).
const REDACT_ONLY: &[&str] = &[
    "code",
    "client_assertion",
    "assertion",
    "oauth_signature",
    "sid",
];

/// Parts of a parameter name that mark its value as secret, for redaction only: a name the
/// lists above miss (`next_page_token`, `db_password`) is hidden from the path all the same,
/// but only listed names become credentials, so that detections rest on known meanings.
const REDACT_NAME_PARTS: &[&str] = &[
    "token",
    "secret",
    "passw",
    "pwd",
    "apikey",
    "api_key",
    "api-key",
    "signature",
    "session",
    "credential",
];

/// Query parameters examined in one request. Past it values are redacted unexamined (fail
/// closed): this bounds the work, not what is hidden.
const MAX_QUERY_PARAMS: usize = 4096;

/// Credentials taken from one cookie header or one query string: every pair is looked at,
/// but a request stuffed with thousands of token parameters costs no more than this many
/// HMACs.
const MAX_FOUND: usize = 64;

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
    userinfo_credential(path, fp, &mut out);
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
            basic(header, &decoded, fp)
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

/// `user:password` (Basic, URL userinfo): the user names the credential. Without a colon the
/// whole value is the secret (a token sent as the user name), and there is no user.
fn basic(header: &str, decoded: &[u8], fp: &Fingerprinter) -> Credential {
    let user = decoded
        .iter()
        .position(|&b| b == b':')
        .map(|i| String::from_utf8_lossy(&decoded[..i]).into_owned());
    Credential {
        header: header.to_string(),
        kind: "basic",
        fingerprint: fp.fingerprint(decoded),
        user,
        name: None,
        claims: None,
    }
}

fn cookies(value: &[u8], cfg: &CredentialConfig, fp: &Fingerprinter, out: &mut Vec<Credential>) {
    let mut found = 0;
    for pair in value.split(|&b| b == b';') {
        if found == MAX_FOUND {
            break;
        }
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
        found += 1;
        out.push(Credential {
            name: Some(name),
            ..token("cookie", "cookie", v, fp)
        });
    }
}

/// Where the userinfo of an absolute-form request target (`http://user:pass@host/`,
/// RFC 9112 §3.2.2) is: the range of `user:pass@`.
pub fn userinfo(path: &str) -> Option<std::ops::Range<usize>> {
    let scheme = path
        .bytes()
        .position(|b| !(b.is_ascii_alphanumeric() || b"+-.".contains(&b)))?;
    if scheme == 0 || !path.as_bytes()[0].is_ascii_alphabetic() {
        return None;
    }
    let start = scheme + path[scheme..].strip_prefix("://").map(|_| 3)?;
    let authority = &path[start..];
    let end = authority.find(['/', '?', '#']).unwrap_or(authority.len());
    let at = authority[..end].rfind('@')?;
    Some(start..start + at + 1)
}

/// Userinfo in the target is a password (or a token) like Basic's, fingerprinted the same
/// way so that `http://u:p@h/` and `Authorization: Basic dTpw` agree.
fn userinfo_credential(path: &str, fp: &Fingerprinter, out: &mut Vec<Credential>) {
    let Some(r) = userinfo(path) else {
        return;
    };
    let decoded = Zeroizing::new(percent_decode(&path.as_bytes()[r.start..r.end - 1]));
    if !decoded.is_empty() {
        out.push(basic("userinfo", &decoded, fp));
    }
}

/// What a query parameter is, by its (decoded, lower-cased) name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Param {
    Plain,
    /// Hidden from the path, not fingerprinted.
    Secret,
    /// A credential: fingerprinted and hidden.
    Credential,
    /// `X-Amz-Credential`: the access key id of a presigned URL, an identity, not a secret.
    AwsCredential,
}

fn classify(key: &str, cfg: &CredentialConfig) -> Param {
    if key == "x-amz-credential" {
        Param::AwsCredential
    } else if cfg.query_keys.iter().any(|k| k == key) {
        Param::Credential
    } else if REDACT_ONLY.contains(&key) || REDACT_NAME_PARTS.iter().any(|p| key.contains(p)) {
        Param::Secret
    } else {
        Param::Plain
    }
}

/// The parameters of a target's query and fragment (a token in a fragment that reached the
/// wire is as exposed as one in the query), each with the separator that ended it:
/// `(pair, separator)`. Empty before the first `?` or `#`.
fn params(path: &str) -> impl Iterator<Item = (&str, &str)> {
    let q = path.find(['?', '#']).map_or("", |i| &path[i + 1..]);
    q.split_inclusive(['&', '#'])
        .map(|p| match p.strip_suffix(['&', '#']) {
            Some(pair) => (pair, &p[pair.len()..]),
            None => (p, ""),
        })
}

/// A parameter's name as compared: percent-decoded, lower case.
fn param_key(k: &str) -> String {
    let k = Zeroizing::new(percent_decode(k.as_bytes()));
    String::from_utf8_lossy(&k).to_ascii_lowercase()
}

fn query(path: &str, cfg: &CredentialConfig, fp: &Fingerprinter, out: &mut Vec<Credential>) {
    let mut found = 0;
    for (pair, _) in params(path).take(MAX_QUERY_PARAMS) {
        if found == MAX_FOUND {
            break;
        }
        let Some((k, v)) = pair.split_once('=') else {
            continue;
        };
        if v.is_empty() {
            continue;
        }
        let key = param_key(k);
        let class = classify(&key, cfg);
        if !matches!(class, Param::Credential | Param::AwsCredential) {
            continue;
        }
        // Decoded so that differently encoded copies of a token agree.
        let v = Zeroizing::new(percent_decode(v.as_bytes()));
        if class == Param::AwsCredential {
            // Presigned URL: AKID/date/region/service/aws4_request.
            if let Some(akid) = v.split(|&b| b == b'/').next().filter(|k| !k.is_empty()) {
                found += 1;
                out.push(Credential {
                    header: "query".into(),
                    kind: "aws-sigv4",
                    fingerprint: fp.fingerprint(akid),
                    user: Some(String::from_utf8_lossy(akid).into_owned()),
                    name: Some(key),
                    claims: None,
                });
            }
        } else {
            found += 1;
            out.push(Credential {
                name: Some(key),
                ..token("query", "query", &v, fp)
            });
        }
    }
}

/// The path as records may show it: without the userinfo of an absolute-form target, and
/// with the values of secret-bearing query parameters replaced, so that records show where a
/// request went without the secret it carried.
pub fn redact_path<'a>(path: &'a str, cfg: &CredentialConfig) -> std::borrow::Cow<'a, str> {
    let path: std::borrow::Cow<'a, str> = match userinfo(path) {
        Some(r) => format!("{}{}", &path[..r.start], &path[r.end..]).into(),
        None => path.into(),
    };
    match redact_query(&path, cfg) {
        Some(p) => p.into(),
        None => path,
    }
}

/// `None` when no value needs hiding.
fn redact_query(path: &str, cfg: &CredentialConfig) -> Option<String> {
    let hide = |i: usize, pair: &str| {
        pair.split_once('=').is_some_and(|(k, v)| {
            !v.is_empty()
                && (i >= MAX_QUERY_PARAMS
                    || matches!(
                        classify(&param_key(k), cfg),
                        Param::Secret | Param::Credential
                    ))
        })
    };
    let hidden: Vec<bool> = params(path)
        .enumerate()
        .map(|(i, (p, _))| hide(i, p))
        .collect();
    if !hidden.contains(&true) {
        return None;
    }
    let start = path.find(['?', '#']).expect("a parameter was hidden") + 1;
    let mut out = String::with_capacity(path.len());
    out.push_str(&path[..start]);
    for ((pair, sep), hide) in params(path).zip(hidden) {
        match pair.split_once('=') {
            Some((k, _)) if hide => {
                out.push_str(k);
                out.push_str("=REDACTED");
            }
            _ => out.push_str(pair),
        }
        out.push_str(sep);
    }
    Some(out)
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

    /// A random secret, so that a test finding it in an output is never a coincidence.
    fn canary() -> String {
        let mut b = [0u8; 12];
        getrandom::fill(&mut b).unwrap();
        format!("canary{}", hex::encode(b))
    }

    /// What a record shows of a request: its credentials and its redacted path.
    fn shown(c: &[Credential], path: &str) -> String {
        let p = redact_path(path, &CredentialConfig::default());
        format!("{} {p} {c:?}", serde_json::to_string(c).unwrap())
    }

    #[test]
    fn basic_without_a_colon_is_a_secret_not_a_user() {
        let secret = canary();
        let c = one(
            "Authorization",
            &format!("Basic {}", STANDARD.encode(&secret)),
        );
        assert_eq!((c[0].kind, c[0].user.as_deref()), ("basic", None));
        assert_eq!(c[0].fingerprint, fp().fingerprint(secret.as_bytes()));
        assert!(!shown(&c, "/").contains(&secret));
        // With a colon the user stays; an empty password too.
        let c = one("Authorization", &format!("Basic {}", STANDARD.encode("u:")));
        assert_eq!(c[0].user.as_deref(), Some("u"));
    }

    #[test]
    fn every_query_parameter_is_examined_and_redacted() {
        let secret = canary();
        for before in [64, 65, 1000, MAX_QUERY_PARAMS + 10] {
            let mut path = String::from("/q?");
            for i in 0..before {
                path.push_str(&format!("p{i}=v&"));
            }
            path.push_str(&format!("access_token={secret}&last=1"));
            let c = all(&[], &path);
            let shown = shown(&c, &path);
            assert!(!shown.contains(&secret), "{before} parameters before it");
            assert!(shown.contains("&last=") && shown.contains("access_token=REDACTED"));
            if before < MAX_QUERY_PARAMS {
                assert_eq!(c.len(), 1, "{before}");
                assert_eq!(c[0].fingerprint, fp().fingerprint(secret.as_bytes()));
            } else {
                // Not examined: hidden all the same, whatever its name.
                assert!(c.is_empty());
                assert!(shown.contains("&last=REDACTED"));
            }
        }
        // Thousands of token parameters cost a bounded number of fingerprints.
        let path = format!("/q?{}", "token=x&".repeat(3000));
        assert_eq!(all(&[], &path).len(), MAX_FOUND);
        let cookie = format!("{}session={secret}", "a=b; ".repeat(100));
        let c = one("cookie", &cookie);
        assert_eq!(c.len(), 1, "a cookie past the 64th is examined");
        assert_eq!(c[0].fingerprint, fp().fingerprint(secret.as_bytes()));
    }

    #[test]
    fn secret_bearing_query_names_are_redacted() {
        let cfg = CredentialConfig::default();
        for name in [
            "X-Amz-Security-Token",
            "refresh_token",
            "client_secret",
            "password",
            "passwd",
            "pwd",
            "secret",
            "id_token",
            "sig",
            "apikey",
            "session",
        ] {
            let secret = canary();
            let path = format!("/p?a=1&{name}={secret}");
            let c = all(&[], &path);
            assert_eq!(c.len(), 1, "{name} is a credential");
            assert_eq!(
                c[0].name.as_deref(),
                Some(name.to_ascii_lowercase().as_str())
            );
            assert_eq!(c[0].fingerprint, fp().fingerprint(secret.as_bytes()));
            assert_eq!(redact_path(&path, &cfg), format!("/p?a=1&{name}=REDACTED"));
        }
        // Hidden but not credentials: single-use or per-request values, and names that only
        // look secret.
        for name in [
            "code",
            "oauth_signature",
            "next_page_token",
            "db_password",
            "x-goog-credential",
        ] {
            let secret = canary();
            let path = format!("/p?{name}={secret}");
            assert!(all(&[], &path).is_empty(), "{name}");
            assert_eq!(redact_path(&path, &cfg), format!("/p?{name}=REDACTED"));
        }
        // A fragment that reached the wire is looked at too.
        let secret = canary();
        let path = format!("/cb#access_token={secret}&state=s");
        assert_eq!(all(&[], &path).len(), 1);
        assert_eq!(
            redact_path(&path, &cfg),
            "/cb#access_token=REDACTED&state=s"
        );
        // The access key id of a presigned URL is an identity: kept.
        let path = "/o?X-Amz-Credential=AKIDEXAMPLE%2F20150830&x=1";
        assert_eq!(redact_path(path, &cfg), path);
    }

    #[test]
    fn userinfo_of_an_absolute_target_is_a_credential_and_stripped() {
        let cfg = CredentialConfig::default();
        let secret = canary();
        let path = format!("http://svc:{secret}@orders.test:8080/api?x=1");
        let c = all(&[], &path);
        assert_eq!(
            (c[0].kind, c[0].header.as_str(), c[0].user.as_deref()),
            ("basic", "userinfo", Some("svc"))
        );
        // The same fingerprint as Basic auth with the same user and password.
        let basic = one(
            "authorization",
            &format!("Basic {}", STANDARD.encode(format!("svc:{secret}"))),
        );
        assert_eq!(c[0].fingerprint, basic[0].fingerprint);
        assert_eq!(redact_path(&path, &cfg), "http://orders.test:8080/api?x=1");
        assert!(!shown(&c, &path).contains(&secret));
        // A token as the user name; percent-encoded; an @ in the query is not userinfo.
        let c = all(&[], &format!("https://{secret}@h/"));
        assert_eq!((c[0].user.as_deref(), c.len()), (None, 1));
        assert_eq!(c[0].fingerprint, fp().fingerprint(secret.as_bytes()));
        let c = all(&[], "http://a%40b:p%3Aq@h");
        assert_eq!(c[0].fingerprint, fp().fingerprint(b"a@b:p:q"));
        assert_eq!(redact_path("http://a%40b:p%3Aq@h", &cfg), "http://h");
        assert!(all(&[], "http://h/p?mail=a@b").is_empty());
        assert_eq!(redact_path("/p?mail=a@b", &cfg), "/p?mail=a@b");
        assert!(all(&[], "/a:b@c/").is_empty());
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
