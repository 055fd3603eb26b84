//! Line charts into PNG files for the examples: plotters draws the lines into an RGB buffer;
//! text comes from the public-domain 8×8 bitmap font of `font8x8` (plotters' own text needs
//! system fonts), and `png` writes the file.

use std::path::Path;

use anyhow::{Result, anyhow};
use font8x8::UnicodeFonts;
use plotters::prelude::*;

/// A drawing area of the bitmap.
pub type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// Ten distinguishable colours (matplotlib's tab10), cycled.
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Draws `text` with its top-left corner at `(x, y)`, each font pixel `scale`² pixels.
pub fn text(area: &Area<'_>, x: i32, y: i32, scale: i32, s: &str, color: &RGBColor) {
    for (i, ch) in s.chars().enumerate() {
        let glyph = font8x8::BASIC_FONTS
            .get(ch)
            .or_else(|| font8x8::LATIN_FONTS.get(ch))
            .or_else(|| font8x8::GREEK_FONTS.get(ch))
            .unwrap_or([0; 8]);
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            let px = x + (i as i32 * 8 + col) * scale + dx;
                            let py = y + row as i32 * scale + dy;
                            let _ = area.draw_pixel((px, py), color);
                        }
                    }
                }
            }
        }
    }
}

fn text_width(s: &str, scale: i32) -> i32 {
    s.chars().count() as i32 * 8 * scale
}

/// About five round tick values covering `[lo, hi]`.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let mut v = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while v <= hi + 1e-9 * span {
        out.push(v);
        v += step;
    }
    out
}

fn label(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// One named curve (or, with `markers_only`, a set of points).
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// How a panel draws its axes and series.
pub struct Panel<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    /// `[x_min, x_max]`; with `log_x`, both positive and the axis shows log10(x).
    pub x_range: (f64, f64),
    pub log_x: bool,
    /// Points only (a scatter), each labelled with its series' name.
    pub markers_only: bool,
    /// The legend in the top corner (else the bottom one).
    pub legend_top: bool,
}

/// Draws `series` into `area` as `spec` says.
pub fn panel(area: &Area<'_>, spec: &Panel<'_>, series: &[Series]) -> Result<()> {
    let black = RGBColor(0, 0, 0);
    let grey = RGBColor(225, 225, 225);
    let (w, h) = area.dim_in_pixel();
    let (left, right, top, bottom) = (70i32, 20i32, 40i32, 40i32);
    text(area, left, 12, 2, spec.title, &black);
    let fx = |x: f64| if spec.log_x { x.log10() } else { x };
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|v| v.is_finite())
        .collect();
    if ys.is_empty() {
        return Ok(());
    }
    let (mut y0, mut y1) = ys
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    y0 -= pad;
    y1 += pad;
    let (x0, x1) = (fx(spec.x_range.0), fx(spec.x_range.1));
    let plot_area = area.margin(top, bottom, left, right);
    let mut chart = ChartBuilder::on(&plot_area).build_cartesian_2d(x0..x1, y0..y1)?;
    let base = area.get_base_pixel();
    let to_px = |chart: &ChartContext<'_, BitMapBackend<'_>, _>, x: f64, y: f64| {
        let (px, py) = chart.backend_coord(&(x, y));
        (px - base.0, py - base.1)
    };
    for t in ticks(y0, y1) {
        chart.draw_series(LineSeries::new([(x0, t), (x1, t)], &grey))?;
        let s = label(t);
        let (_, py) = to_px(&chart, x0, t);
        text(area, left - 6 - text_width(&s, 1), py - 4, 1, &s, &black);
    }
    for t in ticks(x0, x1) {
        chart.draw_series(LineSeries::new([(t, y0), (t, y1)], &grey))?;
        let s = if spec.log_x {
            format!("1e{}", label(t))
        } else {
            label(t)
        };
        let (px, _) = to_px(&chart, t, y0);
        let y = h as i32 - bottom + 8;
        text(area, px - text_width(&s, 1) / 2, y, 1, &s, &black);
    }
    let x_label = if spec.log_x {
        format!("{} (log)", spec.x_label)
    } else {
        spec.x_label.to_string()
    };
    let lw = text_width(&x_label, 1);
    text(
        area,
        w as i32 - right - lw,
        h as i32 - 14,
        1,
        &x_label,
        &black,
    );
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<(f64, f64)> = s.points.iter().map(|&(x, y)| (fx(x), y)).collect();
        if !spec.markers_only {
            chart.draw_series(LineSeries::new(
                points.iter().copied(),
                ShapeStyle::from(color).stroke_width(2),
            ))?;
        }
        if spec.markers_only || points.len() <= 20 {
            chart.draw_series(
                points
                    .iter()
                    .map(|&p| Circle::new(p, 4, ShapeStyle::from(color).filled())),
            )?;
        }
    }
    chart.draw_series(std::iter::once(Rectangle::new(
        [(x0, y0), (x1, y1)],
        ShapeStyle::from(&black),
    )))?;
    let lx = w as i32 - right - 230;
    let ly = if spec.legend_top {
        top + 10
    } else {
        h as i32 - bottom - 20 - 16 * series.len() as i32
    };
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let y = ly + 16 * i as i32;
        area.draw(&PathElement::new(
            vec![(lx, y + 4), (lx + 24, y + 4)],
            ShapeStyle::from(color).stroke_width(3),
        ))?;
        text(area, lx + 30, y, 1, &s.name, &black);
    }
    Ok(())
}

/// Draws a `width` × `height` image with `draw` and writes it to `path` as PNG.
pub fn write_png(
    path: &Path,
    (width, height): (u32, u32),
    draw: impl FnOnce(&Area<'_>) -> Result<()>,
) -> Result<()> {
    let mut buf = vec![255u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        draw(&root)?;
        root.present()?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = std::fs::File::create(path)?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()
        .and_then(|mut wr| wr.write_image_data(&buf))
        .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}
