//! HTTP/2 framing and HPACK, with and without the preface, fed in fuzzer-chosen chunks: no
//! panic, bounded buffers, decoded fields and HPACK table.
#![no_main]

use libfuzzer_sys::fuzz_target;
use monitor::parse::{
    hpack::{MAX_HEADER_LIST, MAX_TABLE},
    http2::{Http2Parser, MAX_BUFFERED, PREFACE},
};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    for preface in [true, false] {
        let mut p = Http2Parser::new(preface);
        if split & 1 == 1 {
            p.set_table_limit(u32::from(split) * 64);
        }
        let mut out = Vec::new();
        if preface {
            p.feed(PREFACE, &mut out).unwrap();
        }
        for chunk in rest.chunks(split as usize + 1) {
            let _ = p.feed(chunk, &mut out);
            // Nothing is buffered whole, whatever the chunk.
            assert!(p.buffered() <= MAX_BUFFERED);
            assert!(p.decoded_held() <= MAX_HEADER_LIST);
            assert!(p.table_size() <= MAX_TABLE);
            out.clear();
        }
    }
});
