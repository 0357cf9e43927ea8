//! timm's RandAugment against timm's own functions
//! (`tests/golden/timm_randaugment.py`): each op's level → argument
//! function, each op on Pillow images (bilinear and bicubic resampling over
//! the fill colour included), and whole `rand-m9-mstd0.5-inc1` calls
//! replayed from what they drew, give timm's values and bytes exactly.

use std::collections::HashMap;
use std::path::Path;

use kd_data::{TimmDraw, TimmOp, TimmOpDraw, timm_randaugment};
use tch::{Kind, Tensor};

fn fixture() -> HashMap<String, Tensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/golden/data/timm_randaugment.safetensors");
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (tests/golden/timm_randaugment.py writes it)",
                path.display()
            )
        })
        .into_iter()
        .collect()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    Vec::try_from(t.to_kind(Kind::Double).view([-1])).unwrap()
}

fn i64s(t: &Tensor) -> Vec<i64> {
    Vec::try_from(t.to_kind(Kind::Int64).view([-1])).unwrap()
}

fn fill(fx: &HashMap<String, Tensor>) -> [f32; 3] {
    let f = i64s(&fx["fill"]);
    [f[0] as f32, f[1] as f32, f[2] as f32]
}

/// Pixels that differ from `want`, and the largest difference.
fn diff(got: &Tensor, want: &Tensor) -> (i64, i64) {
    assert_eq!(got.size(), want.size());
    let d = (got.to_kind(Kind::Int64) - want.to_kind(Kind::Int64)).abs();
    (
        d.gt(0).sum(Kind::Int64).int64_value(&[]),
        d.max().int64_value(&[]),
    )
}

#[test]
fn each_op_matches_timm() {
    let fx = fixture();
    let images = &fx["images"];
    let fill = fill(&fx);
    let mut checked = 0;
    for increasing in [true, false] {
        for op in TimmOp::ALL {
            let name = op.name(increasing);
            let Some(want) = fx.get(&format!("{name}/out")) else {
                assert!(!increasing, "{name} missing from the fixture");
                continue;
            };
            let levels = f64s(&fx[&format!("{name}/level")]);
            let negate = i64s(&fx[&format!("{name}/negate")]);
            let cubic = i64s(&fx[&format!("{name}/bicubic")]);
            let timm_args = f64s(&fx[&format!("{name}/arg")]);
            let mut draws = Vec::new();
            for n in 0..levels.len() {
                let arg = op.arg(levels[n], negate[n] == 1, increasing, 0.45);
                assert_eq!(
                    arg.to_bits(),
                    timm_args[n].to_bits(),
                    "{name} at level {}: kd's argument {arg} vs timm's {}",
                    levels[n],
                    timm_args[n]
                );
                draws.push(TimmDraw {
                    ops: vec![TimmOpDraw {
                        op,
                        arg,
                        bicubic: cubic[n] == 1,
                    }],
                });
            }
            for kind in [Kind::Uint8, Kind::Float] {
                let got = timm_randaugment(&images.to_kind(kind), &draws, fill);
                assert_eq!(got.kind(), kind);
                let (count, worst) = diff(&got, want);
                assert_eq!(
                    (count, worst),
                    (0, 0),
                    "{name} ({kind:?}): {count} values differ, by up to {worst}"
                );
            }
            checked += 1;
        }
    }
    // 15 increasing names, then all 15 plain ones (9 shared names again).
    assert_eq!(checked, 30);
}

