//! A small SVG chart of the LITI front: KL to the reference on x, perplexity on y (linear or log), one
//! labelled point per η joined by a line, plus markers for the reference and for the merge's inputs.
//! Labels are placed to avoid each other, the markers and the frame; the axes are padded so that every
//! marker and label lies inside. [`FrontPlot::to_png`] rasterises the same SVG (resvg).

use std::fmt::Write;

/// One labelled point.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub label: String,
    pub x: f64,
    pub y: f64,
}

/// What the front plot shows.
#[derive(Debug, Clone)]
pub struct FrontPlot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// The front, in η order (drawn as a line with labelled points).
    pub front: Vec<Point>,
    /// The reference model (drawn as a square).
    pub reference: Option<Point>,
    /// The inputs of the merge (drawn as triangles).
    pub policies: Vec<Point>,
    /// Perplexity on a log scale.
    pub log_y: bool,
}

/// Why a plot could not be rasterised.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("the SVG could not be parsed for rasterising: {0}")]
    Svg(String),
    #[error("no fonts found on this system to draw the PNG's text; write an .svg instead")]
    NoFonts,
    #[error("the PNG could not be encoded: {0}")]
    Png(String),
}

pub const WIDTH: f64 = 760.0;
pub const HEIGHT: f64 = 520.0;
const W: f64 = WIDTH;
const H: f64 = HEIGHT;
const RIGHT: f64 = 190.0;
const TOP: f64 = 56.0;
const BOTTOM: f64 = 70.0;
/// Width of one character of the 12 px labels, a little over DejaVu Sans' average (so boxes are safe).
const CHAR_W: f64 = 7.2;
const LABEL_H: f64 = 13.0;

const BLUE: &str = "#1f77b4";
const RED: &str = "#d62728";
const GREEN: &str = "#2ca02c";

/// "Nice" tick positions (steps of 1, 2 or 5 × 10^k) covering [lo, hi].
pub fn ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    let span = (hi - lo).max(f64::EPSILON);
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= target as f64 + 0.5)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() * step;
    let mut v = Vec::new();
    let mut k = 0.0;
    loop {
        // Multiples of the step, rounded to its precision (no 0.6000000000000001).
        let t = round_to(first + k * step, step);
        if t > hi + step * 1e-9 {
            break;
        }
        v.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        k += 1.0;
    }
    v
}

fn round_to(x: f64, step: f64) -> f64 {
    let decimals = (-step.log10().floor()).clamp(0.0, 15.0) as i32 + 1;
    let f = 10f64.powi(decimals);
    (x * f).round() / f
}

/// Ticks of a log axis: 1, 2, 5 × 10^k inside [lo, hi] (only powers of ten when that gives enough), else
/// the linear ticks.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut all = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            let t = m * decade;
            if t >= lo && t <= hi {
                all.push(t);
            }
        }
        decade *= 10.0;
    }
    let powers: Vec<f64> = all
        .iter()
        .copied()
        .filter(|t| (t.log10() - t.log10().round()).abs() < 1e-9)
        .collect();
    if powers.len() >= 3 {
        powers
    } else if all.len() >= 3 {
        all
    } else {
        ticks(lo, hi, 5)
    }
}

