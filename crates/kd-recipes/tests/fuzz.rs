//! Fuzzing by property tests: no recipe source and no plan YAML, however
//! broken, makes planning or reading panic. Errors are the expected outcome;
//! a panic, here or on the recipe's thread (which `plans` raises again),
//! fails the property.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kd_core::Registry;
use kd_recipes::{Recipe, Scripts, from_yaml, read_plans, to_yaml};
use proptest::prelude::*;
use proptest::test_runner::Config;

// Cases per property: the whole file runs in well under a minute in a
// debug build on two cores. Planning a recipe that reaches `run(...)`
// builds and probes its models, from 50 ms to seconds, so the properties
// that get that far run fewer cases.
pub const RANDOM_BYTES_CASES: u32 = 5_000;
pub const TOKEN_SOUP_CASES: u32 = 10_000;
pub const API_PROGRAM_CASES: u32 = 200;
pub const MUTATED_RECIPE_CASES: u32 = 150;
pub const MUTATED_SLOW_RECIPE_CASES: u32 = 12;
pub const RANDOM_YAML_CASES: u32 = 5_000;
pub const MUTATED_YAML_CASES: u32 = 2_000;
pub const VALIDATED_YAML_CASES: u32 = 100;

fn config(cases: u32) -> Config {
    kd_tests::fuzz_config(cases)
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(common::registry)
}

fn recipes_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes")
}

/// Plans `text` as the recipe at `path` (which places its imports); any
/// error is fine.
fn plan_quietly(path: &Path, text: &str) {
    if let Ok(recipe) = Recipe::from_source(path, text, &[]) {
        let _ = recipe.with_printer(|_| {}).plans(registry());
    }
}

/// The shipped recipes that take seconds to plan (many runs, or methods
/// whose check builds many models); fuzzed with fewer cases of their own.
const SLOW_RECIPES: &[&str] = &[
    "examples/all_methods.rhai",
    "examples/seed_sweep.rhai",
    "synthetic/dml/",
    "synthetic/afd/",
];

fn is_slow(path: &Path) -> bool {
    let path = path.to_string_lossy().replace('\\', "/");
    SLOW_RECIPES.iter().any(|s| path.contains(s))
}

/// The recipes shipped in `recipes/`, as (path, text).
fn shipped_recipes() -> &'static [(PathBuf, String)] {
    static RECIPES: OnceLock<Vec<(PathBuf, String)>> = OnceLock::new();
    RECIPES.get_or_init(|| {
        let mut found = Vec::new();
        let mut dirs = vec![recipes_dir()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).expect("recipes/ is readable") {
                let path = entry.expect("recipes/ is readable").path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "rhai")
                    && path.file_name().is_some_and(|n| n != "kd.d.rhai")
                {
                    let text = std::fs::read_to_string(&path).expect("a recipe is text");
                    found.push((path, text));
                }
            }
        }
        found.sort();
        assert!(
            found.len() > 10,
            "recipes not found under {:?}",
            recipes_dir()
        );
        found
    })
}

/// The names of the recipe API's functions, from the editor stub.
fn api_names() -> &'static [String] {
    static NAMES: OnceLock<Vec<String>> = OnceLock::new();
    NAMES.get_or_init(|| {
        let mut names: Vec<String> = kd_recipes::definitions()
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix("fn "))
            .filter_map(|l| l.split('(').next())
            .filter(|n| n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            .map(str::to_string)
            .collect();
        names.sort();
        names.dedup();
        assert!(names.len() > 20, "{names:?}");
        names
    })
}

/// Integers and floats where code tends to break, as Rhai expressions.
const INTS: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "3",
    "16",
    "64",
    "4294967296",
    "4611686018427387904",
    "9223372036854775807",
    "(-9223372036854775807 - 1)",
];
const FLOATS: &[&str] = &[
    "0.0",
    "0.5",
    "-0.0",
    "-1.0",
    "1e-308",
    "1e308",
    "-1e308",
    "(0.0/0.0)",
    "(1.0/0.0)",
    "(-1.0/0.0)",
];

fn numbers() -> &'static [&'static str] {
    static ALL: OnceLock<Vec<&'static str>> = OnceLock::new();
    ALL.get_or_init(|| INTS.iter().chain(FLOATS).copied().collect())
}

