//! Every class of user mistake is reported with its file, line, column and
//! a message naming what is wrong, and nothing trains.

mod common;

use std::cell::Cell;

use common::{TINY, located, plan, registry};
use kd_recipes::{Recipe, RecipeError};

#[track_caller]
fn expect(src: &str, at: (usize, usize), needles: &[&str]) -> String {
    let (file, line, column, message) = located(plan(src));
    assert_eq!(
        (file.as_str(), line, column),
        ("test.rhai", at.0, at.1),
        "{message}"
    );
    for n in needles {
        assert!(message.contains(n), "`{n}` not in: {message}");
    }
    message
}

#[test]
fn syntax_error() {
    expect(
        "let a = 1;\nlet b = (2 + ;\n",
        (2, 14),
        &["syntax error", "Unexpected ';'"],
    );
    let err = plan("let a = 1;\nlet b = (2 + ;\n")
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("test.rhai:2:14: syntax error"), "{err}");
}

#[test]
fn undefined_variable_fails_at_compile_time() {
    expect(
        "let x = 1;\nlet y = z + 1;\n",
        (2, 9),
        &["Undefined variable: z"],
    );
}

#[test]
fn unknown_function_suggests_near_names() {
    expect(
        "let d = synthetic();\nlet x = experimnt(\"x\");\n",
        (2, 9),
        &["`experimnt (string)`", "did you mean `experiment`?"],
    );
}

#[test]
fn wrong_argument_type_shows_the_signature() {
    expect(
        "let d = synthetic().batch_size(\"64\");\n",
        (1, 21),
        &[
            "`batch_size (Data, string)`",
            "expected batch_size(data: Data, n: int) -> Data",
        ],
    );
}

#[test]
fn unknown_method_lists_registered_ones() {
    expect(
        "let s = stage(\"s\", 1);\nlet m = method(\"stt\");\n",
        (2, 9),
        &["unknown method `stt`", "registered methods: ", " st, "],
    );
}

#[test]
fn unknown_config_field_lists_valid_ones() {
    expect(
        "let m = method(\"vid\", #{ init_vr: 5.0 });\n",
        (1, 9),
        &[
            "method `vid`",
            "unknown field `init_vr`, expected one of `taps`, `init_var`, `sf`",
        ],
    );
    expect(
        "let d = synthetic(#{ clases: 3 });\n",
        (1, 9),
        &["synthetic: unknown field `clases`", "`classes`"],
    );
    expect(
        "let s = stage(\"s\", 1)\n  .sgd(#{ lr: 0.1, momentun: 0.9 });\n",
        (2, 4),
        &["sgd: unknown field `momentun`"],
    );
}

#[test]
fn unknown_model_lists_the_zoo() {
    expect(
        "let x = experiment(\"x\")\n    .student(\"resnet7\");\n",
        (2, 6),
        &["unknown model `resnet7`", "resnet8, "],
    );
}

#[test]
fn field_that_cannot_be_scheduled() {
    expect(
        "let m = method(\"vid\").schedule(\"init_var\", 1.0);\n",
        (1, 23),
        &[
            "field `init_var` cannot be scheduled",
            "schedulable fields: none",
        ],
    );
    expect(
        "let m = method(\"st\").schedule(\"tau\", 1.0);\n",
        (1, 22),
        &["schedulable fields: T"],
    );
}

#[test]
fn bad_weights() {
    expect(
        "let m = method(\"st\").weight(\"big\");\n",
        (1, 22),
        &["weight must be a number, a schedule", "got string"],
    );
    expect(
        "let m = method(\"st\").weight(Fn(\"nope\"));\n",
        (1, 22),
        &["no script function `nope`"],
    );
    expect(
        "fn two(a, b) { a }\nlet m = method(\"st\").weight(Fn(\"two\"));\n",
        (2, 22),
        &["`two` takes 2 parameters"],
    );
    expect(
        "let m = method(\"st\").weight(|p| p.fraction * m);\n",
        (1, 46),
        &["Undefined variable: m"],
    );
}

#[test]
fn plan_that_does_not_validate_fails_at_its_run() {
    let src =
        format!("let x = {TINY}\n  .add(teacher_stage(\"t\", 1).add(method(\"ce\")));\nrun(x);\n");
    expect(
        &src,
        (5, 1),
        &[
            "experiment `tiny`",
            "stage `t` trains the teacher, but the plan has none",
        ],
    );
    let src = format!(
        "let x = {TINY}\n  .teacher(\"resnet20\")\n  .add(stage(\"s\", 1).add(method(\"vid\", #{{ taps: [\"feat/9\"] }})));\n\nrun(x);\n"
    );
    expect(&src, (7, 1), &["unknown tap `feat/9`"]);
    let src = format!("let x = {TINY};\nrun(x);\n");
    expect(&src, (4, 1), &["experiment `tiny` has no stages"]);
}

#[test]
fn script_schedule_that_fails_is_caught_when_planning() {
    let src = format!(
        "fn bad(p) {{ p.fractio }}\nlet x = {TINY}\n  .add(stage(\"s\", 1).add(method(\"ce\").weight(Fn(\"bad\"))));\nrun(x);\n"
    );
    expect(
        &src,
        (6, 1),
        &["schedule `bad` at epoch 0, step 0", "fractio"],
    );
    let src = format!(
        "let x = {TINY}\n  .add(stage(\"s\", 1).add(method(\"ce\").weight(|p| \"heavy\")));\nrun(x);\n"
    );
    expect(&src, (5, 1), &["returned string, not a number"]);
}

