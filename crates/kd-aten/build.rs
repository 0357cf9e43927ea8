//! Compiles `cpp/kd_aten.cpp` against the libtorch torch-sys links, whose
//! headers sit beside its library folder (`<torch>/lib`, `<torch>/include`).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=cpp/kd_aten.cpp");
    println!("cargo:rerun-if-changed=cpp/kd_ffi.h");
    // kd-dist's shim shares the error convention (cpp/kd_ffi.h): it reads
    // this folder as DEP_KD_ATEN_INCLUDE.
    let cpp = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cpp");
    println!("cargo:include={}", cpp.display());
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys reports its libtorch folder"),
    );
    let root = lib.parent().expect("libtorch's lib folder has a parent");
    let abi = cxx11_abi();
    // Other shims (kd-dist) compile against the same libtorch: they read
    // the ABI as DEP_KD_ATEN_CXX11_ABI instead of asking Python again.
    println!("cargo:cxx11_abi={abi}");
    cc::Build::new()
        .cpp(true)
        .file("cpp/kd_aten.cpp")
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false)
        .compile("kd_aten");
}

/// The C++ ABI the libtorch build uses: asked of the PyTorch that provides
/// it (as torch-sys does), the new ABI otherwise.
fn cxx11_abi() -> &'static str {
    let python = if std::env::var_os("VIRTUAL_ENV").is_some() {
        "python"
    } else {
        "python3"
    };
    let asked = Command::new(python)
        .args([
            "-c",
            "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match asked.as_deref() {
        Some("0") => "0",
        _ => "1",
    }
}
