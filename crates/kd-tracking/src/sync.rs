//! `kd sync`: replays what a run folder's journal holds and the server has
//! not acknowledged, after an outage, a crash, or a run made without a
//! server.
//!
//! A run whose process is gone without a final status is closed on the way:
//! KILLED if it recorded an interruption, FAILED otherwise; a run that once
//! finished counts as having one, and stays FINISHED. "Gone" is decided
//! by the run folder's lock, which the kernel releases when the process dies,
//! so a recycled pid cannot make a dead run look alive.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::client::{Client, RunStatus};
use crate::error::{Error, Result};
use crate::journal::{AckLog, Event, JOURNAL_FILE, JournalWriter, RunLock, Summary, now_ms};
use crate::ship::Shipper;

/// What one `sync` did.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncReport {
    pub run_id: String,
    /// Entries acknowledged by this sync.
    pub shipped: u64,
    /// Entries the server refused for good, with its reason.
    pub rejected: Vec<String>,
    /// The status given to a run whose process died without one.
    pub closed_as: Option<RunStatus>,
    /// Journal lines that could not be read (damaged) and were skipped.
    pub bad_lines: usize,
}

/// Ships everything of the run in `run_dir` that the server at
/// `tracking_uri` has not acknowledged. Safe to repeat: acknowledged entries
/// are never sent again. Fails with [`Error::RunLive`] while the run's
/// process still holds the folder, and with the transport error when the
/// server is away (what was shipped by then stays acknowledged).
pub fn sync(run_dir: &Path, tracking_uri: &str) -> Result<SyncReport> {
    sync_at_depth(run_dir, tracking_uri, 0)
}

/// Syncs every run folder below `runs_root` (those holding a journal),
/// parents before their children. One run's failure does not stop the rest.
/// A `runs_root` that cannot be read, or holds no run folder, gives one
/// entry, `runs_root` with the error ([`Error::NoRuns`] for the latter):
/// there is nothing to sync, and a caller must not take that for success.
pub fn sync_all(runs_root: &Path, tracking_uri: &str) -> Vec<(PathBuf, Result<SyncReport>)> {
    if let Err(e) = std::fs::read_dir(runs_root) {
        return vec![(runs_root.to_path_buf(), Err(Error::io(runs_root, e)))];
    }
    let mut dirs = Vec::new();
    find_journals(runs_root, &mut dirs);
    if dirs.is_empty() {
        let none = Error::NoRuns(runs_root.to_path_buf());
        return vec![(runs_root.to_path_buf(), Err(none))];
    }
    dirs.sort_by_key(|d| (d.components().count(), d.clone()));
    dirs.into_iter()
        .map(|d| {
            let r = sync(&d, tracking_uri);
            (d, r)
        })
        .collect()
}

fn find_journals(dir: &Path, out: &mut Vec<PathBuf>) {
    if dir.join(JOURNAL_FILE).is_file() {
        out.push(dir.to_path_buf());
    }
    let Ok(items) = std::fs::read_dir(dir) else {
        return;
    };
    for item in items.flatten() {
        let p = item.path();
        // The local server's own store lives under the runs folder too.
        if item.file_name() != "mlflow" && item.file_type().is_ok_and(|t| t.is_dir()) {
            find_journals(&p, out);
        }
    }
}

/// Parents chain at most this deep (a sweep of sweeps is already unusual).
const MAX_PARENT_DEPTH: usize = 8;

