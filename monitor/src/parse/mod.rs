//! Protocol parsers. Each works on one direction of one connection, is fed bytes in order,
//! and is bounded in memory: a parser never buffers more than its limit.

pub mod hpack;
pub mod http1;
pub mod http2;
pub mod postgres;
pub mod redis;

/// A header as parsed: lower-cased name, raw value. Values may hold secrets: they live only
/// until credentials are extracted and are zeroed when dropped.
pub struct Header {
    pub name: String,
    pub value: zeroize::Zeroizing<Vec<u8>>,
}

impl Header {
    pub fn new(name: &str, value: &[u8]) -> Self {
        Header {
            name: name.to_ascii_lowercase(),
            value: zeroize::Zeroizing::new(value.to_vec()),
        }
    }
}

impl std::fmt::Debug for Header {
    // Never print values: they are credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: <{} bytes>", self.name, self.value.len())
    }
}

/// One HTTP request, whatever the protocol version.
pub struct Request {
    pub method: String,
    pub path: String,
    /// `Host` (HTTP/1) or `:authority` (HTTP/2).
    pub host: Option<String>,
    pub version: &'static str,
    pub headers: Vec<Header>,
}

impl std::fmt::Debug for Request {
    // A query string or fragment may carry tokens, userinfo a password: only their lengths
    // are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut path = self.path.clone();
        if let Some(r) = crate::credential::userinfo(&path) {
            path.replace_range(r.clone(), &format!("<{} bytes>@", r.len() - 1));
        }
        if let Some(i) = path.find(['?', '#']) {
            let n = path.len() - i - 1;
            path.replace_range(i + 1.., &format!("<{n} bytes>"));
        }
        f.debug_struct("Request")
            .field("method", &self.method)
            .field("path", &path)
            .field("host", &self.host)
            .field("version", &self.version)
            .field("headers", &self.headers)
            .finish()
    }
}

/// A login to a database or cache (Redis AUTH, PostgreSQL password message).
pub struct Login {
    pub protocol: &'static str,
    /// `AUTH`, `HELLO`, `PASSWORD`, `SASL`.
    pub command: &'static str,
    pub user: Option<String>,
    pub database: Option<String>,
    /// What crossed the wire; `None` when the protocol keeps the secret off it (SCRAM).
    pub secret: Option<zeroize::Zeroizing<Vec<u8>>>,
    /// Credential kind of the secret.
    pub kind: &'static str,
    /// Which part of the message held the secret (`auth`, `password`, `md5-password`).
    pub field: &'static str,
}

impl std::fmt::Debug for Login {
    // The secret's length only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("protocol", &self.protocol)
            .field("command", &self.command)
            .field("user", &self.user)
            .field("database", &self.database)
            .field("secret", &self.secret.as_ref().map(|s| s.len()))
            .field("kind", &self.kind)
            .finish()
    }
}

#[derive(Debug)]
pub enum Message {
    Request(Request),
    Response { status: u16 },
    Login(Login),
}

/// Bytes looked at before a stream that matches no protocol is given up.
pub const SNIFF_MAX: usize = 32;

/// The outcome of looking at a stream's first bytes.
#[derive(Debug)]
pub enum Sniff {
    /// Not enough bytes to tell.
    Undecided,
    Known(Parser),
    Unknown,
}

/// Tells which parser a stream needs from its first bytes. Past [`SNIFF_MAX`] bytes (not
/// counting up to [`http1::MAX_HEAD`] leading empty lines) the answer is never `Undecided`.
pub fn sniff(data: &[u8]) -> Sniff {
    let mut undecided = false;
    match http1::sniff(data) {
        Some(Ok(role)) => return Sniff::Known(Parser::Http1(http1::Http1Parser::new(role))),
        None => undecided = true,
        Some(Err(_)) => {}
    }
    match postgres::sniff(data) {
        Some(true) => return Sniff::Known(Parser::Postgres(postgres::PostgresParser::new())),
        None => undecided = true,
        Some(false) => {}
    }
    match http2::sniff(data) {
        Some(Ok(start)) => {
            return Sniff::Known(Parser::Http2(Box::new(http2::Http2Parser::new(
                start == http2::Start::Preface,
            ))));
        }
        None => undecided = true,
        Some(Err(())) => {}
    }
    match redis::sniff(data) {
        Some(true) => return Sniff::Known(Parser::Redis(redis::RedisParser::new())),
        None => undecided = true,
        Some(false) => {}
    }
    // Empty lines may come before an HTTP/1 request line (RFC 9112 §2.2): they do not count
    // against the sniffing budget, up to a head's worth of them.
    let blank = http1::skip_empty_lines(data);
    if undecided && data.len() - blank < SNIFF_MAX && blank <= http1::MAX_HEAD {
        Sniff::Undecided
    } else {
        Sniff::Unknown
    }
}

