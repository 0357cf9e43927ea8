//! The committed editor stub and the API reference stay in step with the
//! functions the engine registers.

use std::path::PathBuf;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn committed_stub_is_fresh() {
    let path = workspace().join("recipes/kd.d.rhai");
    let fresh = kd_recipes::definitions();
    if std::env::var_os("KD_BLESS").is_some_and(|v| !v.is_empty()) {
        std::fs::write(&path, &fresh).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "recipes/kd.d.rhai is stale; regenerate it with `KD_BLESS=1 cargo test -p kd-recipes --test stub`"
    );
}

/// Every function name of the stub appears in docs/recipes.md as `name(`.
#[test]
fn reference_documents_every_function() {
    let docs = std::fs::read_to_string(workspace().join("docs/recipes.md")).unwrap();
    let stub = kd_recipes::definitions();
    let names: Vec<&str> = stub
        .lines()
        .filter_map(|l| l.strip_prefix("fn "))
        .filter_map(|l| l.split('(').next())
        .filter(|n| *n != "to_string" && !n.starts_with("get "))
        .collect();
    assert!(names.len() > 30, "{stub}");
    let missing: Vec<&&str> = names
        .iter()
        .filter(|n| !docs.contains(&format!("`{n}(")) && !docs.contains(&format!("| `{n}(")))
        .collect();
    assert!(missing.is_empty(), "docs/recipes.md lacks {missing:?}");
    let props: Vec<&str> = stub
        .lines()
        .filter_map(|l| l.strip_prefix("fn get "))
        .filter_map(|l| l.split('(').next())
        .collect();
    let missing: Vec<&&str> = props
        .iter()
        .filter(|p| !docs.contains(&format!("`{p}`")) && !docs.contains(&format!(".{p}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/recipes.md lacks the properties {missing:?}"
    );
}
