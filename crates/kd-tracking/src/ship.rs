//! Moves journal entries to the server, oldest first, acknowledging each
//! request durably once the server accepted it.
//!
//! The same code serves the live tracker (tailing a growing journal) and
//! `sync` (replaying a finished or crashed one), so a replay behaves exactly
//! like the first attempt would have.
//!
//! Exactly-once: entries are shipped in `seq` order and a request is
//! acknowledged only after the server answered it, so the acknowledged set is
//! always a prefix and is never sent again. The one window left, a crash
//! between the server's answer and the acknowledgement reaching disk, resends
//! one request; MLflow's SQL store drops a metric it already holds (same key,
//! step, timestamp and value) and accepts a param logged again with the same
//! value, so even that resend leaves no duplicate.
//!
//! Entries that would tell the server nothing new (see
//! [`Logged`](crate::journal::Logged)) are acknowledged without a request:
//! a step or param that journals from older versions hold twice, and a
//! status or `resume` after FINISHED.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::client::{
    Client, MAX_BATCH_BYTES, MAX_ENTITIES_PER_BATCH, MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH, Metric, RunInfo,
};
use crate::error::{Error, Result};
use crate::journal::{AckLog, Entry, Event, JournalReader, Logged, Summary, now_ms};

/// How many unacknowledged entries are held in memory; the rest wait in the
/// journal, so a long outage costs disk, not memory.
const READ_AHEAD: usize = 10_000;

/// The smallest `log-batch` a slow server gets.
const MIN_BATCH: usize = 25;

/// An unacknowledged entry; `send` is false when it tells the server
/// nothing new and is acknowledged without a request.
#[derive(Clone)]
struct Queued {
    entry: Entry,
    send: bool,
}

/// Appends an event to the run's journal (through the writer thread when a
/// tracker is live, directly during `sync`).
pub(crate) type Record = Box<dyn FnMut(i64, Event) -> Result<()> + Send>;

pub(crate) struct Shipper {
    dir: PathBuf,
    client: Client,
    timeout: Duration,
    reader: JournalReader,
    acks: AckLog,
    pending: VecDeque<Queued>,
    /// Everything read so far, acknowledged or not: a duplicate can sit on
    /// either side of the watermark.
    logged: Logged,
    start: Option<Entry>,
    run: Arc<OnceLock<RunInfo>>,
    parent_run: Option<Arc<OnceLock<RunInfo>>>,
    /// After a refused batch, entries up to here go one per request so only
    /// the culprit is refused.
    isolate_until: u64,
    /// Entries per `log-batch` request: halved when the server is too slow
    /// to answer one in time, grown back after successes.
    batch_cap: usize,
    record: Record,
    pub(crate) shipped: u64,
    pub(crate) rejected: Vec<String>,
}

impl Shipper {
    /// `run` is filled once the server run exists (it may already be, from
    /// the journal); `parent_run` is the parent's cell when the parent lives
    /// in this process.
    pub(crate) fn new(
        dir: &Path,
        client: Client,
        summary: &Summary,
        run: Arc<OnceLock<RunInfo>>,
        parent_run: Option<Arc<OnceLock<RunInfo>>>,
        record: Record,
    ) -> Result<Shipper> {
        if let Some(info) = &summary.run {
            let _ = run.set(info.clone());
        }
        Ok(Shipper {
            dir: dir.to_path_buf(),
            timeout: client.timeout(),
            client,
            reader: JournalReader::new(dir),
            acks: AckLog::open(dir)?,
            pending: VecDeque::new(),
            logged: Logged::default(),
            start: summary.start.clone(),
            run,
            parent_run,
            isolate_until: 0,
            batch_cap: MAX_ENTITIES_PER_BATCH,
            record,
            shipped: 0,
            rejected: Vec::new(),
        })
    }

    pub(crate) fn acked(&self) -> u64 {
        self.acks.upto()
    }

    pub(crate) fn bad_lines(&self) -> usize {
        self.reader.bad_lines
    }

