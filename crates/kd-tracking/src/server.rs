//! `kd mlflow up | down | status`: a local MLflow server for a runs folder.
//!
//! It is the real `mlflow server` from the project's virtualenv, with its
//! SQLite store and artifact folder under `<runs_root>/mlflow/`, bound to
//! loopback and proxying artifacts (`--serve-artifacts`), which is what the
//! tracker's uploads go through. Its pid and address are kept in
//! `<runs_root>/mlflow/server.json`, which is also how `resolve_uri` finds it.
//! It runs in a process group of its own: Ctrl-C in the terminal that
//! started it does not reach it, and `down` stops the server together with
//! the workers it forks.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::client::Client;
use crate::error::{Error, Result};

/// MLflow's own default port, used when free.
pub const DEFAULT_PORT: u16 = 5000;
/// Cold start (imports, database migrations) takes 20 s on a busy laptop.
const START_TIMEOUT: Duration = Duration::from_secs(180);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// A running local server, as recorded in its state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    pub pid: u32,
    /// The tracking URI and UI address, `http://127.0.0.1:<port>`.
    pub url: String,
    pub port: u16,
    /// `<runs_root>/mlflow`: database, artifacts, `server.log`.
    pub home: PathBuf,
}

/// Where `up` records the server: `<runs_root>/mlflow/server.json`.
pub fn state_file(runs_root: &Path) -> PathBuf {
    runs_root.join("mlflow").join("server.json")
}

/// Starts the server for `runs_root` on `port` (default: 5000 if free, else
/// any free port) and waits until it answers. If one is already running for
/// this runs folder, returns it instead.
pub fn up(runs_root: &Path, port: Option<u16>) -> Result<ServerInfo> {
    if let Some(info) = status(runs_root)? {
        return Ok(info);
    }
    let mlflow = ensure_mlflow()?;
    let home = runs_root.join("mlflow");
    std::fs::create_dir_all(home.join("artifacts")).map_err(|e| Error::io(&home, e))?;
    let home = std::fs::canonicalize(&home).map_err(|e| Error::io(&home, e))?;
    let port = choose_port(port)?;
    let info = launch(&mlflow, &home, port)?;
    let state = state_file(runs_root);
    let text = serde_json::to_string_pretty(&info).expect("plain struct");
    std::fs::write(&state, text).map_err(|e| Error::io(&state, e))?;
    eprintln!("MLflow UI: {}", info.url);
    Ok(info)
}

/// Stops the server recorded for `runs_root`, if any, and forgets it.
pub fn down(runs_root: &Path) -> Result<Option<ServerInfo>> {
    let Some(info) = read_state(runs_root)? else {
        return Ok(None);
    };
    let alive = proc::alive(info.pid);
    if alive {
        stop_group(info.pid)?;
    }
    let state = state_file(runs_root);
    std::fs::remove_file(&state).map_err(|e| Error::io(&state, e))?;
    Ok(alive.then_some(info))
}

/// The server recorded for `runs_root` if its process is still alive.
pub fn status(runs_root: &Path) -> Result<Option<ServerInfo>> {
    Ok(read_state(runs_root)?.filter(|i| proc::alive(i.pid)))
}

fn read_state(runs_root: &Path) -> Result<Option<ServerInfo>> {
    let path = state_file(runs_root);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::ServerProcess(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&path, e)),
    }
}

/// The `mlflow` executable of the project's virtualenv, if installed.
pub fn mlflow_executable() -> Option<PathBuf> {
    let mut venvs = Vec::new();
    if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
        venvs.push(PathBuf::from(v));
    }
    if let Some(c) = std::env::var_os("KD_CACHE") {
        venvs.push(PathBuf::from(c).join("venv"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        venvs.push(PathBuf::from(h).join(".cache/kd/venv"));
    }
    venvs
        .into_iter()
        .map(|v| v.join("bin").join("mlflow"))
        .find(|p| p.is_file())
}

/// Installs MLflow with the project's bootstrap script when missing.
fn ensure_mlflow() -> Result<PathBuf> {
    if let Some(p) = mlflow_executable() {
        return Ok(p);
    }
    let script = bootstrap_script().ok_or_else(|| {
        Error::ServerProcess("mlflow is not installed and scripts/bootstrap was not found".into())
    })?;
    eprintln!("mlflow missing: running {}", script.display());
    let root = script
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."));
    let ok = Command::new("bash")
        .arg(&script)
        .current_dir(root)
        .status()
        .map_err(|e| Error::io(&script, e))?
        .success();
    match mlflow_executable() {
        Some(p) if ok => Ok(p),
        _ => Err(Error::ServerProcess(format!(
            "{} did not install mlflow",
            script.display()
        ))),
    }
}

fn bootstrap_script() -> Option<PathBuf> {
    let from_cwd = std::env::current_dir().ok().and_then(|cwd| {
        cwd.ancestors()
            .map(|d| d.join("scripts/bootstrap"))
            .find(|p| p.is_file())
    });
    // Built from this checkout: the script sits two levels above the crate.
    let from_build = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bootstrap");
    from_cwd.or_else(|| from_build.is_file().then_some(from_build))
}

fn choose_port(port: Option<u16>) -> Result<u16> {
    let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).ok();
    match port {
        Some(p) => free(p)
            .map(|_| p)
            .ok_or_else(|| Error::ServerProcess(format!("port {p} on 127.0.0.1 is in use"))),
        None => free(DEFAULT_PORT)
            .or_else(|| free(0))
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.port())
            .ok_or_else(|| Error::ServerProcess("no free port on 127.0.0.1".into())),
    }
}

