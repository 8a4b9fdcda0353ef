//! HPACK (RFC 7541) decoding for an observer: one decoder per connection and direction.
//!
//! Written here rather than taken from a crate so that every limit is ours: the dynamic table
//! never exceeds what SETTINGS allowed and [`MAX_TABLE`], strings never exceed the header
//! block they come from, and bad input is an error value, never a panic.
//!
//! An observer may have missed part of the connection (it started mid-stream, a block was
//! lost). The dynamic table is FIFO, so the entries this decoder holds are then still exactly
//! the newest entries of the real table; a reference past them is *unknown* rather than an
//! error: the field is skipped and counted, the rest of the block still decodes.

mod huffman;

use std::collections::VecDeque;

use zeroize::Zeroizing;

use super::Header;

/// Hard cap on the dynamic table, whatever SETTINGS says: table-size attacks cannot grow memory.
pub const MAX_TABLE: usize = 64 * 1024;
/// SETTINGS_HEADER_TABLE_SIZE's initial value.
pub const DEFAULT_TABLE: usize = 4096;
/// RFC 7541 §4.1: each entry costs its name and value plus 32.
const ENTRY_OVERHEAD: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HpackError {
    /// The block ends inside a field.
    Truncated,
    /// An integer longer than any sane length or index.
    IntegerOverflow,
    /// Invalid Huffman code or padding.
    BadHuffman,
    /// Index 0, or past the table while the decoder has seen the whole connection.
    BadIndex,
    /// A dynamic table size update above what SETTINGS (or [`MAX_TABLE`]) allows.
    TableSizeTooLarge,
}

impl std::fmt::Display for HpackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HpackError::Truncated => "hpack: truncated field",
            HpackError::IntegerOverflow => "hpack: integer overflow",
            HpackError::BadHuffman => "hpack: bad huffman code",
            HpackError::BadIndex => "hpack: bad index",
            HpackError::TableSizeTooLarge => "hpack: table size update above the limit",
        })
    }
}

struct Entry {
    name: Box<str>,
    value: Zeroizing<Vec<u8>>,
}

impl Entry {
    fn size(&self) -> usize {
        self.name.len() + self.value.len() + ENTRY_OVERHEAD
    }
}

pub struct Decoder {
    /// Newest first: dynamic index 62 is `table[0]`.
    table: VecDeque<Entry>,
    size: usize,
    /// Current maximum, set by size updates.
    max_size: usize,
    /// What the peer's SETTINGS allowed, capped at [`MAX_TABLE`].
    limit: usize,
    /// Whether every block of the connection went through this decoder.
    complete: bool,
}

