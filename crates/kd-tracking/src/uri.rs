//! Where a run's events go.

use std::path::Path;

use crate::server;

/// The tracking URI for a run, first found of: the `--tracking-uri` flag,
/// `MLFLOW_TRACKING_URI`, the recipe's setting, the server `kd mlflow up`
/// started for `runs_root`. `None`: journal only, ship later with `kd sync`.
///
/// Empty values are skipped; the value `none` (any case) at any level stops
/// the search and turns tracking off, so a recipe or a flag can opt out of a
/// server configured further down.
pub fn resolve_uri(
    cli_flag: Option<&str>,
    recipe: Option<&str>,
    runs_root: &Path,
) -> Option<String> {
    let env = std::env::var("MLFLOW_TRACKING_URI").ok();
    resolve(cli_flag, env.as_deref(), recipe, runs_root)
}

fn resolve(
    cli_flag: Option<&str>,
    env: Option<&str>,
    recipe: Option<&str>,
    runs_root: &Path,
) -> Option<String> {
    let explicit = [cli_flag, env, recipe]
        .into_iter()
        .flatten()
        .map(str::trim)
        .find(|s| !s.is_empty());
    match explicit {
        Some(s) if s.eq_ignore_ascii_case("none") => None,
        Some(s) => Some(s.to_string()),
        None => server::status(runs_root).ok().flatten().map(|i| i.url),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_flag_env_recipe_local_server() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let state = server::state_file(r);
        std::fs::create_dir_all(state.parent().unwrap()).unwrap();
        // A live pid (ours) stands in for the server process.
        let local = server::ServerInfo {
            pid: std::process::id(),
            url: "http://127.0.0.1:5999".into(),
            port: 5999,
            home: r.into(),
        };
        std::fs::write(&state, serde_json::to_string(&local).unwrap()).unwrap();

        let got = |f, e, rc| resolve(f, e, rc, r);
        assert_eq!(got(None, None, None).as_deref(), Some(local.url.as_str()));
        assert_eq!(
            got(None, None, Some("http://r:1")).as_deref(),
            Some("http://r:1")
        );
        assert_eq!(
            got(None, Some("http://e:2"), Some("http://r:1")).as_deref(),
            Some("http://e:2")
        );
        assert_eq!(
            got(Some("http://f:3"), Some("http://e:2"), None).as_deref(),
            Some("http://f:3")
        );
        assert_eq!(
            got(Some(""), Some(" "), Some("http://r:1")).as_deref(),
            Some("http://r:1")
        );
        assert_eq!(got(Some("None"), Some("http://e:2"), None), None);
        assert_eq!(got(None, None, Some("none")), None);

        // A recorded server whose process is gone is not used.
        let dead = server::ServerInfo {
            pid: u32::MAX - 1,
            ..local
        };
        std::fs::write(&state, serde_json::to_string(&dead).unwrap()).unwrap();
        assert_eq!(got(None, None, None), None);
    }
}
