//! A small blocking client for the MLflow REST API (2.0 routes, which MLflow 3
//! still serves), on `ureq`.
//!
//! Only what `kd` needs: experiments by name, run creation, batched logging,
//! tags, run status and artifact upload through the server's
//! `mlflow-artifacts` proxy. Every call has a bounded timeout, because the
//! caller is a background thread that must be able to give up when training
//! ends.

use std::fs::File;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{Error, Result};

/// MLflow's `log-batch` limits (mlflow/utils/validation.py).
pub const MAX_METRICS_PER_BATCH: usize = 1000;
pub const MAX_PARAMS_TAGS_PER_BATCH: usize = 100;
pub const MAX_ENTITIES_PER_BATCH: usize = 1000;
/// The server refuses request bodies above 1 MB; stay clear of it.
pub(crate) const MAX_BATCH_BYTES: usize = 900_000;

/// The route prefix of the artifact proxy (`mlflow server --serve-artifacts`).
const ARTIFACTS_ROUTE: &str = "/api/2.0/mlflow-artifacts/artifacts/";

/// Terminal states of a run, as MLflow names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunStatus {
    Finished,
    Failed,
    Killed,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Finished => "FINISHED",
            RunStatus::Failed => "FAILED",
            RunStatus::Killed => "KILLED",
        }
    }
}

/// One metric point. MLflow stores values as doubles, steps as 64-bit ints
/// and timestamps as milliseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub key: String,
    pub value: f64,
    pub timestamp: i64,
    pub step: i64,
}

/// What the server says about a run we created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInfo {
    pub run_id: String,
    pub experiment_id: String,
    /// e.g. `mlflow-artifacts:/1/<run_id>/artifacts` on a server that proxies
    /// artifacts.
    pub artifact_uri: String,
}

/// Blocking MLflow REST client. Cheap to clone (the connection pool is
/// shared).
#[derive(Clone)]
pub struct Client {
    base: String,
    agent: ureq::Agent,
    timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("base", &self.base).finish()
    }
}