/// A parse error of any protocol: what went wrong, never the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    Http1(http1::ParseError),
    Http2(http2::ParseError),
    Redis(redis::ParseError),
    Postgres(postgres::ParseError),
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::Http1(e) => write!(f, "http/1: {e}"),
            ParseError::Http2(e) => e.fmt(f),
            ParseError::Redis(e) => e.fmt(f),
            ParseError::Postgres(e) => e.fmt(f),
        }
    }
}

/// One direction of one connection, with the parser its protocol needs.
#[derive(Debug)]
pub enum Parser {
    Http1(http1::Http1Parser),
    Http2(Box<http2::Http2Parser>),
    Redis(redis::RedisParser),
    Postgres(postgres::PostgresParser),
}

impl Parser {
    /// The `protocol` of records made from this parser's messages.
    pub fn protocol(&self) -> &'static str {
        match self {
            Parser::Http1(_) => "http/1.1",
            Parser::Http2(_) => "http/2",
            Parser::Redis(_) => "redis",
            Parser::Postgres(_) => "postgres",
        }
    }

    /// Feeds bytes in stream order. An error means the stream lost its framing (the parser
    /// has reset itself); problems it could step over are counted in [`Parser::drops`].
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<Message>) -> Result<(), ParseError> {
        match self {
            Parser::Http1(p) => p.feed(data, out).map_err(ParseError::Http1),
            Parser::Http2(p) => p.feed(data, out).map_err(ParseError::Http2),
            Parser::Redis(p) => p.feed(data, out).map_err(ParseError::Redis),
            Parser::Postgres(p) => p.feed(data, out).map_err(ParseError::Postgres),
        }
    }

    /// Forgets partial state after a gap in the byte stream.
    pub fn reset(&mut self) {
        match self {
            Parser::Http1(p) => p.reset(),
            Parser::Http2(p) => p.reset(),
            Parser::Redis(p) => p.reset(),
            Parser::Postgres(p) => p.reset(),
        }
    }

    /// Bytes held between calls (bounded by each parser's limits).
    pub fn buffered(&self) -> usize {
        match self {
            Parser::Http1(p) => p.buffered(),
            Parser::Http2(p) => p.buffered(),
            Parser::Redis(p) => p.buffered(),
            Parser::Postgres(p) => p.buffered(),
        }
    }

    /// Fields or header blocks decoded only in part so far (HTTP/2 seen mid-stream, lost
    /// HPACK state): counted, not errors.
    pub fn drops(&self) -> u64 {
        match self {
            Parser::Http2(p) => p.stats.fields_unknown + p.stats.blocks_lost,
            _ => 0,
        }
    }

    /// HTTP/2: SETTINGS_HEADER_TABLE_SIZE this direction announced, for the other one.
    pub fn take_table_size(&mut self) -> Option<u32> {
        match self {
            Parser::Http2(p) => p.take_settings_table_size(),
            _ => None,
        }
    }

    /// HTTP/2: applies the other direction's SETTINGS_HEADER_TABLE_SIZE.
    pub fn set_table_limit(&mut self, size: u32) {
        if let Parser::Http2(p) = self {
            p.set_table_limit(size);
        }
    }
}

