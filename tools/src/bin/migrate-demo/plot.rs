//! The demo's plot: dirty pages and bytes sent per migration round, read from the source's
//! `--migrate-json`, drawn as an SVG.

use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;
use serde_json::Value;

/// One round of the plot.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Round {
    pub round: u64,
    pub dirty_pages: u64,
    pub bytes: u64,
    pub ms: f64,
}

pub fn rounds_of(figures: &Value) -> Vec<Round> {
    figures["rounds"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| Round {
                    round: r["round"].as_u64().unwrap_or(0),
                    dirty_pages: r["dirty_pages"].as_u64().unwrap_or(0),
                    bytes: r["bytes"].as_u64().unwrap_or(0),
                    ms: r["ms"].as_f64().unwrap_or(0.0),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Bytes in the MB of the plot and the summary (decimal, like the vmm's progress lines).
pub const MB: f64 = 1e6;
/// Bytes one guest page write dirties (a 4 KiB page).
pub const PAGE_BYTES: f64 = 4096.0;
/// Smallest MB value the log-scale plot shows (a round of nothing but framing).
const MIN_MB: f64 = 1e-3;

/// Draws dirty pages per round (line with a point per round) above MB sent per round
/// (bars) into an SVG file; both on log scales, since round 0 sends all of RAM and the last
/// rounds a few pages.
pub fn plot(path: &Path, title: &str, rounds: &[Round]) -> Result<()> {
    let root = SVGBackend::new(path, (960, 720)).into_drawing_area();
    let draw = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("drawing {}: {e:?}", path.display());
    root.fill(&WHITE).map_err(draw)?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(draw)?;
    let (top, bottom) = root.split_vertically(340);
    let n = rounds.len().max(1) as f64;
    let x = -0.5..n - 0.5;
    let page_vals: Vec<f64> = rounds
        .iter()
        .map(|r| (r.dirty_pages as f64).max(1.0))
        .collect();
    let mb_vals: Vec<f64> = rounds
        .iter()
        .map(|r| (r.bytes as f64 / MB).max(MIN_MB))
        .collect();
    let pages_y = log_span(&page_vals, 1.0);
    let mb_y = log_span(&mb_vals, MIN_MB);
    let mb_floor = mb_y.start;

    let mut pages = ChartBuilder::on(&top)
        .caption("dirty pages sent per round", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(x.clone(), pages_y.log_scale())
        .map_err(draw)?;
    pages
        .configure_mesh()
        .x_desc("round")
        .y_desc("pages (4 KiB)")
        .x_labels(rounds.len().clamp(2, 16))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(draw)?;
    let pts: Vec<(f64, f64)> = page_vals
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as f64, v))
        .collect();
    pages
        .draw_series(LineSeries::new(pts.iter().copied(), BLUE.stroke_width(2)))
        .map_err(draw)?;
    pages
        .draw_series(pts.iter().map(|&p| Circle::new(p, 4, BLUE.filled())))
        .map_err(draw)?;

    let mut sent = ChartBuilder::on(&bottom)
        .caption("MB sent per round", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(x, mb_y.log_scale())
        .map_err(draw)?;
    sent.configure_mesh()
        .x_desc("round")
        .y_desc("MB (10^6 bytes)")
        .x_labels(rounds.len().clamp(2, 16))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| {
            if *v >= 1.0 {
                format!("{v:.0}")
            } else {
                format!("{v}")
            }
        })
        .draw()
        .map_err(draw)?;
    sent.draw_series(mb_vals.iter().enumerate().map(|(i, &mb)| {
        Rectangle::new(
            [(i as f64 - 0.3, mb_floor), (i as f64 + 0.3, mb)],
            GREEN.mix(0.7).filled(),
        )
    }))
    .map_err(draw)?;
    root.present().map_err(draw)?;
    Ok(())
}

/// A log-scale axis range around `values` (none below `floor`), a factor 3 of room each side.
fn log_span(values: &[f64], floor: f64) -> std::ops::Range<f64> {
    let lo = values
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .max(floor);
    let hi = values.iter().copied().fold(floor, f64::max);
    (lo / 3.0)..(hi * 3.0)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn rounds(n: u64) -> Vec<Round> {
        (0..n)
            .map(|i| Round {
                round: i,
                dirty_pages: 1 << (20 - 3 * i.min(6)),
                bytes: (1 << (32 - 3 * i.min(6))) + 4096,
                ms: 10.0,
            })
            .collect()
    }

    #[test]
    fn plot_is_svg_with_a_point_per_round() {
        let dir = std::env::temp_dir().join(format!("migrate-demo-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for n in [1, 5] {
            let path = dir.join(format!("r{n}.svg"));
            plot(&path, "title", &rounds(n)).unwrap();
            let text = std::fs::read_to_string(&path).unwrap();
            let doc = roxmltree::Document::parse(&text).expect("well-formed XML");
            assert_eq!(doc.root_element().tag_name().name(), "svg");
            let circles = doc
                .descendants()
                .filter(|e| e.tag_name().name() == "circle")
                .count();
            assert_eq!(circles, n as usize, "{text}");
            assert!(text.contains("dirty pages sent per round"));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rounds_are_read_from_the_migrate_json_format() {
        let v = json!({"mode": "precopy", "dirty_mode": "kvm-bitmap", "total_ms": 1.0,
            "downtime_ms": 0.5, "bytes_sent": 10, "ram_bytes": 4096, "vcpus": 1,
            "postcopy": null,
            "rounds": [{"round": 0, "dirty_pages": 3, "bytes": 7, "ms": 1.5, "rate_mb_s": 1.0,
                        "est_downtime_ms": 0.1}]});
        assert_eq!(
            rounds_of(&v),
            [Round {
                round: 0,
                dirty_pages: 3,
                bytes: 7,
                ms: 1.5
            }]
        );
        assert!(rounds_of(&Value::Null).is_empty());
    }
}
