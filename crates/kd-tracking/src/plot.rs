//! Loss and accuracy curves as a PNG, for the run folder and as an artifact.
//!
//! Pure Rust (plotters' bitmap backend) with a font compiled in (an ASCII
//! subset of DejaVu Sans, see `assets/LICENSE-DejaVu.txt`), so it renders on
//! headless machines without fontconfig or freetype.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;

use crate::error::{Error, Result};

/// Metric points by key: `(step, value)` in logging order, as
/// [`crate::metric_history`] returns them.
pub type History = BTreeMap<String, Vec<(i64, f64)>>;

const FONT: &str = "sans-serif";
const FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSans-subset.ttf");
const SIZE: (u32, u32) = (1200, 450);

fn register_font() -> Result<()> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(Error::Plot("bundled font does not parse".into()))
    }
}

/// Renders two panels to `png`: every metric whose key contains `loss`
/// (left) and every one containing `acc` (right), against the step.
/// Non-finite points are left out; a panel without data says so.
pub fn plot_curves(history: &History, png: &Path) -> Result<()> {
    register_font()?;
    let pick = |word: &str| -> Vec<(&str, &[(i64, f64)])> {
        history
            .iter()
            .filter(|(k, _)| k.to_ascii_lowercase().contains(word))
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect()
    };
    let root = BitMapBackend::new(png, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let (left, right) = root.split_horizontally(SIZE.0 / 2);
    // Losses fall and accuracies rise: keep each legend out of the way.
    panel(
        &left,
        "loss",
        &pick("loss"),
        SeriesLabelPosition::UpperRight,
    )?;
    panel(
        &right,
        "accuracy",
        &pick("acc"),
        SeriesLabelPosition::LowerRight,
    )?;
    root.present().map_err(plot_err)
}

fn panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    title: &str,
    series: &[(&str, &[(i64, f64)])],
    legend: SeriesLabelPosition,
) -> Result<()> {
    let finite = |p: &&(i64, f64)| p.1.is_finite();
    let points = || series.iter().flat_map(|s| s.1.iter().filter(finite));
    let (x0, x1) = bounds(points().map(|p| p.0 as f64), 0.0);
    let (y0, y1) = bounds(points().map(|p| p.1), 0.05);
    let caption = if series.is_empty() {
        format!("{title} (no data)")
    } else {
        title.to_string()
    };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 22))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()
        .map_err(plot_err)?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let line = pts.iter().filter(finite).map(|&(s, v)| (s as f64, v));
        chart
            .draw_series(LineSeries::new(line, color.stroke_width(2)))
            .map_err(plot_err)?
            .label(*name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    if !series.is_empty() {
        chart
            .configure_series_labels()
            .position(legend)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FONT, 14))
            .draw()
            .map_err(plot_err)?;
    }
    Ok(())
}

/// One configuration of a report: its mean top-1 with the standard
/// deviation over seeds, and the number its source publishes, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    pub label: String,
    pub mean: f64,
    pub std: f64,
    pub paper: Option<f64>,
}

