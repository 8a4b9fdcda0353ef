//! Redis commands (RESP arrays of bulk strings, and inline commands) sent by a client, for
//! `AUTH [user] pass` and `HELLO ver AUTH user pass`. Every other command is stepped over
//! without buffering its arguments.

use zeroize::{Zeroize, Zeroizing};

use super::{Login, Message};

/// Longest `*N` / `$N` line; a real one is a few bytes.
const MAX_LENGTH_LINE: usize = 32;
/// Longest inline command buffered (redis-server's own limit is 64 KiB).
pub const MAX_INLINE: usize = 64 * 1024;
/// Arguments of AUTH/HELLO kept; longer ones are not passwords anyone types.
const MAX_KEPT_ARG: usize = 4096;
const MAX_KEPT_ARGS: usize = 8;
/// redis-server refuses bulk strings past 512 MiB.
const MAX_BULK: u64 = 512 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Not RESP where a command should start or an argument be.
    Malformed,
    /// A length line or inline command past its limit.
    TooLong,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ParseError::Malformed => "redis: malformed command",
            ParseError::TooLong => "redis: line too long",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between commands.
    Idle,
    /// Inside an array, before an argument.
    Array,
    /// Stepping over an argument (its bytes and CRLF).
    Skip(u64),
}

#[derive(Default)]
pub struct RedisParser {
    buf: Vec<u8>,
    state: Option<State>,
    /// Arguments kept of the current command (only AUTH/HELLO keep more than the name).
    args: Vec<Zeroizing<Vec<u8>>>,
    /// Position of the next argument in the command, and how many are left.
    index: u64,
    left: u64,
}

impl std::fmt::Debug for RedisParser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisParser")
            .field("state", &self.state)
            .field("buffered", &self.buf.len())
            .field("args", &self.args.len())
            .finish()
    }
}

/// Tells from the first bytes whether a stream carries Redis commands. `None`: not yet known.
pub fn sniff(data: &[u8]) -> Option<bool> {
    if let Some(rest) = data.strip_prefix(b"*") {
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let tail = &rest[digits..];
        let expect = b"\r\n$";
        let n = tail.len().min(expect.len());
        if digits > 10 || tail[..n] != expect[..n] || (digits == 0 && !tail.is_empty()) {
            return Some(false);
        }
        return (n == expect.len()).then_some(true);
    }
    // Inline AUTH/HELLO, as typed into telnet or nc; redis skips leading blanks.
    let data = &data[data
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count()..];
    if data.is_empty() {
        return None;
    }
    for word in [&b"AUTH"[..], b"HELLO"] {
        let n = data.len().min(word.len());
        if data[..n].eq_ignore_ascii_case(&word[..n]) {
            return match data.get(word.len()) {
                None => None,
                Some(b' ' | b'\t') => Some(true),
                Some(_) => Some(false),
            };
        }
    }
    Some(false)
}

impl RedisParser {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Forgets partial state, e.g. after a gap.
    pub fn reset(&mut self) {
        self.buf.zeroize();
        self.buf.clear();
        self.args.clear();
        self.state = None;
        self.index = 0;
        self.left = 0;
    }

