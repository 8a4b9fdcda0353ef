//! Builds the kernel programs with whatever this machine offers.
//!
//! Preferred: the toolchain has `rust-src`, so `-Zbuild-std=core` builds `core` for
//! `bpfel-unknown-none`. Fallback: no `rust-src` (and rustup cannot fetch it) but the
//! `rust-docs` component is installed; its rustdoc HTML holds every `core` source file, which
//! we recover and compile into a private sysroot. Either way bpf-linker 0.13.0 is installed
//! linked to the toolchain's own libLLVM. Everything is cached outside the repository and
//! rebuilt only when the toolchain changes.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

pub const BPF_TARGET: &str = "bpfel-unknown-none";
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// How `core` reaches the BPF target.
#[derive(Debug, Clone)]
pub enum CoreSource {
    /// `rust-src` is installed: `-Zbuild-std=core`.
    BuildStd,
    /// A sysroot compiled from the rust-docs sources.
    Sysroot(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Toolchain {
    pub rustc: PathBuf,
    pub cargo: PathBuf,
    pub linker: PathBuf,
    pub core: CoreSource,
    /// `rustc -vV` release, part of the cache key.
    pub version: String,
}

/// Log lines go to stderr, or to `cargo:warning` when run from a build script.
fn say(msg: &str) {
    if env::var_os("OUT_DIR").is_some() {
        println!("cargo:warning={msg}");
    } else {
        eprintln!("{msg}");
    }
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("{what}: cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{what} failed ({status}): {cmd:?}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// Where the toolchain pieces are cached: `$MONITOR_TOOLCHAIN_DIR`, else `~/.cache/monitor-ebpf`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = env::var_os("MONITOR_TOOLCHAIN_DIR") {
        return PathBuf::from(d);
    }
    let base = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    base.join("monitor-ebpf")
}

/// A command for the host tools that does not inherit the outer cargo's build settings.
fn clean_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    for (k, _) in env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_") && k != "CARGO_HOME"
            || k.starts_with("RUSTC")
            || k == "RUSTFLAGS"
            || k == "RUSTDOCFLAGS"
            || k == "TARGET"
            || k == "HOST"
            || k == "OUT_DIR"
        {
            cmd.env_remove(k.as_ref());
        }
    }
    cmd
}

