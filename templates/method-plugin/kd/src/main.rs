//! kd's command line with the template's method linked in: `kd-template
//! methods` lists `cos_logits`, and recipes, `distill --method` and `probe
//! loss` reach it like any of kd's own.

fn main() -> std::process::ExitCode {
    kd_template_method::link();
    kd_cli::main_exit(std::env::args_os())
}
