//! Reading a file that someone else controls. Any local user can map a file executable and so
//! have the daemon inspect it (mmap records are not cgroup-filtered), so a file is opened
//! without following into special files (a FIFO would block the open, a device has side
//! effects), is checked to be the very file that was mapped, is read with `pread` into
//! bounded buffers (never mapped: a file truncated under a mapping raises SIGBUS and kills
//! the daemon), and every byte read is counted against a per-file budget and every read
//! against a deadline (a sparse 8 GB file, a section header claiming 2 GB).

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    fs::{self, File, OpenOptions},
    io,
    ops::Range,
    os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt},
    path::Path,
    time::{Duration, Instant},
};

use bumpalo::Bump;
use object::ReadRef;

/// A file as `stat` names it: (st_dev, st_ino).
pub type FileId = (u64, u64);

/// What one file may cost to inspect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Bytes read from the file (and so held in memory) at most. The largest legitimate
    /// read is a Go program's `.gopclntab`: 10 to 30 MB for the largest programs in use
    /// (kubelet, Terraform providers).
    pub bytes: u64,
    /// Wall time from the open to the verdict.
    pub time: Duration,
}

impl Budget {
    pub const DEFAULT: Budget = Budget {
        bytes: 64 << 20,
        time: Duration::from_secs(2),
    };
}

/// Why a file was not (fully) inspected.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("cannot open: {0}")]
    Open(#[source] io::Error),
    #[error("not a regular file but a {0}")]
    NotRegular(&'static str),
    #[error("not the file that was mapped: another one is at its path now")]
    Replaced,
    #[error("needs more than its budget of {0} bytes")]
    ByteBudget(u64),
    #[error("takes longer than its budget of {0:?}")]
    TimeBudget(Duration),
    #[error("read failed (truncated while read?): {0}")]
    Read(#[source] io::Error),
    #[error("malformed: {0}")]
    Malformed(String),
}

impl InspectError {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            InspectError::Open(_) => "open",
            InspectError::NotRegular(_) => "not_regular",
            InspectError::Replaced => "replaced",
            InspectError::ByteBudget(_) => "byte_budget",
            InspectError::TimeBudget(_) => "time_budget",
            InspectError::Read(_) => "read_error",
            InspectError::Malformed(_) => "malformed",
        }
    }
}

fn file_kind(t: fs::FileType) -> &'static str {
    if t.is_fifo() {
        "FIFO"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_socket() {
        "socket"
    } else if t.is_dir() {
        "directory"
    } else {
        "special file"
    }
}

/// Opens `path` for reading if it is a regular file and, when `want` is given, the file with
/// that identity (a process's path may have been replaced since it mapped the file: the
/// probes go on the inode that was mapped, and a verdict must be about that one).
pub fn open_regular(path: &Path, want: Option<FileId>) -> Result<File, InspectError> {
    // A stat first, so a device is never opened at all (opening some has side effects).
    let meta = fs::metadata(path).map_err(InspectError::Open)?;
    if !meta.is_file() {
        return Err(InspectError::NotRegular(file_kind(meta.file_type())));
    }
    // The path may change between the stat and the open: O_NONBLOCK so that a FIFO put
    // there meanwhile cannot block the open, O_NOCTTY so a terminal cannot become ours.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(InspectError::Open)?;
    let meta = file.metadata().map_err(InspectError::Open)?;
    if !meta.is_file() {
        return Err(InspectError::NotRegular(file_kind(meta.file_type())));
    }
    if want.is_some_and(|w| w != (meta.dev(), meta.ino())) {
        return Err(InspectError::Replaced);
    }
    Ok(file)
}

/// Why the reader refused a read (kept to tell a budget hit from a malformed file, since the
/// ELF parser only sees that a read failed).
#[derive(Debug, Clone, Copy)]
enum Stop {
    Bytes,
    Time,
    Io(io::ErrorKind),
}

/// An [`object::ReadRef`] over an open file, reading with `pread` into an arena that lives
/// as long as the inspection. Repeated reads of the same range are served from memory (the
/// ELF parser reads section names again for each lookup).
pub struct Reader<'a> {
    file: &'a File,
    len: u64,
    arena: &'a Bump,
    budget: Budget,
    deadline: Instant,
    left: Cell<u64>,
    stop: Cell<Option<Stop>>,
    blocks: RefCell<HashMap<(u64, u64), &'a [u8]>>,
    strings: RefCell<HashMap<(u64, u8), &'a [u8]>>,
}