    /// Feeds client bytes in order; AUTH and HELLO ... AUTH become [`Message::Login`].
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<Message>) -> Result<(), ParseError> {
        let mut data = data;
        if let Some(State::Skip(left)) = self.state {
            let k = left.min(data.len() as u64);
            data = &data[k as usize..];
            self.state = Some(State::Skip(left - k));
            if left > k {
                return Ok(());
            }
            self.next_arg(out);
        }
        self.buf.extend_from_slice(data);
        let mut pos = 0;
        let r = self.process(&mut pos, out);
        super::release_consumed(&mut self.buf, pos);
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
            match self.state.unwrap_or(State::Idle) {
                State::Idle => {
                    if avail[0] == b'*' {
                        let Some((n, used)) = length_line(avail)? else {
                            return Ok(());
                        };
                        *pos += used;
                        self.args.clear();
                        self.index = 0;
                        if n > 0 {
                            self.left = n as u64;
                            self.state = Some(State::Array);
                        }
                    } else {
                        let Some(eol) = avail.iter().position(|&b| b == b'\n') else {
                            return if avail.len() > MAX_INLINE {
                                Err(ParseError::TooLong)
                            } else {
                                Ok(())
                            };
                        };
                        let line = &avail[..eol];
                        let line = line.strip_suffix(b"\r").unwrap_or(line);
                        // Unbalanced quotes: redis refuses the line, so it logs nobody in.
                        self.args = split_inline(line).unwrap_or_default();
                        *pos += eol + 1;
                        if let Some(m) = self.login() {
                            out.push(m);
                        }
                        self.args.clear();
                    }
                }
                State::Array => {
                    if avail[0] != b'$' {
                        return Err(ParseError::Malformed);
                    }
                    let Some((n, used)) = length_line(avail)? else {
                        return Ok(());
                    };
                    let n = u64::try_from(n).map_err(|_| ParseError::Malformed)?;
                    if n > MAX_BULK {
                        return Err(ParseError::Malformed);
                    }
                    let keep = self.index == 0
                        || (self.interesting()
                            && self.args.len() < MAX_KEPT_ARGS
                            && n as usize <= MAX_KEPT_ARG);
                    if keep {
                        let n = n as usize;
                        if avail.len() < used + n + 2 {
                            if self.index == 0 && n > MAX_KEPT_ARG {
                                // A command name this long is no command we care about.
                                *pos += used;
                                self.state = Some(State::Skip(n as u64 + 2));
                                continue;
                            }
                            return Ok(());
                        }
                        if &avail[used + n..used + n + 2] != b"\r\n" {
                            return Err(ParseError::Malformed);
                        }
                        self.args
                            .push(Zeroizing::new(avail[used..used + n].to_vec()));
                        *pos += used + n + 2;
                        self.next_arg(out);
                    } else {
                        *pos += used;
                        self.state = Some(State::Skip(n + 2));
                    }
                }
                State::Skip(left) => {
                    let k = left.min(avail.len() as u64);
                    *pos += k as usize;
                    self.state = Some(State::Skip(left - k));
                    if k < left {
                        return Ok(());
                    }
                    self.next_arg(out);
                }
            }
        }
    }

    /// One argument done: the command ends when none are left.
    fn next_arg(&mut self, out: &mut Vec<Message>) {
        self.index += 1;
        self.left = self.left.saturating_sub(1);
        if self.left > 0 {
            self.state = Some(State::Array);
            return;
        }
        if let Some(m) = self.login() {
            out.push(m);
        }
        self.args.clear();
        self.state = None;
    }

    fn interesting(&self) -> bool {
        self.args
            .first()
            .is_some_and(|c| c.eq_ignore_ascii_case(b"AUTH") || c.eq_ignore_ascii_case(b"HELLO"))
    }

    /// AUTH [user] pass, or HELLO [ver] [AUTH user pass] [SETNAME name].
    fn login(&self) -> Option<Message> {
        let cmd = self.args.first()?;
        let (command, user, pass) = if cmd.eq_ignore_ascii_case(b"AUTH") {
            match &self.args[1..] {
                [pass] => ("AUTH", None, pass),
                [user, pass] => ("AUTH", Some(user), pass),
                _ => return None,
            }
        } else if cmd.eq_ignore_ascii_case(b"HELLO") {
            let at = self
                .args
                .iter()
                .skip(1)
                .position(|a| a.eq_ignore_ascii_case(b"AUTH"))?
                + 1;
            ("HELLO", self.args.get(at + 1), self.args.get(at + 2)?)
        } else {
            return None;
        };
        Some(Message::Login(Login {
            protocol: "redis",
            command,
            user: user.map(|u| String::from_utf8_lossy(u).into_owned()),
            database: None,
            secret: Some(pass.clone()),
            kind: "redis-auth",
            field: "auth",
        }))
    }
}

