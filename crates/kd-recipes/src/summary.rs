//! The sweep table of a recipe's runs: `kd_engine::report`'s grouping by
//! configuration, on the runs with the plans they ran.

use kd_engine::{Plan, RunResult, report};

/// A finished run with the plan it ran.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    pub plan: Plan,
    pub result: RunResult,
}

/// Runs that differ only in name and seed form one configuration (see
/// [`kd_engine::report::group`]).
pub fn table(runs: &[RunRecord]) -> String {
    let refs: Vec<(&Plan, &RunResult)> = runs.iter().map(|r| (&r.plan, &r.result)).collect();
    report::table(&report::group(&refs))
}
