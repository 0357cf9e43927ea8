// The `kd` binary must run without LD_LIBRARY_PATH and must keep
// libtorch_cuda.so linked: rustc links with --as-needed, which would drop it
// because no symbol of it is referenced, and CUDA would silently vanish.
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{lib}");
        if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg-bins=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg-bins=-ltorch_cuda");
            println!("cargo:rustc-link-arg-bins=-Wl,--as-needed");
        }
    }
}
