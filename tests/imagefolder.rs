//! `kd distill` on an ImageFolder of JPEG and PNG files, end to end: ten
//! classes of images of varied sizes and aspect ratios (a grey JPEG and an
//! RGBA PNG among them) trained at 32 pixels with the CIFAR models; a
//! corrupt file stops the run naming it unless `--skip-corrupt`; a run
//! resumed after its first epoch ends as the uninterrupted run does.

use std::path::{Path, PathBuf};

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("golden/fixtures")
        .join(name)
}

fn picture(w: u32, h: u32, class: u32, seed: u32) -> image::RgbImage {
    // Each class its own colour cast and stripe direction, so the student
    // has something to learn; the seed varies the texture.
    image::RgbImage::from_fn(w, h, |x, y| {
        let stripe = if class.is_multiple_of(2) { x } else { y };
        let v = ((stripe * (3 + class)) % 32) * 6;
        image::Rgb([
            (v + class * 23) as u8,
            (v / 2 + (x * y + seed) % 40) as u8,
            (255 - v).saturating_sub(class * 11) as u8,
        ])
    })
}

/// 10 classes × 8 training JPEGs (2 × 5 for validation) of sizes from
/// 20×60 to 90×30, plus a grey JPEG, an RGBA PNG and, when asked, a file
/// that is no image at all.
fn write_folder(root: &Path, corrupt: bool) -> Option<PathBuf> {
    let sizes = [
        (32, 32),
        (48, 36),
        (36, 48),
        (90, 30),
        (20, 60),
        (64, 64),
        (41, 29),
        (50, 70),
    ];
    for (split, n) in [("train", 8), ("val", 2)] {
        for c in 0..10u32 {
            let dir = root.join(split).join(format!("n{:08}", 1000 + c));
            std::fs::create_dir_all(&dir).unwrap();
            for (i, &(w, h)) in sizes.iter().take(n).enumerate() {
                let img = picture(w, h, c, i as u32);
                img.save(dir.join(format!("img{i}.JPEG"))).unwrap();
            }
        }
    }
    let grey = image::DynamicImage::ImageRgb8(picture(40, 30, 3, 9)).into_luma8();
    grey.save(root.join("train/n00001003/grey.jpg")).unwrap();
    let rgba = image::DynamicImage::ImageRgb8(picture(30, 40, 4, 9)).into_rgba8();
    rgba.save(root.join("train/n00001004/alpha.png")).unwrap();
    corrupt.then(|| {
        let bad = root.join("train/n00001007/broken.jpg");
        std::fs::write(&bad, b"\xff\xd8\xff\xe0 truncated").unwrap();
        bad
    })
}

