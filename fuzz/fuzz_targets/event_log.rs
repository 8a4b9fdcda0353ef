//! Event log decoder (`monitor replay`'s input) and the ring buffer record decoder on
//! arbitrary bytes: no panic, every line answered, errors never quote the input, and every
//! event decoded is written back as a line that decodes again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use monitor::event::{Event, LogReader};

fuzz_target!(|data: &[u8]| {
    let mut last = 0;
    for item in LogReader::new(data) {
        let (line, ev) = item.expect("reading from memory cannot fail");
        assert!(line > last);
        last = line;
        match ev {
            Ok(ev) => {
                let again = serde_json::to_vec(&ev).expect("an event serialises");
                let back = Event::from_log_line(&again).expect("a written event reads back");
                assert_eq!(back.data, ev.data);
                assert_eq!((back.kind, back.conn, back.ts_ns), (ev.kind, ev.conn, ev.ts_ns));
            }
            Err(e) => {
                // Category and position only: no byte of the line.
                let text = e.to_string();
                assert!(text.is_ascii() && text.len() < 100, "{text}");
            }
        }
    }
    let _ = Event::decode(data);
});
