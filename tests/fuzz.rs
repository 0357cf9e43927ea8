//! Property tests on the files kd reads that a user can hand it damaged:
//! probe fixtures and run checkpoints. Whatever the bytes, reading them
//! returns a result (an error saying what is wrong, or a value), never a
//! panic. The case counts are constants so the closing notes can cite them.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use kd_core::Registry;
use kd_engine::tensors::{self, TensorFile};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;

const FIXTURE_BYTE_CASES: u32 = 300;
const FIXTURE_TENSOR_CASES: u32 = 300;
const CHECKPOINT_CASES: u32 = 120;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("golden/fixtures")
        .join(name)
}

fn registry() -> &'static Registry {
    static REGISTRY: std::sync::OnceLock<Registry> = std::sync::OnceLock::new();
    REGISTRY.get_or_init(|| {
        kd_methods::link();
        Registry::global().unwrap()
    })
}

/// Byte-level damage: flips, a cut, an inserted run.
#[derive(Debug, Clone)]
enum ByteEdit {
    Flip(usize, u8),
    Cut(usize),
    Insert(usize, Vec<u8>),
}

fn byte_edits() -> impl Strategy<Value = Vec<ByteEdit>> {
    let edit = prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| ByteEdit::Flip(i, b)),
        any::<usize>().prop_map(ByteEdit::Cut),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, v)| ByteEdit::Insert(i, v)),
    ];
    prop::collection::vec(edit, 1..4)
}

/// Damage favouring the first few hundred bytes: the header, where a
/// safetensors file says what it holds.
fn apply(bytes: &[u8], edits: &[ByteEdit]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for e in edits {
        let at = |i: usize| {
            if b.is_empty() {
                0
            } else if i.is_multiple_of(2) {
                i % b.len().min(512)
            } else {
                i % b.len()
            }
        };
        match e {
            ByteEdit::Flip(i, v) if !b.is_empty() => {
                let i = at(*i);
                b[i] ^= v | 1;
            }
            ByteEdit::Cut(i) => {
                let i = at(*i);
                b.truncate(i);
            }
            ByteEdit::Insert(i, v) => {
                let i = at(*i);
                b.splice(i..i, v.iter().copied());
            }
            _ => {}
        }
    }
    b
}

/// Runs `f`, failing the property if it panics.
fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, TestCaseError> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        TestCaseError::fail(format!("{what} panicked: {msg}"))
    })
}

const FIXTURES: [&str; 6] = [
    "st.safetensors",
    "at.safetensors",
    "crd.safetensors",
    "vid.safetensors",
    "rkd.safetensors",
    "fitnet.safetensors",
];

#[test]
fn damaged_fixture_bytes_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let originals: Vec<Vec<u8>> = FIXTURES
        .iter()
        .map(|f| std::fs::read(golden(f)).unwrap())
        .collect();
    let mut runner = TestRunner::new(kd_tests::fuzz_config(FIXTURE_BYTE_CASES));
    let path = dir.path().join("f.safetensors");
    runner
        .run(&(0..FIXTURES.len(), byte_edits()), |(which, edits)| {
            std::fs::write(&path, apply(&originals[which], &edits)).unwrap();
            // The reader itself is not guarded against panics: it must not
            // raise one.
            let _ = no_panic("tensors::read", || tensors::read(&path).map(|_| ()))?;
            let r = no_panic("probe_loss", || {
                kd_engine::probe::probe_loss(&path, registry(), 0).map(|_| ())
            })?;
            if let Err(e) = r {
                prop_assert!(!e.to_string().contains("Exception raised from"), "{e}");
            }
            Ok(())
        })
        .unwrap();
}

/// Tensor-level damage of a fixture that still parses.
#[derive(Debug, Clone)]
enum TensorEdit {
    Drop(usize),
    Reshape(usize, Vec<i64>),
    ToInt(usize),
    Fill(usize, f64),
    Params(String),
    NData(String),
}

