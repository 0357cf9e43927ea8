//! Compiles `cpp/kd_dist.cpp` against the libtorch torch-sys links. Gloo's
//! headers come from Debian's `libgloo-dev` (the wheel ships c10d's headers
//! and Gloo's code inside libtorch, not Gloo's headers). NCCL is compiled in
//! when the wheel's `nvidia` packages provide `nccl.h` and the CUDA runtime
//! headers, and libtorch has CUDA; no GPU is needed to build it.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=cpp/kd_dist.cpp");
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys reports its libtorch folder"),
    );
    let root = lib.parent().expect("libtorch's lib folder has a parent");
    let abi = std::env::var("DEP_KD_ATEN_CXX11_ABI").unwrap_or_else(|_| "1".into());
    if !Path::new("/usr/include/gloo/config.h").exists() {
        println!(
            "cargo:warning=Gloo headers not found (/usr/include/gloo): install libgloo-dev (scripts/bootstrap does)"
        );
    }
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("cpp/kd_dist.cpp")
        .include(std::env::var("DEP_KD_ATEN_INCLUDE").expect("kd-aten reports its C++ folder"))
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false);
    if let Some(includes) = nccl_includes(root) {
        build.define("KD_NCCL", None);
        for i in includes {
            build.include(i);
        }
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
    }
    build.compile("kd_dist");
}

/// `nccl.h` from the `nvidia-nccl` wheel beside torch, and the CUDA runtime
/// headers kd-aten found (it compiles CUDA graphs against them).
fn nccl_includes(torch: &Path) -> Option<Vec<PathBuf>> {
    let cuda = std::env::var("DEP_KD_ATEN_CUDA_INCLUDE").ok()?;
    let nccl = torch.parent()?.join("nvidia/nccl/include");
    nccl.join("nccl.h").exists().then(|| {
        std::iter::once(nccl)
            .chain(cuda.split(';').map(PathBuf::from))
            .collect()
    })
}
