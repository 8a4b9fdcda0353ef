//! HTTP/2 (RFC 9113) frames of one direction of one connection: the client preface, header
//! blocks (HEADERS or PUSH_PROMISE + CONTINUATION) decoded with a per-direction HPACK decoder,
//! SETTINGS for the table size, DATA and everything else stepped over.
//!
//! Nothing is buffered whole: payloads are handled as their bytes arrive. A header block is
//! decoded frame by frame, so only a field cut by a frame boundary waits (at most
//! [`hpack::MAX_FIELD`] bytes) and a block of any wire size is decoded; what it decodes to is
//! bounded by [`hpack::MAX_HEADER_LIST`]. A SETTINGS frame is read one 6-byte entry at a time.
//!
//! gRPC is HTTP/2: its metadata arrives as ordinary headers. A connection first seen mid-stream
//! (no preface) starts with an incomplete HPACK table: fields it cannot resolve are counted in
//! [`Http2Stats::fields_unknown`] and the rest of the request is still reported.

use zeroize::{Zeroize, Zeroizing};

use super::{Header, Message, Request, hpack};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
/// The most a parser holds between calls: a frame header, or the undecoded rest of a header
/// block (one field cut by a frame boundary). Decoded fields of an unfinished block are
/// counted apart, in [`Http2Parser::decoded_held`].
pub const MAX_BUFFERED: usize = hpack::MAX_FIELD;

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
const SETTING: usize = 6;

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

impl std::error::Error for ParseError {}

/// What was decoded and what could not be: the "counted drops" of an observer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Http2Stats {
    pub frames: u64,
    pub header_blocks: u64,
    /// Fields referring to dynamic-table entries this decoder never saw.
    pub fields_unknown: u64,
    /// Header blocks not reported: HPACK errors, fields too long, decoded lists too large.
    pub blocks_lost: u64,
    pub hpack_errors: u64,
    /// Of `blocks_lost`: blocks decoding to more than [`hpack::MAX_HEADER_LIST`]. Decoded
    /// nonetheless, so the table stays in step and later blocks still resolve.
    pub blocks_over_limit: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Bytes of the preface matched so far.
    Preface(usize),
    FrameHeader,
    /// A HEADERS or PUSH_PROMISE frame's pad length, priority or promised stream: `need`
    /// bytes before its header block fragment.
    Prefix {
        f: Frame,
        need: usize,
    },
    /// Header block bytes of the current frame still to come, then `pad` bytes of padding.
    Fragment {
        left: usize,
        end: bool,
        pad: usize,
    },
    /// SETTINGS payload bytes still to come.
    Settings(usize),
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
    /// Undecodable: its remaining bytes and CONTINUATIONs are stepped over.
    lost: bool,
}

pub struct Http2Parser {
    state: State,
    /// A frame header, payload prefix or SETTINGS entry cut by the end of a call.
    small: [u8; FRAME_HEADER],
    small_len: usize,
    hpack: hpack::Decoder,
    block: Option<Block>,
    /// Header block bytes not decoded yet: a field cut by a frame or call boundary.
    tail: Zeroizing<Vec<u8>>,
    /// The current block's fields decoded so far.
    fields: hpack::Fields,
    settings_table_size: Option<u32>,
    pub stats: Http2Stats,
}