/// Makes sure bpf-linker and a way to build `core` exist; cheap when cached.
pub fn ensure_toolchain() -> Result<Toolchain> {
    let rustc = PathBuf::from(env::var_os("RUSTC").unwrap_or_else(|| "rustc".into()));
    let cargo = PathBuf::from(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    let vv = output(Command::new(&rustc).arg("-vV"))?;
    let version = vv
        .lines()
        .find_map(|l| l.strip_prefix("release: "))
        .context("rustc -vV has no release line")?
        .to_string();
    let sysroot = PathBuf::from(output(Command::new(&rustc).args(["--print", "sysroot"]))?);
    let cache = cache_dir().join(&version);
    fs::create_dir_all(&cache).with_context(|| format!("cannot create {}", cache.display()))?;

    let linker = ensure_bpf_linker(&cargo, &sysroot, &cache)?;
    let core = if sysroot
        .join("lib/rustlib/src/rust/library/core/src/lib.rs")
        .exists()
    {
        CoreSource::BuildStd
    } else {
        CoreSource::Sysroot(ensure_docs_sysroot(&rustc, &sysroot, &cache)?)
    };
    Ok(Toolchain {
        rustc,
        cargo,
        linker,
        core,
        version,
    })
}

fn ensure_bpf_linker(cargo: &Path, sysroot: &Path, cache: &Path) -> Result<PathBuf> {
    if let Some(p) = env::var_os("BPF_LINKER") {
        return Ok(PathBuf::from(p));
    }
    let root = cache.join("bpf-linker");
    let bin = root.join("bin/bpf-linker");
    if Command::new(&bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(bin);
    }
    // The toolchain ships libLLVM as `lib/libLLVM-<major>-rust-<version>.so`; linking
    // bpf-linker to it needs no system LLVM and matches rustc's bitcode exactly.
    let libdir = sysroot.join("lib");
    let so = fs::read_dir(&libdir)
        .with_context(|| format!("cannot list {}", libdir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find(|n| n.starts_with("libLLVM") && n.ends_with(".so"))
        .with_context(|| {
            format!(
                "no libLLVM*.so in {}: is this a rustup toolchain?",
                libdir.display()
            )
        })?;
    let lib = so
        .trim_start_matches("lib")
        .trim_end_matches(".so")
        .to_string();
    let major = regex::Regex::new(r"^LLVM-(\d+)")?
        .captures(&lib)
        .map(|c| c[1].to_string())
        .with_context(|| format!("cannot read the LLVM major version from {so}"))?;
    say(&format!(
        "installing bpf-linker {BPF_LINKER_VERSION} (llvm-{major}) into {}",
        root.display()
    ));
    let rustflags = format!(
        "-L native={d} -l dylib={lib} -C link-arg=-Wl,-rpath,{d}",
        d = libdir.display()
    );
    run(
        clean_command(cargo)
            .env("RUSTFLAGS", rustflags)
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
            ])
            .arg("--root")
            .arg(&root)
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{major},no-llvm-linking")),
        "cargo install bpf-linker",
    )?;
    Ok(bin)
}

/// Recovers `library/core` from rustdoc's `src/core/**.rs.html` and compiles it.
fn ensure_docs_sysroot(rustc: &Path, sysroot: &Path, cache: &Path) -> Result<PathBuf> {
    let out = cache.join("sysroot");
    let stamp = out.join(".complete");
    if stamp.exists() {
        return Ok(out);
    }
    let html = sysroot.join("share/doc/rust/html/src/core");
    if !html.is_dir() {
        bail!(
            "neither rust-src nor rust-docs is installed for {}: run `rustup component add rust-src` \
             (or rust-docs where rust-src cannot be fetched)",
            sysroot.display()
        );
    }
    say(&format!(
        "building core for {BPF_TARGET} from the rust-docs sources into {}",
        out.display()
    ));
    let src = cache.join("core-src");
    let _ = fs::remove_dir_all(&src);
    let _ = fs::remove_dir_all(&out);
    recover_sources(&html, &src)?;
    let lib = out.join(format!("lib/rustlib/{BPF_TARGET}/lib"));
    fs::create_dir_all(&lib)?;
    let core_rs = src.join("library/core/src/lib.rs");
    let missing_re = regex::Regex::new(r"couldn't read `([^`]*)`")?;
    // Files that core pulls in with include_str! for docs only are not in the HTML: stub them.
    for _ in 0..50 {
        let o = clean_command(rustc)
            .env("RUSTC_BOOTSTRAP", "1")
            .args([
                "--edition",
                "2024",
                "--crate-name",
                "core",
                "--crate-type",
                "lib",
            ])
            .args([
                "--target",
                BPF_TARGET,
                "-Copt-level=3",
                "-Cpanic=abort",
                "-Cdebuginfo=2",
            ])
            .arg("-Zforce-unstable-if-unmarked")
            .arg(&core_rs)
            .arg("--out-dir")
            .arg(&lib)
            .current_dir(&src)
            .output()?;
        if o.status.success() {
            return finish_sysroot(rustc, &out, &lib, &src, &stamp);
        }
        let err = String::from_utf8_lossy(&o.stderr);
        let missing: Vec<&str> = missing_re
            .captures_iter(&err)
            .map(|c| c.get(1).map_or("", |m| m.as_str()))
            .collect();
        if missing.is_empty() {
            bail!("building core for {BPF_TARGET} failed:\n{err}");
        }
        for f in missing {
            let p = src.join(f);
            fs::create_dir_all(p.parent().unwrap_or(&src))?;
            fs::write(&p, "")?;
        }
    }
    bail!("building core: too many missing include files")
}

fn finish_sysroot(
    rustc: &Path,
    out: &Path,
    lib: &Path,
    src: &Path,
    stamp: &Path,
) -> Result<PathBuf> {
    // rustc injects `extern crate compiler_builtins` into no_std crates; BPF needs none of it
    // (aya-ebpf defines memcpy and friends), so an empty marker crate is enough.
    let cb = src.join("compiler_builtins.rs");
    fs::write(
        &cb,
        "#![no_std]\n#![feature(compiler_builtins)]\n#![compiler_builtins]\n#![no_builtins]\n#![allow(internal_features)]\n",
    )?;
    run(
        clean_command(rustc)
            .env("RUSTC_BOOTSTRAP", "1")
            .args([
                "--edition",
                "2024",
                "--crate-name",
                "compiler_builtins",
                "--crate-type",
                "lib",
            ])
            .args(["--target", BPF_TARGET, "-Copt-level=3", "-Cpanic=abort"])
            .arg("--sysroot")
            .arg(out)
            .arg("-Zforce-unstable-if-unmarked")
            .arg(&cb)
            .arg("--out-dir")
            .arg(lib),
        "building compiler_builtins stub",
    )?;
    let _ = fs::remove_dir_all(src);
    fs::write(stamp, "")?;
    Ok(out.to_path_buf())
}

fn recover_sources(html_root: &Path, out: &Path) -> Result<()> {
    let desc = regex::Regex::new(r"Source of the Rust file `([^`]*)`")?;
    let code = regex::Regex::new(r#"(?s)<pre class="rust"><code>(.*)</code></pre>"#)?;
    let lineno = regex::Regex::new(r"<a href=#\d+ id=\d+ data-nosnippet>\d+</a>")?;
    let tag = regex::Regex::new(r"<[^>]*>")?;
    let mut stack = vec![html_root.to_path_buf()];
    let mut n = 0;
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if !p.to_string_lossy().ends_with(".rs.html") {
                continue;
            }
            let page = fs::read_to_string(&p)?;
            let (Some(rel), Some(body)) = (desc.captures(&page), code.captures(&page)) else {
                bail!("unexpected rustdoc page shape: {}", p.display());
            };
            let text = lineno.replace_all(&body[1], "");
            let text = unescape(&tag.replace_all(&text, ""));
            let dst = out.join(Path::new(&rel[1]));
            fs::create_dir_all(dst.parent().unwrap_or(out))?;
            fs::write(&dst, text)?;
            n += 1;
        }
    }
    if n < 100 {
        bail!("only {n} core source pages under {}", html_root.display());
    }
    Ok(())
}

