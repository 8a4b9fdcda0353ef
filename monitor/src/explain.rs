//! `monitor probes --explain FILE`: where the uprobes would sit in one file, decoded as the
//! daemon decodes it at attach time, for users who want to check their build. With
//! `--floor`, empty programs at that probe set instead (for `cargo xtask bench overhead`).

use std::{os::unix::fs::FileExt, path::PathBuf};

use anyhow::{Context, Result, bail};
use monitor::probe::{
    ProbeSet,
    site::{self, Placement},
    target,
};

#[derive(clap::Args)]
pub struct ProbesArgs {
    /// A TLS library or program (libssl.so.3, libgnutls.so.30, node, a Go binary, ...).
    #[arg(long, value_name = "FILE")]
    explain: PathBuf,
    /// Attach empty programs to FILE instead, at the functions' entries (the probe set
    /// before sites were chosen) or at the chosen sites, until SIGINT/SIGTERM.
    #[arg(long, value_enum, hide = true)]
    floor: Option<FloorAt>,
    /// With `--floor`: which probes.
    #[arg(long, value_enum, default_value = "full", hide = true)]
    probes: ProbeSet,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum FloorAt {
    Entry,
    Sites,
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
    let Some(at) = args.floor else {
        let code = |off: u64| {
            let mut buf = vec![0; 16];
            let n = file.read_at(&mut buf, off).ok()?;
            buf.truncate(n);
            Some(buf)
        };
        print!("{}", site::explain(t.stack, &placed, code));
        return Ok(());
    };
    let wanted = |read_side: bool| args.probes == ProbeSet::Full || !read_side;
    let points: Vec<(u64, bool)> = match at {
        FloorAt::Entry => t
            .points
            .iter()
            .filter(|p| wanted(p.read_side))
            .map(|p| (p.offset, site::is_uretprobe(p.program)))
            .collect(),
        FloorAt::Sites => placed
            .iter()
            .filter(|p| wanted(p.point.read_side))
            .map(|p| (p.point.offset, p.placement == Placement::Uretprobe))
            .collect(),
    };
    let _floor = monitor::probe::attach_floor(path, &points)?;
    eprintln!("floor attached: {} probes", points.len());
    // SAFETY: plain signal-set calls on a local set; the signals are blocked, then waited for.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
    }
    Ok(())
}