#[test]
fn whole_transform_matches_timm() {
    let fx = fixture();
    let ops = i64s(&fx["chain/op"]);
    let args = f64s(&fx["chain/arg"]);
    let cubic = i64s(&fx["chain/bicubic"]);
    let draws: Vec<TimmDraw> = ops
        .chunks(2)
        .enumerate()
        .map(|(n, row)| TimmDraw {
            ops: row
                .iter()
                .enumerate()
                .filter(|&(_, &k)| k >= 0)
                .map(|(j, &k)| TimmOpDraw {
                    op: TimmOp::ALL[k as usize],
                    arg: args[2 * n + j],
                    bicubic: cubic[2 * n + j] == 1,
                })
                .collect(),
        })
        .collect();
    assert!(draws.iter().any(|d| d.ops.len() == 2));
    assert!(draws.iter().any(|d| d.ops.is_empty()));
    let got = timm_randaugment(&fx["images"], &draws, fill(&fx));
    assert_eq!(diff(&got, &fx["chain/out"]), (0, 0));
    // One image at a time, as an ImageFolder worker augments, in the HWC
    // layout it holds: the same bytes.
    for (i, draw) in draws.iter().enumerate() {
        let one = fx["images"].narrow(0, i as i64, 1).permute([0, 2, 3, 1]);
        let got = timm_randaugment(
            &one.permute([0, 3, 1, 2]),
            std::slice::from_ref(draw),
            fill(&fx),
        );
        let want = fx["chain/out"].narrow(0, i as i64, 1);
        assert_eq!(diff(&got, &want), (0, 0), "image {i} alone");
    }
}

/// Not a tautology: a wrong fill colour or filter changes the bytes.
#[test]
fn fill_and_filter_matter() {
    let fx = fixture();
    let want = &fx["Rotate/out"];
    let levels = f64s(&fx["Rotate/level"]);
    let negate = i64s(&fx["Rotate/negate"]);
    let cubic = i64s(&fx["Rotate/bicubic"]);
    let draws = |flip: bool| -> Vec<TimmDraw> {
        (0..levels.len())
            .map(|n| TimmDraw {
                ops: vec![TimmOpDraw {
                    op: TimmOp::Rotate,
                    arg: TimmOp::Rotate.arg(levels[n], negate[n] == 1, true, 0.45),
                    bicubic: (cubic[n] == 1) != flip,
                }],
            })
            .collect()
    };
    let images = &fx["images"];
    assert!(diff(&timm_randaugment(images, &draws(false), [0.0; 3]), want).0 > 0);
    assert!(diff(&timm_randaugment(images, &draws(true), fill(&fx)), want).0 > 0);
}

mod loader {
    use kd_data::{
        CropPadding, DataSource, Loader, LoaderConfig, SyntheticConfig, TimmRandAugment,
    };
    use tch::Device;

    fn loader(ra: Option<TimmRandAugment>, augment: bool) -> Loader {
        let source = DataSource::Synthetic(SyntheticConfig::default());
        let splits = kd_data::load(&source, 0.0, 0).unwrap();
        let cfg = LoaderConfig {
            batch_size: 32,
            shuffle: true,
            augment,
            padding: CropPadding::Zero,
            drop_last: false,
            contrast: None,
        };
        let l = Loader::new(&splits.train, cfg, 5, Device::Cpu).unwrap();
        match ra {
            Some(ra) => l.rand_augment(ra).unwrap(),
            None => l,
        }
    }

    /// Per image of batch 0 of `epoch`, whether it equals the plain one.
    fn same_as_plain(l: &Loader, plain: &Loader, epoch: usize) -> Vec<bool> {
        let order = l.order(epoch);
        let a = l.batch(&order, epoch, 0).unwrap().images;
        let b = plain.batch(&order, epoch, 0).unwrap().images;
        (0..a.size()[0])
            .map(|i| a.get(i).equal(&b.get(i)))
            .collect()
    }

