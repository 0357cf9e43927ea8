//! `kd methods`: every registered method, its paper and config defaults.

use anyhow::Result;
use kd_core::Registry;

use crate::out::outln;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: &Args, registry: &Registry) -> Result<()> {
    if a.json {
        let all: Vec<_> = registry
            .iter()
            .map(|e| serde_json::json!({"name": e.name, "summary": e.summary, "config": e.default_config(), "schedulable": e.schedulable}))
            .collect();
        outln!("{}", serde_json::to_string_pretty(&all)?)?;
        return Ok(());
    }
    for e in registry.iter() {
        let fields: Vec<String> = e
            .fields()
            .iter()
            .map(|f| format!("{}={}", f.name, f.default))
            .collect();
        outln!("{:<10} {}", e.name, e.summary)?;
        if !fields.is_empty() {
            outln!("{:<10}   config: {}", "", fields.join(", "))?;
        }
    }
    Ok(())
}