/// Splits an inline command into arguments as redis-server does (`sdssplitargs`), so that
/// `AUTH "a b"` is one password: double quotes with `\\n`, `\\r`, `\\t`, `\\b`, `\\a`,
/// `\\xHH` and `\\<c>` escapes; single quotes with `\\'`; a closing quote must end the
/// argument. Only the first [`MAX_KEPT_ARGS`] are kept (the others are still parsed: a bad
/// quote anywhere makes the whole line an error). `None` when redis would refuse the line
/// (unbalanced quotes).
fn split_inline(line: &[u8]) -> Option<Vec<Zeroizing<Vec<u8>>>> {
    // redis-server copies the line into a C string: a NUL ends it.
    let line = &line[..line.iter().position(|&b| b == 0).unwrap_or(line.len())];
    // C's isspace, which redis uses between arguments and after a closing quote.
    let space = |b: u8| b" \t\n\r\x0b\x0c".contains(&b);
    let hex = |b: Option<&u8>| b.and_then(|&b| (b as char).to_digit(16));
    let mut args = Vec::new();
    let mut cur = Zeroizing::new(Vec::new());
    let mut i = 0;
    loop {
        while i < line.len() && space(line[i]) {
            i += 1;
        }
        if i == line.len() {
            return Some(args);
        }
        // Sized once so that growing it leaves no copies of a password behind.
        if cur.capacity() == 0 {
            cur.reserve_exact(line.len() - i);
        }
        let (mut dq, mut sq) = (false, false);
        loop {
            let c = line.get(i).copied();
            if dq {
                match c {
                    None => return None,
                    Some(b'\\') if line.get(i + 1) == Some(&b'x') => {
                        match (hex(line.get(i + 2)), hex(line.get(i + 3))) {
                            (Some(h), Some(l)) => {
                                cur.push((h << 4 | l) as u8);
                                i += 3;
                            }
                            _ => {
                                cur.push(b'x');
                                i += 1;
                            }
                        }
                    }
                    Some(b'\\') if i + 1 < line.len() => {
                        i += 1;
                        cur.push(match line[i] {
                            b'n' => b'\n',
                            b'r' => b'\r',
                            b't' => b'\t',
                            b'b' => 0x08,
                            b'a' => 0x07,
                            other => other,
                        });
                    }
                    Some(b'"') => {
                        if line.get(i + 1).is_some_and(|&b| !space(b)) {
                            return None;
                        }
                        i += 1;
                        break;
                    }
                    Some(b) => cur.push(b),
                }
            } else if sq {
                match c {
                    None => return None,
                    Some(b'\\') if line.get(i + 1) == Some(&b'\'') => {
                        cur.push(b'\'');
                        i += 1;
                    }
                    Some(b'\'') => {
                        if line.get(i + 1).is_some_and(|&b| !space(b)) {
                            return None;
                        }
                        i += 1;
                        break;
                    }
                    Some(b) => cur.push(b),
                }
            } else {
                match c {
                    None | Some(b' ' | b'\n' | b'\r' | b'\t') => break,
                    Some(b'"') => dq = true,
                    Some(b'\'') => sq = true,
                    Some(b) => cur.push(b),
                }
            }
            i += 1;
        }
        if args.len() < MAX_KEPT_ARGS {
            args.push(Zeroizing::new(std::mem::take(&mut *cur)));
        } else {
            cur.zeroize();
            cur.clear();
        }
    }
}

