//! `monitor probes --explain FILE`: where the uprobes would sit in one file, decoded as the
//! daemon decodes it at attach time, for users who want to check their build.

use std::{os::unix::fs::FileExt, path::PathBuf};

use anyhow::{Context, Result, bail};
use monitor::probe::{site, target};

#[derive(clap::Args)]
pub struct ProbesArgs {
    /// A TLS library or program (libssl.so.3, libgnutls.so.30, node, a Go binary, ...).
    #[arg(long, value_name = "FILE")]
    explain: PathBuf,
}

pub fn probes(args: ProbesArgs) -> Result<()> {
    let path = &args.explain;
    let Some(t) =
        target::inspect(path).with_context(|| format!("inspecting {}", path.display()))?
    else {
        bail!("{}: no TLS stack the monitor probes", path.display());
    };
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let placed = site::plan_file(&file, &t);
    let code = |off: u64| {
        let mut buf = vec![0; 16];
        let n = file.read_at(&mut buf, off).ok()?;
        buf.truncate(n);
        Some(buf)
    };
    print!("{}", site::explain(t.stack, &placed, code));
    Ok(())
}
