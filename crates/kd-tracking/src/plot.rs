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
    fn bounds_never_collapse() {
        assert_eq!(bounds([3.0, 3.0].into_iter(), 0.05), (2.5, 3.5));
        assert_eq!(bounds(std::iter::empty(), 0.05), (0.0, 1.0));
        let (lo, hi) = bounds([0.0, 10.0].into_iter(), 0.1);
        assert_eq!((lo, hi), (-1.0, 11.0));
    }
}
