//! The library finds libpython where the Python it was built for keeps it
//! (an rpath), as that Python's own executable does.
fn main() {
    if let Some(dir) = &pyo3_build_config::get().lib_dir {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
