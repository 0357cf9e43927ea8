//! kd's Mixup/CutMix and RandomErasing against timm's own code
//! (`tests/golden/mixup.py`): timm's random calls were recorded with their
//! arguments and values; kd replays them through its `DrawSource`, which
//! checks that kd asks for the same kind of draw with the same bounds, in
//! the same order, and that nothing is left over. The mixed images, the
//! mixed targets, λ and the erased images must then equal timm's bit for
//! bit.
//!
//! The loader's use of them is checked below too: keyed draws that do not
//! depend on torch's generator, erasing per sample, mixing per batch,
//! training batches only.

use std::collections::HashMap;
use std::path::Path;

use kd_data::{
    CropPadding, Dataset, DrawSource, EraseMode, Loader, LoaderConfig, MixDraw, Mixup,
    RandomErasing, erase, mix_batch,
};
use tch::{Device, Kind, Tensor};

fn fixture() -> HashMap<String, Tensor> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/data/mixup.safetensors");
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (python tests/golden/mixup.py writes it)",
                path.display()
            )
        })
        .into_iter()
        .collect()
}

/// timm's recorded calls, handed back in order.
struct Scripted {
    kind: Vec<i64>,
    arg: Vec<Vec<f64>>,
    value: Vec<f64>,
    noise: Vec<f32>,
    next: usize,
    case: String,
}

impl Scripted {
    fn new(f: &HashMap<String, Tensor>, case: &str) -> Scripted {
        Scripted {
            kind: Vec::try_from(&f[&format!("{case}/kind")]).unwrap(),
            arg: Vec::try_from(&f[&format!("{case}/arg")]).unwrap(),
            value: Vec::try_from(&f[&format!("{case}/value")]).unwrap(),
            noise: f
                .get(&format!("{case}/noise"))
                .map(|t| Vec::try_from(t).unwrap())
                .unwrap_or_default(),
            next: 0,
            case: case.into(),
        }
    }

    /// The next recorded call, which must be of `kind` with `args`.
    fn take(&mut self, kind: i64, args: [f64; 2], what: &str) -> f64 {
        let i = self.next;
        assert!(
            i < self.kind.len(),
            "{}: kd draws {what} after timm's {} calls",
            self.case,
            self.kind.len()
        );
        assert_eq!(
            (self.kind[i], self.arg[i].as_slice()),
            (kind, args.as_slice()),
            "{}: call {i}: kd draws {what}{args:?}, timm drew kind {} {:?}",
            self.case,
            self.kind[i],
            self.arg[i]
        );
        self.next += 1;
        self.value[i]
    }

    fn done(&self) {
        assert_eq!(
            self.next,
            self.kind.len(),
            "{}: kd drew {} of timm's {} calls",
            self.case,
            self.next,
            self.kind.len()
        );
    }
}

impl DrawSource for Scripted {
    fn uniform(&mut self) -> f64 {
        self.take(0, [0.0, 0.0], "rand()")
    }
    fn uniform_in(&mut self, a: f64, b: f64) -> f64 {
        self.take(1, [a, b], "uniform")
    }
    fn integer(&mut self, lo: i64, hi: i64) -> i64 {
        self.take(2, [lo as f64, hi as f64], "integer") as i64
    }
    fn beta(&mut self, a: f64) -> f64 {
        self.take(3, [a, a], "beta")
    }
    fn normals(&mut self, n: usize) -> Vec<f32> {
        let at = self.take(4, [n as f64, 0.0], "normals") as usize;
        self.noise[at..at + n].to_vec()
    }
}

fn floats(t: &Tensor) -> Vec<f64> {
    Vec::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

fn assert_same(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.size(), want.size(), "{what}: shape");
    assert_eq!(got.kind(), want.kind(), "{what}: dtype");
    let diff = (got - want).abs().max().double_value(&[]);
    assert!(
        got.equal(want),
        "{what}: differs from timm by up to {diff:e}"
    );
}

const MIX_CASES: [&str; 8] = [
    "mixup",
    "cutmix",
    "cutmix_uncorrected",
    "switch_cutmix",
    "switch_mixup",
    "minmax",
    "missed",
    "applied",
];

