//! Every way a recipe can grow its data is held to the sandbox's limits,
//! with a one-line message naming the limit and its value, and no recipe
//! grows the process by more than about 256 MiB.

mod common;

use std::sync::Mutex;

use common::{TINY, located, plan};
use kd_recipes::limits;

/// Tests here measure the process's memory, and a recipe's memory budget
/// counts what other threads allocate: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn map_limit() -> [String; 2] {
    [
        "map size limit exceeded".into(),
        format!("{} entries", limits::MAP_SIZE),
    ]
}

fn array_limit() -> [String; 2] {
    [
        "array size limit exceeded".into(),
        format!("{} items", limits::ARRAY_SIZE),
    ]
}

fn string_limit() -> [String; 2] {
    [
        "string size limit exceeded".into(),
        format!("{} bytes", limits::STRING_SIZE),
    ]
}

fn memory_limit() -> [String; 2] {
    [
        "memory limit exceeded".into(),
        format!("{} MiB", limits::MEMORY >> 20),
    ]
}

/// A string of almost 1 MiB in `s`: the largest a value may hold.
const MIB_STRING: &str = "let s = \"x\"; s.pad(1000000, \"x\");\n";

/// Plans each source (ending in `throw "escaped"`, which only a recipe the
/// limits did not stop reaches) and checks that it fails with one line
/// naming `limit`.
#[track_caller]
fn refused(sources: &[&str], limit: &[String; 2]) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for src in sources {
        let src = format!("{src}\nthrow \"escaped\";\n");
        let (.., message) = located(plan(&src));
        for needle in limit {
            assert!(
                message.contains(needle.as_str()),
                "`{needle}` not in `{message}`, from:\n{src}"
            );
        }
        assert!(!message.contains('\n'), "{message}");
    }
}

#[test]
fn map_index_and_property_assignment_hold_the_map_limit() {
    refused(
        &[
            "let m = #{}; for i in 0..20000 { m[`k${i}`] = i; }",
            "let m = #{ a: #{} }; for i in 0..20000 { m.a[`k${i}`] = i; }",
            "let m = [#{}]; for i in 0..20000 { m[0][`k${i}`] = i; }",
            "let m = #{}; for i in 0..20000 { m[`k${i}`] = #{}; m[`k${i}`].x = i; }",
            // Through `this` in a method, and through a closure's capture.
            "fn fill(n) { for i in 0..n { this[`k${i}`] = i; } }\nlet m = #{}; m.fill(20000);",
            "let m = #{}; let add = |k| { m[k] = 1; };\nfor i in 0..20000 { add.call(`k${i}`); }",
        ],
        &map_limit(),
    );
}

#[test]
fn map_functions_and_operators_hold_the_map_limit() {
    refused(
        &[
            "let m = #{}; for i in 0..20000 { m.set(`k${i}`, i); }",
            "let m = #{}; for i in 0..20000 { let o = #{}; o[`k${i}`] = i; m.mixin(o); }",
            "let m = #{}; for i in 0..20000 { let o = #{}; o[`k${i}`] = i; m += o; }",
            "let m = #{}; for i in 0..20000 { let o = #{}; o[`k${i}`] = i; m = m + o; }",
            "let m = #{}; for i in 0..20000 { let o = #{}; o[`k${i}`] = i; m.fill_with(o); }",
            // Maps nested in an array count together.
            "let mm = #{}; for i in 0..6000 { mm[`k${i}`] = i; }\nlet a = []; for i in 0..10 { a.push(mm); }",
        ],
        &map_limit(),
    );
}