    #[test]
    fn keyed_reproducible_and_after_the_same_crops() {
        let plain = loader(None, true);
        let ra = loader(Some(TimmRandAugment::default()), true);
        // Rebuilt from nothing, the same batch: draws are keyed.
        let order = ra.order(1);
        let again = loader(Some(TimmRandAugment::default()), true);
        assert!(
            ra.batch(&order, 1, 0)
                .unwrap()
                .images
                .equal(&again.batch(&order, 1, 0).unwrap().images)
        );
        // About a quarter of the images draw no op (both coins fail) and
        // are the plain loader's: the crops and flips are unchanged.
        let same = same_as_plain(&ra, &plain, 1);
        let n = same.iter().filter(|&&s| s).count();
        assert!(n > 0 && n < same.len() / 2, "{n} of {}", same.len());
        // Another epoch draws other ops.
        assert_ne!(same, same_as_plain(&ra, &plain, 2));
        // Probability 0: exactly the plain loader.
        let off = TimmRandAugment {
            prob: 0.0,
            ..TimmRandAugment::default()
        };
        assert!(
            same_as_plain(&loader(Some(off), true), &plain, 1)
                .iter()
                .all(|&s| s)
        );
        // Evaluation (no augment) is never augmented.
        let eval = loader(Some(TimmRandAugment::default()), false);
        assert!(
            same_as_plain(&eval, &loader(None, false), 1)
                .iter()
                .all(|&s| s)
        );
    }

    #[test]
    fn refuses_bad_parameters() {
        let bad = TimmRandAugment {
            prob: 1.5,
            ..TimmRandAugment::default()
        };
        let source = DataSource::Synthetic(SyntheticConfig::default());
        let splits = kd_data::load(&source, 0.0, 0).unwrap();
        let cfg = LoaderConfig {
            batch_size: 8,
            shuffle: false,
            augment: true,
            padding: CropPadding::Zero,
            drop_last: false,
            contrast: None,
        };
        let l = Loader::new(&splits.train, cfg, 0, Device::Cpu).unwrap();
        assert!(l.rand_augment(bad).is_err());
    }
}

mod folder {
    use std::path::Path;

    use kd_data::{DataSource, Loader, LoaderConfig, TimmRandAugment};
    use tch::Device;

    fn write(root: &Path) {
        for split in ["train", "val"] {
            for c in 0..2u32 {
                let dir = root.join(split).join(format!("class{c}"));
                std::fs::create_dir_all(&dir).unwrap();
                for i in 0..12u32 {
                    image::RgbImage::from_fn(30 + i, 26 + c, |x, y| {
                        image::Rgb([
                            (x * 7 + i * 31) as u8,
                            (y * 5 + c * 17) as u8,
                            (x ^ y) as u8,
                        ])
                    })
                    .save(dir.join(format!("img{i}.png")))
                    .unwrap();
                }
            }
        }
    }

    fn loader(root: &Path, ra: Option<TimmRandAugment>) -> Loader {
        let source = DataSource::ImageFolder {
            path: root.into(),
            image_size: 16,
            resize_size: 20,
            skip_corrupt: false,
        };
        let splits = kd_data::load(&source, 0.0, 0).unwrap();
        let cfg = LoaderConfig {
            batch_size: 24,
            shuffle: true,
            augment: true,
            padding: Default::default(),
            drop_last: false,
            contrast: None,
        };
        let l = Loader::new(&splits.train, cfg, 3, Device::Cpu).unwrap();
        match ra {
            Some(ra) => l.rand_augment(ra).unwrap(),
            None => l,
        }
    }

    #[test]
    fn image_files_are_augmented_after_their_crop() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path());
        let plain = loader(dir.path(), None);
        let ra = loader(dir.path(), Some(TimmRandAugment::default()));
        let again = loader(dir.path(), Some(TimmRandAugment::default()));
        let order = ra.order(0);
        let a = ra.batch(&order, 0, 0).unwrap().images;
        assert!(a.equal(&again.batch(&order, 0, 0).unwrap().images));
        let p = plain.batch(&order, 0, 0).unwrap().images;
        let same = (0..a.size()[0])
            .filter(|&i| a.get(i).equal(&p.get(i)))
            .count();
        assert!(same > 0 && same < 24 / 2, "{same} of 24 unchanged");
        let off = TimmRandAugment {
            prob: 0.0,
            ..TimmRandAugment::default()
        };
        let off = loader(dir.path(), Some(off))
            .batch(&order, 0, 0)
            .unwrap()
            .images;
        assert!(off.equal(&p));
    }
}
