//! Trustworthy runs: a run folder is one run, `--resume` continues the plan
//! it saved (or refuses, writing nothing), bad input is refused before
//! anything trains, and errors are one line that says each thing once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("golden/fixtures")
        .join(name)
}

/// The error as `kd` prints it, checked to be one line in which no part
/// repeats.
fn err(args: &[String]) -> String {
    let e = kd_cli::run(args).expect_err("the command should fail");
    let msg = kd_cli::one_line(&e);
    assert!(!msg.contains('\n'), "error is not one line: {msg}");
    let parts: Vec<&str> = msg.split(": ").filter(|p| p.len() >= 12).collect();
    for (i, p) in parts.iter().enumerate() {
        assert!(!parts[i + 1..].contains(p), "`{p}` repeats in: {msg}");
    }
    assert!(!msg.contains("Os {"), "Rust debug formatting in: {msg}");
    msg
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// `kd distill` of resnet8 from the golden resnet20, 64 samples, into `out`.
fn distill(out: &Path, extra: &[&str]) -> Vec<String> {
    let w = golden("model_resnet20.safetensors");
    let mut a = args(&[
        "kd",
        "distill",
        "--teacher",
        "resnet20",
        "--teacher-weights",
        w.to_str().unwrap(),
        "--student",
        "resnet8",
        "--method",
        "st",
        "--train-size",
        "64",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--name",
        "x",
        "--out",
        out.to_str().unwrap(),
    ]);
    a.extend(args(extra));
    a
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn epochs_logged(run: &Path) -> usize {
    std::fs::read_to_string(run.join("epochs.jsonl"))
        .unwrap()
        .lines()
        .count()
}

#[test]
fn a_run_folder_is_one_run() {
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("x_s0");
    kd_cli::run(distill(out.path(), &["--epochs", "1"])).unwrap();
    let before = snapshot(out.path());

    // Running the same name again is refused and changes nothing.
    let e = err(&distill(out.path(), &["--epochs", "1"]));
    assert!(
        e.contains("already holds run `x_s0`")
            && e.contains("--resume")
            && e.contains("--overwrite"),
        "{e}"
    );
    assert_eq!(snapshot(out.path()), before, "a refused start wrote");

    // A resume with another plan is refused, naming the fields, and writes
    // nothing; more epochs needs --extend.
    let e = err(&distill(
        out.path(),
        &["--epochs", "1", "--lr", "0.1", "--resume"],
    ));
    assert!(e.contains("stages.0.optimizer.lr: 0.05 -> 0.1"), "{e}");
    let e = err(&distill(out.path(), &["--epochs", "2", "--resume"]));
    assert!(
        e.contains("stages.0.epochs: 1 -> 2") && e.contains("--extend"),
        "{e}"
    );
    let mut other = distill(out.path(), &["--epochs", "2", "--resume", "--extend"]);
    let i = other.iter().position(|a| a == "resnet8").unwrap();
    other[i] = "resnet14".into();
    let e = err(&other);
    assert!(e.contains("student.arch: resnet8 -> resnet14"), "{e}");
    assert_eq!(snapshot(out.path()), before, "a refused resume wrote");

    // Resuming a run that never existed is an error.
    let mut typo = distill(out.path(), &["--epochs", "1", "--resume"]);
    let i = typo.iter().position(|a| a == "x").unwrap();
    typo[i] = "y".into();
    let e = err(&typo);
    assert!(e.contains("nothing to resume"), "{e}");
    assert!(!out.path().join("y_s0").exists());

    // --overwrite archives the old run and starts a new one.
    kd_cli::run(distill(out.path(), &["--epochs", "1", "--overwrite"])).unwrap();
    let archive: Vec<PathBuf> = std::fs::read_dir(out.path().join(".archive"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(archive.len(), 1, "{archive:?}");
    assert_eq!(
        std::fs::read(archive[0].join("journal.jsonl")).unwrap(),
        before[&run.join("journal.jsonl")],
        "the archive holds the old run as it was"
    );
    let journal = std::fs::read_to_string(run.join("journal.jsonl")).unwrap();
    assert!(
        journal.matches("\"ev\":\"start\"").count() == 1 && !journal.contains("\"ev\":\"resume\""),
        "the new folder's journal is one new run: {journal}"
    );
}

/// `--extend` trains the last stage on from the checkpoint: 1 epoch then 1
/// more equals 2 epochs straight (constant learning rate), bit for bit.
#[test]
fn an_extended_run_equals_the_longer_run() {
    extended_equals_straight("st");
}

/// The same for MLKD, whose batches carry a second, strongly augmented view
/// drawn from a stream of its own: it too is rebuilt exactly on resume.
#[test]
fn an_extended_run_with_the_augmented_view_equals_the_longer_run() {
    extended_equals_straight("mlkd");
}

fn extended_equals_straight(method: &str) {
    let with = |out: &Path, extra: &[&str]| {
        let mut a = distill(out, extra);
        let i = a.iter().position(|x| x == "st").unwrap();
        a[i] = method.to_string();
        a
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    kd_cli::run(with(a.path(), &["--epochs", "2"])).unwrap();
    kd_cli::run(with(b.path(), &["--epochs", "1"])).unwrap();
    // A plain resume of a finished run leaves it as it is.
    kd_cli::run(with(b.path(), &["--epochs", "1", "--resume"])).unwrap();
    assert_eq!(epochs_logged(&b.path().join("x_s0")), 1);
    kd_cli::run(with(b.path(), &["--epochs", "2", "--resume", "--extend"])).unwrap();
    if method == "mlkd" {
        let log = std::fs::read_to_string(b.path().join("x_s0/epochs.jsonl")).unwrap();
        assert!(
            log.contains("mlkd/kd_strong") && log.contains("mlkd/ce_strong"),
            "the strong view's terms are trained: {log}"
        );
    }
    assert_eq!(epochs_logged(&b.path().join("x_s0")), 2);
    let w = |d: &Path| kd_engine::tensors::read(&d.join("x_s0/distill.last.safetensors")).unwrap();
    let (wa, wb) = (w(a.path()), w(b.path()));
    assert_eq!(wa.tensors.len(), wb.tensors.len());
    for ((n, x), (_, y)) in wa.tensors.iter().zip(&wb.tensors) {
        assert!(x.equal(y), "{n} differs between extended and straight runs");
    }
    let plan = std::fs::read_to_string(b.path().join("x_s0/plan.yaml")).unwrap();
    assert!(
        plan.contains("epochs: 2"),
        "plan.yaml records the extension"
    );
}

#[test]
fn bad_numbers_and_files_are_refused_before_anything_trains() {
    let out = tempfile::tempdir().unwrap();
    let p = out.path();
    for (extra, want) in [
        (
            vec!["--lr", "nan"],
            "lr must be a finite number > 0, got NaN",
        ),
        (vec!["--lr=-1"], "lr must be a finite number > 0, got -1"),
        (vec!["--momentum=-5"], "momentum must be in [0, 1), got -5"),
        (
            vec!["--weight-decay=-1"],
            "weight_decay must be a finite number >= 0",
        ),
        (
            vec!["--method", "at:inf"],
            "weight: must be a finite number, got inf",
        ),
    ] {
        let mut a = distill(p, &["--epochs", "1"]);
        if extra[0] == "--method" {
            // Replace `st` rather than adding a second method.
            let i = a.iter().position(|x| x == "st").unwrap();
            a[i] = extra[1].to_string();
        } else {
            a.extend(args(&extra));
        }
        let e = err(&a);
        assert!(e.contains(want), "{extra:?}: {e}");
    }
    let mut a = distill(p, &["--epochs", "1"]);
    let i = a.iter().position(|x| x == "st").unwrap();
    a[i] = "st:nan".into();
    assert!(err(&a).contains("weight: must be a finite number, got NaN"));
    assert!(
        std::fs::read_dir(p).unwrap().next().is_none(),
        "nothing may be written"
    );
}

#[test]
fn weight_file_errors_say_what_is_wrong_once() {
    let dir = tempfile::tempdir().unwrap();
    let with_weights = |w: &Path| {
        let mut a = distill(dir.path(), &["--epochs", "1"]);
        let i = a.iter().position(|x| x == "--teacher-weights").unwrap();
        a[i + 1] = w.display().to_string();
        err(&a)
    };
    let missing = dir.path().join("nope.safetensors");
    assert!(with_weights(&missing).contains("nope.safetensors: no such file"));
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"not a tensor file at all").unwrap();
    let e = with_weights(&garbage);
    assert!(e.contains("not a safetensors file"), "{e}");
    // torch.save's zip container, by its magic bytes.
    let pth = dir.path().join("resnet20.pth");
    std::fs::write(&pth, b"PK\x03\x04rest of a zip archive").unwrap();
    let e = with_weights(&pth);
    assert!(
        e.contains("PyTorch checkpoint") && e.contains("safetensors.torch"),
        "{e}"
    );
    let e = with_weights(&golden("model_resnet8x4.safetensors"));
    assert!(e.contains("do not fit the model"), "{e}");
}

#[test]
fn a_recipe_checks_every_run_before_the_first_trains() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("two.rhai");
    let body = r#"
let data = synthetic(#{ train_size: 64, test_size: 32 }).batch_size(32);
let a = experiment("a").device("cpu").data(data).student("resnet8")
    .add(stage("train", 1).add(method("ce")));
run(a);
let b = experiment("b").device("cpu").data(data).student("resnet8")
    .teacher("resnet20", "TEACHER")
    .add(stage("distill", 1).add(method("ce")).add(method("st")));
run(b);
"#;
    let out = dir.path().join("runs");
    let run = |teacher: &str, lr: &str| {
        let text = body.replace("TEACHER", teacher).replace(
            "stage(\"train\", 1)",
            &format!("stage(\"train\", 1).lr({lr})"),
        );
        std::fs::write(&recipe, text).unwrap();
        err(&args(&[
            "kd",
            "run",
            recipe.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]))
    };
    let e = run("missing.safetensors", "0.05");
    assert!(e.contains("missing.safetensors: no such file"), "{e}");
    assert!(!out.exists(), "the first run must not start");
    let e = run(
        golden("model_resnet20.safetensors").to_str().unwrap(),
        "0.0/0.0",
    );
    assert!(e.contains("lr must be a finite number > 0"), "{e}");
    assert!(!out.exists(), "the first run must not start");
    // `kd plan` refuses it too.
    let e = err(&args(&["kd", "plan", recipe.to_str().unwrap()]));
    assert!(e.contains("lr must be a finite number > 0"), "{e}");
}

#[test]
fn kd_plan_reads_saved_plans() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/quickstart.rhai");
    let plans = kd_recipes::Recipe::load(&recipe, &[])
        .unwrap()
        .plans(&kd_core::Registry::global().unwrap())
        .unwrap();
    let yaml = dir.path().join("plan.yaml");
    std::fs::write(&yaml, kd_recipes::to_yaml(&plans).unwrap()).unwrap();
    kd_cli::run(args(&["kd", "plan", yaml.to_str().unwrap()])).unwrap();
    let mut bad = plans.clone();
    bad[0].stages[0].optimizer.momentum = 1.5;
    std::fs::write(&yaml, kd_recipes::to_yaml(&bad).unwrap()).unwrap();
    let e = err(&args(&["kd", "plan", yaml.to_str().unwrap()]));
    assert!(e.contains("momentum must be in [0, 1), got 1.5"), "{e}");
}

#[test]
fn path_mistakes_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let e = err(&args(&["kd", "run", d]));
    assert!(e.contains("is a folder; give a recipe"), "{e}");
    let missing = dir.path().join("missing");
    let e = err(&args(&[
        "kd",
        "sync",
        missing.to_str().unwrap(),
        "--tracking-uri",
        "http://127.0.0.1:9",
    ]));
    assert!(e.contains("no such folder"), "{e}");
}

#[test]
fn run_and_plan_options_have_help() {
    for cmd in [
        "run",
        "plan",
        "distill",
        "train-teacher",
        "sync",
        "mlflow up",
        "mlflow status",
        "mlflow down",
    ] {
        let mut words = vec!["kd"];
        words.extend(cmd.split(' '));
        words.push("--help");
        let e = kd_cli::run(words).unwrap_err();
        let help = e
            .downcast_ref::<clap::Error>()
            .unwrap()
            .render()
            .to_string();
        let lines: Vec<&str> = help.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let line = line.trim();
            if !line.starts_with('-') {
                continue;
            }
            // The text follows the flag, or (long help) fills the next line.
            let (flag, same) = line.split_once("  ").unwrap_or((line, ""));
            let next = lines.get(i + 1).map_or("", |l| l.trim());
            let text = if same.trim().is_empty() && !next.starts_with('-') {
                next
            } else {
                same
            };
            let words = text.split('[').next().unwrap_or_default();
            assert!(
                !words.trim().is_empty(),
                "kd {cmd}: `{flag}` has no help text"
            );
        }
    }
}

/// `kd probe loss` on a fixture edited by `edit`; the error, or "ok".
fn probe_loss(
    dir: &Path,
    fixture: &str,
    edit: &dyn Fn(&mut kd_engine::tensors::TensorFile),
) -> String {
    let mut f = kd_engine::tensors::read(&golden(fixture)).unwrap();
    edit(&mut f);
    let path = dir.join("f.safetensors");
    kd_engine::tensors::write(&path, &f).unwrap();
    let out = dir.join("o.safetensors");
    let a = args(&[
        "kd",
        "probe",
        "loss",
        "--fixture",
        path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    match kd_cli::run(&a) {
        Ok(()) => "ok".into(),
        Err(e) => kd_cli::one_line(&e),
    }
}

fn replace(f: &mut kd_engine::tensors::TensorFile, name: &str, t: tch::Tensor) {
    let slot = f.tensors.iter_mut().find(|(n, _)| n == name).unwrap();
    slot.1 = t;
}

#[test]
fn probe_refuses_bad_tensors_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_eq!(probe_loss(d, "st.safetensors", &|_| {}), "ok");
    let e = probe_loss(d, "st.safetensors", &|f| {
        let t = f.get("batch/target").unwrap().fill(999);
        replace(f, "batch/target", t)
    });
    assert!(e.contains("holds labels 999..=999, outside 0.."), "{e}");
    let e = probe_loss(d, "st.safetensors", &|f| {
        let t = f.get("teacher/logits").unwrap().narrow(0, 0, 1);
        replace(f, "teacher/logits", t)
    });
    assert!(e.contains("`teacher/logits` has shape [1,"), "{e}");
    // A shape only the method's own ops can reject: libtorch's refusal,
    // as an error.
    let e = probe_loss(d, "st.safetensors", &|f| {
        let t = f.get("teacher/logits").unwrap();
        let wrong = tch::Tensor::zeros([t.size()[0], 7], tch::kind::FLOAT_CPU);
        replace(f, "teacher/logits", wrong)
    });
    assert!(
        e.contains("libtorch refused the fixture's tensors: The size of tensor a (7) must match")
            && !e.contains("Exception raised from"),
        "{e}"
    );
}

/// An augmented view (MLKD's strong view) comes as both networks' taps, with
/// the batch's size, and only to a method that asks for one.
#[test]
fn probe_checks_the_augmented_view() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_eq!(probe_loss(d, "mlkd.safetensors", &|_| {}), "ok");
    let e = probe_loss(d, "mlkd.safetensors", &|f| {
        f.tensors.retain(|(n, _)| n != "aug/teacher/logits")
    });
    assert!(
        e.contains("needs both `aug/student/<tap>` and `aug/teacher/<tap>`"),
        "{e}"
    );
    let e = probe_loss(d, "mlkd.safetensors", &|f| {
        let t = f.get("aug/student/logits").unwrap().narrow(0, 0, 1);
        replace(f, "aug/student/logits", t)
    });
    assert!(e.contains("`aug/student/logits` has shape [1,"), "{e}");
    let e = probe_loss(d, "st.safetensors", &|f| {
        for side in ["student", "teacher"] {
            let t = f.get(&format!("{side}/logits")).unwrap().copy();
            f.push(format!("aug/{side}/logits"), &t);
        }
    });
    assert!(e.contains("method `st` asks for no augmented view"), "{e}");
}

/// The data options reach plans from the command line, and a name with no
/// constants for the data set is refused before training.
#[test]
fn data_options_on_the_command_line() {
    let out = tempfile::tempdir().unwrap();
    let e = err(&distill(
        out.path(),
        &["--epochs", "1", "--normalize", "kdzoo"],
    ));
    assert!(
        e.contains("normalize `kdzoo` has no constants for the synthetic set"),
        "{e}"
    );
    kd_cli::run(distill(
        out.path(),
        &["--epochs", "1", "--crop-padding", "reflect"],
    ))
    .unwrap();
    let plan = std::fs::read_to_string(out.path().join("x_s0/plan.yaml")).unwrap();
    assert!(plan.contains("crop_padding: reflect"), "{plan}");
}

/// Every run name a command will create is checked before anything is
/// written, so the corrected command is not refused by the remains of the
/// wrong one.
#[test]
fn run_names_are_checked_before_anything_is_written() {
    let out = tempfile::tempdir().unwrap();
    let p = out.path();
    let e = err(&distill(p, &["--epochs", "1", "--seeds", "0,0"]));
    assert!(e.contains("seed 0 twice"), "{e}");
    let e = err(&distill(p, &["--epochs", "1", "--compare", "st"]));
    assert!(e.contains("both named `st`"), "{e}");
    assert!(
        std::fs::read_dir(p).unwrap().next().is_none(),
        "a refused command wrote"
    );
    // The corrected command runs; --name names the baseline and the sweep.
    kd_cli::run(distill(
        p,
        &["--epochs", "1", "--seeds", "0,1", "--baseline"],
    ))
    .unwrap();
    let mut made: Vec<String> = std::fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    made.sort();
    assert_eq!(
        made,
        [
            "x_baseline_s0",
            "x_baseline_s1",
            "x_baseline_sweep",
            "x_s0",
            "x_s1",
            "x_sweep"
        ]
    );
    // Without --name, a --compare sweep is named after the command, not
    // after its first group.
    let q = tempfile::tempdir().unwrap();
    let mut a = distill(q.path(), &["--epochs", "1", "--compare", "at"]);
    let i = a.iter().position(|x| x == "--name").unwrap();
    a.drain(i..i + 2);
    kd_cli::run(a).unwrap();
    assert!(q.path().join("resnet8_from_resnet20_sweep").is_dir());
    assert!(q.path().join("resnet8_from_resnet20_st_s0").is_dir());
    assert!(q.path().join("resnet8_from_resnet20_at_s0").is_dir());
}

/// `--help` tells how run names are made.
#[test]
fn help_says_the_seed_suffix() {
    let e = kd_cli::run(["kd", "distill", "--help"]).unwrap_err();
    let help = e
        .downcast_ref::<clap::Error>()
        .unwrap()
        .render()
        .to_string();
    assert!(help.contains("`_s<seed>`"), "{help}");
}

/// A resume compares what the plans mean: a default given explicitly, the
/// same teacher through another path, a copy of it, and settings that
/// cannot change the numbers are no change; `--extend` is recorded.
#[test]
fn resume_compares_meaning_not_text() {
    let out = tempfile::tempdir().unwrap();
    let p = out.path();
    // The teacher through a linked folder, and as a copy.
    let teachers = tempfile::tempdir().unwrap();
    let linked = teachers.path().join("linked");
    std::os::unix::fs::symlink(golden(""), &linked).unwrap();
    let copy = teachers.path().join("copy.safetensors");
    std::fs::copy(golden("model_resnet20.safetensors"), &copy).unwrap();
    let with_teacher = |t: &Path, extra: &[&str]| {
        let mut a = distill(p, extra);
        let i = a.iter().position(|x| x == "--teacher-weights").unwrap();
        a[i + 1] = t.display().to_string();
        a
    };
    kd_cli::run(distill(p, &["--epochs", "1"])).unwrap();
    let run = p.join("x_s0");
    for a in [
        distill(p, &["--epochs", "1", "--resume", "--config", "st.T=4"]),
        with_teacher(
            &linked.join("model_resnet20.safetensors"),
            &["--epochs", "1", "--resume"],
        ),
        with_teacher(&copy, &["--epochs", "1", "--resume"]),
    ] {
        kd_cli::run(&a).unwrap_or_else(|e| panic!("{a:?}: {}", kd_cli::one_line(&e)));
    }
    // Other values are still refused.
    let e = err(&distill(
        p,
        &["--epochs", "1", "--resume", "--config", "st.T=3"],
    ));
    assert!(e.contains("config.T: 4.0 -> 3.0"), "{e}");
    let other = teachers.path().join("other.safetensors");
    {
        tch::manual_seed(7);
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        kd_models::build("resnet20", &vs.root(), 10).unwrap();
        kd_models::save_weights(&vs, &other).unwrap();
    }
    let e = err(&with_teacher(&other, &["--epochs", "1", "--resume"]));
    assert!(e.contains("teacher.weights"), "{e}");
    // --extend is recorded as the tag docs/runs.md promises.
    kd_cli::run(distill(p, &["--epochs", "2", "--resume", "--extend"])).unwrap();
    let journal = std::fs::read_to_string(run.join("journal.jsonl")).unwrap();
    assert!(
        journal.contains("kd.extended") && journal.contains("stages.0.epochs: 1 -> 2"),
        "{journal}"
    );
}

/// Contradictory flags are refused before anything trains, each naming
/// what to drop.
#[test]
fn contradictions_are_refused_before_training() {
    let out = tempfile::tempdir().unwrap();
    let p = out.path();
    let e = kd_cli::run(distill(p, &["--cosine", "--milestones", "1"])).unwrap_err();
    let e = e
        .downcast_ref::<clap::Error>()
        .expect("a usage error")
        .to_string();
    assert!(e.contains("--cosine") && e.contains("--milestones"), "{e}");
    let e = err(&distill(p, &["--epochs", "2", "--milestones", "5"]));
    assert!(
        e.contains("lr milestone 5 is past the end of the 2-epoch stage"),
        "{e}"
    );
    let mut digits = distill(p, &["--epochs", "1", "--data", "digits"]);
    let i = digits.iter().position(|x| x == "--train-size").unwrap();
    assert_eq!(digits[i + 1], "64");
    let e = err(&digits);
    assert!(
        e.contains("--train-size and --classes shape --data synthetic only"),
        "{e}"
    );
    digits.drain(i..i + 2);
    let e = err(&[digits.clone(), args(&["--classes", "4"])].concat());
    assert!(e.contains("--classes"), "{e}");
    let e = err(&distill(p, &["--epochs", "1", "--lr", "-1"]));
    assert!(e.contains("lr must be a finite number > 0, got -1"), "{e}");
    assert!(
        std::fs::read_dir(p).unwrap().next().is_none(),
        "nothing may be written"
    );
}

/// A misspelt method gets the nearest registered name.
#[test]
fn an_unknown_method_suggests_the_nearest() {
    let out = tempfile::tempdir().unwrap();
    let mut a = distill(out.path(), &["--epochs", "1"]);
    let i = a.iter().position(|x| x == "st").unwrap();
    a[i] = "att".into();
    let e = err(&a);
    assert!(
        e.contains("unknown method `att` (did you mean `at`?)"),
        "{e}"
    );
}

/// `kd mlflow status` fails when no server runs (scripts can test it).
#[test]
fn mlflow_status_without_a_server_fails() {
    let out = tempfile::tempdir().unwrap();
    let e = err(&args(&[
        "kd",
        "mlflow",
        "status",
        "--out",
        out.path().to_str().unwrap(),
    ]));
    assert!(
        e.contains("no MLflow server runs") && e.contains("kd mlflow up"),
        "{e}"
    );
}

/// `kd plan` prints plans only: the recipe's prints would show placeholder
/// results. (The binary, to see its stderr.)
#[test]
fn kd_plan_prints_no_placeholder_results() {
    let root = kd_tests::root();
    let o = std::process::Command::new(kd_tests::kd())
        .args([
            "plan",
            root.join("recipes/quickstart.rhai").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success());
    let (out, errs) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(out.contains("name: quickstart"), "{out}");
    assert!(
        !errs.contains("best top-1") && !out.contains("best top-1"),
        "{errs}"
    );
}

/// SIGTERM (torchrun, SLURM preemption, `docker stop`) stops a run like
/// Ctrl-C: at a safe point, KILLED, and the message gives the command that
/// continues it, which then does.
#[test]
fn sigterm_stops_at_a_safe_point_and_says_how_to_resume() {
    use std::io::{BufRead, BufReader};
    let kd = kd_tests::kd();
    let out = tempfile::tempdir().unwrap();
    let mut a = distill(out.path(), &["--epochs", "8"]);
    a.remove(0);
    let i = a.iter().position(|x| x == "--train-size").unwrap();
    a[i + 1] = "512".into();
    let mut child = std::process::Command::new(&kd)
        .args(&a)
        .current_dir(out.path())
        .env("OMP_NUM_THREADS", "1")
        .env_remove("MLFLOW_TRACKING_URI")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    // After the first epoch, a checkpoint exists: stop there.
    for line in lines.by_ref() {
        let line = line.unwrap();
        let epoch = line.contains(" epoch ");
        seen.push(line);
        if epoch {
            break;
        }
    }
    assert!(
        seen.iter().any(|l| l.contains("effective batch 32")),
        "{seen:?}"
    );
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    seen.extend(lines.map(|l| l.unwrap()));
    let status = child.wait().unwrap();
    let text = seen.join("\n");
    assert_eq!(status.code(), Some(1), "{text}");
    let command = text
        .split_once("continue with: ")
        .map(|(_, c)| c.lines().next().unwrap().to_string())
        .unwrap_or_else(|| panic!("no resume command in:\n{text}"));
    assert!(
        command.starts_with("kd distill ") && command.ends_with("--resume"),
        "{command}"
    );
    let journal = std::fs::read_to_string(out.path().join("x_s0/journal.jsonl")).unwrap();
    assert!(journal.contains("KILLED"), "{journal}");
    assert!(epochs_logged(&out.path().join("x_s0")) < 8);
    // The printed command, as a user pastes it, finishes the run.
    let words: Vec<&str> = command.split(' ').skip(1).collect();
    let o = std::process::Command::new(&kd)
        .args(&words)
        .current_dir(out.path())
        .env("OMP_NUM_THREADS", "1")
        .env_remove("MLFLOW_TRACKING_URI")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(epochs_logged(&out.path().join("x_s0")), 8);
}

/// The same teacher file named from another working directory is the same
/// teacher: the saved plan holds its absolute path.
#[test]
fn a_resume_from_another_working_directory_finds_the_same_teacher() {
    let top = tempfile::tempdir().unwrap();
    let trial = top.path().join("trial");
    std::fs::create_dir_all(trial.join("t")).unwrap();
    std::fs::copy(
        golden("model_resnet20.safetensors"),
        trial.join("t/teacher.safetensors"),
    )
    .unwrap();
    let out = top.path().join("runs");
    let run = |cwd: &Path, teacher: &str, extra: &[&str]| {
        let mut a = distill(&out, extra);
        let i = a.iter().position(|x| x == "--teacher-weights").unwrap();
        a[i + 1] = teacher.to_string();
        a.remove(0);
        std::process::Command::new(kd_tests::kd())
            .args(&a)
            .current_dir(cwd)
            .env("OMP_NUM_THREADS", "1")
            .env_remove("MLFLOW_TRACKING_URI")
            .output()
            .unwrap()
    };
    let first = run(&trial, "t/teacher.safetensors", &["--epochs", "1"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let again = run(
        top.path(),
        "trial/t/teacher.safetensors",
        &["--epochs", "2", "--resume", "--extend"],
    );
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(epochs_logged(&out.join("x_s0")), 2);
}

/// An epoch's mean of a constant loss weight is the weight exactly (0.1
/// summed over 18 steps and divided by 18 is 0.10000000000000003), in
/// epochs.jsonl and so in MLflow.
#[test]
fn a_constant_weight_is_recorded_as_written() {
    let out = tempfile::tempdir().unwrap();
    let mut a = distill(out.path(), &["--epochs", "1", "--ce", "0.1"]);
    let i = a.iter().position(|x| x == "--train-size").unwrap();
    a[i + 1] = "576".into(); // 18 steps of 32
    kd_cli::run(a).unwrap();
    let line = std::fs::read_to_string(out.path().join("x_s0/epochs.jsonl")).unwrap();
    let v: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert_eq!(v["record"]["weights"]["ce"].as_f64(), Some(0.1), "{line}");
}
