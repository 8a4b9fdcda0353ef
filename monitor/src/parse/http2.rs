//! HTTP/2 (RFC 9113) frames of one direction of one connection: the client preface, header
//! blocks (HEADERS or PUSH_PROMISE + CONTINUATION) decoded with a per-direction HPACK decoder,
//! SETTINGS for the table size, DATA and everything else stepped over without buffering.
//!
//! gRPC is HTTP/2: its metadata arrives as ordinary headers. A connection first seen mid-stream
//! (no preface) starts with an incomplete HPACK table: fields it cannot resolve are counted in
//! [`Http2Stats::fields_unknown`] and the rest of the request is still reported.

use zeroize::{Zeroize, Zeroizing};

use super::{
    Header, Message, Request,
    hpack::{self, HpackError},
};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Largest header block (all its frames together) decoded; larger ones are dropped and counted.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
const FRAME_HEADER: usize = 9;

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const PRIORITY: u8 = 2;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PUSH_PROMISE: u8 = 5;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const CONTINUATION: u8 = 9;

const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;
const ACK: u8 = 0x1;
const SETTINGS_HEADER_TABLE_SIZE: u16 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// The stream started like the client preface and then differed.
    BadPreface,
    /// A frame header no peer would send (wrong fixed length, stream id, padding): the byte
    /// stream is not at a frame boundary or not HTTP/2.
    BadFrame,
    /// A header block was interrupted by a frame other than its CONTINUATION.
    ContinuationExpected,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ParseError::BadPreface => "http/2: bad connection preface",
            ParseError::BadFrame => "http/2: invalid frame header",
            ParseError::ContinuationExpected => "http/2: header block interrupted",
        })
    }
}

/// What was decoded and what could not be: the "counted drops" of an observer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Http2Stats {
    pub frames: u64,
    pub header_blocks: u64,
    /// Fields referring to dynamic-table entries this decoder never saw.
    pub fields_unknown: u64,
    /// Header blocks not decoded: too large, or HPACK errors.
    pub blocks_lost: u64,
    pub hpack_errors: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Bytes of the preface matched so far.
    Preface(usize),
    FrameHeader,
    Payload(Frame),
    /// Payload bytes still to step over.
    Skip(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Frame {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

/// A header block being assembled from several frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Block {
    stream: u32,
    push: bool,
    /// Already too large: its remaining CONTINUATIONs are stepped over.
    lost: bool,
}

pub struct Http2Parser {
    state: State,
    buf: Vec<u8>,
    hpack: hpack::Decoder,
    block: Option<Block>,
    fragment: Zeroizing<Vec<u8>>,
    settings_table_size: Option<u32>,
    pub stats: Http2Stats,
}

impl std::fmt::Debug for Http2Parser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http2Parser")
            .field("state", &self.state)
            .field("buffered", &self.buf.len())
            .field("hpack", &self.hpack)
            .field("stats", &self.stats)
            .finish()
    }
}

/// How a stream that sniffs as HTTP/2 begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The client preface: the whole connection will be seen.
    Preface,
    /// A frame: the server side (it begins with SETTINGS) or a connection seen mid-stream.
    Frame,
}

/// Tells from the first bytes whether a stream is HTTP/2. `None`: not enough bytes yet.
pub fn sniff(data: &[u8]) -> Option<Result<Start, ()>> {
    let n = data.len().min(PREFACE.len());
    if data[..n] == PREFACE[..n] {
        return (n == PREFACE.len()).then_some(Ok(Start::Preface));
    }
    if data.len() < FRAME_HEADER {
        // Frames this side of 64 KiB begin with a zero byte.
        return (data.first() != Some(&0)).then_some(Err(()));
    }
    let f = frame_header(data);
    Some(if data[0] == 0 && f.kind <= CONTINUATION && plausible(&f) {
        Ok(Start::Frame)
    } else {
        Err(())
    })
}

