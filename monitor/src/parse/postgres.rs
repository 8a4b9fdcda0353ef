//! PostgreSQL frontend messages: the startup message (user, database), then the password
//! message, cleartext or MD5. SCRAM never sends the password: its initial response is reported
//! as a login without a secret. An SSLRequest answered with TLS makes the rest unreadable here
//! (libpq's TLS is seen decrypted through the TLS probes instead).

use zeroize::{Zeroize, Zeroizing};

use super::{Login, Message};

const SSL_REQUEST: u32 = 80877103;
const GSSENC_REQUEST: u32 = 80877104;
const CANCEL_REQUEST: u32 = 80877102;
/// The server refuses startup packets past 10000 bytes.
const MAX_STARTUP: usize = 10_000;
/// Password messages (and SASL initial responses) buffered whole; larger ones are stepped over.
const MAX_PASSWORD: usize = 8192;
const MAX_NAME: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// A startup packet with a bad length or protocol code.
    BadStartup,
    /// A message with a length below its own header.
    BadLength,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ParseError::BadStartup => "postgres: bad startup packet",
            ParseError::BadLength => "postgres: bad message length",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Untyped startup-phase packets (SSLRequest, StartupMessage).
    Startup,
    /// After SSLRequest or GSSENCRequest: TLS or a plaintext startup follows.
    Negotiating,
    /// Typed messages.
    Messages,
    /// Stepping over a message body.
    Skip(u64),
    /// Encrypted, or a cancel request: nothing more to read.
    Done,
}

pub struct PostgresParser {
    buf: Vec<u8>,
    state: State,
    user: Option<String>,
    database: Option<String>,
}

impl std::fmt::Debug for PostgresParser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresParser")
            .field("state", &self.state)
            .field("buffered", &self.buf.len())
            .field("user", &self.user)
            .finish()
    }
}

