//! The built binary finds libtorch by itself (rpath, no LD_LIBRARY_PATH) and
//! keeps libtorch_cuda.so linked, without which CUDA silently disappears.

use std::process::Command;

const KD: &str = env!("CARGO_BIN_EXE_kd");

#[test]
fn runs_without_ld_library_path() {
    let out = Command::new(KD)
        .arg("models")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("resnet8x4"));
}

#[test]
fn keeps_libtorch_cuda_linked() {
    let ldd = Command::new("ldd")
        .arg(KD)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    let ldd = String::from_utf8_lossy(&ldd.stdout);
    let cpu = ldd
        .lines()
        .find(|l| l.contains("libtorch_cpu.so"))
        .expect("libtorch_cpu linked");
    assert!(!cpu.contains("not found"), "{cpu}");
    // The CUDA library is linked wherever the PyTorch build ships it.
    let lib_dir = cpu
        .split("=>")
        .nth(1)
        .unwrap()
        .trim()
        .split(' ')
        .next()
        .unwrap();
    let cuda = std::path::Path::new(lib_dir).with_file_name("libtorch_cuda.so");
    if cuda.exists() {
        assert!(
            ldd.contains("libtorch_cuda.so =>"),
            "libtorch_cuda.so dropped by --as-needed:\n{ldd}"
        );
    }
}