fn frame_header(b: &[u8]) -> Frame {
    Frame {
        len: u32::from_be_bytes([0, b[0], b[1], b[2]]) as usize,
        kind: b[3],
        flags: b[4],
        stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
    }
}

/// Fixed lengths and stream-id rules of RFC 9113 §6: a frame that breaks them means we are not
/// at a frame boundary.
fn plausible(f: &Frame) -> bool {
    let on_stream = f.stream != 0;
    match f.kind {
        DATA | HEADERS | CONTINUATION | PUSH_PROMISE => on_stream,
        PRIORITY => on_stream && f.len == 5,
        RST_STREAM => on_stream && f.len == 4,
        SETTINGS => !on_stream && f.len.is_multiple_of(6) && (f.flags & ACK == 0 || f.len == 0),
        PING => !on_stream && f.len == 8,
        GOAWAY => !on_stream && f.len >= 8,
        WINDOW_UPDATE => f.len == 4,
        _ => true,
    }
}

impl Http2Parser {
    /// `preface`: whether the client preface comes first (the client side, from the start).
    pub fn new(preface: bool) -> Self {
        let mut hpack = hpack::Decoder::new();
        if !preface {
            // Without the preface we cannot know that the connection starts here.
            hpack.desync();
        }
        Http2Parser {
            state: if preface {
                State::Preface(0)
            } else {
                State::FrameHeader
            },
            buf: Vec::new(),
            hpack,
            block: None,
            fragment: Zeroizing::new(Vec::new()),
            settings_table_size: None,
            stats: Http2Stats::default(),
        }
    }

    /// Bytes buffered and not yet parsed.
    pub fn buffered(&self) -> usize {
        self.buf.len() + self.fragment.len()
    }

    /// Bytes the HPACK table accounts for.
    pub fn table_size(&self) -> usize {
        self.hpack.table_size()
    }

    /// SETTINGS_HEADER_TABLE_SIZE this side announced since the last call: it bounds the
    /// other direction's HPACK table.
    pub fn take_settings_table_size(&mut self) -> Option<u32> {
        self.settings_table_size.take()
    }

    /// Applies the other side's SETTINGS_HEADER_TABLE_SIZE to this direction's decoder.
    pub fn set_table_limit(&mut self, size: u32) {
        self.hpack.set_limit(size);
    }

    /// Forgets partial state after a gap: the next bytes are taken as a frame boundary and
    /// the HPACK table as incomplete.
    pub fn reset(&mut self) {
        self.buf.zeroize();
        self.buf.clear();
        self.fragment.clear();
        self.block = None;
        self.state = State::FrameHeader;
        self.hpack.desync();
    }

