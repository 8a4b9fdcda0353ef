//! What an executable file offers to attach to: which TLS stack it implements (by the symbols it
//! defines, not by its name, so statically linked OpenSSL/BoringSSL and Node's bundled copy count
//! as much as `libssl.so`), and the file offset of each function to probe.

use std::{collections::HashMap, fs::File, path::Path};

use anyhow::{Context, Result};
use object::{Object, ObjectSection};
use serde::Serialize;

/// A TLS implementation the probes understand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stack {
    /// OpenSSL, BoringSSL or LibreSSL: `SSL_write`/`SSL_read` (and `_ex`).
    Openssl,
    /// GnuTLS: `gnutls_record_send`/`gnutls_record_recv`.
    Gnutls,
    /// Go's `crypto/tls`.
    Go,
}

impl Stack {
    pub const ALL: [Stack; 3] = [Stack::Openssl, Stack::Gnutls, Stack::Go];

    pub fn name(self) -> &'static str {
        match self {
            Stack::Openssl => "openssl",
            Stack::Gnutls => "gnutls",
            Stack::Go => "go",
        }
    }
}

/// One probe to attach: program name and file offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Point {
    pub program: &'static str,
    pub symbol: &'static str,
    pub offset: u64,
    /// Only needed to see both sides (`--probes full`), not for the sending side.
    pub read_side: bool,
}

/// A file that implements a TLS stack, with where to probe it.
#[derive(Debug, Clone)]
pub struct Target {
    pub stack: Stack,
    pub points: Vec<Point>,
}

/// A stack is recognised when both of its `required` functions are defined in the file.
struct Recipe {
    stack: Stack,
    required: [&'static str; 2],
    /// (program, symbol, read side); symbols missing from the file are skipped (`_ex`
    /// arrived in OpenSSL 1.1.1).
    points: &'static [(&'static str, &'static str, bool)],
}

const RECIPES: &[Recipe] = &[
    Recipe {
        stack: Stack::Openssl,
        required: ["SSL_write", "SSL_read"],
        points: &[
            ("ssl_write", "SSL_write", false),
            ("ssl_write_ret", "SSL_write", false),
            ("ssl_write_ex", "SSL_write_ex", false),
            ("ssl_write_ret", "SSL_write_ex", false),
            ("ssl_read", "SSL_read", true),
            ("ssl_read_ret", "SSL_read", true),
            ("ssl_read_ex", "SSL_read_ex", true),
            ("ssl_read_ret", "SSL_read_ex", true),
        ],
    },
    Recipe {
        stack: Stack::Gnutls,
        required: ["gnutls_record_send", "gnutls_record_recv"],
        points: &[
            ("gnutls_send", "gnutls_record_send", false),
            ("ssl_write_ret", "gnutls_record_send", false),
            ("gnutls_recv", "gnutls_record_recv", true),
            ("ssl_read_ret", "gnutls_record_recv", true),
        ],
    },
];

/// Looks at the file's symbols; `Ok(None)` for a file with no TLS stack we probe.
pub fn inspect(path: &Path) -> Result<Option<Target>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    inspect_file(&file, path)
}

/// As [`inspect`], for a file already open (`path` names it in errors).
pub fn inspect_file(file: &File, path: &Path) -> Result<Option<Target>> {
    // SAFETY: read-only private mapping; a file truncated meanwhile would fault, which the
    // libraries in use (mapped executable by a process) are not.
    let map = unsafe { memmap2::Mmap::map(file) }
        .with_context(|| format!("mapping {}", path.display()))?;
    if map.get(..4) != Some(b"\x7fELF") {
        return Ok(None);
    }
    let obj = object::File::parse(&*map).with_context(|| format!("parsing {}", path.display()))?;
    // The exported symbols first: libraries and Node export their TLS functions, and the full
    // table of a large program (Node's holds hundreds of thousands) is slow to walk.
    let prefixes = ["SSL_", "gnutls_record_"];
    let mut defined = defined_functions(&obj, ".dynsym", ".dynstr", &prefixes);
    if !has_stack(&defined) {
        defined.extend(defined_functions(&obj, ".symtab", ".strtab", &prefixes));
    }
    for recipe in RECIPES {
        if !recipe.required.iter().all(|s| defined.contains_key(*s)) {
            continue;
        }
        let points = recipe
            .points
            .iter()
            .filter_map(|&(program, symbol, read_side)| {
                defined.get(symbol).map(|&offset| Point {
                    program,
                    symbol,
                    offset,
                    read_side,
                })
            })
            .collect();
        return Ok(Some(Target {
            stack: recipe.stack,
            points,
        }));
    }
    drop(map);
    // Go carries crypto/tls in the program itself, found by the Go symbol table (in the file
    // already open: the path may be gone with its process).
    let go = match super::golang::inspect_file(file) {
        Ok(Some(go)) => go,
        Ok(None) => return Ok(None),
        // A Go program we cannot probe (another architecture, Go before 1.17): said, not
        // retried (the verdict is kept per file).
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %format!("{e:#}"), "Go program not attached");
            return Ok(None);
        }
    };
    const READ: &str = "crypto/tls.(*Conn).Read";
    let mut points = vec![
        Point {
            program: "go_tls_write",
            symbol: "crypto/tls.(*Conn).Write",
            offset: go.write,
            read_side: false,
        },
        Point {
            program: "go_tls_read",
            symbol: READ,
            offset: go.read,
            read_side: true,
        },
    ];
    // Return probes at each RET: uretprobes would corrupt Go's movable stacks.
    points.extend(go.read_rets.iter().map(|&offset| Point {
        program: "go_tls_read_ret",
        symbol: READ,
        offset,
        read_side: true,
    }));
    Ok(Some(Target {
        stack: Stack::Go,
        points,
    }))
}

