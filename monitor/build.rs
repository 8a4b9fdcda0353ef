//! Builds the kernel programs so that `cargo build` of the daemon is the only step a user runs.
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest.parent().expect("workspace root").to_path_buf();
    for p in [
        "monitor-ebpf/src",
        "monitor-ebpf/Cargo.toml",
        "monitor-ebpf/Cargo.lock",
        "monitor-common/src",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    for v in ["MONITOR_TOOLCHAIN_DIR", "BPF_LINKER", "MONITOR_EBPF_OBJ"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    let out = PathBuf::from(env::var("OUT_DIR")?).join("monitor.bpf.o");
    // Escape hatch for packagers who build the object elsewhere.
    let obj = match env::var_os("MONITOR_EBPF_OBJ") {
        Some(p) => PathBuf::from(p),
        None => {
            let tc = monitor_build::ensure_toolchain()?;
            let target =
                env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
            monitor_build::build_ebpf(&tc, &root.join("monitor-ebpf"), &target.join("ebpf"))?
        }
    };
    fs::copy(&obj, &out)?;
    Ok(())
}
