//! PostgreSQL frontend parser, fed in fuzzer-chosen chunks: no panic, bounded buffer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use monitor::parse::{Message, postgres::PostgresParser};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let mut p = PostgresParser::new();
    let mut out: Vec<Message> = Vec::new();
    for chunk in rest.chunks(split as usize + 1) {
        let _ = p.feed(chunk, &mut out);
        assert!(p.buffered() <= 10_000 + chunk.len());
        out.clear();
    }
});
