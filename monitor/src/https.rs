//! What the daemon's HTTPS clients (webhook, Kubernetes API) share.

use std::path::Path;

use anyhow::{Context, Result, bail};

/// TLS settings that trust exactly the certificates in the PEM file at `ca` (a private CA,
/// the cluster's CA) instead of the bundled web roots.
pub fn trust_only(ca: &Path) -> Result<ureq::tls::TlsConfig> {
    let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        if let ureq::tls::PemItem::Certificate(c) =
            item.with_context(|| format!("parsing {}", ca.display()))?
        {
            certs.push(c);
        }
    }
    if certs.is_empty() {
        bail!("no certificate in {}", ca.display());
    }
    Ok(ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
        .build())
}

/// A loggable description of a transport error: never a header (tokens), body or URL (which
/// `BadUri` would carry, with any credential in it).
pub fn describe(e: &ureq::Error) -> String {
    use ureq::Error as E;
    match e {
        E::Io(io) => format!("I/O: {}", io.kind()),
        E::Timeout(t) => format!("timeout ({t})"),
        E::HostNotFound => "host not found".into(),
        E::ConnectionFailed => "connection failed".into(),
        E::Protocol(p) => format!("HTTP protocol: {p}"),
        E::Tls(m) => format!("TLS: {m}"),
        E::Rustls(r) => format!("TLS: {r}"),
        E::StatusCode(s) => format!("HTTP {s}"),
        E::BadUri(_) => "bad URL".into(),
        E::BodyExceedsLimit(n) => format!("response larger than {n} bytes"),
        _ => "request failed".into(),
    }
}