impl Default for PostgresParser {
    fn default() -> Self {
        Self::new()
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn startup_code_ok(len: u32, code: u32) -> bool {
    match code {
        SSL_REQUEST | GSSENC_REQUEST => len == 8,
        CANCEL_REQUEST => len == 16,
        c => c >> 16 == 3 && c & 0xffff <= 2 && len > 8 && len as usize <= MAX_STARTUP,
    }
}

/// Tells from the first bytes whether a stream is a PostgreSQL client. `None`: not yet known.
pub fn sniff(data: &[u8]) -> Option<bool> {
    if data.len() < 8 {
        return if data.iter().take(2).all(|&b| b == 0) {
            None
        } else {
            Some(false)
        };
    }
    Some(startup_code_ok(be32(data), be32(&data[4..])))
}

impl PostgresParser {
    pub fn new() -> Self {
        PostgresParser {
            buf: Vec::new(),
            state: State::Startup,
            user: None,
            database: None,
        }
    }

    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Forgets partial state after a gap: typed messages are assumed to follow (an encrypted
    /// connection stays so).
    pub fn reset(&mut self) {
        self.buf.zeroize();
        self.buf.clear();
        if self.state != State::Done {
            self.state = State::Messages;
        }
    }

    pub fn feed(&mut self, data: &[u8], out: &mut Vec<Message>) -> Result<(), ParseError> {
        if self.state == State::Done {
            return Ok(());
        }
        let mut data = data;
        if let State::Skip(left) = self.state {
            let k = left.min(data.len() as u64);
            data = &data[k as usize..];
            self.state = if left > k {
                State::Skip(left - k)
            } else {
                State::Messages
            };
        }
        self.buf.extend_from_slice(data);
        let mut pos = 0;
        let r = self.process(&mut pos, out);
        super::release_consumed(&mut self.buf, pos);
        if self.state == State::Done {
            self.buf.clear();
        }
        if r.is_err() {
            self.reset();
        }
        r
    }

    fn process(&mut self, pos: &mut usize, out: &mut Vec<Message>) -> Result<(), ParseError> {
        loop {
            let avail = &self.buf[*pos..];
            match self.state {
                State::Done => return Ok(()),
                State::Negotiating if avail.first() == Some(&0x16) => {
                    self.state = State::Done;
                }
                State::Startup | State::Negotiating => {
                    if avail.len() < 8 {
                        return Ok(());
                    }
                    let (len, code) = (be32(avail), be32(&avail[4..]));
                    if !startup_code_ok(len, code) {
                        return Err(ParseError::BadStartup);
                    }
                    let len = len as usize;
                    if avail.len() < len {
                        return Ok(());
                    }
                    match code {
                        SSL_REQUEST | GSSENC_REQUEST => self.state = State::Negotiating,
                        CANCEL_REQUEST => self.state = State::Done,
                        _ => {
                            let params = avail[8..len].to_vec();
                            self.startup_params(&params);
                            self.state = State::Messages;
                        }
                    }
                    *pos += len;
                }
                State::Messages => {
                    if avail.len() < 5 {
                        return Ok(());
                    }
                    let (kind, len) = (avail[0], be32(&avail[1..]) as usize);
                    if len < 4 {
                        return Err(ParseError::BadLength);
                    }
                    let body = len - 4;
                    if kind != b'p' || body > MAX_PASSWORD {
                        *pos += 5;
                        self.state = State::Skip(body as u64);
                        continue;
                    }
                    if avail.len() < 5 + body {
                        return Ok(());
                    }
                    let body = Zeroizing::new(avail[5..5 + body].to_vec());
                    *pos += 5 + body.len();
                    if let Some(m) = self.password(&body) {
                        out.push(m);
                    }
                }
                State::Skip(left) => {
                    let k = left.min(avail.len() as u64);
                    *pos += k as usize;
                    if k < left {
                        self.state = State::Skip(left - k);
                        return Ok(());
                    }
                    self.state = State::Messages;
                }
            }
        }
    }

    /// `name\0value\0 ... \0`: keeps user and database.
    fn startup_params(&mut self, params: &[u8]) {
        let mut it = params.split(|&b| b == 0);
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            let v = || {
                let v = &v[..v.len().min(MAX_NAME)];
                Some(String::from_utf8_lossy(v).into_owned())
            };
            match k {
                b"user" => self.user = v(),
                b"database" => self.database = v(),
                _ => {}
            }
        }
        if self.database.is_none() {
            // The server's default.
            self.database = self.user.clone();
        }
    }

    /// A 'p' message: a password (NUL-terminated), a SASL initial response (mechanism name,
    /// then data), or a SASL/GSS continuation (nothing to report).
    fn password(&self, body: &[u8]) -> Option<Message> {
        let login = |command, secret: Option<&[u8]>, field| {
            Some(Message::Login(Login {
                protocol: "postgres",
                command,
                user: self.user.clone(),
                database: self.database.clone(),
                secret: secret.map(|s| Zeroizing::new(s.to_vec())),
                kind: "postgres-password",
                field,
            }))
        };
        let nul = body.iter().position(|&b| b == 0)?;
        if nul + 1 == body.len() {
            let pw = &body[..nul];
            let md5 = pw.len() == 35
                && pw.starts_with(b"md5")
                && pw[3..].iter().all(|b| b.is_ascii_hexdigit());
            return if md5 {
                login("PASSWORD", Some(pw), "md5-password")
            } else {
                login("PASSWORD", Some(pw), "password")
            };
        }
        match &body[..nul] {
            b"SCRAM-SHA-256" | b"SCRAM-SHA-256-PLUS" => login("SASL", None, "scram"),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = 196608u32.to_be_bytes().to_vec();
        for (k, v) in params {
            body.extend(k.as_bytes());
            body.push(0);
            body.extend(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut m = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        m.extend(body);
        m
    }

    fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend(((body.len() + 4) as u32).to_be_bytes());
        m.extend(body);
        m
    }

    fn logins(s: &[u8], chunk: usize) -> Vec<Login> {
        let mut p = PostgresParser::new();
        let mut out = Vec::new();
        for c in s.chunks(chunk) {
            p.feed(c, &mut out).unwrap();
        }
        out.into_iter()
            .filter_map(|m| match m {
                Message::Login(l) => Some(l),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn ssl_refused_then_cleartext_password() {
        let mut s = vec![0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        assert_eq!(sniff(&s), Some(true));
        s.extend(startup(&[("user", "app"), ("database", "orders")]));
        s.extend(msg(b'p', b"s3cret\0"));
        s.extend(msg(b'Q', b"select 1\0"));
        s.extend(msg(b'p', format!("md5{}\0", "a".repeat(32)).as_bytes()));
        for chunk in [1, 3, 100] {
            let l = logins(&s, chunk);
            assert_eq!(l.len(), 2);
            assert_eq!(l[0].user.as_deref(), Some("app"));
            assert_eq!(l[0].database.as_deref(), Some("orders"));
            assert_eq!(l[0].secret.as_deref().map(|s| &s[..]), Some(&b"s3cret"[..]));
            assert_eq!((l[0].field, l[1].field), ("password", "md5-password"));
            assert_eq!(l[1].secret.as_ref().unwrap().len(), 35);
        }
    }

    #[test]
    fn scram_has_no_secret_and_tls_stops_parsing() {
        let mut s = startup(&[("user", "u")]);
        let mut init = b"SCRAM-SHA-256\0".to_vec();
        init.extend(20u32.to_be_bytes());
        init.extend(b"n,,n=,r=abcdefghijkl");
        s.extend(msg(b'p', &init));
        s.extend(msg(b'p', b"c=biws,r=abc,p=proof"));
        let l = logins(&s, 7);
        assert_eq!(l.len(), 1);
        assert_eq!((l[0].command, l[0].secret.is_none()), ("SASL", true));
        assert_eq!(l[0].database.as_deref(), Some("u"));

        let mut s = vec![
            0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f, 0x16, 0x03, 0x01, 0x02, 0x00,
        ];
        s.extend([0xff; 100]);
        assert!(logins(&s, 5).is_empty());
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let mut out = Vec::new();
        let mut p = PostgresParser::new();
        assert_eq!(
            p.feed(&[0xff, 0xff, 0xff, 0xff, 0, 3, 0, 0], &mut out),
            Err(ParseError::BadStartup)
        );
        let mut p = PostgresParser::new();
        p.feed(&startup(&[("user", "u")]), &mut out).unwrap();
        assert_eq!(
            p.feed(&[b'p', 0, 0, 0, 1], &mut out),
            Err(ParseError::BadLength)
        );
        // A huge message is stepped over; a truncated password waits and stays out of Debug.
        let mut p = PostgresParser::new();
        p.feed(&startup(&[("user", "u")]), &mut out).unwrap();
        p.feed(&[b'd', 0x7f, 0xff, 0xff, 0xff], &mut out).unwrap();
        p.feed(&[0; 10_000], &mut out).unwrap();
        assert_eq!(p.buffered(), 0);
        let mut p = PostgresParser::new();
        p.feed(&startup(&[("user", "u")]), &mut out).unwrap();
        p.feed(
            &[b'p', 0, 0, 0, 20, b'h', b'u', b'n', b't', b'e', b'r', b'2'],
            &mut out,
        )
        .unwrap();
        assert!(!format!("{p:?}").contains("hunter2"));
        assert!(out.is_empty());
        // Startup params without values or terminators.
        let mut p = PostgresParser::new();
        let mut m = 13u32.to_be_bytes().to_vec();
        m.extend(196608u32.to_be_bytes());
        m.extend(b"user\0");
        p.feed(&m, &mut out).unwrap();
    }
}