impl<'a> Reader<'a> {
    /// `arena` holds what is read; drop it after the inspection.
    pub fn new(file: &'a File, arena: &'a Bump, budget: Budget) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Reader {
            file,
            len,
            arena,
            budget,
            deadline: Instant::now() + budget.time,
            left: Cell::new(budget.bytes),
            stop: Cell::new(None),
            blocks: RefCell::new(HashMap::new()),
            strings: RefCell::new(HashMap::new()),
        })
    }

    /// Bytes read so far.
    pub fn used(&self) -> u64 {
        self.budget.bytes - self.left.get()
    }

    /// The error to report for a failed inspection: a budget hit or read error if one
    /// happened (the parser's own message would only say that a read failed), else `e`.
    pub fn explain(&self, e: &anyhow::Error) -> InspectError {
        match self.stop.get() {
            Some(Stop::Bytes) => InspectError::ByteBudget(self.budget.bytes),
            Some(Stop::Time) => InspectError::TimeBudget(self.budget.time),
            Some(Stop::Io(kind)) => InspectError::Read(io::Error::from(kind)),
            None => InspectError::Malformed(format!("{e:#}")),
        }
    }

    /// A read was refused (budget, deadline) or failed: the file is not malformed, or not
    /// known to be.
    pub fn stopped(&self) -> bool {
        self.stop.get().is_some()
    }

    /// Fails once the deadline has passed (for loops that do not read).
    pub fn check_time(&self) -> Result<(), InspectError> {
        if Instant::now() > self.deadline {
            self.stop.set(Some(Stop::Time));
            return Err(InspectError::TimeBudget(self.budget.time));
        }
        Ok(())
    }

    /// Charges `n` bytes to the budget.
    fn charge(&self, n: u64) -> Result<(), ()> {
        if self.check_time().is_err() {
            return Err(());
        }
        match self.left.get().checked_sub(n) {
            Some(left) => {
                self.left.set(left);
                Ok(())
            }
            None => {
                self.stop.set(Some(Stop::Bytes));
                Err(())
            }
        }
    }

    /// `n` zero bytes in the arena. Not `alloc_slice_fill_copy`: generic, it would be compiled
    /// into this crate as a byte loop (unoptimised in the debug builds the live tests run:
    /// half a second for Node's tables) where this is one memset.
    fn zeroed(&self, n: usize) -> Result<&'a mut [u8], ()> {
        let layout = std::alloc::Layout::array::<u8>(n).map_err(|_| ())?;
        let ptr = self.arena.alloc_layout(layout).as_ptr();
        // SAFETY: `alloc_layout` returns `n` bytes, writable, owned by the arena for 'a and
        // handed out only here; they are initialised (zeroed) before the slice is made.
        Ok(unsafe {
            ptr.write_bytes(0, n);
            std::slice::from_raw_parts_mut(ptr, n)
        })
    }

    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<(), ()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            self.stop.set(Some(Stop::Io(e.kind())));
        })
    }
}

impl<'a> ReadRef<'a> for &Reader<'a> {
    fn len(self) -> Result<u64, ()> {
        Ok(self.len)
    }

    fn read_bytes_at(self, offset: u64, size: u64) -> Result<&'a [u8], ()> {
        if size == 0 {
            return Ok(&[]);
        }
        if offset.checked_add(size).is_none_or(|end| end > self.len) {
            return Err(());
        }
        if let Some(b) = self.blocks.borrow().get(&(offset, size)) {
            return Ok(b);
        }
        // Charged before allocating: the size comes from the file.
        self.charge(size)?;
        let buf = self.zeroed(size as usize)?;
        self.pread(buf, offset)?;
        let buf: &'a [u8] = buf;
        self.blocks.borrow_mut().insert((offset, size), buf);
        Ok(buf)
    }

    fn read_bytes_at_until(self, range: Range<u64>, delimiter: u8) -> Result<&'a [u8], ()> {
        if range.start > range.end || range.end > self.len {
            return Err(());
        }
        if let Some(b) = self.strings.borrow().get(&(range.start, delimiter)) {
            return Ok(b);
        }
        // Names are short; like object's own reader, none longer than 4 KiB is looked for.
        let max = (range.end - range.start).min(4096) as usize;
        let mut bytes = Vec::new();
        let mut chunk = [0u8; 256];
        while bytes.len() < max {
            let want = (max - bytes.len()).min(chunk.len());
            self.charge(want as u64)?;
            let at = range.start + bytes.len() as u64;
            let n = self
                .file
                .read_at(&mut chunk[..want], at)
                .map_err(|e| self.stop.set(Some(Stop::Io(e.kind()))))?;
            if n == 0 {
                self.stop.set(Some(Stop::Io(io::ErrorKind::UnexpectedEof)));
                return Err(());
            }
            if let Some(end) = chunk[..n].iter().position(|&b| b == delimiter) {
                bytes.extend_from_slice(&chunk[..end]);
                let s: &'a [u8] = self.arena.alloc_slice_copy(&bytes);
                self.strings
                    .borrow_mut()
                    .insert((range.start, delimiter), s);
                return Ok(s);
            }
            bytes.extend_from_slice(&chunk[..n]);
        }
        Err(())
    }
}

