//! The SVG charts of the benchmark page: throughput and p99 latency per case and broker.

use std::collections::BTreeMap;
use std::path::Path;

use super::markdown::{broker_order, group, lat};
use super::{num, BenchResult, ReportArgs};

fn color(i: usize) -> plotters::style::RGBColor {
    use plotters::style::RGBColor;
    const C: [RGBColor; 5] = [
        RGBColor(0x1f, 0x77, 0xb4),
        RGBColor(0xff, 0x7f, 0x0e),
        RGBColor(0x2c, 0xa0, 0x2c),
        RGBColor(0x94, 0x67, 0xbd),
        RGBColor(0x7f, 0x7f, 0x7f),
    ];
    C[i % C.len()]
}

/// Grouped bars: one group per case, one bar per broker. Returns false if nothing to plot.
fn bar_chart(
    path: &Path,
    title: &str,
    y_desc: &str,
    cases: &[String],
    brokers: &[String],
    values: &BTreeMap<(usize, usize), f64>,
    log: bool,
) -> anyhow::Result<bool> {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    if values.is_empty() {
        return Ok(false);
    }
    let max = values.values().cloned().fold(0.0f64, f64::max);
    let min = values.values().cloned().fold(f64::INFINITY, f64::min);
    let n = cases.len() as f64;
    let width = (160 * cases.len() as u32 + 160).max(640);
    let root = SVGBackend::new(path, (width, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let nb = brokers.len().max(1) as f64;
    let draw = |x: usize, b: usize| {
        (
            x as f64 + 0.1 + 0.8 * b as f64 / nb,
            x as f64 + 0.1 + 0.8 * (b + 1) as f64 / nb,
        )
    };
    let err = |e: &dyn std::fmt::Debug| anyhow::anyhow!("plot: {e:?}");
    macro_rules! body {
        ($chart:ident, $floor:expr) => {{
            $chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(0)
                .y_desc(y_desc)
                .draw()
                .map_err(|e| err(&e))?;
            for (bi, b) in brokers.iter().enumerate() {
                let c = color(bi);
                let bars: Vec<_> = values
                    .iter()
                    .filter(|((_, bj), _)| *bj == bi)
                    .map(|((x, _), v)| {
                        let (x0, x1) = draw(*x, bi);
                        Rectangle::new([(x0, $floor), (x1, *v)], c.filled())
                    })
                    .collect();
                $chart
                    .draw_series(bars)
                    .map_err(|e| err(&e))?
                    .label(b.as_str())
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled())
                    });
                let labels: Vec<_> = values
                    .iter()
                    .filter(|((_, bj), _)| *bj == bi)
                    .map(|((x, _), v)| {
                        let (x0, x1) = draw(*x, bi);
                        Text::new(
                            num(*v),
                            ((x0 + x1) / 2.0, *v),
                            ("sans-serif", 11)
                                .into_font()
                                .color(&BLACK)
                                .pos(Pos::new(HPos::Center, VPos::Bottom)),
                        )
                    })
                    .collect();
                $chart.draw_series(labels).map_err(|e| err(&e))?;
            }
            for (i, case) in cases.iter().enumerate() {
                let (px, py) = $chart.backend_coord(&(i as f64 + 0.5, $floor));
                root.draw(&Text::new(
                    case.clone(),
                    (px, py + 8),
                    ("sans-serif", 13)
                        .into_font()
                        .color(&BLACK)
                        .pos(Pos::new(HPos::Center, VPos::Top)),
                ))
                .map_err(|e| err(&e))?;
            }
            $chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .border_style(BLACK)
                .background_style(WHITE.mix(0.9))
                .draw()
                .map_err(|e| err(&e))?;
        }};
    }
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70);
    if log {
        let floor = (min / 2.0).max(1e-3);
        let mut chart = builder
            .build_cartesian_2d(0f64..n, (floor..max * 3.0).log_scale())
            .map_err(|e| err(&e))?;
        body!(chart, floor);
    } else {
        let mut chart = builder
            .build_cartesian_2d(0f64..n, 0f64..max * 1.2)
            .map_err(|e| err(&e))?;
        body!(chart, 0.0);
    }
    root.present().map_err(|e| err(&e))?;
    Ok(true)
}

/// Throughput relative to the first baseline, per message case.
pub(super) fn plot_throughput(
    a: &ReportArgs,
    results: &[BenchResult],
    path: &Path,
) -> anyhow::Result<bool> {
    let brokers = broker_order(a, results);
    let base = a.baselines.first().cloned().unwrap_or_default();
    let mut cases = Vec::new();
    let mut values = BTreeMap::new();
    for (case, rs) in group(results) {
        if rs[0].scenario == "idle" {
            continue;
        }
        let Some(b) = rs
            .iter()
            .find(|r| r.broker == base)
            .map(|r| r.delivered_rate)
        else {
            continue;
        };
        if b <= 0.0 {
            continue;
        }
        let x = cases.len();
        cases.push(case.clone());
        for (bi, name) in brokers.iter().enumerate() {
            if let Some(r) = rs.iter().find(|r| &r.broker == name) {
                values.insert((x, bi), r.delivered_rate / b);
            }
        }
    }
    bar_chart(
        path,
        &format!(
            "Throughput relative to {base} (higher is better; msgs/s, connects/s for conn-storm)"
        ),
        &format!("× {base}"),
        &cases,
        &brokers,
        &values,
        false,
    )
}

/// p99 end-to-end latency in ms per message case (log scale).
pub(super) fn plot_p99(
    a: &ReportArgs,
    results: &[BenchResult],
    path: &Path,
) -> anyhow::Result<bool> {
    let brokers = broker_order(a, results);
    let mut cases = Vec::new();
    let mut values = BTreeMap::new();
    for (case, rs) in group(results) {
        if !matches!(rs[0].scenario.as_str(), "pairs" | "fan-in" | "fan-out") {
            continue;
        }
        let x = cases.len();
        cases.push(case.clone());
        for (bi, name) in brokers.iter().enumerate() {
            if let Some(v) = rs
                .iter()
                .find(|r| &r.broker == name)
                .and_then(|r| lat(r, |l| l.p99_us))
            {
                values.insert((x, bi), v);
            }
        }
    }
    bar_chart(
        path,
        "p99 end-to-end latency, ms (lower is better; log scale)",
        "ms",
        &cases,
        &brokers,
        &values,
        true,
    )
}
