//! The run folder's record of everything a run logged, and of what the server
//! has acknowledged.
//!
//! Files in a run folder:
//! - `journal.jsonl`: one JSON object per line, append-only, each with a
//!   sequence number `seq` (1, 2, ...), the time it was logged `time` (ms
//!   since the epoch) and the event under `ev`, e.g.
//!   `{"seq":7,"time":1712345678901,"ev":"metric","key":"train/loss","value":0.53,"step":300}`.
//!   The first entry is `start` (experiment, run name, tags, parent run
//!   folder, pid); `run_created` records the server's run id once known.
//! - `acked.jsonl`: lines `{"upto":N}`: every entry with `seq <= N` has been
//!   handled by the server (or, with a `"rejected"` reason beside it,
//!   refused for good and not to be retried).
//! - `.lock`: held (advisory lock) by the process that writes the journal,
//!   so `sync` can tell a live run from a dead one even when pids are reused.
//!
//! The journal is the truth; the server is a copy that may lag behind.
//!
//! What a journal means, not just what it holds:
//! - **A step once.** The first point of a metric key at a step is the one
//!   that counts; a later point at the same key and step (a resumed run
//!   replaying the steps after its last checkpoint) is not journaled, and one
//!   already in a journal from older versions is not shipped. A param
//!   repeated with the value it already has is dropped the same way.
//! - **FINISHED is final.** Once a journal holds a FINISHED status, no later
//!   status counts and a `resume` does not make the run RUNNING again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::client::{RunInfo, RunStatus};
use crate::error::{Error, Result};

pub const JOURNAL_FILE: &str = "journal.jsonl";
pub const ACK_FILE: &str = "acked.jsonl";
pub const LOCK_FILE: &str = ".lock";

/// One journal line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    /// When the call was made, ms since the Unix epoch.
    pub time: i64,
    #[serde(flatten)]
    pub event: Event,
}

