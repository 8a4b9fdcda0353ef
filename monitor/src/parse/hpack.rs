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

pub mod huffman;

use std::collections::VecDeque;

use zeroize::Zeroizing;

use super::Header;

/// Hard cap on the dynamic table, whatever SETTINGS says: table-size attacks cannot grow memory.
pub const MAX_TABLE: usize = 64 * 1024;
/// SETTINGS_HEADER_TABLE_SIZE's initial value.
pub const DEFAULT_TABLE: usize = 4096;
/// RFC 7541 §4.1: each entry costs its name and value plus 32.
const ENTRY_OVERHEAD: usize = 32;
/// What nginx accepts in one header block by default: `large_client_header_buffers 4 8k`
/// (the sum of name and value lengths, without overhead).
const NGINX_HEADER_LIMIT: usize = 4 * 8 * 1024;
/// Decoded size of one header block (RFC 7541 §4.1 sizes: name + value + 32 per field, as
/// SETTINGS_MAX_HEADER_LIST_SIZE counts) past which its fields are no longer kept. Large enough
/// for anything nginx accepts by default, even as one-octet fields: each field costs nginx at
/// least one octet of its limit, so at most `NGINX_HEADER_LIMIT` fields of 33 octets here.
pub const MAX_HEADER_LIST: usize = NGINX_HEADER_LIMIT * (1 + ENTRY_OVERHEAD);
/// Longest string literal (encoded octets) decoded; nginx refuses more than 8 KiB by default.
/// A block stays decodable frame by frame while its undecoded rest holds at most one field.
pub const MAX_STRING: usize = 32 * 1024;
/// The most a field can take on the wire: representation, two length prefixes, two strings.
pub const MAX_FIELD: usize = 2 * MAX_STRING + 16;

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
    /// A string literal longer than [`MAX_STRING`].
    StringTooLong,
    /// The block decodes to more than [`MAX_HEADER_LIST`]: its fields were dropped, the table
    /// is still in step.
    HeaderListTooLarge,
}

impl std::fmt::Display for HpackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HpackError::Truncated => "hpack: truncated field",
            HpackError::IntegerOverflow => "hpack: integer overflow",
            HpackError::BadHuffman => "hpack: bad huffman code",
            HpackError::BadIndex => "hpack: bad index",
            HpackError::TableSizeTooLarge => "hpack: table size update above the limit",
            HpackError::StringTooLong => "hpack: string literal too long",
            HpackError::HeaderListTooLarge => "hpack: header list too large",
        })
    }
}

impl std::error::Error for HpackError {}

/// A dynamic table entry: name and value in one allocation, both as the raw octets of the
/// wire, since RFC 7541 §4.1 sizes entries by them.
struct Entry {
    data: Zeroizing<Box<[u8]>>,
    name_len: usize,
}

impl Entry {
    fn new(name: &[u8], value: &[u8]) -> Self {
        let mut data = Vec::with_capacity(name.len() + value.len());
        data.extend_from_slice(name);
        data.extend_from_slice(value);
        Entry {
            data: Zeroizing::new(data.into_boxed_slice()),
            name_len: name.len(),
        }
    }

    fn size(&self) -> usize {
        self.data.len() + ENTRY_OVERHEAD
    }

    fn name(&self) -> &[u8] {
        &self.data[..self.name_len]
    }

    fn value(&self) -> &[u8] {
        &self.data[self.name_len..]
    }
}

/// The fields of one header block, decoded so far (a block may arrive in several frames).
#[derive(Debug, Default)]
pub struct Fields {
    pub headers: Vec<Header>,
    /// RFC 7541 §4.1 size of every field decoded, kept or not.
    pub list_size: usize,
    /// Past [`MAX_HEADER_LIST`]: no field is kept any more; the table is still maintained.
    pub over_limit: bool,
    /// Fields that refer to dynamic entries this decoder never saw.
    pub unknown: u32,
}

