//! PNG bar charts, one per workload group: each system's speed relative to
//! ext4 (log scale, ext4 = 1). Text is drawn with a TrueType font loaded at
//! run time; without one, no chart is drawn and the report says so.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::report::Results;
use crate::workloads::Group;

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Registers a sans-serif font with plotters (once).
fn load_font() -> Result<()> {
    static LOADED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    LOADED
        .get_or_init(|| {
            for p in FONT_CANDIDATES {
                if let Ok(bytes) = std::fs::read(p) {
                    // plotters keeps fonts for the life of the process.
                    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                    if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                        return Ok(());
                    }
                }
            }
            Err(format!(
                "no TrueType font found (looked for {}); install fonts-dejavu-core",
                FONT_CANDIDATES.join(", ")
            ))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// Distinct colours for up to 10 systems.
const COLORS: [RGBColor; 10] = [
    RGBColor(120, 120, 120),
    RGBColor(31, 119, 180),
    RGBColor(108, 174, 214),
    RGBColor(255, 127, 14),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
];

/// Draws one PNG per group into `out`; returns the file names written.
pub fn draw_all(res: &Results, out: &Path) -> Result<Vec<String>> {
    load_font()?;
    let mut written = Vec::new();
    for g in Group::ALL {
        let name = format!("{}.png", g.file_stem());
        if draw_group(res, g, &out.join(&name))? {
            written.push(name);
        }
    }
    Ok(written)
}

/// One bar per (charted metric, system); false if the group had no results.
fn draw_group(res: &Results, g: Group, path: &Path) -> Result<bool> {
    let systems: Vec<&str> = res.meta.systems.iter().map(|(s, _)| s.as_str()).collect();
    // (x label, per system: Ok(ratio) | Err(why there is no bar))
    let mut items: Vec<(String, Vec<Result<f64, &str>>)> = Vec::new();
    for w in res.results.iter().filter(|w| w.workload.group == g) {
        for m in &w.workload.metrics {
            let Some(label) = &m.chart else { continue };
            let bars = systems
                .iter()
                .map(|s| match (w.run(s), w.ratio(s, m.key)) {
                    (_, Some(r)) if r > 0.0 => Ok(r),
                    (Some(run), _) if !run.ok => Err("failed"),
                    _ => Err("n/a"),
                })
                .collect();
            items.push((label.clone(), bars));
        }
    }
    if items.is_empty() {
        return Ok(false);
    }
    let all: Vec<f64> = items.iter().flat_map(|(_, v)| v.iter().filter_map(|r| r.ok())).collect();
    let lo = all.iter().copied().fold(1.0f64, f64::min).min(0.5);
    let hi = all.iter().copied().fold(1.0f64, f64::max).max(1.5);
    // Room above the tallest bar for the legend.
    let (y0, y1) = (10f64.powf(lo.log10().floor()), hi * 8.0);
    let width = (260 + items.len() as u32 * (systems.len() as u32 * 22 + 30)).max(900);
    let root = BitMapBackend::new(path, (width, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e:?}"))?;
    let n = items.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{}: speed relative to ext4 (higher is better)", g.title()), ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n as f64, (y0..y1).log_scale())
        .map_err(|e| anyhow!("{e:?}"))?;
    let labels: Vec<String> = items.iter().map(|(l, _)| l.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            let frac = x - x.floor();
            if (frac - 0.5).abs() < 1e-6 && i < labels.len() {
                labels[i].clone()
            } else {
                String::new()
            }
        })
        .y_desc("ratio to ext4 (log scale)")
        .y_labels(12)
        .y_label_formatter(&|y| format!("{y:.2}"))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    // ext4 = 1 reference line.
    chart
        .draw_series(LineSeries::new([(0.0, 1.0), (n as f64, 1.0)], BLACK.stroke_width(1)))
        .map_err(|e| anyhow!("{e:?}"))?;
    let slot = 0.8 / systems.len() as f64;
    for (si, sys) in systems.iter().enumerate() {
        let color = COLORS[si % COLORS.len()];
        let mut bars = Vec::new();
        let mut texts = Vec::new();
        for (i, (_, vals)) in items.iter().enumerate() {
            let x0 = i as f64 + 0.1 + si as f64 * slot;
            match vals[si] {
                Ok(r) => {
                    bars.push(Rectangle::new([(x0, y0), (x0 + slot * 0.9, r)], color.filled()));
                    texts.push(Text::new(format!("{r:.2}"), (x0, r * 1.08), ("sans-serif", 10).into_font()));
                }
                Err(why) => texts.push(Text::new(why.to_string(), (x0, y0 * 1.1), ("sans-serif", 10).into_font())),
            }
        }
        chart
            .draw_series(bars)
            .map_err(|e| anyhow!("{e:?}"))?
            .label(*sys)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        chart.draw_series(texts).map_err(|e| anyhow!("{e:?}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    root.present().map_err(|e| anyhow!("{e:?}")).with_context(|| format!("writing {}", path.display()))?;
    if !path.exists() {
        bail!("{} was not written", path.display());
    }
    Ok(true)
}
