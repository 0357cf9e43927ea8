//! Compiles `cpp/kd_aten.cpp` against the libtorch torch-sys links, whose
//! headers sit beside its library folder (`<torch>/lib`, `<torch>/include`).
//! CUDA graphs are compiled in when libtorch has CUDA and the CUDA runtime
//! headers come with it (the wheel's `nvidia` packages); no GPU is needed to
//! build them.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=cpp/kd_aten.cpp");
    println!("cargo:rerun-if-changed=cpp/kd_jit.cpp");
    println!("cargo:rerun-if-changed=cpp/kd_optim.cpp");
    println!("cargo:rerun-if-changed=cpp/kd_linear.cpp");
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
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("cpp/kd_aten.cpp")
        .file("cpp/kd_jit.cpp")
        .file("cpp/kd_optim.cpp")
        .file("cpp/kd_linear.cpp")
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false);
    if let Some(dirs) = cuda_includes(root, &lib) {
        build.define("KD_CUDA", None);
        for d in &dirs {
            build.include(d);
        }
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
        // kd-dist compiles NCCL against the same headers.
        let joined: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        println!("cargo:cuda_include={}", joined.join(";"));
    }
    build.compile("kd_aten");
}

/// The CUDA runtime headers from the `nvidia-*` wheels beside torch, when
/// libtorch was built with CUDA.
fn cuda_includes(torch: &Path, lib: &Path) -> Option<Vec<PathBuf>> {
    if !lib.join("libtorch_cuda.so").exists() {
        return None;
    }
    let nvidia = torch.parent()?.join("nvidia");
    let cuda = std::fs::read_dir(&nvidia)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("include")))
        .find(|p| p.join("cuda_runtime_api.h").exists())?;
    // cuda_runtime.h includes crt/*.h, which the runtime wheel lacks and
    // nvidia-cuda-crt (or a CUDA toolkit) provides.
    let crt = [cuda.clone(), PathBuf::from("/usr/local/cuda/include")]
        .into_iter()
        .find(|p| p.join("crt/host_config.h").exists());
    let Some(crt) = crt else {
        println!(
            "cargo:warning=CUDA graphs and NCCL left out: no crt/host_config.h beside {} (pip install nvidia-cuda-crt, which scripts/bootstrap does)",
            cuda.display()
        );
        return None;
    };
    Some(vec![cuda, crt])
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