    /// Ships what the journal holds now. `Ok(true)`: nothing is left;
    /// `Ok(false)`: stopped early, at `deadline` (which also bounds each
    /// request) or between requests once `pause_at` passed. Errors leave
    /// everything unacknowledged in place for the next attempt.
    pub(crate) fn ship(
        &mut self,
        deadline: Option<Instant>,
        pause_at: Option<Instant>,
    ) -> Result<bool> {
        loop {
            self.fill()?;
            if self.pending.is_empty() {
                return Ok(true);
            }
            let now = Instant::now();
            if pause_at.is_some_and(|p| now >= p) {
                return Ok(false);
            }
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(now);
                if left.is_zero() {
                    return Ok(false);
                }
                self.client.set_timeout(self.timeout.min(left));
            }
            self.ensure_run()?;
            self.ship_front()?;
        }
    }

    fn fill(&mut self) -> Result<()> {
        if self.pending.len() >= READ_AHEAD / 2 {
            return Ok(());
        }
        let acked = self.acks.upto();
        let (pending, start, logged) = (&mut self.pending, &mut self.start, &mut self.logged);
        self.reader.read(READ_AHEAD - pending.len(), |e| {
            if start.is_none() && matches!(e.event, Event::Start { .. }) {
                *start = Some(e.clone());
            }
            let send = logged.admit(&e.event);
            if e.seq > acked {
                pending.push_back(Queued { entry: e, send });
            }
        })?;
        Ok(())
    }

    fn ensure_run(&mut self) -> Result<()> {
        if self.run.get().is_some() {
            return Ok(());
        }
        let journal_error = |reason: &str| Error::Journal {
            path: self.dir.join(crate::journal::JOURNAL_FILE),
            reason: reason.to_string(),
        };
        let Some(start) = self.start.clone() else {
            return Err(journal_error("no `start` entry: not a kd run journal"));
        };
        let Event::Start {
            experiment,
            run_name,
            tags,
            parent,
            ..
        } = start.event
        else {
            return Err(journal_error("first entry is not `start`"));
        };
        let mut tags: Vec<(String, String)> = tags.into_iter().collect();
        if let Some(parent) = parent {
            let id = self.parent_run_id(&parent)?;
            tags.retain(|(k, _)| k != "mlflow.parentRunId");
            tags.push(("mlflow.parentRunId".into(), id));
        }
        let experiment_id = self.client.get_or_create_experiment(&experiment)?;
        let info =
            self.client
                .create_run(&experiment_id, run_name.as_deref(), start.time, &tags)?;
        (self.record)(now_ms(), Event::RunCreated(info.clone()))?;
        let _ = self.run.set(info);
        Ok(())
    }

    fn parent_run_id(&self, parent: &Path) -> Result<String> {
        if let Some(info) = self.parent_run.as_ref().and_then(|c| c.get()) {
            return Ok(info.run_id.clone());
        }
        match Summary::scan(parent)?.run {
            Some(info) => Ok(info.run_id),
            None => Err(Error::ParentPending {
                child: self.dir.clone(),
                parent: parent.to_path_buf(),
            }),
        }
    }

    fn ship_front(&mut self) -> Result<()> {
        let run = self.run.get().expect("ensure_run ran").clone();
        let front = self.pending.front().expect("caller checked").clone();
        let outcome = match front.send.then_some(&front.entry.event) {
            Some(Event::Artifact { path, dest }) => self.upload(&run, path, dest),
            Some(Event::Status { status }) => {
                self.client
                    .update_run(&run.run_id, *status, front.entry.time)
            }
            Some(Event::Resume { .. }) => self.client.reopen_run(&run.run_id),
            _ => {
                let single = front.entry.seq <= self.isolate_until;
                let (n, metrics, params, tags) = self.take_batch(single);
                let sent = if metrics.is_empty() && params.is_empty() && tags.is_empty() {
                    Ok(())
                } else {
                    self.client
                        .log_batch_once(&run.run_id, &metrics, &params, &tags)
                };
                return self.settle(n, sent);
            }
        };
        self.settle(1, outcome)
    }

    /// The longest run of loggable entries at the front that fits one
    /// `log-batch` request.
    #[allow(clippy::type_complexity)]
    fn take_batch(
        &self,
        single: bool,
    ) -> (
        usize,
        Vec<Metric>,
        Vec<(String, String)>,
        Vec<(String, String)>,
    ) {
        let (mut metrics, mut params, mut tags) = (Vec::new(), Vec::new(), Vec::new());
        let mut param_keys = HashSet::new();
        let mut bytes = 200;
        let mut n = 0;
        for q in &self.pending {
            let e = &q.entry;
            if !q.send {
                // Nothing to send: it rides along with its neighbours.
                n += 1;
                if single {
                    break;
                }
                continue;
            }
            let size = match &e.event {
                Event::Metric { key, .. } => key.len() + 100,
                Event::Param { key, value } | Event::Tag { key, value } => {
                    json_len(key) + json_len(value) + 40
                }
                Event::Start { .. } | Event::RunCreated(_) | Event::Interrupted => 0,
                Event::Artifact { .. } | Event::Status { .. } | Event::Resume { .. } => break,
            };
            let (m, pt) = (metrics.len(), params.len() + tags.len());
            let full = match &e.event {
                Event::Metric { .. } => {
                    m + 1 > MAX_METRICS_PER_BATCH || m + pt + 1 > MAX_ENTITIES_PER_BATCH
                }
                // MLflow refuses a batch naming one param twice.
                Event::Param { key, .. } if param_keys.contains(key) => true,
                Event::Param { .. } | Event::Tag { .. } => {
                    pt + 1 > MAX_PARAMS_TAGS_PER_BATCH || m + pt + 1 > MAX_ENTITIES_PER_BATCH
                }
                _ => false,
            };
            let full = full || (size > 0 && m + pt + 1 > self.batch_cap);
            if n > 0 && (full || bytes + size > MAX_BATCH_BYTES) {
                break;
            }
            bytes += size;
            n += 1;
            match &e.event {
                Event::Metric { key, value, step } => metrics.push(Metric {
                    key: key.clone(),
                    value: *value,
                    timestamp: e.time,
                    step: *step,
                }),
                Event::Param { key, value } => {
                    param_keys.insert(key.clone());
                    params.push((key.clone(), value.clone()));
                }
                Event::Tag { key, value } => tags.push((key.clone(), value.clone())),
                _ => {}
            }
            if single {
                break;
            }
        }
        (n, metrics, params, tags)
    }

    /// Uploads a file, or a folder's files under `dest/<folder name>/...`.
    fn upload(&self, run: &RunInfo, path: &Path, dest: &str) -> Result<()> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let target = join_artifact_path(dest, &name);
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if !meta.is_dir() {
            return self.client.upload_artifact(run, path, &target);
        }
        let mut stack = vec![(path.to_path_buf(), target)];
        while let Some((dir, at)) = stack.pop() {
            let mut items: Vec<_> = std::fs::read_dir(&dir)
                .map_err(|e| Error::io(&dir, e))?
                .filter_map(|d| d.ok())
                .collect();
            items.sort_by_key(|d| d.file_name());
            for item in items {
                let p = item.path();
                let sub = join_artifact_path(&at, &item.file_name().to_string_lossy());
                if p.is_dir() {
                    stack.push((p, sub));
                } else {
                    self.client.upload_artifact(run, &p, &sub)?;
                }
            }
        }
        Ok(())
    }

    /// Acknowledges the first `n` pending entries after an attempt, or sets
    /// aside the one the server refused.
    fn settle(&mut self, n: usize, outcome: Result<()>) -> Result<()> {
        let last = self.pending[n - 1].entry.seq;
        match outcome {
            Ok(()) => {
                self.acks.ack(last, None)?;
                self.pending.drain(..n);
                self.shipped += n as u64;
                self.batch_cap = (self.batch_cap * 2).min(MAX_ENTITIES_PER_BATCH);
                Ok(())
            }
            Err(e) if !refuses_entry(&e) => {
                if matches!(e, Error::Timeout { .. }) {
                    self.batch_cap = (self.batch_cap / 2).max(MIN_BATCH);
                }
                Err(e)
            }
            Err(_) if n > 1 => {
                self.isolate_until = last;
                Ok(())
            }
            Err(e) => {
                let reason = e.to_string();
                self.acks.ack(last, Some(reason.clone()))?;
                self.pending.pop_front();
                self.rejected.push(format!("seq {last}: {reason}"));
                Ok(())
            }
        }
    }
}

/// Whether an error is about the entry itself, so that retrying it can never
/// help and the entry must be set aside rather than block the run. MLflow
/// answers 400 (`INVALID_PARAMETER_VALUE`) or 404 with its own error code for
/// those; authentication failures, a wrong URL (404 without an MLflow code)
/// or a server fault concern every entry alike and stop shipping instead.
fn refuses_entry(e: &Error) -> bool {
    match e {
        Error::Server {
            status, error_code, ..
        } => *status == 400 || (*status == 404 && !error_code.starts_with("HTTP_")),
        Error::Io { .. } | Error::ArtifactRoot(_) => true,
        _ => false,
    }
}

fn json_len(s: &str) -> usize {
    serde_json::to_string(s).map_or(s.len() * 6, |j| j.len())
}

fn join_artifact_path(dir: &str, name: &str) -> String {
    let dir = dir.trim_matches('/');
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}
