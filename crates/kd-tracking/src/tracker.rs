//! The handle the training loop logs through.
//!
//! Each call only timestamps the event and queues it (waking no thread unless
//! someone waits on it), so a slow or absent server never stalls a training
//! step. Two background threads do the rest: the journal thread appends
//! every event to the run folder's journal, at most every 250 ms
//! (the record that survives anything), and the shipper thread tails that
//! journal and sends it to MLflow in batches, retrying with backoff while the
//! server is away.
//!
//! Reopening a run folder continues its run, under two rules that make a
//! resumed run look in MLflow as if it had never stopped:
//! - **Each metric step once.** A metric whose key and step the journal
//!   already holds is dropped, the first point kept: a run resumed from its
//!   last checkpoint replays the steps logged after it (with the same
//!   values, as resumed training is exact). A param logged again with the
//!   value it has is dropped too; with another value it is journaled, and
//!   MLflow refuses it (reported in [`FinishReport::rejected`]).
//! - **A finished run's status never changes.** Once the journal holds
//!   FINISHED, the run stays FINISHED: reopening it (say, to train more
//!   epochs) appends metrics, params, tags and artifacts, but does not set
//!   it RUNNING, [`Tracker::finish`] (with any status) and a drop record no
//!   status, and `sync` does not close it as FAILED or KILLED. Its end time
//!   stays that of the first finish. Failed and killed runs, in contrast,
//!   are RUNNING again when reopened and take the status of their last end.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::client::{Client, RunInfo, RunStatus};
use crate::error::{Error, Result};
use crate::journal::{AckLog, Event, JournalWriter, Logged, RunLock, Summary, now_ms};
use crate::ship::Shipper;

/// What to create on the server.
#[derive(Debug, Clone, Default)]
pub struct RunSpec {
    /// MLflow experiment name; created on first use.
    pub experiment: String,
    pub run_name: Option<String>,
    pub tags: BTreeMap<String, String>,
    /// `None`: journal only; `kd sync` ships it later.
    pub tracking_uri: Option<String>,
}

impl RunSpec {
    pub fn new(experiment: impl Into<String>) -> RunSpec {
        RunSpec {
            experiment: experiment.into(),
            ..RunSpec::default()
        }
    }

    pub fn name(mut self, run_name: impl Into<String>) -> RunSpec {
        self.run_name = Some(run_name.into());
        self
    }

    pub fn tag(mut self, key: impl Into<String>, value: impl Into<String>) -> RunSpec {
        self.tags.insert(key.into(), value.into());
        self
    }

    pub fn tracking_uri(mut self, uri: Option<String>) -> RunSpec {
        self.tracking_uri = uri;
        self
    }
}

/// Timing of the background threads.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long events gather before a batch goes out.
    pub flush_interval: Duration,
    /// The most `finish` waits for the server; the journal keeps the rest.
    pub finish_timeout: Duration,
    /// Limit on one HTTP request.
    pub request_timeout: Duration,
    /// Longest wait between retries while the server is away.
    pub max_backoff: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            flush_interval: Duration::from_secs(1),
            finish_timeout: Duration::from_secs(10),
            // Shipping runs in the background, so a patient limit costs
            // nothing; `finish` bounds the wait on its own.
            request_timeout: Duration::from_secs(30),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// How a run ended up, as far as the server goes.
#[derive(Debug, Clone, Default)]
pub struct FinishReport {
    /// The MLflow run id, if the run reached the server.
    pub run_id: Option<String>,
    /// Journal entries written (the last `seq`).
    pub logged: u64,
    /// Entries the server has (or refused for good).
    pub acked: u64,
    /// The last shipping failure, if entries are left over.
    pub error: Option<String>,
    /// Entries the server refused, with its reason; they are not retried.
    pub rejected: Vec<String>,
}

impl FinishReport {
    /// Whether `kd sync` has anything left to do for this run.
    pub fn needs_sync(&self) -> bool {
        self.acked < self.logged
    }
}

enum Msg {
    Log(i64, Event),
    /// Written and fsynced before the sender hears back (the server run id:
    /// the shipper must find it in the journal before it can finish).
    Durable(i64, Event, Sender<()>),
    /// Sync, hand the deadline to the shipper, then answer.
    Close(Instant, Sender<()>),
    /// Answer once everything queued before is in the journal file.
    Flush(Sender<()>),
}