const STRINGS: &[&str] = &[
    "\"\"",
    "\"x\"",
    "\"resnet8\"",
    "\"resnet20\"",
    "\"ce\"",
    "\"st\"",
    "\"T\"",
    "\"weight\"",
    "\"../x\"",
    "\"/etc/passwd\"",
    "\"lib/sweep\"",
    "\"a/b\\\\c\"",
    "\"ü\\u{0}\"",
    "'c'",
];

/// Rhai syntax and standard functions the API's values meet.
const SYNTAX: &[&str] = &[
    "let",
    "const",
    "fn",
    "if",
    "else",
    "for",
    "in",
    "return",
    "throw",
    "try",
    "catch",
    "import",
    "as",
    "this",
    "Fn",
    "true",
    "false",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    "#{",
    ",",
    ";",
    ".",
    ":",
    "=",
    "+",
    "-",
    "*",
    "/",
    "%",
    "**",
    "<<",
    ">>",
    "&",
    "|",
    "^",
    "==",
    "!=",
    "<",
    ">",
    "..",
    "..=",
    "|p|",
    "?.",
    "??",
    "!",
    "+=",
    "x",
    "p",
    "v",
    "pad",
    "push",
    "append",
    "insert",
    "extract",
    "splice",
    "sub_string",
    "split",
    "chars",
    "len",
    "blob",
    "range",
    "sort",
    "reverse",
    "to_string",
    "to_debug",
    "parse_int",
    "parse_float",
    "abs",
    "sqrt",
    "floor",
    "min",
    "max",
    "keys",
    "values",
    "mixin",
    "get",
    "set",
    "contains",
    "index_of",
    "reduce",
    "map",
    "filter",
    "call",
    "curry",
    "type_of",
    "print",
    "debug",
    "fraction",
    "epoch",
    "best",
    "last",
];

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(SYNTAX).prop_map(str::to_string),
        3 => (0..api_names().len()).prop_map(|i| api_names()[i].clone()),
        1 => proptest::sample::select(numbers()).prop_map(str::to_string),
        1 => proptest::sample::select(STRINGS).prop_map(str::to_string),
    ]
}

/// A value for an API argument: a number, a string, or a small literal.
fn argument() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(numbers()).prop_map(str::to_string),
        3 => proptest::sample::select(STRINGS).prop_map(str::to_string),
        1 => (0..api_names().len()).prop_map(|i| format!("Fn(\"{}\")", api_names()[i])),
        1 => Just("|p| p.fraction".to_string()),
        1 => Just("#{ T: 4.0, x: [] }".to_string()),
        1 => Just("[0, 1.5, -1]".to_string()),
        1 => Just("()".to_string()),
    ]
}

/// `name(args)` with an API name.
fn call() -> impl Strategy<Value = String> {
    (
        0..api_names().len(),
        proptest::collection::vec(argument(), 0..3),
    )
        .prop_map(|(i, args)| format!("{}({})", api_names()[i], args.join(", ")))
}

/// Mostly `sane`, sometimes a number of its kind where code tends to
/// break, now and then one of the other kind.
fn number(sane: &'static str) -> impl Strategy<Value = String> {
    let kind = if sane.contains('.') { FLOATS } else { INTS };
    prop_oneof![
        10 => Just(sane.to_string()),
        2 => proptest::sample::select(kind).prop_map(str::to_string),
        1 => proptest::sample::select(numbers()).prop_map(str::to_string),
    ]
}