impl std::fmt::Debug for Decoder {
    // Table values are header values: credentials. Only sizes are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("entries", &self.table.len())
            .field("size", &self.size)
            .field("max_size", &self.max_size)
            .field("limit", &self.limit)
            .field("complete", &self.complete)
            .finish()
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// A decoder that has seen the connection from its start.
    pub fn new() -> Self {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max_size: DEFAULT_TABLE,
            // Until the peer's SETTINGS is seen (it may never be: one direction only), any
            // size up to the cap is believed.
            limit: MAX_TABLE,
            complete: true,
        }
    }

    /// Forgets the table after blocks were (or may have been) missed.
    pub fn desync(&mut self) {
        self.table.clear();
        self.size = 0;
        self.complete = false;
    }

    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Applies the peer's SETTINGS_HEADER_TABLE_SIZE.
    pub fn set_limit(&mut self, limit: u32) {
        self.limit = (limit as usize).min(MAX_TABLE);
        if self.max_size > self.limit {
            self.max_size = self.limit;
            self.evict(0);
        }
    }

    /// Bytes the table accounts for (RFC sizes, a bound on its memory).
    pub fn table_size(&self) -> usize {
        self.size
    }

    /// Decodes one complete header block. Fields that refer to unknown dynamic entries are
    /// skipped and counted in the returned number. On error the table may hold part of the
    /// block's insertions, so the caller should [`desync`](Self::desync).
    pub fn decode(&mut self, block: &[u8], out: &mut Vec<Header>) -> Result<u32, HpackError> {
        let mut unknown = 0;
        let mut pos = 0;
        while pos < block.len() {
            let b = block[pos];
            if b & 0x80 != 0 {
                // Indexed field.
                let idx = integer(block, &mut pos, 7)?;
                match self.get(idx)? {
                    Some((name, value)) => out.push(header(name, value)),
                    None => unknown += 1,
                }
            } else if b & 0xe0 == 0x20 {
                let size = integer(block, &mut pos, 5)?;
                if size > self.limit {
                    return Err(HpackError::TableSizeTooLarge);
                }
                self.max_size = size;
                self.evict(0);
            } else {
                // Literal: with incremental indexing (01), without (0000) or never indexed
                // (0001).
                let (prefix, index) = if b & 0x40 != 0 { (6, true) } else { (4, false) };
                let name_idx = integer(block, &mut pos, prefix)?;
                let name: Option<Box<str>> = if name_idx == 0 {
                    let raw = string(block, &mut pos)?;
                    Some(String::from_utf8_lossy(&raw).to_ascii_lowercase().into())
                } else {
                    self.get(name_idx)?.map(|(n, _)| n.into())
                };
                let value = string(block, &mut pos)?;
                match name {
                    Some(name) => {
                        out.push(header(&name, &value));
                        if index {
                            self.insert(Entry { name, value });
                        }
                    }
                    None => {
                        unknown += 1;
                        if index {
                            // The real table got an entry we cannot name: everything older
                            // is now at a different index, so the table is of no use.
                            self.desync();
                        }
                    }
                }
            }
        }
        Ok(unknown)
    }

    /// Looks an index up: `Ok(None)` when it is past what an incomplete decoder knows.
    fn get(&self, idx: usize) -> Result<Option<(&str, &[u8])>, HpackError> {
        if idx == 0 {
            return Err(HpackError::BadIndex);
        }
        if let Some(&(n, v)) = STATIC.get(idx - 1) {
            return Ok(Some((n, v.as_bytes())));
        }
        match self.table.get(idx - 1 - STATIC.len()) {
            Some(e) => Ok(Some((&e.name, &e.value))),
            None if self.complete => Err(HpackError::BadIndex),
            None => Ok(None),
        }
    }

    fn insert(&mut self, e: Entry) {
        let size = e.size();
        if size > self.max_size {
            // RFC 7541 §4.4: an entry larger than the table empties it.
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict(size);
        self.size += size;
        self.table.push_front(e);
    }

    /// Evicts oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max_size {
            match self.table.pop_back() {
                Some(e) => self.size -= e.size(),
                None => break,
            }
        }
    }
}

fn header(name: &str, value: &[u8]) -> Header {
    Header {
        name: name.to_string(),
        value: Zeroizing::new(value.to_vec()),
    }
}

