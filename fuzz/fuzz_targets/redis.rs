//! Redis command parser, fed in fuzzer-chosen chunks: no panic, bounded buffer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use monitor::parse::redis::{MAX_INLINE, RedisParser};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let mut p = RedisParser::new();
    let mut out = Vec::new();
    for chunk in rest.chunks(split as usize + 1) {
        let _ = p.feed(chunk, &mut out);
        assert!(p.buffered() <= MAX_INLINE + chunk.len());
        out.clear();
    }
});
