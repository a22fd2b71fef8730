//! The straggler experiment's graph, as a PNG (plotters, with a system TrueType font).

use std::path::Path;

use plotters::prelude::*;
use plotters::style::FontStyle;

use super::{CliError, StragglerArgs};
use crate::experiment::{Row, Stragglers};

/// Where Debian/Ubuntu, Fedora and Arch keep a sans-serif TrueType font.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Loads a font once for the process and registers it as "sans-serif".
fn register_font() -> Result<(), CliError> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let mut paths: Vec<String> = std::env::var("HETSYNC_FONT").into_iter().collect();
        paths.extend(FONT_CANDIDATES.iter().map(|s| s.to_string()));
        let Some(bytes) = paths.iter().find_map(|p| std::fs::read(p).ok()) else {
            return Err(
                "no TrueType font found for the graph: install one (apt-get install fonts-dejavu-core) or point HETSYNC_FONT at a .ttf file"
                    .to_string(),
            );
        };
        // The font lives as long as the process: plotters keeps a reference to it.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| "the font file is not a usable TrueType font".to_string())
    })
    .clone()
    .map_err(Into::into)
}

/// Draws updates/s against the share of stragglers, one line per policy.
pub(super) fn stragglers(path: &Path, rows: &[Row], a: &StragglerArgs) -> Result<(), CliError> {
    register_font()?;
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let ymax = rows
        .iter()
        .map(|r| r.updates_per_sec)
        .fold(1.0f64, f64::max)
        * 1.15;
    let (top, bottom) = root.split_vertically(560);
    let mut chart = ChartBuilder::on(&top)
        .caption(
            "Het-Sync: model updates per second vs share of stragglers",
            ("sans-serif", 26),
        )
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(-3f64..103f64, 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_desc(match a.straggler_mode {
            Stragglers::Persistent => "persistent stragglers (% of workers always slow)",
            Stragglers::Transient => "transient stragglers (% of every worker's steps slow)",
        })
        .y_desc("updates / s")
        .x_labels(11)
        .axis_desc_style(("sans-serif", 18))
        .label_style(("sans-serif", 15))
        .draw()?;
    let mut policies: Vec<&str> = rows.iter().map(|r| r.policy.as_str()).collect();
    policies.dedup();
    policies.sort_unstable();
    policies.dedup();
    for (i, policy) in policies.iter().enumerate() {
        let color = match *policy {
            "naive" => RGBColor(214, 39, 40),
            "timeout" => RGBColor(31, 119, 180),
            "adaptive" => RGBColor(44, 160, 44),
            "bsp" => RGBColor(148, 103, 189),
            "ssp" => RGBColor(255, 127, 14),
            "asp" => RGBColor(140, 86, 75),
            _ => {
                let (r, g, b) = Palette99::pick(i).to_rgba().rgb();
                RGBColor(r, g, b)
            }
        };
        let mut pts: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.policy == *policy)
            .map(|r| (f64::from(r.stragglers_pct), r.updates_per_sec))
            .collect();
        pts.sort_by(|x, y| x.0.total_cmp(&y.0));
        let label = match *policy {
            "naive" => "naive barrier (waits for everyone)".to_string(),
            "timeout" => format!("Het-Sync timeout barrier ({} ms)", a.timeout_ms),
            "adaptive" => format!("adaptive timeout (learnt, cap {} ms)", a.timeout_ms),
            "bsp" => "BSP (vector clock, staleness 0)".to_string(),
            "ssp" => format!("SSP (vector clock, staleness {})", a.staleness),
            "asp" => "ASP (vector clock, no bound)".to_string(),
            other => other.to_string(),
        };
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(3)))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 5, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    bottom.draw(&Text::new(
        format!(
            "{} workers on loopback TCP, compute {} ms per step, slow steps {} ms, {} s per point, model of {} floats",
            a.workers, a.compute_ms, a.straggle_ms, a.seconds, a.dim
        ),
        (90, 8),
        ("sans-serif", 15),
    ))?;
    root.present()?;
    Ok(())
}
