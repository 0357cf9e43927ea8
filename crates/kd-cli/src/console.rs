//! Prints epoch lines; forwards everything to an optional second observer
//! (tracking).

use std::path::Path;

use kd_engine::{EpochRecord, Observer, StageResult};

pub struct Console<'a> {
    pub run: String,
    pub next: Option<&'a mut dyn Observer>,
    /// `console.log` of the run folder, kept as an artifact.
    pub log: Option<std::fs::File>,
}

impl Console<'_> {
    fn line(&mut self, text: String) {
        eprintln!("{text}");
        if let Some(f) = &mut self.log {
            use std::io::Write;
            let _ = writeln!(f, "{text}");
        }
    }
}

impl Observer for Console<'_> {
    fn metrics(&mut self, step: i64, values: &[(String, f64)]) {
        if let Some(n) = self.next.as_deref_mut() {
            n.metrics(step, values);
        }
    }

    fn stage_start(&mut self, index: usize, name: &str) {
        self.line(format!("[{}] stage {} `{name}`", self.run, index + 1));
        if let Some(n) = self.next.as_deref_mut() {
            n.stage_start(index, name);
        }
    }

    fn teacher_eval(&mut self, stage: &str, top1: f64, top5: f64) {
        self.line(format!(
            "[{}] {stage}: teacher test {top1:.2}% (top-5 {top5:.2}%)",
            self.run
        ));
        if let Some(n) = self.next.as_deref_mut() {
            n.teacher_eval(stage, top1, top5);
        }
    }

    fn epoch(&mut self, stage: &str, global: i64, r: &EpochRecord) {
        let val = r
            .val_top1
            .map(|v| format!(" val {v:.2}%"))
            .unwrap_or_default();
        let peer = r
            .peer_top1
            .map(|v| format!(" peer {v:.2}%"))
            .unwrap_or_default();
        self.line(format!(
            "[{}] {stage} epoch {:>3}  loss {:.4}  train {:.2}%{val}  test {:.2}% (top-5 {:.2}%)  best {:.2}%{peer}  {:.0} img/s",
            self.run,
            r.epoch + 1,
            r.train_loss,
            r.train_top1,
            r.test_top1,
            r.test_top5,
            r.best_top1,
            r.images_per_sec
        ));
        if let Some(n) = self.next.as_deref_mut() {
            n.epoch(stage, global, r);
        }
    }

    fn stage_end(&mut self, result: &StageResult) {
        if let Some(n) = self.next.as_deref_mut() {
            n.stage_end(result);
        }
    }

    fn artifact(&mut self, path: &Path) {
        if let Some(n) = self.next.as_deref_mut() {
            n.artifact(path);
        }
    }
}
