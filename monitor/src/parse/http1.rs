//! HTTP/1.x, incrementally: messages split over any number of chunks, pipelined messages,
//! bodies skipped by Content-Length or chunked encoding, both directions.

use super::{Header, Message, Request};
use zeroize::Zeroize;

/// Largest header block (or chunk-size/trailer line) accepted; past it the stream is broken.
pub const MAX_HEAD: usize = 64 * 1024;
/// Headers parsed without allocating; a head with more is parsed again with room for as many
/// as its lines (bounded by [`MAX_HEAD`]), as nginx takes any number within its buffers.
const FEW_HEADERS: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Not HTTP/1 at all (binary, TLS records, another protocol).
    NotHttp,
    /// Headers larger than [`MAX_HEAD`].
    HeadTooLarge,
    /// httparse rejected the head.
    Malformed,
    /// A chunked body with a bad size line.
    BadChunk,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ParseError::NotHttp => "not http/1",
            ParseError::HeadTooLarge => "header block too large",
            ParseError::Malformed => "malformed head",
            ParseError::BadChunk => "bad chunked encoding",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    None,
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkCrlf,
    Trailer,
    /// A response without length: everything until the connection closes.
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Requests,
    Responses,
}

pub struct Http1Parser {
    role: Role,
    buf: Vec<u8>,
    body: Body,
}

impl std::fmt::Debug for Http1Parser {
    // The buffer holds headers: credentials. Only its length is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http1Parser")
            .field("role", &self.role)
            .field("buffered", &self.buf.len())
            .field("body", &self.body)
            .finish()
    }
}

/// Empty lines before a request (or status) line are ignored, as RFC 9112 §2.2 allows and
/// nginx does (any number of them).
pub(crate) fn skip_empty_lines(data: &[u8]) -> usize {
    data.iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count()
}

/// RFC 9110 `tchar`: what a method is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A request line, read as leniently as nginx reads one (a request nginx answers must not
/// slip past): any token as the method, one or more spaces between the parts, the target's
/// bytes as they are (obs-text, invalid UTF-8), CRLF or a bare LF, and HTTP/0.9's
/// `GET target` with no version and no headers.
struct RequestLine<'a> {
    method: &'a [u8],
    target: &'a [u8],
    version: &'static str,
    /// Bytes up to and including the line end.
    len: usize,
}

/// `Ok(None)`: not complete yet, and nothing so far says it is not a request line.
/// `NotHttp`: not a request line at all (another protocol: the stream may be sniffed as one).
fn request_line(data: &[u8]) -> Result<Option<RequestLine<'_>>, ParseError> {
    let m = data.iter().take_while(|&&b| is_tchar(b)).count();
    let Some(&sep) = data.get(m) else {
        return Ok(None);
    };
    if m == 0 || sep != b' ' {
        return Err(ParseError::NotHttp);
    }
    let spaces = |i: usize| i + data[i..].iter().take_while(|&&b| b == b' ').count();
    let t = spaces(m);
    let t_end = t + data[t..]
        .iter()
        .take_while(|&&b| !matches!(b, b' ' | b'\r' | b'\n'))
        .count();
    let Some(&after) = data.get(t_end) else {
        return Ok(None);
    };
    let (method, target) = (&data[..m], &data[t..t_end]);
    if t_end == t {
        return Err(ParseError::NotHttp);
    }
    let line_end = |i: usize| -> Option<usize> {
        match data.get(i..)? {
            [b'\n', ..] => Some(i + 1),
            [b'\r', b'\n', ..] => Some(i + 2),
            _ => None,
        }
    };
    if after != b' ' {
        // HTTP/0.9: nginx answers a bare GET.
        if method != b"GET" {
            return Err(ParseError::NotHttp);
        }
        return match (line_end(t_end), data.len() - t_end) {
            (Some(len), _) => Ok(Some(RequestLine {
                method,
                target,
                version: "HTTP/0.9",
                len,
            })),
            (None, 1) => Ok(None),
            (None, _) => Err(ParseError::Malformed),
        };
    }
    let v = spaces(t_end);
    let v_end = v + data[v..]
        .iter()
        .take_while(|&&b| b.is_ascii_alphanumeric() || b == b'/' || b == b'.')
        .count();
    let version = &data[v..v_end];
    const HTTP1: &[u8] = b"HTTP/1.";
    let n = version.len().min(HTTP1.len());
    if version[..n] != HTTP1[..n] {
        return Err(ParseError::NotHttp);
    }
    if v_end == data.len() {
        return Ok(None);
    }
    let minor = &version[n..];
    if version.len() <= HTTP1.len() || !minor.iter().all(u8::is_ascii_digit) {
        return Err(ParseError::Malformed);
    }
    // nginx allows spaces after the version.
    let e = spaces(v_end);
    match line_end(e) {
        Some(len) => Ok(Some(RequestLine {
            method,
            target,
            version: if minor.iter().all(|&d| d == b'0') {
                "HTTP/1.0"
            } else {
                "HTTP/1.1"
            },
            len,
        })),
        None if data.len() - e <= 1 && data.get(e).is_none_or(|&b| b == b'\r') => Ok(None),
        None => Err(ParseError::Malformed),
    }
}