#[test]
fn array_functions_and_operators_hold_the_array_limit() {
    let full = "let a = []; a.pad(99990, 0);\n";
    let sources: Vec<String> = [
        "for i in 0..100 { a.push(i); }",
        "for i in 0..100 { a += i; }",
        "for i in 0..100 { a += [i, i]; }",
        "for i in 0..100 { a.insert(0, i); }",
        "for i in 0..100 { a.append([i]); }",
        "for i in 0..100 { a = a + [i]; }",
        "for i in 0..100 { a.splice(0, 0, [i, i]); }",
        "a.pad(100001, 0);",
        "for i in range(0, 100) { a.push(i); }",
        "for c in \"a long enough string\" { a.push(c); }",
        "for i in 0..100 { a += a; }",
    ]
    .iter()
    .map(|s| format!("{full}{s}"))
    .collect();
    let mut sources: Vec<&str> = sources.iter().map(String::as_str).collect();
    sources.extend([
        "let a = [1]; for i in 0..30 { a = a + a; }",
        "let s = \"x\"; s.pad(200000, \"x\"); let parts = s.split(\"\");",
        "let b = blob(100001);",
        "let b = blob(60000); b += b;",
        "let b = blob(60000); b.append(b);",
        "let b = blob(1); b.pad(100001, 0);",
        "let b = blob(60000); let a = []; for i in 0..10 { a.push(b); }",
    ]);
    refused(&sources, &array_limit());
}

#[test]
fn replacing_elements_and_growing_nested_arrays_hold_the_array_limit() {
    refused(
        &[
            "let big = []; big.pad(60000, 0);\nlet a = []; a.pad(100, ()); for i in 0..100 { a[i] = big; }",
            "let big = []; big.pad(60000, 0);\nlet m = #{}; for i in 0..100 { m[`k${i}`] = big; }",
            "let a = []; for i in 0..100 { a.push([]); }\nfor i in 0..100 { a[i].pad(1500, 0); }",
            "let a = [[], []]; let chunk = []; chunk.pad(1000, 0);\nfor i in 0..200 { a[i % 2].append(chunk); }",
            "let m = #{}; for i in 0..200 { m[`l${i}`] = []; m[`l${i}`].pad(1000, 0); }",
            "let m = #{ a: [], b: [] }; m.a.pad(99000, 0);\nfor i in 0..2000 { m.b.push(i); }",
            // Rhai's own check of `pad` overflows for so large a length.
            "let a = []; a.pad(4611686018427387904, [1, 2, 3]);",
        ],
        &array_limit(),
    );
}

#[test]
fn strings_hold_the_string_limit() {
    let with_mib = |tail: &str| format!("{MIB_STRING}{tail}");
    let sources = [
        "let s = \"x\"; for i in 0..40 { s += s; }".to_string(),
        "let s = \"x\"; for i in 0..40 { s = s + s; }".into(),
        "let s = \"x\"; for i in 0..40 { s = `${s}${s}`; }".into(),
        "let s = \"x\"; for i in 0..40 { s.append(s); }".into(),
        "let s = \"\"; s.pad(2000000, \"x\");".into(),
        "let m = #{ s: \"x\" }; for i in 0..40 { m.s += m.s; }".into(),
        with_mib("for i in 0..100000 { s += 'x'; }"),
        with_mib("let a = []; a.pad(10, 0); for i in 0..10 { a[i] = s + i; }"),
        with_mib("let m = #{}; for i in 0..10 { m[`k${i}`] = s + i; }"),
        // Keys count: Rhai counts only a map's values.
        with_mib("let m = #{}; for i in 0..10 { m[s + i] = i; }"),
        with_mib("let a = []; for i in 0..10 { a.push(s + i); }"),
        "let a = []; a.pad(99000, 123456789); let d = a.to_debug(); let t = d + d + d;".into(),
        "let a = []; a.pad(4611686018427387904, \"abc\");".into(),
    ];
    let sources: Vec<&str> = sources.iter().map(String::as_str).collect();
    refused(&sources, &string_limit());
}