/// The journal thread's inbox. Metrics, params, tags and artifacts only join
/// a queue that the thread collects every [`TICK`]: a training step's
/// metric calls wake no thread. (Waking one on a machine whose cores all run
/// libtorch workers stalls a parallel op; the tracking bench measured +1 to
/// 2% per step when every call woke the thread.) What someone waits on, or
/// what must reach disk at once, also rings the bell.
#[derive(Clone)]
struct Outbox {
    queue: Arc<Mutex<Vec<Msg>>>,
    bell: Sender<()>,
}

impl Outbox {
    /// Queues `msg`; `Err` when the journal thread is gone.
    fn post(&self, msg: Msg, ring: bool) -> std::result::Result<(), ()> {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.push(msg);
        drop(q);
        if ring {
            self.bell.send(()).map_err(|_| ())
        } else {
            Ok(())
        }
    }
}

/// How often the journal thread collects queued messages when nobody rings.
const TICK: Duration = Duration::from_millis(250);

/// Drops whatever is still queued when the journal thread ends (or
/// panics), so that no one waits forever on a reply inside a message.
struct DropQueued(Arc<Mutex<Vec<Msg>>>);
impl Drop for DropQueued {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

#[derive(Default)]
struct Shared {
    logged: u64,
    acked: u64,
    error: Option<String>,
    rejected: Vec<String>,
}

/// Logging handle of one run. `Sync`: any thread may log through `&Tracker`.
/// Dropping it without [`Tracker::finish`] ends the run as FAILED.
pub struct Tracker {
    dir: PathBuf,
    tx: Option<Outbox>,
    journal: Option<JoinHandle<()>>,
    shipper: Option<JoinHandle<()>>,
    run: Arc<OnceLock<RunInfo>>,
    shared: Arc<Mutex<Shared>>,
    uri: Option<String>,
    opts: Options,
}

impl Tracker {
    /// Opens the run in `run_dir` (created if missing) with default
    /// [`Options`]. A folder that already holds a journal is resumed: the
    /// same server run continues and `spec` is ignored (see the module docs
    /// for what a resumed run logs, and for finished runs).
    pub fn start(run_dir: impl AsRef<Path>, spec: RunSpec) -> Result<Tracker> {
        Tracker::start_with(run_dir, spec, Options::default())
    }

    pub fn start_with(run_dir: impl AsRef<Path>, spec: RunSpec, opts: Options) -> Result<Tracker> {
        open(run_dir.as_ref(), spec, opts, None)
    }

    /// Opens a nested run (e.g. one trial of a sweep) under this one: it is
    /// created with `mlflow.parentRunId` once this run exists on the server,
    /// and uses this run's tracking URI unless `spec` names one.
    pub fn child(&self, run_dir: impl AsRef<Path>, mut spec: RunSpec) -> Result<Tracker> {
        if spec.tracking_uri.is_none() {
            spec.tracking_uri = self.uri.clone();
        }
        let parent = (self.dir.clone(), self.run.clone());
        open(run_dir.as_ref(), spec, self.opts.clone(), Some(parent))
    }

    pub fn param(&self, key: &str, value: impl Display) {
        self.send(Event::Param {
            key: key.to_string(),
            value: value.to_string(),
        });
    }

    pub fn tag(&self, key: &str, value: impl Display) {
        self.send(Event::Tag {
            key: key.to_string(),
            value: value.to_string(),
        });
    }

    /// One metric point; NaN and infinities are kept.
    pub fn metric(&self, key: &str, value: f64, step: i64) {
        self.send(Event::Metric {
            key: key.to_string(),
            value,
            step,
        });
    }

    /// Uploads a file (or a folder, recursively) to `dest/<its name>` in the
    /// run's artifacts (`dest` "" for the root). It is read when shipped, so
    /// it must stay in place; files inside the run folder are the safe
    /// choice.
    pub fn artifact(&self, path: impl AsRef<Path>, dest: &str) {
        let path = path.as_ref();
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        self.send(Event::Artifact {
            path,
            dest: dest.to_string(),
        });
    }

    /// Notes that the process was asked to stop: if it dies before
    /// [`Tracker::finish`], `sync` marks the run KILLED rather than FAILED.
    pub fn interrupted(&self) {
        self.send(Event::Interrupted);
    }

