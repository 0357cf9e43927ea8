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

#[test]
fn probe_model_matches_pytorch_resnet8x4() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let (w, io) = (
        golden("model_resnet8x4.safetensors"),
        golden("model_resnet8x4_io.safetensors"),
    );
    kd_cli::run([
        "kd",
        "probe",
        "model",
        "resnet8x4",
        "--weights",
        w.to_str().unwrap(),
        "--input",
        io.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
    .unwrap();
    let got = tensors::read(&out).unwrap();
    let want = tensors::read(&io).unwrap();
    for name in ["logits", "embed"] {
        let (a, b) = (got.get(name).unwrap(), want.get(name).unwrap());
        let err = (a - b).abs().max().double_value(&[]);
        let scale = b.abs().max().double_value(&[]);
        assert!(err <= 1e-4 * (1.0 + scale), "{name}: max abs diff {err}");
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
        "--train-size",
        "64",
        "--device",
        "cpu",
        "--out",
        "/nonexistent-kd-test-out",
    ];
    args.extend_from_slice(extra);
    err(&args)
}

#[test]
fn unknown_method_lists_registered_ones() {
    let e = distill(&["--method", "stt"]);
    assert!(
        e.contains("unknown method `stt`; registered methods: ")
            && e.contains("crd")
            && e.contains("st,"),
        "{e}"
    );
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
        e.contains("/no/such/dir/data_batch_1.bin") && e.contains("expected a CIFAR binary file"),
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
