//! `monitor`: watches east-west traffic for credentials and where they are used.

mod explain;
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
    /// Where the TLS uprobes sit in a file: `--explain FILE` prints, per function, the site
    /// chosen by decoding it, how the kernel runs it (emulated, single-step, uretprobe) and why.
    Probes(explain::ProbesArgs),
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
    monitor::logging::init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(run::run(args))
        }
        Command::Replay(args) => replay::replay(args),
        Command::Probes(args) => explain::probes(args),
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
