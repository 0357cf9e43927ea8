// The `kd` binary must run without LD_LIBRARY_PATH and must keep
// libtorch_cuda.so linked: rustc links with --as-needed, which would drop it
// because no symbol of it is referenced, and CUDA would silently vanish.
fn main() {
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").unwrap_or_default();
    let mut version = "unknown".to_string();
    if !lib.is_empty() {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{lib}");
        if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg-bins=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg-bins=-ltorch_cuda");
            println!("cargo:rustc-link-arg-bins=-Wl,--as-needed");
        }
        // PyTorch's torch/version.py sits beside torch/lib: record the exact
        // build (e.g. 2.11.0+cu130) with every run.
        let py = std::path::Path::new(&lib).join("../version.py");
        let text = std::fs::read_to_string(&py).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.starts_with("__version__")) {
            version = line
                .split(['\'', '"'])
                .nth(1)
                .unwrap_or("unknown")
                .to_string();
        }
    }
    println!("cargo:rustc-env=KD_LIBTORCH_VERSION={version}");
    git_commit();
}

/// The commit the binary is built from (and whether the tree differed from
/// it), so a run records the code that made it, not the folder it ran in.
fn git_commit() {
    let git = |args: &[&str]| -> Option<String> {
        let out = std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
        .map(|s| (!s.is_empty()).to_string())
        .unwrap_or_else(|| "unknown".into());
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        let dir = std::path::Path::new(&dir);
        // HEAD moves on checkout, the branch's ref on commit, the index on
        // staging; each may change what the binary should report.
        println!("cargo:rerun-if-changed={}", dir.join("HEAD").display());
        println!("cargo:rerun-if-changed={}", dir.join("index").display());
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={}", dir.join(branch).display());
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-env=KD_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=KD_GIT_DIRTY={dirty}");
}
