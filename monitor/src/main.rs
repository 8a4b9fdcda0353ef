//! `monitor`: watches east-west traffic for credentials and where they are used.

mod outputs;
mod replay;
mod run;
mod stdout;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "eBPF east-west traffic monitor for credential reuse")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the probes and report every HTTP request with its credentials (needs root or
    /// CAP_BPF + CAP_PERFMON).
    Run(run::RunArgs),
    /// Run the same pipeline on a recorded event log, without the kernel (no root needed).
    Replay(replay::ReplayArgs),
    /// Rules files: `check DIR` validates them and reports every error as file:line:column.
    #[command(subcommand)]
    Rules(RulesCommand),
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Validate a rules directory (or file).
    Check { dir: std::path::PathBuf },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MONITOR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(run::run(args))
        }
        Command::Replay(args) => replay::replay(args),
        Command::Rules(RulesCommand::Check { dir }) => match monitor::rules::Rules::load(&dir) {
            Ok(r) => {
                println!(
                    "{}: ok ({} workloads, {} destinations, {} edges, {} credentials)",
                    dir.display(),
                    r.workloads.len(),
                    r.destinations.len(),
                    r.edges.len(),
                    r.credentials.len()
                );
                Ok(())
            }
            Err(errs) => {
                for e in &errs {
                    println!("{e}");
                }
                eprintln!("{} error(s)", errs.len());
                std::process::exit(1)
            }
        },
    }
}
