//! Recipes as users run them: every recipe in recipes/ validates with
//! `kd plan`; the quickstart runs end to end; a scheduled weight is applied
//! as its function says; a 3-seed sweep prints mean ± std; an init stage that
//! trains only a method's modules leaves the student untouched; the ImageNet
//! recipes follow mdistiller's setting and carry their sources' numbers.

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
    teacher_file_for(dir, arch, 100)
}

/// Teacher weights of `arch` for `classes` classes, saved as
/// `<arch>_<classes>.safetensors`.
/// An architecture outside kd's zoo (a recipe's `python:timm.models:NAME`
/// teacher) is written by timm in the bootstrap venv.
fn teacher_file_for(dir: &Path, arch: &str, classes: i64) -> PathBuf {
    let path = dir.join(format!("{arch}_{classes}.safetensors"));
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    if kd_models::build(arch, &vs.root(), classes).is_ok() {
        kd_models::save_weights(&vs, &path).unwrap();
        return path;
    }
    let script = format!(
        "import timm\nfrom safetensors.torch import save_file\n\
         m = timm.create_model({arch:?}, num_classes={classes})\n\
         save_file({{k: v.contiguous() for k, v in m.state_dict().items()}}, {:?})",
        path.display().to_string()
    );
    let ok = std::process::Command::new("python")
        .args(["-c", &script])
        .status()
        .expect("python (the bootstrap venv: source scripts/env.sh)");
    assert!(ok.success(), "timm could not write a stand-in for {arch}");
    path
}

/// Transformer recipes (DeiT, OFA-KD) train in their authors' settings,
/// not mdistiller's.
fn is_transformer_recipe(p: &Path) -> bool {
    p.parent()
        .and_then(|d| d.file_name())
        .is_some_and(|m| m == "ofa" || m == "deit")
}