/// Formats the ticks of one axis alike and compactly: as many decimals as the step needs (at most 4), then
/// `12k`, `1.5M` for large values and `2e-5` for tiny steps.
fn fmt_ticks(t: &[f64]) -> Vec<String> {
    let step = t
        .windows(2)
        .map(|w| (w[1] - w[0]).abs())
        .fold(f64::INFINITY, f64::min);
    let step = if step.is_finite() && step > 0.0 {
        step
    } else {
        1.0
    };
    let top = t.iter().fold(0f64, |m, v| m.max(v.abs()));
    if top >= 1e4 {
        let (div, unit) = if top >= 1e6 { (1e6, "M") } else { (1e3, "k") };
        let decimals = (-(step / div).log10().floor()).clamp(0.0, 2.0) as usize;
        return t
            .iter()
            .map(|&v| {
                if v == 0.0 {
                    "0".into()
                } else {
                    format!("{:.decimals$}{unit}", v / div)
                }
            })
            .collect();
    }
    if step < 1e-4 {
        return t
            .iter()
            .map(|&v| {
                if v == 0.0 {
                    "0".into()
                } else {
                    let s = format!("{v:.1e}");
                    s.replace(".0e", "e")
                }
            })
            .collect();
    }
    let decimals = (-step.log10().floor()).clamp(0.0, 4.0) as usize;
    t.iter().map(|v| format!("{v:.decimals$}")).collect()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An axis-aligned box in pixels.
#[derive(Debug, Clone, Copy)]
struct Box2 {
    x0: f64,
    y0: f64,
    x1: f64,
    y1: f64,
}

impl Box2 {
    fn around(x: f64, y: f64, r: f64) -> Self {
        Self {
            x0: x - r,
            y0: y - r,
            x1: x + r,
            y1: y + r,
        }
    }

    fn overlap(&self, o: &Box2) -> f64 {
        let w = (self.x1.min(o.x1) - self.x0.max(o.x0)).max(0.0);
        let h = (self.y1.min(o.y1) - self.y0.max(o.y0)).max(0.0);
        w * h
    }

    fn inside(&self, o: &Box2) -> bool {
        self.x0 >= o.x0 && self.x1 <= o.x1 && self.y0 >= o.y0 && self.y1 <= o.y1
    }
}

/// A label to place next to its marker at (x, y).
struct Label<'a> {
    text: &'a str,
    x: f64,
    y: f64,
    color: &'static str,
}

/// A placed label: its text's anchor (start, baseline), its box, and whether a leader line is drawn.
struct Placed {
    tx: f64,
    ty: f64,
    leader: bool,
}

/// Greedy placement: for each label in turn, the first candidate position (8 directions, nearer first,
/// then farther with a leader line) whose box stays inside `frame` and overlaps neither a marker nor a
/// label already placed; if none is free, the one that overlaps least.
fn place_labels(labels: &[Label], markers: &[Box2], frame: Box2) -> Vec<Placed> {
    let mut taken: Vec<Box2> = markers.to_vec();
    let mut out = Vec::with_capacity(labels.len());
    for l in labels {
        let w = l.text.chars().count() as f64 * CHAR_W;
        let h = LABEL_H;
        let mut best: Option<(f64, Box2, Placed)> = None;
        'search: for (ring, d) in [7.0, 16.0, 30.0, 48.0, 70.0].iter().enumerate() {
            // Right, left, above, below, then the diagonals.
            for (dx, dy) in [
                (1.0, 0.0),
                (-1.0, 0.0),
                (0.0, -1.0),
                (0.0, 1.0),
                (1.0, -1.0),
                (-1.0, -1.0),
                (1.0, 1.0),
                (-1.0, 1.0),
            ] {
                let cx = l.x + dx * d;
                let cy = l.y + dy * d;
                let x0 = if dx > 0.0 {
                    cx
                } else if dx < 0.0 {
                    cx - w
                } else {
                    cx - w / 2.0
                };
                let y0 = if dy > 0.0 {
                    cy
                } else if dy < 0.0 {
                    cy - h
                } else {
                    cy - h / 2.0
                };
                let b = Box2 {
                    x0,
                    y0,
                    x1: x0 + w,
                    y1: y0 + h,
                };
                let outside = if b.inside(&frame) { 0.0 } else { 1e6 };
                // A gap of 2 px around each label, so that none touches a marker or another label.
                let padded = Box2 {
                    x0: b.x0 - 2.0,
                    y0: b.y0 - 2.0,
                    x1: b.x1 + 2.0,
                    y1: b.y1 + 2.0,
                };
                let cost = outside
                    + taken.iter().map(|t| padded.overlap(t)).sum::<f64>() * 10.0
                    + ring as f64;
                let placed = Placed {
                    tx: x0,
                    ty: y0 + h - 3.0,
                    leader: ring >= 2,
                };
                if best.as_ref().is_none_or(|(c, _, _)| cost < *c) {
                    best = Some((cost, b, placed));
                }
                if cost < (ring + 1) as f64 {
                    break 'search;
                }
            }
        }
        let (_, b, placed) = best.expect("candidates were tried");
        taken.push(b);
        out.push(placed);
    }
    out
}

