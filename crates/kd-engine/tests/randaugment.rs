//! A plan's `data.randaugment` reaches the training loader: a run with it
//! trains, and differs from the same run without it; validation refuses it
//! without `augment` and with parameters out of range.

mod common;

use kd_core::Registry;
use kd_data::{DataSource, SyntheticConfig, TimmRandAugment};
use kd_engine::{
    DataPlan, DeviceChoice, MethodPlan, ModelPlan, NoScripts, Plan, Silent, StagePlan,
};

fn plan(ra: Option<TimmRandAugment>, augment: bool) -> Plan {
    Plan {
        name: "ra".into(),
        seed: 3,
        device: DeviceChoice::Cpu,
        data: DataPlan {
            source: DataSource::Synthetic(SyntheticConfig {
                train_size: 64,
                test_size: 32,
                ..Default::default()
            }),
            batch_size: 16,
            augment,
            randaugment: ra,
            ..Default::default()
        },
        student: ModelPlan::new("resnet8"),
        teacher: None,
        teacher_cache: None,
        stages: vec![StagePlan::new("train", 1, vec![MethodPlan::new("ce", 1.0)])],
        precision: Default::default(),
        channels_last: true,
        batchnorm: Default::default(),
        cuda_graph: false,
        paper: None,
    }
}

fn final_loss(p: &Plan) -> f64 {
    kd_methods::link();
    let dir = tempfile::tempdir().unwrap();
    let r = kd_engine::run(
        p,
        &Registry::global().unwrap(),
        &mut common::options(dir.path(), false, &mut Silent, None),
    )
    .unwrap();
    r.stages[0].epochs.last().unwrap().train_loss
}

#[test]
fn a_run_with_randaugment_trains_on_other_images() {
    let with = final_loss(&plan(Some(TimmRandAugment::default()), true));
    let again = final_loss(&plan(Some(TimmRandAugment::default()), true));
    let without = final_loss(&plan(None, true));
    assert!(with.is_finite());
    assert_eq!(with.to_bits(), again.to_bits(), "keyed draws: the same run");
    assert_ne!(with.to_bits(), without.to_bits());
}

#[test]
fn validation_refuses_randaugment_without_augment_or_out_of_range() {
    kd_methods::link();
    let registry = Registry::global().unwrap();
    let e = kd_engine::validate(
        &plan(Some(TimmRandAugment::default()), false),
        &registry,
        &NoScripts,
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("randaugment") && e.contains("augment: true"),
        "{e}"
    );
    let bad = TimmRandAugment {
        mstd: -1.0,
        ..Default::default()
    };
    let e = kd_engine::validate(&plan(Some(bad), true), &registry, &NoScripts, &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("mstd"), "{e}");
}
