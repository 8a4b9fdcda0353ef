//! Go programs: `crypto/tls` is compiled into each executable (no shared library to probe),
//! so every Go binary that uses it is inspected once: where `(*Conn).Write` and `(*Conn).Read`
//! start and where Read's RET instructions are, as file offsets for uprobes.
//!
//! Works on stripped binaries (`-ldflags='-s -w'`): without `.symtab` the functions are
//! found in `.gopclntab`, the table the Go runtime itself uses for stack traces.
//!
//! The kernel side reads the socket fd out of the `tls.Conn` (see
//! [`monitor_common::GoOffsets`]); the layouts behind those offsets, from the Go 1.19 sources:
//! - `crypto/tls/conn.go`: `type Conn struct { conn net.Conn; ... }`: the interface (itab,
//!   data) is the first field, so the `*net.TCPConn` is at +8;
//! - `net/tcpsock.go`, `net/net.go`: `TCPConn{conn}`, `conn{fd *netFD}`: the `*netFD` at +0;
//! - `net/fd_posix.go`: `netFD{pfd poll.FD; ...}`; `internal/poll/fd_unix.go`:
//!   `FD{fdmu fdMutex; Sysfd int; ...}` with `fdMutex{state uint64; rsema, wsema uint32}`
//!   (16 bytes): `Sysfd` at +16.

use std::path::Path;

use anyhow::{Context, Result, bail};
use bumpalo::Bump;
use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind, Register};
use object::{
    Architecture, Endianness, Object, ObjectSection, ObjectSegment, ReadRef, read::elf::ElfFile64,
};

use super::elf::{self, Budget, Reader};

const WRITE: &str = "crypto/tls.(*Conn).Write";
const READ: &str = "crypto/tls.(*Conn).Read";

/// Where to attach in one Go executable; offsets are file offsets (what uprobes take).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoTls {
    /// `go1.19.8` and the like, from `.go.buildinfo`.
    pub go_version: Option<String>,
    /// Entry of `crypto/tls.(*Conn).Write`.
    pub write: u64,
    /// Entry of `crypto/tls.(*Conn).Read`.
    pub read: u64,
    /// Every RET instruction of `crypto/tls.(*Conn).Read`.
    pub read_rets: Vec<u64>,
}

/// A function's virtual address range `[start, end)`.
type Range = (u64, u64);

/// Inspects one file with the default budget: `Ok(None)` when it is not a Go program or does
/// not contain `crypto/tls`; an error when it is one that cannot be probed (other
/// architecture, Go before the register ABI, a table that does not parse).
pub fn inspect(path: &Path) -> Result<Option<GoTls>> {
    let file = elf::open_regular(path, None)?;
    let arena = Bump::new();
    let r = Reader::new(&file, &arena, Budget::DEFAULT)?;
    inspect_reader(&r).map_err(|e| r.explain(&e).into())
}

/// As [`inspect`], through a bounded reader (headers it has already read are not read again).
pub fn inspect_reader<'d>(r: &Reader<'d>) -> Result<Option<GoTls>> {
    let Ok(kind) = object::FileKind::parse(r) else {
        return Ok(None);
    };
    if kind != object::FileKind::Elf64 {
        return Ok(None);
    }
    let elf = ElfFile64::<Endianness, _>::parse(r).context("parsing the ELF file")?;
    let is_go = [".go.buildinfo", ".gopclntab", ".note.go.buildid"]
        .iter()
        .any(|n| elf.section_by_name(n).is_some());
    if !is_go {
        return Ok(None);
    }
    let go_version = build_version(&elf);
    if elf.architecture() != Architecture::X86_64 {
        bail!(
            "Go program for {:?}: only x86-64 is supported",
            elf.architecture()
        );
    }
    if let Some(minor) = go_version.as_deref().and_then(go_minor)
        && minor < 17
    {
        bail!(
            "built with {}: Go before 1.17 has no register ABI",
            go_version.as_deref().unwrap_or_default()
        );
    }
    let found = match symtab_funcs(&elf)? {
        Some(f) => f,
        None => pclntab_funcs(&elf)?,
    };
    let (Some(write), Some(read)) = (found[0], found[1]) else {
        return Ok(None); // a Go program without crypto/tls (or with only one half of it)
    };
    require_register_abi(&code(&elf, write)?, write.0).context(WRITE)?;
    let read_code = code(&elf, read)?;
    require_register_abi(&read_code, read.0).context(READ)?;
    let rets = rets(&read_code, read.0);
    if rets.is_empty() {
        bail!("no RET instruction found in {READ}");
    }
    let off =
        |v| file_offset(&elf, v).with_context(|| format!("address {v:#x} is not in the file"));
    Ok(Some(GoTls {
        go_version,
        write: off(write.0)?,
        read: off(read.0)?,
        read_rets: rets.into_iter().map(off).collect::<Result<_>>()?,
    }))
}