impl Client {
    /// A client for the server at `tracking_uri` (`http://host:port`, an
    /// optional path prefix allowed). Nothing is contacted yet.
    pub fn new(tracking_uri: &str) -> Result<Client> {
        let base = tracking_uri.trim().trim_end_matches('/');
        let rest = base
            .strip_prefix("http://")
            .or_else(|| base.strip_prefix("https://"));
        if rest.is_none_or(|r| r.is_empty()) {
            return Err(Error::BadUri(tracking_uri.to_string()));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            // MLflow explains failures in a JSON body; read it ourselves.
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(3)))
            .user_agent("kd-tracking")
            .build()
            .into();
        Ok(Client {
            base: base.to_string(),
            agent,
            timeout: Duration::from_secs(30),
        })
    }

    /// The same client with another limit on each whole request.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    pub(crate) fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout.max(Duration::from_millis(50));
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The tracking URI without a trailing slash.
    pub fn uri(&self) -> &str {
        &self.base
    }

    /// `GET /health`: whether the server answers at all.
    pub fn health(&self) -> Result<()> {
        let url = format!("{}/health", self.base);
        let resp = self.timed(self.agent.get(&url)).call();
        let (status, _) = self.read(&url, resp)?;
        if status == 200 {
            Ok(())
        } else {
            Err(Error::Protocol {
                url,
                reason: format!("health check answered HTTP {status}"),
            })
        }
    }

    /// The id of the experiment called `name`, created if missing.
    pub fn get_or_create_experiment(&self, name: &str) -> Result<String> {
        match self.experiment_id_by_name(name) {
            Ok(id) => return Ok(id),
            Err(e) if e.error_code() == Some("RESOURCE_DOES_NOT_EXIST") => {}
            Err(e) => return Err(e),
        }
        match self.post("mlflow/experiments/create", &json!({ "name": name })) {
            Ok(v) => string_field(&v, "experiment_id").map_err(|r| self.protocol("create", r)),
            // Another process created it in between.
            Err(e) if e.error_code() == Some("RESOURCE_ALREADY_EXISTS") => {
                self.experiment_id_by_name(name)
            }
            Err(e) => Err(e),
        }
    }

    fn experiment_id_by_name(&self, name: &str) -> Result<String> {
        let url = self.api("mlflow/experiments/get-by-name");
        let req = self.timed(self.agent.get(&url).query("experiment_name", name));
        let v = self.answer(&url, req.call())?;
        v.get("experiment")
            .and_then(|e| e.get("experiment_id"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| self.protocol("get-by-name", "no experiment.experiment_id".into()))
    }

    /// `runs/create`. `tags` go in with the run, so a run never exists on
    /// the server without its parent link or name.
    pub fn create_run(
        &self,
        experiment_id: &str,
        run_name: Option<&str>,
        start_time: i64,
        tags: &[(String, String)],
    ) -> Result<RunInfo> {
        let mut body = json!({
            "experiment_id": experiment_id,
            "start_time": start_time,
            "tags": key_values(tags),
        });
        if let Some(name) = run_name {
            body["run_name"] = json!(name);
        }
        // MLflow deprecated `user_id` for the `mlflow.user` tag, but the UI
        // still shows the field; keep them equal.
        if let Some((_, user)) = tags.iter().find(|(k, _)| k == "mlflow.user") {
            body["user_id"] = json!(user);
        }
        let v = self.post("mlflow/runs/create", &body)?;
        let info = v
            .get("run")
            .and_then(|r| r.get("info"))
            .ok_or_else(|| self.protocol("runs/create", "no run.info".into()))?;
        let field = |k: &str| string_field(info, k).map_err(|r| self.protocol("runs/create", r));
        Ok(RunInfo {
            run_id: field("run_id")?,
            experiment_id: field("experiment_id")?,
            artifact_uri: field("artifact_uri")?,
        })
    }

    /// `runs/log-batch`, split into as many requests as the server's limits
    /// require. Param keys must be unique within one call (MLflow rejects a
    /// batch repeating one).
    pub fn log_batch(
        &self,
        run_id: &str,
        metrics: &[Metric],
        params: &[(String, String)],
        tags: &[(String, String)],
    ) -> Result<()> {
        let (mut m, mut p, mut t) = (metrics, params, tags);
        while !(m.is_empty() && p.is_empty() && t.is_empty()) {
            let np = p.len().min(MAX_PARAMS_TAGS_PER_BATCH);
            let nt = t.len().min(MAX_PARAMS_TAGS_PER_BATCH - np);
            let nm = m
                .len()
                .min(MAX_METRICS_PER_BATCH)
                .min(MAX_ENTITIES_PER_BATCH - np - nt);
            self.log_batch_once(run_id, &m[..nm], &p[..np], &t[..nt])?;
            (m, p, t) = (&m[nm..], &p[np..], &t[nt..]);
        }
        Ok(())
    }

    /// One `log-batch` request; the caller keeps within the limits.
    pub(crate) fn log_batch_once(
        &self,
        run_id: &str,
        metrics: &[Metric],
        params: &[(String, String)],
        tags: &[(String, String)],
    ) -> Result<()> {
        let metrics: Vec<Value> = metrics
            .iter()
            .map(|m| {
                json!({
                    "key": m.key,
                    "value": metric_value_json(m.value),
                    "timestamp": m.timestamp,
                    "step": m.step,
                })
            })
            .collect();
        let body = json!({
            "run_id": run_id,
            "metrics": metrics,
            "params": key_values(params),
            "tags": key_values(tags),
        });
        self.post("mlflow/runs/log-batch", &body).map(drop)
    }

    /// `runs/set-tag`.
    pub fn set_tag(&self, run_id: &str, key: &str, value: &str) -> Result<()> {
        let body = json!({ "run_id": run_id, "key": key, "value": value });
        self.post("mlflow/runs/set-tag", &body).map(drop)
    }

    /// `runs/update` with a terminal status and its end time (ms).
    pub fn update_run(&self, run_id: &str, status: RunStatus, end_time: i64) -> Result<()> {
        let body = json!({ "run_id": run_id, "status": status.as_str(), "end_time": end_time });
        self.post("mlflow/runs/update", &body).map(drop)
    }

    /// Marks a run as running again (a resumed run).
    pub(crate) fn reopen_run(&self, run_id: &str) -> Result<()> {
        let body = json!({ "run_id": run_id, "status": "RUNNING" });
        self.post("mlflow/runs/update", &body).map(drop)
    }

    /// Uploads one local file to `artifact_path` (slash-separated, relative to
    /// the run's artifact root) through the `mlflow-artifacts` proxy.
    pub fn upload_artifact(&self, run: &RunInfo, local: &Path, artifact_path: &str) -> Result<()> {
        let root = proxied_root(&run.artifact_uri)?;
        let rel: Vec<String> = artifact_path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(encode_segment)
            .collect();
        let url = format!(
            "{}{}{}/{}",
            self.base,
            ARTIFACTS_ROUTE,
            root.split('/')
                .map(encode_segment)
                .collect::<Vec<_>>()
                .join("/"),
            rel.join("/")
        );
        let file = File::open(local).map_err(|e| Error::io(local, e))?;
        let req = self
            .timed(self.agent.put(&url))
            .header("Content-Type", "application/octet-stream");
        self.answer(&url, req.send(file)).map(drop)
    }

    fn api(&self, route: &str) -> String {
        format!("{}/api/2.0/{}", self.base, route)
    }

    fn timed<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        req.config().timeout_global(Some(self.timeout)).build()
    }

    fn post(&self, route: &str, body: &Value) -> Result<Value> {
        let url = self.api(route);
        let resp = self.timed(self.agent.post(&url)).send_json(body);
        self.answer(&url, resp)
    }

    fn read(
        &self,
        url: &str,
        resp: std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<(u16, String)> {
        let transport = |e: ureq::Error| match e {
            ureq::Error::Timeout(_) => Error::Timeout {
                url: url.to_string(),
            },
            e => Error::Transport {
                url: url.to_string(),
                reason: e.to_string(),
            },
        };
        let mut resp = resp.map_err(transport)?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().map_err(transport)?;
        Ok((status, text))
    }

    /// The JSON body of a 2xx answer, or MLflow's error as [`Error::Server`].
    fn answer(
        &self,
        url: &str,
        resp: std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Value> {
        let (status, text) = self.read(url, resp)?;
        let parsed: Option<Value> = serde_json::from_str(&text).ok();
        if (200..300).contains(&status) {
            return Ok(parsed.unwrap_or(Value::Null));
        }
        let field = |k: &str| {
            parsed
                .as_ref()
                .and_then(|v| v.get(k))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        Err(Error::Server {
            status,
            error_code: field("error_code").unwrap_or_else(|| format!("HTTP_{status}")),
            message: field("message").unwrap_or_else(|| text.chars().take(500).collect()),
        })
    }

    fn protocol(&self, what: &str, reason: String) -> Error {
        Error::Protocol {
            url: format!("{} ({what})", self.base),
            reason,
        }
    }
}

fn string_field(v: &Value, key: &str) -> std::result::Result<String, String> {
    v.get(key)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| format!("no string field `{key}`"))
}

fn key_values(v: &[(String, String)]) -> Vec<Value> {
    v.iter()
        .map(|(k, v)| json!({ "key": k, "value": v }))
        .collect()
}

/// Proto3 JSON, which MLflow parses, spells non-finite doubles as strings;
/// a diverging loss must still be recorded.
pub(crate) fn metric_value_json(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else if v.is_nan() {
        json!("NaN")
    } else if v > 0.0 {
        json!("Infinity")
    } else {
        json!("-Infinity")
    }
}

/// The path of a run's artifact root below the proxy route. MLflow builds the
/// upload URL the same way (`MlflowArtifactsRepository.resolve_uri`): the path
/// of an `mlflow-artifacts:` URI, or what follows the route in an http(s)
/// one.
pub(crate) fn proxied_root(artifact_uri: &str) -> Result<String> {
    let path = if let Some(rest) = artifact_uri.strip_prefix("mlflow-artifacts:") {
        // `mlflow-artifacts://host:port/path` names a server; we always talk
        // to the tracking server, so only the path matters.
        match rest.strip_prefix("//") {
            Some(with_host) => with_host.find('/').map_or("", |i| &with_host[i..]),
            None => rest,
        }
    } else if artifact_uri.starts_with("http://") || artifact_uri.starts_with("https://") {
        match artifact_uri.find(ARTIFACTS_ROUTE) {
            Some(i) => &artifact_uri[i + ARTIFACTS_ROUTE.len()..],
            None => return Err(Error::ArtifactRoot(artifact_uri.to_string())),
        }
    } else {
        return Err(Error::ArtifactRoot(artifact_uri.to_string()));
    };
    Ok(path.trim_matches('/').to_string())
}

/// Percent-encodes one path segment (RFC 3986 unreserved characters stay).
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxied_root_follows_mlflow_resolution() {
        let ok = |u: &str| proxied_root(u).unwrap();
        assert_eq!(ok("mlflow-artifacts:/1/abc/artifacts"), "1/abc/artifacts");
        assert_eq!(
            ok("mlflow-artifacts://h:5000/1/abc/artifacts"),
            "1/abc/artifacts"
        );
        assert_eq!(
            ok("http://h:5000/api/2.0/mlflow-artifacts/artifacts/7/r/artifacts"),
            "7/r/artifacts"
        );
        assert!(matches!(
            proxied_root("file:///tmp/mlruns/1/abc/artifacts"),
            Err(Error::ArtifactRoot(_))
        ));
    }

    #[test]
    fn non_finite_values_use_proto_json_spelling() {
        assert_eq!(metric_value_json(f64::NAN), json!("NaN"));
        assert_eq!(metric_value_json(f64::INFINITY), json!("Infinity"));
        assert_eq!(metric_value_json(f64::NEG_INFINITY), json!("-Infinity"));
        assert_eq!(metric_value_json(0.25), json!(0.25));
    }

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(encode_segment("a b%/c.png"), "a%20b%25%2Fc.png");
    }

    #[test]
    fn only_http_uris_are_accepted() {
        assert!(Client::new("http://127.0.0.1:5000/").is_ok());
        for bad in ["file:./mlruns", "databricks", "http://", "127.0.0.1:5000"] {
            assert!(matches!(Client::new(bad), Err(Error::BadUri(_))), "{bad}");
        }
    }

    #[test]
    fn unreachable_server_is_a_transient_transport_error() {
        // Port 9 (discard) on loopback is closed on any sane test machine.
        let c = Client::new("http://127.0.0.1:9")
            .unwrap()
            .with_timeout(Duration::from_secs(2));
        let e = c.get_or_create_experiment("x").unwrap_err();
        assert!(matches!(e, Error::Transport { .. }), "{e}");
        assert!(e.is_transient());
    }
}
