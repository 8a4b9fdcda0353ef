//! Request paths as the graph sees them. One normalisation serves every comparison of a path
//! with the graph (`off-path`, the edges' own prefixes, learn), so a request cannot reach a
//! path an edge does not allow by spelling it differently from how the edge was written.
//!
//! [`normalize`]:
//! - the query and fragment are not part of the path; an absolute-form target
//!   (`http://host/p`) is reduced to its path;
//! - percent-encoded octets are decoded once: unreserved characters (RFC 3986 §2.3, `%2e`
//!   included) become themselves; `%2f` and `%5c` become separators (as many servers and
//!   proxies route them), so `/api%2f..%2fadmin` is `/admin`; every other octet stays encoded
//!   with upper-case hex (`%252e` stays `%252E`: never decoded twice); a `%` not followed by
//!   two hex digits makes the path invalid;
//! - a backslash is a separator (some servers treat it as one);
//! - empty segments collapse (`//`), then dot segments are removed (RFC 3986 §5.2.4); a
//!   segment whose part before `;` is `.` or `..` counts as one (servlet containers strip
//!   `;params`, so `/api/..;/admin` is `/admin` there);
//! - a path that climbs above the root, or that does not start with `/`, has no normal form:
//!   it matches no edge (fail closed, `off-path` fires).
//!
//! Prefixes match whole segments: `/api/` (or `/api`) allows `/api` and `/api/...`, never
//! `/apix`.

/// The normal form of a request path, or `None` when it cannot be normalised safely.
pub fn normalize(raw: &str) -> Option<String> {
    let p = raw.split(['?', '#']).next().unwrap_or_default();
    let p = without_authority(p);
    if !p.starts_with(['/', '\\']) {
        return None;
    }
    let decoded = decode(p)?;
    let mut out: Vec<&str> = Vec::new();
    let mut trailing = false;
    for seg in decoded.split('/').skip(1) {
        let bare = seg.split(';').next().unwrap_or_default();
        trailing = true;
        match bare {
            "" if seg.is_empty() => {}
            "." => {}
            ".." => {
                out.pop()?;
            }
            _ => {
                out.push(seg);
                trailing = false;
            }
        }
    }
    let mut n = String::with_capacity(decoded.len());
    for s in &out {
        n.push('/');
        n.push_str(s);
    }
    if trailing || out.is_empty() {
        n.push('/');
    }
    Some(n)
}

/// Whether the normalised `path` lies under the normalised `prefix`, segment by segment.
pub fn under(path: &str, prefix: &str) -> bool {
    let p = prefix.trim_end_matches('/');
    p.is_empty() || path == p || path.strip_prefix(p).is_some_and(|r| r.starts_with('/'))
}

/// Segments of a normalised path (`/a/b/` → `a`, `b`).
pub fn segments(normalised: &str) -> impl Iterator<Item = &str> {
    normalised.split('/').filter(|s| !s.is_empty())
}

