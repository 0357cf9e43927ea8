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
}
