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

/// Width of one panel of the curves; the height of all.
const PANEL: (u32, u32) = (600, 450);

/// Series logged with the epoch as their step carry this prefix (`kd`'s
/// `epoch/*`); every other series is logged against the global step.
const EPOCH_PREFIX: &str = "epoch/";

type Series<'a> = (&'a str, &'a [(i64, f64)]);

/// One panel of the curves: what it plots, against which axis.
struct Panel<'a> {
    title: &'static str,
    x: &'static str,
    series: Vec<Series<'a>>,
    /// Losses fall and accuracies rise: the legend goes where the
    /// curves are not, upper right for losses, lower right for accuracies.
    legend_up: bool,
}

/// The panels of `history`: losses (every key containing `loss`) and
/// accuracies (`acc`), each against the step for step series and against
/// the epoch for `epoch/` series, so neither is drawn on the other's
/// scale. Panels without data are left out, unless none has data.
fn panels(history: &History) -> Vec<Panel<'_>> {
    let pick = |word: &str, epochs: bool| -> Vec<Series<'_>> {
        history
            .iter()
            .filter(|(k, _)| k.to_ascii_lowercase().contains(word))
            .filter(|(k, _)| k.starts_with(EPOCH_PREFIX) == epochs)
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect()
    };
    let all = [
        ("loss per step", "step", pick("loss", false), true),
        ("loss per epoch", "epoch", pick("loss", true), true),
        ("accuracy per epoch", "epoch", pick("acc", true), false),
        ("accuracy per step", "step", pick("acc", false), false),
    ];
    let empty = all.iter().all(|p| p.2.is_empty());
    all.into_iter()
        .enumerate()
        .filter(|(i, p)| !p.2.is_empty() || (empty && (*i == 0 || *i == 2)))
        .map(|(_, (title, x, series, legend_up))| Panel {
            title,
            x,
            series,
            legend_up,
        })
        .collect()
}

/// Renders the curves to `png`, a panel beside the other (see [`panels`]).
/// Non-finite points are left out; a panel without data says so.
pub fn plot_curves(history: &History, png: &Path) -> Result<()> {
    register_font()?;
    let panels = panels(history);
    let size = (PANEL.0 * panels.len() as u32, PANEL.1);
    let root = BitMapBackend::new(png, size).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    for (area, p) in root.split_evenly((1, panels.len())).iter().zip(&panels) {
        panel(area, p)?;
    }
    root.present().map_err(plot_err)
}

fn panel(area: &DrawingArea<BitMapBackend, plotters::coord::Shift>, p: &Panel) -> Result<()> {
    let finite = |pt: &&(i64, f64)| pt.1.is_finite();
    let points = || p.series.iter().flat_map(|s| s.1.iter().filter(finite));
    // Steps and epochs are whole numbers: an integer axis has whole ticks
    // only (a float axis over two epochs labels 0, 0.2, ... as `0 0 0 0 1 1`).
    let x0 = points().map(|pt| pt.0).min().unwrap_or(0);
    let x1 = points().map(|pt| pt.0).max().unwrap_or(1).max(x0 + 1);
    let (y0, y1) = bounds(points().map(|pt| pt.1), 0.05);
    let caption = if p.series.is_empty() {
        format!("{} (no data)", p.title)
    } else {
        p.title.to_string()
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
        .x_desc(p.x)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()
        .map_err(plot_err)?;
    for (i, (name, pts)) in p.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let line = pts.iter().filter(finite).copied();
        chart
            .draw_series(LineSeries::new(line, color.stroke_width(2)))
            .map_err(plot_err)?
            .label(*name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    if !p.series.is_empty() {
        chart
            .configure_series_labels()
            .position(if p.legend_up {
                SeriesLabelPosition::UpperRight
            } else {
                SeriesLabelPosition::LowerRight
            })
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FONT, 14))
            .draw()
            .map_err(plot_err)?;
    }
    Ok(())
}

/// One configuration of a report: the mean best and last top-1 with their
/// standard deviations over seeds (NaN for a single run), and the number
/// its source publishes, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    pub label: String,
    pub best: (f64, f64),
    pub last: (f64, f64),
    pub paper: Option<f64>,
}

const BEST: RGBColor = RGBColor(45, 85, 160);
const LAST: RGBColor = RGBColor(150, 185, 230);

/// Two horizontal bars per configuration, best top-1 (dark) above last
/// (light), each with a ±std error bar, and the published number as a red
/// tick, rendered to `png`. The value axis starts at 0, so bar lengths
/// compare as the numbers do. Labels are ASCII (the bundled font is);
/// other characters show as boxes.
pub fn plot_bars(bars: &[Bar], title: &str, png: &Path) -> Result<()> {
    register_font()?;
    let root = BitMapBackend::new(png, bars_size(bars)).into_drawing_area();
    draw_bars(&root, bars, title)?;
    root.present().map_err(plot_err)
}

fn bars_size(bars: &[Bar]) -> (u32, u32) {
    (1000, 90 + 44 * bars.len().max(1) as u32)
}

