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

/// A URL fit for logs, for every client (ClickHouse, webhook, Kubernetes API):
/// `scheme://host[:port]` only. User and password (`https://user:secret@host`), the path
/// (webhook URLs often carry a token there) and the query (`?token=`) are left out; whatever
/// does not read as a plain host and port (a password with an unescaped `/`, say) is not
/// shown either.
pub fn url_for_logs(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<not a URL>".into();
    };
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        return "<not a URL>".into();
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if is_host_port(host) {
        format!("{scheme}://{host}")
    } else {
        format!("{scheme}://<redacted>")
    }
}

/// `name`, `name:port`, `[v6]` or `[v6]:port`.
fn is_host_port(s: &str) -> bool {
    let (host, port) = match s.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((addr, rest))
                if addr
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b":.".contains(&b)) =>
            {
                match rest {
                    "" => return !addr.is_empty(),
                    r => ("x", Some(r.strip_prefix(':').unwrap_or(""))),
                }
            }
            _ => return false,
        },
        None => match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        },
    };
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    host_ok && port_ok
}

#[cfg(test)]
mod tests {
    use super::url_for_logs;

    #[test]
    fn url_for_logs_keeps_only_scheme_host_and_port() {
        for (url, want) in [
            (
                "https://u:s3cret@ch.example:8443/x?password=s3cret#s3cret",
                "https://ch.example:8443",
            ),
            ("http://127.0.0.1:8123", "http://127.0.0.1:8123"),
            ("http://127.0.0.1:8123/", "http://127.0.0.1:8123"),
            (
                "https://hooks.example.com/services/T0/B0/s3cret",
                "https://hooks.example.com",
            ),
            ("http://[::1]:8001?token=s3cret", "http://[::1]:8001"),
            // A password holding '@' or '/': everything up to the last '@' goes.
            ("http://u:p@ss@h:1/x", "http://h:1"),
            ("http://u:s3cret@h", "http://h"),
            ("http://u:s3/cret@h:1/x", "http://<redacted>"),
            ("http://[::1]", "http://[::1]"),
            ("http://[::1]s3cret", "http://<redacted>"),
            ("ch:8123", "<not a URL>"),
            ("s3cret", "<not a URL>"),
            ("://s3cret@h", "<not a URL>"),
        ] {
            assert_eq!(url_for_logs(url), want, "{url}");
        }
    }
}
