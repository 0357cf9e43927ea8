//! The `kd` command line. `run` is the whole program, callable in-process by
//! the tests; `main.rs` only maps its result to an exit code.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kd_core::Registry;

#[derive(Parser, Debug)]
#[command(name = "kd", version, about = "Knowledge distillation on libtorch: recipes, plugins, tracking")]
pub struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List registered methods with their config fields and defaults.
    Methods {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Conformance checks against a PyTorch reference.
    #[command(subcommand)]
    Probe(Probe),
}

#[derive(Subcommand, Debug)]
enum Probe {
    /// Run a method on a fixture's taps; write loss, tap gradients and method state.
    Loss {
        #[arg(long)]
        fixture: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

/// Runs `kd` with the given arguments (the first is the program name).
pub fn run<I, T>(args: I) -> Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = Cli::try_parse_from(args)?;
    kd_methods::link();
    let registry = Registry::global()?;
    match cli.cmd {
        Cmd::Methods { json } => print_methods(&registry, json),
        Cmd::Probe(Probe::Loss { fixture, out }) => {
            let result = kd_engine::probe::probe_loss(&fixture, &registry)
                .with_context(|| format!("probing {}", fixture.display()))?;
            kd_engine::tensors::write(&out, &result)?;
            Ok(())
        }
    }
}

fn print_methods(registry: &Registry, json: bool) -> Result<()> {
    if json {
        let all: Vec<_> = registry
            .iter()
            .map(|e| serde_json::json!({"name": e.name, "summary": e.summary, "config": e.default_config(), "schedulable": e.schedulable}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    for e in registry.iter() {
        let fields: Vec<String> = e.fields().iter().map(|f| format!("{}={}", f.name, f.default)).collect();
        println!("{:<10} {}", e.name, e.summary);
        if !fields.is_empty() {
            println!("{:<10}   config: {}", "", fields.join(", "));
        }
    }
    Ok(())
}

/// Maps errors to one line on stderr and an exit code; `--help` and
/// `--version` print normally.
pub fn main_exit<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(clap_err) = e.downcast_ref::<clap::Error>() {
                let _ = clap_err.print();
                return if clap_err.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