    pub fn run_dir(&self) -> &Path {
        &self.dir
    }

    /// The MLflow run id once the server has created the run.
    pub fn run_id(&self) -> Option<String> {
        self.run.get().map(|r| r.run_id.clone())
    }

    /// Waits (at most a few seconds) until everything logged so far is in
    /// `journal.jsonl`, for readers of the file while the run is open: the
    /// curves plotted when a run ends must hold its last epoch.
    pub fn flush(&self) {
        if let Some(tx) = &self.tx {
            let (done_tx, done_rx) = mpsc::channel();
            if tx.post(Msg::Flush(done_tx), true).is_ok() {
                let _ = done_rx.recv_timeout(JOURNAL_GRACE);
            }
        }
    }

    /// Records the final status (unless the run had finished before it was
    /// reopened: then it stays FINISHED) and gives the server at most
    /// [`Options::finish_timeout`] to take the rest (one last attempt when it
    /// is already away); whatever is left stays in the journal for `sync`.
    pub fn finish(mut self, status: RunStatus) -> FinishReport {
        self.close(status)
    }

    fn send(&self, event: Event) {
        if let Some(tx) = &self.tx {
            // The journal thread outlives every sender; a failed post means
            // it panicked, and training must go on regardless.
            let ring = matches!(event, Event::Status { .. } | Event::Interrupted);
            let _ = tx.post(Msg::Log(now_ms(), event), ring);
        }
    }

    fn close(&mut self, status: RunStatus) -> FinishReport {
        let Some(tx) = self.tx.take() else {
            return FinishReport::default();
        };
        let deadline = Instant::now() + self.opts.finish_timeout;
        let (done_tx, done_rx) = mpsc::channel();
        let _ = tx.post(Msg::Log(now_ms(), Event::Status { status }), false);
        let _ = tx.post(Msg::Close(deadline, done_tx), true);
        drop(tx);
        // The status is on disk before anything waits on the network.
        let _ = done_rx.recv_timeout(self.opts.finish_timeout + JOURNAL_GRACE);
        // A request already in flight when the deadline passes is not
        // waited for: the thread is left to end on its own timeout.
        let shipped = self
            .shipper
            .take()
            .is_none_or(|h| join_until(h, deadline + SHIP_GRACE).is_some());
        // Without the shipper's end the journal thread cannot end either
        // (it serves the shipper); the status is on disk already.
        if let Some(h) = self.journal.take()
            && shipped
        {
            join_until(h, Instant::now() + JOURNAL_GRACE);
        }
        let shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let (logged, acked) = (shared.logged, shared.acked);
        FinishReport {
            run_id: self.run_id(),
            logged,
            acked,
            error: shared.error.clone().filter(|_| acked < logged),
            rejected: shared.rejected.clone(),
        }
    }
}

/// How long `finish` waits past its deadline for the shipper's last answer.
const SHIP_GRACE: Duration = Duration::from_millis(500);
/// How long `finish` waits for local disk writes.
const JOURNAL_GRACE: Duration = Duration::from_secs(5);

/// Joins `h` if it ends before `until`; otherwise lets it run detached.
fn join_until<T>(h: JoinHandle<T>, until: Instant) -> Option<T> {
    while !h.is_finished() {
        if Instant::now() >= until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    h.join().ok()
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if self.tx.is_some() {
            self.close(RunStatus::Failed);
        }
    }
}

fn open(
    run_dir: &Path,
    spec: RunSpec,
    opts: Options,
    parent: Option<(PathBuf, Arc<OnceLock<RunInfo>>)>,
) -> Result<Tracker> {
    std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    let dir = std::fs::canonicalize(run_dir).map_err(|e| Error::io(run_dir, e))?;
    let client = match &spec.tracking_uri {
        Some(uri) => Some(Client::new(uri)?.with_timeout(opts.request_timeout)),
        None => None,
    };
    let lock = RunLock::acquire(&dir)?;
    let mut logged = Logged::default();
    let summary = Summary::scan_with(&dir, |e| {
        logged.admit(&e.event);
    })?;
    let acked = AckLog::open(&dir)?.upto();
    // Past both: entries lost with an unsynced tail must not reuse numbers
    // the server already acknowledged.
    let mut writer = JournalWriter::open(&dir, summary.last_seq.max(acked) + 1)?;
    let pid = std::process::id();
    let resumed = summary.start.is_some();
    let first = if !resumed {
        Event::Start {
            experiment: spec.experiment.clone(),
            run_name: spec.run_name.clone(),
            tags: standard_tags(spec.tags.clone()),
            parent: parent.as_ref().map(|p| p.0.clone()),
            pid,
        }
    } else {
        Event::Resume { pid }
    };
    let first = writer.append(now_ms(), first)?.seq;
    writer.sync()?;

    let run = Arc::new(OnceLock::new());
    let shared = Arc::new(Mutex::new(Shared {
        logged: first,
        acked,
        ..Shared::default()
    }));
    let (bell, rx) = mpsc::channel();
    let tx = Outbox {
        queue: Arc::new(Mutex::new(Vec::new())),
        bell,
    };
    let queue = tx.queue.clone();
    let mut shipper = None;
    let mut notify = None;
    if let Some(client) = client {
        let (ntx, nrx) = mpsc::channel();
        notify = Some(ntx);
        let record_tx = tx.clone();
        let gone = || Error::Journal {
            path: PathBuf::new(),
            reason: "journal thread is gone".into(),
        };
        let record = Box::new(move |time, event| {
            let (done_tx, done_rx) = mpsc::channel();
            record_tx
                .post(Msg::Durable(time, event, done_tx), true)
                .map_err(|_| gone())?;
            done_rx.recv().map_err(|_| gone())
        });
        let s = Shipper::new(
            &dir,
            client,
            &summary,
            run.clone(),
            parent.map(|p| p.1),
            record,
        )?;
        let (o, sh) = (opts.clone(), shared.clone());
        shipper = Some(spawn("kd-ship", move || ship_loop(s, nrx, o, sh))?);
    } else if let Some(info) = summary.run.clone() {
        let _ = run.set(info);
    }
    let sh = shared.clone();
    let journal = spawn("kd-journal", move || {
        journal_loop(writer, first, lock, (queue, rx), notify, sh, logged)
    })?;
    let tracker = Tracker {
        dir,
        tx: Some(tx),
        journal: Some(journal),
        shipper,
        run,
        shared,
        uri: spec.tracking_uri,
        opts,
    };
    // A resuming process's tags (`kd.extended`, provenance of this
    // process) are news to the run: the start event that carried them the
    // first time is not written again.
    if resumed {
        for (k, v) in &spec.tags {
            tracker.tag(k, v);
        }
    }
    Ok(tracker)
}

fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| Error::io(PathBuf::from(name), e))
}