/// RFC 7541 §5.1 integer with an N-bit prefix. Values past 2^28 are refused: no length or
/// index in a bounded block can be that large.
fn integer(buf: &[u8], pos: &mut usize, prefix: u8) -> Result<usize, HpackError> {
    let mask = (1u16 << prefix) as u8 - 1;
    let first = *buf.get(*pos).ok_or(HpackError::Truncated)? & mask;
    *pos += 1;
    if first < mask {
        return Ok(first as usize);
    }
    let mut value = mask as usize;
    for shift in (0..28).step_by(7) {
        let b = *buf.get(*pos).ok_or(HpackError::Truncated)?;
        *pos += 1;
        value += ((b & 0x7f) as usize) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(HpackError::IntegerOverflow)
}

/// RFC 7541 §5.2 string literal; its length is checked against the block before anything is
/// allocated.
fn string(buf: &[u8], pos: &mut usize) -> Result<Zeroizing<Vec<u8>>, HpackError> {
    let huffman = *buf.get(*pos).ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = integer(buf, pos, 7)?;
    let raw = buf
        .get(*pos..pos.saturating_add(len))
        .ok_or(HpackError::Truncated)?;
    *pos += len;
    if !huffman {
        return Ok(Zeroizing::new(raw.to_vec()));
    }
    // The shortest code is 5 bits: the output is at most 8/5 of the input.
    let mut out = Zeroizing::new(Vec::with_capacity(len * 8 / 5 + 1));
    huffman::decode(raw, &mut out).map_err(|_| HpackError::BadHuffman)?;
    Ok(out)
}

/// RFC 7541 Appendix A.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(d: &mut Decoder, block: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        assert_eq!(d.decode(block, &mut out), Ok(0));
        out.iter()
            .map(|h| {
                (
                    h.name.clone(),
                    String::from_utf8_lossy(&h.value).into_owned(),
                )
            })
            .collect()
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    /// RFC 7541 C.4: three requests with Huffman coding and a shared dynamic table.
    #[test]
    fn rfc_c4_requests_with_huffman() {
        let mut d = Decoder::new();
        let r1 = hex("828684418cf1e3c2e5f23a6ba0ab90f4ff");
        assert_eq!(
            fields(&mut d, &r1),
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ])
        );
        assert_eq!(d.table_size(), 57);
        let r2 = hex("828684be5886a8eb10649cbf");
        assert_eq!(
            fields(&mut d, &r2)[4],
            ("cache-control".into(), "no-cache".into())
        );
        assert_eq!(d.table_size(), 110);
        let r3 = hex("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf");
        let got = fields(&mut d, &r3);
        assert_eq!(got[2], (":path".into(), "/index.html".into()));
        assert_eq!(got[3], (":authority".into(), "www.example.com".into()));
        assert_eq!(got[4], ("custom-key".into(), "custom-value".into()));
        assert_eq!(d.table_size(), 164);
    }

    /// RFC 7541 C.5: responses with a 256-byte table, so entries are evicted.
    #[test]
    fn rfc_c5_eviction() {
        let mut d = Decoder::new();
        d.set_limit(256);
        // The encoder announces its size first (C.5 assumes the table already is 256).
        let mut b1 = vec![0x3f, 0xe1, 0x01];
        b1.extend(hex(
            "4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31333a323120474d546e1768747470733a2f2f7777772e6578616d706c652e636f6d",
        ));
        assert_eq!(fields(&mut d, &b1).len(), 4);
        assert_eq!(d.table_size(), 222);
        let b2 = hex("4803333037c1c0bf");
        assert_eq!(fields(&mut d, &b2)[0], (":status".into(), "307".into()));
        assert_eq!(d.table_size(), 222);
    }

    #[test]
    fn table_size_attacks_are_bounded() {
        let mut d = Decoder::new();
        // A size update past the cap is refused.
        let mut out = Vec::new();
        assert_eq!(
            d.decode(&[0x3f, 0xff, 0xff, 0xff, 0x7f], &mut out),
            Err(HpackError::TableSizeTooLarge)
        );
        // After SETTINGS said 100, an update to 4096 is refused too.
        d.set_limit(100);
        assert_eq!(
            d.decode(&[0x3f, 0xe1, 0x1f], &mut out),
            Err(HpackError::TableSizeTooLarge)
        );
        // Many insertions never grow the table past its maximum.
        let mut d = Decoder::new();
        let mut block = vec![0x3f, 0xe1, 0xff, 0x03]; // size update to 65535
        for i in 0..5000u32 {
            block.push(0x40);
            let name = format!("n{i}");
            block.push(name.len() as u8);
            block.extend(name.as_bytes());
            block.push(100);
            block.extend([b'v'; 100]);
        }
        out.clear();
        assert_eq!(d.decode(&block, &mut out), Ok(0));
        assert!(d.table_size() <= MAX_TABLE);
        assert!(d.table.len() <= MAX_TABLE / ENTRY_OVERHEAD);
    }

    #[test]
    fn malformed_blocks_are_errors() {
        let mut out = Vec::new();
        let cases: &[(&[u8], HpackError)] = &[
            (&[0x80], HpackError::BadIndex),
            (&[0xff], HpackError::Truncated),
            (
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
                HpackError::IntegerOverflow,
            ),
            (&[0xbe], HpackError::BadIndex), // dynamic index 62, empty table
            (&[0x40, 0x05, b'a'], HpackError::Truncated),
            (&[0x40, 0x01, b'a', 0x7f, 0xff, 0x7f], HpackError::Truncated),
            (&[0x40, 0x81, 0x00, 0x00], HpackError::BadHuffman),
        ];
        for (block, want) in cases {
            assert_eq!(
                Decoder::new().decode(block, &mut out),
                Err(*want),
                "{block:02x?}"
            );
        }
    }

    #[test]
    fn incomplete_decoder_skips_unknown_references() {
        let mut d = Decoder::new();
        d.desync();
        let mut out = Vec::new();
        // :method GET, dynamic 62 (unknown), literal with unknown name (indexed 63).
        assert_eq!(
            d.decode(&[0x82, 0xbe, 0x7f, 0x00, 0x01, b'x'], &mut out),
            Ok(2)
        );
        assert_eq!(out.len(), 1);
        assert!(!d.is_complete());
    }

    #[test]
    fn debug_shows_no_values() {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        let mut block = vec![0x40 | 23, 11];
        block.extend(b"Bearer s3cr");
        d.decode(&block, &mut out).unwrap();
        assert!(!format!("{d:?} {out:?}").contains("s3cr"));
    }

    pub(crate) fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }
}