    /// Feeds bytes in stream order; decoded requests and responses are pushed to `out`. After
    /// an error the parser is reset.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<Message>) -> Result<(), ParseError> {
        // Step over DATA without copying it.
        let mut data = data;
        if let State::Skip(left) = self.state {
            let k = left.min(data.len());
            data = &data[k..];
            self.state = if left > k {
                State::Skip(left - k)
            } else {
                State::FrameHeader
            };
            if data.is_empty() {
                return Ok(());
            }
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
            let avail = self.buf.len() - *pos;
            match self.state {
                State::Preface(seen) => {
                    let n = (PREFACE.len() - seen).min(avail);
                    if self.buf[*pos..*pos + n] != PREFACE[seen..seen + n] {
                        return Err(ParseError::BadPreface);
                    }
                    *pos += n;
                    if seen + n < PREFACE.len() {
                        self.state = State::Preface(seen + n);
                        return Ok(());
                    }
                    self.state = State::FrameHeader;
                }
                State::FrameHeader => {
                    if avail < FRAME_HEADER {
                        return Ok(());
                    }
                    let f = frame_header(&self.buf[*pos..]);
                    *pos += FRAME_HEADER;
                    self.stats.frames += 1;
                    self.state = self.on_frame_header(f)?;
                }
                State::Payload(f) => {
                    if avail < f.len {
                        return Ok(());
                    }
                    let start = *pos;
                    *pos += f.len;
                    self.state = State::FrameHeader;
                    self.on_payload(f, start, out)?;
                }
                State::Skip(left) => {
                    let k = left.min(avail);
                    *pos += k;
                    if k < left {
                        self.state = State::Skip(left - k);
                        return Ok(());
                    }
                    self.state = State::FrameHeader;
                }
            }
        }
    }

    /// Decides what to do with a frame's payload: buffer it whole (small control frames and
    /// header blocks) or step over it.
    fn on_frame_header(&mut self, f: Frame) -> Result<State, ParseError> {
        if !plausible(&f) {
            return Err(ParseError::BadFrame);
        }
        if let Some(b) = self.block
            && (f.kind != CONTINUATION || f.stream != b.stream)
        {
            self.block = None;
            self.fragment.clear();
            self.lost_block();
            return Err(ParseError::ContinuationExpected);
        }
        let header_block = matches!(f.kind, HEADERS | PUSH_PROMISE | CONTINUATION);
        if header_block && self.fragment.len() + f.len > MAX_HEADER_BLOCK {
            // Too large to decode: its table insertions are lost with it.
            self.fragment.clear();
            if self.block.is_none_or(|b| !b.lost) {
                self.lost_block();
            }
            self.block = (f.flags & END_HEADERS == 0).then_some(Block {
                stream: f.stream,
                push: f.kind == PUSH_PROMISE,
                lost: true,
            });
            return Ok(State::Skip(f.len));
        }
        if f.kind == CONTINUATION && self.block.is_none() {
            // The start of this block was before we looked (or was lost).
            if f.flags & END_HEADERS != 0 {
                self.lost_block();
            }
            return Ok(State::Skip(f.len));
        }
        if f.kind == CONTINUATION && self.block.is_some_and(|b| b.lost) {
            if f.flags & END_HEADERS != 0 {
                self.block = None;
            }
            return Ok(State::Skip(f.len));
        }
        Ok(match f.kind {
            HEADERS | PUSH_PROMISE | CONTINUATION | SETTINGS => State::Payload(f),
            _ => State::Skip(f.len),
        })
    }

    fn lost_block(&mut self) {
        self.stats.blocks_lost += 1;
        self.hpack.desync();
    }

    fn on_payload(
        &mut self,
        f: Frame,
        start: usize,
        out: &mut Vec<Message>,
    ) -> Result<(), ParseError> {
        let payload = &self.buf[start..start + f.len];
        match f.kind {
            SETTINGS => {
                if f.flags & ACK == 0 {
                    for s in payload.chunks_exact(6) {
                        if u16::from_be_bytes([s[0], s[1]]) == SETTINGS_HEADER_TABLE_SIZE {
                            self.settings_table_size =
                                Some(u32::from_be_bytes([s[2], s[3], s[4], s[5]]));
                        }
                    }
                }
                Ok(())
            }
            HEADERS | PUSH_PROMISE => {
                let mut p = payload;
                if f.flags & PADDED != 0 {
                    let pad = *p.first().ok_or(ParseError::BadFrame)? as usize;
                    if pad >= p.len() {
                        return Err(ParseError::BadFrame);
                    }
                    p = &p[1..p.len() - pad];
                }
                let skip = if f.kind == PUSH_PROMISE {
                    4
                } else if f.flags & PRIORITY_FLAG != 0 {
                    5
                } else {
                    0
                };
                let p = p.get(skip..).ok_or(ParseError::BadFrame)?;
                self.fragment.extend_from_slice(p);
                let block = Block {
                    stream: f.stream,
                    push: f.kind == PUSH_PROMISE,
                    lost: false,
                };
                if f.flags & END_HEADERS != 0 {
                    self.end_block(block, out);
                } else {
                    self.block = Some(block);
                }
                Ok(())
            }
            CONTINUATION => {
                self.fragment.extend_from_slice(payload);
                if f.flags & END_HEADERS != 0
                    && let Some(b) = self.block.take()
                {
                    self.end_block(b, out);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn end_block(&mut self, block: Block, out: &mut Vec<Message>) {
        let fragment = std::mem::take(&mut self.fragment);
        let mut fields = Vec::new();
        match self.hpack.decode(&fragment, &mut fields) {
            Ok(unknown) => {
                self.stats.header_blocks += 1;
                self.stats.fields_unknown += unknown as u64;
            }
            Err(
                HpackError::BadIndex
                | HpackError::Truncated
                | HpackError::IntegerOverflow
                | HpackError::BadHuffman
                | HpackError::TableSizeTooLarge,
            ) => {
                self.stats.hpack_errors += 1;
                self.lost_block();
                return;
            }
        }
        drop(fragment);
        if !block.push
            && let Some(m) = message(fields)
        {
            out.push(m);
        }
    }
}

/// A request (it has `:method`), a response (`:status`), or trailers (neither: nothing).
fn message(fields: Vec<Header>) -> Option<Message> {
    let mut method = None;
    let mut path = String::new();
    let mut host = None;
    let mut status = None;
    let mut headers = Vec::with_capacity(fields.len());
    for h in fields {
        let text = || String::from_utf8_lossy(&h.value).into_owned();
        match h.name.as_str() {
            ":method" => method = Some(text()),
            ":path" => path = text(),
            ":authority" => host = Some(text()),
            ":status" => {
                status = std::str::from_utf8(&h.value)
                    .ok()
                    .and_then(|s| s.parse().ok())
            }
            n if n.starts_with(':') => {}
            _ => headers.push(h),
        }
    }
    if let Some(method) = method {
        if host.is_none() {
            host = headers
                .iter()
                .find(|h| h.name == "host")
                .map(|h| String::from_utf8_lossy(&h.value).into_owned());
        }
        return Some(Message::Request(Request {
            method,
            path,
            host,
            version: "HTTP/2",
            headers,
        }));
    }
    status.map(|status| Message::Response { status })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    /// A literal field without indexing, new name.
    pub(crate) fn lit(name: &str, value: &str) -> Vec<u8> {
        let mut b = vec![0x00, name.len() as u8];
        b.extend(name.as_bytes());
        b.push(value.len() as u8);
        b.extend(value.as_bytes());
        b
    }

    /// A literal with incremental indexing and an indexed name.
    fn lit_indexed(name_idx: u8, value: &str) -> Vec<u8> {
        let mut b = vec![0x40 | name_idx, value.len() as u8];
        b.extend(value.as_bytes());
        b
    }

    fn requests(out: &[Message]) -> Vec<(String, String, Option<String>, usize)> {
        out.iter()
            .filter_map(|m| match m {
                Message::Request(r) => Some((
                    r.method.clone(),
                    r.path.clone(),
                    r.host.clone(),
                    r.headers.len(),
                )),
                _ => None,
            })
            .collect()
    }

    fn client_stream() -> Vec<u8> {
        let mut s = PREFACE.to_vec();
        s.extend(frame(
            SETTINGS,
            0,
            0,
            &[0, 1, 0, 0, 0x10, 0, 0, 4, 0, 0, 0xff, 0xff],
        ));
        s.extend(frame(WINDOW_UPDATE, 0, 0, &[0, 0, 0, 10]));
        // GET https /api, :authority svc (indexed into the table), authorization indexed.
        let mut b = vec![0x82, 0x87];
        b.extend(lit_indexed(4, "/api"));
        b.extend(lit_indexed(1, "svc"));
        b.extend(lit_indexed(23, "Bearer tok"));
        s.extend(frame(HEADERS, END_HEADERS | 0x1, 1, &b));
        // Second request reuses the table: 62 = authorization, 63 = :authority, 64 = :path.
        let b = [0x83, 0x87, 0xc0, 0xbf, 0xbe];
        s.extend(frame(HEADERS, END_HEADERS, 3, &b));
        s.extend(frame(DATA, 0x1, 3, &[b'x'; 100]));
        s.extend(frame(PING, 0, 0, &[0; 8]));
        s
    }

    #[test]
    fn requests_with_table_reuse_in_any_chunking() {
        let s = client_stream();
        for chunk in [1, 7, 9, 24, 1000] {
            let mut p = Http2Parser::new(true);
            let mut out = Vec::new();
            for c in s.chunks(chunk) {
                p.feed(c, &mut out).unwrap();
            }
            let got = requests(&out);
            assert_eq!(got.len(), 2, "chunk {chunk}");
            assert_eq!(got[0], ("GET".into(), "/api".into(), Some("svc".into()), 1));
            assert_eq!(
                got[1],
                ("POST".into(), "/api".into(), Some("svc".into()), 1)
            );
            assert_eq!(p.take_settings_table_size(), Some(4096));
            assert_eq!(p.buffered(), 0);
            assert_eq!(p.stats.fields_unknown, 0);
        }
    }

    #[test]
    fn continuation_padding_priority_and_responses() {
        let mut b = vec![0x82, 0x84];
        b.extend(lit("x-api-key", "k"));
        let (a, rest) = b.split_at(3);
        let mut padded = vec![2u8];
        padded.extend([0, 0, 0, 0, 16]); // priority
        padded.extend(a);
        padded.extend([0, 0]);
        let mut s = PREFACE.to_vec();
        s.extend(frame(HEADERS, PADDED | PRIORITY_FLAG, 5, &padded));
        s.extend(frame(CONTINUATION, END_HEADERS, 5, rest));
        let mut p = Http2Parser::new(true);
        let mut out = Vec::new();
        p.feed(&s, &mut out).unwrap();
        assert_eq!(requests(&out), [("GET".into(), "/".into(), None, 1)]);

        let mut p = Http2Parser::new(false);
        let mut out = Vec::new();
        let mut s = frame(SETTINGS, 0, 0, &[]);
        s.extend(frame(HEADERS, END_HEADERS, 1, &[0x8d]));
        p.feed(&s, &mut out).unwrap();
        assert!(matches!(out[..], [Message::Response { status: 404 }]));
    }

    #[test]
    fn mid_stream_counts_what_it_cannot_decode() {
        let s = client_stream();
        // Start at the second HEADERS frame: dynamic entries 62..64 are unknown.
        let second = s.len() - (9 + 5) - (9 + 100) - (9 + 8);
        assert_eq!(sniff(&s[second..]), Some(Ok(Start::Frame)));
        let mut p = Http2Parser::new(false);
        let mut out = Vec::new();
        p.feed(&s[second..], &mut out).unwrap();
        assert_eq!(requests(&out), [("POST".into(), String::new(), None, 0)]);
        assert_eq!(p.stats.fields_unknown, 3);
    }

    #[test]
    fn sniffing() {
        assert_eq!(sniff(b"PRI * HT"), None);
        assert_eq!(sniff(PREFACE), Some(Ok(Start::Preface)));
        assert_eq!(
            sniff(&frame(SETTINGS, 0, 0, &[0; 6])),
            Some(Ok(Start::Frame))
        );
        assert_eq!(sniff(&[0, 0]), None);
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Some(Err(())));
        assert_eq!(sniff(&frame(PING, 0, 1, &[0; 8])), Some(Err(())));
        assert_eq!(sniff(b"PRI * HTTP/1.1\r\n\r\nxxxxxxxxxxx"), Some(Err(())));
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        let mut out = Vec::new();
        let mut p = Http2Parser::new(true);
        assert_eq!(
            p.feed(b"PRI * HTTP/1.1", &mut out),
            Err(ParseError::BadPreface)
        );
        let mut p = Http2Parser::new(false);
        assert_eq!(
            p.feed(&frame(PING, 0, 0, &[0; 7]), &mut out),
            Err(ParseError::BadFrame)
        );
        // Padding longer than the frame.
        assert_eq!(
            p.feed(
                &frame(HEADERS, PADDED | END_HEADERS, 1, &[9, 0x82]),
                &mut out
            ),
            Err(ParseError::BadFrame)
        );
        // PRIORITY flag on a frame too short for it.
        assert_eq!(
            p.feed(
                &frame(HEADERS, PRIORITY_FLAG | END_HEADERS, 1, &[0, 0]),
                &mut out
            ),
            Err(ParseError::BadFrame)
        );
        // A header block interrupted by DATA.
        let mut s = frame(HEADERS, 0, 1, &[0x82]);
        s.extend(frame(DATA, 0, 1, &[]));
        assert_eq!(p.feed(&s, &mut out), Err(ParseError::ContinuationExpected));
        // Truncated frames just wait.
        let f = frame(HEADERS, END_HEADERS, 1, &[0x82, 0x84]);
        assert_eq!(p.feed(&f[..10], &mut out), Ok(()));
        assert!(out.is_empty());
        // Bad Huffman and a bad index are counted, not fatal.
        let mut p = Http2Parser::new(true);
        let mut s = PREFACE.to_vec();
        s.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &[0x82, 0x40, 0x81, 0x00, 0x00],
        ));
        s.extend(frame(HEADERS, END_HEADERS, 3, &[0x80]));
        s.extend(frame(HEADERS, END_HEADERS, 5, &[0x82, 0x84]));
        p.feed(&s, &mut out).unwrap();
        assert_eq!(p.stats.hpack_errors, 2);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn oversized_header_blocks_are_dropped_and_memory_stays_bounded() {
        let mut p = Http2Parser::new(true);
        let mut out = Vec::new();
        p.feed(PREFACE, &mut out).unwrap();
        // A CONTINUATION flood on one stream.
        let value = "v".repeat(120);
        let mut lits = Vec::new();
        for _ in 0..100 {
            lits.extend(lit("x-secret", &value));
        }
        p.feed(&frame(HEADERS, 0, 1, &lits), &mut out).unwrap();
        for _ in 0..20 {
            p.feed(&frame(CONTINUATION, 0, 1, &lits), &mut out).unwrap();
            assert!(p.buffered() <= MAX_HEADER_BLOCK + FRAME_HEADER);
        }
        p.feed(&frame(CONTINUATION, END_HEADERS, 1, &lits), &mut out)
            .unwrap();
        assert_eq!(p.stats.blocks_lost, 1);
        // A single frame larger than the cap is stepped over.
        let big = vec![0u8; MAX_HEADER_BLOCK + 1];
        p.feed(&frame(HEADERS, END_HEADERS, 3, &big), &mut out)
            .unwrap();
        assert_eq!(p.stats.blocks_lost, 2);
        // The parser is still in step.
        p.feed(&frame(HEADERS, END_HEADERS, 5, &[0x82, 0x84]), &mut out)
            .unwrap();
        assert_eq!(out.len(), 1);
        assert!(p.buffered() == 0);
    }

    #[test]
    fn table_limit_from_the_other_side_is_enforced() {
        let mut p = Http2Parser::new(true);
        p.set_table_limit(0);
        let mut out = Vec::new();
        let mut s = PREFACE.to_vec();
        // Size update to 4096 after the peer said 0: the block is lost, counted.
        s.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &[0x3f, 0xe1, 0x1f, 0x82, 0x84],
        ));
        p.feed(&s, &mut out).unwrap();
        assert_eq!(p.stats.hpack_errors, 1);
        assert_eq!(p.table_size(), 0);
    }

    #[test]
    fn debug_has_no_secrets() {
        let mut p = Http2Parser::new(true);
        let mut out = Vec::new();
        let mut s = PREFACE.to_vec();
        let mut b = vec![0x82, 0x84];
        b.extend(lit_indexed(23, "Bearer hunter2"));
        s.extend(frame(HEADERS, 0, 1, &b));
        p.feed(&s, &mut out).unwrap();
        assert!(!format!("{p:?}").contains("hunter2"));
    }
}