/// Tells from the first bytes of a stream whether it is HTTP/1 and which side.
/// `None`: not enough bytes to tell yet.
pub fn sniff(data: &[u8]) -> Option<Result<Role, ParseError>> {
    let data = &data[skip_empty_lines(data)..];
    if data.is_empty() {
        return None;
    }
    const STATUS: &[u8] = b"HTTP/1.";
    let n = STATUS.len().min(data.len());
    if data[..n] == STATUS[..n] {
        return (n == STATUS.len()).then_some(Ok(Role::Responses));
    }
    match request_line(data) {
        Ok(Some(_)) => Some(Ok(Role::Requests)),
        Err(e) => Some(Err(e)),
        // Decided before the line ends when the target has a request's shape (origin form,
        // absolute form, CONNECT's authority, OPTIONS' `*`): request lines can be far longer
        // than the bytes a stream is sniffed by. Anything else waits for its line end, so
        // that `AUTH pw` (Redis) or `PRI * HTTP/2.0` are left to their own parsers.
        Ok(None) => {
            let m = data.iter().take_while(|&&b| is_tchar(b)).count();
            let rest = &data[m..];
            let t = &rest[rest.iter().take_while(|&&b| b == b' ').count()..];
            let method = &data[..m];
            let shaped = t.first() == Some(&b'/')
                || (t.first() == Some(&b'*') && method == b"OPTIONS")
                || (method == b"CONNECT" && !t.is_empty())
                || t[..t.len().min(16)].windows(3).any(|w| w == b"://");
            shaped.then_some(Ok(Role::Requests))
        }
    }
}