/// A horizontal bar per configuration (mean, with a ±std error bar) and
/// the published number as a red tick, rendered to `png`. Labels are
/// ASCII (the bundled font is); other characters show as boxes.
pub fn plot_bars(bars: &[Bar], title: &str, png: &Path) -> Result<()> {
    register_font()?;
    let height = 90 + 34 * bars.len().max(1) as u32;
    let root = BitMapBackend::new(png, (1000, height)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let ends = bars.iter().flat_map(|b| {
        let spread = if b.std.is_finite() { b.std } else { 0.0 };
        [b.mean - spread, b.mean + spread]
            .into_iter()
            .chain(b.paper)
            .filter(|v| v.is_finite())
    });
    let (lo, hi) = bounds(ends, 0.15);
    let n = bars.len().max(1) as f64;
    let longest = bars.iter().map(|b| b.label.len()).max().unwrap_or(0);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 20))
        .margin(14)
        .x_label_area_size(36)
        .y_label_area_size((longest as u32 * 8 + 12).clamp(60, 420))
        .build_cartesian_2d(lo..hi, 0.0..n)
        .map_err(plot_err)?;
    let labels: Vec<String> = bars.iter().map(|b| b.label.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc("test top-1 (%)")
        .y_labels(bars.len().max(1) * 2 + 1)
        .y_label_formatter(&|y| {
            // Labels sit at bar centres only; the first row at the top.
            let k = (y - 0.5).round();
            if (y - 0.5 - k).abs() < 1e-6 && k >= 0.0 && (k as usize) < labels.len() {
                labels[labels.len() - 1 - k as usize].clone()
            } else {
                String::new()
            }
        })
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()
        .map_err(plot_err)?;
    let blue = RGBColor(70, 110, 180);
    for (i, b) in bars.iter().enumerate() {
        let y = n - i as f64 - 0.5;
        if b.mean.is_finite() {
            let bar = Rectangle::new([(lo, y - 0.3), (b.mean, y + 0.3)], blue.mix(0.75).filled());
            chart.draw_series([bar]).map_err(plot_err)?;
        }
        if b.std.is_finite() && b.std > 0.0 {
            let (a, z) = (b.mean - b.std, b.mean + b.std);
            let whisker = [
                PathElement::new([(a, y), (z, y)], BLACK.stroke_width(2)),
                PathElement::new([(a, y - 0.15), (a, y + 0.15)], BLACK.stroke_width(2)),
                PathElement::new([(z, y - 0.15), (z, y + 0.15)], BLACK.stroke_width(2)),
            ];
            chart.draw_series(whisker).map_err(plot_err)?;
        }
        if let Some(p) = b.paper.filter(|p| p.is_finite()) {
            let tick = PathElement::new([(p, y - 0.42), (p, y + 0.42)], RED.stroke_width(3));
            chart.draw_series([tick]).map_err(plot_err)?;
        }
    }
    root.present().map_err(plot_err)
}

/// A non-empty range around the values, widened by `margin` of its span.
fn bounds(values: impl Iterator<Item = f64>, margin: f64) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let span = hi - lo;
    if span <= f64::EPSILON * lo.abs().max(1.0) {
        return (lo - 0.5, hi + 0.5);
    }
    (lo - span * margin, hi + span * margin)
}

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::Plot(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_png_with_both_panels() {
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("curves.png");
        let mut h = History::new();
        h.insert(
            "train/loss".into(),
            (0..50).map(|s| (s, 2.0 / (1.0 + s as f64))).collect(),
        );
        h.insert(
            "val/loss".into(),
            vec![(0, 2.5), (10, f64::NAN), (20, 1.0), (49, 0.6)],
        );
        h.insert("val/acc".into(), vec![(10, 0.3), (20, 0.6), (49, 0.8)]);
        h.insert("lr".into(), vec![(0, 0.1)]);
        plot_curves(&h, &png).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // Width and height sit in the IHDR chunk.
        let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        assert_eq!((w, h), SIZE);
    }

    #[test]
    fn empty_history_still_renders() {
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("empty.png");
        plot_curves(&History::new(), &png).unwrap();
        assert!(png.metadata().unwrap().len() > 0);
    }

    #[test]
    fn bars_render_one_row_each() {
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("report.png");
        let bars = [
            Bar {
                label: "st".into(),
                mean: 70.1,
                std: 0.4,
                paper: Some(70.06),
            },
            Bar {
                label: "baseline".into(),
                mean: 68.5,
                std: f64::NAN,
                paper: None,
            },
        ];
        plot_bars(&bars, "top-1", &png).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        assert_eq!(h, 90 + 34 * 2, "the height grows with the rows");
    }

    #[test]
    fn bounds_never_collapse() {
        assert_eq!(bounds([3.0, 3.0].into_iter(), 0.05), (2.5, 3.5));
        assert_eq!(bounds(std::iter::empty(), 0.05), (0.0, 1.0));
        let (lo, hi) = bounds([0.0, 10.0].into_iter(), 0.1);
        assert_eq!((lo, hi), (-1.0, 11.0));
    }
}
