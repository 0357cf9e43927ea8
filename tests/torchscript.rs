//! `torchscript:FILE` networks, end to end: a module that is no zoo shape
//! (tests/torchscript/net.py: grouped convolution, GELU, LayerNorm head),
//! written by the bootstrap venv's PyTorch at test time, gives PyTorch's
//! outputs in `kd probe model`, trains as a teacher and as a student (with
//! a logit method and a feature method on its taps), and its trained
//! weights load back into the PyTorch module (`strict=True`) with kd's
//! outputs. A module traced in eval mode is refused as a student.

use std::path::{Path, PathBuf};
use std::process::Command;

use kd_engine::tensors;
use kd_tests::root;

/// The modules and PyTorch's outputs, in a fresh folder.
fn written() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let ok = Command::new("python")
        .arg(root().join("tests/torchscript/net.py"))
        .arg(dir.path())
        .arg(root().join("tests/golden/fixtures/at.safetensors"))
        .status()
        .expect("python (the bootstrap venv: source scripts/env.sh)");
    assert!(ok.success());
    dir
}

/// Runs `script` in the venv's Python; it must succeed.
fn python(script: &str) {
    let ok = Command::new("python")
        .args(["-c", script])
        .status()
        .expect("python (the bootstrap venv: source scripts/env.sh)");
    assert!(ok.success(), "python failed on:\n{script}");
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn run(args: &[String]) {
    let mut all = vec!["kd".to_string()];
    all.extend_from_slice(args);
    kd_cli::run(&all).unwrap_or_else(|e| panic!("{all:?}: {}", kd_cli::one_line(&e)));
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

/// `kd probe model ARCH --weights W --input X --out O` (10 classes).
fn probe_model(arch: &str, weights: &Path, input: &Path, out: &Path) {
    let mut a = words("probe model");
    a.push(arch.to_string());
    a.extend(["--weights".into(), s(weights)]);
    a.extend(["--input".into(), s(input)]);
    a.extend(["--out".into(), s(out), "--num-classes".into(), "10".into()]);
    run(&a);
}

/// `kd probe model` on the TorchScript module with `weights`, on the
/// batch `net.py` wrote; its outputs.
fn probe(dir: &Path, module: &Path, weights: &Path) -> PathBuf {
    let out = dir.join(format!(
        "probe_{}.safetensors",
        weights.file_stem().unwrap().to_string_lossy()
    ));
    let arch = format!("torchscript:{}", s(module));
    probe_model(&arch, weights, &dir.join("input.safetensors"), &out);
    out
}

fn assert_close(got: &Path, want: &Path, keys: &[&str]) {
    let (g, w) = (tensors::read(got).unwrap(), tensors::read(want).unwrap());
    for k in keys {
        let (a, b) = (g.get(k).unwrap(), w.get(k).unwrap());
        assert_eq!(a.size(), b.size(), "{k}");
        let err = (a - b).abs().max().double_value(&[]);
        let scale = b.abs().max().double_value(&[]).max(1e-6);
        assert!(err <= 1e-5 * scale, "{k}: off by {err:e} (scale {scale:e})");
    }
}

#[test]
fn a_scripted_module_gives_pytorchs_outputs() {
    let dir = written();
    let p = dir.path();
    let out = probe(p, &p.join("scripted.pt"), &p.join("weights.safetensors"));
    assert_close(
        &out,
        &p.join("expect.safetensors"),
        &["logits", "feat/0", "feat/1", "feat/2", "embed"],
    );
}

#[test]
fn a_scripted_module_trains_as_teacher_and_student() {
    let dir = written();
    let p = dir.path();
    let runs = p.join("runs");
    let net = format!("torchscript:{}", s(&p.join("scripted.pt")));
    let common = format!(
        "--data digits --epochs 1 --batch-size 32 --device cpu --out {}",
        s(&runs)
    );
    run(&[
        words(&format!("train-teacher --arch {net} --name t")),
        words(&common),
    ]
    .concat());
    let trained = runs.join("t_s0/train.last.safetensors");
    // PyTorch loads the trained weights strictly and computes kd's outputs.
    let kd_out = probe(p, &p.join("scripted.pt"), &trained);
    let script = format!(
        "import torch; from safetensors.torch import load_file, save_file\n\
         m = torch.jit.load('{m}'); m.load_state_dict(load_file('{w}'), strict=True); m.eval()\n\
         with torch.no_grad(): y = m(load_file('{x}')['input'])\n\
         save_file({{k: v.contiguous() for k, v in y.items()}}, '{o}')",
        m = s(&p.join("scripted.pt")),
        w = s(&trained),
        x = s(&p.join("input.safetensors")),
        o = s(&p.join("reloaded.safetensors")),
    );
    python(&script);
    assert_close(
        &kd_out,
        &p.join("reloaded.safetensors"),
        &["logits", "embed"],
    );
    // Distilled into: from itself, with soft targets and attention transfer
    // on its taps; and as a teacher of a zoo student.
    run(&[
        words(&format!(
            "distill --teacher {net} --student {net} --method st --compare at --name s"
        )),
        words(&format!("--teacher-weights {}", s(&trained))),
        words(&common),
        words("--config at.taps=[\"feat/1\",\"feat/2\"]"),
    ]
    .concat());
    // As the teacher of a zoo student, its forward shared by two method
    // groups in lockstep: each run equals its solo run bit for bit.
    let zoo = |out: &str, extra: &str| {
        run(&[
            words(&format!(
                "distill --teacher {net} --student resnet8 --method st --compare dkd --name z {extra}"
            )),
            words(&format!("--teacher-weights {}", s(&trained))),
            words(&common.replace(&s(&runs), &s(&p.join(out)))),
        ]
        .concat())
    };
    zoo("lockstep", "");
    zoo("solo", "--solo");
    for r in ["z_st_s0", "z_dkd_s0"] {
        let w =
            |d: &str| tensors::read(&p.join(d).join(r).join("distill.last.safetensors")).unwrap();
        let (a, b) = (w("lockstep"), w("solo"));
        assert_eq!(a.tensors.len(), b.tensors.len());
        for ((n, x), (_, y)) in a.tensors.iter().zip(&b.tensors) {
            assert!(x.equal(y), "{r}: {n} differs between lockstep and solo");
        }
    }
    for r in ["s_st_s0", "s_at_s0"] {
        let log = std::fs::read_to_string(runs.join(r).join("epochs.jsonl")).unwrap();
        assert_eq!(log.lines().count(), 1, "{r}");
    }
}

#[test]
fn a_module_traced_in_eval_mode_cannot_be_a_student() {
    let dir = written();
    let p = dir.path();
    let mut a = vec!["kd".to_string()];
    a.extend(words(&format!(
        "train-teacher --arch torchscript:{} --data digits --epochs 1 --out {}",
        s(&p.join("traced_eval.pt")),
        s(&p.join("runs"))
    )));
    let e = kd_cli::one_line(&kd_cli::run(&a).unwrap_err());
    assert!(
        e.contains("traced in eval mode") && e.contains("torch.jit.script"),
        "{e}"
    );
    assert!(!p.join("runs").exists(), "nothing may be written");
    let mut missing = a.clone();
    missing[3] = "torchscript:nowhere.pt".into();
    let e = kd_cli::one_line(&kd_cli::run(&missing).unwrap_err());
    assert!(e.contains("nowhere.pt: no such file"), "{e}");
}

/// KD-Zoo's AT loss, scripted in PyTorch and run as the `torchscript`
/// method, gives the loss and gradients of the `at` golden fixture (which
/// the independent reference wrote) on the same taps.
#[test]
fn a_scripted_loss_gives_the_reference_at_loss() {
    let dir = written();
    let p = dir.path();
    // As a saved TorchScript file, and as a Python spec scripted by kd.
    for source in ["file", "entry"] {
        let fixture = p.join(format!("at_torchscript_{source}.safetensors"));
        let out = p.join(format!("at_out_{source}.safetensors"));
        let mut a = words("probe loss --fixture");
        a.extend([s(&fixture), "--out".into(), s(&out)]);
        run(&a);
        same_loss_and_grads(&out, &fixture);
    }
    // On the command line, in a distillation.
    let at = format!(
        "python:{}:KdZooAt:1000",
        s(&root().join("tests/torchscript/net.py"))
    );
    let mut a = words(&format!(
        "distill --teacher resnet20 --teacher-weights {} --student resnet8 --method",
        s(&root().join("tests/golden/fixtures/model_resnet20.safetensors"))
    ));
    a.push(at);
    a.extend(words(&format!(
        "--train-size 64 --batch-size 32 --epochs 1 --device cpu --name py --out {}",
        s(&p.join("runs"))
    )));
    a.push(r#"--config=python.taps=["feat/1","feat/2","feat/3"]"#.into());
    run(&a);
    let plan = std::fs::read_to_string(p.join("runs/py_s0/plan.yaml")).unwrap();
    assert!(
        plan.contains("method: python") && plan.contains("weight: 1000"),
        "{plan}"
    );
}

/// Run `r` straight for two epochs (in `a`), and for one then resumed and
/// extended to two (in `b`): the last weights are equal bit for bit.
fn resumes_exactly(p: &Path, cmd: &dyn Fn(&str, &str) -> Vec<String>) {
    run(&cmd("a", "--epochs 2"));
    run(&cmd("b", "--epochs 1"));
    run(&cmd("b", "--epochs 2 --resume --extend"));
    let w = |d: &str| tensors::read(&p.join(d).join("r_s0/train.last.safetensors")).unwrap();
    let (wa, wb) = (w("a"), w("b"));
    assert_eq!(wa.tensors.len(), wb.tensors.len());
    for ((n, x), (_, y)) in wa.tensors.iter().zip(&wb.tensors) {
        assert!(
            x.equal(y),
            "{n} differs between the resumed and the straight run"
        );
    }
}

fn same_loss_and_grads(out: &Path, fixture: &Path) {
    let (g, w) = (tensors::read(out).unwrap(), tensors::read(fixture).unwrap());
    for (got, want) in [
        ("loss", "expect/loss"),
        ("grad/student/feat/1", "expect/grad/student/feat/1"),
        ("grad/student/feat/2", "expect/grad/student/feat/2"),
        ("grad/student/feat/3", "expect/grad/student/feat/3"),
    ] {
        let (a, b) = (g.get(got).unwrap(), w.get(want).unwrap());
        let err = (a - b).abs().max().double_value(&[]);
        let scale = b.abs().max().double_value(&[]);
        assert!(
            err <= 1e-5 * scale,
            "{out:?} {got}: off by {err:e} (scale {scale:e})"
        );
    }
}

/// A TorchScript run resumes exactly (its tensors are the module's, and a
/// checkpoint restores them in place), and a resume refuses a module file
/// that changed under the run.
#[test]
fn a_torchscript_run_resumes_exactly_and_pins_its_module() {
    let dir = written();
    let p = dir.path();
    let module = p.join("m.pt");
    std::fs::copy(p.join("scripted.pt"), &module).unwrap();
    let cmd = |out: &str, extra: &str| {
        let mut a = words(&format!(
            "train-teacher --arch torchscript:{} --data digits --batch-size 64 --device cpu --name r --out {}",
            s(&module),
            s(&p.join(out))
        ));
        a.extend(words(extra));
        a
    };
    resumes_exactly(p, &cmd);
    let plan = std::fs::read_to_string(p.join("b/r_s0/plan.yaml")).unwrap();
    assert!(plan.contains("source_sha256:"), "{plan}");
    // Another module under the same name: other initial weights.
    let edit = format!(
        "import torch\nm = torch.jit.load('{m}')\nwith torch.no_grad():\n    next(m.parameters()).add_(1.0)\nm.save('{m}')",
        m = s(&module)
    );
    python(&edit);
    let mut a = vec!["kd".to_string()];
    a.extend(cmd("b", "--epochs 3 --resume --extend"));
    let e = kd_cli::one_line(&kd_cli::run(&a).unwrap_err());
    assert!(e.contains("student.source_sha256"), "{e}");
}

/// `python:` specs: the same network given as its Python class (run in
/// kd's embedded Python) trains like its TorchScript file, and a
/// torchvision model by name gives PyTorch's outputs for the same weights.
#[test]
fn python_specs_build_the_users_module() {
    let dir = written();
    let p = dir.path();
    let net = format!(
        "python:{}:Net(num_classes=10)",
        s(&root().join("tests/torchscript/net.py"))
    );
    let out = p.join("py_probe.safetensors");
    probe_model(
        &net,
        &p.join("weights.safetensors"),
        &p.join("input.safetensors"),
        &out,
    );
    assert_close(
        &out,
        &p.join("expect.safetensors"),
        &["logits", "feat/2", "embed"],
    );
    run(&words(&format!(
        "train-teacher --arch {net} --data digits --epochs 1 --batch-size 64 --device cpu --name py --out {}",
        s(&p.join("runs"))
    )));
    let plan = std::fs::read_to_string(p.join("runs/py_s0/plan.yaml")).unwrap();
    assert!(plan.contains("source_sha256:"), "{plan}");

    // torchvision by name: weights and outputs from PyTorch.
    let script = format!(
        "import torch, torchvision; from safetensors.torch import save_file\n\
         torch.manual_seed(3); m = torchvision.models.mobilenet_v3_small(num_classes=10).eval()\n\
         x = torch.randn(2, 3, 64, 64)\n\
         with torch.no_grad(): y = m(x)\n\
         save_file({{k: v.contiguous() for k, v in m.state_dict().items()}}, '{w}')\n\
         save_file({{'input': x}}, '{x}'); save_file({{'logits': y}}, '{y}')",
        w = s(&p.join("mnv3.safetensors")),
        x = s(&p.join("mnv3_in.safetensors")),
        y = s(&p.join("mnv3_expect.safetensors")),
    );
    python(&script);
    let mnv3 = "python:torchvision.models:mobilenet_v3_small(num_classes=10)";
    let (mnv3_in, out) = (
        p.join("mnv3_in.safetensors"),
        p.join("mnv3_out.safetensors"),
    );
    probe_model(mnv3, &p.join("mnv3.safetensors"), &mnv3_in, &out);
    assert_close(&out, &p.join("mnv3_expect.safetensors"), &["logits"]);

    // Distilled into on digits, then reloaded strictly by torchvision's own
    // class, which computes kd's outputs.
    let mut a = words(&format!(
        "distill --teacher resnet20 --teacher-weights {} --method st --data digits --epochs 1 --batch-size 64 --device cpu --name tv --out {} --student",
        s(&root().join("tests/golden/fixtures/model_resnet20.safetensors")),
        s(&p.join("runs"))
    ));
    a.push(mnv3.into());
    run(&a);
    let trained = p.join("runs/tv_s0/distill.last.safetensors");
    let kd_out = p.join("tv_kd.safetensors");
    probe_model(mnv3, &trained, &mnv3_in, &kd_out);
    // The same weights as torch.save writes them, for torch.load.
    let reload = format!(
        "import torch, torchvision; from safetensors.torch import load_file, save_file\n\
         m = torchvision.models.mobilenet_v3_small(num_classes=10)\n\
         m.load_state_dict(load_file('{w}'), strict=True); m.eval()\n\
         sd = torch.load('{pt}'); st = load_file('{w}')\n\
         assert sorted(sd) == sorted(st) and all(torch.equal(sd[k], st[k]) for k in st)\n\
         torchvision.models.mobilenet_v3_small(num_classes=10).load_state_dict(sd, strict=True)\n\
         with torch.no_grad(): y = m(load_file('{x}')['input'])\n\
         save_file({{'logits': y}}, '{o}')",
        pt = s(&trained.with_extension("pt")),
        w = s(&trained),
        x = s(&p.join("mnv3_in.safetensors")),
        o = s(&p.join("tv_torch.safetensors")),
    );
    python(&reload);
    assert_close(&kd_out, &p.join("tv_torch.safetensors"), &["logits"]);

    // Taps named by submodule path: PyTorch's forward hooks on the same
    // modules give the expected maps.
    let script = format!(
        "import torch, torchvision; from safetensors.torch import save_file\n\
         torch.manual_seed(4); m = torchvision.models.resnet18(num_classes=10).eval()\n\
         seen = {{}}\n\
         for name in ['layer2', 'layer3']:\n    getattr(m, name).register_forward_hook(lambda mod, i, o, name=name: seen.__setitem__(name, o))\n\
         x = torch.randn(2, 3, 64, 64)\n\
         with torch.no_grad(): y = m(x)\n\
         save_file({{k: v.contiguous() for k, v in m.state_dict().items()}}, '{w}')\n\
         save_file({{'input': x}}, '{x}')\n\
         save_file({{'logits': y, 'feat/1': seen['layer2'], 'feat/2': seen['layer3']}}, '{y}')",
        w = s(&p.join("r18.safetensors")),
        x = s(&p.join("r18_in.safetensors")),
        y = s(&p.join("r18_expect.safetensors")),
    );
    python(&script);
    let out = p.join("r18_out.safetensors");
    probe_model(
        "python:torchvision.models:resnet18(num_classes=10)[feat/1=layer2,feat/2=layer3]",
        &p.join("r18.safetensors"),
        &p.join("r18_in.safetensors"),
        &out,
    );
    assert_close(
        &out,
        &p.join("r18_expect.safetensors"),
        &["logits", "feat/1", "feat/2"],
    );

    // Mistakes are one line naming what was wrong.
    for (spec, want) in [
        (
            format!(
                "python:{}:Nope",
                s(&root().join("tests/torchscript/net.py"))
            ),
            "has no `Nope`",
        ),
        (
            "python:nowhere.py:Net".to_string(),
            "nowhere.py: no such file",
        ),
        (
            "python:torch.nn:ReLU(".to_string(),
            "is not NAME or NAME(literal arguments)",
        ),
    ] {
        let mut a = vec!["kd".to_string()];
        a.extend(words("train-teacher --arch"));
        a.push(spec.clone());
        a.extend(words(&format!(
            "--data digits --epochs 1 --out {}",
            s(&p.join("bad"))
        )));
        let e = kd_cli::one_line(&kd_cli::run(&a).unwrap_err());
        assert!(e.contains(want), "{spec}: {e}");
    }
}

/// One `kd probe step` with a foreign student and teacher equals
/// PyTorch's own step on the same modules and batch: the loss, every
/// student gradient, the BatchNorm buffers after it (tolerances of
/// tests/golden.rs). As TorchScript files, and as Python modules that
/// TorchScript cannot compile, run by kd's embedded Python. `st` on the
/// logits, and LwM, whose Grad-CAMs take gradient taps through both
/// modules and differentiate the student's twice.
#[test]
fn a_step_on_foreign_networks_equals_pytorchs() {
    let dir = written();
    let p = dir.path();
    for method in ["st", "lwm", "st_python", "lwm_python"] {
        let fixture = p.join(format!("step_{method}.safetensors"));
        let out = p.join(format!("step_{method}_out.safetensors"));
        let mut a = words("probe step --fixture");
        a.extend([s(&fixture), "--out".into(), s(&out)]);
        run(&a);
        let (got, want) = (
            tensors::read(&out).unwrap(),
            tensors::read(&fixture).unwrap(),
        );
        let mut checked = 0;
        for (name, w) in want.with_prefix("expect/") {
            let g = got
                .get(name)
                .unwrap_or_else(|| panic!("{method}: kd wrote no `{name}`"));
            let (rtol, atol) = if name == "loss" {
                (1e-5, 1e-7)
            } else {
                (1e-4, 1e-6)
            };
            let scale = w.abs().max().double_value(&[]);
            let atol = f64::min(atol, 0.1 * rtol * scale);
            let diff = (g - w).abs();
            // Exactly equal passes (a gradient that is zero on both sides
            // has no scale to be relative to).
            let err = if diff.max().double_value(&[]) == 0.0 {
                0.0
            } else {
                (diff / (w.abs() * rtol + atol)).max().double_value(&[])
            };
            assert!(err <= 1.0, "{method} {name}: {err:.3} of the tolerance");
            checked += 1;
        }
        // The loss, 13 parameter gradients, 6 running statistics.
        assert_eq!(checked, 20, "{method}: expectations checked");
    }
}

/// A Python module TorchScript cannot compile trains in kd's process and
/// resumes exactly (its tensors are the module's own, restored in place by
/// the checkpoint); a resume refuses a source file that changed.
#[test]
fn a_python_run_resumes_exactly_and_pins_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let source = p.join("net.py");
    std::fs::copy(root().join("tests/torchscript/net.py"), &source).unwrap();
    let cmd = |out: &str, extra: &str| {
        let mut a = words("train-teacher --arch");
        a.push(format!("python:{}:EagerNet()", s(&source)));
        a.extend(words(&format!(
            "--data digits --batch-size 64 --device cpu --name r --out {} {extra}",
            s(&p.join(out))
        )));
        a
    };
    resumes_exactly(p, &cmd);
    let mut text = std::fs::read_to_string(&source).unwrap();
    text.push_str("\n# edited\n");
    std::fs::write(&source, text).unwrap();
    let mut a = vec!["kd".to_string()];
    a.extend(cmd("b", "--epochs 3 --resume --extend"));
    let e = kd_cli::one_line(&kd_cli::run(&a).unwrap_err());
    assert!(e.contains("student.source_sha256"), "{e}");
}

/// A user's module that goes wrong is one line naming what was wrong, and
/// the network mistakes are caught before the first step.
#[test]
fn python_module_mistakes_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let bad = s(&root().join("tests/torchscript/bad.py"));
    let fail = |args: Vec<String>| {
        let mut a = vec!["kd".to_string()];
        a.extend(args);
        let e = kd_cli::run(&a).unwrap_err();
        let line = kd_cli::one_line(&e);
        assert!(!line.contains('\n'), "{line}");
        line
    };
    let net = |class: &str| {
        let mut a = words("train-teacher --arch");
        a.push(format!("python:{bad}:{class}"));
        a.extend(words(&format!(
            "--data digits --epochs 1 --device cpu --name {class} --out {}",
            s(&p.join("runs"))
        )));
        a
    };
    for (class, want) in [
        (
            "Raises",
            "ValueError: this net wants 1 channel, got 3 (at bad.py:",
        ),
        ("Tuple", "forward returned a tuple"),
        ("NoLogits", "without \"logits\" (keys: out)"),
        ("Elsewhere", "on meta, but kd runs this module on cpu"),
        ("Nope", "has no `Nope`"),
    ] {
        let e = fail(net(class));
        assert!(e.contains(want), "{class}: {e}");
        // Nothing trained: no epoch was written.
        assert!(
            !p.join(format!("runs/{class}_s0/epochs.jsonl")).exists(),
            "{class}: an epoch ran"
        );
    }
    let mut a = net("Fine");
    a.push("--cuda-graph".into());
    let e = fail(a);
    assert!(e.contains("cuda_graph cannot capture"), "{e}");
    let mut a = words(&format!(
        "distill --teacher resnet20 --teacher-weights {} --student resnet8 --train-size 64 --batch-size 32 --epochs 1 --device cpu --name loss --out {} --method",
        s(&root().join("tests/golden/fixtures/model_resnet20.safetensors")),
        s(&p.join("runs"))
    ));
    a.push(format!("python:{bad}:PerSample"));
    let e = fail(a);
    assert!(e.contains("each term must be a scalar"), "{e}");
}

/// A run without foreign modules starts no Python: neither kd's embedded
/// interpreter nor libpython is mapped into the process after it; a
/// `python:` network maps both.
#[test]
fn a_zoo_run_starts_no_python() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let mapped = || std::fs::read_to_string("/proc/self/maps").unwrap();
    run(&words(&format!(
        "train-teacher --arch resnet8 --train-size 64 --batch-size 32 --epochs 1 --device cpu --name zoo --out {}",
        s(p)
    )));
    let maps = mapped();
    assert!(
        !maps.contains("libkd_python") && !maps.contains("libpython"),
        "a zoo run loaded Python"
    );
    let mut a = words("train-teacher --arch");
    a.push(format!(
        "python:{}:Fine",
        s(&root().join("tests/torchscript/bad.py"))
    ));
    a.extend(words(&format!(
        "--train-size 64 --classes 10 --batch-size 32 --epochs 1 --device cpu --name py --out {}",
        s(p)
    )));
    run(&a);
    let maps = mapped();
    assert!(maps.contains("libkd_python") && maps.contains("libpython"));
}
