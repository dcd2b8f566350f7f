//! The `--svg` plot of `hearth bench --depths`: prefill and decode tokens
//! per second against context depth, one panel each, one line per engine
//! (hearth, and llama.cpp when its figures were given).

use std::path::Path;

use plotters::prelude::*;

use super::depth::DepthRow;

/// Line colours by engine, in the order engines first appear.
const COLOURS: [RGBColor; 4] = [
    RGBColor(214, 96, 38),
    RGBColor(44, 110, 184),
    RGBColor(60, 150, 80),
    RGBColor(140, 80, 160),
];

/// One test's tokens and mean tokens per second from a row.
type Pick = fn(&DepthRow) -> (u32, f64);

pub fn draw(path: &Path, title: &str, rows: &[DepthRow]) -> anyhow::Result<()> {
    let fail = |e: String| anyhow::anyhow!("cannot draw {}: {e}", path.display());
    let root = SVGBackend::new(path, (1100, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
    let root = root
        .titled(title, ("sans-serif", 20))
        .map_err(|e| fail(e.to_string()))?;
    let panels = root.split_evenly((1, 2));
    let mut engines: Vec<&str> = Vec::new();
    for r in rows {
        if !engines.contains(&r.engine.as_str()) {
            engines.push(&r.engine);
        }
    }
    let max_depth = rows.iter().map(|r| r.depth).max().unwrap_or(0).max(1) as f64;
    let tests: [(&str, Pick); 2] = [
        ("prefill", |r| (r.pp_tokens, r.pp.0)),
        ("decode", |r| (r.tg_tokens, r.tg.0)),
    ];
    for (panel, (name, pick)) in panels.iter().zip(tests) {
        let points = |engine: &str| -> Vec<(f64, f64)> {
            rows.iter()
                .filter(|r| r.engine == engine && pick(r).0 > 0)
                .map(|r| (r.depth as f64, pick(r).1))
                .collect()
        };
        let top = rows
            .iter()
            .filter(|r| pick(r).0 > 0)
            .map(|r| pick(r).1)
            .fold(0.0f64, f64::max)
            .max(1.0)
            * 1.15;
        let tokens = rows.iter().map(|r| pick(r).0).find(|&n| n > 0).unwrap_or(0);
        let caption = match name {
            "prefill" => format!("prefill ({tokens} tokens after the depth)"),
            _ => format!("decode ({tokens} tokens after the depth)"),
        };
        let mut chart = ChartBuilder::on(panel)
            .caption(caption, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..max_depth * 1.04, 0.0..top)
            .map_err(|e| fail(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("context depth (tokens already in the KV)")
            .y_desc("tokens per second")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()
            .map_err(|e| fail(e.to_string()))?;
        for (i, engine) in engines.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let pts = points(engine);
            if pts.is_empty() {
                continue;
            }
            chart
                .draw_series(LineSeries::new(pts.clone(), colour.stroke_width(2)))
                .map_err(|e| fail(e.to_string()))?
                .label(*engine)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
                });
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, colour.filled())))
                .map_err(|e| fail(e.to_string()))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| fail(e.to_string()))?;
    }
    root.present().map_err(|e| fail(e.to_string()))?;
    Ok(())
}