impl FrontPlot {
    /// Renders the chart as a standalone SVG document.
    pub fn to_svg(&self) -> String {
        let finite = |p: &&Point| p.x.is_finite() && p.y.is_finite() && (!self.log_y || p.y > 0.0);
        let shown: Vec<&Point> = self
            .front
            .iter()
            .chain(self.reference.iter())
            .chain(self.policies.iter())
            .filter(finite)
            .collect();
        let ty = |y: f64| if self.log_y { y.ln() } else { y };
        let xs: Vec<f64> = shown.iter().map(|p| p.x).collect();
        let ys: Vec<f64> = shown.iter().map(|p| ty(p.y)).collect();
        let (mut x0, mut x1) = bounds(&xs);
        let (mut y0, mut y1) = bounds(&ys);
        x0 = x0.min(0.0);
        // Room around the data for the markers and their labels: 8% of the span on each side, and more on
        // the right, where the last η label goes.
        let pad = |lo: &mut f64, hi: &mut f64, left: f64, right: f64| {
            let span = (*hi - *lo).max(1e-9 * hi.abs().max(1.0));
            *lo -= left * span;
            *hi += right * span;
        };
        pad(&mut x0, &mut x1, 0.08, 0.2);
        pad(&mut y0, &mut y1, 0.1, 0.1);
        let inv = |v: f64| if self.log_y { v.exp() } else { v };
        let yt = if self.log_y {
            log_ticks(inv(y0), inv(y1))
        } else {
            ticks(y0, y1, 6)
        };
        let y_labels = fmt_ticks(&yt);
        let widest = y_labels
            .iter()
            .map(|l| l.chars().count())
            .max()
            .unwrap_or(1) as f64;
        let left = 48.0 + widest * CHAR_W;
        let pw = W - left - RIGHT;
        let ph = H - TOP - BOTTOM;
        let sx = |x: f64| left + (x - x0) / (x1 - x0) * pw;
        let sy = |y: f64| TOP + ph - (ty(y) - y0) / (y1 - y0) * ph;

        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="13">"#
        );
        let _ = writeln!(
            s,
            r#"<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>"#
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="30" text-anchor="middle" font-size="16" font-weight="bold">{}</text>"#,
            W / 2.0,
            esc(&self.title)
        );
        let xt = ticks(x0, x1, 6);
        for (t, label) in xt.iter().zip(fmt_ticks(&xt)) {
            let x = sx(*t);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#e3e3e3"/>"##,
                TOP + ph
            );
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#333"/>"##,
                TOP + ph,
                TOP + ph + 5.0
            );
            let _ = writeln!(
                s,
                r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
                TOP + ph + 20.0
            );
        }
        for (t, label) in yt.iter().zip(&y_labels) {
            let y = sy(*t);
            let _ = writeln!(
                s,
                r##"<line x1="{left:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e3e3e3"/>"##,
                left + pw
            );
            let _ = writeln!(
                s,
                r##"<line x1="{:.1}" y1="{y:.1}" x2="{left:.1}" y2="{y:.1}" stroke="#333"/>"##,
                left - 5.0
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"#,
                left - 8.0,
                y + 4.0
            );
        }
        let _ = writeln!(
            s,
            r##"<rect x="{left:.1}" y="{TOP}" width="{pw:.1}" height="{ph}" fill="none" stroke="#333"/>"##
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            left + pw / 2.0,
            H - 22.0,
            esc(&self.x_label)
        );
        let y_title = if self.log_y {
            format!("{} (log scale)", self.y_label)
        } else {
            self.y_label.clone()
        };
        let _ = writeln!(
            s,
            r#"<text transform="translate(20 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            TOP + ph / 2.0,
            esc(&y_title)
        );

        // Markers first (the reference square, the front, the triangles), then the labels around them.
        let pts: Vec<&Point> = self.front.iter().filter(finite).collect();
        let reference = self.reference.as_ref().filter(finite);
        let policies: Vec<&Point> = self.policies.iter().filter(finite).collect();
        let mut markers: Vec<Box2> = Vec::new();
        let mut labels: Vec<Label> = Vec::new();
        if let Some(r) = reference {
            let (x, y) = (sx(r.x), sy(r.y));
            let _ = writeln!(
                s,
                r##"<rect x="{:.1}" y="{:.1}" width="14" height="14" fill="none" stroke="{GREEN}" stroke-width="2.5"><title>{}</title></rect>"##,
                x - 7.0,
                y - 7.0,
                esc(&r.label)
            );
            markers.push(Box2::around(x, y, 8.0));
            labels.push(Label {
                text: &r.label,
                x,
                y,
                color: GREEN,
            });
        }
        // The inputs under the front, so that η = 1 stays visible on top of them.
        for p in &policies {
            let (x, y) = (sx(p.x), sy(p.y));
            let _ = writeln!(
                s,
                r##"<path d="M {:.1} {:.1} L {:.1} {:.1} L {:.1} {:.1} Z" fill="{RED}" fill-opacity="0.85"><title>{}</title></path>"##,
                x,
                y - 6.0,
                x + 5.5,
                y + 4.0,
                x - 5.5,
                y + 4.0,
                esc(&p.label)
            );
            markers.push(Box2::around(x, y, 6.0));
        }
        if pts.len() > 1 {
            let path: Vec<String> = pts
                .iter()
                .map(|p| format!("{:.1},{:.1}", sx(p.x), sy(p.y)))
                .collect();
            let _ = writeln!(
                s,
                r##"<polyline points="{}" fill="none" stroke="{BLUE}" stroke-width="2"/>"##,
                path.join(" ")
            );
        }
        // The line is an obstacle for labels too: boxes every few pixels along it.
        for w in pts.windows(2) {
            let (ax, ay, bx, by) = (sx(w[0].x), sy(w[0].y), sx(w[1].x), sy(w[1].y));
            let n = ((bx - ax).hypot(by - ay) / 4.0).ceil().max(1.0) as usize;
            for k in 0..=n {
                let f = k as f64 / n as f64;
                markers.push(Box2::around(ax + f * (bx - ax), ay + f * (by - ay), 1.5));
            }
        }
        for p in &pts {
            let (x, y) = (sx(p.x), sy(p.y));
            let _ = writeln!(
                s,
                r##"<circle cx="{x:.1}" cy="{y:.1}" r="4.5" fill="{BLUE}"><title>{}</title></circle>"##,
                esc(&p.label)
            );
            markers.push(Box2::around(x, y, 5.0));
        }
        // Front labels first (they matter most), then the policies'.
        let front_labels: Vec<Label> = pts
            .iter()
            .map(|p| Label {
                text: &p.label,
                x: sx(p.x),
                y: sy(p.y),
                color: BLUE,
            })
            .collect();
        let policy_labels: Vec<Label> = policies
            .iter()
            .map(|p| Label {
                text: &p.label,
                x: sx(p.x),
                y: sy(p.y),
                color: RED,
            })
            .collect();
        let all: Vec<Label> = front_labels
            .into_iter()
            .chain(labels)
            .chain(policy_labels)
            .collect();
        let frame = Box2 {
            x0: left + 2.0,
            y0: TOP + 2.0,
            x1: left + pw - 2.0,
            y1: TOP + ph - 2.0,
        };
        for (l, p) in all.iter().zip(place_labels(&all, &markers, frame)) {
            if p.leader {
                let w = l.text.chars().count() as f64 * CHAR_W;
                let (lx, ly) = (
                    (l.x).clamp(p.tx, p.tx + w),
                    (l.y).clamp(p.ty - LABEL_H + 3.0, p.ty + 3.0),
                );
                let _ = writeln!(
                    s,
                    r##"<line x1="{:.1}" y1="{:.1}" x2="{lx:.1}" y2="{ly:.1}" stroke="{}" stroke-width="0.8" stroke-opacity="0.7"/>"##,
                    l.x, l.y, l.color
                );
            }
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" fill="{}" font-size="12">{}</text>"##,
                p.tx,
                p.ty,
                l.color,
                esc(l.text)
            );
        }

        // Legend.
        let lx = left + pw + 16.0;
        let mut ly = TOP + 8.0;
        let _ = writeln!(
            s,
            r##"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{BLUE}" stroke-width="2"/><circle cx="{}" cy="{ly}" r="4.5" fill="{BLUE}"/>"##,
            lx + 22.0,
            lx + 11.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}">LITI front (η)</text>"#,
            lx + 30.0,
            ly + 4.5
        );
        if self.reference.is_some() {
            ly += 24.0;
            let _ = writeln!(
                s,
                r##"<rect x="{}" y="{}" width="12" height="12" fill="none" stroke="{GREEN}" stroke-width="2.5"/>"##,
                lx + 5.0,
                ly - 6.0
            );
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}">reference</text>"#,
                lx + 30.0,
                ly + 4.5
            );
        }
        if !self.policies.is_empty() {
            ly += 24.0;
            let _ = writeln!(
                s,
                r##"<path d="M {} {} L {} {} L {} {} Z" fill="{RED}"/>"##,
                lx + 11.0,
                ly - 6.0,
                lx + 16.5,
                ly + 4.0,
                lx + 5.5,
                ly + 4.0
            );
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}">merge inputs</text>"#,
                lx + 30.0,
                ly + 4.5
            );
        }
        s.push_str("</svg>\n");
        s
    }

    /// The chart as a PNG (the SVG rasterised by resvg, with the system's fonts), at `WIDTH` × `HEIGHT`.
    pub fn to_png(&self) -> Result<Vec<u8>, PlotError> {
        let mut options = resvg::usvg::Options::default();
        options.fontdb_mut().load_system_fonts();
        if options.fontdb.is_empty() {
            return Err(PlotError::NoFonts);
        }
        let tree = resvg::usvg::Tree::from_str(&self.to_svg(), &options)
            .map_err(|e| PlotError::Svg(e.to_string()))?;
        let mut pixmap = resvg::tiny_skia::Pixmap::new(W as u32, H as u32)
            .expect("the plot has a fixed, non-zero size");
        resvg::render(
            &tree,
            resvg::tiny_skia::Transform::identity(),
            &mut pixmap.as_mut(),
        );
        let png = pixmap
            .encode_png()
            .map_err(|e| PlotError::Png(e.to_string()))?;
        Ok(with_software_chunk(png))
    }
}