fn tensor_edits() -> impl Strategy<Value = Vec<TensorEdit>> {
    let special = prop_oneof![
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(-1.0),
        Just(1e9),
        Just(0.0),
        any::<f64>()
    ];
    let edit = prop_oneof![
        any::<usize>().prop_map(TensorEdit::Drop),
        (any::<usize>(), prop::collection::vec(0i64..9, 0..5))
            .prop_map(|(i, s)| TensorEdit::Reshape(i, s)),
        any::<usize>().prop_map(TensorEdit::ToInt),
        (any::<usize>(), special).prop_map(|(i, v)| TensorEdit::Fill(i, v)),
        prop_oneof![
            Just("{".to_string()),
            Just("[]".to_string()),
            Just(r#"{"T": -1}"#.to_string()),
            Just(r#"{"T": "x"}"#.to_string()),
            Just(r#"{"taps": ["feat/9"]}"#.to_string()),
            "[ -~]{0,20}",
        ]
        .prop_map(TensorEdit::Params),
        prop_oneof![
            Just("-5".to_string()),
            Just("0".to_string()),
            "[0-9a-z]{0,6}"
        ]
        .prop_map(TensorEdit::NData),
    ];
    prop::collection::vec(edit, 1..4)
}

fn edit_file(f: &mut TensorFile, edits: &[TensorEdit]) {
    for e in edits {
        let n = f.tensors.len().max(1);
        match e {
            TensorEdit::Drop(i) if !f.tensors.is_empty() => {
                drop(f.tensors.remove(i % n));
            }
            TensorEdit::Reshape(i, shape) if !f.tensors.is_empty() => {
                let t = tch::Tensor::zeros(shape.as_slice(), tch::kind::FLOAT_CPU);
                f.tensors[i % n].1 = t;
            }
            TensorEdit::ToInt(i) if !f.tensors.is_empty() => {
                let t = f.tensors[i % n].1.to_kind(tch::Kind::Int64);
                f.tensors[i % n].1 = t;
            }
            TensorEdit::Fill(i, v) if !f.tensors.is_empty() => {
                let t = &f.tensors[i % n].1;
                let filled = if t.is_floating_point() {
                    // Through f32, which saturates: libtorch refuses to fill
                    // a float tensor with an f64 beyond its range.
                    t.full_like(*v as f32 as f64)
                } else {
                    t.full_like(if v.is_finite() {
                        (*v as i64) as f64
                    } else {
                        -7.0
                    })
                };
                f.tensors[i % n].1 = filled;
            }
            TensorEdit::Params(p) => {
                f.metadata.insert("params".into(), p.clone());
            }
            TensorEdit::NData(v) => {
                f.metadata.insert("n_data".into(), v.clone());
            }
            _ => {}
        }
    }
}

#[test]
fn damaged_fixture_tensors_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut runner = TestRunner::new(kd_tests::fuzz_config(FIXTURE_TENSOR_CASES));
    let path = dir.path().join("f.safetensors");
    runner
        .run(&(0..FIXTURES.len(), tensor_edits()), |(which, edits)| {
            let mut f = tensors::read(&golden(FIXTURES[which])).unwrap();
            edit_file(&mut f, &edits);
            tensors::write(&path, &f).unwrap();
            let r = no_panic("probe_loss", || {
                kd_engine::probe::probe_loss(&path, registry(), 0).map(|_| ())
            })?;
            if let Err(e) = r {
                let msg = e.to_string();
                prop_assert!(!msg.contains("Exception raised from"), "{msg}");
                prop_assert!(!msg.contains('\n'), "{msg}");
            }
            Ok(())
        })
        .unwrap();
}

/// A finished one-epoch run whose checkpoint the cases damage.
fn trained_run(out: &Path) -> PathBuf {
    kd_cli::run([
        "kd",
        "train-teacher",
        "--arch",
        "resnet8",
        "--epochs",
        "1",
        "--train-size",
        "32",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--name",
        "c",
        "--out",
        out.to_str().unwrap(),
    ])
    .unwrap();
    out.join("c_s0")
}

#[derive(Debug, Clone)]
enum CheckpointEdit {
    Bytes(Vec<ByteEdit>),
    Tensors(Vec<TensorEdit>),
    Resume(String),
}

#[test]
fn damaged_checkpoints_never_panic_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained_run(&dir.path().join("orig"));
    let ckpt = std::fs::read(run.join("checkpoint.safetensors")).unwrap();
    let parsed = tensors::read(&run.join("checkpoint.safetensors")).unwrap();
    let plan: kd_engine::Plan =
        serde_saphyr::from_str(&std::fs::read_to_string(run.join("plan.yaml")).unwrap()).unwrap();
    let resume_meta = prop_oneof![
        Just("{}".to_string()),
        Just(
            r#"{"stage":0,"next_epoch":5,"history":[],"best_top1":0,"best_epoch":0,"finished":[]}"#
                .to_string()
        ),
        Just(
            r#"{"stage":3,"next_epoch":0,"history":[],"best_top1":0,"best_epoch":0,"finished":[]}"#
                .to_string()
        ),
        "[ -~]{0,40}",
    ];
    let edit = prop_oneof![
        byte_edits().prop_map(CheckpointEdit::Bytes),
        tensor_edits().prop_map(CheckpointEdit::Tensors),
        resume_meta.prop_map(CheckpointEdit::Resume),
    ];
    let mut runner = TestRunner::new(kd_tests::fuzz_config(CHECKPOINT_CASES));
    let case_dir = dir.path().join("case");
    runner
        .run(&edit, |edit| {
            std::fs::create_dir_all(&case_dir).unwrap();
            let target = case_dir.join("checkpoint.safetensors");
            match &edit {
                CheckpointEdit::Bytes(e) => std::fs::write(&target, apply(&ckpt, e)).unwrap(),
                CheckpointEdit::Tensors(e) => {
                    let mut f = TensorFile {
                        tensors: parsed
                            .tensors
                            .iter()
                            .map(|(n, t)| (n.clone(), t.copy()))
                            .collect(),
                        metadata: parsed.metadata.clone(),
                    };
                    edit_file(&mut f, e);
                    tensors::write(&target, &f).unwrap();
                }
                CheckpointEdit::Resume(m) => {
                    let mut f = TensorFile {
                        tensors: parsed
                            .tensors
                            .iter()
                            .map(|(n, t)| (n.clone(), t.copy()))
                            .collect(),
                        metadata: parsed.metadata.clone(),
                    };
                    f.metadata.insert("resume".into(), m.clone());
                    tensors::write(&target, &f).unwrap();
                }
            }
            let mut opts = kd_engine::RunOptions {
                run_dir: case_dir.clone(),
                resume: true,
                observer: &mut kd_engine::Silent,
                scripts: &kd_engine::NoScripts,
                stop: None,
                log_every: 50,
                progress_bar: false,
            };
            let _ = no_panic("resume", || {
                kd_engine::run(&plan, registry(), &mut opts).map(|_| ())
            })?;
            std::fs::remove_dir_all(&case_dir).unwrap();
            Ok(())
        })
        .unwrap();
}
