//! The comparison chart, as SVG: loss against steps and against wall-clock time (log scale,
//! diverged runs cut off where they leave the plot and labelled "diverged"), the steps
//! 16-mixed's GradScaler skipped marked on its curve, and tokens/s and peak memory per
//! precision as bars.
use super::Report;
use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// A run has diverged from the first step whose loss is not finite or has climbed above
/// `DIVERGED_ABOVE` times the run's first loss: a training loss that ends up well above where
/// it started is not a slow run, it is a failed one (16-true's reaches 55 from about 4).
const DIVERGED_ABOVE: f64 = 1.5;

/// The step at which `losses` diverged, if they did.
pub fn diverged_at(losses: &[f64]) -> Option<usize> {
    let first = *losses.first()?;
    if !first.is_finite() {
        return Some(0);
    }
    losses
        .iter()
        .position(|l| !l.is_finite() || *l > DIVERGED_ABOVE * first)
}

/// One run's curve, cut where it diverged.
struct Curve<'a> {
    report: &'a Report,
    color: RGBColor,
    /// The steps before the divergence (all of them if the run did not diverge): the ones
    /// that set the axes and carry skip marks.
    shown: usize,
    diverged: Option<usize>,
    /// Seconds since the run's first step, at the end of each step; `None` when the report
    /// has no time for every step (a run resumed from a checkpoint that kept none).
    elapsed: Option<Vec<f64>>,
}

impl Curve<'_> {
    fn label(&self) -> String {
        match self.diverged {
            Some(step) => format!("{} (diverged at step {step})", self.report.precision),
            None => self.report.precision.clone(),
        }
    }
}

/// The y range, in loss, that every run which did not diverge fits in; diverged runs are
/// clipped to it.
fn loss_range(curves: &[Curve]) -> (f64, f64) {
    let mut lo = f64::MAX;
    let mut hi = f64::MIN;
    for c in curves {
        // A diverged run still sets the top by where it started.
        let shown = &c.report.losses[..c.shown];
        for &l in shown.iter().filter(|l| l.is_finite() && **l > 0.0) {
            lo = lo.min(l);
            hi = hi.max(l);
        }
    }
    if lo <= hi {
        (lo * 0.9, hi * 1.1)
    } else {
        (0.1, 10.0)
    }
}

/// Round values between `lo` and `hi` for a log axis (1, 1.5, 2, 3, 4, 5, 6, 8 times a power
/// of ten): plotters' own log ticks leave a range under one decade nearly unlabelled.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut ticks = Vec::new();
    let first = lo.log10().floor() as i32;
    let last = hi.log10().ceil() as i32;
    for e in first..=last {
        for m in [1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0] {
            let v = m * 10f64.powi(e);
            if (lo..=hi).contains(&v) {
                ticks.push(v);
            }
        }
    }
    ticks
}

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing the chart: {e}")
}