/// What happened. Events that the server never sees (`start`, `resume` as
/// far as logging goes, `run_created`, `interrupted`) are acknowledged
/// together with their neighbours.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Event {
    Start {
        experiment: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        run_name: Option<String>,
        #[serde(default)]
        tags: BTreeMap<String, String>,
        /// The parent run's folder (nested runs); its id comes from its own
        /// journal once the server has created it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parent: Option<PathBuf>,
        pid: u32,
    },
    /// A later process took the run over (resumed training).
    Resume {
        pid: u32,
    },
    RunCreated(RunInfo),
    Param {
        key: String,
        value: String,
    },
    Tag {
        key: String,
        value: String,
    },
    Metric {
        key: String,
        #[serde(with = "float")]
        value: f64,
        step: i64,
    },
    /// A local file or folder to upload under `dest` (relative to the run's
    /// artifact root, "" for the root). It is read when shipped.
    Artifact {
        path: PathBuf,
        dest: String,
    },
    /// The process was asked to stop (Ctrl-C): if it dies before a status,
    /// the run was killed rather than failed.
    Interrupted,
    Status {
        status: RunStatus,
    },
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// JSON has no NaN or infinity; spell them as proto3 JSON does.
mod float {
    use serde::{Deserializer, Serializer, de};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else if v.is_nan() {
            s.serialize_str("NaN")
        } else if *v > 0.0 {
            s.serialize_str("Infinity")
        } else {
            s.serialize_str("-Infinity")
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = f64;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number, \"NaN\", \"Infinity\" or \"-Infinity\"")
            }
            fn visit_f64<E>(self, v: f64) -> Result<f64, E> {
                Ok(v)
            }
            fn visit_i64<E>(self, v: i64) -> Result<f64, E> {
                Ok(v as f64)
            }
            fn visit_u64<E>(self, v: u64) -> Result<f64, E> {
                Ok(v as f64)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<f64, E> {
                match v {
                    "NaN" => Ok(f64::NAN),
                    "Infinity" => Ok(f64::INFINITY),
                    "-Infinity" => Ok(f64::NEG_INFINITY),
                    _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Appends entries; only the holder of the run folder's lock owns one.
pub(crate) struct JournalWriter {
    path: PathBuf,
    out: BufWriter<File>,
    next_seq: u64,
}

impl JournalWriter {
    /// Opens for appending; entries get numbers from `next_seq` on. A line
    /// torn by a crash is cut off first, so the next entry starts on a line
    /// of its own.
    pub(crate) fn open(dir: &Path, next_seq: u64) -> Result<JournalWriter> {
        let path = dir.join(JOURNAL_FILE);
        let io = |e| Error::io(&path, e);
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len > 0 {
            let keep = complete_prefix_len(&mut file, len).map_err(io)?;
            if keep < len {
                file.set_len(keep).map_err(io)?;
            }
        }
        Ok(JournalWriter {
            out: BufWriter::new(file),
            path,
            next_seq,
        })
    }

    pub(crate) fn append(&mut self, time: i64, event: Event) -> Result<Entry> {
        let entry = Entry {
            seq: self.next_seq,
            time,
            event,
        };
        let mut line = serde_json::to_vec(&entry).map_err(|e| Error::Journal {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        line.push(b'\n');
        self.out
            .write_all(&line)
            .map_err(|e| Error::io(&self.path, e))?;
        self.next_seq += 1;
        Ok(entry)
    }

    /// Hands buffered lines to the OS: other readers see them, and they
    /// survive a crash of this process (not of the machine).
    pub(crate) fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| Error::io(&self.path, e))
    }

    /// Flush and fsync: survives power loss too.
    pub(crate) fn sync(&mut self) -> Result<()> {
        self.flush()?;
        self.out
            .get_ref()
            .sync_data()
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// Length of the file up to and including its last newline.
fn complete_prefix_len(file: &mut File, len: u64) -> std::io::Result<u64> {
    let mut pos = len;
    let mut buf = [0u8; 4096];
    while pos > 0 {
        let n = buf.len().min(pos as usize);
        pos -= n as u64;
        file.seek(SeekFrom::Start(pos))?;
        file.read_exact(&mut buf[..n])?;
        if let Some(i) = buf[..n].iter().rposition(|&b| b == b'\n') {
            return Ok(pos + i as u64 + 1);
        }
    }
    Ok(0)
}

/// Reads a journal that may still be growing: only complete lines, picking
/// up where the last call stopped.
pub(crate) struct JournalReader {
    path: PathBuf,
    offset: u64,
    pub(crate) bad_lines: usize,
}

impl JournalReader {
    pub(crate) fn new(dir: &Path) -> JournalReader {
        JournalReader {
            path: dir.join(JOURNAL_FILE),
            offset: 0,
            bad_lines: 0,
        }
    }

    /// Feeds up to `max` further entries to `each`; returns how many. A line
    /// that does not parse is counted in `bad_lines` and skipped: one damaged
    /// line must not block the rest of a run forever.
    pub(crate) fn read(&mut self, max: usize, mut each: impl FnMut(Entry)) -> Result<usize> {
        let io = |e| Error::io(&self.path, e);
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io(e)),
        };
        file.seek(SeekFrom::Start(self.offset)).map_err(io)?;
        let mut reader = BufReader::new(file);
        let mut line = Vec::new();
        let mut n = 0;
        while n < max {
            line.clear();
            let got = reader.read_until(b'\n', &mut line).map_err(io)?;
            if got == 0 || line.last() != Some(&b'\n') {
                break; // end, or a line still being written
            }
            self.offset += got as u64;
            match serde_json::from_slice::<Entry>(&line) {
                Ok(entry) => {
                    each(entry);
                    n += 1;
                }
                Err(_) => self.bad_lines += 1,
            }
        }
        Ok(n)
    }
}

/// What a run has already given the server, read in journal order, so that
/// giving it again adds nothing.
///
/// MLflow keeps every metric point it is sent, so a step sent twice shows
/// twice; the first point of a key at a step wins. MLflow refuses a param
/// sent again with another value, and takes the same value as a no-op: the
/// first value is the one the server holds.
#[derive(Debug, Default)]
pub(crate) struct Logged {
    /// Steps per metric key: one string per key, not per point, because a
    /// long run holds hundreds of thousands of points.
    steps: HashMap<String, HashSet<i64>>,
    params: HashMap<String, String>,
    finished: bool,
}

impl Logged {
    /// Whether `event`, coming next in the journal, tells the server
    /// something new; notes it if so. `false` for a metric at a key and step
    /// already logged, a param with the value it already has, and any status
    /// or `resume` after FINISHED (a finished run's status never changes).
    pub(crate) fn admit(&mut self, event: &Event) -> bool {
        match event {
            Event::Metric { key, step, .. } => match self.steps.get_mut(key.as_str()) {
                Some(steps) => steps.insert(*step),
                None => {
                    self.steps.insert(key.clone(), HashSet::from([*step]));
                    true
                }
            },
            // Another value goes on: the server refuses it with a reason the
            // caller gets to see, rather than it vanishing here.
            Event::Param { key, value } => match self.params.get(key.as_str()) {
                Some(first) => first != value,
                None => {
                    self.params.insert(key.clone(), value.clone());
                    true
                }
            },
            Event::Resume { .. } => !self.finished,
            Event::Status { status } => {
                if self.finished {
                    return false;
                }
                self.finished = *status == RunStatus::Finished;
                true
            }
            _ => true,
        }
    }
}

/// What a whole journal says about its run.
#[derive(Debug, Default, Clone)]
pub(crate) struct Summary {
    pub start: Option<Entry>,
    pub run: Option<RunInfo>,
    /// FINISHED once journaled, whatever follows; otherwise the last status
    /// not followed by a `resume`.
    pub terminal: Option<RunStatus>,
    pub interrupted: bool,
    pub pid: Option<u32>,
    pub last_seq: u64,
    pub last_time: Option<i64>,
}

impl Summary {
    pub(crate) fn scan(dir: &Path) -> Result<Summary> {
        Summary::scan_with(dir, |_| {})
    }

    /// Also shows every entry to `each`, in order: one pass over the journal
    /// for a caller that needs more than the summary.
    pub(crate) fn scan_with(dir: &Path, mut each: impl FnMut(&Entry)) -> Result<Summary> {
        let mut s = Summary::default();
        let mut reader = JournalReader::new(dir);
        while reader.read(4096, |e| {
            each(&e);
            s.note(e);
        })? > 0
        {}
        Ok(s)
    }

    fn finished(&self) -> bool {
        self.terminal == Some(RunStatus::Finished)
    }

    fn note(&mut self, e: Entry) {
        self.last_seq = self.last_seq.max(e.seq);
        self.last_time = Some(e.time);
        match &e.event {
            Event::Start { pid, .. } => {
                self.pid = Some(*pid);
                if self.start.is_none() {
                    self.start = Some(e.clone());
                }
            }
            Event::Resume { pid } => {
                self.pid = Some(*pid);
                if !self.finished() {
                    self.terminal = None;
                    self.interrupted = false;
                }
            }
            Event::RunCreated(info) => self.run = Some(info.clone()),
            Event::Interrupted => self.interrupted = true,
            Event::Status { status } if !self.finished() => self.terminal = Some(*status),
            _ => {}
        }
    }
}

/// The acknowledgement watermark and its file.
pub(crate) struct AckLog {
    path: PathBuf,
    file: Option<File>,
    upto: u64,
    /// The file ends in a line torn by a crash: start ours on a fresh line.
    torn: bool,
}

#[derive(Serialize, Deserialize)]
struct AckLine {
    upto: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rejected: Option<String>,
}

impl AckLog {
    pub(crate) fn open(dir: &Path) -> Result<AckLog> {
        let path = dir.join(ACK_FILE);
        let mut upto = 0;
        let mut torn = false;
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                torn = !text.is_empty() && !text.ends_with('\n');
                // A torn last line is simply not an acknowledgement.
                for line in text.lines() {
                    if let Ok(a) = serde_json::from_str::<AckLine>(line) {
                        upto = upto.max(a.upto);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&path, e)),
        }
        Ok(AckLog {
            path,
            file: None,
            upto,
            torn,
        })
    }

    pub(crate) fn upto(&self) -> u64 {
        self.upto
    }

    /// Records that every entry up to `upto` is done, durably: an entry
    /// acknowledged here is never sent again.
    pub(crate) fn ack(&mut self, upto: u64, rejected: Option<String>) -> Result<()> {
        if upto <= self.upto && rejected.is_none() {
            return Ok(());
        }
        let io = |e| Error::io(&self.path, e);
        if self.file.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(io)?;
            self.file = Some(f);
        }
        let file = self.file.as_mut().expect("opened above");
        let mut line = Vec::new();
        if std::mem::take(&mut self.torn) {
            line.push(b'\n');
        }
        serde_json::to_writer(&mut line, &AckLine { upto, rejected }).expect("plain struct");
        line.push(b'\n');
        file.write_all(&line).map_err(io)?;
        file.sync_data().map_err(io)?;
        self.upto = self.upto.max(upto);
        Ok(())
    }
}

/// Exclusive hold on a run folder for as long as it lives.
pub(crate) struct RunLock {
    _file: File,
}

impl RunLock {
    pub(crate) fn acquire(dir: &Path) -> Result<RunLock> {
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => Ok(RunLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(Error::RunLive(dir.to_path_buf())),
            Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&path, e)),
        }
    }
}