/// Spawns `mlflow server` on `port` with its state in `home` and waits until
/// `/health` answers.
fn launch(mlflow: &Path, home: &Path, port: u16) -> Result<ServerInfo> {
    let log_path = home.join("server.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Error::io(&log_path, e))?;
    let log2 = log.try_clone().map_err(|e| Error::io(&log_path, e))?;
    let mut cmd = Command::new(mlflow);
    cmd.arg("server")
        .arg("--backend-store-uri")
        .arg(format!("sqlite:///{}", home.join("mlflow.db").display()))
        .arg("--artifacts-destination")
        .arg(home.join("artifacts"))
        .arg("--serve-artifacts")
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        // One worker: a single user, and SQLite serialises writes anyway.
        .args(["--workers", "1"])
        // MLflow 3 otherwise forks a pool of job consumers (GenAI
        // evaluation jobs), eight more processes that kd never uses.
        .env("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        .current_dir(home)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    proc::own_group(&mut cmd);
    let mut child = cmd.spawn().map_err(|e| Error::io(mlflow, e))?;
    let info = ServerInfo {
        pid: child.id(),
        url: format!("http://127.0.0.1:{port}"),
        port,
        home: home.to_path_buf(),
    };
    let client = Client::new(&info.url)?.with_timeout(Duration::from_secs(2));
    let started = Instant::now();
    loop {
        if client.health().is_ok() {
            return Ok(info);
        }
        if let Ok(Some(exit)) = child.try_wait() {
            return Err(Error::ServerProcess(format!(
                "mlflow server exited ({exit}); log tail:\n{}",
                log_tail(&log_path)
            )));
        }
        if started.elapsed() > START_TIMEOUT {
            let _ = stop_group(info.pid);
            return Err(Error::ServerProcess(format!(
                "mlflow server did not answer within {START_TIMEOUT:?}; log tail:\n{}",
                log_tail(&log_path)
            )));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn log_tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// SIGTERM to the server's process group, SIGKILL if it lingers.
fn stop_group(pid: u32) -> Result<()> {
    proc::signal_group(pid, false);
    let until = Instant::now() + STOP_TIMEOUT;
    while proc::alive(pid) {
        if Instant::now() > until {
            proc::signal_group(pid, true);
            std::thread::sleep(Duration::from_millis(200));
            if proc::alive(pid) {
                return Err(Error::ServerProcess(format!("pid {pid} survives SIGKILL")));
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Kills the server's process group at once, as a crash would. For tests
/// of outages; `down` is the orderly way.
pub fn kill(runs_root: &Path) -> Result<Option<ServerInfo>> {
    let Some(info) = status(runs_root)? else {
        return Ok(None);
    };
    proc::signal_group(info.pid, true);
    let until = Instant::now() + STOP_TIMEOUT;
    while proc::alive(info.pid) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    let state = state_file(runs_root);
    std::fs::remove_file(&state).map_err(|e| Error::io(&state, e))?;
    Ok(Some(info))
}

#[cfg(unix)]
pub(crate) mod proc {
    use std::os::unix::process::CommandExt;

    pub(crate) fn own_group(cmd: &mut std::process::Command) {
        cmd.process_group(0);
    }

    /// Whether `pid` runs (a zombie does not). Reaps it if it is our child,
    /// so a server this process started and stopped does not linger as one.
    pub(crate) fn alive(pid: u32) -> bool {
        let Ok(pid) = i32::try_from(pid) else {
            return false;
        };
        // SAFETY: plain syscalls on an integer pid; WNOHANG never blocks.
        unsafe {
            libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG);
            if libc::kill(pid, 0) != 0
                && std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM)
            {
                return false;
            }
        }
        // Not our child but exited: the kernel keeps it as a zombie until its
        // parent reaps it.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_none_or(|state| state != "Z"),
            Err(_) => true,
        }
    }

    pub(crate) fn signal_group(pid: u32, hard: bool) {
        let Ok(pid) = i32::try_from(pid) else {
            return;
        };
        let sig = if hard { libc::SIGKILL } else { libc::SIGTERM };
        // SAFETY: signals a process group we created (its leader's pid).
        unsafe {
            libc::kill(-pid, sig);
        }
    }
}

#[cfg(not(unix))]
pub(crate) mod proc {
    pub(crate) fn own_group(_: &mut std::process::Command) {}
    pub(crate) fn alive(_: u32) -> bool {
        false
    }
    pub(crate) fn signal_group(_: u32, _: bool) {}
}