/// A request target as text, the same for every protocol: valid UTF-8 kept, other bytes and
/// ASCII controls percent-encoded, so a path nginx accepts is never a reason to drop the
/// request, and query values still decode (and fingerprint) byte for byte.
pub(crate) fn target_string(target: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(target.len());
    for chunk in target.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_ascii_control() {
                let _ = write!(out, "%{:02X}", c as u8);
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Drops the first `n` bytes of a parser's buffer, zeroed first: they may hold credentials,
/// and a drained `Vec` would leave them behind in freed or spare capacity.
pub(crate) fn release_consumed(buf: &mut Vec<u8>, n: usize) {
    zeroize::Zeroize::zeroize(&mut buf[..n]);
    buf.drain(..n);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn known(data: &[u8]) -> &'static str {
        match sniff(data) {
            Sniff::Known(p) => p.protocol(),
            Sniff::Undecided => "undecided",
            Sniff::Unknown => "unknown",
        }
    }

    #[test]
    fn sniff_dispatches_each_protocol() {
        assert_eq!(known(b"GET / HTTP/1.1\r\n"), "http/1.1");
        assert_eq!(known(b"HTTP/1.1 200 OK\r\n"), "http/1.1");
        assert_eq!(known(http2::PREFACE), "http/2");
        assert_eq!(known(b"PRI * HTTP/2"), "undecided");
        // A server's first SETTINGS frame.
        assert_eq!(
            known(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100]),
            "http/2"
        );
        assert_eq!(known(b"*2\r\n$4\r\nAUTH\r\n"), "redis");
        assert_eq!(known(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]), "postgres");
        assert_eq!(known(&[0, 0, 0]), "undecided");
        assert_eq!(known(b"\x16\x03\x01\x02\x00\x01"), "unknown");
        assert_eq!(known(b"SSH-2.0-OpenSSH_9.6\r\n"), "unknown");
        assert_eq!(known(&[0; SNIFF_MAX]), "unknown");
        // Empty lines before a request line do not spend the sniffing budget.
        let mut late = b"\r\n".repeat(SNIFF_MAX * 4);
        assert_eq!(known(&late), "undecided");
        late.extend(b"GET / HTTP/1.1\r\n");
        assert_eq!(known(&late), "http/1.1");
        assert_eq!(known(&b"\n".repeat(http1::MAX_HEAD + 1)), "unknown");
        // An unknown method is HTTP; an inline Redis AUTH is not.
        assert_eq!(
            known(b"PROPFIND /dav/collection/with/a/long/name"),
            "http/1.1"
        );
        assert_eq!(known(b"AUTH \"a b\"\r\n"), "redis");
        assert_eq!(known(b"AUTH pw\r\n"), "redis");
    }

    #[test]
    fn debug_output_has_no_secrets() {
        let r = Request {
            method: "GET".into(),
            path: "http://u:s3cr3t@h/cb#access_token=s3cr3t".into(),
            host: None,
            version: "HTTP/1.1",
            headers: vec![Header::new("Authorization", b"Bearer s3cr3t")],
        };
        let l = Login {
            protocol: "redis",
            command: "AUTH",
            user: None,
            database: None,
            secret: Some(zeroize::Zeroizing::new(b"s3cr3t".to_vec())),
            kind: "redis-auth",
            field: "auth",
        };
        let text = format!("{r:?} {l:?}");
        assert!(!text.contains("s3cr3t"), "{text}");
    }

    fn parsers() -> Vec<Parser> {
        vec![
            Parser::Http1(http1::Http1Parser::new(http1::Role::Requests)),
            Parser::Http1(http1::Http1Parser::new(http1::Role::Responses)),
            Parser::Http2(Box::new(http2::Http2Parser::new(false))),
            Parser::Redis(redis::RedisParser::new()),
            Parser::Postgres(postgres::PostgresParser::new()),
        ]
    }

    /// The most any parser holds between calls, beyond the last chunk.
    const BOUND: usize = http2::MAX_BUFFERED + 64;

    proptest! {
        #[test]
        fn any_bytes_no_panic_bounded_buffer(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..512), 0..16),
        ) {
            for mut p in parsers() {
                let mut out = Vec::new();
                for c in &chunks {
                    let _ = p.feed(c, &mut out);
                    prop_assert!(p.buffered() <= BOUND + c.len());
                }
                p.reset();
            }
            let all: Vec<u8> = chunks.concat();
            let _ = sniff(&all);
        }

        /// HTTP/2 frames with arbitrary headers and payloads after a valid preface: whatever
        /// the HPACK bytes, the table stays within its cap.
        #[test]
        fn http2_frames_keep_the_table_bounded(
            frames in proptest::collection::vec(
                (0u8..12, any::<u8>(), 0u32..8, proptest::collection::vec(any::<u8>(), 0..300)),
                0..24,
            ),
        ) {
            let mut p = http2::Http2Parser::new(true);
            let mut out = Vec::new();
            p.feed(http2::PREFACE, &mut out).unwrap();
            for (kind, flags, stream, payload) in frames {
                let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
                f.extend([kind, flags]);
                f.extend(stream.to_be_bytes());
                f.extend(&payload);
                let _ = p.feed(&f, &mut out);
                prop_assert!(p.table_size() <= hpack::MAX_TABLE);
                prop_assert!(p.buffered() <= BOUND);
            }
        }
    }
}