/// A program that builds an experiment the API accepts, with a random
/// number, name or extra call here and there, and runs it.
fn api_program() -> impl Strategy<Value = String> {
    let name = |sane: &'static str, odd: &'static [&'static str]| {
        prop_oneof![
            6 => Just(sane.to_string()),
            1 => proptest::sample::select(odd).prop_map(str::to_string),
        ]
    };
    let archs: &'static [&'static str] = &["\"resnet20\"", "\"wrn_16_2\"", "\"x\"", "\"\"", "1"];
    let methods: &'static [&'static str] = &["\"st\"", "\"logits\"", "\"sp\"", "\"nope\"", "()"];
    let extra = || {
        prop_oneof![
            4 => Just(Vec::new()),
            1 => proptest::collection::vec(call(), 1..3),
        ]
    };
    // Script schedules are evaluated while planning, at the stage's first,
    // middle and last step: often here.
    let weight = prop_oneof![
        4 => number("0.5"),
        2 => Just("Fn(\"w\")".to_string()),
        2 => Just("|p| p.fraction * 2.0".to_string()),
        1 => (number("0.9"), number("2")).prop_map(|(v, e)| format!("warmup({v}, {e})")),
        1 => argument(),
    ];
    (
        (number("64"), number("32"), number("16"), number("1"), number("0.1")),
        (name("\"resnet8\"", archs), name("\"resnet20\"", archs), name("\"ce\"", methods), weight),
        (extra(), extra(), 0..4usize),
    )
        .prop_map(
            |((train, test, batch, epochs, lr), (student, teacher, m, weight), (on_x, on_stage, end))| {
                let on_x: String = on_x.iter().map(|c| format!("\n    .{c}")).collect();
                let on_stage: String = on_stage.iter().map(|c| format!(".{c}")).collect();
                let end = [
                    "run(x);",
                    "run_all([x, x.name(\"b\")]);",
                    "let r = run(x); run(x.name(\"b\").teacher(\"resnet8\", r.best_weights));",
                    "print(x); x.to_string();",
                ][end];
                format!(
                    "fn w(p) {{ p.epoch / (p.epochs + 0.5) + p.global_step }}\n\
                     let x = experiment(\"fz\")\n    \
                     .data(synthetic(#{{ train_size: {train}, test_size: {test} }}).batch_size({batch}))\n    \
                     .teacher({teacher})\n    .student({student})\n    \
                     .add(stage(\"s\", {epochs}).lr({lr}).add(method({m}).weight({weight})){on_stage}){on_x};\n\
                     {end}\n"
                )
            },
        )
}

/// One change to a text, placed by fractions of its length.
#[derive(Debug, Clone)]
enum Edit {
    DeleteLine(f64),
    DuplicateLine(f64),
    SwapLines(f64, f64),
    DeleteBytes(f64, usize),
    Truncate(f64),
    Insert(f64, String),
    /// The n-th number (of any found) becomes this.
    Number(usize, String),
    /// The n-th string literal or scalar becomes this.
    Word(usize, String),
    Indent(f64, bool),
}

fn edit(
    inserts: BoxedStrategy<String>,
    values: &'static [&'static str],
) -> impl Strategy<Value = Edit> {
    let at = || 0.0..1.0f64;
    prop_oneof![
        (at()).prop_map(Edit::DeleteLine),
        (at()).prop_map(Edit::DuplicateLine),
        (at(), at()).prop_map(|(a, b)| Edit::SwapLines(a, b)),
        (at(), 1..40usize).prop_map(|(a, n)| Edit::DeleteBytes(a, n)),
        (at()).prop_map(Edit::Truncate),
        (at(), inserts.clone()).prop_map(|(a, s)| Edit::Insert(a, s)),
        (any::<usize>(), proptest::sample::select(values))
            .prop_map(|(n, v)| Edit::Number(n, v.to_string())),
        (any::<usize>(), inserts).prop_map(|(n, s)| Edit::Word(n, s)),
        (at(), any::<bool>()).prop_map(|(a, more)| Edit::Indent(a, more)),
    ]
}

fn index(frac: f64, len: usize) -> usize {
    ((frac * len as f64) as usize).min(len.saturating_sub(1))
}

/// A byte range of a text.
type Span = (usize, usize);

/// Byte ranges of the numbers and of the words (string literals or bare
/// scalars) of a text.
fn spans(text: &str) -> (Vec<Span>, Vec<Span>) {
    let (mut numbers, mut words) = (Vec::new(), Vec::new());
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_digit() && (i == 0 || !bytes[i - 1].is_ascii_alphanumeric()) {
            let start = i;
            while i < bytes.len()
                && (bytes[i].is_ascii_digit() || bytes[i] == b'.' || bytes[i] == b'e')
            {
                i += 1;
            }
            numbers.push((start, i));
        } else if c == b'"' {
            let start = i;
            i += 1;
            while i < bytes.len() && bytes[i] != b'"' && bytes[i] != b'\n' {
                i += 1;
            }
            i = (i + 1).min(bytes.len());
            words.push((start, i));
        } else if c.is_ascii_alphabetic() {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            words.push((start, i));
        } else {
            i += 1;
        }
    }
    (numbers, words)
}