impl Fields {
    /// Counts a field against the block's limit; whether it may still be kept.
    fn admit(&mut self, name: usize, value: usize) -> bool {
        self.list_size = self.list_size.saturating_add(name + value + ENTRY_OVERHEAD);
        if !self.over_limit && self.list_size > MAX_HEADER_LIST {
            self.over_limit = true;
            // Zeroed as they drop: no half block is reported, and its memory goes now.
            self.headers = Vec::new();
        }
        !self.over_limit
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

/// A field's raw name and value.
type NameValue<'a> = (&'a [u8], &'a [u8]);

/// Where a string literal lies in the input, not yet decoded.
#[derive(Clone, Copy)]
struct Literal {
    huffman: bool,
    start: usize,
    end: usize,
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
    /// skipped and counted in the returned number. On [`HpackError::HeaderListTooLarge`] the
    /// table is in step; on any other error it may hold part of the block's insertions, so
    /// the caller should [`desync`](Self::desync).
    pub fn decode(&mut self, block: &[u8], out: &mut Vec<Header>) -> Result<u32, HpackError> {
        let mut fields = Fields::default();
        if self.decode_partial(block, &mut fields)? < block.len() {
            return Err(HpackError::Truncated);
        }
        if fields.over_limit {
            return Err(HpackError::HeaderListTooLarge);
        }
        out.append(&mut fields.headers);
        Ok(fields.unknown)
    }

    /// Decodes the complete fields at the start of `buf` (part of a header block), adding them
    /// to `fields`; returns how many bytes they took. The rest, a field cut by the end of a
    /// frame, is left for the caller to present again with the bytes that follow it: nothing
    /// of it has been applied. Errors are as for [`decode`](Self::decode).
    pub fn decode_partial(&mut self, buf: &[u8], fields: &mut Fields) -> Result<usize, HpackError> {
        let mut pos = 0;
        while pos < buf.len() {
            let mut at = pos;
            match self.field(buf, &mut at, fields) {
                Ok(()) => pos = at,
                Err(HpackError::Truncated) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(pos)
    }

    /// One field representation. Every length is checked against `buf` before anything is
    /// decoded or applied, so a `Truncated` field has changed nothing and costs no decoding.
    fn field(
        &mut self,
        buf: &[u8],
        pos: &mut usize,
        fields: &mut Fields,
    ) -> Result<(), HpackError> {
        let b = buf[*pos];
        if b & 0x80 != 0 {
            // Indexed field.
            let idx = integer(buf, pos, 7)?;
            match self.get(idx)? {
                Some((name, value)) => {
                    if fields.admit(name.len(), value.len()) {
                        fields.headers.push(header(name, value));
                    }
                }
                None => fields.unknown += 1,
            }
            return Ok(());
        }
        if b & 0xe0 == 0x20 {
            let size = integer(buf, pos, 5)?;
            if size > self.limit {
                return Err(HpackError::TableSizeTooLarge);
            }
            self.max_size = size;
            self.evict(0);
            return Ok(());
        }
        // Literal: with incremental indexing (01), without (0000) or never indexed (0001).
        let (prefix, index) = if b & 0x40 != 0 { (6, true) } else { (4, false) };
        let name_idx = integer(buf, pos, prefix)?;
        let name_lit = if name_idx == 0 {
            Some(literal(buf, pos)?)
        } else {
            None
        };
        let value_lit = literal(buf, pos)?;
        // The whole field is here: from now on it is applied.
        if !index && fields.over_limit {
            // Neither kept nor entered into the table: nothing of it needs decoding (an
            // over-limit block is dropped whole).
            return Ok(());
        }
        let name: Option<Zeroizing<Vec<u8>>> = match name_lit {
            Some(l) => Some(l.decode(buf)?),
            None => self.get(name_idx)?.map(|(n, _)| Zeroizing::new(n.to_vec())),
        };
        let Some(name) = name else {
            fields.unknown += 1;
            if index {
                // The real table got an entry we cannot name: everything older is now at a
                // different index, so the table is of no use.
                self.desync();
            }
            return Ok(());
        };
        let value = value_lit.decode(buf)?;
        if fields.admit(name.len(), value.len()) {
            fields.headers.push(header(&name, &value));
        }
        if index {
            self.insert(Entry::new(&name, &value));
        }
        Ok(())
    }

    /// Looks an index up (raw name, value): `Ok(None)` when it is past what an incomplete
    /// decoder knows.
    fn get(&self, idx: usize) -> Result<Option<NameValue<'_>>, HpackError> {
        if idx == 0 {
            return Err(HpackError::BadIndex);
        }
        if let Some(&(n, v)) = STATIC.get(idx - 1) {
            return Ok(Some((n.as_bytes(), v.as_bytes())));
        }
        match self.table.get(idx - 1 - STATIC.len()) {
            Some(e) => Ok(Some((e.name(), e.value()))),
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

/// A field as the rest of the monitor sees it: names lower-cased and, when not UTF-8, converted
/// lossily, as HTTP/1 header names are. Only the table keeps the raw octets.
fn header(name: &[u8], value: &[u8]) -> Header {
    Header::new(&String::from_utf8_lossy(name), value)
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

/// RFC 7541 §5.2 string literal: where it lies, once its length is known to be sane and all of
/// it present.
fn literal(buf: &[u8], pos: &mut usize) -> Result<Literal, HpackError> {
    let huffman = *buf.get(*pos).ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = integer(buf, pos, 7)?;
    if len > MAX_STRING {
        return Err(HpackError::StringTooLong);
    }
    let start = *pos;
    let end = start + len;
    if end > buf.len() {
        return Err(HpackError::Truncated);
    }
    *pos = end;
    Ok(Literal {
        huffman,
        start,
        end,
    })
}

impl Literal {
    fn decode(self, buf: &[u8]) -> Result<Zeroizing<Vec<u8>>, HpackError> {
        let raw = &buf[self.start..self.end];
        if !self.huffman {
            return Ok(Zeroizing::new(raw.to_vec()));
        }
        // The shortest code is 5 bits: the output is at most 8/5 of the input.
        let mut out = Zeroizing::new(Vec::with_capacity(raw.len() * 8 / 5 + 1));
        huffman::decode(raw, &mut out).map_err(|_| HpackError::BadHuffman)?;
        Ok(out)
    }
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

    /// Past the header list limit nothing more is kept, yet every insertion still happens:
    /// the next block's references resolve.
    #[test]
    fn header_list_limit_drops_fields_but_keeps_the_table() {
        let mut d = Decoder::new();
        // ":method: GET" costs 42: 30,000 of them are past the limit.
        let mut block = vec![0x82; 30_000];
        block.extend([0x40, 7]);
        block.extend(b"x-after");
        block.extend([1, b'1']);
        let mut out = Vec::new();
        assert_eq!(
            d.decode(&block, &mut out),
            Err(HpackError::HeaderListTooLarge)
        );
        assert!(out.is_empty());
        assert_eq!(d.table_size(), 7 + 1 + 32);
        assert_eq!(fields(&mut d, &[0xbe]), pairs(&[("x-after", "1")]));
        // A block just under the limit is kept whole.
        let n = (MAX_HEADER_LIST - 40) / 42;
        let mut block = vec![0x82; n];
        block.push(0xbe);
        assert_eq!(d.decode(&block, &mut out), Ok(0));
        assert_eq!(out.len(), n + 1);
    }

    /// Block fragments decode field by field: a field cut anywhere is left whole, unapplied.
    #[test]
    fn partial_blocks_leave_cut_fields_untouched() {
        let r1 = hex("828684418cf1e3c2e5f23a6ba0ab90f4ff");
        for cut in 0..r1.len() {
            let mut d = Decoder::new();
            let mut f = Fields::default();
            let n = d.decode_partial(&r1[..cut], &mut f).unwrap();
            assert!(n <= cut);
            let mut rest = r1[n..].to_vec();
            let m = d.decode_partial(&rest, &mut f).unwrap();
            assert_eq!(m, rest.len(), "cut {cut}");
            rest.clear();
            assert_eq!(f.headers.len(), 4);
            assert_eq!(d.table_size(), 57);
        }
        let mut f = Fields::default();
        assert_eq!(
            Decoder::new().decode_partial(&[0x00, 0x7f, 0xff, 0xff, 0x01], &mut f),
            Err(HpackError::StringTooLong)
        );
    }

    /// Names are stored and sized as their raw octets, only the reported name is converted.
    #[test]
    fn entries_are_sized_by_raw_octets() {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        d.decode(&[0x40, 2, 0xff, 0xfe, 1, b'v'], &mut out).unwrap();
        assert_eq!(d.table_size(), 2 + 1 + 32);
        assert_eq!(out[0].name, "\u{fffd}\u{fffd}");
        assert_eq!(d.table[0].name(), [0xff, 0xfe]);
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
