//! Secrets recognisable by their format wherever they appear: vendors prefix their tokens so
//! that scanners can find them (GitHub, Slack, Stripe, AWS access key ids).

/// One token format: literal prefix, then at least `min` bytes of `body`.
struct Format {
    prefix: &'static [u8],
    kind: &'static str,
    body: fn(u8) -> bool,
    min: usize,
    /// An exact body length (AWS key ids), or 0 for "any, past `min`".
    exact: usize,
}

fn alnum(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}
fn word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}
fn slack(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-'
}
fn upper(b: u8) -> bool {
    b.is_ascii_uppercase() || b.is_ascii_digit()
}

#[rustfmt::skip]
const FORMATS: &[Format] = &[
    Format { prefix: b"ghp_", kind: "github-token", body: alnum, min: 30, exact: 0 },
    Format { prefix: b"gho_", kind: "github-token", body: alnum, min: 30, exact: 0 },
    Format { prefix: b"ghs_", kind: "github-token", body: alnum, min: 30, exact: 0 },
    Format { prefix: b"ghu_", kind: "github-token", body: alnum, min: 30, exact: 0 },
    Format { prefix: b"ghr_", kind: "github-token", body: alnum, min: 30, exact: 0 },
    Format { prefix: b"github_pat_", kind: "github-token", body: word, min: 22, exact: 0 },
    Format { prefix: b"xoxa-", kind: "slack-token", body: slack, min: 10, exact: 0 },
    Format { prefix: b"xoxb-", kind: "slack-token", body: slack, min: 10, exact: 0 },
    Format { prefix: b"xoxp-", kind: "slack-token", body: slack, min: 10, exact: 0 },
    Format { prefix: b"xoxr-", kind: "slack-token", body: slack, min: 10, exact: 0 },
    Format { prefix: b"sk_live_", kind: "stripe-key", body: alnum, min: 16, exact: 0 },
    Format { prefix: b"rk_live_", kind: "stripe-key", body: alnum, min: 16, exact: 0 },
    Format { prefix: b"AKIA", kind: "aws-access-key", body: upper, min: 16, exact: 16 },
    Format { prefix: b"ASIA", kind: "aws-access-key", body: upper, min: 16, exact: 16 },
];

/// The shortest token of any format (a Slack prefix and 10 bytes).
const MIN_TOKEN: usize = 15;

/// Tokens looked for in one value: a header stuffed with tokens is not worth more.
const MAX_FOUND: usize = 4;

/// The format of a whole token, if it has one (e.g. a bearer token that is a GitHub token).
pub fn classify(token: &[u8]) -> Option<&'static str> {
    let f = FORMATS.iter().find(|f| token.starts_with(f.prefix))?;
    (body_len(f, &token[f.prefix.len()..]) == Some(token.len() - f.prefix.len())).then_some(f.kind)
}

/// Length of a valid body at the start of `rest`, if there is one.
fn body_len(f: &Format, rest: &[u8]) -> Option<usize> {
    let n = rest.iter().take_while(|&&b| (f.body)(b)).count();
    let ok = if f.exact > 0 {
        n == f.exact
    } else {
        n >= f.min
    };
    ok.then_some(n)
}

/// Finds formatted tokens anywhere in `value`: `(kind, token)`, at most [`MAX_FOUND`].
pub fn find(value: &[u8]) -> Vec<(&'static str, &[u8])> {
    let mut out = Vec::new();
    // Most header values (Accept, Host, Content-Length) are shorter than any token.
    if value.len() < MIN_TOKEN {
        return out;
    }
    let mut i = 0;
    while i < value.len() && out.len() < MAX_FOUND {
        // A token starts at a boundary: not inside a longer word.
        if i > 0 && word(value[i - 1]) {
            i += 1;
            continue;
        }
        // Every prefix starts with one of these: most positions end here.
        if !matches!(value[i], b'g' | b'x' | b's' | b'r' | b'A') {
            i += 1;
            continue;
        }
        let rest = &value[i..];
        let hit = FORMATS.iter().find_map(|f| {
            let body = rest.strip_prefix(f.prefix)?;
            body_len(f, body).map(|n| (f.kind, f.prefix.len() + n))
        });
        match hit {
            Some((kind, n)) => {
                out.push((kind, &rest[..n]));
                i += n;
            }
            None => i += 1,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_vendor_format() {
        let gh = format!("ghp_{}", "a1".repeat(18));
        let pat = format!("github_pat_{}", "A_1".repeat(10));
        for (token, kind) in [
            (gh.as_str(), "github-token"),
            (pat.as_str(), "github-token"),
            ("xoxb-1234567890-abcdef", "slack-token"),
            ("sk_live_abcdefghijklmnop1234", "stripe-key"),
            ("AKIAIOSFODNN7EXAMPLE", "aws-access-key"),
            ("ASIAIOSFODNN7EXAMPLE", "aws-access-key"),
        ] {
            assert_eq!(classify(token.as_bytes()), Some(kind), "{kind}");
            let v = format!("x {token}; y");
            assert_eq!(find(v.as_bytes()), [(kind, token.as_bytes())]);
        }
    }

    #[test]
    fn shortest_token_is_min_token() {
        let shortest = FORMATS
            .iter()
            .map(|f| f.prefix.len() + f.min)
            .min()
            .unwrap();
        assert_eq!(shortest, MIN_TOKEN);
    }

    #[test]
    fn near_misses() {
        assert_eq!(classify(b"ghp_short"), None);
        assert_eq!(classify(b"AKIAIOSFODNN7EXAMPLEX"), None);
        assert_eq!(classify(b"sk_test_abcdefghijklmnop1234"), None);
        assert!(find(b"xAKIAIOSFODNN7EXAMPLE").is_empty());
        assert!(find(b"Mozilla/5.0 (X11; Linux x86_64)").is_empty());
        let many = "AKIAIOSFODNN7EXAMPLE ".repeat(10);
        assert_eq!(find(many.as_bytes()).len(), MAX_FOUND);
    }
}