/// The status a run folder's journal gives its run: FINISHED for good once
/// journaled, otherwise the last status not followed by a resume. `None`
/// when the folder holds no journal, or its run has no status yet (it is
/// live, or its process died and `sync` has not closed it since).
pub fn journaled_status(run_dir: &Path) -> Result<Option<RunStatus>> {
    Ok(Summary::scan(run_dir)?.terminal)
}

/// What tells a run from every other, read from its folder: the journal's
/// first entry (`start`: experiment, run name, process id, time in ms),
/// which resumes and syncs never rewrite, so every copy of the folder has
/// the same identity and no other run has it. `None` when the folder holds
/// no journal or its first line is not a start.
pub fn run_identity(run_dir: &Path) -> Result<Option<String>> {
    let mut first = None;
    JournalReader::new(run_dir).read(1, |e| first = Some(e))?;
    Ok(first.and_then(|e| match e.event {
        Event::Start {
            experiment,
            run_name,
            pid,
            ..
        } => Some(format!(
            "{experiment}/{} pid {pid} at {} ms",
            run_name.unwrap_or_default(),
            e.time
        )),
        _ => None,
    }))
}

/// Every metric point of a run, by key, in logging order, read from its
/// journal (no server needed): the first point of each key and step, as
/// MLflow gets them.
pub fn metric_history(run_dir: &Path) -> Result<BTreeMap<String, Vec<(i64, f64)>>> {
    let mut out: BTreeMap<String, Vec<(i64, f64)>> = BTreeMap::new();
    let mut logged = Logged::default();
    let mut reader = JournalReader::new(run_dir);
    while reader.read(4096, |e| {
        if !logged.admit(&e.event) {
            return;
        }
        if let Event::Metric { key, value, step } = e.event {
            out.entry(key).or_default().push((step, value));
        }
    })? > 0
    {}
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_including_non_finite_values() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = JournalWriter::open(dir.path(), 1).unwrap();
        let values = [0.5, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 3.0];
        for (i, v) in values.iter().enumerate() {
            let ev = Event::Metric {
                key: "loss".into(),
                value: *v,
                step: i as i64,
            };
            w.append(100 + i as i64, ev).unwrap();
        }
        w.append(
            200,
            Event::Status {
                status: RunStatus::Finished,
            },
        )
        .unwrap();
        w.flush().unwrap();
        let text = std::fs::read_to_string(dir.path().join(JOURNAL_FILE)).unwrap();
        assert!(text.lines().nth(1).unwrap().contains(r#""value":"NaN""#));
        assert!(
            text.lines()
                .last()
                .unwrap()
                .contains(r#""status":"FINISHED""#)
        );

        let h = metric_history(dir.path()).unwrap();
        let got: Vec<f64> = h["loss"].iter().map(|p| p.1).collect();
        assert_eq!(got[0], 0.5);
        assert!(got[1].is_nan());
        assert_eq!(&got[2..], &values[2..]);
        let s = Summary::scan(dir.path()).unwrap();
        assert_eq!((s.last_seq, s.terminal), (6, Some(RunStatus::Finished)));
    }

    #[test]
    fn a_run_keeps_its_identity_in_copies_and_resumes_and_shares_it_with_no_other() {
        let start = |dir: &Path, time: i64| {
            let mut w = JournalWriter::open(dir, 1).unwrap();
            let ev = Event::Start {
                experiment: "kd".into(),
                run_name: Some("st_s0".into()),
                tags: BTreeMap::new(),
                parent: None,
                pid: 7,
            };
            w.append(time, ev).unwrap();
            w.flush().unwrap();
            w
        };
        let (a, b, copy) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        assert_eq!(run_identity(a.path()).unwrap(), None, "no journal yet");
        let mut w = start(a.path(), 1000);
        // Another run of the same name by the same process, a moment later.
        start(b.path(), 1001);
        let id = run_identity(a.path())
            .unwrap()
            .expect("a journal with a start");
        assert_ne!(Some(&id), run_identity(b.path()).unwrap().as_ref());
        w.append(5000, Event::Resume { pid: 8 }).unwrap();
        w.flush().unwrap();
        std::fs::copy(a.path().join(JOURNAL_FILE), copy.path().join(JOURNAL_FILE)).unwrap();
        assert_eq!(run_identity(a.path()).unwrap().as_ref(), Some(&id));
        assert_eq!(run_identity(copy.path()).unwrap(), Some(id));
    }

    #[test]
    fn logged_admits_each_step_and_param_value_once_and_nothing_after_finished() {
        let metric = |key: &str, step| Event::Metric {
            key: key.into(),
            value: 0.0,
            step,
        };
        let param = |value: &str| Event::Param {
            key: "lr".into(),
            value: value.into(),
        };
        let status = |status| Event::Status { status };
        let mut l = Logged::default();
        let got: Vec<bool> = [
            metric("a", 0),
            metric("a", 1),
            metric("b", 0),
            metric("a", 0),
            param("0.1"),
            param("0.1"),
            param("0.2"),
            param("0.2"),
            status(RunStatus::Failed),
            Event::Resume { pid: 1 },
            status(RunStatus::Finished),
            Event::Resume { pid: 1 },
            status(RunStatus::Failed),
            status(RunStatus::Finished),
            metric("a", 2),
            Event::Tag {
                key: "t".into(),
                value: "v".into(),
            },
        ]
        .iter()
        .map(|e| l.admit(e))
        .collect();
        let want = [
            true, true, true, false, // metrics
            true, false, true, true, // params: another value is the server's call
            true, true, true, false, false, false, // statuses
            true, true,
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn history_and_summary_read_duplicates_and_late_statuses_as_mlflow_gets_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = JournalWriter::open(dir.path(), 1).unwrap();
        let metric = |step, value| Event::Metric {
            key: "m".into(),
            value,
            step,
        };
        for ev in [
            metric(0, 1.0),
            metric(1, 2.0),
            Event::Status {
                status: RunStatus::Finished,
            },
            Event::Resume { pid: 1 },
            metric(1, 5.0),
            metric(2, 3.0),
            Event::Status {
                status: RunStatus::Failed,
            },
        ] {
            w.append(0, ev).unwrap();
        }
        w.flush().unwrap();
        let h = metric_history(dir.path()).unwrap();
        assert_eq!(h["m"], [(0, 1.0), (1, 2.0), (2, 3.0)]);
        let s = Summary::scan(dir.path()).unwrap();
        assert_eq!(s.terminal, Some(RunStatus::Finished));
        assert_eq!(s.last_seq, 7);
    }

    #[test]
    fn metric_values_come_back_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = JournalWriter::open(dir.path(), 1).unwrap();
        let value = |s: i64| (s as f64).sqrt() - 3.0 + 1e-9 * s as f64;
        for s in 0..5000 {
            let ev = Event::Metric {
                key: "m".into(),
                value: value(s),
                step: s,
            };
            w.append(0, ev).unwrap();
        }
        w.flush().unwrap();
        let h = metric_history(dir.path()).unwrap();
        for &(s, v) in &h["m"] {
            assert_eq!(v.to_bits(), value(s).to_bits(), "step {s}");
        }
    }

    #[test]
    fn reader_waits_for_complete_lines_and_writer_cuts_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        std::fs::write(
            &path,
            "{\"seq\":1,\"time\":1,\"ev\":\"interrupted\"}\n{\"seq\":2,\"ti",
        )
        .unwrap();
        let mut r = JournalReader::new(dir.path());
        let mut seen = vec![];
        assert_eq!(r.read(10, |e| seen.push(e.seq)).unwrap(), 1);
        assert_eq!(seen, [1]);

        let mut w = JournalWriter::open(dir.path(), 2).unwrap();
        w.append(5, Event::Interrupted).unwrap();
        w.flush().unwrap();
        assert_eq!(r.read(10, |e| seen.push(e.seq)).unwrap(), 1);
        assert_eq!(seen, [1, 2]);
        assert_eq!(r.bad_lines, 0);
    }

    #[test]
    fn acks_survive_reopen_and_ignore_torn_lines() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = AckLog::open(dir.path()).unwrap();
        a.ack(5, None).unwrap();
        a.ack(9, Some("INVALID_PARAMETER_VALUE: x".into())).unwrap();
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(ACK_FILE))
            .unwrap();
        f.write_all(b"{\"upto\":4").unwrap();
        let mut a = AckLog::open(dir.path()).unwrap();
        assert_eq!(a.upto(), 9);
        a.ack(12, None).unwrap();
        assert_eq!(AckLog::open(dir.path()).unwrap().upto(), 12);
    }

    #[test]
    fn second_lock_on_a_run_folder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let held = RunLock::acquire(dir.path()).unwrap();
        assert!(matches!(
            RunLock::acquire(dir.path()),
            Err(Error::RunLive(_))
        ));
        drop(held);
        RunLock::acquire(dir.path()).unwrap();
    }
}
