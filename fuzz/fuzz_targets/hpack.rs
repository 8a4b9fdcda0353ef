//! HPACK, stateful: one decoder fed a sequence of header blocks (each `[len: u16 BE][bytes]`),
//! so the dynamic table carries over from block to block. A second decoder gets every block
//! cut into fuzzer-chosen fragments, as frames and calls cut them, through `decode_partial`:
//! both must agree on every field, the table and the outcome. Bounds: the table never passes
//! its cap, the fields of one block never pass the header list limit, the undecoded rest of a
//! block never passes one field.
#![no_main]

use libfuzzer_sys::fuzz_target;
use monitor::parse::{
    Header,
    hpack::{Decoder, Fields, HpackError, MAX_FIELD, MAX_HEADER_LIST, MAX_TABLE},
};

fn pairs(h: &[Header]) -> Vec<(&str, &[u8])> {
    h.iter().map(|h| (h.name.as_str(), &h.value[..])).collect()
}

/// The block through `decode_partial`, `cut` bytes at a time, as the HTTP/2 parser does.
fn fragmented(d: &mut Decoder, block: &[u8], cut: usize) -> Result<(Vec<Header>, u32), HpackError> {
    let mut fields = Fields::default();
    let mut tail: Vec<u8> = Vec::new();
    for piece in block.chunks(cut) {
        tail.extend_from_slice(piece);
        let n = d.decode_partial(&tail, &mut fields)?;
        tail.drain(..n);
        assert!(tail.len() <= MAX_FIELD);
        assert!(fields.over_limit || fields.list_size <= MAX_HEADER_LIST);
    }
    if !tail.is_empty() {
        return Err(HpackError::Truncated);
    }
    if fields.over_limit {
        assert!(fields.headers.is_empty());
        return Err(HpackError::HeaderListTooLarge);
    }
    Ok((fields.headers, fields.unknown))
}

fuzz_target!(|data: &[u8]| {
    let Some((&config, mut rest)) = data.split_first() else {
        return;
    };
    let mut whole = Decoder::new();
    let mut parts = Decoder::new();
    if config & 1 == 1 {
        // Seen mid-stream: unknown references are skipped, not errors.
        whole.desync();
        parts.desync();
    }
    if config & 2 == 2 {
        let limit = u32::from(config) * 257;
        whole.set_limit(limit);
        parts.set_limit(limit);
    }
    let cut = usize::from(config >> 2) + 1;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let block = &rest[2..(2 + len).min(rest.len())];
        rest = &rest[2 + block.len()..];
        let mut out = Vec::new();
        let a = whole.decode(block, &mut out).map(|u| (out, u));
        let b = fragmented(&mut parts, block, cut);
        match (&a, &b) {
            (Ok((ha, ua)), Ok((hb, ub))) => {
                assert_eq!(pairs(ha), pairs(hb));
                assert_eq!(ua, ub);
            }
            (Err(ea), Err(eb)) => assert_eq!(ea, eb),
            _ => panic!("whole and fragmented decoding disagree: {a:?} vs {b:?}"),
        }
        assert_eq!(whole.table_size(), parts.table_size());
        assert!(whole.table_size() <= MAX_TABLE);
        match a {
            // The table is in step after these: the decoders go on with it.
            Ok(_) | Err(HpackError::HeaderListTooLarge) => {}
            Err(_) => {
                whole.desync();
                parts.desync();
            }
        }
    }
});