/// Inserts a `tEXt` chunk `Software: gemma-merge` after the IHDR chunk (8-byte signature + 25-byte
/// IHDR), so that `--force` can recognise the file as ours.
fn with_software_chunk(png: Vec<u8>) -> Vec<u8> {
    const AFTER_IHDR: usize = 8 + 25;
    if png.len() < AFTER_IHDR {
        return png;
    }
    let data = b"Software\0gemma-merge";
    let mut chunk = Vec::with_capacity(12 + data.len());
    chunk.extend_from_slice(&(data.len() as u32).to_be_bytes());
    chunk.extend_from_slice(b"tEXt");
    chunk.extend_from_slice(data);
    chunk.extend_from_slice(&crc32(&chunk[4..]).to_be_bytes());
    let mut out = png[..AFTER_IHDR].to_vec();
    out.extend_from_slice(&chunk);
    out.extend_from_slice(&png[AFTER_IHDR..]);
    out
}

/// The CRC-32 of PNG chunks (ISO 3309, polynomial 0xEDB88320).
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn bounds(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 1.0);
    }
    let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_numbers_covering_the_range() {
        assert_eq!(ticks(0.0, 1.0, 5), vec![0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        let t = ticks(23.0, 61.0, 6);
        assert_eq!(t, vec![30.0, 40.0, 50.0, 60.0]);
        assert!(ticks(0.0012, 0.0051, 5)
            .iter()
            .all(|v| (v * 1e4).round() % 5.0 == 0.0));
        assert_eq!(
            fmt_ticks(&[0.0, 0.0005, 0.001]),
            vec!["0.0000", "0.0005", "0.0010"]
        );
        assert_eq!(fmt_ticks(&[380.0, 390.0, 400.0]), vec!["380", "390", "400"]);
        // Compact: no 7-digit labels, no 8 decimals.
        assert_eq!(
            fmt_ticks(&[0.0, 500_000.0, 1_000_000.0, 1_500_000.0]),
            vec!["0", "0.5M", "1.0M", "1.5M"]
        );
        assert_eq!(fmt_ticks(&[20_000.0, 40_000.0]), vec!["20k", "40k"]);
        assert_eq!(fmt_ticks(&[0.0, 2e-5, 4e-5]), vec!["0", "2e-5", "4e-5"]);
        assert_eq!(log_ticks(15.0, 160.0), vec![20.0, 50.0, 100.0]);
        assert_eq!(log_ticks(0.5, 2000.0), vec![1.0, 10.0, 100.0, 1000.0]);
    }

    /// Labels keep clear of each other and of the markers, inside the frame, even for points that sit on
    /// top of each other (η = 0 on the reference, η = 1 among the policies).
    #[test]
    fn labels_do_not_overlap() {
        let frame = Box2 {
            x0: 0.0,
            y0: 0.0,
            x1: 500.0,
            y1: 400.0,
        };
        let spots = [
            (100.0, 100.0),
            (100.0, 100.0),
            (300.0, 300.0),
            (303.0, 302.0),
            (305.0, 298.0),
        ];
        let texts = ["η=0.0", "sft (reference)", "η=1.0", "ema_a", "ema_b"];
        let labels: Vec<Label> = spots
            .iter()
            .zip(texts)
            .map(|(&(x, y), text)| Label {
                text,
                x,
                y,
                color: BLUE,
            })
            .collect();
        let markers: Vec<Box2> = spots
            .iter()
            .map(|&(x, y)| Box2::around(x, y, 6.0))
            .collect();
        let placed = place_labels(&labels, &markers, frame);
        let boxes: Vec<Box2> = labels
            .iter()
            .zip(&placed)
            .map(|(l, p)| Box2 {
                x0: p.tx,
                y0: p.ty + 3.0 - LABEL_H,
                x1: p.tx + l.text.chars().count() as f64 * CHAR_W,
                y1: p.ty + 3.0,
            })
            .collect();
        for (i, a) in boxes.iter().enumerate() {
            assert!(a.inside(&frame), "{}", texts[i]);
            for m in &markers {
                assert_eq!(a.overlap(m), 0.0, "{} on a marker", texts[i]);
            }
            for (j, b) in boxes.iter().enumerate().skip(i + 1) {
                assert_eq!(a.overlap(b), 0.0, "{} on {}", texts[i], texts[j]);
            }
        }
    }

    #[test]
    fn svg_has_every_label_and_marker() {
        let plot = FrontPlot {
            title: "LITI front — demo <warp>".into(),
            x_label: "KL(model ‖ sft) [nats/token]".into(),
            y_label: "perplexity".into(),
            front: vec![
                Point {
                    label: "η=0.0".into(),
                    x: 0.0,
                    y: 40.0,
                },
                Point {
                    label: "η=0.5".into(),
                    x: 0.05,
                    y: 30.0,
                },
                Point {
                    label: "η=1.0".into(),
                    x: 0.2,
                    y: 25.0,
                },
            ],
            reference: Some(Point {
                label: "sft (reference)".into(),
                x: 0.0,
                y: 40.0,
            }),
            policies: vec![Point {
                label: "run_a".into(),
                x: 0.3,
                y: 24.0,
            }],
            log_y: false,
        };
        let svg = plot.to_svg();
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        for needle in [
            "η=0.0",
            "η=0.5",
            "η=1.0",
            "sft (reference)",
            "run_a",
            "perplexity",
            "&lt;warp&gt;",
            "<polyline",
        ] {
            assert!(svg.contains(needle), "missing {needle}");
        }
        assert_eq!(
            svg.matches("<circle").count(),
            4,
            "three η points and the legend"
        );
    }
}