/// One entry of a 64-bit little-endian ELF symbol table, as stored.
#[derive(Debug, Clone, Copy)]
pub struct RawSym<'d> {
    /// Up to the NUL; versioned names (`SSL_write@@OPENSSL_3.0.0`) keep their suffix.
    pub name: &'d [u8],
    /// `STT_*`.
    pub kind: u8,
    pub shndx: u16,
    pub value: u64,
    pub size: u64,
}

impl RawSym<'_> {
    /// A function defined in this file (not imported, not data).
    pub fn is_defined_function(&self) -> bool {
        const STT_FUNC: u8 = 2;
        const STT_GNU_IFUNC: u8 = 10;
        self.shndx != 0 && (self.kind == STT_FUNC || self.kind == STT_GNU_IFUNC) && self.value != 0
    }
}

/// The entries of the symbol table `syms` (raw `Elf64_Sym`) whose name, in the string table
/// `strs`, `wanted` accepts from its first bytes (so the full name is only cut out for those).
/// A plain loop over the raw entries: it runs while a new program waits to be attached, and a
/// generic symbol iterator is ten times slower (Node's dynamic table alone has 75,000 entries).
pub fn raw_symbols<'d>(
    syms: &'d [u8],
    strs: &'d [u8],
    wanted: impl Fn(&[u8]) -> bool,
) -> impl Iterator<Item = RawSym<'d>> {
    const SYM_SIZE: usize = 24;
    syms.chunks_exact(SYM_SIZE).filter_map(move |sym| {
        let name_off = u32::from_le_bytes(sym[0..4].try_into().unwrap()) as usize;
        let rest = strs.get(name_off..)?;
        if !wanted(rest) {
            return None;
        }
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        Some(RawSym {
            name: &rest[..end],
            kind: sym[4] & 0xf,
            shndx: u16::from_le_bytes(sym[6..8].try_into().unwrap()),
            value: u64::from_le_bytes(sym[8..16].try_into().unwrap()),
            size: u64::from_le_bytes(sym[16..24].try_into().unwrap()),
        })
    })
}

/// `SHT_PROGBITS`, for [`synthetic_elf`].
pub const SHT_PROGBITS: u32 = 1;

