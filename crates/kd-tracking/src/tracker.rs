//! The handle the training loop logs through.
//!
//! Each call only timestamps the event and puts it on a channel, so a slow or
//! absent server never stalls a training step. Two background threads do the
//! rest: the journal thread appends every event to the run folder's journal
//! (the record that survives anything), and the shipper thread tails that
//! journal and sends it to MLflow in batches, retrying with backoff while the
//! server is away.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::client::{Client, RunInfo, RunStatus};
use crate::error::{Error, Result};
use crate::journal::{AckLog, Event, JournalWriter, RunLock, Summary, now_ms};
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
            request_timeout: Duration::from_secs(10),
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
    Close(Instant),
}

#[derive(Default)]
struct Shared {
    acked: u64,
    error: Option<String>,
    rejected: Vec<String>,
}

/// Logging handle of one run. `Sync`: any thread may log through `&Tracker`.
/// Dropping it without [`Tracker::finish`] ends the run as FAILED.
pub struct Tracker {
    dir: PathBuf,
    tx: Option<Sender<Msg>>,
    journal: Option<JoinHandle<u64>>,
    shipper: Option<JoinHandle<()>>,
    run: Arc<OnceLock<RunInfo>>,
    shared: Arc<Mutex<Shared>>,
    uri: Option<String>,
    opts: Options,
}

impl Tracker {
    /// Opens the run in `run_dir` (created if missing) with default
    /// [`Options`]. A folder that already holds a journal is resumed: the
    /// same server run continues and `spec` is ignored.
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

    /// Uploads a file (or a folder, recursively) under `dest` in the run's
    /// artifacts ("" for the root). The file is read when shipped, so it must
    /// stay in place; files inside the run folder are the safe choice.
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

    /// Records the final status and gives the server at most
    /// [`Options::finish_timeout`] to take the rest (one last attempt when it
    /// is already away); whatever is left stays in the journal for `sync`.
    pub fn finish(mut self, status: RunStatus) -> FinishReport {
        self.close(status)
    }

    fn send(&self, event: Event) {
        if let Some(tx) = &self.tx {
            // The journal thread outlives every sender; a failed send means
            // it panicked, and training must go on regardless.
            let _ = tx.send(Msg::Log(now_ms(), event));
        }
    }

    fn close(&mut self, status: RunStatus) -> FinishReport {
        let Some(tx) = self.tx.take() else {
            return FinishReport::default();
        };
        let deadline = Instant::now() + self.opts.finish_timeout;
        let _ = tx.send(Msg::Log(now_ms(), Event::Status { status }));
        let _ = tx.send(Msg::Close(deadline));
        drop(tx);
        if let Some(h) = self.shipper.take() {
            let _ = h.join();
        }
        let logged = self.journal.take().and_then(|h| h.join().ok()).unwrap_or(0);
        let shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let acked = shared.acked;
        FinishReport {
            run_id: self.run_id(),
            logged,
            acked,
            error: shared.error.clone().filter(|_| acked < logged),
            rejected: shared.rejected.clone(),
        }
    }
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
    let summary = Summary::scan(&dir)?;
    let acked = AckLog::open(&dir)?.upto();
    // Past both: entries lost with an unsynced tail must not reuse numbers
    // the server already acknowledged.
    let mut writer = JournalWriter::open(&dir, summary.last_seq.max(acked) + 1)?;
    let pid = std::process::id();
    let first = if summary.start.is_none() {
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
    writer.append(now_ms(), first)?;
    writer.sync()?;

    let run = Arc::new(OnceLock::new());
    let shared = Arc::new(Mutex::new(Shared {
        acked,
        ..Shared::default()
    }));
    let (tx, rx) = mpsc::channel();
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
                .send(Msg::Durable(time, event, done_tx))
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
        journal_loop(writer, lock, rx, notify, sh)
    })?;
    Ok(Tracker {
        dir,
        tx: Some(tx),
        journal: Some(journal),
        shipper,
        run,
        shared,
        uri: spec.tracking_uri,
        opts,
    })
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
/// the shipper's included, is gone. Returns the last `seq` written.
fn journal_loop(
    mut w: JournalWriter,
    _lock: RunLock,
    rx: Receiver<Msg>,
    notify: Option<Sender<Instant>>,
    shared: Arc<Mutex<Shared>>,
) -> u64 {
    let mut last = 0;
    let mut dirty_since: Option<Instant> = None;
    let fail = |e: Error| {
        let mut s = shared.lock().unwrap_or_else(|p| p.into_inner());
        s.error.get_or_insert_with(|| e.to_string());
    };
    loop {
        let first = match dirty_since {
            Some(t) => rx.recv_timeout(FSYNC_EVERY.saturating_sub(t.elapsed())),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        let mut urgent = false;
        let mut done = false;
        let mut handle = |msg: std::result::Result<Msg, RecvTimeoutError>| match msg {
            Ok(Msg::Durable(time, event, done)) => {
                match w.append(time, event).and_then(|e| w.sync().map(|()| e)) {
                    Ok(e) => last = e.seq,
                    Err(e) => fail(e),
                }
                let _ = done.send(());
            }
            Ok(Msg::Log(time, event)) => {
                urgent |= matches!(event, Event::Status { .. } | Event::Artifact { .. });
                match w.append(time, event) {
                    Ok(e) => last = e.seq,
                    Err(e) => fail(e),
                }
                dirty_since.get_or_insert_with(Instant::now);
            }
            Ok(Msg::Close(deadline)) => {
                if let Err(e) = w.sync() {
                    fail(e);
                }
                dirty_since = None;
                // Only now is the final status visible to the shipper.
                if let Some(n) = &notify {
                    let _ = n.send(deadline);
                }
            }
            Err(RecvTimeoutError::Timeout) => urgent = true,
            Err(RecvTimeoutError::Disconnected) => {
                urgent = true;
                done = true;
            }
        };
        handle(first);
        while let Ok(m) = rx.try_recv() {
            handle(Ok(m));
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
        if done {
            return last;
        }
    }
}

const FIRST_BACKOFF: Duration = Duration::from_millis(500);

fn ship_loop(mut s: Shipper, rx: Receiver<Instant>, opts: Options, shared: Arc<Mutex<Shared>>) {
    let mut failing = false;
    let mut delay = FIRST_BACKOFF;
    // (deadline, whether the server was already failing when asked to close)
    let mut closing: Option<(Instant, bool)> = None;
    loop {
        let wait = if failing { delay } else { opts.flush_interval };
        match closing {
            None => match rx.recv_timeout(wait) {
                Ok(d) => closing = Some((d, failing)),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => closing = Some((Instant::now(), true)),
            },
            Some((d, _)) if failing => {
                std::thread::sleep(wait.min(d.saturating_duration_since(Instant::now())));
            }
            Some(_) => {}
        }
        let result = s.ship(closing.map(|c| c.0));
        {
            let mut sh = shared.lock().unwrap_or_else(|p| p.into_inner());
            sh.acked = s.acked();
            sh.rejected.clone_from(&s.rejected);
            if let Err(e) = &result {
                sh.error = Some(e.to_string());
            }
        }
        match result {
            Ok(_) => {
                failing = false;
                delay = FIRST_BACKOFF;
            }
            Err(_) => {
                failing = true;
                delay = (delay * 2).min(opts.max_backoff);
            }
        }
        if let Some((deadline, gave_up)) = closing {
            let caught_up = result.as_ref().is_ok_and(|done| *done);
            if caught_up || gave_up || Instant::now() >= deadline {
                return;
            }
        }
    }
}
