fn main() -> std::process::ExitCode {
    keep_freed_memory();
    kd_cli::main_exit(std::env::args_os())
}

/// glibc's malloc hands memory freed at the top of its heap back to the
/// system (above 128 KiB) and maps large blocks afresh, so that every
/// training step faults its activations' pages in again: 8% of a method's
/// loss call in a `perf` profile, and 6–7% of a resnet32x4 → resnet8x4 step
/// (`docs/performance.md`). The process keeps up to 1 GiB of freed memory
/// instead, and takes blocks up to 32 MiB (glibc's largest threshold) from
/// the heap. Skipped when the user tunes malloc through the environment.
fn keep_freed_memory() {
    let tuned = std::env::vars_os().any(|(k, _)| {
        let k = k.to_string_lossy();
        k.starts_with("MALLOC_") || k == "GLIBC_TUNABLES"
    });
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if !tuned {
        // SAFETY: mallopt only changes allocator parameters; it is called
        // before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = tuned;
}