fn has_stack(defined: &HashMap<String, u64>) -> bool {
    RECIPES
        .iter()
        .any(|r| r.required.iter().all(|s| defined.contains_key(*s)))
}

/// File offsets of the functions defined (not imported) in the symbol table `table` (with its
/// string table `strings`) whose names start with one of `prefixes`. A plain loop over the
/// raw `Elf64_Sym` entries: it runs while a new program waits to be attached, and a generic
/// symbol iterator is ten times slower (Node's dynamic table alone has 75,000 entries).
fn defined_functions(
    obj: &object::File<'_>,
    table: &str,
    strings: &str,
    prefixes: &[&str],
) -> HashMap<String, u64> {
    const SYM_SIZE: usize = 24;
    const STT_FUNC: u8 = 2;
    const STT_GNU_IFUNC: u8 = 10;
    let mut out = HashMap::new();
    let data = |name| {
        obj.section_by_name(name)
            .and_then(|s| s.data().ok())
            .unwrap_or_default()
    };
    let (syms, strs) = (data(table), data(strings));
    if !obj.is_64() || !obj.is_little_endian() {
        return out;
    }
    for sym in syms.chunks_exact(SYM_SIZE) {
        let name_off = u32::from_le_bytes(sym[0..4].try_into().unwrap()) as usize;
        let kind = sym[4] & 0xf;
        let shndx = u16::from_le_bytes(sym[6..8].try_into().unwrap());
        let value = u64::from_le_bytes(sym[8..16].try_into().unwrap());
        if shndx == 0 || (kind != STT_FUNC && kind != STT_GNU_IFUNC) || value == 0 {
            continue; // undefined (imported) or not code
        }
        let Some(rest) = strs.get(name_off..) else {
            continue;
        };
        if !prefixes.iter().any(|p| rest.starts_with(p.as_bytes())) {
            continue;
        }
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        let Ok(name) = std::str::from_utf8(&rest[..end]) else {
            continue;
        };
        // Versioned names (`SSL_write@@OPENSSL_3.0.0`) in some tables.
        let name = name.split('@').next().unwrap_or(name);
        if out.contains_key(name) {
            continue;
        }
        if let Some(off) = file_offset(obj, shndx as usize, value) {
            out.insert(name.to_string(), off);
        }
    }
    out
}

/// Where the code at `address` (in section `index`) is in the file: uprobes are placed by
/// file offset.
fn file_offset(obj: &object::File<'_>, index: usize, address: u64) -> Option<u64> {
    let section = obj.section_by_index(object::SectionIndex(index)).ok()?;
    let (offset, _) = section.file_range()?;
    Some(address.checked_sub(section.address())? + offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_libssl_is_openssl_with_every_point() {
        let libs = super::super::libs::installed_tls_libraries();
        let lib = libs
            .iter()
            .find(|l| l.path.to_string_lossy().contains("libssl.so"))
            .expect("libssl installed");
        let t = inspect(&lib.path)
            .unwrap()
            .expect("libssl implements OpenSSL");
        assert_eq!(t.stack, Stack::Openssl);
        let syms: Vec<_> = t.points.iter().map(|p| p.symbol).collect();
        for s in ["SSL_write", "SSL_read", "SSL_write_ex", "SSL_read_ex"] {
            assert!(syms.contains(&s), "{s} missing: {syms:?}");
        }
        assert!(t.points.iter().all(|p| p.offset > 0));
    }

    #[test]
    fn a_program_that_imports_ssl_is_not_a_target() {
        // curl calls SSL_write through libssl: the symbol is undefined in curl itself.
        let curl = Path::new("/usr/bin/curl");
        assert!(curl.exists(), "install curl");
        assert!(inspect(curl).unwrap().is_none());
        assert!(inspect(Path::new("/etc/hostname")).unwrap().is_none());
    }

    #[test]
    fn node_is_openssl_by_its_bundled_symbols() {
        let node = Path::new("/usr/bin/node");
        assert!(node.exists(), "install nodejs");
        let t0 = std::time::Instant::now();
        let t = inspect(node).unwrap().expect("node bundles OpenSSL");
        eprintln!("inspect(node) took {:?}", t0.elapsed());
        assert_eq!(t.stack, Stack::Openssl);
    }
}