/// `go1.N...` → N.
fn go_minor(v: &str) -> Option<u32> {
    let rest = v.strip_prefix("go1.")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The Go version from `.go.buildinfo`: inline since Go 1.18, through two pointers before.
fn build_version<'d, R: ReadRef<'d>>(elf: &ElfFile64<'d, Endianness, R>) -> Option<String> {
    let data = elf.section_by_name(".go.buildinfo")?.data().ok()?;
    if data.len() < 32 || &data[..14] != b"\xff Go buildinf:" {
        return None;
    }
    let (ptr_size, flags) = (data[14] as usize, data[15]);
    if flags & 2 != 0 {
        // Varint length, then the bytes.
        let (len, n) = uvarint(&data[32..])?;
        let start = 32 + n;
        let bytes = data.get(start..start.checked_add(len as usize)?)?;
        return Some(String::from_utf8_lossy(bytes).into_owned());
    }
    // Go 1.17 and older: a pointer to a Go string header (ptr, len).
    if ptr_size != 8 || flags & 1 != 0 {
        return None;
    }
    let hdr_addr = u64::from_le_bytes(data.get(16..24)?.try_into().ok()?);
    let hdr = read_vaddr(elf, hdr_addr, 16)?;
    let ptr = u64::from_le_bytes(hdr[..8].try_into().ok()?);
    let len = u64::from_le_bytes(hdr[8..16].try_into().ok()?);
    if len > 64 {
        return None;
    }
    let bytes = read_vaddr(elf, ptr, len)?;
    Some(String::from_utf8_lossy(bytes).into_owned())
}

fn uvarint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &x) in b.iter().enumerate().take(10) {
        v |= ((x & 0x7f) as u64) << (7 * i);
        if x & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

fn read_vaddr<'d, R: ReadRef<'d>>(
    elf: &ElfFile64<'d, Endianness, R>,
    addr: u64,
    len: u64,
) -> Option<&'d [u8]> {
    elf.segments()
        .find_map(|s| s.data_range(addr, len).ok().flatten())
}

/// Virtual address → file offset through the PT_LOAD segment that maps it from the file.
fn file_offset<'d, R: ReadRef<'d>>(elf: &ElfFile64<'d, Endianness, R>, addr: u64) -> Option<u64> {
    elf.segments().find_map(|s| {
        let (off, size) = s.file_range();
        let delta = addr.checked_sub(s.address())?;
        (delta < size).then(|| off.checked_add(delta)).flatten()
    })
}

/// Write and Read from `.symtab`, when the binary still has one (and it names them).
fn symtab_funcs<'d, R: ReadRef<'d>>(
    elf: &ElfFile64<'d, Endianness, R>,
) -> Result<Option<[Option<Range>; 2]>> {
    let (Some(syms), Some(strs)) = (
        elf.section_by_name(".symtab"),
        elf.section_by_name(".strtab"),
    ) else {
        return Ok(None);
    };
    let (syms, strs) = (
        syms.data().context("reading .symtab")?,
        strs.data().context("reading .strtab")?,
    );
    let mut out = [None, None];
    let wanted = |rest: &[u8]| rest.starts_with(b"crypto/tls.(*Conn).");
    for sym in elf::raw_symbols(syms, strs, wanted) {
        let slot = match sym.name {
            n if n == WRITE.as_bytes() => 0,
            n if n == READ.as_bytes() => 1,
            _ => continue,
        };
        if sym.size > 0 {
            let end = sym
                .value
                .checked_add(sym.size)
                .context("symbol past the address space")?;
            out[slot] = Some((sym.value, end));
        }
    }
    // A symbol table without both (sizes missing, renamed): ask the pclntab instead.
    Ok(out.iter().all(Option::is_some).then_some(out))
}

