//! The command line as a user meets it: listings, the model probe against
//! PyTorch, and one-line errors for the usual mistakes.

use std::path::{Path, PathBuf};

use kd_engine::tensors;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("golden/fixtures")
        .join(name)
}

fn err(args: &[&str]) -> String {
    let e = kd_cli::run(args.iter().copied()).expect_err("the command should fail");
    let msg = format!("{e:#}");
    assert!(!msg.contains('\n'), "error is not one line: {msg}");
    msg
}

/// Every model fixture of a zoo network (tests/golden/models.py; the slim
/// stand-ins for big models are checked in kd-models) through `kd probe
/// model`: each tap, logits and embedding, against PyTorch's eval-mode
/// outputs, spatial taps at the fixture's sampling stride.
#[test]
fn probe_model_matches_pytorch_for_every_zoo_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let mut fixtures: Vec<PathBuf> = std::fs::read_dir(golden(""))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("model_") && n.ends_with("_io.safetensors")
        })
        .collect();
    fixtures.sort();
    let mut probed = Vec::new();
    for io in fixtures {
        let want = tensors::read(&io).unwrap();
        let meta: serde_json::Value = serde_json::from_str(&want.metadata["fixture"]).unwrap();
        let name = meta["model"].as_str().unwrap().to_string();
        if !kd_models::names().contains(&name.as_str()) {
            continue;
        }
        let stride = meta["tap_stride"].as_i64().unwrap();
        let w = golden(&format!("model_{name}.safetensors"));
        let out = dir.path().join(format!("{name}.safetensors"));
        kd_cli::run([
            "kd",
            "probe",
            "model",
            name.as_str(),
            "--weights",
            w.to_str().unwrap(),
            "--input",
            io.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let got = tensors::read(&out).unwrap();
        let taps: Vec<&str> = meta["tap_shapes"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let outputs: Vec<&str> = got.tensors.iter().map(|(n, _)| n.as_str()).collect();
        let (mut a, mut b) = (taps.clone(), outputs);
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b, "{name}: tap names");
        for tap in taps {
            let full = got.get(tap).unwrap();
            let a = if full.dim() > 2 {
                full.flatten(1, -1).slice(1, 0, None, stride)
            } else {
                full.shallow_clone()
            };
            let b = want.get(tap).unwrap();
            assert_eq!(a.size(), b.size(), "{name} {tap}: shape");
            let err = (&a - b).abs().max().double_value(&[]);
            let scale = b.abs().max().double_value(&[]);
            assert!(
                err <= 1e-4 * (1.0 + scale),
                "{name} {tap}: max abs diff {err}"
            );
        }
        probed.push(name);
    }
    for name in [
        "resnet20",
        "resnet8x4",
        "wrn_16_2",
        "mobile_half",
        "ShuffleV1",
    ] {
        assert!(
            probed.iter().any(|p| p == name),
            "no model fixture probed for {name}: {probed:?}"
        );
    }
}

fn distill(extra: &[&str]) -> String {
    let w = golden("model_resnet20.safetensors");
    let mut args = vec![
        "kd",
        "distill",
        "--teacher",
        "resnet20",
        "--teacher-weights",
        w.to_str().unwrap(),
        "--student",
        "resnet8",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--out",
        "/nonexistent-kd-test-out",
    ];
    // The synthetic set at a tiny size, unless the test names another.
    if !extra.contains(&"--data") {
        args.extend(["--train-size", "64"]);
    }
    args.extend_from_slice(extra);
    err(&args)
}

#[test]
fn unknown_method_lists_registered_ones() {
    let e = distill(&["--method", "stt"]);
    assert!(
        e.contains("unknown method `stt` (did you mean `st`?); registered methods: ")
            && e.contains("crd")
            && e.contains("st,"),
        "{e}"
    );
}

/// Fine-tuning from weights made for other classes: refused as they are,
/// trained with `--reset-classifier`.
#[test]
fn train_teacher_fine_tunes_from_weights_of_other_classes() {
    let w = golden("model_resnet20.safetensors");
    let out = tempfile::tempdir().unwrap();
    let base = [
        "kd",
        "train-teacher",
        "--arch",
        "resnet20",
        "--init-weights",
        w.to_str().unwrap(),
        "--classes",
        "6",
        "--train-size",
        "64",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--out",
        out.path().to_str().unwrap(),
    ];
    let e = err(&base);
    assert!(
        e.contains("fc.weight (file [10, 64], model [6, 64])"),
        "{e}"
    );
    let mut args: Vec<String> = base.iter().map(|a| a.to_string()).collect();
    args.push("--reset-classifier".into());
    kd_cli::run(&args).unwrap();
}

/// DOT's flags go with `--optimizer dot` only, and its momenta are checked
/// before anything trains.
#[test]
fn dot_flags_are_checked_by_optimizer() {
    let e = distill(&["--method", "st", "--dot-delta", "0.1"]);
    assert!(
        e.contains("--dot-delta applies to --optimizer dot, not sgd"),
        "{e}"
    );
    let e = distill(&["--method", "st", "--optimizer", "dot", "--nesterov"]);
    assert!(
        e.contains("--nesterov applies to --optimizer sgd, not dot"),
        "{e}"
    );
    let e = distill(&[
        "--method",
        "st",
        "--optimizer",
        "dot",
        "--dot-delta",
        "0.95",
    ]);
    assert!(e.contains("momentum - delta (-0.04"), "{e}");
    let e = distill(&["--method", "st", "--optimizer", "dot", "--clip-grad", "5"]);
    assert!(
        e.contains("the dot optimizer cannot be combined with clip_grad"),
        "{e}"
    );
    // `kd bench` times a DOT step (two backwards).
    kd_cli::run([
        "kd",
        "bench",
        "--teacher",
        "resnet8",
        "--student",
        "resnet8",
        "--method",
        "st",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--batch",
        "4",
        "--classes",
        "10",
        "--optimizer",
        "dot",
    ])
    .unwrap();
}

#[test]
fn unknown_config_field_lists_valid_ones() {
    let e = distill(&["--method", "st", "--config", "st.tau=2"]);
    assert!(
        e.contains("method `st` config: unknown field `tau`, expected `T`"),
        "{e}"
    );
}

#[test]
fn missing_tap_names_the_valid_taps() {
    let e = distill(&["--method", "sp", "--config", r#"sp.taps=["feat/7"]"#]);
    assert!(e.contains("unknown tap `feat/7` on the student; valid taps: feat/0, feat/1, feat/2, feat/3, preact/0"), "{e}");
}

#[test]
fn student_teacher_shape_mismatch_is_refused() {
    let w = golden("model_resnet8x4.safetensors");
    let e = err(&[
        "kd",
        "distill",
        "--teacher",
        "resnet8x4",
        "--teacher-weights",
        w.to_str().unwrap(),
        "--student",
        "resnet8",
        "--method",
        "afd",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--num-classes-unused",
    ]
    .iter()
    .copied()
    .filter(|a| *a != "--num-classes-unused")
    .collect::<Vec<_>>());
    assert!(e.contains("afd") && e.contains("feat/1"), "{e}");
}

#[test]
fn missing_dataset_names_the_file() {
    let e = distill(&["--method", "st", "--data", "cifar10:/no/such/dir"]);
    assert!(
        e.contains("/no/such/dir: no such folder") && e.contains("data_batch_1.bin"),
        "{e}"
    );
}

#[test]
fn unknown_model_lists_the_zoo() {
    let e = err(&[
        "kd",
        "train-teacher",
        "--arch",
        "resnet9",
        "--epochs",
        "1",
        "--device",
        "cpu",
    ]);
    assert!(
        e.contains("unknown model `resnet9`; valid models: ") && e.contains("wrn_40_2"),
        "{e}"
    );
}

#[test]
fn methods_lists_config_defaults() {
    kd_cli::run(["kd", "methods"]).unwrap();
    kd_cli::run(["kd", "models"]).unwrap();
}

/// A step fixture with one thing wrong: `kd probe step` says what and what
/// would be valid, on one line.
#[test]
fn probe_step_fixture_errors_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let probe = |edit: &dyn Fn(&mut tensors::TensorFile)| {
        let mut f = tensors::read(&golden("step_bss.safetensors")).unwrap();
        edit(&mut f);
        let path = dir.path().join("f.safetensors");
        tensors::write(&path, &f).unwrap();
        let out = dir.path().join("o.safetensors");
        err(&[
            "kd",
            "probe",
            "step",
            "--fixture",
            path.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let drop = |name: &'static str| {
        move |f: &mut tensors::TensorFile| f.tensors.retain(|(n, _)| n != name)
    };
    let e = probe(&drop("batch/attack_u"));
    assert!(
        e.contains("give one uniform draw in [0, 1) per batch row (`batch/attack_u`)"),
        "{e}"
    );
    let e = probe(&drop("student.weights/layer1.0.conv2.weight"));
    assert!(
        e.contains("`student.weights/*` lacks 1 of the network's")
            && e.contains("layer1.0.conv2.weight"),
        "{e}"
    );
    let e = probe(&|f| {
        f.push(
            "teacher.weights/layer9.conv.weight",
            &tch::Tensor::zeros([1], tch::kind::FLOAT_CPU),
        )
    });
    assert!(
        e.contains("`teacher.weights/layer9.conv.weight` is not a tensor of the network"),
        "{e}"
    );
    let e = probe(&|f| {
        f.metadata.insert("epoch".into(), "20".into());
    });
    assert!(
        e.contains("`epoch` (20) must be below `epochs` (20)"),
        "{e}"
    );
    let e = probe(&|f| {
        f.metadata.insert("student".into(), "resnet9".into());
    });
    assert!(e.contains("unknown model `resnet9`; valid models: "), "{e}");
    let e = probe(&|f| {
        let u = f.get("batch/attack_u").unwrap() + 1.0;
        f.tensors.retain(|(n, _)| n != "batch/attack_u");
        f.push("batch/attack_u", &u);
    });
    assert!(
        e.contains("`batch/attack_u` must be [8] uniforms in [0, 1)"),
        "{e}"
    );
}

#[test]
fn reduced_precision_on_the_cpu_is_refused_before_training() {
    // bf16 runs on CPUs with bf16 kernels (docs/performance.md); fp16 does not.
    let e = distill(&["--method", "st", "--precision", "fp16"]);
    assert!(e.contains("precision `fp16` needs CUDA"), "{e}");
    // An unknown value is clap's usage error, which names the valid ones.
    let e = kd_cli::run(["kd", "distill", "--precision", "fp8"]).unwrap_err();
    assert!(
        e.to_string()
            .contains("unknown precision `fp8`; valid: fp32, bf16, fp16, teacher-bf16"),
        "{e}"
    );
}

#[test]
fn compare_config_must_name_a_method_of_some_group() {
    let e = distill(&[
        "--method",
        "st",
        "--compare",
        "at:100",
        "--config",
        "nst.p=2",
    ]);
    assert!(
        e.contains("no --method or --compare group uses `nst`"),
        "{e}"
    );
}

/// `--compare` groups train in lockstep (one teacher forward per batch) and
/// end exactly as the same runs trained one after another (`--solo`).
#[test]
fn compared_method_groups_equal_their_solo_runs() {
    let w = golden("model_resnet20.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let run = |out: &str, solo: bool| {
        let out = dir.path().join(out);
        let mut args = vec![
            "kd",
            "distill",
            "--teacher",
            "resnet20",
            "--teacher-weights",
            w.to_str().unwrap(),
            "--student",
            "resnet8",
            "--method",
            "st:0.9",
            "--compare",
            "at:100+st:0.5",
            "--config",
            "st.T=2",
            "--epochs",
            "1",
            "--train-size",
            "64",
            "--batch-size",
            "32",
            "--device",
            "cpu",
            "--out",
            out.to_str().unwrap(),
        ];
        if solo {
            args.push("--solo");
        }
        kd_cli::run(args).unwrap();
        out
    };
    let (group, solo) = (run("group", false), run("solo", true));
    for name in [
        "resnet8_from_resnet20_st_s0",
        "resnet8_from_resnet20_at+st_s0",
    ] {
        let plan = std::fs::read_to_string(group.join(name).join("plan.yaml")).unwrap();
        assert!(
            plan.contains("T: 2"),
            "--config reaches every group using st: {plan}"
        );
        let read = |root: &std::path::Path| {
            kd_engine::tensors::read(&root.join(name).join("distill.last.safetensors")).unwrap()
        };
        let (a, b) = (read(&group), read(&solo));
        assert!(!a.tensors.is_empty());
        for (k, t) in &a.tensors {
            assert!(
                t.equal(b.get(k).unwrap()),
                "{name}: `{k}` differs from the solo run"
            );
        }
    }
}
