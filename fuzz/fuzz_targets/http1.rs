//! HTTP/1 parser, both roles, fed in fuzzer-chosen chunks: no panic, bounded buffer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use monitor::parse::http1::{Http1Parser, MAX_HEAD, Role};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    for role in [Role::Requests, Role::Responses] {
        let mut p = Http1Parser::new(role);
        let mut out = Vec::new();
        for chunk in rest.chunks(split as usize + 1) {
            let _ = p.feed(chunk, &mut out);
            assert!(p.buffered() <= MAX_HEAD + chunk.len());
            out.clear();
        }
    }
});