fn apply(text: &str, edit: &Edit) -> String {
    let mut lines: Vec<&str> = text.lines().collect();
    let floor = |s: &str, mut i: usize| {
        i = i.min(s.len());
        while !s.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    let replace = |spans: &[Span], n: usize, with: &str| {
        if spans.is_empty() {
            return text.to_string();
        }
        let (a, b) = spans[n % spans.len()];
        format!("{}{with}{}", &text[..a], &text[b..])
    };
    match edit {
        Edit::DeleteLine(a) if !lines.is_empty() => {
            lines.remove(index(*a, lines.len()));
            lines.join("\n")
        }
        Edit::DuplicateLine(a) if !lines.is_empty() => {
            let i = index(*a, lines.len());
            lines.insert(i, lines[i]);
            lines.join("\n")
        }
        Edit::SwapLines(a, b) if !lines.is_empty() => {
            let n = lines.len();
            lines.swap(index(*a, n), index(*b, n));
            lines.join("\n")
        }
        Edit::DeleteBytes(a, n) => {
            let start = floor(text, index(*a, text.len()));
            let end = floor(text, start + n);
            format!("{}{}", &text[..start], &text[end..])
        }
        Edit::Truncate(a) => text[..floor(text, index(*a, text.len()))].to_string(),
        Edit::Insert(a, s) => {
            let at = floor(text, index(*a, text.len()));
            format!("{}{s}{}", &text[..at], &text[at..])
        }
        Edit::Number(n, v) => replace(&spans(text).0, *n, v),
        Edit::Word(n, v) => replace(&spans(text).1, *n, v),
        Edit::Indent(a, more) if !lines.is_empty() => {
            let i = index(*a, lines.len());
            let line = lines[i].to_string();
            let changed = if *more {
                format!("  {line}")
            } else {
                line.strip_prefix("  ").unwrap_or(&line).to_string()
            };
            let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
            out[i] = changed;
            out.join("\n")
        }
        _ => text.to_string(),
    }
}

proptest! {
    #![proptest_config(config(RANDOM_BYTES_CASES))]
    #[test]
    fn random_bytes_plan_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        plan_quietly(Path::new("fuzz.rhai"), &String::from_utf8_lossy(&bytes));
    }
}

proptest! {
    #![proptest_config(config(TOKEN_SOUP_CASES))]
    #[test]
    fn token_soup_plans_without_panicking(tokens in proptest::collection::vec(token(), 1..40)) {
        plan_quietly(Path::new("fuzz.rhai"), &tokens.join(" "));
    }
}

proptest! {
    #![proptest_config(config(API_PROGRAM_CASES))]
    #[test]
    fn api_programs_plan_without_panicking(program in api_program()) {
        plan_quietly(Path::new("fuzz.rhai"), &program);
    }
}

fn recipe_edit() -> impl Strategy<Value = Edit> {
    edit(token().boxed(), numbers())
}

/// The shipped recipes, slow ones or the others.
fn recipes(slow: bool) -> Vec<&'static (PathBuf, String)> {
    let found: Vec<_> = shipped_recipes()
        .iter()
        .filter(|(p, _)| is_slow(p) == slow)
        .collect();
    assert!(
        !found.is_empty(),
        "no {} recipes",
        if slow { "slow" } else { "other" }
    );
    found
}

fn mutated_recipe(slow: bool) -> impl Strategy<Value = (PathBuf, String)> {
    let pool = recipes(slow);
    (
        0..pool.len(),
        proptest::collection::vec(recipe_edit(), 1..4),
    )
        .prop_map(move |(which, edits)| {
            let (path, text) = pool[which];
            let text = edits.iter().fold(text.clone(), |t, e| apply(&t, e));
            (path.clone(), text)
        })
}

proptest! {
    #![proptest_config(config(MUTATED_RECIPE_CASES))]
    #[test]
    fn mutated_recipes_plan_without_panicking((path, text) in mutated_recipe(false)) {
        plan_quietly(&path, &text);
    }
}

