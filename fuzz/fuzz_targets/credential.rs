//! Credential extraction over arbitrary header values and paths: no panic, what leaves the
//! extractor never holds a token-like header value, and a redacted path keeps no userinfo
//! and is redacted already (so nothing redaction hides survives it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use monitor::{
    credential::{CredentialConfig, Fingerprinter, extract, redact_path, userinfo},
    parse::Header,
};

const NAMES: [&str; 6] = [
    "authorization",
    "cookie",
    "x-api-key",
    "proxy-authorization",
    "x-other",
    "private-token",
];

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let fp = Fingerprinter::from_key(b"fuzz-key-0123456789");
    let cfg = CredentialConfig::default();
    let (value, path) = rest.split_at(rest.len() / 2);
    let headers = [Header::new(NAMES[sel as usize % NAMES.len()], value)];
    let path = String::from_utf8_lossy(path);
    // Token-like values only: free text could spell out the Debug syntax itself (field names,
    // kinds), which is not a leak.
    let token_like = value.len() >= 16
        && value.iter().any(u8::is_ascii_digit)
        && value
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"._~+/=-".contains(b));
    for c in extract(&headers, &path, &cfg, &fp) {
        // User names and cookie names are kept on purpose.
        if token_like && c.user.is_none() && c.name.is_none() {
            let text = format!("{c:?}");
            assert!(!text.as_bytes().windows(value.len()).any(|w| w == value));
        }
    }
    let shown = redact_path(&path, &cfg);
    assert!(userinfo(&shown).is_none());
    assert_eq!(redact_path(&shown, &cfg), shown);
});