/// Loss on a log axis against `x` (step or seconds) for every curve.
fn loss_panel(
    area: &DrawingArea<SVGBackend, Shift>,
    curves: &[Curve],
    by_time: bool,
) -> Result<()> {
    let (lo, hi) = loss_range(curves);
    let x_max = if by_time {
        curves
            .iter()
            .filter_map(|c| c.elapsed.as_ref()?.get(c.shown.checked_sub(1)?).copied())
            .fold(1e-3, f64::max)
    } else {
        curves.iter().map(|c| c.shown).max().unwrap_or(1).max(2) as f64
    };
    let (caption, x_desc) = if by_time {
        ("loss against wall-clock time", "seconds of training")
    } else {
        ("loss against steps", "step")
    };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(
            0.0..x_max * 1.02,
            (lo..hi).log_scale().with_key_points(log_ticks(lo, hi)),
        )
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("training loss (log scale)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.2}"))
        .draw()
        .map_err(err)?;
    for c in curves {
        let x_of = |step: usize| -> Option<f64> {
            if by_time {
                c.elapsed.as_ref().map(|e| e[step])
            } else {
                Some(step as f64)
            }
        };
        if by_time && c.elapsed.is_none() {
            continue;
        }
        // A diverged run is drawn up to the step where it left, clipped to the plot's top.
        // (`diverged_at` only returns indices of `losses`.)
        let drawn = c.diverged.map_or(c.shown, |step| step + 1);
        let points: Vec<(f64, f64)> = (0..drawn)
            .filter(|&s| c.report.losses[s].is_finite())
            .filter_map(|s| Some((x_of(s)?, c.report.losses[s].clamp(lo, hi))))
            .collect();
        let color = c.color;
        let series = chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(err)?;
        if !by_time {
            series.label(c.label()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        }
        // The GradScaler's skipped steps, on the curve.
        let skipped: Vec<(f64, f64)> = c
            .report
            .skipped_at
            .iter()
            .filter(|&&s| s < c.shown && c.report.losses[s].is_finite())
            .filter_map(|&s| Some((x_of(s)?, c.report.losses[s].clamp(lo, hi))))
            .collect();
        if !skipped.is_empty() {
            let marks = chart
                .draw_series(
                    skipped
                        .iter()
                        .map(|&p| Cross::new(p, 5, color.stroke_width(2))),
                )
                .map_err(err)?;
            if !by_time {
                marks
                    .label(format!(
                        "{}: {} skipped step(s)",
                        c.report.precision,
                        skipped.len()
                    ))
                    .legend(move |(x, y)| Cross::new((x + 9, y), 5, color.stroke_width(2)));
            }
        }
        // Where a diverged run leaves the plot: the word, at its last point.
        if let (Some(step), Some(&last)) = (c.diverged, points.last()) {
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("{} diverged (step {step})", c.report.precision),
                    last,
                    ("sans-serif", 14).into_font().color(&color),
                )))
                .map_err(err)?;
        }
    }
    if !by_time {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

/// One bar per run, labelled with its precision and its value.
fn bar_panel(
    area: &DrawingArea<SVGBackend, Shift>,
    curves: &[Curve],
    caption: &str,
    value: impl Fn(&Report) -> f64,
) -> Result<()> {
    let values: Vec<f64> = curves.iter().map(|c| value(c.report)).collect();
    let top = values
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max)
        * 1.2;
    let n = curves.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..n as f64, 0.0..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        // Only the bar centres (i + 0.5) carry a label: their precision.
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 1e-6 {
                curves
                    .get(i)
                    .map(|c| c.report.precision.clone())
                    .unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(err)?;
    for (i, (c, v)) in curves.iter().zip(&values).enumerate() {
        let x = i as f64;
        if !v.is_finite() {
            continue;
        }
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(x + 0.15, 0.0), (x + 0.85, *v)],
                c.color.mix(0.8).filled(),
            )))
            .map_err(err)?;
        chart
            .draw_series(std::iter::once(Text::new(
                format!("{v:.0}"),
                (x + 0.5, *v + top * 0.01),
                TextStyle::from(("sans-serif", 13).into_font())
                    .pos(Pos::new(HPos::Center, VPos::Bottom)),
            )))
            .map_err(err)?;
    }
    Ok(())
}