proptest! {
    #![proptest_config(config(MUTATED_SLOW_RECIPE_CASES))]
    #[test]
    fn mutated_slow_recipes_plan_without_panicking((path, text) in mutated_recipe(true)) {
        plan_quietly(&path, &text);
    }
}

/// The plans of shipped recipes that plan without data or weights (one
/// with script schedules, one a sweep), as YAML.
fn real_plans() -> &'static [String] {
    static PLANS: OnceLock<Vec<String>> = OnceLock::new();
    PLANS.get_or_init(|| {
        let root = recipes_dir();
        [
            "quickstart.rhai",
            "examples/three_losses.rhai",
            "examples/seed_sweep.rhai",
        ]
        .iter()
        .map(|rel| {
            let recipe = Recipe::load(root.join(rel), &[]).expect("a shipped recipe compiles");
            let plans = recipe
                .with_printer(|_| {})
                .plans(registry())
                .expect("it plans");
            to_yaml(&plans).expect("plans serialise")
        })
        .collect()
    })
}

/// Values that YAML readers trip on.
const YAML_VALUES: &[&str] = &[
    ".nan",
    "-.inf",
    ".inf",
    "nan",
    "-1",
    "-0",
    "0",
    "1e309",
    "-1e309",
    "1.5",
    "18446744073709551616",
    "-9223372036854775809",
    "9223372036854775807",
    "0x10",
    "1_000",
    "~",
    "null",
    "true",
    "\"\"",
    "''",
    "[]",
    "{}",
    "- x",
    "{ a: 1 }",
    "&a x",
    "*a",
    "!!binary AAAA",
    "!!str",
    "|",
    ">",
    "'unterminated",
    "\"\\u0000\"",
    "x: y: z",
    "? x",
    "---",
    "...",
    "ü",
    "script",
    "schedule",
    "cosine",
    "warmup",
    "step",
    "constant",
    "synthetic",
    "cifar100",
];

fn yaml_insert() -> BoxedStrategy<String> {
    prop_oneof![
        3 => proptest::sample::select(YAML_VALUES).prop_map(str::to_string),
        1 => "[ -~]{0,20}",
        1 => Just("\n".to_string()),
        1 => Just("\n  - ".to_string()),
    ]
    .boxed()
}

fn mutated_plan_yaml(edits: std::ops::Range<usize>) -> impl Strategy<Value = String> {
    (
        0..real_plans().len(),
        proptest::collection::vec(edit(yaml_insert(), YAML_VALUES), edits),
    )
        .prop_map(|(which, edits)| {
            edits
                .iter()
                .fold(real_plans()[which].clone(), |t, e| apply(&t, e))
        })
}

/// Reads a YAML text as text and from the file `name`, and writes back
/// what parses.
fn read_quietly(text: &str, name: &str) {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("a temporary folder"));
    if let Ok(plans) = from_yaml(text, "fuzz") {
        let _ = to_yaml(&plans);
    }
    let file = dir.path().join(name);
    if std::fs::write(&file, text).is_ok() {
        let _ = read_plans(&file);
    }
}

proptest! {
    #![proptest_config(config(RANDOM_YAML_CASES))]
    #[test]
    fn random_yaml_reads_without_panicking(
        text in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300)
                .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            proptest::collection::vec(yaml_insert(), 0..30).prop_map(|v| v.join(" ")),
        ],
    ) {
        read_quietly(&text, "random.yaml");
    }
}

proptest! {
    #![proptest_config(config(MUTATED_YAML_CASES))]
    #[test]
    fn mutated_plan_yaml_reads_without_panicking(text in mutated_plan_yaml(1..4)) {
        read_quietly(&text, "mutated.yaml");
    }
}

proptest! {
    #![proptest_config(config(VALIDATED_YAML_CASES))]
    /// Plans read from mutated YAML go on to `kd_recipes::validate`, as
    /// `kd run plan.yaml` does; the first plan only, as checking one builds
    /// its models.
    #[test]
    fn mutated_plans_validate_without_panicking(text in mutated_plan_yaml(1..3)) {
        static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
        let scripts = SCRIPTS.get_or_init(Scripts::new);
        if let Some(plan) = from_yaml(&text, "fuzz").ok().and_then(|p| p.into_iter().next()) {
            let _ = kd_recipes::validate(&plan, registry(), scripts);
        }
    }
}