/// The headers of an x86-64 ELF file whose sections (name, type, file offset, size) are
/// given and whose contents are not: what a hostile file claims, for tests and fuzz seeds.
/// The headers take the first 4 KiB at most; sections may claim any extent (a sparse file
/// gives them one).
pub fn synthetic_elf(sections: &[(&str, u32, u64, u64)]) -> Vec<u8> {
    let mut names = vec![0u8];
    let mut name_at = Vec::new();
    for (name, ..) in sections.iter().chain([&(".shstrtab", 3, 0, 0)]) {
        name_at.push(names.len() as u32);
        names.extend_from_slice(name.as_bytes());
        names.push(0);
    }
    let shoff = (64 + names.len()).next_multiple_of(8);
    let shnum = sections.len() + 2;
    let mut out = Vec::with_capacity(shoff + shnum * 64);
    out.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    out.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    out.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&0x401000u64.to_le_bytes()); // entry
    out.extend_from_slice(&0u64.to_le_bytes()); // no program headers
    out.extend_from_slice(&(shoff as u64).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 0, 64, shnum as u16, (shnum - 1) as u16] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&names);
    out.resize(shoff, 0);
    let mut header = |name: u32, kind: u32, offset: u64, size: u64| {
        out.extend_from_slice(&name.to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes()); // flags
        out.extend_from_slice(&0u64.to_le_bytes()); // address
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&[0u8; 8]); // link, info
        out.extend_from_slice(&1u64.to_le_bytes()); // align
        out.extend_from_slice(&0u64.to_le_bytes()); // entsize
    };
    header(0, 0, 0, 0);
    for (i, &(_, kind, offset, size)) in sections.iter().enumerate() {
        header(name_at[i], kind, offset, size);
    }
    header(*name_at.last().unwrap(), 3, 64, names.len() as u64);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn reader_over<'a>(f: &'a File, arena: &'a Bump, bytes: u64) -> Reader<'a> {
        Reader::new(
            f,
            arena,
            Budget {
                bytes,
                time: Duration::from_secs(5),
            },
        )
        .unwrap()
    }

    #[test]
    fn elf_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // No writer: a plain open would block here for ever.
        let err = open_regular(&fifo, None).unwrap_err();
        assert!(matches!(err, InspectError::NotRegular("FIFO")), "{err}");
        let err = open_regular(Path::new("/dev/null"), None).unwrap_err();
        assert_eq!(err.reason(), "not_regular");
    }

    #[test]
    fn elf_a_file_replaced_at_its_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::write(&a, b"mapped").unwrap();
        fs::write(&b, b"other").unwrap();
        let m = fs::metadata(&a).unwrap();
        let id = (m.dev(), m.ino());
        assert!(open_regular(&a, Some(id)).is_ok());
        // Another file put at the mapped file's path (both exist at once: distinct inodes).
        fs::rename(&b, &a).unwrap();
        let err = open_regular(&a, Some(id)).unwrap_err();
        assert!(matches!(err, InspectError::Replaced), "{err}");
        assert_eq!(err.reason(), "replaced");
    }

    #[test]
    fn elf_reads_are_bounded_by_the_byte_budget_before_allocating() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[7u8; 4096]).unwrap();
        // Sparse: 8 GB long, nothing stored.
        f.set_len(8 << 30).unwrap();
        let arena = Bump::new();
        let r = reader_over(&f, &arena, 1 << 20);
        assert_eq!((&r).read_bytes_at(0, 16).unwrap(), &[7u8; 16]);
        // Same range again: from memory, not charged again.
        (&r).read_bytes_at(0, 16).unwrap();
        assert_eq!(r.used(), 16);
        assert!((&r).read_bytes_at(4096, 2 << 30).is_err());
        assert!(arena.allocated_bytes() < 1 << 20);
        let e = r.explain(&anyhow::anyhow!("parse failed"));
        assert!(matches!(e, InspectError::ByteBudget(_)), "{e}");
        // Past the end is an error, not a budget hit.
        let r = reader_over(&f, &arena, 1 << 20);
        assert!((&r).read_bytes_at(8 << 30, 1).is_err());
        assert!(matches!(
            r.explain(&anyhow::anyhow!("x")),
            InspectError::Malformed(_)
        ));
    }

    #[test]
    fn elf_a_file_truncated_while_read_is_a_read_error_not_a_crash() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[1u8; 65536]).unwrap();
        let arena = Bump::new();
        let file = File::open(f.path()).unwrap();
        let r = reader_over(&file, &arena, 1 << 20);
        (&r).read_bytes_at(0, 4096).unwrap();
        f.as_file().set_len(100).unwrap();
        assert!((&r).read_bytes_at(8192, 4096).is_err());
        let e = r.explain(&anyhow::anyhow!("x"));
        assert_eq!(e.reason(), "read_error", "{e}");
    }

    #[test]
    fn elf_the_time_budget_stops_reads() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        let arena = Bump::new();
        let r = Reader::new(
            &f,
            &arena,
            Budget {
                bytes: 1 << 20,
                time: Duration::ZERO,
            },
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(2));
        assert!((&r).read_bytes_at(0, 16).is_err());
        assert_eq!(r.explain(&anyhow::anyhow!("x")).reason(), "time_budget");
    }

    #[test]
    fn elf_strings_are_read_up_to_their_nul() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"\0abc\0def").unwrap();
        let arena = Bump::new();
        let r = reader_over(&f, &arena, 1 << 20);
        assert_eq!((&r).read_bytes_at_until(1..8, 0).unwrap(), b"abc");
        // No NUL before the end of the range.
        assert!((&r).read_bytes_at_until(5..8, 0).is_err());
    }
}