/// The tags MLflow's own clients set, unless the caller set them.
fn standard_tags(mut tags: BTreeMap<String, String>) -> BTreeMap<String, String> {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok();
    let source = std::env::args().next().map(|a| {
        Path::new(&a)
            .file_name()
            .map_or(a.clone(), |n| n.to_string_lossy().into_owned())
    });
    let defaults = [
        ("mlflow.user", user),
        ("mlflow.source.name", source),
        ("mlflow.source.type", Some("LOCAL".to_string())),
    ];
    for (k, v) in defaults {
        if let Some(v) = v {
            tags.entry(k.to_string()).or_insert(v);
        }
    }
    tags
}

/// How often appended lines are fsynced at the latest; terminal statuses,
/// artifacts and the server run id are synced at once.
const FSYNC_EVERY: Duration = Duration::from_secs(2);

/// Owns the journal file (and the run folder's lock) until every sender,
/// the shipper's included, is gone. Drops what `logged` (all the journal
/// held when opened, and all written since) says is not new, here rather
/// than in the caller's thread: checking costs a training step nothing.
fn journal_loop(
    mut w: JournalWriter,
    mut last: u64,
    _lock: RunLock,
    (queue, bell): (Arc<Mutex<Vec<Msg>>>, Receiver<()>),
    notify: Option<Sender<Instant>>,
    shared: Arc<Mutex<Shared>>,
    mut logged: Logged,
) {
    let _drop_queued = DropQueued(queue.clone());
    let mut dirty_since: Option<Instant> = None;
    let fail = |e: Error| {
        let mut s = shared.lock().unwrap_or_else(|p| p.into_inner());
        s.error.get_or_insert_with(|| e.to_string());
    };
    loop {
        let wait = dirty_since.map_or(TICK, |t| TICK.min(FSYNC_EVERY.saturating_sub(t.elapsed())));
        let rang = bell.recv_timeout(wait);
        while bell.try_recv().is_ok() {}
        let queued = std::mem::take(&mut *queue.lock().unwrap_or_else(|p| p.into_inner()));
        let mut urgent = false;
        let mut done = false;
        let mut handle = |msg: Msg| match msg {
            Msg::Durable(time, event, done) => {
                match w.append(time, event).and_then(|e| w.sync().map(|()| e)) {
                    Ok(e) => last = e.seq,
                    Err(e) => fail(e),
                }
                let _ = done.send(());
            }
            Msg::Log(_, event) if !logged.admit(&event) => {}
            Msg::Log(time, event) => {
                urgent |= matches!(event, Event::Status { .. } | Event::Artifact { .. });
                match w.append(time, event) {
                    Ok(e) => last = e.seq,
                    Err(e) => fail(e),
                }
                dirty_since.get_or_insert_with(Instant::now);
            }
            Msg::Flush(done) => {
                if let Err(e) = w.flush() {
                    fail(e);
                }
                let _ = done.send(());
            }
            Msg::Close(deadline, done) => {
                if let Err(e) = w.sync() {
                    fail(e);
                }
                dirty_since = None;
                shared.lock().unwrap_or_else(|p| p.into_inner()).logged = last;
                // Only now is the final status visible to the shipper.
                if let Some(n) = &notify {
                    let _ = n.send(deadline);
                }
                let _ = done.send(());
            }
        };
        for m in queued {
            handle(m);
        }
        if let Err(RecvTimeoutError::Disconnected) = rang {
            urgent = true;
            done = true;
        }
        let synced = if urgent || dirty_since.is_some_and(|t| t.elapsed() >= FSYNC_EVERY) {
            dirty_since = None;
            w.sync()
        } else {
            w.flush()
        };
        if let Err(e) = synced {
            fail(e);
        }
        shared.lock().unwrap_or_else(|p| p.into_inner()).logged = last;
        if done {
            return;
        }
    }
}

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const SLICE: Duration = Duration::from_secs(2);

