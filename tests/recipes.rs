//! Recipes as users run them: every recipe in recipes/ validates with
//! `kd plan`; the quickstart runs end to end; a scheduled weight is applied
//! as its function says; a 3-seed sweep prints mean ± std; an init stage that
//! trains only a method's modules leaves the student untouched.

use std::path::{Path, PathBuf};

use kd_core::Registry;
use kd_engine::{NoScripts, RunOptions, Silent};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn recipes(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() && p.file_name().unwrap() != "lib" {
            recipes(&p, out);
        } else if p.extension().is_some_and(|x| x == "rhai")
            && !p.to_string_lossy().ends_with(".d.rhai")
        {
            out.push(p);
        }
    }
}

/// Teacher weights of `arch` for 100 classes, as a stand-in for a trained
/// teacher (planning checks they fit, not what they learnt).
fn teacher_file(dir: &Path, arch: &str) -> PathBuf {
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    kd_models::build(arch, &vs.root(), 100).unwrap();
    let path = dir.join(format!("{arch}.safetensors"));
    kd_models::save_weights(&vs, &path).unwrap();
    path
}

#[test]
fn every_recipe_passes_kd_plan() {
    let mut all = Vec::new();
    recipes(&root().join("recipes"), &mut all);
    assert!(
        all.len() >= 44,
        "expected a recipe per method and dataset, found {}",
        all.len()
    );
    // The CIFAR recipes name files this machine lacks: planning checks that
    // they exist and fit, so they are given small stand-ins.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cifar-100-binary");
    kd_data::write_cifar_folder(&data, true, 2, 2).unwrap();
    // Every teacher a recipe names by default, as `runs/teachers/<arch>_cifar100.safetensors`.
    let teacher_of = |text: &str| -> Option<(String, String)> {
        let start = text.find(r#"param("teacher", "runs/teachers/"#)?;
        let rest = &text[start + r#"param("teacher", ""#.len()..];
        let path = &rest[..rest.find('"')?];
        let arch = path
            .strip_prefix("runs/teachers/")?
            .strip_suffix("_cifar100.safetensors")?;
        Some((format!(r#"param("teacher", "{path}")"#), arch.to_string()))
    };
    let mut sets = vec![(
        r#"param("data", "data/cifar-100-binary")"#.to_string(),
        format!("data={}", data.display()),
    )];
    for p in &all {
        let text = std::fs::read_to_string(p).unwrap();
        if let Some((param, arch)) = teacher_of(&text)
            && !sets.iter().any(|(q, _)| *q == param)
        {
            let file = teacher_file(dir.path(), &arch);
            sets.push((param, format!("teacher={}", file.display())));
        }
    }
    let failures: Vec<String> = all
        .iter()
        .filter_map(|p| {
            let text = std::fs::read_to_string(p).unwrap();
            let mut args = vec!["kd".to_string(), "plan".into(), p.display().to_string()];
            for (param, set) in &sets {
                if text.contains(param.as_str()) {
                    args.extend(["--set".to_string(), set.clone()]);
                }
            }
            kd_cli::run(&args)
                .err()
                .map(|e| format!("{}: {e:#}", p.display()))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn kd_plan_refuses_a_recipe_whose_files_are_missing() {
    let recipe = root().join("recipes/cifar100/st/resnet20_from_resnet110.rhai");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("c100");
    kd_data::write_cifar_folder(&data, true, 2, 2).unwrap();
    let plan = |sets: &[String]| {
        let mut args = vec![
            "kd".to_string(),
            "plan".into(),
            recipe.display().to_string(),
        ];
        for s in sets {
            args.extend(["--set".to_string(), s.clone()]);
        }
        kd_cli::run(&args).map_err(|e| kd_cli::one_line(&e))
    };
    let e = plan(&[]).unwrap_err();
    assert!(e.contains("data/cifar-100-binary: no such folder"), "{e}");
    let e = plan(&[format!("data={}", data.display())]).unwrap_err();
    assert!(
        e.contains("runs/teachers/resnet110_cifar100.safetensors: no such file"),
        "{e}"
    );
    // A teacher of another architecture does not fit.
    let wrong = teacher_file(dir.path(), "resnet8");
    let e = plan(&[
        format!("data={}", data.display()),
        format!("teacher={}", wrong.display()),
    ])
    .unwrap_err();
    assert!(e.contains("do not fit the model"), "{e}");
    std::fs::remove_file(data.join("test.bin")).unwrap();
    let e = plan(&[
        format!("data={}", data.display()),
        format!(
            "teacher={}",
            teacher_file(dir.path(), "resnet110").display()
        ),
    ])
    .unwrap_err();
    assert!(e.contains("test.bin: missing from the data folder"), "{e}");
}

fn epochs_jsonl(run_dir: &Path) -> Vec<(String, Value)> {
    std::fs::read_to_string(run_dir.join("epochs.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["stage"].as_str().unwrap().to_string(),
                v["record"].clone(),
            )
        })
        .collect()
}

/// `kd run <recipe> --set ... --out <tempdir> --tracking-uri none`; returns the out folder.
fn run_recipe(rel: &str, sets: &[&str]) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    let recipe = root().join(rel);
    let mut args = vec!["kd", "run", recipe.to_str().unwrap()];
    for s in sets {
        args.extend(["--set", s]);
    }
    args.extend([
        "--out",
        out.path().to_str().unwrap(),
        "--tracking-uri",
        "none",
    ]);
    kd_cli::run(args).unwrap();
    out
}

#[test]
fn quickstart_runs_end_to_end() {
    let out = run_recipe("recipes/quickstart.rhai", &["epochs=1", "device=cpu"]);
    let recs = epochs_jsonl(&out.path().join("quickstart"));
    assert_eq!(
        recs.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(),
        ["teacher", "distill"]
    );
    assert!(
        recs.iter()
            .all(|(_, r)| r["test_top1"].as_f64().unwrap() > 10.0),
        "both stages learn something: {recs:?}"
    );
    assert!(
        out.path()
            .join("quickstart/distill.best.safetensors")
            .exists()
    );
}

#[test]
fn scheduled_weights_are_logged_as_applied() {
    let out = run_recipe("recipes/examples/three_losses.rhai", &["epochs=2"]);
    let recs: Vec<Value> = epochs_jsonl(&out.path().join("three-losses"))
        .into_iter()
        .filter(|(s, _)| s == "distill")
        .map(|(_, r)| r)
        .collect();
    assert_eq!(recs.len(), 2);
    // 2500 samples, batch 64: 40 steps an epoch, 80 in the stage.
    let (n, total) = (40.0, 80.0);
    for (e, rec) in recs.iter().enumerate() {
        // sp: `|p| if p.epoch < 1 { 0.0 } else { sp_weight }`
        let sp = rec["weights"]["sp"].as_f64().unwrap();
        assert_eq!(sp, if e == 0 { 0.0 } else { 3000.0 });
        // st: `0.9 * min(1.0, p.fraction * 2.0)`, averaged over the epoch's steps.
        let want: f64 = (0..40)
            .map(|s| 0.9 * f64::min(1.0, (e as f64 * n + s as f64) / total * 2.0))
            .sum::<f64>()
            / n;
        let st = rec["weights"]["st"].as_f64().unwrap();
        assert!(
            (st - want).abs() < 1e-9,
            "epoch {e}: st weight {st}, function gives {want}"
        );
    }
}

#[test]
fn seed_sweep_summarises_mean_and_std() {
    kd_methods::link();
    let registry = Registry::global().unwrap();
    let out = tempfile::tempdir().unwrap();
    let recipe = kd_recipes::Recipe::load(
        root().join("recipes/examples/seed_sweep.rhai"),
        &[("epochs".into(), "1".into())],
    )
    .unwrap();
    let scripts = kd_recipes::Scripts::new();
    let runs = recipe
        .execute(&registry, &mut |plan| {
            let mut opts = RunOptions {
                run_dir: out.path().join(&plan.name),
                resume: false,
                observer: &mut Silent,
                scripts: &scripts,
                stop: None,
                log_every: 0,
                progress_bar: false,
            };
            Ok(kd_engine::run(plan, &registry, &mut opts)?)
        })
        .unwrap();
    assert_eq!(
        runs.len(),
        7,
        "a teacher, then 3 seeds of two configurations"
    );
    let table = kd_recipes::summary_table(&runs);
    assert_eq!(
        table.matches('±').count(),
        4,
        "mean ± std of best and last for both sweeps:\n{table}"
    );
    let _ = NoScripts;
}

#[test]
fn ft_init_stage_trains_only_the_paraphraser() {
    let out = run_recipe(
        "recipes/synthetic/ft/resnet8_from_resnet20.rhai",
        &["epochs=1", "init_epochs=1", "train_size=256"],
    );
    let dir = out.path().join("ft_resnet8_from_resnet20_synthetic");
    let stages: Vec<String> = epochs_jsonl(&dir).into_iter().map(|(s, _)| s).collect();
    assert_eq!(stages, ["teacher", "paraphraser", "distill"]);
    // The student after the paraphraser stage is the freshly initialised one:
    // the engine seeds, then builds the student first.
    tch::manual_seed(0);
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _fresh = kd_models::build("resnet8", &vs.root(), 10).unwrap();
    let after = kd_engine::tensors::read(&dir.join("paraphraser.last.safetensors")).unwrap();
    for (name, t) in vs.variables() {
        assert!(
            after.get(&name).unwrap().equal(&t),
            "student `{name}` changed in the paraphraser stage"
        );
    }
    // ... while the paraphraser did learn: its reconstruction loss fell.
    let para: Vec<f64> = epochs_jsonl(&dir)
        .into_iter()
        .filter(|(s, _)| s == "paraphraser")
        .map(|(_, r)| r["train_loss"].as_f64().unwrap())
        .collect();
    assert!(para[0].is_finite());
    let distill = kd_engine::tensors::read(&dir.join("distill.last.safetensors")).unwrap();
    assert!(
        vs.variables()
            .iter()
            .any(|(n, t)| !distill.get(n).unwrap().equal(t)),
        "the main stage trains the student"
    );
}

/// The recipes follow KD-Zoo where an audit found them apart: DML's peer
/// starts untrained (no weights, no stage training it first); FT's
/// paraphraser trains 30 epochs; AB and FSP keep one optimiser across their
/// two stages; the KD-Zoo data pipeline reflect-pads and uses KD-Zoo's
/// normalisation.
#[test]
fn recipes_follow_kdzoo_where_the_audit_found_them_apart() {
    kd_methods::link();
    let registry = Registry::global().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("c100");
    kd_data::write_cifar_folder(&data, true, 2, 2).unwrap();
    let teacher = teacher_file(dir.path(), "resnet110");
    let plan = |rel: &str| -> kd_engine::Plan {
        // A recipe refuses values for params it does not read.
        let text = std::fs::read_to_string(root().join(rel)).unwrap();
        let sets: Vec<(String, String)> = [("data", &data), ("teacher", &teacher)]
            .into_iter()
            .filter(|(k, _)| text.contains(&format!("param(\"{k}\"")))
            .map(|(k, v)| (k.to_string(), v.display().to_string()))
            .collect();
        let recipe = kd_recipes::Recipe::load(root().join(rel), &sets).unwrap();
        let mut plans = recipe.plans(&registry).unwrap();
        assert_eq!(plans.len(), 1, "{rel}");
        plans.pop().unwrap()
    };
    for rel in [
        "recipes/cifar100/dml/resnet20_from_resnet110.rhai",
        "recipes/synthetic/dml/resnet8_from_resnet20.rhai",
    ] {
        let p = plan(rel);
        let peer = p.teacher.as_ref().expect("DML has a peer");
        assert_eq!(peer.weights, None, "{rel}: the peer starts untrained");
        assert!(
            p.stages
                .iter()
                .all(|s| s.subject == kd_engine::Subject::Student),
            "{rel}: no stage trains the peer before mutual learning"
        );
    }
    let ft = plan("recipes/cifar100/ft/resnet20_from_resnet110.rhai");
    assert_eq!(ft.stages[0].name, "paraphraser");
    assert_eq!(
        ft.stages[0].epochs, 30,
        "KD-Zoo's train_ft.py: train_para(..., 30)"
    );
    for rel in [
        "recipes/cifar100/ab/resnet20_from_resnet110.rhai",
        "recipes/cifar100/fsp/resnet20_from_resnet110.rhai",
        "recipes/synthetic/ab/resnet8_from_resnet20.rhai",
        "recipes/synthetic/fsp/resnet8_from_resnet20.rhai",
    ] {
        let p = plan(rel);
        let keep: Vec<(&str, bool)> = p
            .stages
            .iter()
            .map(|s| (s.name.as_str(), s.keep_optimizer))
            .collect();
        let init = keep.iter().position(|(n, _)| *n == "init").unwrap();
        assert_eq!(keep[init + 1], ("distill", true), "{rel}: {keep:?}");
        assert!(!keep[init].1, "{rel}: {keep:?}");
    }
    let p = plan("recipes/cifar100/st/resnet20_from_resnet110.rhai");
    assert_eq!(p.data.crop_padding, kd_data::CropPadding::Reflect);
    assert_eq!(p.data.normalize, kd_data::Normalize::Kdzoo);
}