#[test]
fn closures_api_objects_and_deep_recursion_hold_the_memory_limit() {
    let sources = [
        // Values a closure captures or a pointer curries are not sizes
        // Rhai counts in the array holding them.
        format!("{MIB_STRING}let a = []; for i in 0..1000 {{ let t = s + i; a.push(|| t); }}"),
        format!(
            "fn f(x) {{ x }}\n{MIB_STRING}let a = []; for i in 0..1000 {{ a.push(Fn(\"f\").curry(s + i)); }}"
        ),
        // The API's objects hold what they are given.
        format!("{MIB_STRING}let a = []; for i in 0..1000 {{ a.push(experiment(s + i)); }}"),
        // Each value within its limits, but many of them at once.
        "fn f(n) { let a = []; a.pad(99000, 0); let b = []; b.pad(99000, 0); if n > 0 { f(n - 1); } }\nf(62);"
            .into(),
    ];
    let sources: Vec<&str> = sources.iter().map(String::as_str).collect();
    refused(&sources, &memory_limit());
}

#[test]
fn a_schedule_holds_the_limits_while_the_recipe_plans() {
    let src = format!(
        "fn w(p) {{ let big = []; big.pad(60000, 0); let m = #{{}}; for i in 0..10 {{ m[`k${{i}}`] = big; }} 1.0 }}\nlet x = {TINY}.add(stage(\"s\", 1).add(method(\"ce\").weight(Fn(\"w\"))));\nrun(x);"
    );
    refused(&[&src], &array_limit());
}

#[test]
fn expressions_hold_the_depth_limit() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let src = format!("let x = {}1{};\n", "(".repeat(100), ")".repeat(100));
    let (.., message) = located(plan(&src));
    assert!(
        message.contains("expression depth limit exceeded")
            && message.contains(&format!("{} deep", limits::EXPR_DEPTH)),
        "{message}"
    );
}

/// `field` of /proc/self/status, in KiB.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

#[test]
fn a_recipe_cannot_grow_the_process_past_256_mib() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let recipes = [
        // The report that started this: three lines, 1.1 GB.
        "let m = #{};\nfor i in 0..3000000 { m[`a key long enough to live on the heap ${i}`] = i; }\nprint(m.len());".to_string(),
        "let big = []; big.pad(99000, 0);\nlet a = []; a.pad(1000, ()); for i in 0..1000 { a[i] = big; }".into(),
        "let a = []; for i in 0..1000 { a.push([]); }\nfor i in 0..1000 { a[i].pad(99000, 0); }".into(),
        "let s = \"x\"; loop { s += s; }".into(),
        format!("{MIB_STRING}let m = #{{}}; for i in 0..1000 {{ m[`k${{i}}`] = s + i; }}"),
        "let mm = #{}; for i in 0..9999 { mm[`k${i}`] = i; }\nlet a = []; for i in 0..1000 { a.push(mm); }".into(),
        "let mm = #{}; for i in 0..9999 { mm[`k${i}`] = i; }\nlet m = #{}; for i in 0..1000 { m[`k${i}`] = mm; }".into(),
        format!("{MIB_STRING}let a = []; for i in 0..3000 {{ let t = s + i; a.push(|| t); }}"),
        format!("{MIB_STRING}let a = []; for i in 0..3000 {{ a.push(experiment(s + i)); }}"),
        "fn f(n) { let a = []; a.pad(99000, 0); let b = []; b.pad(99000, 0); let c = []; c.pad(99000, 0); if n > 0 { f(n - 1); } }\nf(62);".into(),
    ];
    for src in &recipes {
        let before = status_kib("VmRSS:");
        // Resets the peak to the current size, so that the peak read after
        // is this recipe's (Linux 4.0 and later; else the peak of the
        // process so far, which only makes the check stricter).
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        let result = plan(src);
        let peak = status_kib("VmHWM:");
        let grown = peak.saturating_sub(before) >> 10;
        assert!(grown < 256, "grew the process by {grown} MiB:\n{src}");
        let (.., message) = located(result);
        assert!(message.contains("limit exceeded"), "{message}\n{src}");
    }
}
