//! What an executable file offers to attach to: which TLS stack it implements (by the symbols it
//! defines, not by its name, so statically linked OpenSSL/BoringSSL and Node's bundled copy count
//! as much as `libssl.so`), and the file offset of each function to probe.

use std::{collections::HashMap, fs::File, path::Path};

use anyhow::Context;
use bumpalo::Bump;
use object::{Object, ObjectSection, ReadRef};
use serde::Serialize;

use super::elf::{self, Budget, InspectError, Reader};

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

/// Looks at the file's symbols with the default budget; `Ok(None)` for a file with no TLS
/// stack we probe.
pub fn inspect(path: &Path) -> Result<Option<Target>, InspectError> {
    let file = elf::open_regular(path, None)?;
    inspect_file(&file, path, Budget::DEFAULT)
}

/// As [`inspect`], for a file already open (`path` names it in logs), within `budget`.
pub fn inspect_file(
    file: &File,
    path: &Path,
    budget: Budget,
) -> Result<Option<Target>, InspectError> {
    let arena = Bump::new();
    let r = Reader::new(file, &arena, budget).map_err(InspectError::Read)?;
    inspect_with(&r, path).map_err(|e| r.explain(&e))
}

fn inspect_with(r: &Reader<'_>, path: &Path) -> anyhow::Result<Option<Target>> {
    if r.read_bytes_at(0, 4).ok() != Some(b"\x7fELF") {
        return Ok(None);
    }
    let obj = object::File::parse(r).context("parsing the ELF file")?;
    // The exported symbols first: libraries and Node export their TLS functions, and the full
    // table of a large program (Node's holds hundreds of thousands) is slow to walk.
    let prefixes = ["SSL_", "gnutls_record_"];
    let mut defined = defined_functions(&obj, ".dynsym", ".dynstr", &prefixes)?;
    if !has_stack(&defined) {
        defined.extend(defined_functions(&obj, ".symtab", ".strtab", &prefixes)?);
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
    // Go carries crypto/tls in the program itself, found by the Go symbol table (in the file
    // already open: the path may be gone with its process).
    let go = match super::golang::inspect_reader(r) {
        Ok(Some(go)) => go,
        Ok(None) => return Ok(None),
        // Out of budget: the caller says so (and counts it) like any other refusal.
        Err(e) if r.stopped() => return Err(e),
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
/// string table `strings`) whose names start with one of `prefixes`.
fn defined_functions<'d, R: ReadRef<'d>>(
    obj: &object::File<'d, R>,
    table: &str,
    strings: &str,
    prefixes: &[&str],
) -> anyhow::Result<HashMap<String, u64>> {
    let mut out = HashMap::new();
    if !obj.is_64() || !obj.is_little_endian() {
        return Ok(out);
    }
    let data = |name| -> anyhow::Result<&'d [u8]> {
        match obj.section_by_name(name) {
            Some(s) => s.data().with_context(|| format!("reading {name}")),
            None => Ok(&[]),
        }
    };
    let (syms, strs) = (data(table)?, data(strings)?);
    let wanted = |rest: &[u8]| prefixes.iter().any(|p| rest.starts_with(p.as_bytes()));
    for sym in elf::raw_symbols(syms, strs, wanted) {
        if !sym.is_defined_function() {
            continue;
        }
        let Ok(name) = std::str::from_utf8(sym.name) else {
            continue;
        };
        // Versioned names (`SSL_write@@OPENSSL_3.0.0`) in some tables.
        let name = name.split('@').next().unwrap_or(name);
        if out.contains_key(name) {
            continue;
        }
        if let Some(off) = file_offset(obj, sym.shndx as usize, sym.value) {
            out.insert(name.to_string(), off);
        }
    }
    Ok(out)
}

/// Where the code at `address` (in section `index`) is in the file: uprobes are placed by
/// file offset.
fn file_offset<'d, R: ReadRef<'d>>(
    obj: &object::File<'d, R>,
    index: usize,
    address: u64,
) -> Option<u64> {
    let section = obj.section_by_index(object::SectionIndex(index)).ok()?;
    let (offset, _) = section.file_range()?;
    address.checked_sub(section.address())?.checked_add(offset)
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

    /// A sparse file: `headers` at the start, `len` bytes long, nothing stored after.
    fn sparse(headers: &[u8], len: u64) -> tempfile::NamedTempFile {
        use std::io::Write;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(headers).unwrap();
        f.as_file().set_len(len).unwrap();
        f
    }

    #[test]
    fn hostile_fake_go_program_with_a_2gb_pclntab_is_refused_by_the_byte_budget() {
        let elf = elf::synthetic_elf(&[(".gopclntab", elf::SHT_PROGBITS, 4096, 2 << 30)]);
        let f = sparse(&elf, 4096 + (2 << 30));
        let t0 = std::time::Instant::now();
        let err = inspect(f.path()).unwrap_err();
        assert!(matches!(err, InspectError::ByteBudget(_)), "{err}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn hostile_sparse_8gb_elf_costs_its_budget_not_its_length() {
        let elf = elf::synthetic_elf(&[
            (".dynsym", elf::SHT_PROGBITS, 4096, (8 << 30) - 4096),
            (".dynstr", elf::SHT_PROGBITS, 4096, (8 << 30) - 4096),
        ]);
        let f = sparse(&elf, 8 << 30);
        let t0 = std::time::Instant::now();
        let err = inspect(f.path()).unwrap_err();
        assert_eq!(err.reason(), "byte_budget", "{err}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(1));
        // Within budget, a sparse table of zeros is read (and has no symbols): the budget,
        // not the file, bounds the cost.
        let elf = elf::synthetic_elf(&[(".symtab", elf::SHT_PROGBITS, 4096, 32 << 20)]);
        let f = sparse(&elf, 8 << 30);
        assert!(inspect(f.path()).unwrap().is_none());
    }

    #[test]
    fn hostile_sections_past_the_end_are_malformed_not_a_crash() {
        let elf = elf::synthetic_elf(&[(".dynsym", elf::SHT_PROGBITS, 1 << 40, 4096)]);
        let f = sparse(&elf, 8192);
        let err = inspect(f.path()).unwrap_err();
        assert_eq!(err.reason(), "malformed", "{err}");
        // Headers cut short.
        let f = sparse(&elf[..100], 100);
        assert!(inspect(f.path()).is_err());
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
