//! The attacher's ELF and `.gopclntab` readers over arbitrary files: no panic, no read past
//! the byte budget (the reader refuses it before allocating), a verdict or a typed error.
#![no_main]

use std::{fs::File, os::unix::fs::FileExt, path::Path, sync::OnceLock, time::Duration};

use libfuzzer_sys::fuzz_target;
use monitor::probe::{elf::Budget, golang::parse_pclntab, target::inspect_file};

/// One file per fuzzing process, rewritten for each input: the readers take an open file.
fn file() -> &'static File {
    static FILE: OnceLock<File> = OnceLock::new();
    FILE.get_or_init(|| {
        let path = format!("/dev/shm/monitor-fuzz-elf-{}", std::process::id());
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("a file in /dev/shm");
        // Unlinked: the open descriptor is all the fuzzer needs.
        std::fs::remove_file(&path).unwrap();
        f
    })
}

const BUDGET: Budget = Budget {
    bytes: 1 << 20,
    time: Duration::from_secs(2),
};

fuzz_target!(|data: &[u8]| {
    // The pclntab on its own, as the section's contents, with and without a `.text`.
    let _ = parse_pclntab(data, None);
    let _ = parse_pclntab(data, Some((0x40_1000, 0x50_0000)));

    // The whole inspection, as the worker runs it.
    let f = file();
    f.set_len(0).unwrap();
    f.write_all_at(data, 0).unwrap();
    match inspect_file(f, Path::new("fuzz"), BUDGET) {
        Ok(Some(t)) => assert!(!t.points.is_empty()),
        Ok(None) => {}
        // Errors name the reason; their text never carries the file's bytes beyond
        // section names (which a file chooses, and which are no secret).
        Err(e) => assert!(!e.reason().is_empty()),
    }
});
