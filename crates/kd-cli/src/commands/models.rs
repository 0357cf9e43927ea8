//! `kd models`: the zoo's names.

use anyhow::Result;

use crate::out::outln;

pub fn run() -> Result<()> {
    for name in kd_models::names() {
        outln!("{name}")?;
    }
    Ok(())
}