/// Write and Read from `.gopclntab`: its function table lists every function's entry (and,
/// sorted, the next one's), with names in the funcname table. Go 1.16 to 1.25 layouts.
fn pclntab_funcs<'d, R: ReadRef<'d>>(
    elf: &ElfFile64<'d, Endianness, R>,
) -> Result<[Option<Range>; 2]> {
    let sect = elf
        .section_by_name(".gopclntab")
        .or_else(|| elf.section_by_name(".data.rel.ro.gopclntab"))
        .context("no .gopclntab section")?;
    let tab = sect.data().context("reading .gopclntab")?;
    let text = elf
        .section_by_name(".text")
        .map(|s| (s.address(), s.address() + s.size()));
    parse_pclntab(tab, text)
}

/// Every offset and count in the table comes from the file: arithmetic on them is checked,
/// and names are compared in place (a table without NULs must not cost a scan per function).
pub fn parse_pclntab(tab: &[u8], text: Option<Range>) -> Result<[Option<Range>; 2]> {
    let at = |o: usize, n: usize| -> Result<&[u8]> {
        o.checked_add(n)
            .and_then(|end| tab.get(o..end))
            .context("pclntab truncated")
    };
    let u32_at = |o: usize| -> Result<u32> { Ok(u32::from_le_bytes(at(o, 4)?.try_into()?)) };
    let u64_at = |o: usize| -> Result<u64> { Ok(u64::from_le_bytes(at(o, 8)?.try_into()?)) };
    if tab.len() < 16 || tab[4] != 0 || tab[5] != 0 || tab[7] != 8 {
        bail!("not a 64-bit little-endian pclntab");
    }
    let word = |i: usize| u64_at(8 + i * 8);
    let magic = u32_at(0)?;
    // (Go 1.18+: 4-byte entries relative to textStart; Go 1.16/1.17: pointer-sized absolute.)
    let (nfunc, text_start, funcname, pcln, wide) = match magic {
        0xffff_fff0 | 0xffff_fff1 => {
            let hdr_text = word(2)?;
            // The header's textStart may be unrelocated (PIE): prefer `.text` then.
            let start = match text {
                Some((s, e)) if !(s..e).contains(&hdr_text) => s,
                _ => hdr_text,
            };
            (word(0)?, start, word(3)?, word(7)?, false)
        }
        0xffff_fffa => (word(0)?, 0, word(2)?, word(6)?, true),
        0xffff_fffb => bail!("Go 1.2-1.15 pclntab: no register ABI"),
        m => bail!("unknown pclntab magic {m:#x}"),
    };
    let funcname = usize::try_from(funcname).context("pclntab: funcname offset")?;
    let pcln = usize::try_from(pcln).context("pclntab: pcln offset")?;
    let field = if wide { 8 } else { 4 };
    let read_field = |o: usize| -> Result<u64> {
        if wide {
            u64_at(o)
        } else {
            Ok(u32_at(o)? as u64)
        }
    };
    let nfunc = usize::try_from(nfunc)?;
    if nfunc > tab.len() / (2 * field) {
        bail!("pclntab claims {nfunc} functions");
    }
    // NUL-terminated name at `start` equal to `want`.
    let is_name = |start: usize, want: &str| {
        let n = want.len();
        start
            .checked_add(n)
            .and_then(|end| tab.get(start..=end))
            .is_some_and(|b| &b[..n] == want.as_bytes() && b[n] == 0)
    };
    let mut out = [None, None];
    for i in 0..nfunc {
        // In range: `nfunc * 2 * field` is at most the table's length.
        let entry = |k: usize| {
            pcln.checked_add((i * 2 + k) * field)
                .context("pclntab truncated")
        };
        let funcoff = usize::try_from(read_field(entry(1)?)?).context("pclntab: func offset")?;
        // `_func` starts with its entry (offset or address), then `nameOff int32`.
        let name_at = pcln
            .checked_add(funcoff)
            .and_then(|o| o.checked_add(field))
            .context("pclntab: func offset")?;
        let name_off = u32_at(name_at)? as i32;
        let Some(name_start) = funcname.checked_add_signed(name_off as isize) else {
            continue;
        };
        let slot = if is_name(name_start, WRITE) {
            0
        } else if is_name(name_start, READ) {
            1
        } else {
            continue;
        };
        // The table is sorted and ends with the end of text: the next entry ends this one.
        let extent = |o: usize| -> Result<u64> {
            text_start
                .checked_add(read_field(o)?)
                .context("pclntab: address past the address space")
        };
        let start = extent(entry(0)?)?;
        let end = extent(entry(2)?)?;
        if end <= start {
            bail!("pclntab: {} has no extent", [WRITE, READ][slot]);
        }
        out[slot] = Some((start, end));
        if out.iter().all(Option::is_some) {
            break;
        }
    }
    Ok(out)
}

