//! A distillation stage reports the test accuracy of the frozen teacher it
//! starts from: in a plan that trains the teacher first, that is exactly the
//! teacher stage's last test accuracy. A stage training the teacher itself
//! reports nothing.

use kd_core::Registry;
use kd_data::{DataSource, SyntheticConfig};
use kd_engine::{
    DataPlan, DeviceChoice, MethodPlan, ModelPlan, NoScripts, Observer, Part, Plan, RunOptions,
    StagePlan, Subject,
};

#[derive(Default)]
struct Reports(Vec<(String, f64)>);
impl Observer for Reports {
    fn teacher_eval(&mut self, stage: &str, top1: f64, _top5: f64) {
        self.0.push((stage.to_string(), top1));
    }
}

fn stage(name: &str, subject: Subject, methods: Vec<MethodPlan>) -> StagePlan {
    StagePlan {
        name: name.into(),
        epochs: 2,
        subject,
        train: vec![Part::Network, Part::Methods],
        methods,
        optimizer: Default::default(),
        lr_schedule: Default::default(),
        keep_optimizer: false,
        clip_grad: None,
        ema: None,
    }
}

#[test]
fn distillation_stage_reports_the_teacher_it_received() {
    kd_methods::link();
    let registry = Registry::global().unwrap();
    let plan = Plan {
        precision: Default::default(),
        channels_last: true,
        batchnorm: Default::default(),
        cuda_graph: false,
        paper: None,
        name: "teacher_eval".into(),
        seed: 3,
        device: DeviceChoice::Cpu,
        data: DataPlan {
            source: DataSource::Synthetic(SyntheticConfig {
                train_size: 512,
                test_size: 200,
                ..Default::default()
            }),
            batch_size: 32,
            ..Default::default()
        },
        student: ModelPlan {
            arch: "resnet8".into(),
            weights: None,
            source_sha256: None,
            reset_classifier: false,
        },
        teacher: Some(ModelPlan {
            arch: "resnet8".into(),
            weights: None,
            source_sha256: None,
            reset_classifier: false,
        }),
        teacher_cache: None,
        stages: vec![
            StagePlan {
                epochs: 3,
                ..stage(
                    "teacher",
                    Subject::Teacher,
                    vec![MethodPlan::new("ce", 1.0)],
                )
            },
            stage(
                "distill",
                Subject::Student,
                vec![MethodPlan::new("ce", 1.0), MethodPlan::new("st", 1.0)],
            ),
        ],
    };
    let dir = tempfile::tempdir().unwrap();
    let mut reports = Reports::default();
    let mut opts = RunOptions {
        run_dir: dir.path().into(),
        resume: false,
        observer: &mut reports,
        scripts: &NoScripts,
        stop: None,
        log_every: 0,
        progress_bar: false,
    };
    let result = kd_engine::run(&plan, &registry, &mut opts).unwrap();
    let teacher_last = result.stages[0].last_top1;
    assert_eq!(
        reports.0.len(),
        1,
        "only the distillation stage reports: {:?}",
        reports.0
    );
    assert_eq!(reports.0[0].0, "distill");
    assert_eq!(reports.0[0].1, teacher_last);
    // The student starts untrained; were it evaluated in the teacher's place,
    // the report would sit at chance, far from the trained teacher.
    assert!(teacher_last > 20.0, "teacher trained to {teacher_last}%");
}
