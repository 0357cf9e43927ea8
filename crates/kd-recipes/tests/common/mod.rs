#![allow(dead_code)]

use kd_core::Registry;
use kd_recipes::{Recipe, RecipeError};

pub fn registry() -> Registry {
    kd_methods::link();
    Registry::global().expect("the linked methods have distinct names")
}

/// Plans `text` as a recipe at `test.rhai` (in the crate folder, so the
/// workspace's `recipes/` is its import root).
pub fn plan(text: &str) -> Result<Vec<kd_engine::Plan>, RecipeError> {
    Recipe::from_source("test.rhai", text, &[])?
        .with_printer(|_| {})
        .plans(&registry())
}

/// The location and message of a recipe error; panics on any other result.
pub fn located(r: Result<impl std::fmt::Debug, RecipeError>) -> (String, usize, usize, String) {
    match r {
        Err(RecipeError::Script {
            file,
            line,
            column,
            message,
        }) => (file, line, column, message),
        other => panic!("expected a script error, got {other:?}"),
    }
}

/// A small, valid experiment on synthetic data, as Rhai source.
pub const TINY: &str = r#"experiment("tiny")
    .data(synthetic(#{ train_size: 64, test_size: 32 }).batch_size(16))
    .student("resnet8")"#;