/// Writes the chart of `reports` to `path`.
pub fn write(path: &Path, reports: &[Report]) -> Result<()> {
    let curves: Vec<Curve> = reports
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let diverged = diverged_at(&r.losses);
            let elapsed = (r.step_s.len() == r.losses.len() && !r.losses.is_empty()).then(|| {
                r.step_s
                    .iter()
                    .scan(0.0, |t, dt| {
                        *t += dt;
                        Some(*t)
                    })
                    .collect()
            });
            Curve {
                report: r,
                color: COLORS[i % COLORS.len()],
                shown: diverged.unwrap_or(r.losses.len()),
                diverged,
                elapsed,
            }
        })
        .collect();
    let root = SVGBackend::new(path, (1280, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (top, bottom) = root.split_vertically(540);
    let (by_step, by_time) = top.split_horizontally(640);
    let (speed, memory) = bottom.split_horizontally(640);
    loss_panel(&by_step, &curves, false)?;
    loss_panel(&by_time, &curves, true)?;
    bar_panel(&speed, &curves, "tokens per second", |r| r.tokens_per_s)?;
    let memory_caption = match reports.first().map(|r| r.memory_source.as_str()) {
        Some(source) if !source.is_empty() => format!("peak memory, MiB ({source})"),
        _ => "peak memory, MiB".to_string(),
    };
    bar_panel(&memory, &curves, &memory_caption, |r| r.peak_mib)?;
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(precision: &str, losses: Vec<f64>, skipped_at: Vec<usize>) -> Report {
        Report {
            precision: precision.into(),
            step_s: vec![0.05; losses.len()],
            train_loss: *losses.last().unwrap(),
            losses,
            skipped_at,
            val_loss: 1.0,
            ms_per_step: 50.0,
            tokens_per_s: 20000.0,
            peak_mib: 45.0,
            memory_source: "CPU tensor bytes".into(),
            params_mib: 4.0,
            grads_mib: 4.0,
            optimizer_mib: 8.0,
            activations_mib: 20.0,
            skipped: 0,
            loss_scale: 1.0,
            steps: 0,
            val_at: Vec::new(),
        }
    }

    /// Every `<text>` of the SVG, parsed as XML.
    fn texts(svg: &str) -> Vec<String> {
        let doc = roxmltree::Document::parse(svg).expect("the chart is well-formed XML");
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .map(|n| n.text().unwrap_or_default().trim().to_string())
            .collect()
    }

    #[test]
    fn divergence_is_a_loss_that_is_not_finite_or_climbed_past_its_start() {
        assert_eq!(diverged_at(&[4.0, 3.0, 2.0, 1.0]), None);
        assert_eq!(diverged_at(&[4.0, 3.0, f64::NAN]), Some(2));
        assert_eq!(diverged_at(&[4.0, 5.9, 6.1]), Some(2));
        assert_eq!(diverged_at(&[f64::INFINITY]), Some(0));
        assert_eq!(diverged_at(&[]), None);
    }

    #[test]
    fn every_precision_appears_and_a_diverged_run_is_labelled() {
        let good: Vec<f64> = (0..50).map(|s| 4.0 * 0.97f64.powi(s)).collect();
        let mut bad = good.clone();
        for (s, l) in bad.iter_mut().enumerate().skip(20) {
            *l = 4.0 + s as f64;
        }
        let reports = vec![
            report("64-true", good.clone(), vec![]),
            report("32-true", good.clone(), vec![]),
            report("16-mixed", good.clone(), vec![3, 9]),
            report("bf16-mixed", good.clone(), vec![]),
            report("16-true", bad, vec![]),
            report("bf16-true", good, vec![]),
        ];
        let dir = std::env::temp_dir().join(format!("tch-fabric-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("compare.svg");
        write(&path, &reports).unwrap();
        let texts = texts(&std::fs::read_to_string(&path).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
        for p in [
            "64-true",
            "32-true",
            "16-mixed",
            "bf16-mixed",
            "16-true",
            "bf16-true",
        ] {
            // The legend of the loss curves and the bars' axis name every precision.
            assert!(
                texts.iter().filter(|t| t.as_str() == p).count() >= 2,
                "{p} is not a bar label in both bar charts: {texts:?}"
            );
            assert!(
                texts.iter().any(|t| t.starts_with(p)),
                "{p} missing: {texts:?}"
            );
        }
        // The climb starts at step 20 (loss 24, past 1.5 x the first loss of 4).
        assert!(texts.contains(&"16-true (diverged at step 20)".to_string()));
        assert!(texts.contains(&"16-true diverged (step 20)".to_string()));
        assert!(texts.contains(&"16-mixed: 2 skipped step(s)".to_string()));
        assert!(texts.iter().all(|t| !t.contains("64-true (diverged")));
        assert!(texts.contains(&"loss against wall-clock time".to_string()));
        assert!(texts.contains(&"tokens per second".to_string()));
    }
}
