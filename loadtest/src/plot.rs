//! The sweep as an SVG: delivered/s and p99 latency against the offered load, one line per
//! subscriber count, the latency bound and the knee marked.

use std::path::Path;

use plotters::prelude::*;

use crate::scenarios::SweepPoint;

/// Draws the sweep into `path`.
pub(crate) fn draw(
    path: &Path,
    points: &[SweepPoint],
    bound_ms: f64,
    knee: Option<&SweepPoint>,
) -> Result<(), String> {
    draw_inner(path, points, bound_ms, knee)
        .map_err(|e| format!("cannot draw {}: {e}", path.display()))
}

fn draw_inner(
    path: &Path,
    points: &[SweepPoint],
    bound_ms: f64,
    knee: Option<&SweepPoint>,
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (960, 800)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(400);
    let pos = |v: f64| v.max(1.0);
    let x_lo = points
        .iter()
        .map(|p| pos(p.offered_per_s))
        .fold(f64::INFINITY, f64::min)
        .min(1e3);
    let x_hi = 2.0
        * points
            .iter()
            .map(|p| pos(p.offered_per_s))
            .fold(1.0, f64::max)
        * 1.5;
    let y_hi = points
        .iter()
        .map(|p| pos(p.delivered_per_s).max(p.offered_per_s))
        .fold(1.0, f64::max)
        .max(x_hi);
    let y_lo = points
        .iter()
        .map(|p| pos(p.delivered_per_s))
        .fold(f64::INFINITY, f64::min)
        .min(x_lo)
        / 1.5;
    let lat_hi = points
        .iter()
        .map(|p| p.p99_ms)
        .fold(bound_ms, f64::max)
        .max(0.01)
        * 2.0;
    let lat_lo = points
        .iter()
        .map(|p| p.p99_ms.max(0.001))
        .fold(bound_ms, f64::min)
        / 2.0;
    let mut subs: Vec<usize> = points.iter().map(|p| p.subscribers).collect();
    subs.dedup();

    let mut c1 = ChartBuilder::on(&top)
        .caption(
            "delivered messages/s against offered load (log scales)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), (y_lo..y_hi).log_scale())?;
    c1.configure_mesh()
        .x_desc("offered deliveries/s (publishes/s x subscribers)")
        .y_desc("delivered/s")
        .x_label_formatter(&|v| si(*v))
        .y_label_formatter(&|v| si(*v))
        .draw()?;
    c1.draw_series(LineSeries::new(
        [(x_lo, x_lo), (x_hi, x_hi)],
        BLACK.mix(0.3),
    ))?
    .label("delivered = offered")
    .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.3)));
    let mut c2 = ChartBuilder::on(&bottom)
        .caption(
            format!("p99 latency (ms) against offered load; the bound is {bound_ms} ms"),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (x_lo..x_hi).log_scale(),
            (lat_lo..lat_hi)
                .log_scale()
                .with_key_points(one_two_five(lat_lo, lat_hi)),
        )?;
    c2.configure_mesh()
        .x_desc("offered deliveries/s")
        .y_desc("p99 ms")
        .x_label_formatter(&|v| si(*v))
        .y_label_formatter(&|v| si(*v))
        .draw()?;
    c2.draw_series(LineSeries::new(
        [(x_lo, bound_ms), (x_hi, bound_ms)],
        RED.mix(0.6),
    ))?
    .label("bound")
    .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.mix(0.6)));
    for (i, n) in subs.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let mine: Vec<&SweepPoint> = points.iter().filter(|p| p.subscribers == *n).collect();
        c1.draw_series(LineSeries::new(
            mine.iter()
                .map(|p| (pos(p.offered_per_s), pos(p.delivered_per_s))),
            color.stroke_width(2),
        ))?
        .label(format!("{n} subscribers"))
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        c1.draw_series(mine.iter().map(|p| {
            Circle::new(
                (pos(p.offered_per_s), pos(p.delivered_per_s)),
                3,
                color.filled(),
            )
        }))?;
        c2.draw_series(LineSeries::new(
            mine.iter()
                .map(|p| (pos(p.offered_per_s), p.p99_ms.max(lat_lo))),
            color.stroke_width(2),
        ))?
        .label(format!("{n} subscribers"))
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        c2.draw_series(mine.iter().map(|p| {
            Circle::new(
                (pos(p.offered_per_s), p.p99_ms.max(lat_lo)),
                3,
                color.filled(),
            )
        }))?;
    }
    if let Some(k) = knee {
        let at = (pos(k.offered_per_s), pos(k.delivered_per_s));
        c1.draw_series([Circle::new(at, 8, BLACK.stroke_width(2))])?;
        c1.draw_series([Text::new(
            format!("knee {}/s", si(k.delivered_per_s)),
            (at.0 / 3.0, at.1 * 1.4),
            ("sans-serif", 14),
        )])?;
        c2.draw_series([Circle::new(
            (at.0, k.p99_ms.max(lat_lo)),
            8,
            BLACK.stroke_width(2),
        )])?;
    }
    c1.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    c2.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// 1, 2, 5, 10, 20, 50... (and below 1: 0.5, 0.2, 0.1...) from `lo` to `hi`.
fn one_two_five(lo: f64, hi: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut decade = 10f64.powi(lo.max(1e-6).log10().floor() as i32);
    // At most 12 decades: the range is latency in milliseconds.
    for _ in 0..12 {
        for m in [1.0, 2.0, 5.0] {
            let v = decade * m;
            if v >= lo && v <= hi {
                out.push(v);
            }
        }
        decade *= 10.0;
    }
    out
}

/// `1500000` as `1.5M`.
fn si(v: f64) -> String {
    if v >= 1e9 {
        format!("{:.1}G", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}