impl std::fmt::Debug for Http2Parser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http2Parser")
            .field("state", &self.state)
            .field("buffered", &self.buffered())
            .field("hpack", &self.hpack)
            .field("fields", &self.fields.headers.len())
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
        SETTINGS => {
            !on_stream && f.len.is_multiple_of(SETTING) && (f.flags & ACK == 0 || f.len == 0)
        }
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
            small: [0; FRAME_HEADER],
            small_len: 0,
            hpack,
            block: None,
            tail: Zeroizing::new(Vec::new()),
            fields: hpack::Fields::default(),
            settings_table_size: None,
            stats: Http2Stats::default(),
        }
    }

    /// Bytes buffered and not yet parsed (at most [`MAX_BUFFERED`]).
    pub fn buffered(&self) -> usize {
        self.small_len + self.tail.len()
    }

    /// RFC 7541 size of the fields an unfinished header block holds decoded so far (at most
    /// [`hpack::MAX_HEADER_LIST`]).
    pub fn decoded_held(&self) -> usize {
        if self.fields.over_limit {
            0
        } else {
            self.fields.list_size
        }
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
        self.small.zeroize();
        self.small_len = 0;
        self.end_fragment();
        self.block = None;
        self.state = State::FrameHeader;
        self.hpack.desync();
    }

    /// Feeds bytes in stream order; decoded requests and responses are pushed to `out`. After
    /// an error the parser is reset.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<Message>) -> Result<(), ParseError> {
        let mut data = data;
        let r = self.process(&mut data, out);
        if r.is_err() {
            self.reset();
        }
        r
    }

    /// Moves bytes into `small` until it holds `need`; whether it does.
    fn fill(&mut self, data: &mut &[u8], need: usize) -> bool {
        let k = (need - self.small_len).min(data.len());
        self.small[self.small_len..self.small_len + k].copy_from_slice(&data[..k]);
        self.small_len += k;
        *data = &data[k..];
        self.small_len == need
    }

    fn process(&mut self, data: &mut &[u8], out: &mut Vec<Message>) -> Result<(), ParseError> {
        loop {
            match self.state {
                State::Preface(seen) => {
                    if data.is_empty() {
                        return Ok(());
                    }
                    let n = (PREFACE.len() - seen).min(data.len());
                    if data[..n] != PREFACE[seen..seen + n] {
                        return Err(ParseError::BadPreface);
                    }
                    *data = &data[n..];
                    self.state = if seen + n < PREFACE.len() {
                        State::Preface(seen + n)
                    } else {
                        State::FrameHeader
                    };
                }
                State::FrameHeader => {
                    if !self.fill(data, FRAME_HEADER) {
                        return Ok(());
                    }
                    let f = frame_header(&self.small);
                    self.small_len = 0;
                    self.stats.frames += 1;
                    self.state = self.on_frame_header(f)?;
                }
                State::Prefix { f, need } => {
                    if !self.fill(data, need) {
                        return Ok(());
                    }
                    let pad = if f.flags & PADDED != 0 {
                        self.small[0] as usize
                    } else {
                        0
                    };
                    self.small_len = 0;
                    // RFC 9113 §6.2: padding that leaves no room for the prefix is an error.
                    if need + pad > f.len {
                        return Err(ParseError::BadFrame);
                    }
                    self.start_block(f);
                    self.state = State::Fragment {
                        left: f.len - need - pad,
                        end: f.flags & END_HEADERS != 0,
                        pad,
                    };
                }
                State::Fragment { left, end, pad } => {
                    let k = left.min(data.len());
                    let (bytes, rest) = data.split_at(k);
                    *data = rest;
                    self.fragment(bytes);
                    if k < left {
                        self.state = State::Fragment {
                            left: left - k,
                            end,
                            pad,
                        };
                        return Ok(());
                    }
                    if end {
                        self.end_block(out);
                    }
                    self.state = State::Skip(pad);
                }
                State::Settings(left) => {
                    if left == 0 {
                        self.state = State::FrameHeader;
                        continue;
                    }
                    if !self.fill(data, SETTING) {
                        return Ok(());
                    }
                    let s = self.small;
                    self.small_len = 0;
                    if u16::from_be_bytes([s[0], s[1]]) == SETTINGS_HEADER_TABLE_SIZE {
                        self.settings_table_size =
                            Some(u32::from_be_bytes([s[2], s[3], s[4], s[5]]));
                    }
                    self.state = State::Settings(left - SETTING);
                }
                State::Skip(left) => {
                    if left == 0 {
                        self.state = State::FrameHeader;
                        continue;
                    }
                    if data.is_empty() {
                        return Ok(());
                    }
                    let k = left.min(data.len());
                    *data = &data[k..];
                    self.state = State::Skip(left - k);
                }
            }
        }
    }

    /// Decides what to do with a frame's payload: read it as it comes (header blocks,
    /// SETTINGS) or step over it.
    fn on_frame_header(&mut self, f: Frame) -> Result<State, ParseError> {
        if !plausible(&f) {
            return Err(ParseError::BadFrame);
        }
        if let Some(b) = self.block
            && (f.kind != CONTINUATION || f.stream != b.stream)
        {
            if !b.lost {
                self.lost_block();
            }
            self.end_fragment();
            self.block = None;
            return Err(ParseError::ContinuationExpected);
        }
        let end = f.flags & END_HEADERS != 0;
        Ok(match f.kind {
            HEADERS | PUSH_PROMISE => {
                let need = usize::from(f.flags & PADDED != 0)
                    + if f.kind == PUSH_PROMISE {
                        4
                    } else if f.flags & PRIORITY_FLAG != 0 {
                        5
                    } else {
                        0
                    };
                if need > f.len {
                    return Err(ParseError::BadFrame);
                }
                State::Prefix { f, need }
            }
            CONTINUATION => match self.block {
                None => {
                    // The start of this block was before we looked (or was lost).
                    if end {
                        self.lost_block();
                    }
                    State::Skip(f.len)
                }
                Some(_) => State::Fragment {
                    left: f.len,
                    end,
                    pad: 0,
                },
            },
            SETTINGS if f.flags & ACK == 0 => State::Settings(f.len),
            _ => State::Skip(f.len),
        })
    }

    fn start_block(&mut self, f: Frame) {
        self.end_fragment();
        self.block = Some(Block {
            stream: f.stream,
            push: f.kind == PUSH_PROMISE,
            lost: false,
        });
    }

    /// Decodes what the block's bytes so far complete; the rest waits in `tail`.
    fn fragment(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let Some(b) = self.block.filter(|b| !b.lost) else {
                return;
            };
            // No more than one field waits: `tail` never outgrows MAX_FIELD, whatever the
            // frame's size.
            let k = (MAX_BUFFERED - self.tail.len()).min(bytes.len());
            self.tail.extend_from_slice(&bytes[..k]);
            bytes = &bytes[k..];
            match self.hpack.decode_partial(&self.tail, &mut self.fields) {
                Ok(n) if n > 0 || self.tail.len() < MAX_BUFFERED => {
                    super::release_consumed(&mut self.tail, n)
                }
                // A full tail always holds a whole field: none decoded means garbage.
                Ok(_) | Err(_) => {
                    self.stats.hpack_errors += 1;
                    self.lost_block();
                    self.end_fragment();
                    self.block = Some(Block { lost: true, ..b });
                    return;
                }
            }
        }
    }

    /// Forgets the current block's bytes and fields, and the memory they took.
    fn end_fragment(&mut self) {
        // Zeroizing drops zero them.
        self.tail = Zeroizing::new(Vec::new());
        self.fields = hpack::Fields::default();
    }

    fn lost_block(&mut self) {
        self.stats.blocks_lost += 1;
        self.hpack.desync();
    }

    fn end_block(&mut self, out: &mut Vec<Message>) {
        let Some(block) = self.block.take() else {
            return;
        };
        if block.lost {
            return;
        }
        if !self.tail.is_empty() {
            // The block ends inside a field.
            self.stats.hpack_errors += 1;
            self.lost_block();
            self.end_fragment();
            return;
        }
        let fields = std::mem::take(&mut self.fields);
        self.end_fragment();
        self.stats.header_blocks += 1;
        self.stats.fields_unknown += fields.unknown as u64;
        if fields.over_limit {
            // Every field went through the decoder: the table is in step, no desync.
            self.stats.blocks_over_limit += 1;
            self.stats.blocks_lost += 1;
            return;
        }
        if !block.push
            && let Some(m) = message(fields.headers)
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
            ":path" => path = super::target_string(&h.value),
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

    /// RFC 7541 §5.1 integer: `first` holds the representation bits above the prefix.
    pub(crate) fn int(first: u8, prefix: u8, n: usize) -> Vec<u8> {
        let mask = (1usize << prefix) - 1;
        if n < mask {
            return vec![first | n as u8];
        }
        let mut b = vec![first | mask as u8];
        let mut n = n - mask;
        while n >= 128 {
            b.push((n % 128) as u8 | 0x80);
            n /= 128;
        }
        b.push(n as u8);
        b
    }

    /// A string literal, Huffman-coded or not.
    pub(crate) fn string(s: &[u8], huffman: bool) -> Vec<u8> {
        let coded = if huffman {
            hpack::huffman::encode(s)
        } else {
            s.to_vec()
        };
        let mut b = int(if huffman { 0x80 } else { 0 }, 7, coded.len());
        b.extend(coded);
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

    /// The credential of a request whose header block is `prefix` (on the wire) followed by an
    /// authorization field, sent as HEADERS + CONTINUATIONs of `frame_len`.
    fn big_block(prefix: &[u8], frame_len: usize) -> Vec<u8> {
        let mut block = vec![0x82, 0x84];
        block.extend(prefix);
        block.extend(lit("authorization", "Bearer late"));
        let mut s = PREFACE.to_vec();
        let chunks: Vec<&[u8]> = block.chunks(frame_len).collect();
        for (i, c) in chunks.iter().enumerate() {
            let kind = if i == 0 { HEADERS } else { CONTINUATION };
            let flags = if i + 1 == chunks.len() {
                END_HEADERS
            } else {
                0
            };
            s.extend(frame(kind, flags, 1, c));
        }
        s
    }

    fn authorization(out: &[Message]) -> Vec<Vec<u8>> {
        out.iter()
            .filter_map(|m| match m {
                Message::Request(r) => Some(r),
                _ => None,
            })
            .flat_map(|r| r.headers.iter())
            .filter(|h| h.name == "authorization")
            .map(|h| h.value.to_vec())
            .collect()
    }

    /// nginx accepts any wire size as long as the decoded fields fit its limit: 70 KiB of
    /// table size updates, or of Huffman-inflated values, before the credential.
    #[test]
    fn header_blocks_over_64k_on_the_wire_are_decoded_frame_by_frame() {
        let updates = vec![0x20u8; 70 * 1024];
        // Octet 0xfe takes 27 bits: 3.4 wire octets per decoded one.
        let mut inflated = Vec::new();
        for _ in 0..12 {
            inflated.extend([0x00, 0x01, b'x']);
            inflated.extend(string(&[0xfe; 2300], true));
        }
        for prefix in [updates, inflated] {
            let s = big_block(&prefix, 16 * 1024);
            assert!(s.len() > 64 * 1024);
            for chunk in [1000, 4096, 16 * 1024 + 9, s.len()] {
                let mut p = Http2Parser::new(true);
                let mut out = Vec::new();
                for c in s.chunks(chunk) {
                    p.feed(c, &mut out).unwrap();
                    assert!(p.buffered() <= MAX_BUFFERED);
                }
                assert_eq!(
                    authorization(&out),
                    [b"Bearer late".to_vec()],
                    "chunk {chunk}"
                );
                assert_eq!(p.stats.blocks_lost, 0);
                assert_eq!(p.buffered(), 0);
            }
        }
    }

    /// One field longer than what is ever buffered loses its block, counted, and the parser
    /// goes on with the next one.
    #[test]
    fn a_string_past_the_limit_loses_its_block_only() {
        let mut block = vec![0x82, 0x84, 0x00, 0x01, b'x'];
        block.extend(int(0, 7, hpack::MAX_STRING + 1));
        let mut s = PREFACE.to_vec();
        s.extend(frame(HEADERS, 0, 1, &block));
        s.extend(frame(CONTINUATION, END_HEADERS, 1, &[b'v'; 1000]));
        s.extend(frame(HEADERS, END_HEADERS, 3, &[0x82, 0x84]));
        let mut p = Http2Parser::new(true);
        let mut out = Vec::new();
        p.feed(&s, &mut out).unwrap();
        assert_eq!(p.stats.blocks_lost, 1);
        assert_eq!(p.stats.hpack_errors, 1);
        assert_eq!(requests(&out), [("GET".into(), "/".into(), None, 0)]);
    }

    /// The HPACK bomb: one large table entry referenced 65,535 times (~4 GiB decoded from
    /// ~190 KB). Decoding stops keeping fields at the list limit; the block is dropped and
    /// counted, the table stays in step, so the next block's reference still resolves.
    #[test]
    fn hpack_bomb_is_dropped_with_the_table_in_step() {
        let mut first = int(0x20, 5, 65_535);
        first.push(0x40);
        first.extend(string(&[b'n'; 30_000], false));
        first.extend(string(&[b'v'; hpack::MAX_STRING], false));
        let mut bomb = vec![0x82, 0x84];
        bomb.extend(std::iter::repeat_n(0xbe, 65_535));
        let mut s = PREFACE.to_vec();
        s.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &[&[0x82, 0x84][..], &first].concat(),
        ));
        for (i, c) in bomb.chunks(16 * 1024).enumerate() {
            let kind = if i == 0 { HEADERS } else { CONTINUATION };
            let flags = if (i + 1) * 16 * 1024 >= bomb.len() {
                END_HEADERS
            } else {
                0
            };
            s.extend(frame(kind, flags, 3, c));
        }
        let mut last = vec![0x82, 0x84, 0xbe];
        last.extend(lit("authorization", "Bearer after"));
        s.extend(frame(HEADERS, END_HEADERS, 5, &last));
        let mut p = Http2Parser::new(true);
        let mut out = Vec::new();
        let entry = 30_000 + hpack::MAX_STRING + 32;
        for c in s.chunks(4096) {
            p.feed(c, &mut out).unwrap();
            assert!(p.decoded_held() <= hpack::MAX_HEADER_LIST + entry);
        }
        assert_eq!(p.stats.blocks_over_limit, 1);
        assert_eq!(p.stats.blocks_lost, 1);
        assert_eq!(p.stats.hpack_errors, 0);
        let reqs: Vec<&Request> = out
            .iter()
            .filter_map(|m| match m {
                Message::Request(r) => Some(r),
                _ => None,
            })
            .collect();
        assert_eq!(reqs.len(), 2, "first and last; the bomb dropped");
        assert_eq!(reqs[1].headers.len(), 2);
        assert_eq!(reqs[1].headers[0].value.len(), hpack::MAX_STRING);
        assert_eq!(authorization(&out), [b"Bearer after".to_vec()]);
    }

    /// A SETTINGS frame of 16 MiB is read entry by entry, never buffered.
    #[test]
    fn huge_settings_frames_are_read_as_they_come() {
        let len = (1 << 24) - 4; // largest multiple of 6 a frame can carry
        let mut payload = vec![0u8; len];
        for e in payload.chunks_exact_mut(SETTING) {
            e[1] = 3; // MAX_CONCURRENT_STREAMS
        }
        payload[len - 6..].copy_from_slice(&[0, 1, 0, 0, 0x20, 0]);
        let mut s = PREFACE.to_vec();
        s.extend(frame(SETTINGS, 0, 0, &payload));
        s.extend(frame(HEADERS, END_HEADERS, 1, &[0x82, 0x84]));
        let mut p = Http2Parser::new(true);
        let mut out = Vec::new();
        for c in s.chunks(64 * 1024 + 1) {
            p.feed(c, &mut out).unwrap();
            assert!(p.buffered() < FRAME_HEADER);
        }
        assert_eq!(p.take_settings_table_size(), Some(8192));
        assert_eq!(requests(&out), [("GET".into(), "/".into(), None, 0)]);
    }

    /// Names that are not UTF-8 (nginx ignores them and keeps going) are sized by their raw
    /// octets: an entry sized after lossy conversion (3 octets per invalid one) would evict
    /// the credential's entry early and lose the next request's reference to it.
    #[test]
    fn invalid_names_are_sized_by_their_raw_octets() {
        let mut s = PREFACE.to_vec();
        // authorization (62 after the next insert: 63).
        let mut b = vec![0x82, 0x84];
        b.extend(lit_indexed(23, "Bearer kept"));
        // An entry of exactly the room left fills the table.
        let name = vec![0xffu8; hpack::DEFAULT_TABLE - (13 + 11 + 32) - (1 + 32)];
        b.push(0x40);
        b.extend(string(&name, false));
        b.extend(string(b"v", false));
        s.extend(frame(HEADERS, END_HEADERS, 1, &b));
        s.extend(frame(HEADERS, END_HEADERS, 3, &[0x82, 0x84, 0xbf]));
        let mut p = Http2Parser::new(true);
        let mut out = Vec::new();
        p.feed(&s, &mut out).unwrap();
        assert_eq!(p.table_size(), hpack::DEFAULT_TABLE);
        assert_eq!(
            authorization(&out),
            [b"Bearer kept".to_vec(), b"Bearer kept".to_vec()]
        );
        assert_eq!(p.stats.blocks_lost, 0);
    }

    /// A path that is not UTF-8 (nginx accepts it) reaches the rest of the monitor as an
    /// HTTP/1 target does: percent-encoded, so its first character is one octet and a query
    /// token in it decodes to the octets sent.
    #[test]
    fn paths_that_are_not_utf8_are_percent_encoded() {
        let mut b = vec![0x82, 0x04, 0x03, 0xff, b'/', b'x'];
        b.extend(lit("x-k", "v"));
        let mut s = PREFACE.to_vec();
        s.extend(frame(HEADERS, END_HEADERS, 1, &b));
        let mut p = Http2Parser::new(true);
        let mut out = Vec::new();
        p.feed(&s, &mut out).unwrap();
        assert_eq!(requests(&out), [("GET".into(), "%FF/x".into(), None, 1)]);
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