#[test]
fn mixup_and_cutmix_equal_timms() {
    let f = fixture();
    let (images, labels) = (&f["mix/images"], &f["mix/labels"]);
    let (h, w) = (images.size()[2], images.size()[3]);
    let mut seen = Vec::new();
    for case in MIX_CASES {
        let p = format!("mix/{case}");
        let c = floats(&f[&format!("{p}/config")]);
        let cfg = Mixup {
            mixup_alpha: c[0],
            cutmix_alpha: c[1],
            cutmix_minmax: (c[2] >= 0.0).then_some([c[2], c[3]]),
            prob: c[4],
            switch_prob: c[5],
            correct_lam: c[6] != 0.0,
            ..Mixup::default()
        };
        cfg.check(h, w).unwrap();
        let mut src = Scripted::new(&f, &p);
        let draw = cfg.draw(&mut src, h, w);
        src.done();
        let (mixed, target) = mix_batch(images, labels, 5, &draw);
        assert_same(
            &mixed,
            &f[&format!("{p}/images")],
            &format!("{case}: images"),
        );
        assert_same(
            &target,
            &f[&format!("{p}/target")],
            &format!("{case}: target"),
        );
        // The fixture's λ is read off timm's target in float32.
        let lam = floats(&f[&format!("{p}/lam")])[0];
        assert_eq!(draw.lam() as f32 as f64, lam, "{case}: λ");
        seen.push(match draw {
            MixDraw::Unmixed => "unmixed",
            MixDraw::Mixup { .. } => "mixup",
            MixDraw::Cutmix { .. } => "cutmix",
        });
    }
    for kind in ["unmixed", "mixup", "cutmix"] {
        assert!(seen.contains(&kind), "no case {kind}: {seen:?}");
    }
}

#[test]
fn random_erasing_equals_timms() {
    let f = fixture();
    let images = &f["erase/images"];
    let s = images.size();
    let (c, h, w) = (s[1], s[2], s[3]);
    let mut erased_some = false;
    for case in ["pixel", "rand", "const", "count", "large"] {
        let p = format!("erase/{case}");
        let v = floats(&f[&format!("{p}/config")]);
        let cfg = RandomErasing {
            prob: v[0],
            min_area: v[1],
            max_area: v[2],
            min_aspect: v[3],
            max_aspect: Some(v[4]),
            mode: [EraseMode::Const, EraseMode::Rand, EraseMode::Pixel][v[5] as usize],
            min_count: v[6] as u32,
            max_count: Some(v[7] as u32),
        };
        cfg.check().unwrap();
        let mut src = Scripted::new(&f, &p);
        let out = images.copy();
        // timm erases a batch one sample after the other.
        for i in 0..s[0] {
            let boxes = cfg.draw(&mut src, c, h, w);
            erased_some |= !boxes.is_empty();
            erase(&out.get(i), &boxes);
        }
        src.done();
        assert_same(&out, &f[&format!("{p}/images")], case);
        assert!(!out.equal(images), "{case}: something is erased");
    }
    assert!(erased_some);
}

fn data(n: i64, classes: i64) -> Dataset {
    let images = Tensor::arange(n * 3 * 32 * 32, (Kind::Int64, Device::Cpu))
        .remainder(251)
        .to_kind(Kind::Uint8)
        .view([n, 3, 32, 32]);
    Dataset {
        images,
        labels: Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(classes),
        num_classes: classes,
        mean: [0.5; 3],
        std: [0.25; 3],
        files: None,
    }
}

fn loader(d: &Dataset, seed: u64) -> Loader {
    let cfg = LoaderConfig {
        batch_size: 8,
        shuffle: true,
        augment: true,
        padding: CropPadding::Zero,
        drop_last: false,
        contrast: None,
    };
    Loader::new(d, cfg, seed, Device::Cpu).unwrap()
}