fn distill(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let w = golden("model_resnet20.safetensors");
    let mut a: Vec<String> = [
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
        "--data",
        &format!("imagefolder:{}", data.display()),
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--name",
        "x",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[test]
fn imagefolder_distill_trains_names_corrupt_files_and_resumes_exactly() {
    let data = tempfile::tempdir().unwrap();
    let bad = write_folder(data.path(), true).unwrap();

    // A corrupt file stops the run with an error naming it.
    let out = tempfile::tempdir().unwrap();
    let small = ["--image-size", "32", "--resize-size", "36", "--epochs", "1"];
    let e = kd_cli::run(distill(data.path(), out.path(), &small))
        .expect_err("a corrupt file is fatal by default");
    let msg = kd_cli::one_line(&e);
    assert!(!msg.contains('\n'), "one line: {msg}");
    assert!(msg.contains(&bad.display().to_string()), "{msg}");
    assert!(msg.contains("skip_corrupt"), "{msg}");

    // Skipped, the run trains; 1 epoch then 1 more equals 2 straight.
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let skip = [
        "--skip-corrupt",
        "--image-size",
        "32",
        "--resize-size",
        "36",
    ];
    let with = |extra: &[&'static str]| [&skip[..], extra].concat();
    kd_cli::run(distill(data.path(), a.path(), &with(&["--epochs", "2"]))).unwrap();
    kd_cli::run(distill(data.path(), b.path(), &with(&["--epochs", "1"]))).unwrap();
    let run = b.path().join("x_s0");
    let plan = std::fs::read_to_string(run.join("plan.yaml")).unwrap();
    assert!(
        plan.contains("kind: imagefolder")
            && plan.contains("image_size: 32")
            && plan.contains("skip_corrupt: true"),
        "{plan}"
    );
    let epochs = std::fs::read_to_string(run.join("epochs.jsonl")).unwrap();
    assert_eq!(epochs.lines().count(), 1);
    kd_cli::run(distill(
        data.path(),
        b.path(),
        &with(&["--epochs", "2", "--resume", "--extend"]),
    ))
    .unwrap();
    let w = |d: &Path| kd_engine::tensors::read(&d.join("x_s0/distill.last.safetensors")).unwrap();
    let (wa, wb) = (w(a.path()), w(b.path()));
    assert_eq!(wa.tensors.len(), wb.tensors.len());
    for ((n, x), (_, y)) in wa.tensors.iter().zip(&wb.tensors) {
        assert!(x.equal(y), "{n} differs between resumed and straight runs");
    }
    let log = |d: &Path| std::fs::read_to_string(d.join("x_s0/epochs.jsonl")).unwrap();
    let losses = |text: String| -> Vec<f64> {
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|v| v["record"]["train_loss"].as_f64().unwrap())
            .collect()
    };
    assert_eq!(losses(log(a.path())), losses(log(b.path())));
}

#[test]
fn imagefolder_options_are_checked_before_training() {
    let data = tempfile::tempdir().unwrap();
    write_folder(data.path(), false);
    let out = tempfile::tempdir().unwrap();
    let err = |extra: &[&str], data: &Path| {
        kd_cli::one_line(
            &kd_cli::run(distill(data, out.path(), extra)).expect_err("should be refused"),
        )
    };
    let e = err(&["--image-size", "0"], data.path());
    assert!(
        e.contains("image_size must be in 1..=4096 pixels, got 0"),
        "{e}"
    );
    let e = err(&[], &data.path().join("missing"));
    assert!(e.contains("missing: no such folder"), "{e}");
    std::fs::create_dir_all(data.path().join("val/extra")).unwrap();
    let e = err(&[], data.path());
    assert!(e.contains("no image file in class folder(s) extra"), "{e}");
    picture(8, 8, 0, 0)
        .save(data.path().join("val/extra/a.png"))
        .unwrap();
    let e = err(&[], data.path());
    assert!(
        e.contains("only in train/: none; only in val/: extra"),
        "{e}"
    );
    // The image options belong to ImageFolder data.
    let mut synthetic = distill(data.path(), out.path(), &["--skip-corrupt"]);
    let i = synthetic
        .iter()
        .position(|a| a.starts_with("imagefolder:"))
        .unwrap();
    synthetic[i] = "synthetic".into();
    let e = kd_cli::one_line(&kd_cli::run(synthetic).unwrap_err());
    assert!(e.contains("apply to --data imagefolder:DIR only"), "{e}");
    assert!(!out.path().join("x_s0").exists(), "nothing trained");
}

/// `--skip-corrupt` cannot change a run's numbers (a run that met a
/// corrupt file without it stopped), so a resume may add it: the error
/// that names a corrupt file tells the user to.
#[test]
fn a_resume_may_add_skip_corrupt() {
    let data = tempfile::tempdir().unwrap();
    write_folder(data.path(), false);
    let out = tempfile::tempdir().unwrap();
    let small = ["--image-size", "32", "--resize-size", "36"];
    let with = |extra: &[&'static str]| [&small[..], extra].concat();
    kd_cli::run(distill(data.path(), out.path(), &with(&["--epochs", "1"]))).unwrap();
    kd_cli::run(distill(
        data.path(),
        out.path(),
        &with(&["--epochs", "2", "--resume", "--extend", "--skip-corrupt"]),
    ))
    .unwrap_or_else(|e| panic!("{}", kd_cli::one_line(&e)));
    let epochs = std::fs::read_to_string(out.path().join("x_s0/epochs.jsonl")).unwrap();
    assert_eq!(epochs.lines().count(), 2);
}

/// `kd cache-teacher` on an ImageFolder (each sample's random crop keyed
/// like the in-memory sets'): a distillation reading it ends bit for bit
/// where the one running the teacher ends.
#[test]
fn an_imagefolder_teacher_cache_replays_the_online_run_exactly() {
    let data = tempfile::tempdir().unwrap();
    write_folder(data.path(), false);
    let small = ["--image-size", "32", "--resize-size", "36", "--epochs", "2"];
    let (online, cached, cache) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    kd_cli::run(distill(data.path(), online.path(), &small)).unwrap();
    let w = golden("model_resnet20.safetensors");
    let dir = cache.path().join("c");
    let mut write: Vec<String> = [
        "kd",
        "cache-teacher",
        "--teacher",
        "resnet20",
        "--teacher-weights",
        w.to_str().unwrap(),
        "--data",
        &format!("imagefolder:{}", data.path().display()),
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--out",
        dir.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    write.extend(small.iter().map(|s| s.to_string()));
    kd_cli::run(write).unwrap();
    let with_cache = [&small[..], &["--teacher-cache", dir.to_str().unwrap()]].concat();
    kd_cli::run(distill(data.path(), cached.path(), &with_cache)).unwrap();
    let weights =
        |d: &Path| kd_engine::tensors::read(&d.join("x_s0/distill.last.safetensors")).unwrap();
    let (a, b) = (weights(online.path()), weights(cached.path()));
    assert_eq!(a.tensors.len(), b.tensors.len());
    for ((n, x), (_, y)) in a.tensors.iter().zip(&b.tensors) {
        assert!(x.equal(y), "{n} differs between the cached and online runs");
    }
}
