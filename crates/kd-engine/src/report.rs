//! Summaries of several runs: mean ± sample standard deviation of the best
//! and the last test top-1, per configuration.

use crate::RunResult;

#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub config: String,
    pub runs: usize,
    pub best: (f64, f64),
    pub last: (f64, f64),
}

/// Mean and sample standard deviation (0 for a single value).
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 {
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

pub fn summarize(config: &str, runs: &[RunResult]) -> Summary {
    let last_stage = |r: &RunResult| r.last().cloned();
    let best: Vec<f64> = runs
        .iter()
        .filter_map(last_stage)
        .map(|s| s.best_top1)
        .collect();
    let last: Vec<f64> = runs
        .iter()
        .filter_map(last_stage)
        .map(|s| s.last_top1)
        .collect();
    Summary {
        config: config.to_string(),
        runs: runs.len(),
        best: mean_std(&best),
        last: mean_std(&last),
    }
}

/// A plain-text table, one row per configuration.
pub fn table(rows: &[Summary]) -> String {
    let width = rows
        .iter()
        .map(|r| r.config.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let mut out = format!(
        "{:<width$}  {:>4}  {:>16}  {:>16}\n",
        "config", "runs", "best top-1 (%)", "last top-1 (%)"
    );
    for r in rows {
        out += &format!(
            "{:<width$}  {:>4}  {:>16}  {:>16}\n",
            r.config,
            r.runs,
            format!("{:.2} ± {:.2}", r.best.0, r.best.1),
            format!("{:.2} ± {:.2}", r.last.0, r.last.1)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_std_like_numpy_ddof1() {
        let (m, s) = mean_std(&[70.0, 71.0, 72.5]);
        assert!((m - 71.166_666_666_666_67).abs() < 1e-9);
        // numpy.std([70, 71, 72.5], ddof=1) = 1.2583057392117916
        assert!((s - 1.258_305_739_211_791_6).abs() < 1e-9);
        assert_eq!(mean_std(&[3.0]), (3.0, 0.0));
    }
}