#[test]
fn the_loader_mixes_batches_and_erases_samples_by_key() {
    let d = data(40, 4);
    let plain = loader(&d, 7);
    let both = || {
        loader(&d, 7)
            .random_erasing(RandomErasing {
                prob: 1.0,
                ..Default::default()
            })
            .unwrap()
            .mixup(Mixup {
                cutmix_alpha: 1.0,
                ..Default::default()
            })
            .unwrap()
    };
    let (a, b) = (both(), both());
    let order = plain.order(2);
    let p = plain.batch(&order, 2, 1).unwrap();
    assert!(p.soft_target.is_none(), "no Mixup, no soft target");
    tch::manual_seed(1);
    let x = a.batch(&order, 2, 1).unwrap();
    tch::manual_seed(2);
    let _ = Tensor::rand([10], (Kind::Float, Device::Cpu));
    let y = b.batch(&order, 2, 1).unwrap();
    // Keyed: torch's generator plays no part; the labels are the rows' own.
    assert!(x.images.equal(&y.images));
    assert!(x.labels.equal(&p.labels) && x.index.equal(&p.index));
    let (t, u) = (x.soft_target.unwrap(), y.soft_target.unwrap());
    assert!(t.equal(&u));
    assert_eq!(t.size(), [8, 4]);
    let sums = t.sum_dim_intlist(1, false, Kind::Float);
    assert!(sums.allclose(
        &Tensor::ones([8], (Kind::Float, Device::Cpu)),
        0.0,
        1e-6,
        false
    ));
    assert!(!x.images.equal(&p.images), "the batch is erased and mixed");
    // Another batch or epoch draws anew.
    let other = a.batch(&order, 2, 2).unwrap();
    assert_ne!(other.soft_target.unwrap().size(), [0]);
    let e3 = a.batch(&a.order(3), 3, 1).unwrap();
    assert!(!e3.images.equal(&x.images));

    // Erasing alone: per sample, so a sample's boxes do not depend on the
    // batch it falls in. Same sample in two batchings: same erased pixels.
    let erasing = |bs: usize| {
        let cfg = LoaderConfig {
            batch_size: bs,
            shuffle: false,
            augment: false,
            padding: CropPadding::Zero,
            drop_last: false,
            contrast: None,
        };
        Loader::new(&d, cfg, 7, Device::Cpu)
            .unwrap()
            .random_erasing(RandomErasing {
                prob: 1.0,
                mode: EraseMode::Const,
                ..Default::default()
            })
            .unwrap()
    };
    let (small, large) = (erasing(4), erasing(8));
    let order: Vec<i64> = (0..40).collect();
    let s = small.batch(&order, 0, 1).unwrap().images; // samples 4..8
    let l = large.batch(&order, 0, 0).unwrap().images; // samples 0..8
    assert!(s.equal(&l.narrow(0, 4, 4)));
    let zeros = l.eq(0.0).sum(Kind::Int64).int64_value(&[]);
    assert!(zeros > 0, "const erasing writes zeros");
}

#[test]
fn mistakes_are_refused_naming_what_is_valid() {
    let d = data(8, 2);
    let err = |m: Mixup| loader(&d, 0).mixup(m).err().unwrap().to_string();
    assert!(
        err(Mixup {
            mixup_alpha: 0.0,
            ..Default::default()
        })
        .contains("set mixup_alpha > 0, cutmix_alpha > 0 or cutmix_minmax")
    );
    assert!(
        err(Mixup {
            prob: 1.5,
            ..Default::default()
        })
        .contains("prob must be in [0, 1], got 1.5")
    );
    let e = err(Mixup {
        cutmix_minmax: Some([0.5, 0.51]),
        ..Default::default()
    });
    assert!(e.contains("leaves no box size"), "{e}");
    let e = loader(&d, 0)
        .random_erasing(RandomErasing {
            min_area: 0.5,
            max_area: 0.1,
            ..Default::default()
        })
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("0 < min_area <= max_area <= 1"), "{e}");
    let e = "dots".parse::<EraseMode>().unwrap_err();
    assert!(e.contains("valid: pixel, rand, const"), "{e}");
    let e = serde_json::from_str::<Mixup>(r#"{"mode": "elem"}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected `batch`"), "{e}");
}
