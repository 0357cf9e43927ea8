//! One module per subcommand, each with its arguments and its `run`.

pub mod bench;
pub mod bench_data;
pub mod cache_teacher;
pub mod distill;
pub mod methods;
pub mod mlflow;
pub mod models;
pub mod plan;
pub mod probe;
pub mod report;
pub mod run;
pub mod sync;
pub mod train_teacher;