fn ship_loop(mut s: Shipper, rx: Receiver<Instant>, opts: Options, shared: Arc<Mutex<Shared>>) {
    let mut failing = false;
    // Failing because the server is away, not because this run's parent
    // has not reached the server yet (which a short run can outpace).
    let mut away = false;
    let mut delay = FIRST_BACKOFF;
    // (deadline, whether the server was away when asked to close)
    let mut closing: Option<(Instant, bool)> = None;
    let mut backlog = false;
    loop {
        let wait = match (failing, backlog) {
            (true, _) => delay,
            (false, true) => Duration::ZERO,
            (false, false) => opts.flush_interval,
        };
        match closing {
            None => match rx.recv_timeout(wait) {
                Ok(d) => closing = Some((d, away)),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => closing = Some((Instant::now(), true)),
            },
            Some((d, _)) if failing => {
                std::thread::sleep(wait.min(d.saturating_duration_since(Instant::now())));
            }
            Some(_) => {}
        }
        // A long backlog goes in slices, so a `finish` is heard in between.
        let result = match closing {
            Some((deadline, _)) => s.ship(Some(deadline), None),
            None => s.ship(None, Some(Instant::now() + SLICE)),
        };
        backlog = matches!(result, Ok(false));
        {
            let mut sh = shared.lock().unwrap_or_else(|p| p.into_inner());
            sh.acked = s.acked();
            sh.rejected.clone_from(&s.rejected);
            if let Err(e) = &result {
                sh.error = Some(e.to_string());
            }
        }
        match &result {
            Ok(_) => {
                (failing, away) = (false, false);
                delay = FIRST_BACKOFF;
            }
            Err(e) => {
                failing = true;
                away = !matches!(e, Error::ParentPending { .. });
                delay = (delay * 2).min(opts.max_backoff);
            }
        }
        if let Some((deadline, was_away)) = closing {
            let caught_up = result.as_ref().is_ok_and(|done| *done);
            // A server already away when training ended gets one attempt.
            let give_up = was_away && away;
            if caught_up || give_up || Instant::now() >= deadline {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Entry, JOURNAL_FILE};

    fn entries(dir: &Path) -> Vec<Entry> {
        std::fs::read_to_string(dir.join(JOURNAL_FILE))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn flush_puts_what_was_logged_in_the_journal_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tracker::start(dir.path(), RunSpec::new("e")).unwrap();
        t.metric("epoch/test_acc_top1", 50.0, 11);
        t.flush();
        // Without the flush the point waits in the queue for the next tick.
        let h = crate::metric_history(dir.path()).unwrap();
        assert_eq!(h["epoch/test_acc_top1"], [(11, 50.0)]);
        t.finish(RunStatus::Finished);
    }

    #[test]
    fn tracker_is_shared_across_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Tracker>();
    }

    #[test]
    fn journal_only_run_records_everything_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tracker::start(dir.path(), RunSpec::new("e").name("r").tag("k", "v")).unwrap();
        t.param("lr", 0.1);
        t.metric("loss", f64::NAN, 3);
        t.interrupted();
        let report = t.finish(RunStatus::Killed);
        assert_eq!((report.logged, report.acked), (5, 0));
        assert!(report.needs_sync() && report.run_id.is_none());

        let e = entries(dir.path());
        let seqs: Vec<u64> = e.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
        let Event::Start {
            experiment,
            run_name,
            tags,
            pid,
            ..
        } = &e[0].event
        else {
            panic!("{:?}", e[0]);
        };
        assert_eq!((experiment.as_str(), run_name.as_deref()), ("e", Some("r")));
        assert_eq!(tags["k"], "v");
        assert_eq!(tags["mlflow.source.type"], "LOCAL");
        assert_eq!(*pid, std::process::id());
        assert!(matches!(&e[2].event, Event::Metric { value, step: 3, .. } if value.is_nan()));
        assert_eq!(e[3].event, Event::Interrupted);
        assert_eq!(
            e[4].event,
            Event::Status {
                status: RunStatus::Killed
            }
        );
    }

    #[test]
    fn reopening_a_run_folder_resumes_its_numbering() {
        let dir = tempfile::tempdir().unwrap();
        Tracker::start(dir.path(), RunSpec::new("e"))
            .unwrap()
            .finish(RunStatus::Killed);
        let t = Tracker::start(dir.path(), RunSpec::new("ignored")).unwrap();
        assert!(matches!(
            Tracker::start(dir.path(), RunSpec::new("e")),
            Err(Error::RunLive(_))
        ));
        t.metric("m", 1.0, 0);
        drop(t); // without finish: the run failed
        let e = entries(dir.path());
        let seqs: Vec<u64> = e.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
        assert!(matches!(e[2].event, Event::Resume { .. }));
        assert_eq!(
            e[4].event,
            Event::Status {
                status: RunStatus::Failed
            }
        );
    }

    fn journaled(e: &[Entry], ev: fn(&Event) -> bool) -> Vec<&Event> {
        e.iter().map(|e| &e.event).filter(|e| ev(e)).collect()
    }

    /// A run resumed from its last checkpoint logs the steps after it again.
    #[test]
    fn reopened_run_journals_each_step_and_param_once() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tracker::start(dir.path(), RunSpec::new("e")).unwrap();
        t.param("lr", 0.1);
        for s in 0..4 {
            t.metric("loss", s as f64, s);
        }
        t.metric("loss", 9.0, 3); // twice in one process, too
        drop(t); // as if killed

        let t = Tracker::start(dir.path(), RunSpec::new("e")).unwrap();
        t.param("lr", 0.1);
        t.param("epochs", 4);
        t.param("epochs", 4);
        t.param("lr", 0.2); // the server decides: it refuses
        for s in 2..6 {
            t.metric("loss", s as f64, s);
            t.metric("acc", s as f64, s); // another key, same steps
        }
        t.finish(RunStatus::Finished);

        let e = entries(dir.path());
        let points: Vec<(&str, i64, f64)> = e
            .iter()
            .filter_map(|e| match &e.event {
                Event::Metric { key, value, step } => Some((key.as_str(), *step, *value)),
                _ => None,
            })
            .collect();
        let loss: Vec<(i64, f64)> = points
            .iter()
            .filter(|p| p.0 == "loss")
            .map(|p| (p.1, p.2))
            .collect();
        let first: Vec<(i64, f64)> = (0..6).map(|s| (s, s as f64)).collect();
        assert_eq!(loss, first, "the first point of each step");
        assert_eq!(points.iter().filter(|p| p.0 == "acc").count(), 4);
        let params: Vec<(&str, &str)> = e
            .iter()
            .filter_map(|e| match &e.event {
                Event::Param { key, value } => Some((key.as_str(), value.as_str())),
                _ => None,
            })
            .collect();
        assert_eq!(params, [("lr", "0.1"), ("epochs", "4"), ("lr", "0.2")]);
        let seqs: Vec<u64> = e.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=e.len() as u64).collect::<Vec<_>>(), "no gaps");
    }

    #[test]
    fn finished_run_keeps_its_status_when_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tracker::start(dir.path(), RunSpec::new("e")).unwrap();
        t.metric("loss", 1.0, 0);
        t.finish(RunStatus::Finished);
        assert_eq!(
            crate::journaled_status(dir.path()).unwrap(),
            Some(RunStatus::Finished)
        );

        let t = Tracker::start(dir.path(), RunSpec::new("e")).unwrap();
        t.metric("loss", 0.5, 1); // appending is allowed
        drop(t); // would be FAILED
        let t = Tracker::start(dir.path(), RunSpec::new("e")).unwrap();
        t.interrupted();
        t.finish(RunStatus::Killed);

        let e = entries(dir.path());
        let statuses = journaled(&e, |e| matches!(e, Event::Status { .. }));
        assert_eq!(
            statuses,
            [&Event::Status {
                status: RunStatus::Finished
            }]
        );
        assert_eq!(
            journaled(&e, |e| matches!(e, Event::Resume { .. })).len(),
            2
        );
        assert_eq!(
            journaled(&e, |e| matches!(e, Event::Metric { .. })).len(),
            2
        );
        assert_eq!(
            crate::journaled_status(dir.path()).unwrap(),
            Some(RunStatus::Finished)
        );
    }

    #[test]
    fn journaled_status_of_failed_resumed_and_missing_runs() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(crate::journaled_status(dir.path()).unwrap(), None);
        assert_eq!(
            crate::journaled_status(&dir.path().join("missing")).unwrap(),
            None
        );
        let t = Tracker::start(dir.path(), RunSpec::new("e")).unwrap();
        t.finish(RunStatus::Failed);
        assert_eq!(
            crate::journaled_status(dir.path()).unwrap(),
            Some(RunStatus::Failed)
        );
        // A failed run that is resumed is live again, then ends anew.
        let t = Tracker::start(dir.path(), RunSpec::new("e")).unwrap();
        assert_eq!(crate::journaled_status(dir.path()).unwrap(), None);
        t.finish(RunStatus::Finished);
        assert_eq!(
            crate::journaled_status(dir.path()).unwrap(),
            Some(RunStatus::Finished)
        );
    }

    /// A server that accepts connections and never answers: the worst case
    /// for `finish`, worse than one that is down.
    #[test]
    fn finish_is_bounded_when_the_server_hangs() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let uri = format!("http://{}", listener.local_addr().unwrap());
        let hold = std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming().take(8) {
                held.push(conn);
            }
            std::thread::sleep(Duration::from_secs(40));
        });
        let dir = tempfile::tempdir().unwrap();
        let opts = Options {
            flush_interval: Duration::from_millis(50),
            finish_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(30),
            max_backoff: Duration::from_secs(1),
        };
        let t = Tracker::start_with(dir.path(), RunSpec::new("e").tracking_uri(Some(uri)), opts)
            .unwrap();
        for s in 0..10 {
            t.metric("m", s as f64, s);
        }
        std::thread::sleep(Duration::from_millis(300)); // a request is in flight
        let started = Instant::now();
        let report = t.finish(RunStatus::Finished);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert!(report.needs_sync(), "{report:?}");
        assert_eq!(report.logged, 12);
        let last = entries(dir.path()).pop().unwrap();
        assert_eq!(
            last.event,
            Event::Status {
                status: RunStatus::Finished
            }
        );
        drop(hold); // detached; the test binary's exit ends it
    }
}
