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

/// ` (top-5 x%)`, or nothing where there is no top-5 to speak of (NaN:
/// fewer than 6 classes, see `kd_engine::accuracy`).
fn top5_note(top5: f64) -> String {
    if top5.is_finite() {
        format!(" (top-5 {top5:.2}%)")
    } else {
        String::new()
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
            "[{}] {stage}: teacher test {top1:.2}%{}",
            self.run,
            top5_note(top5)
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
        let ema = r
            .ema_top1
            .map(|v| format!(" ema {v:.2}%"))
            .unwrap_or_default();
        self.line(format!(
            "[{}] {stage} epoch {:>3}  loss {:.4}  train {:.2}%{val}  test {:.2}%{}  best {:.2}%{peer}{ema}  {:.0} img/s, eval {:.1} s",
            self.run,
            r.epoch + 1,
            r.train_loss,
            r.train_top1,
            r.test_top1,
            top5_note(r.test_top5),
            r.best_top1,
            r.images_per_sec,
            r.eval_secs
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

/// An epoch record for the tests of what is shown and logged: method `a`
/// at weight 0.1, with a term named after it (`a/a`) and one not (`b/x`).
#[cfg(test)]
pub(crate) fn epoch_record(test_top5: f64) -> EpochRecord {
    EpochRecord {
        epoch: 1,
        lr: 0.1,
        train_loss: 1.0,
        train_top1: 50.0,
        test_top1: 40.0,
        test_top5,
        val_top1: None,
        val_top5: None,
        weights: [("a".to_string(), 0.1)].into(),
        terms: [("a/a".to_string(), 2.5), ("b/x".to_string(), 0.5)].into(),
        images_per_sec: 100.0,
        eval_secs: 0.5,
        best_top1: 40.0,
        peer_top1: None,
        ema_top1: None,
        ema_top5: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The console's lines as `console.log` keeps them.
    fn lines(show: impl FnOnce(&mut Console)) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut c = Console {
            run: "r".into(),
            next: None,
            log: Some(std::fs::File::create(&path).unwrap()),
        };
        show(&mut c);
        drop(c);
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn top5_is_printed_only_where_there_is_one() {
        let ten = lines(|c| {
            c.teacher_eval("s", 40.0, 91.5);
            c.epoch("s", 0, &epoch_record(87.25));
        });
        assert!(ten.contains("teacher test 40.00% (top-5 91.50%)"), "{ten}");
        assert!(ten.contains("test 40.00% (top-5 87.25%)"), "{ten}");
        let five = lines(|c| {
            c.teacher_eval("s", 40.0, f64::NAN);
            c.epoch("s", 0, &epoch_record(f64::NAN));
        });
        assert!(!five.contains("top-5"), "{five}");
        assert!(five.contains("test 40.00%  best 40.00%"), "{five}");
    }
}