/// An ImageFolder with ImageNet's 1000 classes (so torchvision-shaped
/// teachers fit the models planning builds) of 4x4 PNGs: 17 per class for
/// training, more than CRD's 16384 negatives, and one for validation.
/// Planning lists the files; it does not decode them.
fn imagenet_folder(root: &Path) {
    let mut png = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_pixel(4, 4, image::Rgb([120, 60, 30]))
        .write_to(&mut png, image::ImageFormat::Png)
        .unwrap();
    let png = png.into_inner();
    for (split, n) in [("train", 17), ("val", 1)] {
        for c in 0..1000 {
            let dir = root.join(split).join(format!("n{c:08}"));
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                std::fs::write(dir.join(format!("img{i}.png")), &png).unwrap();
            }
        }
    }
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
    let imagenet = dir.path().join("imagenet");
    imagenet_folder(&imagenet);
    // Every teacher a recipe names by default: CIFAR-100 ones as
    // `runs/teachers/<arch>_cifar100.safetensors`, torchvision's ImageNet
    // checkpoints as `runs/teachers/<arch>-<hash>.pth` (1000 classes).
    let teacher_of = |text: &str| -> Option<(String, String, i64)> {
        let start = text.find(r#"param("teacher", "runs/teachers/"#)?;
        let rest = &text[start + r#"param("teacher", ""#.len()..];
        let path = &rest[..rest.find('"')?];
        let file = path.strip_prefix("runs/teachers/")?;
        let (arch, classes) = match file.strip_suffix("_cifar100.safetensors") {
            Some(arch) => (arch, 100),
            None => (file.strip_suffix(".pth")?.split_once('-')?.0, 1000),
        };
        Some((
            format!(r#"param("teacher", "{path}")"#),
            arch.to_string(),
            classes,
        ))
    };
    let mut sets = vec![
        (
            r#"param("data", "data/cifar-100-binary")"#.to_string(),
            format!("data={}", data.display()),
        ),
        (
            r#"param("data", "data/imagenet")"#.to_string(),
            format!("data={}", imagenet.display()),
        ),
        (
            r#"param("file", "tests/torchscript/net.py")"#.to_string(),
            format!("file={}", root().join("tests/torchscript/net.py").display()),
        ),
    ];
    for p in &all {
        let text = std::fs::read_to_string(p).unwrap();
        if let Some((param, arch, classes)) = teacher_of(&text)
            && !sets.iter().any(|(q, _)| *q == param)
        {
            let file = teacher_file_for(dir.path(), &arch, classes);
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

/// The own-PyTorch example: a Python network as teacher and student, and a
/// Python loss module weighted beside the zoo's methods.
#[test]
fn own_pytorch_example_runs() {
    let file = format!("file={}", root().join("tests/torchscript/net.py").display());
    let out = run_recipe(
        "recipes/examples/own_pytorch.rhai",
        &["epochs=1", "device=cpu", &file],
    );
    let recs = epochs_jsonl(&out.path().join("own_pytorch"));
    assert_eq!(
        recs.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(),
        ["teacher", "distill"]
    );
    let distill = &recs[1].1;
    assert_eq!(
        distill["weights"]["python"].as_f64(),
        Some(100.0),
        "{distill}"
    );
    let term = distill["terms"]["python/loss"].as_f64().unwrap_or(f64::NAN);
    assert!(term.is_finite() && term > 0.0, "{distill}");
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

/// Every run of `recipe`, each in `out/<name>`, with nothing printed.
fn execute_silently(
    recipe: &kd_recipes::Recipe,
    registry: &Registry,
    out: &Path,
) -> Vec<kd_recipes::RunRecord> {
    let scripts = kd_recipes::Scripts::new();
    recipe
        .execute(registry, &mut |plan| {
            let mut opts = RunOptions {
                run_dir: out.join(&plan.name),
                resume: false,
                observer: &mut Silent,
                scripts: &scripts,
                stop: None,
                log_every: 0,
                progress_bar: false,
            };
            Ok(kd_engine::run(plan, registry, &mut opts)?)
        })
        .unwrap()
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
    let runs = execute_silently(&recipe, &registry, out.path());
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
        // train_init's `criterionCls(out_s, target) * 0.0`.
        let ce = p.stages[init]
            .methods
            .iter()
            .find(|m| m.label() == "ce")
            .unwrap_or_else(|| panic!("{rel}: the init stage has no zero-weighted ce"));
        assert_eq!(ce.weight, kd_engine::Weight::Const(0.0), "{rel}");
    }
    let p = plan("recipes/cifar100/st/resnet20_from_resnet110.rhai");
    assert_eq!(p.data.crop_padding, kd_data::CropPadding::Reflect);
    assert_eq!(p.data.normalize, kd_data::Normalize::Kdzoo);
}

#[test]
fn every_cifar100_recipe_carries_its_sources_number() {
    kd_methods::link();
    let registry = Registry::global().unwrap();
    let mut all = Vec::new();
    recipes(&root().join("recipes/cifar100"), &mut all);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("c100");
    kd_data::write_cifar_folder(&data, true, 2, 2).unwrap();
    let mut teachers: Vec<(String, PathBuf)> = Vec::new();
    let mut missing = Vec::new();
    for p in &all {
        let text = std::fs::read_to_string(p).unwrap();
        let mut sets = vec![("data".to_string(), data.display().to_string())];
        // The teacher architecture is the first argument of `.teacher(...)`.
        if let Some(at) = text.find(".teacher(\"")
            && text.contains("param(\"teacher\"")
        {
            let rest = &text[at + ".teacher(\"".len()..];
            let arch = rest[..rest.find('"').unwrap()].to_string();
            let file = match teachers.iter().find(|(a, _)| *a == arch) {
                Some((_, f)) => f.clone(),
                None => {
                    let f = teacher_file(dir.path(), &arch);
                    teachers.push((arch, f.clone()));
                    f
                }
            };
            sets.push(("teacher".into(), file.display().to_string()));
        }
        let plans = kd_recipes::Recipe::load(p, &sets)
            .and_then(|r| r.with_printer(|_| {}).plans(&registry))
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        for plan in plans {
            match &plan.paper {
                Some(paper)
                    if paper.top1 > 0.0 && paper.top1 <= 100.0 && !paper.source.is_empty() =>
                {
                    // The number travels with the plan into plan.yaml.
                    let yaml = kd_recipes::to_yaml(std::slice::from_ref(&plan)).unwrap();
                    assert!(yaml.contains("paper:"), "{}", p.display());
                }
                other => missing.push(format!("{} ({}): {other:?}", p.display(), plan.name)),
            }
        }
    }
    assert!(all.len() >= 51, "found {} recipes", all.len());
    assert!(
        missing.is_empty(),
        "recipes without their source's number:\n{}",
        missing.join("\n")
    );
}

/// The ImageNet recipes follow mdistiller's setting: each plans against a
/// 1000-class ImageFolder with a teacher of torchvision's shape given by
/// `--set teacher=...`, distils the pair its file names for 100 epochs with
/// SGD (momentum 0.9, weight decay 1e-4, lr x0.1 at 30/60/90, the configs'
/// lr 0.2 per 512 images of batch), on 224-pixel crops, and carries its
/// source's number. Every (pair, method) the task lists is there.
#[test]
fn every_imagenet_recipe_follows_mdistiller_and_carries_its_sources_number() {
    kd_methods::link();
    let registry = Registry::global().unwrap();
    let mut all = Vec::new();
    recipes(&root().join("recipes/imagenet"), &mut all);
    all.retain(|p| !is_transformer_recipe(p));
    all.sort();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("imagenet");
    imagenet_folder(&data);
    let teachers: Vec<(&str, PathBuf)> = ["resnet34", "resnet50"]
        .into_iter()
        .map(|a| (a, teacher_file_for(dir.path(), a, 1000)))
        .collect();
    let mut found = Vec::new();
    for p in &all {
        let text = std::fs::read_to_string(p).unwrap();
        let at = text.find(".teacher(\"").expect("a teacher") + ".teacher(\"".len();
        let arch = &text[at..][..text[at..].find('"').unwrap()];
        let (_, teacher) = teachers
            .iter()
            .find(|(a, _)| *a == arch)
            .unwrap_or_else(|| panic!("{}: teacher `{arch}`", p.display()));
        let sets = [
            ("data".to_string(), data.display().to_string()),
            ("teacher".to_string(), teacher.display().to_string()),
        ];
        let plans = kd_recipes::Recipe::load(p, &sets)
            .and_then(|r| r.with_printer(|_| {}).plans(&registry))
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(plans.len(), 1, "{}", p.display());
        let plan = &plans[0];
        let what = p.display().to_string();
        let (s, t) = (
            plan.student.arch.as_str(),
            plan.teacher.as_ref().expect("a teacher").arch.as_str(),
        );
        assert!(
            matches!(
                (s, t),
                ("resnet18", "resnet34") | ("MobileNetV1", "resnet50")
            ),
            "{what}: {s} from {t}"
        );
        assert_eq!(
            p.file_stem().unwrap().to_str().unwrap(),
            format!("{s}_from_{t}"),
            "{what}"
        );
        assert_eq!(
            plan.teacher.as_ref().unwrap().weights.as_ref(),
            Some(teacher)
        );
        assert_eq!(
            plan.data.source,
            kd_data::DataSource::ImageFolder {
                path: data.clone(),
                image_size: 224,
                resize_size: 256,
                skip_corrupt: false,
            },
            "{what}"
        );
        assert!(plan.data.augment, "{what}");
        assert_eq!(plan.data.normalize, kd_data::Normalize::Default, "{what}");
        let method = p.parent().unwrap().file_name().unwrap().to_str().unwrap();
        if method == "pad" {
            // torchdistill's two configs in sequence (rrpr2020/ce_l2 then
            // pad_l2): 90 epochs of CE + 15·L2 at lr 0.2, x0.1 at 30/60,
            // then 30 of CE + PAD-L2 at 0.002.
            let stages: Vec<_> = plan
                .stages
                .iter()
                .map(|st| {
                    let names: Vec<&str> = st.methods.iter().map(|m| m.method.as_str()).collect();
                    (st.name.as_str(), st.epochs, st.optimizer.lr, names)
                })
                .collect();
            assert_eq!(
                stages,
                [
                    ("l2", 90, 0.2, vec!["ce", "fitnet"]),
                    ("pad", 30, 0.002, vec!["ce", "pad"])
                ],
                "{what}"
            );
            assert_eq!(
                plan.stages[0].lr_schedule,
                kd_engine::LrSchedule::Multistep {
                    milestones: vec![30, 60],
                    gamma: 0.1
                },
                "{what}"
            );
            assert_eq!(plan.paper.as_ref().map(|p| p.top1), Some(71.71), "{what}");
            found.push(format!("{t}->{s} {method}"));
            continue;
        }
        assert_eq!(plan.stages.len(), 1, "{what}");
        let stage = &plan.stages[0];
        assert_eq!(stage.epochs, 100, "{what}");
        assert_eq!(
            stage.lr_schedule,
            kd_engine::LrSchedule::Multistep {
                milestones: vec![30, 60, 90],
                gamma: 0.1
            },
            "{what}"
        );
        let o = &stage.optimizer;
        assert_eq!(
            (o.momentum, o.nesterov, o.weight_decay),
            (0.9, false, 1e-4),
            "{what}"
        );
        assert!(
            [(512, 0.2), (256, 0.1), (128, 0.05)].contains(&(plan.data.batch_size, o.lr)),
            "{what}: batch {} lr {}",
            plan.data.batch_size,
            o.lr
        );
        // mdistiller's ImageNet warm-ups last one 1-based epoch: none at all.
        assert!(
            stage
                .methods
                .iter()
                .all(|m| matches!(m.weight, kd_engine::Weight::Const(_))),
            "{what}"
        );
        // `dot/` is KD trained by mdistiller's DOT (configs/imagenet/*/dot.yaml).
        let (kind, delta) = match method {
            "dot" => (kd_engine::OptimizerKind::Dot, 0.09),
            _ => (kd_engine::OptimizerKind::Sgd, 0.0),
        };
        assert_eq!((o.kind, o.delta), (kind, delta), "{what}");
        let name = if matches!(method, "kd" | "dot") {
            "st"
        } else {
            method
        };
        let names: Vec<&str> = stage.methods.iter().map(|m| m.method.as_str()).collect();
        assert_eq!(names, ["ce", name], "{what}");
        let paper = plan
            .paper
            .as_ref()
            .unwrap_or_else(|| panic!("{what}: no paper"));
        assert!(
            (60.0..80.0).contains(&paper.top1) && !paper.source.is_empty(),
            "{what}: {paper:?}"
        );
        let yaml = kd_recipes::to_yaml(std::slice::from_ref(plan)).unwrap();
        assert!(yaml.contains("paper:"), "{what}");
        found.push(format!("{t}->{s} {method}"));
    }
    found.sort();
    let mut want: Vec<String> = ["kd", "at", "crd", "dkd", "reviewkd", "dot", "srd", "pad"]
        .map(|m| format!("resnet34->resnet18 {m}"))
        .into_iter()
        .chain(
            ["kd", "at", "ofd", "crd", "dkd", "reviewkd", "dot"]
                .map(|m| format!("resnet50->MobileNetV1 {m}")),
        )
        .collect();
    want.sort();
    assert_eq!(found, want);
}

/// The transformer recipes carry their sources' settings: DeiT's recipe for
/// DeiT-Ti distilled from timm's RegNetY-16GF (built in kd's embedded
/// Python), OFA-KD's CNN and ViT configs; each with its published number
/// where a stored copy of the source gives one.
#[test]
fn transformer_recipes_carry_their_sources_settings() {
    kd_methods::link();
    let registry = Registry::global().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("imagenet");
    imagenet_folder(&data);
    let plan = |rel: &str, teacher: &str| -> kd_engine::Plan {
        let file = teacher_file_for(dir.path(), teacher, 1000);
        let sets = [
            ("data".to_string(), data.display().to_string()),
            ("teacher".to_string(), file.display().to_string()),
        ];
        let mut plans = kd_recipes::Recipe::load(root().join(rel), &sets)
            .and_then(|r| r.with_printer(|_| {}).plans(&registry))
            .unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert_eq!(plans.len(), 1, "{rel}");
        plans.pop().unwrap()
    };
    let config = |p: &kd_engine::Plan, m: &str| -> serde_json::Value {
        let stage = &p.stages[0];
        stage
            .methods
            .iter()
            .find(|x| x.method == m)
            .unwrap_or_else(|| panic!("no {m}"))
            .config
            .clone()
    };
    use kd_engine::OptimizerKind::{Adamw, Sgd};

    let deit = plan(
        "recipes/imagenet/deit/deit_tiny_distilled_patch16_224_from_regnety_160.rhai",
        "regnety_160",
    );
    let s = &deit.stages[0];
    assert_eq!(deit.student.arch, "deit_tiny_distilled_patch16_224");
    assert_eq!(s.epochs, 300);
    assert_eq!(deit.data.batch_size, 1024);
    assert_eq!(
        (s.optimizer.kind, s.optimizer.lr, s.optimizer.weight_decay),
        (Adamw, 1e-3, 0.05)
    );
    assert!(s.optimizer.no_decay_1d);
    assert_eq!(
        s.lr_schedule,
        kd_engine::LrSchedule::Cosine {
            warmup_epochs: 5,
            min_lr: 1e-5,
            warmup_lr: 1e-6
        }
    );
    let mix = deit.data.mixup.as_ref().expect("mixup");
    assert_eq!((mix.mixup_alpha, mix.cutmix_alpha), (0.8, 1.0));
    assert_eq!(
        deit.data.random_erasing.as_ref().map(|r| r.prob),
        Some(0.25)
    );
    assert_eq!(s.ema.as_ref().map(|e| e.decay), Some(0.99996));
    let c = config(&deit, "deit");
    assert_eq!(c["distillation_type"], "hard");
    assert_eq!(
        (c["alpha"].as_f64(), c["tau"].as_f64()),
        (Some(0.5), Some(1.0))
    );
    assert_eq!(c["label_smoothing"].as_f64(), Some(0.1));
    assert_eq!(deit.paper.as_ref().map(|p| p.top1), Some(74.5));

    let cnn = plan(
        "recipes/imagenet/ofa/resnet18_from_deit_tiny_patch16_224.rhai",
        "deit_tiny_patch16_224",
    );
    let s = &cnn.stages[0];
    assert_eq!((s.epochs, cnn.data.batch_size), (100, 512));
    assert_eq!(
        (s.optimizer.kind, s.optimizer.lr, s.optimizer.weight_decay),
        (Sgd, 0.1, 1e-4)
    );
    assert_eq!(config(&cnn, "ofa")["eps"].as_f64(), Some(1.5));
    assert_eq!(config(&cnn, "ce")["label_smoothing"].as_f64(), Some(0.1));
    assert_eq!(cnn.paper.as_ref().map(|p| p.top1), Some(71.34));

    let vit = plan(
        "recipes/imagenet/ofa/deit_tiny_patch16_224_from_resnet50.rhai",
        "resnet50",
    );
    let s = &vit.stages[0];
    assert_eq!((s.epochs, vit.data.batch_size), (300, 1024));
    assert_eq!(
        (s.optimizer.kind, s.optimizer.lr, s.optimizer.weight_decay),
        (Adamw, 5e-4, 0.05)
    );
    assert_eq!(s.clip_grad, Some(5.0));
    assert_eq!(
        s.lr_schedule,
        kd_engine::LrSchedule::Cosine {
            warmup_epochs: 20,
            min_lr: 1e-6,
            warmup_lr: 5e-7
        }
    );
    assert_eq!(s.ema.as_ref().map(|e| e.decay), Some(0.99996));
    assert!(
        vit.paper.is_none(),
        "no stored copy gives this pair's number"
    );
}

/// Mean and sample standard deviation, written out here so the report's
/// numbers are checked against a second computation.
fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    let v = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0);
    (m, v.sqrt())
}

#[test]
fn kd_report_summarises_a_seed_sweep_against_the_papers_number() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("report.rhai");
    std::fs::write(
        &recipe,
        r#"
fn tiny(name, seed, lr) {
    experiment(name)
        .seed(seed)
        .device("cpu")
        .data(synthetic(#{ train_size: 96, test_size: 64 }).batch_size(32))
        .student("resnet8")
        .add(stage("train", 2).lr(lr).add(method("ce")))
}
for s in [0, 1, 2] {
    run(tiny(`tiny_s${s}`, s, 0.05)
        .paper(#{ top1: 50.0, epoch: "last", runs: 3, source: "a test table" }));
}
run(tiny("other", 0, 0.2));
"#,
    )
    .unwrap();
    let out = dir.path().join("out");
    let rep = dir.path().join("rep");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    kd_cli::run([
        "kd".to_string(),
        "run".into(),
        s(&recipe),
        "--out".into(),
        s(&out),
        "--tracking-uri".into(),
        "none".into(),
    ])
    .unwrap();
    kd_cli::run([
        "kd".to_string(),
        "report".into(),
        s(&out),
        "--out".into(),
        s(&rep),
    ])
    .unwrap();

    let finals = |run: &str| {
        let recs = epochs_jsonl(&out.join(run));
        let last = &recs.last().unwrap().1;
        (
            last["best_top1"].as_f64().unwrap(),
            last["test_top1"].as_f64().unwrap(),
        )
    };
    let runs: Vec<(f64, f64)> = (0..3).map(|i| finals(&format!("tiny_s{i}"))).collect();
    let best = mean_sd(&runs.iter().map(|r| r.0).collect::<Vec<_>>());
    let last = mean_sd(&runs.iter().map(|r| r.1).collect::<Vec<_>>());
    let md = std::fs::read_to_string(rep.join("report.md")).unwrap();
    let row = format!(
        "| tiny | 3 (0, 1, 2) | {:.2} ± {:.2} | {:.2} ± {:.2} | 50.00 (last, mean of 3) | {:+.2} | a test table |",
        best.0,
        best.1,
        last.0,
        last.1,
        last.0 - 50.0
    );
    assert!(md.contains(&row), "expected row\n{row}\nin\n{md}");
    let other = finals("other");
    let row = format!("| other | 1 (0) | {:.2} | {:.2} | | | |", other.0, other.1);
    assert!(md.contains(&row), "expected row\n{row}\nin\n{md}");
    let png = std::fs::read(rep.join("report.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    // MLflow gets the number as params and the gap as a metric (the journal
    // is what is shipped to the server).
    let journal = std::fs::read_to_string(out.join("tiny_s1/journal.jsonl")).unwrap();
    let events: Vec<Value> = journal
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let find = |ev: &str, key: &str| {
        events
            .iter()
            .find(|e| e["ev"] == ev && e["key"] == key)
            .unwrap_or_else(|| panic!("no {ev} {key} in the journal"))
            .clone()
    };
    assert_eq!(find("param", "paper.top1")["value"], "50.0");
    assert_eq!(find("param", "paper.source")["value"], "a test table");
    let gap = find("metric", "paper/gap_top1")["value"].as_f64().unwrap();
    assert!((gap - (runs[1].1 - 50.0)).abs() < 1e-9, "gap {gap}");
}

/// `kd plan` shows plans, not the placeholder results a dry run hands the
/// script; `kd run` of a recipe that prints its own `summary(...)` shows
/// that table once (the command adds none).
#[test]
fn a_dry_run_prints_nothing_and_summary_prints_once() {
    kd_methods::link();
    let registry = Registry::global().unwrap();
    let out = tempfile::tempdir().unwrap();
    let printed = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = printed.clone();
    let recipe = kd_recipes::Recipe::load(
        root().join("recipes/examples/seed_sweep.rhai"),
        &[
            ("epochs".into(), "1".into()),
            ("seeds".into(), "[0]".into()),
        ],
    )
    .unwrap()
    .with_printer(move |s| sink.lock().unwrap().push(s.to_string()));
    recipe.plans(&registry).unwrap();
    assert!(
        printed.lock().unwrap().is_empty(),
        "the dry run printed: {:?}",
        printed.lock().unwrap()
    );
    execute_silently(&recipe, &registry, out.path());
    let printed = printed.lock().unwrap();
    let tables = printed
        .iter()
        .filter(|s| s.contains("configuration"))
        .count();
    assert_eq!(tables, 1, "{printed:?}");
    assert!(
        recipe.printed_summary(),
        "the CLI would print a second table"
    );
}

/// `model(arch, weights).reset_classifier()` plans a fine-tuning run on
/// data of other classes (the flag travels in plan.yaml); without weights
/// to load it is refused.
#[test]
fn reset_classifier_plans_fine_tuning_and_needs_weights() {
    let dir = tempfile::tempdir().unwrap();
    let w = root().join("tests/golden/fixtures/model_resnet20.safetensors");
    let plan = |model: &str| {
        let recipe = dir.path().join("ft.rhai");
        std::fs::write(
            &recipe,
            format!(
                r#"let x = experiment("ft")
    .data(synthetic(#{{ classes: 6, train_size: 64, test_size: 32 }}))
    .student({model})
    .add(stage("train", 1).add(method("ce")));
run(x);"#
            ),
        )
        .unwrap();
        // `kd plan` validates (weights against the model); the plans give the YAML.
        kd_cli::run(["kd", "plan", recipe.to_str().unwrap()]).map_err(|e| kd_cli::one_line(&e))?;
        kd_methods::link();
        let plans = kd_recipes::Recipe::load(&recipe, &[])
            .and_then(|r| r.with_printer(|_| {}).plans(&Registry::global().unwrap()))
            .unwrap();
        Ok::<_, String>(kd_recipes::to_yaml(&plans).unwrap())
    };
    let yaml = plan(&format!(
        r#"model("resnet20", "{}").reset_classifier()"#,
        w.display()
    ))
    .unwrap();
    assert!(yaml.contains("reset_classifier: true"), "{yaml}");
    let e = plan(&format!(r#"model("resnet20", "{}")"#, w.display())).unwrap_err();
    assert!(
        e.contains("fc.weight (file [10, 64], model [6, 64])"),
        "{e}"
    );
    let e = plan(r#"model("resnet20").reset_classifier()"#).unwrap_err();
    assert!(
        e.contains("reset_classifier keeps a fresh classifier"),
        "{e}"
    );
}
