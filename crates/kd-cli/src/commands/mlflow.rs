//! `kd mlflow up|down|status`: the local MLflow server.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Subcommand;

use crate::out::outln;

#[derive(Subcommand, Debug)]
pub enum Mlflow {
    /// Start the server on loopback and print the UI address.
    Up {
        /// Output folder of the runs; the server keeps its SQLite store and
        /// artifacts in OUT/mlflow, and its address there for the runs.
        #[arg(long, default_value = "runs")]
        out: PathBuf,
        /// Port on 127.0.0.1 [default: a free one].
        #[arg(long)]
        port: Option<u16>,
    },
    /// Stop the server started by `up`.
    Down {
        /// The output folder `up` was given.
        #[arg(long, default_value = "runs")]
        out: PathBuf,
    },
    /// Print the server's address if it runs; exits non-zero when none does.
    Status {
        /// The output folder `up` was given.
        #[arg(long, default_value = "runs")]
        out: PathBuf,
    },
}

pub fn run(cmd: Mlflow) -> Result<()> {
    match cmd {
        Mlflow::Up { out, port } => {
            let info = kd_tracking::server::up(&out, port)?;
            outln!("{}", info.url)?;
        }
        Mlflow::Down { out } => match kd_tracking::server::down(&out)? {
            Some(info) => outln!("stopped {}", info.url)?,
            None => outln!("no server was running under {}", out.display())?,
        },
        Mlflow::Status { out } => match kd_tracking::server::status(&out)? {
            Some(info) => outln!("{}", info.url)?,
            None => bail!(
                "no MLflow server runs under {}; start one with `kd mlflow up --out {}`",
                out.display(),
                out.display()
            ),
        },
    }
    Ok(())
}