fn sync_at_depth(run_dir: &Path, tracking_uri: &str, depth: usize) -> Result<SyncReport> {
    let client = Client::new(tracking_uri)?;
    let dir = std::fs::canonicalize(run_dir).map_err(|e| Error::io(run_dir, e))?;
    if !dir.join(JOURNAL_FILE).is_file() {
        return Err(Error::Journal {
            path: dir.join(JOURNAL_FILE),
            reason: "no journal: not a kd run folder".into(),
        });
    }
    let _lock = RunLock::acquire(&dir)?;
    let summary = Summary::scan(&dir)?;

    // A child can only be created under its parent's server run.
    if summary.run.is_none()
        && let Some(Event::Start {
            parent: Some(parent),
            ..
        }) = summary.start.as_ref().map(|s| &s.event)
        && Summary::scan(parent)?.run.is_none()
    {
        if depth >= MAX_PARENT_DEPTH {
            return Err(Error::ParentPending {
                child: dir.clone(),
                parent: parent.clone(),
            });
        }
        sync_at_depth(parent, tracking_uri, depth + 1)?;
    }

    let acked = AckLog::open(&dir)?.upto();
    let mut writer = JournalWriter::open(&dir, summary.last_seq.max(acked) + 1)?;
    let closed_as = if summary.terminal.is_none() {
        let status = if summary.interrupted {
            RunStatus::Killed
        } else {
            RunStatus::Failed
        };
        // The run ended when it stopped writing, not now.
        let time = summary.last_time.unwrap_or_else(now_ms);
        writer.append(time, Event::Status { status })?;
        writer.sync()?;
        Some(status)
    } else {
        None
    };
    let record = Box::new(move |time, event| {
        writer.append(time, event)?;
        writer.sync()
    });
    let run = Arc::new(OnceLock::new());
    let mut shipper = Shipper::new(&dir, client, &summary, run.clone(), None, record)?;
    shipper.ship(None, None)?;
    Ok(SyncReport {
        run_id: run.get().map(|r| r.run_id.clone()).unwrap_or_default(),
        shipped: shipper.shipped,
        rejected: shipper.rejected.clone(),
        closed_as,
        bad_lines: shipper.bad_lines(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::{RunSpec, Tracker};

    #[test]
    fn a_live_run_is_not_synced() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tracker::start(dir.path(), RunSpec::new("e")).unwrap();
        // Refused before any network access: the port does not matter.
        let e = sync(dir.path(), "http://127.0.0.1:9").unwrap_err();
        assert!(matches!(e, Error::RunLive(_)), "{e}");
        t.finish(RunStatus::Finished);
    }

    #[test]
    fn syncing_a_missing_or_empty_folder_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        // Refused before any network access: the port does not matter.
        let uri = "http://127.0.0.1:9";
        let missing = root.path().join("missing");
        let got = sync_all(&missing, uri);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, missing);
        let e = got[0].1.as_ref().unwrap_err();
        assert!(
            matches!(e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
            "{e}"
        );
        assert!(matches!(sync(&missing, uri), Err(Error::Io { .. })));

        std::fs::create_dir_all(root.path().join("empty/sub")).unwrap();
        let got = sync_all(&root.path().join("empty"), uri);
        assert_eq!(got.len(), 1);
        let e = got[0].1.as_ref().unwrap_err();
        assert!(matches!(e, Error::NoRuns(_)), "{e}");
        assert!(e.to_string().contains("no kd runs in"), "{e}");
    }

    /// A finished run, reopened, then killed: it left no status of its own.
    #[test]
    fn a_finished_run_is_never_closed_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = JournalWriter::open(dir.path(), 1).unwrap();
        let start = Event::Start {
            experiment: "e".into(),
            run_name: None,
            tags: Default::default(),
            parent: None,
            pid: 1,
        };
        for ev in [
            start,
            Event::Status {
                status: RunStatus::Finished,
            },
            Event::Resume { pid: 2 },
            Event::Interrupted,
            Event::Metric {
                key: "m".into(),
                value: 1.0,
                step: 0,
            },
        ] {
            w.append(1, ev).unwrap();
        }
        w.sync().unwrap();
        drop(w);
        // No server there: shipping fails, after the run would be closed.
        let e = sync(dir.path(), "http://127.0.0.1:9").unwrap_err();
        assert!(e.is_transient(), "{e}");
        let text = std::fs::read_to_string(dir.path().join(JOURNAL_FILE)).unwrap();
        assert_eq!(text.lines().count(), 5, "nothing appended: {text}");
        assert_eq!(
            crate::journaled_status(dir.path()).unwrap(),
            Some(RunStatus::Finished)
        );
    }

    #[test]
    fn sync_all_finds_runs_parents_first_and_skips_the_server_store() {
        let root = tempfile::tempdir().unwrap();
        for d in ["b", "a/t1", "a", "mlflow/x"] {
            let dir = root.path().join(d);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(JOURNAL_FILE), "").unwrap();
        }
        let mut found = Vec::new();
        find_journals(root.path(), &mut found);
        found.sort_by_key(|d| (d.components().count(), d.clone()));
        let rel: Vec<_> = found
            .iter()
            .map(|d| {
                d.strip_prefix(root.path())
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(rel, ["a", "b", "a/t1"]);
    }
}
