//! JWT claims, decoded without verification: the monitor needs to know who a token says it
//! belongs to (issuer, subject, Kubernetes pod) and when it expires, not whether it is valid.
//! Only non-secret claims are kept; the signature and the raw token never leave this module.

use base64::{
    Engine,
    alphabet::URL_SAFE,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
};
use serde::Serialize;
use serde_json::{Map, Value};
use zeroize::Zeroizing;

/// Tokens longer than this are not decoded (Kubernetes tokens are about 1 KiB).
pub const MAX_TOKEN: usize = 16 * 1024;
/// Claim strings are cut to this many bytes: they are labels, not payloads.
const MAX_CLAIM: usize = 256;
const MAX_AUD: usize = 16;

/// base64url with or without padding: both are seen in the wild.
const B64: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Claims {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub aud: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesClaims>,
}

/// The `kubernetes.io` claim of projected service account tokens (and the flat claims of
/// legacy secret-based ones): what pod and node a token was bound to.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct KubernetesClaims {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serviceaccount: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serviceaccount_uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_uid: Option<String>,
}

/// Decodes a compact JWS (`header.payload.signature`). `None` if it is not one: not three
/// parts, header not base64url JSON with `alg`. A payload that does not decode still makes a
/// JWT, with only the header's claims.
pub fn decode(token: &[u8]) -> Option<Claims> {
    if token.len() > MAX_TOKEN {
        return None;
    }
    let mut parts = token.split(|&b| b == b'.');
    let (Some(h), Some(p), Some(_sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    if p.is_empty() {
        return None;
    }
    let header = object(h)?;
    let mut c = Claims {
        alg: Some(string(header.get("alg")?)?),
        kid: header.get("kid").and_then(string),
        ..Claims::default()
    };
    if let Some(body) = object(p) {
        c.iss = body.get("iss").and_then(string);
        c.sub = body.get("sub").and_then(string);
        c.jti = body.get("jti").and_then(string);
        c.exp = body.get("exp").and_then(number);
        c.iat = body.get("iat").and_then(number);
        c.nbf = body.get("nbf").and_then(number);
        c.aud = match body.get("aud") {
            Some(Value::Array(a)) => a.iter().filter_map(string).take(MAX_AUD).collect(),
            Some(v) => string(v).into_iter().collect(),
            None => Vec::new(),
        };
        c.kubernetes = kubernetes(&body);
    }
    Some(c)
}

fn object(part: &[u8]) -> Option<Map<String, Value>> {
    let raw = Zeroizing::new(B64.decode(part).ok()?);
    match serde_json::from_slice(&raw).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

fn string(v: &Value) -> Option<String> {
    let s = v.as_str()?;
    let mut end = s.len().min(MAX_CLAIM);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Some(s[..end].to_string())
}

fn number(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| {
        v.as_f64()
            .filter(|f| f.is_finite() && f.abs() < 1e18)
            .map(|f| f as i64)
    })
}

fn kubernetes(body: &Map<String, Value>) -> Option<KubernetesClaims> {
    let name_uid = |v: Option<&Value>| {
        (
            v.and_then(|o| o.get("name")).and_then(string),
            v.and_then(|o| o.get("uid")).and_then(string),
        )
    };
    if let Some(k) = body.get("kubernetes.io") {
        let (serviceaccount, serviceaccount_uid) = name_uid(k.get("serviceaccount"));
        let (pod, pod_uid) = name_uid(k.get("pod"));
        let (node, node_uid) = name_uid(k.get("node"));
        return Some(KubernetesClaims {
            namespace: k.get("namespace").and_then(string),
            serviceaccount,
            serviceaccount_uid,
            pod,
            pod_uid,
            node,
            node_uid,
        });
    }
    let legacy = |k: &str| body.get(k).and_then(string);
    let namespace = legacy("kubernetes.io/serviceaccount/namespace")?;
    Some(KubernetesClaims {
        namespace: Some(namespace),
        serviceaccount: legacy("kubernetes.io/serviceaccount/service-account.name"),
        serviceaccount_uid: legacy("kubernetes.io/serviceaccount/service-account.uid"),
        ..KubernetesClaims::default()
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    pub(crate) fn token(header: &str, payload: &str) -> String {
        format!(
            "{}.{}.c2lnbmF0dXJl",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        )
    }

    #[test]
    fn kubernetes_projected_token() {
        let t = token(
            r#"{"alg":"RS256","kid":"k1"}"#,
            r#"{"aud":["https://kubernetes.default.svc"],"exp":1700003600,"iat":1700000000,
            "nbf":1700000000.0,"iss":"https://kubernetes.default.svc","jti":"j-1",
            "kubernetes.io":{"namespace":"shop","node":{"name":"n1","uid":"nu"},
            "pod":{"name":"cart-7d9","uid":"pu"},"serviceaccount":{"name":"cart","uid":"su"}},
            "sub":"system:serviceaccount:shop:cart","secret_claim":"x"}"#,
        );
        let c = decode(t.as_bytes()).unwrap();
        assert_eq!(c.alg.as_deref(), Some("RS256"));
        assert_eq!(c.kid.as_deref(), Some("k1"));
        assert_eq!(c.aud, ["https://kubernetes.default.svc"]);
        assert_eq!(
            (c.exp, c.iat, c.nbf),
            (Some(1700003600), Some(1700000000), Some(1700000000))
        );
        assert_eq!(c.sub.as_deref(), Some("system:serviceaccount:shop:cart"));
        let k = c.kubernetes.as_ref().unwrap();
        assert_eq!(k.namespace.as_deref(), Some("shop"));
        assert_eq!(k.pod.as_deref(), Some("cart-7d9"));
        assert_eq!(k.serviceaccount.as_deref(), Some("cart"));
        assert_eq!(k.node_uid.as_deref(), Some("nu"));
        let json = serde_json::to_string(&c).unwrap();
        assert!(!json.contains("c2lnbmF0dXJl") && !json.contains("secret_claim"));
    }

    #[test]
    fn legacy_service_account_token_and_padding() {
        let t = token(
            r#"{"alg":"RS256"}"#,
            r#"{"iss":"kubernetes/serviceaccount","kubernetes.io/serviceaccount/namespace":"ns","kubernetes.io/serviceaccount/service-account.name":"sa","aud":"one"}"#,
        );
        let c = decode(t.as_bytes()).unwrap();
        assert_eq!(c.kubernetes.unwrap().serviceaccount.as_deref(), Some("sa"));
        assert_eq!(c.aud, ["one"]);
        // {"alg":"none"} with padding.
        assert!(decode(b"eyJhbGciOiJub25lIn0=.e30=.").is_some());
    }

    #[test]
    fn garbage_is_not_a_jwt_and_never_panics() {
        for t in [
            &b""[..],
            b"a.b.c",
            b"%%%.%%%.%%%",
            b"eyJhbGciOiJIUzI1NiJ9..sig",
            b"eyJhbGciOiJIUzI1NiJ9.e30",
            b"eyJhbGciOiJIUzI1NiJ9.e30.s.x",
            b"W10.e30.sig",          // header is an array
            b"e30.e30.sig",          // header without alg
            b"eyJhbGciOjF9.e30.sig", // alg not a string
            b"\xff\xfe.\x00.\x01",
        ] {
            assert!(decode(t).is_none(), "{t:?}");
        }
        // A payload that is not JSON still makes a JWT, with the header's claims only.
        let c = decode(b"eyJhbGciOiJIUzI1NiJ9.!!!!.sig").unwrap();
        assert_eq!((c.alg.as_deref(), c.sub), (Some("HS256"), None));
        let long = vec![b'a'; MAX_TOKEN + 1];
        assert!(decode(&long).is_none());
        // Odd claim types are dropped, long ones cut on a character boundary.
        let t = token(
            r#"{"alg":"x"}"#,
            &format!(
                r#"{{"sub":{{"a":1}},"exp":"soon","iss":"{}"}}"#,
                "é".repeat(200)
            ),
        );
        let c = decode(t.as_bytes()).unwrap();
        assert_eq!((c.sub, c.exp), (None, None));
        assert!(c.iss.unwrap().len() <= MAX_CLAIM);
    }
}
