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