fn code<'d, R: ReadRef<'d>>(
    elf: &ElfFile64<'d, Endianness, R>,
    (start, end): Range,
) -> Result<Vec<u8>> {
    let bytes = elf
        .sections()
        .find_map(|s| s.data_range(start, end - start).ok().flatten())
        .with_context(|| format!("code at {start:#x}..{end:#x} is not in any section"))?;
    Ok(bytes.to_vec())
}

/// Addresses of the RET instructions in `code` (which starts at `addr`), decoded in order:
/// a 0xC3 byte inside another instruction (an immediate, a displacement) is not one.
fn rets(code: &[u8], addr: u64) -> Vec<u64> {
    let mut dec = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    let mut out = Vec::new();
    for ins in &mut dec {
        if ins.mnemonic() == Mnemonic::Ret {
            out.push(ins.ip());
        }
    }
    out
}

/// ABIInternal functions open with the stack check `CMP RSP, [R14+16]` (or, for large
/// frames, `LEA R12, [RSP-n]; CMP R12, [R14+16]`): g is in R14, which the kernel programs
/// depend on. Go 1.16 and older load g from thread-local storage instead.
fn require_register_abi(code: &[u8], addr: u64) -> Result<()> {
    let dec = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    let checks_g = dec.into_iter().take(2).any(|ins| {
        ins.mnemonic() == Mnemonic::Cmp
            && ins.memory_base() == Register::R14
            && (0..ins.op_count()).any(|i| ins.op_kind(i) == OpKind::Memory)
    });
    if checks_g {
        Ok(())
    } else {
        bail!("no register-ABI stack check (`CMP _, [R14+16]`) at {addr:#x}: Go before 1.17?")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{fs, path::PathBuf, process::Command};

    #[test]
    fn golang_go_minor_versions() {
        assert_eq!(go_minor("go1.19.8"), Some(19));
        assert_eq!(go_minor("go1.21rc2"), Some(21));
        assert_eq!(go_minor("devel +abc"), None);
        assert_eq!(uvarint(&[0x96, 0x01]), Some((150, 2)));
    }

    #[test]
    fn golang_rets_are_decoded_not_byte_scanned() {
        // mov eax, 0xc3c3c3c3; ret; nop; ret
        let code = [0xb8, 0xc3, 0xc3, 0xc3, 0xc3, 0xc3, 0x90, 0xc3];
        assert_eq!(rets(&code, 0x1000), vec![0x1005, 0x1007]);
    }

    #[test]
    fn golang_pclntab_offsets_near_the_end_of_the_address_space_are_errors() {
        // Found by the `elf` fuzz target: a pcln offset that overflows when the first entry's
        // fields are added to it.
        let mut tab = vec![0xf0, 0xff, 0xff, 0xff, 0, 0, 1, 8];
        let words = [1, 0, 0x40_1000, 0, 0, 0, 0, u64::MAX - 2];
        for w in words {
            tab.extend_from_slice(&w.to_le_bytes());
        }
        assert!(parse_pclntab(&tab, None).is_err());
        // The same table with the funcname offset at the end instead.
        tab[8 + 3 * 8..8 + 4 * 8].copy_from_slice(&u64::MAX.to_le_bytes());
        tab[8 + 7 * 8..].copy_from_slice(&8u64.to_le_bytes());
        let _ = parse_pclntab(&tab, Some((0x40_1000, 0x50_0000)));
    }

    #[test]
    fn golang_non_go_files_are_not_go() {
        assert_eq!(inspect(Path::new("/bin/sh")).unwrap(), None);
        assert_eq!(inspect(Path::new("/etc/hostname")).unwrap(), None);
    }

    /// Builds `testbed/go/<prog>` with Debian's Go into `dir`, with extra `go build` flags.
    fn build(dir: &Path, prog: &str, name: &str, flags: &[&str]) -> PathBuf {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testbed/go");
        let out = dir.join(format!("{prog}-{name}"));
        let mut cmd = Command::new("go");
        cmd.arg("build").arg("-o").arg(&out).args(flags);
        let st = cmd
            .arg(format!("./{prog}"))
            .current_dir(&src)
            .env("GOCACHE", dir.join("gocache"))
            .env("HOME", dir)
            .env("GOFLAGS", "-mod=mod")
            .env("CGO_ENABLED", "0")
            .env("GOTOOLCHAIN", "local")
            .status()
            .expect("go is not installed: `cargo xtask setup` installs golang-go");
        assert!(st.success(), "go build {prog} failed");
        out
    }

    #[test]
    fn golang_finds_the_same_points_with_and_without_symbols() {
        let dir = tempfile::tempdir().unwrap();
        for prog in ["client", "server"] {
            let full = build(dir.path(), prog, "full", &[]);
            let stripped = build(dir.path(), prog, "stripped", &["-ldflags=-s -w"]);
            let a = inspect(&full).unwrap().expect("Go TLS program");
            let b = inspect(&stripped)
                .unwrap()
                .expect("stripped Go TLS program");
            assert!(
                a.go_version
                    .as_deref()
                    .is_some_and(|v| v.starts_with("go1.")),
                "{a:?}"
            );
            assert_eq!(a.go_version, b.go_version);
            assert!(!a.read_rets.is_empty());
            assert!(a.read_rets.iter().all(|&r| r > a.read));

            // The symbol table and the pclntab agree on the unstripped file.
            let data = fs::read(&full).unwrap();
            let elf = ElfFile64::<Endianness, _>::parse(&*data).unwrap();
            let sym = symtab_funcs(&elf).unwrap().expect("symtab");
            let pcl = pclntab_funcs(&elf).unwrap();
            // Same entries; the pclntab's extent (up to the next function) also covers the
            // INT3 padding the symbol size leaves out, so the same RETs are found in both.
            for (s, p) in sym.iter().zip(&pcl) {
                let (s, p) = (s.unwrap(), p.unwrap());
                assert_eq!(s.0, p.0);
                assert!(s.1 <= p.1 && p.1 - s.1 < 64, "{s:x?} {p:x?}");
                let by_sym = rets(&code(&elf, s).unwrap(), s.0);
                assert_eq!(by_sym, rets(&code(&elf, p).unwrap(), p.0));
            }
            // Stripping only drops symbols: the code, and so every offset, is the same.
            assert_eq!(
                (a.write, a.read, &a.read_rets),
                (b.write, b.read, &b.read_rets)
            );
            // Each point is where the expected instruction is in the file.
            let at = |o: u64| &data[o as usize..];
            assert_eq!(
                &at(a.read)[..4],
                &[0x49, 0x3b, 0x66, 0x10],
                "cmp rsp,[r14+16]"
            );
            // Write's frame is large: `LEA R12, [RSP-n]; CMP R12, [R14+16]`.
            require_register_abi(&at(a.write)[..32], 0).unwrap();
            assert!(a.read_rets.iter().all(|&r| at(r)[0] == 0xc3));

            // Position-independent and stripped (how several distributions build Go): the
            // pclntab sits in `.data.rel.ro.gopclntab`, its textStart is relocated at load.
            let pie = build(
                dir.path(),
                prog,
                "pie",
                &["-buildmode=pie", "-ldflags=-s -w"],
            );
            let c = inspect(&pie).unwrap().expect("PIE Go TLS program");
            assert_eq!(c.read_rets.len(), a.read_rets.len());
            let data = fs::read(&pie).unwrap();
            let at = |o: u64| &data[o as usize..];
            require_register_abi(&at(c.write)[..32], 0).unwrap();
            require_register_abi(&at(c.read)[..32], 0).unwrap();
            assert!(c.read_rets.iter().all(|&r| at(r)[0] == 0xc3));
        }
    }

    #[test]
    fn golang_program_without_tls_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("go.mod"), "module x\n\ngo 1.19\n").unwrap();
        fs::write(
            src.join("main.go"),
            "package main\n\nfunc main() { println(1) }\n",
        )
        .unwrap();
        let out = dir.path().join("plain");
        let st = Command::new("go")
            .args(["build", "-o"])
            .arg(&out)
            .arg(".")
            .current_dir(&src)
            .env("GOCACHE", dir.path().join("gocache"))
            .env("HOME", dir.path())
            .env("CGO_ENABLED", "0")
            .env("GOTOOLCHAIN", "local")
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(inspect(&out).unwrap(), None);
    }
}
