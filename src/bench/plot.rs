//! speedup.png: fused bf16 over candle-ops f32 for every sublayer config, forward and
//! forward+backward, one panel per mode, log scale, the 20x target as a line. Drawn with
//! plotters' bitmap backend and the DejaVu Sans font shipped in assets/fonts (no system fonts).

use crate::bench::report::{LayerTiming, FUSED_BF16, REF_F32, TARGET_SPEEDUP};
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;
use std::sync::Once;

/// Size of the PNG in pixels.
pub const WIDTH: u32 = 1400;
pub const HEIGHT: u32 = 900;

const FONT: &str = "sans-serif";

fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = plotters::style::register_font(
            FONT,
            FontStyle::Normal,
            include_bytes!("../../assets/fonts/DejaVuSans.ttf"),
        )
        .map_err(|_| anyhow!("the shipped DejaVuSans.ttf is not a usable font"));
    });
    result
}

/// One bar group: the config's label and its (forward, forward+backward) speedups.
type Group = (String, Option<f64>, Option<f64>);

fn groups(layers: &[LayerTiming], dynamic: bool) -> Vec<Group> {
    let mut out: Vec<Group> = Vec::new();
    let mut seen = Vec::new();
    for row in layers.iter().filter(|r| r.config.dynamic == dynamic) {
        if seen.contains(&row.config) {
            continue;
        }
        seen.push(row.config);
        let ms = |v: &str, bwd: bool| {
            layers
                .iter()
                .find(|r| r.config == row.config && r.variant == v)
                .and_then(|r| if bwd { r.fwd_bwd.ms } else { r.fwd.ms })
        };
        let speedup = |bwd: bool| match (ms(REF_F32, bwd), ms(FUSED_BF16, bwd)) {
            (Some(slow), Some(fast)) if fast > 0.0 => Some(slow / fast),
            _ => None,
        };
        out.push((
            format!("{}x{}", row.config.tokens, row.config.width),
            speedup(false),
            speedup(true),
        ));
    }
    out
}

/// Writes the plot to `path`.
pub fn speedup_png(path: &Path, layers: &[LayerTiming]) -> Result<()> {
    register_font()?;
    let panels = [(true, "dynamic"), (false, "static")];
    let all: Vec<f64> = panels
        .iter()
        .flat_map(|(d, _)| groups(layers, *d))
        .flat_map(|(_, a, b)| [a, b])
        .flatten()
        .collect();
    let top = all.iter().copied().fold(TARGET_SPEEDUP, f64::max).max(1.0) * 2.0;
    let bottom = all.iter().copied().fold(1.0, f64::min).max(1e-3) / 2.0;
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    let draw = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| draw(&e))?;
    let (title_area, body) = root.split_vertically(50);
    title_area
        .titled(
            "mHC sublayer (F = RMSNorm, n = 4): fused bf16 speedup over candle-ops f32",
            (FONT, 24),
        )
        .map_err(|e| draw(&e))?;
    for ((dynamic, mode), area) in panels.iter().zip(body.split_evenly((2, 1))) {
        let data = groups(layers, *dynamic);
        let n = data.len().max(1);
        let mut chart = ChartBuilder::on(&area)
            .caption(
                format!("{mode} (blue: forward, orange: forward+backward; red: {TARGET_SPEEDUP}x target)"),
                (FONT, 18),
            )
            .margin(10)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..n as f64, (bottom..top).log_scale())
            .map_err(|e| draw(&e))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            // Group labels are drawn below each group instead (the mesh puts ticks at round
            // numbers, not at group centres).
            .x_labels(0)
            .x_desc("T x C")
            .y_desc("speedup (x)")
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 15))
            .draw()
            .map_err(|e| draw(&e))?;
        let blue = RGBColor(31, 119, 180);
        let orange = RGBColor(255, 127, 14);
        for (i, (_, fwd, all)) in data.iter().enumerate() {
            let x = i as f64;
            for (offset, value, color) in [(0.1, fwd, blue), (0.5, all, orange)] {
                if let Some(v) = value {
                    chart
                        .draw_series(std::iter::once(Rectangle::new(
                            [(x + offset, bottom), (x + offset + 0.4, *v)],
                            color.filled(),
                        )))
                        .map_err(|e| draw(&e))?;
                }
            }
        }
        let label_style =
            TextStyle::from((FONT, 11).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
        for (i, (label, _, _)) in data.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(i as f64 + 0.5, bottom));
            root.draw(&Text::new(label.clone(), (px, py + 6), &label_style))
                .map_err(|e| draw(&e))?;
        }
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(0.0, TARGET_SPEEDUP), (n as f64, TARGET_SPEEDUP)],
                RED.stroke_width(2),
            )))
            .map_err(|e| draw(&e))?;
    }
    root.present().map_err(|e| draw(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::tests::synthetic;

    /// Width and height from the PNG's IHDR chunk (bytes 16..24, big-endian).
    fn png_size(bytes: &[u8]) -> (u32, u32) {
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
        assert_eq!(&bytes[12..16], b"IHDR");
        let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        (be(&bytes[16..20]), be(&bytes[20..24]))
    }

    #[test]
    fn png_has_the_right_size_and_ink() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("speedup.png");
        speedup_png(&path, &synthetic(25.0).layers).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(png_size(&bytes), (WIDTH, HEIGHT));
        // A white image compresses to a few KB; bars, text and axes make it larger.
        assert!(bytes.len() > 20_000, "PNG only {} bytes", bytes.len());
    }

    #[test]
    fn groups_hold_the_speedups() {
        let g = groups(&synthetic(25.0).layers, true);
        assert_eq!(g.len(), 3);
        assert_eq!(g[0].0, "128x1280");
        assert!((g[0].1.unwrap() - 25.0).abs() < 1e-9);
        assert!((g[2].2.unwrap() - 25.0).abs() < 1e-9);
    }
}
