fn main() -> std::process::ExitCode {
    kd_cli::main_exit(std::env::args_os())
}
