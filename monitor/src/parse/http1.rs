//! HTTP/1.x, incrementally: messages split over any number of chunks, pipelined messages,
//! bodies skipped by Content-Length or chunked encoding, both directions.

use super::{Header, Message, Request};
use zeroize::Zeroize;

/// Largest header block (or chunk-size/trailer line) accepted; past it the stream is broken.
pub const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;

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

const METHODS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// Tells from the first bytes of a stream whether it is HTTP/1 and which side.
/// `None`: not enough bytes to tell yet.
pub fn sniff(data: &[u8]) -> Option<Result<Role, ParseError>> {
    let candidates = METHODS
        .iter()
        .map(|m| (*m, Role::Requests))
        .chain([(&b"HTTP/1."[..], Role::Responses)]);
    let mut undecided = false;
    for (prefix, role) in candidates {
        let n = prefix.len().min(data.len());
        if data[..n] == prefix[..n] {
            if n == prefix.len() {
                return Some(Ok(role));
            }
            undecided = true;
        }
    }
    if undecided {
        None
    } else {
        Some(Err(ParseError::NotHttp))
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
        if let Some(Err(e)) = sniff(data) {
            return Err(e);
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let (n, msg, body) = match self.role {
            Role::Requests => {
                let mut req = httparse::Request::new(&mut headers);
                let n = match req.parse(data) {
                    Ok(httparse::Status::Complete(n)) => n,
                    Ok(httparse::Status::Partial) => return Ok(None),
                    Err(_) => return Err(ParseError::Malformed),
                };
                let hs: Vec<Header> = req
                    .headers
                    .iter()
                    .map(|h| Header::new(h.name, h.value))
                    .collect();
                let body = body_of(&hs, false)?;
                let host = hs
                    .iter()
                    .find(|h| h.name == "host")
                    .map(|h| String::from_utf8_lossy(&h.value).into_owned());
                let msg = Message::Request(Request {
                    method: req.method.unwrap_or_default().to_string(),
                    path: req.path.unwrap_or_default().to_string(),
                    host,
                    version: if req.version == Some(0) {
                        "HTTP/1.0"
                    } else {
                        "HTTP/1.1"
                    },
                    headers: hs,
                });
                (n, msg, body)
            }
            Role::Responses => {
                let mut resp = httparse::Response::new(&mut headers);
                let n = match resp.parse(data) {
                    Ok(httparse::Status::Complete(n)) => n,
                    Ok(httparse::Status::Partial) => return Ok(None),
                    Err(_) => return Err(ParseError::Malformed),
                };
                let status = resp.code.unwrap_or(0);
                let hs: Vec<Header> = resp
                    .headers
                    .iter()
                    .map(|h| Header::new(h.name, h.value))
                    .collect();
                let body = if (100..200).contains(&status) || status == 204 || status == 304 {
                    Body::None
                } else {
                    body_of(&hs, true)?
                };
                (n, Message::Response { status }, body)
            }
        };
        out.push(msg);
        self.body = if body == Body::Length(0) {
            Body::None
        } else {
            body
        };
        Ok(Some(n))
    }
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

    #[test]
    fn sniffing() {
        assert_eq!(sniff(b"GE"), None);
        assert_eq!(sniff(b"GET /"), Some(Ok(Role::Requests)));
        assert_eq!(sniff(b"HTTP/1.1 200"), Some(Ok(Role::Responses)));
        assert_eq!(sniff(b"PRI * HTTP/2.0"), Some(Err(ParseError::NotHttp)));
        assert_eq!(sniff(b"\x16\x03"), Some(Err(ParseError::NotHttp)));
    }
}
