//! Project tasks: `cargo xtask setup | build | run | test | bench | deploy-check`.

mod bench;
mod clickhouse;
mod demo;
mod deploy;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, set up and test the credential-reuse monitor")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what builds and tests need (Debian packages as root, the eBPF toolchain); idempotent.
    Setup {
        /// Skip Debian packages (toolchain only).
        #[arg(long)]
        no_packages: bool,
    },
    /// Build the daemon (and with it the kernel programs) in release mode.
    Build,
    /// Build and run `monitor run` with the given arguments (as root).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks (as root): ratios against baselines measured in the same run.
    #[command(subcommand)]
    Bench(bench::Bench),
    /// A local ClickHouse (chdb-core engine) for development and tests: up, down, status.
    #[command(subcommand)]
    Clickhouse(clickhouse::Clickhouse),
    /// A one-command demo (as root): workloads, legitimate calls, a replayed token, alerts.
    Demo,
    /// Lint, render and validate the Helm chart, plain manifests and systemd unit offline.
    DeployCheck(deploy::DeployCheck),
    /// Set up, then run every test, the live eBPF ones included (as root), then deploy-check.
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Debian packages the live tests drive: real servers and clients, network namespaces.
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("nginx", "nginx"),
    ("curl", "curl"),
    ("openssl", "openssl"),
    ("ip", "iproute2"),
    ("python3", "python3"),
    ("ldconfig", "libc-bin"),
    ("redis-server", "redis-server"),
    ("redis-cli", "redis-tools"),
    ("pg_ctlcluster", "postgresql"),
    ("psql", "postgresql-client"),
    ("runuser", "util-linux"),
    ("gnutls-cli", "gnutls-bin"),
    ("gcc", "gcc"),
    // libssl.a for the statically linked OpenSSL client.
    ("/usr/include/openssl/ssl.h", "libssl-dev"),
    ("node", "nodejs"),
    ("go", "golang-go"),
];

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|v| v.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

pub(crate) fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let st = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

fn install_packages() -> Result<()> {
    let missing: Vec<&str> = TEST_PACKAGES
        .iter()
        // A command on PATH, or (for libraries and headers) a file.
        .filter(|(c, _)| !(have(c) || (c.starts_with('/') && Path::new(c).exists())))
        .map(|(_, p)| *p)
        .collect();
    apt_install(&missing)
}

/// Installs Debian packages (as root), keeping their scripts from starting services.
pub(crate) fn apt_install(missing: &[&str]) -> Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() || !have("apt-get") {
        bail!(
            "missing packages {missing:?}: install them (Debian: apt-get install {})",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    // Keep package scripts from starting services on the host: tests start their own.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let made_policy = !policy.exists() && std::fs::write(policy, "#!/bin/sh\nexit 101\n").is_ok();
    if made_policy {
        let _ = Command::new("chmod")
            .args(["+x", "/usr/sbin/policy-rc.d"])
            .status();
    }
    let r = run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(missing));
    if made_policy {
        let _ = std::fs::remove_file(policy);
    }
    r
}

fn setup(packages: bool) -> Result<()> {
    if packages {
        let t = Instant::now();
        install_packages()?;
        eprintln!("xtask: packages ready ({:.1}s)", t.elapsed().as_secs_f64());
    }
    let t = Instant::now();
    let tc = monitor_build::ensure_toolchain()?;
    eprintln!(
        "xtask: eBPF toolchain ready ({:.1}s): linker {}, core from {}",
        t.elapsed().as_secs_f64(),
        tc.linker.display(),
        match &tc.core {
            monitor_build::CoreSource::BuildStd => "rust-src (-Zbuild-std)".to_string(),
            monitor_build::CoreSource::Sysroot(p) => format!("rust-docs sources ({})", p.display()),
        }
    );
    Ok(())
}

pub(crate) fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup { no_packages } => setup(!no_packages),
        Task::Build => {
            setup(false)?;
            run(cargo().args(["build", "--release", "-p", "monitor"]))
        }
        Task::Run { args } => {
            if !is_root() {
                bail!(
                    "monitor run loads eBPF programs: run as root (or with CAP_BPF and CAP_PERFMON)"
                );
            }
            setup(false)?;
            run(cargo().args(["build", "--release", "-p", "monitor"]))?;
            let bin = root().join("target/release/monitor");
            let mut args = args;
            if args.first().is_none_or(|a| a.starts_with('-')) {
                args.insert(0, "run".into());
            }
            run(Command::new(bin).args(args))
        }
        Task::Bench(bench::Bench::Pipeline(a)) => bench::pipeline(a),
        Task::Bench(b) => {
            if !is_root() {
                bail!("benchmarks attach eBPF programs: run as root");
            }
            setup(false)?;
            match b {
                bench::Bench::Overhead(a) => bench::overhead(a),
                bench::Bench::Load(a) => bench::load(a),
                bench::Bench::Pipeline(a) => bench::pipeline(a),
            }
        }
        Task::Clickhouse(c) => clickhouse::main(c),
        Task::DeployCheck(a) => deploy::main(a),
        Task::Demo => {
            if !is_root() {
                bail!("the demo attaches eBPF programs and creates namespaces: run as root");
            }
            setup(true)?;
            demo::demo()
        }
        Task::Test { args } => {
            if !is_root() {
                bail!(
                    "the live tests load eBPF programs and create network namespaces: run as root"
                );
            }
            setup(true)?;
            let t = Instant::now();
            let tests = run(cargo()
                .args(["test", "--workspace", "--no-fail-fast"])
                .args(&args));
            if tests.is_ok() {
                eprintln!("xtask: tests passed ({:.0}s)", t.elapsed().as_secs_f64());
            }
            // Also when the tests failed (--no-fail-fast): both verdicts in one run.
            let deploy = deploy::main(deploy::DeployCheck::default());
            if let (Err(_), Err(e)) = (&tests, &deploy) {
                eprintln!("xtask: {e:#}");
            }
            tests.and(deploy)
        }
    }
}