fn draw_bars<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    bars: &[Bar],
    title: &str,
) -> Result<()> {
    root.fill(&WHITE).map_err(plot_err)?;
    let top = bars
        .iter()
        .flat_map(|b| {
            let end = |(m, s): (f64, f64)| m + if s.is_finite() { s } else { 0.0 };
            [end(b.best), end(b.last)].into_iter().chain(b.paper)
        })
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let hi = if top > 0.0 { top * 1.05 } else { 1.0 };
    let n = bars.len().max(1) as f64;
    let longest = bars.iter().map(|b| b.label.len()).max().unwrap_or(0);
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT, 20))
        .margin(14)
        .x_label_area_size(36)
        .y_label_area_size((longest as u32 * 8 + 12).clamp(60, 420))
        .build_cartesian_2d(0.0..hi, 0.0..n)
        .map_err(plot_err)?;
    let labels: Vec<String> = bars.iter().map(|b| b.label.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc("test top-1 (%): best (dark), last (light)")
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
    for (i, b) in bars.iter().enumerate() {
        let y = n - i as f64 - 0.5;
        for ((mean, std), color, at) in [(b.best, BEST, y + 0.16), (b.last, LAST, y - 0.16)] {
            if mean.is_finite() {
                let bar = Rectangle::new([(0.0, at - 0.15), (mean, at + 0.15)], color.filled());
                chart.draw_series([bar]).map_err(plot_err)?;
            }
            if std.is_finite() && std > 0.0 {
                let (a, z) = (mean - std, mean + std);
                let whisker = [
                    PathElement::new([(a, at), (z, at)], BLACK.stroke_width(2)),
                    PathElement::new([(a, at - 0.08), (a, at + 0.08)], BLACK.stroke_width(2)),
                    PathElement::new([(z, at - 0.08), (z, at + 0.08)], BLACK.stroke_width(2)),
                ];
                chart.draw_series(whisker).map_err(plot_err)?;
            }
        }
        if let Some(p) = b.paper.filter(|p| p.is_finite()) {
            let tick = PathElement::new([(p, y - 0.42), (p, y + 0.42)], RED.stroke_width(3));
            chart.draw_series([tick]).map_err(plot_err)?;
        }
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
        assert_eq!((w, h), (1200, 450), "a loss and an accuracy panel");
    }

    #[test]
    fn epoch_series_are_drawn_against_epochs_and_step_series_against_steps() {
        let mut h = History::new();
        let epochs: Vec<(i64, f64)> = (0..12).map(|e| (e, e as f64)).collect();
        let steps: Vec<(i64, f64)> = (0..300).map(|s| (s, s as f64)).collect();
        for k in ["epoch/train_loss", "epoch/loss/ce", "epoch/test_acc_top1"] {
            h.insert(k.into(), epochs.clone());
        }
        for k in ["train/loss", "loss/ce", "train/lr"] {
            h.insert(k.into(), steps.clone());
        }
        let got: Vec<(&str, &str, Vec<&str>)> = panels(&h)
            .iter()
            .map(|p| (p.title, p.x, p.series.iter().map(|s| s.0).collect()))
            .collect();
        assert_eq!(
            got,
            [
                ("loss per step", "step", vec!["loss/ce", "train/loss"]),
                (
                    "loss per epoch",
                    "epoch",
                    vec!["epoch/loss/ce", "epoch/train_loss"]
                ),
                ("accuracy per epoch", "epoch", vec!["epoch/test_acc_top1"]),
            ]
        );
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
                best: (70.1, 0.4),
                last: (69.8, 0.5),
                paper: Some(70.06),
            },
            Bar {
                label: "baseline".into(),
                best: (68.5, f64::NAN),
                last: (68.0, f64::NAN),
                paper: None,
            },
        ];
        plot_bars(&bars, "top-1", &png).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        assert_eq!(h, 90 + 44 * 2, "the height grows with the rows");
    }

    /// Bar lengths in pixels of one colour, one per band of rows it fills,
    /// top to bottom.
    fn bar_lengths(rgb: &[u8], width: usize, color: RGBColor) -> Vec<usize> {
        let rows = rgb.chunks(width * 3).map(|row| {
            row.chunks(3)
                .filter(|p| *p == [color.0, color.1, color.2])
                .count()
        });
        let mut bands: Vec<usize> = Vec::new();
        let mut inside = false;
        for n in rows {
            match (n > 0, inside) {
                (true, false) => bands.push(n),
                (true, true) => *bands.last_mut().unwrap() = n.max(*bands.last().unwrap()),
                _ => {}
            }
            inside = n > 0;
        }
        bands
    }

    #[test]
    fn bars_show_best_and_last_on_an_axis_from_zero() {
        register_font().unwrap();
        let bars = [
            Bar {
                label: "a".into(),
                best: (90.0, 1.0),
                last: (80.0, 1.0),
                paper: None,
            },
            Bar {
                label: "b".into(),
                best: (45.0, f64::NAN),
                last: (40.0, f64::NAN),
                paper: None,
            },
        ];
        let (w, h) = bars_size(&bars);
        let mut rgb = vec![0u8; (w * h * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
            draw_bars(&root, &bars, "top-1").unwrap();
            root.present().unwrap();
        }
        // From zero, lengths are proportional to the values: 90 is twice
        // 45 and 80 twice 40 (a range fitted around the values would make
        // 45 a sliver).
        for (color, what) in [(BEST, "best"), (LAST, "last")] {
            let len = bar_lengths(&rgb, w as usize, color);
            assert_eq!(len.len(), 2, "one {what} bar per row: {len:?}");
            let ratio = len[0] as f64 / len[1] as f64;
            assert!((ratio - 2.0).abs() < 0.03, "{what} bars {len:?}");
        }
    }

    #[test]
    fn bounds_never_collapse() {
        assert_eq!(bounds([3.0, 3.0].into_iter(), 0.05), (2.5, 3.5));
        assert_eq!(bounds(std::iter::empty(), 0.05), (0.0, 1.0));
        let (lo, hi) = bounds([0.0, 10.0].into_iter(), 0.1);
        assert_eq!((lo, hi), (-1.0, 11.0));
    }
}
