//! MLKD's strong augmentation against Pillow (`tests/golden/randaugment.py`):
//! each of the 14 RandAugment ops, Cutout and whole RandAugment(2, 10)
//! calls, replayed from the draws the fixture records, give Pillow's bytes.

use std::collections::HashMap;
use std::path::Path;

use kd_data::{CutoutDraw, OpDraw, RandAugmentDraw, RandAugmentOp};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

fn fixture() -> HashMap<String, Tensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/golden/data/randaugment.safetensors");
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (tests/golden/randaugment.py writes it)",
                path.display()
            )
        })
        .into_iter()
        .collect()
}

fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    Vec::try_from(t.to_kind(Kind::Double)).unwrap()
}

fn cutouts(t: &Tensor) -> Vec<CutoutDraw> {
    rows(t)
        .iter()
        .map(|r| CutoutDraw {
            size: r[0],
            x: r[1],
            y: r[2],
        })
        .collect()
}

/// Largest absolute difference, in uint8 levels.
fn max_diff(got: &Tensor, want: &Tensor) -> i64 {
    assert_eq!(got.size(), want.size());
    (got.to_kind(Kind::Int64) - want.to_kind(Kind::Int64))
        .abs()
        .max()
        .int64_value(&[])
}

/// Runs `f` on the images as uint8 and as float, checks each keeps its
/// kind, and returns the larger difference from `want`.
fn both_kinds(images: &Tensor, want: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> i64 {
    let mut worst = 0;
    for kind in [Kind::Uint8, Kind::Float] {
        let got = f(&images.to_kind(kind));
        assert_eq!(got.kind(), kind);
        worst = worst.max(max_diff(&got, want));
    }
    worst
}

#[test]
fn randaugment_each_op_equals_pillow() {
    let f = fixture();
    let mags = rows(&f["op/magnitude"]);
    let mut wrong = Vec::new();
    for (k, op) in RandAugmentOp::ALL.into_iter().enumerate() {
        let draws: Vec<OpDraw> = mags
            .iter()
            .map(|m| OpDraw {
                op,
                magnitude: m[k],
            })
            .collect();
        let want = f["op/out"].select(1, k as i64);
        let diff = both_kinds(&f["images"], &want, |x| kd_data::randaugment_ops(x, &draws));
        // Every op repeats Pillow's arithmetic, float32 blends and
        // fixed-point sampling included, so nothing short of equality passes.
        if diff != 0 {
            wrong.push(format!("{op:?}: up to {diff}"));
        }
    }
    assert!(wrong.is_empty(), "ops differing from Pillow: {wrong:?}");
}

#[test]
fn randaugment_cutout_equals_pillow() {
    let f = fixture();
    let cuts = cutouts(&f["cutout/params"]);
    let diff = both_kinds(&f["images"], &f["cutout/out"], |x| {
        kd_data::cutout(x, &cuts)
    });
    assert_eq!(diff, 0, "cutout differs from Pillow by up to {diff}");
}

#[test]
fn randaugment_whole_calls_equal_pillow() {
    let f = fixture();
    let ids: Vec<Vec<i64>> = Vec::try_from(&f["chain/ops"]).unwrap();
    let mags = rows(&f["chain/magnitude"]);
    let cuts = cutouts(&f["chain/cutout"]);
    let draws: Vec<RandAugmentDraw> = (0..ids.len())
        .map(|n| RandAugmentDraw {
            ops: std::array::from_fn(|j| OpDraw {
                op: RandAugmentOp::ALL[ids[n][j] as usize],
                magnitude: mags[n][j],
            }),
            cutout: cuts[n],
        })
        .collect();
    let diff = both_kinds(&f["images"], &f["chain/out"], |x| {
        kd_data::randaugment(x, &draws)
    });
    assert_eq!(diff, 0, "RandAugment differs from Pillow by up to {diff}");
}

#[test]
fn randaugment_draws_are_seeded_in_range_and_cover_every_op() {
    let sample = |seed| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..2000)
            .map(|_| RandAugmentDraw::sample(&mut rng, 32, 32))
            .collect::<Vec<_>>()
    };
    let draws = sample(11);
    assert_eq!(draws, sample(11));
    assert_ne!(draws, sample(12));
    for slot in 0..2 {
        for op in RandAugmentOp::ALL {
            assert!(
                draws.iter().any(|d| d.ops[slot].op == op),
                "{op:?} never drawn in slot {slot}"
            );
        }
    }
    for d in &draws {
        for o in d.ops {
            let (lo, hi) = o.op.range();
            assert!((lo..hi).contains(&o.magnitude), "{o:?}");
        }
        let c = d.cutout;
        assert!((0.0..0.5).contains(&c.size), "{c:?}");
        // numpy's uniform(w) = uniform(low=w, high=1.0): centres in (1, w].
        assert!(
            c.x > 1.0 && c.x <= 32.0 && c.y > 1.0 && c.y <= 32.0,
            "{c:?}"
        );
    }
}