#[test]
fn reused_run_name() {
    let src = format!(
        "let x = {TINY}.add(stage(\"s\", 1).add(method(\"ce\")));\nrun(x);\nrun(x.seed(1));\n"
    );
    expect(
        &src,
        (5, 1),
        &["experiment name `tiny` is used by an earlier run"],
    );
}

#[test]
fn sandbox_limits() {
    expect(
        "loop {\n  let a = 1;\n}\n",
        (1, 6),
        &["operation limit exceeded", "50000000 operations"],
    );
    expect(
        "let a = [];\nfor i in 0..200000 { a.push(i); }\n",
        (2, 24),
        &["array size limit exceeded", "100000 items"],
    );
    expect(
        "fn f(x) { f(x) }\nf(1);\n",
        (2, 1),
        &["call depth limit exceeded", "64 deep"],
    );
    expect(
        "let s = \"x\";\nloop { s += s; }\n",
        (2, 10),
        &["string size limit exceeded", "1048576 bytes"],
    );
}

#[test]
fn a_stage_too_long_to_count_is_refused_before_its_schedule_is_asked() {
    // Its steps overflowed while the schedule was probed: a panic.
    let src = format!(
        "let x = {TINY}.add(stage(\"s\", 4611686018427387904).add(method(\"ce\").weight(|p| p.fraction)));\nrun(x);\n"
    );
    let (.., message) = located(plan(&src));
    assert!(
        message.contains(
            "4611686018427387904 epochs of 4 steps each are more steps than training can count"
        ),
        "{message}"
    );
}

#[test]
fn wrong_value_types_are_named_as_scripts_know_them() {
    let message = expect(
        "let w = warmup(stage(\"s\", 1), 2);\n",
        (1, 9),
        &["got Stage"],
    );
    assert!(!message.contains("::"), "{message}");
}

#[test]
fn no_eval_and_no_imports_outside_the_recipes_folder() {
    expect("let y = eval(\"1\");\n", (1, 9), &["eval"]);
    expect(
        "import \"../secret\" as s;\n",
        (1, 8),
        &["only relative paths inside the recipes folder"],
    );
    expect(
        "import \"/etc/passwd\" as s;\n",
        (1, 8),
        &["only relative paths"],
    );
    expect(
        "import \"lib/nothing_here\" as s;\n",
        (1, 8),
        &["no lib/nothing_here.rhai under"],
    );
}

#[test]
fn error_inside_an_imported_module_names_that_file() {
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("recipes/lib");
    std::fs::create_dir_all(&lib).unwrap();
    std::fs::write(
        lib.join("broken.rhai"),
        "// helper\nfn stage_for(n) {\n    stage(\"s\", n).add(method(\"kd\"))\n}\n",
    )
    .unwrap();
    let recipe = dir.path().join("recipes/mine.rhai");
    std::fs::write(
        &recipe,
        "import \"lib/broken\" as b;\nlet s = b::stage_for(3);\n",
    )
    .unwrap();
    let r = Recipe::load(&recipe, &[]).unwrap().plans(&registry());
    let (file, line, column, message) = located(r);
    assert!(file.ends_with("recipes/lib/broken.rhai"), "{file}");
    assert_eq!((line, column), (3, 23), "{message}");
    assert!(message.contains("unknown method `kd`"), "{message}");
    // A module that does not parse.
    std::fs::write(lib.join("broken.rhai"), "fn f( {\n").unwrap();
    let (file, line, _, message) = located(Recipe::load(&recipe, &[]).unwrap().plans(&registry()));
    assert!(
        file.ends_with("broken.rhai") && line == 1 && message.contains("syntax error"),
        "{file}:{line}: {message}"
    );
}

#[test]
fn a_mistake_in_the_third_run_fails_before_the_first_trains() {
    let src = format!(
        "for i in 0..3 {{\n  let m = if i == 2 {{ method(\"st\", #{{ tau: 4.0 }}) }} else {{ method(\"ce\") }};\n  run({TINY}.name(`r${{i}}`).add(stage(\"s\", 1).add(m)));\n}}\n"
    );
    let calls = Cell::new(0);
    let r = Recipe::from_source("test.rhai", src, &[])
        .unwrap()
        .execute(&registry(), &mut |_| {
            calls.set(calls.get() + 1);
            anyhow::bail!("must not train")
        });
    let (_, line, column, message) = located(r);
    assert_eq!((line, column), (2, 23), "{message}");
    assert!(message.contains("unknown field `tau`"), "{message}");
    assert_eq!(calls.get(), 0);
}

#[test]
fn override_mistakes() {
    let set = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
    let src = "let e = param(\"epochs\", 3);\nlet n = param(\"name\", \"x\");\n";
    let err = Recipe::from_source("test.rhai", src, &set("epoch", "5"))
        .unwrap()
        .plans(&registry())
        .unwrap_err();
    assert!(
        matches!(&err, RecipeError::Override { key, message } if key == "epoch" && message.contains("no param `epoch`; it reads: epochs, name")),
        "{err}"
    );
    let err = Recipe::from_source("test.rhai", src, &set("epochs", "five"))
        .unwrap()
        .plans(&registry());
    let (_, line, column, message) = located(err);
    assert_eq!(
        (line, column, message.as_str()),
        (1, 9, "--set epochs=five: expected an int")
    );
    let (_, line, _, message) = located(plan("let d = param(\"data\");\n"));
    assert!(
        line == 1 && message.contains("pass `--set data=VALUE`"),
        "{message}"
    );
    assert!(Recipe::from_source("test.rhai", src, &set("bad key", "1")).is_err());
}