/// `http://host:port/p` → `/p` (`/` when there is no path); anything else unchanged.
fn without_authority(p: &str) -> &str {
    for scheme in ["http://", "https://"] {
        if p.len() >= scheme.len()
            && p.is_char_boundary(scheme.len())
            && p[..scheme.len()].eq_ignore_ascii_case(scheme)
        {
            let rest = &p[scheme.len()..];
            return rest.find('/').map_or("/", |i| &rest[i..]);
        }
    }
    p
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Percent-decoding of unreserved octets and separators, once; `None` for a bad escape.
fn decode(p: &str) -> Option<String> {
    let b = p.as_bytes();
    let mut out = String::with_capacity(p.len());
    let mut i = 0;
    // Runs of bytes other than `%` and `\` are copied whole: they keep any multi-byte
    // character intact.
    while i < b.len() {
        let run = b[i..]
            .iter()
            .position(|&c| c == b'%' || c == b'\\')
            .map_or(b.len(), |n| i + n);
        out.push_str(&p[i..run]);
        i = run;
        if i >= b.len() {
            break;
        }
        if b[i] == b'\\' {
            out.push('/');
            i += 1;
            continue;
        }
        let v = hex(*b.get(i + 1)?)? << 4 | hex(*b.get(i + 2)?)?;
        match v {
            b'/' | b'\\' => out.push('/'),
            c if c.is_ascii_alphanumeric() || b"-._~".contains(&c) => out.push(c as char),
            c => out.push_str(&format!("%{c:02X}")),
        }
        i += 3;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Option<String> {
        normalize(p)
    }

    #[test]
    fn dot_segments_and_encodings_are_resolved() {
        assert_eq!(n("/api/v1/orders?x=1").as_deref(), Some("/api/v1/orders"));
        assert_eq!(n("/api/../admin/users").as_deref(), Some("/admin/users"));
        assert_eq!(
            n("/api/%2e%2e/admin/users").as_deref(),
            Some("/admin/users")
        );
        assert_eq!(n("/api/%2E%2e/admin").as_deref(), Some("/admin"));
        assert_eq!(n("/api/.%2e/admin").as_deref(), Some("/admin"));
        assert_eq!(n("/api%2f..%2fadmin").as_deref(), Some("/admin"));
        assert_eq!(n("/api%2F..%5Cadmin").as_deref(), Some("/admin"));
        assert_eq!(n("/api\\..\\admin").as_deref(), Some("/admin"));
        assert_eq!(n("/api/..;/admin").as_deref(), Some("/admin"));
        assert_eq!(n("/api//./x/").as_deref(), Some("/api/x/"));
        assert_eq!(n("//api///x").as_deref(), Some("/api/x"));
        assert_eq!(n("/api/x/..").as_deref(), Some("/api/"));
        assert_eq!(n("/").as_deref(), Some("/"));
        assert_eq!(n("/%7Euser/%41").as_deref(), Some("/~user/A"));
        // Decoded once: a double encoding stays encoded; escapes kept get upper-case hex.
        assert_eq!(
            n("/api/%252e%252e/admin").as_deref(),
            Some("/api/%252e%252e/admin")
        );
        assert_eq!(n("/a%3fb").as_deref(), Some("/a%3Fb"));
        assert_eq!(n("HTTP://orders.test:80/api/../x").as_deref(), Some("/x"));
        assert_eq!(n("http://orders.test").as_deref(), Some("/"));
        assert_eq!(n("/é/x").as_deref(), Some("/é/x"));
        assert_eq!(n("/\u{FFFD}").as_deref(), Some("/\u{FFFD}"));
    }

    #[test]
    fn what_cannot_be_normalised_is_refused() {
        for bad in [
            "/..",
            "/api/../..",
            "/%2e%2e/x",
            "/a/%2e%2e%2f..",
            "",
            "api/x",
            "*",
            "é/x",
            "/a%",
            "/a%2",
            "/a%zz",
            "/a%é",
        ] {
            assert_eq!(n(bad), None, "{bad:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn normal_forms_are_stable_and_clean(p in "[/a.%2eEfF5cC\\\\;?é]{0,24}") {
            if let Some(n) = normalize(&p) {
                proptest::prop_assert!(n.starts_with('/'));
                proptest::prop_assert!(!n.contains("//"), "{n}");
                proptest::prop_assert!(!n.contains('\\'), "{n}");
                proptest::prop_assert!(segments(&n).all(|s| {
                    let bare = s.split(';').next().unwrap_or_default();
                    bare != "." && bare != ".."
                }), "{n}");
                proptest::prop_assert_eq!(normalize(&n), Some(n.clone()));
            }
        }
    }

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(under("/api/x", "/api/"));
        assert!(under("/api", "/api/"));
        assert!(under("/api/x", "/api"));
        assert!(!under("/apix", "/api/"));
        assert!(!under("/apix", "/api"));
        assert!(under("/anything", "/"));
        assert!(under("/api/v1/x", "/api/v1/"));
        assert!(!under("/api/v10", "/api/v1/"));
        assert_eq!(segments("/a/b/").collect::<Vec<_>>(), ["a", "b"]);
    }
}