/// Parses `*N\r\n` or `$N\r\n` at the start of `b`: `(N, bytes used)`, or None if incomplete.
fn length_line(b: &[u8]) -> Result<Option<(i64, usize)>, ParseError> {
    let Some(eol) = b.iter().take(MAX_LENGTH_LINE).position(|&c| c == b'\n') else {
        return if b.len() >= MAX_LENGTH_LINE {
            Err(ParseError::TooLong)
        } else {
            Ok(None)
        };
    };
    if eol < 2 || b[eol - 1] != b'\r' {
        return Err(ParseError::Malformed);
    }
    let n = std::str::from_utf8(&b[1..eol - 1])
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or(ParseError::Malformed)?;
    if n < -1 {
        return Err(ParseError::Malformed);
    }
    Ok(Some((n, eol + 1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(args: &[&str]) -> Vec<u8> {
        let mut b = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            b.extend(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
        }
        b
    }

    fn logins(chunks: &[&[u8]]) -> Vec<(&'static str, Option<String>, Vec<u8>)> {
        let mut p = RedisParser::new();
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, &mut out).unwrap();
        }
        assert_eq!(p.buffered(), 0);
        out.into_iter()
            .filter_map(|m| match m {
                Message::Login(l) => Some((l.command, l.user, l.secret.unwrap().to_vec())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn auth_forms() {
        let mut s = resp(&["SET", "k", &"v".repeat(10_000)]);
        s.extend(resp(&["auth", "s3cret"]));
        s.extend(resp(&["AUTH", "app", "pw"]));
        s.extend(resp(&["HELLO", "3", "AUTH", "svc", "pw2", "SETNAME", "x"]));
        s.extend(resp(&["HELLO", "3"]));
        s.extend(b"AUTH inline\r\n");
        for chunk in [1, 5, 4096] {
            let chunks: Vec<&[u8]> = s.chunks(chunk).collect();
            let got = logins(&chunks);
            assert_eq!(
                got,
                [
                    ("AUTH", None, b"s3cret".to_vec()),
                    ("AUTH", Some("app".into()), b"pw".to_vec()),
                    ("HELLO", Some("svc".into()), b"pw2".to_vec()),
                    ("AUTH", None, b"inline".to_vec()),
                ],
                "chunk {chunk}"
            );
        }
    }

    fn inline(line: &[u8]) -> Option<Vec<Vec<u8>>> {
        split_inline(line).map(|a| a.iter().map(|a| a.to_vec()).collect())
    }

    #[test]
    fn inline_commands_are_split_as_redis_does() {
        let v = |a: &[&[u8]]| Some(a.iter().map(|a| a.to_vec()).collect::<Vec<_>>());
        assert_eq!(inline(br#"AUTH "a b""#), v(&[b"AUTH", b"a b"]));
        assert_eq!(
            inline(b"  AUTH\tuser   pass  "),
            v(&[b"AUTH", b"user", b"pass"])
        );
        assert_eq!(inline(br"AUTH 'it\'s' x"), v(&[b"AUTH", b"it's", b"x"]));
        assert_eq!(
            inline(br#"AUTH "q\"\n\x41\xZ\\""#),
            v(&[b"AUTH", b"q\"\nAxZ\\"])
        );
        assert_eq!(inline(br#"AUTH pa"ss wo""#), v(&[b"AUTH", b"pass wo"]));
        assert_eq!(inline(b"AUTH ''"), v(&[b"AUTH", b""]));
        assert_eq!(inline(b"AUTH x\0 y"), v(&[b"AUTH", b"x"]));
        // Refused by redis: unbalanced, or a closing quote not ending the argument.
        assert_eq!(inline(br#"AUTH "a b"#), None);
        assert_eq!(inline(br#"AUTH "a"b"#), None);
        assert_eq!(inline(br#"AUTH pa"ss wo"rd"#), None);
        assert_eq!(inline(b"AUTH 'a"), None);
        assert_eq!(inline(b""), v(&[]));
        let many = "a ".repeat(MAX_KEPT_ARGS * 2);
        assert_eq!(inline(many.as_bytes()).unwrap().len(), MAX_KEPT_ARGS);
    }

    proptest::proptest! {
        /// Any arguments, quoted as redis-cli would (every byte `\\xHH`, or single quotes),
        /// come back whole.
        #[test]
        fn quoted_arguments_round_trip(
            args in proptest::collection::vec(proptest::collection::vec(1u8.., 0..40), 1..MAX_KEPT_ARGS),
            single in proptest::bool::ANY,
        ) {
            let line: Vec<u8> = args
                .iter()
                .map(|a| {
                    if single {
                        let mut q = vec![b'\''];
                        for &b in a {
                            if b == b'\'' {
                                q.extend(b"\\'");
                            } else {
                                q.push(b);
                            }
                        }
                        q.push(b'\'');
                        q
                    } else {
                        let hex: String = a.iter().map(|b| format!("\\x{b:02x}")).collect();
                        format!("\"{hex}\"").into_bytes()
                    }
                })
                .collect::<Vec<_>>()
                .join(&b" "[..]);
            // Single quotes keep every byte but `\\'`; a `\\` before a closing quote would
            // escape it, as in redis.
            let ends_escaped = single && args.iter().any(|a| a.last() == Some(&b'\\'));
            let got = inline(&line);
            if !ends_escaped {
                proptest::prop_assert_eq!(got, Some(args));
            }
        }
    }

    #[test]
    fn quoted_inline_auth_is_one_password_not_a_user() {
        let pw = format!("canary {}", std::process::id());
        let line = format!("AUTH \"{pw}\"\r\nAUTH app 'p w'\r\nAUTH \"unbalanced\r\n");
        let got = logins(&[line.as_bytes()]);
        assert_eq!(
            got,
            [
                ("AUTH", None, pw.into_bytes()),
                ("AUTH", Some("app".into()), b"p w".to_vec()),
            ]
        );
    }

    #[test]
    fn sniffing() {
        assert_eq!(sniff(b"  AUTH x"), Some(true));
        assert_eq!(sniff(b"AUTH"), None);
        assert_eq!(sniff(b"AUTHX"), Some(false));
        assert_eq!(sniff(b"hello\t3"), Some(true));
        assert_eq!(sniff(b"*"), None);
        assert_eq!(sniff(b"*2\r"), None);
        assert_eq!(sniff(b"*2\r\n$4\r\nAUTH"), Some(true));
        assert_eq!(sniff(b"auth x"), Some(true));
        assert_eq!(sniff(b"*x"), Some(false));
        assert_eq!(sniff(b"GET / HTTP/1.1"), Some(false));
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let mut out = Vec::new();
        let mut p = RedisParser::new();
        assert_eq!(
            p.feed(b"*2\r\n+OK\r\n", &mut out),
            Err(ParseError::Malformed)
        );
        assert_eq!(
            p.feed(b"*2\r\n$-5\r\n", &mut out),
            Err(ParseError::Malformed)
        );
        assert_eq!(
            p.feed(b"*2\r\n$4\r\nAUTHxx", &mut out),
            Err(ParseError::Malformed)
        );
        assert_eq!(
            p.feed(format!("*{}", "9".repeat(40)).as_bytes(), &mut out),
            Err(ParseError::TooLong)
        );
        assert_eq!(
            p.feed(&vec![b'a'; MAX_INLINE + 1], &mut out),
            Err(ParseError::TooLong)
        );
        assert_eq!(p.buffered(), 0);
        // Huge declared lengths are stepped over, not buffered.
        let mut p = RedisParser::new();
        p.feed(b"*2\r\n$3\r\nSET\r\n$100000000\r\n", &mut out)
            .unwrap();
        p.feed(&[0; 10_000], &mut out).unwrap();
        assert_eq!(p.buffered(), 0);
        // AUTH with a truncated password waits; the secret is not in Debug.
        let mut p = RedisParser::new();
        p.feed(b"*2\r\n$4\r\nAUTH\r\n$7\r\nhunter2", &mut out)
            .unwrap();
        assert!(!format!("{p:?}").contains("hunter2"));
        assert!(out.is_empty());
    }
}
