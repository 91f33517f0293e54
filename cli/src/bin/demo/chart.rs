//! The comparison chart: loss curves per precision, and peak memory per precision, as SVG.
use super::Report;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

pub fn write(path: &Path, reports: &[Report]) -> Result<()> {
    let root = SVGBackend::new(path, (1100, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (left, right) = root.split_horizontally(700);

    let steps = reports
        .iter()
        .map(|r| r.losses.len())
        .max()
        .unwrap_or(1)
        .max(2);
    let finite = reports
        .iter()
        .flat_map(|r| r.losses.iter().copied())
        .filter(|l| l.is_finite());
    let (lo, hi) = finite.fold((f64::MAX, f64::MIN), |(lo, hi), l| (lo.min(l), hi.max(l)));
    let (lo, hi) = if lo <= hi {
        (lo * 0.95, hi * 1.05)
    } else {
        (0.0, 1.0)
    };
    let mut chart = ChartBuilder::on(&left)
        .caption("training loss per step", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0..steps, lo..hi)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (i, r) in reports.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                r.losses
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| l.is_finite())
                    .map(|(s, l)| (s, *l)),
                color.stroke_width(2),
            ))
            .map_err(|e| anyhow!("{e}"))?
            .label(r.precision.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;

    let max_mem = reports.iter().map(|r| r.peak_mib).fold(1.0, f64::max) * 1.15;
    let mut bars = ChartBuilder::on(&right)
        .caption("peak memory (MiB)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0.0..reports.len() as f64, 0.0..max_mem)
        .map_err(|e| anyhow!("{e}"))?;
    bars.configure_mesh()
        .disable_x_mesh()
        .x_labels(reports.len() * 2 + 1)
        // Label only the bar centres (i + 0.5) with their precision.
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 1e-6 {
                reports
                    .get(i)
                    .map(|r| r.precision.clone())
                    .unwrap_or_default()
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    bars.draw_series(reports.iter().enumerate().map(|(i, r)| {
        let color = COLORS[i % COLORS.len()];
        let x = i as f64;
        Rectangle::new(
            [(x + 0.15, 0.0), (x + 0.85, r.peak_mib)],
            color.mix(0.8).filled(),
        )
    }))
    .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