impl Http1Parser {
    pub fn new(role: Role) -> Self {
        Http1Parser {
            role,
            buf: Vec::new(),
            body: Body::None,
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// Bytes buffered and not yet parsed.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Forgets partial state, e.g. after a gap in the byte stream.
    pub fn reset(&mut self) {
        self.buf.zeroize();
        self.buf.clear();
        self.body = Body::None;
    }

    /// Feeds bytes in stream order; complete messages are pushed to `out`. After an error the
    /// parser is reset.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<Message>) -> Result<(), ParseError> {
        if self.body == Body::UntilClose {
            return Ok(());
        }
        self.buf.extend_from_slice(data);
        let mut pos = 0;
        let r = self.process(&mut pos, out);
        super::release_consumed(&mut self.buf, pos);
        if r.is_ok() && self.buf.len() > MAX_HEAD {
            self.reset();
            return Err(ParseError::HeadTooLarge);
        }
        if r.is_err() {
            self.reset();
        }
        r
    }

    fn process(&mut self, pos: &mut usize, out: &mut Vec<Message>) -> Result<(), ParseError> {
        loop {
            let avail = &self.buf[*pos..];
            if avail.is_empty() {
                return Ok(());
            }
            match self.body {
                Body::None if matches!(avail[0], b'\r' | b'\n') => {
                    *pos += skip_empty_lines(avail);
                }
                Body::None => match self.parse_head(*pos, out)? {
                    Some(n) => *pos += n,
                    None => return Ok(()),
                },
                Body::Length(n) | Body::ChunkData(n) => {
                    let k = n.min(avail.len() as u64);
                    *pos += k as usize;
                    let left = n - k;
                    self.body = match (self.body, left) {
                        (Body::Length(_), 0) => Body::None,
                        (Body::Length(_), l) => Body::Length(l),
                        (_, 0) => Body::ChunkCrlf,
                        (_, l) => Body::ChunkData(l),
                    };
                }
                Body::ChunkCrlf => {
                    if avail.len() < 2 {
                        return Ok(());
                    }
                    if &avail[..2] != b"\r\n" {
                        return Err(ParseError::BadChunk);
                    }
                    *pos += 2;
                    self.body = Body::ChunkSize;
                }
                Body::ChunkSize | Body::Trailer => {
                    let Some(eol) = avail.windows(2).position(|w| w == b"\r\n") else {
                        return if avail.len() > 1024 {
                            Err(ParseError::BadChunk)
                        } else {
                            Ok(())
                        };
                    };
                    let line = &avail[..eol];
                    *pos += eol + 2;
                    self.body = if self.body == Body::Trailer {
                        if line.is_empty() {
                            Body::None
                        } else {
                            Body::Trailer
                        }
                    } else {
                        match parse_chunk_size(line)? {
                            0 => Body::Trailer,
                            n => Body::ChunkData(n),
                        }
                    };
                }
                Body::UntilClose => {
                    *pos = self.buf.len();
                    return Ok(());
                }
            }
        }
    }

    /// Parses one head at `pos`; returns its length, or None when incomplete.
    fn parse_head(
        &mut self,
        pos: usize,
        out: &mut Vec<Message>,
    ) -> Result<Option<usize>, ParseError> {
        let data = &self.buf[pos..];
        let (n, msg, body) = match self.role {
            Role::Requests => {
                let Some(line) = request_line(data)? else {
                    return Ok(None);
                };
                let (n, hs) = if line.version == "HTTP/0.9" {
                    (line.len, Vec::new())
                } else {
                    let rest = &data[line.len..];
                    let parsed = with_headers(rest, |hs| {
                        Ok(match httparse::parse_headers(rest, hs)? {
                            httparse::Status::Complete((k, hs)) => Some((k, owned(hs))),
                            httparse::Status::Partial => None,
                        })
                    })?;
                    match parsed {
                        Some((k, hs)) => (line.len + k, hs),
                        None => return Ok(None),
                    }
                };
                let body = body_of(&hs, false)?;
                let host = hs
                    .iter()
                    .find(|h| h.name == "host")
                    .map(|h| String::from_utf8_lossy(&h.value).into_owned());
                let msg = Message::Request(Request {
                    method: String::from_utf8_lossy(line.method).into_owned(),
                    path: super::target_string(line.target),
                    host,
                    version: line.version,
                    headers: hs,
                });
                (n, msg, body)
            }
            Role::Responses => {
                if let Some(Err(e)) = sniff(data) {
                    return Err(e);
                }
                let parsed = with_headers(data, |hs| {
                    let mut resp = httparse::Response::new(hs);
                    Ok(match resp.parse(data)? {
                        httparse::Status::Complete(n) => {
                            Some((n, resp.code.unwrap_or(0), owned(resp.headers)))
                        }
                        httparse::Status::Partial => None,
                    })
                })?;
                let Some((n, status, hs)) = parsed else {
                    return Ok(None);
                };
                let body = if (100..200).contains(&status) || status == 204 || status == 304 {
                    Body::None
                } else {
                    body_of(&hs, true)?
                };
                (n, Message::Response { status }, body)
            }
        };
        // The same limit whether the head came in one piece or many.
        if n > MAX_HEAD {
            return Err(ParseError::HeadTooLarge);
        }
        out.push(msg);
        self.body = if body == Body::Length(0) {
            Body::None
        } else {
            body
        };
        Ok(Some(n))
    }
}

/// Runs an httparse parse with room for [`FEW_HEADERS`] headers, and again with room for every
/// line of the head when that was too few. `parse` gives `None` when the head is incomplete.
fn with_headers<'b, R>(
    data: &'b [u8],
    mut parse: impl FnMut(&mut [httparse::Header<'b>]) -> Result<Option<R>, httparse::Error>,
) -> Result<Option<R>, ParseError> {
    let mut few = [httparse::EMPTY_HEADER; FEW_HEADERS];
    let r = match parse(&mut few) {
        Err(httparse::Error::TooManyHeaders) => {
            // Each header ends with a LF: no more headers than lines, and no more lines
            // than a head may hold.
            let window = &data[..data.len().min(MAX_HEAD)];
            let lines = window.iter().filter(|&&b| b == b'\n').count() + 1;
            let mut many = vec![httparse::EMPTY_HEADER; lines];
            parse(&mut many)
        }
        r => r,
    };
    match r {
        Ok(r) => Ok(r),
        Err(httparse::Error::TooManyHeaders) => Err(ParseError::HeadTooLarge),
        Err(_) => Err(ParseError::Malformed),
    }
}

fn owned(hs: &[httparse::Header<'_>]) -> Vec<Header> {
    hs.iter().map(|h| Header::new(h.name, h.value)).collect()
}

fn body_of(headers: &[Header], response: bool) -> Result<Body, ParseError> {
    let te = headers.iter().find(|h| h.name == "transfer-encoding");
    if te.is_some_and(|h| {
        String::from_utf8_lossy(&h.value)
            .to_ascii_lowercase()
            .contains("chunked")
    }) {
        return Ok(Body::ChunkSize);
    }
    if let Some(cl) = headers.iter().find(|h| h.name == "content-length") {
        let n = std::str::from_utf8(&cl.value)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or(ParseError::Malformed)?;
        return Ok(Body::Length(n));
    }
    Ok(if response {
        Body::UntilClose
    } else {
        Body::None
    })
}

fn parse_chunk_size(line: &[u8]) -> Result<u64, ParseError> {
    let hex = line.split(|&b| b == b';').next().unwrap_or_default();
    let s = std::str::from_utf8(hex)
        .map_err(|_| ParseError::BadChunk)?
        .trim();
    if s.is_empty() || s.len() > 15 {
        return Err(ParseError::BadChunk);
    }
    u64::from_str_radix(s, 16).map_err(|_| ParseError::BadChunk)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requests(p: &mut Http1Parser, chunks: &[&[u8]]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, &mut out).unwrap();
        }
        out.into_iter()
            .filter_map(|m| match m {
                Message::Request(r) => Some((r.method, r.path)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn head_split_across_chunks() {
        let mut p = Http1Parser::new(Role::Requests);
        let got = requests(
            &mut p,
            &[
                b"GET /a HTTP/1.1\r\nHo",
                b"st: x\r\nAuthorization: Bearer t\r\n",
                b"\r\n",
            ],
        );
        assert_eq!(got, vec![("GET".into(), "/a".into())]);
        assert_eq!(p.buffered(), 0);
    }

    #[test]
    fn pipelined_with_bodies() {
        let mut p = Http1Parser::new(Role::Requests);
        let got = requests(
            &mut p,
            &[
                b"POST /1 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloPOST /2 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"3\r\nabc\r\n0\r\n\r\nGET /3 HTTP/1.1\r\n\r\n",
            ],
        );
        let paths: Vec<_> = got.into_iter().map(|(_, p)| p).collect();
        assert_eq!(paths, ["/1", "/2", "/3"]);
    }

    #[test]
    fn body_bytes_that_look_like_requests_are_skipped() {
        let mut p = Http1Parser::new(Role::Requests);
        let body = b"GET /not-a-request HTTP/1.1\r\n\r\n";
        let head = format!("POST /x HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len());
        let got = requests(
            &mut p,
            &[
                head.as_bytes(),
                &body[..10],
                &body[10..],
                b"GET /y HTTP/1.1\r\n\r\n",
            ],
        );
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].1, "/y");
    }

    #[test]
    fn responses_keep_status() {
        let mut p = Http1Parser::new(Role::Responses);
        let mut out = Vec::new();
        p.feed(b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nabcHTTP/1.1 204 No Content\r\n\r\n", &mut out)
            .unwrap();
        let st: Vec<u16> = out
            .iter()
            .map(|m| match m {
                Message::Response { status } => *status,
                _ => 0,
            })
            .collect();
        assert_eq!(st, [404, 204]);
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let mut p = Http1Parser::new(Role::Requests);
        let mut out = Vec::new();
        assert_eq!(
            p.feed(b"\x16\x03\x01\x02\x00", &mut out),
            Err(ParseError::NotHttp)
        );
        assert_eq!(
            p.feed(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", &mut out),
            Err(ParseError::Malformed)
        );
        let big = vec![b'a'; MAX_HEAD + 10];
        assert!(p.feed(b"GET / HTTP/1.1\r\nX: ", &mut out).is_ok());
        assert_eq!(p.feed(&big, &mut out), Err(ParseError::HeadTooLarge));
        assert_eq!(p.buffered(), 0);
        assert_eq!(
            p.feed(
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                &mut out
            ),
            Err(ParseError::BadChunk)
        );
    }

    fn heads(chunks: &[&[u8]]) -> Vec<Request> {
        let mut p = Http1Parser::new(Role::Requests);
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, &mut out).unwrap();
        }
        out.into_iter()
            .filter_map(|m| match m {
                Message::Request(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn empty_lines_before_a_request_line_are_skipped() {
        let crlf = "\r\n".repeat(5000);
        let s = format!(
            "{crlf}GET /a HTTP/1.1\r\n\r\n\r\n\nPOST /b HTTP/1.1\r\nContent-Length: 0\r\n\r\n\r\n"
        );
        for chunk in [1, 7, s.len()] {
            let chunks: Vec<&[u8]> = s.as_bytes().chunks(chunk).collect();
            let got: Vec<_> = heads(&chunks).into_iter().map(|r| r.path).collect();
            assert_eq!(got, ["/a", "/b"], "chunk {chunk}");
        }
        assert_eq!(sniff(b"\r\n\r\nGET /"), Some(Ok(Role::Requests)));
        assert_eq!(sniff(b"\r\n\n"), None);
    }

    #[test]
    fn any_token_method_is_a_request() {
        let got = heads(&[b"PROPFIND /dav HTTP/1.1\r\nDepth: 1\r\n\r\nFOO-BAR /x HTTP/1.0\r\n\r\nM-SEARCH * HTTP/1.1\r\n\r\n"]);
        let got: Vec<_> = got
            .iter()
            .map(|r| (r.method.as_str(), r.path.as_str(), r.version))
            .collect();
        assert_eq!(
            got,
            [
                ("PROPFIND", "/dav", "HTTP/1.1"),
                ("FOO-BAR", "/x", "HTTP/1.0"),
                ("M-SEARCH", "*", "HTTP/1.1")
            ]
        );
        // Decided before the line ends when the target has a request's shape: a request line
        // longer than the bytes a stream is sniffed by.
        assert_eq!(
            sniff(b"REPORT /calendars/very/long"),
            Some(Ok(Role::Requests))
        );
        assert_eq!(sniff(b"PURGE http://cache/x"), Some(Ok(Role::Requests)));
        assert_eq!(sniff(b"M-SEARCH * HTTP/1.1\r\n"), Some(Ok(Role::Requests)));
        assert_eq!(sniff(b"M-SEARCH * HT"), None);
        // Other protocols' lines are not requests.
        assert_eq!(sniff(b"AUTH hunter2\r\n"), Some(Err(ParseError::NotHttp)));
        assert_eq!(sniff(b"AUTH hunter2"), None);
        assert_eq!(
            sniff(b"PRI * HTTP/2.0\r\n\r\nSM"),
            Some(Err(ParseError::NotHttp))
        );
        assert_eq!(
            sniff(b"SSH-2.0-OpenSSH_9.6\r\n"),
            Some(Err(ParseError::NotHttp))
        );
        assert_eq!(sniff(b"get\t/"), Some(Err(ParseError::NotHttp)));
    }

    #[test]
    fn lenient_request_lines_as_nginx_reads_them() {
        let got = heads(&[
            b"GET  /a   HTTP/1.1  \nHost: h\n\nGET /?access_token=t\r\nGET /c HTTP/1.2\r\n\r\n",
        ]);
        let got: Vec<_> = got
            .iter()
            .map(|r| (r.path.as_str(), r.version, r.host.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                ("/a", "HTTP/1.1", Some("h")),
                ("/?access_token=t", "HTTP/0.9", None),
                ("/c", "HTTP/1.1", None)
            ]
        );
        let mut p = Http1Parser::new(Role::Requests);
        let mut out = Vec::new();
        for bad in [
            &b"GET / HTTP/1.x\r\n\r\n"[..],
            b"GET / HTTP/1.1 x\r\n",
            b"POST /x\r\n",
        ] {
            assert!(
                p.feed(bad, &mut out).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(out.is_empty());
    }

    #[test]
    fn more_headers_than_the_first_try_holds() {
        for n in [128, 129, 1000, 5000] {
            let mut s = String::from("GET /many HTTP/1.1\r\n");
            for i in 0..n {
                s.push_str(&format!("X-{i}: v\r\n"));
            }
            s.push_str("Authorization: Bearer t\r\n\r\n");
            let got = heads(&[s.as_bytes()]);
            assert_eq!(got.len(), 1, "{n} headers");
            assert_eq!(got[0].headers.len(), n + 1);
            assert_eq!(got[0].headers[n].name, "authorization");
        }
        // Still bounded: a head past MAX_HEAD is refused whatever its header count.
        let mut p = Http1Parser::new(Role::Requests);
        let mut out = Vec::new();
        let head = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "a:\r\n".repeat(MAX_HEAD / 4 + 1)
        );
        assert_eq!(
            p.feed(head.as_bytes(), &mut out),
            Err(ParseError::HeadTooLarge)
        );
        // Responses too.
        let mut p = Http1Parser::new(Role::Responses);
        let resp = format!(
            "HTTP/1.1 200 OK\r\n{}Content-Length: 0\r\n\r\n",
            "X: y\r\n".repeat(300)
        );
        p.feed(resp.as_bytes(), &mut out).unwrap();
        assert!(matches!(out[..], [Message::Response { status: 200 }]));
    }

    #[test]
    fn a_path_that_is_not_utf8_is_kept_percent_encoded() {
        let got = heads(&[b"GET /caf\xe9/\x01?token=\xff\xfe&x=\xc3\xa9 HTTP/1.1\r\n\r\n"]);
        assert_eq!(got[0].path, "/caf%E9/%01?token=%FF%FE&x=\u{e9}");
    }

    proptest::proptest! {
        /// Whatever the method token, target bytes, header count and chunking, one request
        /// comes out, with every header, after any number of empty lines.
        #[test]
        fn any_request_nginx_would_read_is_parsed(
            method in "[A-Z_-]{1,12}",
            target in proptest::collection::vec(
                proptest::prop_oneof![0x21u8..0x7f, 0x80u8..], 1..200),
            blank in 0usize..4,
            n in 0usize..400,
            chunk in 1usize..300,
        ) {
            let mut target = target;
            target[0] = b'/';
            let mut req = b"\r\n".repeat(blank);
            req.extend(method.as_bytes());
            req.push(b' ');
            req.extend(&target);
            req.extend(b" HTTP/1.1\r\n");
            for i in 0..n {
                req.extend(format!("X-{i}: v\r\n").as_bytes());
            }
            req.extend(b"\r\n");
            let chunks: Vec<&[u8]> = req.chunks(chunk).collect();
            let got = heads(&chunks);
            proptest::prop_assert_eq!(got.len(), 1);
            proptest::prop_assert_eq!(&got[0].method, &method);
            proptest::prop_assert_eq!(&got[0].path, &super::super::target_string(&target));
            proptest::prop_assert_eq!(got[0].headers.len(), n);
            proptest::prop_assert_eq!(sniff(&req[..req.len().min(32)]).unwrap_or(Ok(Role::Requests)), Ok(Role::Requests));
        }
    }

    #[test]
    fn sniffing() {
        assert_eq!(sniff(b"GE"), None);
        assert_eq!(sniff(b"GET /"), Some(Ok(Role::Requests)));
        assert_eq!(sniff(b"HTTP/1.1 200"), Some(Ok(Role::Responses)));
        assert_eq!(sniff(b"PRI * HTTP/2.0"), Some(Err(ParseError::NotHttp)));
        assert_eq!(sniff(b"\x16\x03"), Some(Err(ParseError::NotHttp)));
    }
}