/// HTML entity decoding for what rustdoc emits (named basics and numeric references).
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let Some(end) = rest.find(';').filter(|&e| e <= 10) else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let ent = &rest[1..end];
        let ch = match ent {
            "lt" => Some('<'),
            "gt" => Some('>'),
            "amp" => Some('&'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ if ent.starts_with("#x") || ent.starts_with("#X") => {
                u32::from_str_radix(&ent[2..], 16)
                    .ok()
                    .and_then(char::from_u32)
            }
            _ if ent.starts_with('#') => ent[1..].parse().ok().and_then(char::from_u32),
            _ => None,
        };
        match ch {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Builds `monitor-ebpf` (at `crate_dir`) and returns the path of the BPF object.
pub fn build_ebpf(tc: &Toolchain, crate_dir: &Path, target_dir: &Path) -> Result<PathBuf> {
    let mut flags = vec!["-Cdebuginfo=2".to_string(), "-Clink-arg=--btf".to_string()];
    let mut cmd = clean_command(&tc.cargo);
    cmd.env("RUSTC_BOOTSTRAP", "1")
        .env("RUSTC", &tc.rustc)
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &tc.linker)
        .args(["build", "--release", "--locked", "--target", BPF_TARGET])
        .arg("--manifest-path")
        .arg(crate_dir.join("Cargo.toml"));
    // A rebuilt sysroot must not mix with rlibs built against the old one.
    let target_dir = match &tc.core {
        CoreSource::BuildStd => {
            cmd.arg("-Zbuild-std=core");
            target_dir.join(format!("build-std-{}", tc.version))
        }
        CoreSource::Sysroot(s) => {
            flags.insert(0, format!("--sysroot={}", s.display()));
            let stamp = fs::metadata(s.join(".complete"))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            target_dir.join(format!("docs-{}-{stamp}", tc.version))
        }
    };
    cmd.env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"))
        .arg("--target-dir")
        .arg(&target_dir);
    run(&mut cmd, "building monitor-ebpf")?;
    let obj = target_dir.join(BPF_TARGET).join("release/monitor");
    if !obj.exists() {
        bail!("monitor-ebpf built but {} is missing", obj.display());
    }
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::unescape;

    #[test]
    fn unescapes_rustdoc_entities() {
        assert_eq!(
            unescape("a &lt;b&gt; &amp;&amp; &#39;c&#x27; &quot;"),
            "a <b> && 'c' \""
        );
        assert_eq!(unescape("x & y &unknown; &"), "x & y &unknown; &");
    }
}
