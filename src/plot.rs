//! A small, dependency-free SVG scatter/line chart for the LITI front: KL to the reference on x,
//! perplexity on y, one labelled point per η joined by a line, plus separate markers for the reference
//! and for each policy that was merged.

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
    /// The merged policies (drawn as triangles).
    pub policies: Vec<Point>,
}

const W: f64 = 760.0;
const H: f64 = 520.0;
const LEFT: f64 = 84.0;
const RIGHT: f64 = 190.0;
const TOP: f64 = 56.0;
const BOTTOM: f64 = 70.0;

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
    let mut t = first;
    while t <= hi + step * 1e-9 {
        v.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        t += step;
    }
    v
}

/// Formats the ticks of one axis with the same number of decimals, enough to tell them apart.
fn fmt_ticks(t: &[f64]) -> Vec<String> {
    let step = if t.len() > 1 {
        (t[1] - t[0]).abs()
    } else {
        1.0
    };
    let decimals = (-step.log10().floor()).clamp(0.0, 12.0) as usize;
    t.iter().map(|v| format!("{v:.decimals$}")).collect()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

impl FrontPlot {
    /// Renders the chart as a standalone SVG document.
    pub fn to_svg(&self) -> String {
        let all: Vec<&Point> = self
            .front
            .iter()
            .chain(self.reference.iter())
            .chain(self.policies.iter())
            .collect();
        let shown: Vec<&Point> = all
            .into_iter()
            .filter(|p| p.x.is_finite() && p.y.is_finite())
            .collect();
        let xs: Vec<f64> = shown.iter().map(|p| p.x).collect();
        let ys: Vec<f64> = shown.iter().map(|p| p.y).collect();
        let (mut x0, mut x1) = bounds(&xs);
        let (mut y0, mut y1) = bounds(&ys);
        x0 = x0.min(0.0);
        let pad = |lo: &mut f64, hi: &mut f64| {
            let span = (*hi - *lo).max(1e-9 * hi.abs().max(1.0));
            *lo -= 0.06 * span;
            *hi += 0.06 * span;
        };
        pad(&mut x0, &mut x1);
        pad(&mut y0, &mut y1);
        if x0 < 0.0 && xs.iter().all(|&x| x >= 0.0) {
            x0 = 0.0;
        }
        let pw = W - LEFT - RIGHT;
        let ph = H - TOP - BOTTOM;
        let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
        let sy = |y: f64| TOP + ph - (y - y0) / (y1 - y0) * ph;

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
            r#"<text x="{}" y="30" text-anchor="middle" font-size="17" font-weight="bold">{}</text>"#,
            LEFT + pw / 2.0,
            esc(&self.title)
        );
        // Grid and ticks.
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
                r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                TOP + ph + 20.0,
                label
            );
        }
        let yt = ticks(y0, y1, 6);
        for (t, label) in yt.iter().zip(fmt_ticks(&yt)) {
            let y = sy(*t);
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e3e3e3"/>"##,
                LEFT + pw
            );
            let _ = writeln!(
                s,
                r##"<line x1="{:.1}" y1="{y:.1}" x2="{LEFT}" y2="{y:.1}" stroke="#333"/>"##,
                LEFT - 5.0
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                LEFT - 8.0,
                y + 4.0,
                label
            );
        }
        let _ = writeln!(
            s,
            r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            LEFT + pw / 2.0,
            H - 22.0,
            esc(&self.x_label)
        );
        let _ = writeln!(
            s,
            r#"<text transform="translate(22 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            TOP + ph / 2.0,
            esc(&self.y_label)
        );

        // The front: a line through the η points, each labelled.
        let pts: Vec<&Point> = self
            .front
            .iter()
            .filter(|p| p.x.is_finite() && p.y.is_finite())
            .collect();
        if pts.len() > 1 {
            let path: Vec<String> = pts
                .iter()
                .map(|p| format!("{:.1},{:.1}", sx(p.x), sy(p.y)))
                .collect();
            let _ = writeln!(
                s,
                r##"<polyline points="{}" fill="none" stroke="#1f77b4" stroke-width="2"/>"##,
                path.join(" ")
            );
        }
        for p in &pts {
            let (x, y) = (sx(p.x), sy(p.y));
            let _ = writeln!(
                s,
                r##"<circle cx="{x:.1}" cy="{y:.1}" r="4.5" fill="#1f77b4"><title>{}</title></circle>"##,
                esc(&p.label)
            );
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" fill="#1f77b4" font-size="12">{}</text>"##,
                x + 7.0,
                y - 7.0,
                esc(&p.label)
            );
        }
        if let Some(r) = self
            .reference
            .as_ref()
            .filter(|p| p.x.is_finite() && p.y.is_finite())
        {
            let (x, y) = (sx(r.x), sy(r.y));
            let _ = writeln!(
                s,
                r##"<rect x="{:.1}" y="{:.1}" width="10" height="10" fill="none" stroke="#2ca02c" stroke-width="2.5"><title>{}</title></rect>"##,
                x - 5.0,
                y - 5.0,
                esc(&r.label)
            );
        }
        // Policies often sit close together: stack their labels so they do not overprint.
        for (i, p) in self
            .policies
            .iter()
            .filter(|p| p.x.is_finite() && p.y.is_finite())
            .enumerate()
        {
            let (x, y) = (sx(p.x), sy(p.y));
            let label_y = y + 13.0 + 14.0 * i as f64;
            let _ = writeln!(
                s,
                r##"<path d="M {:.1} {:.1} L {:.1} {:.1} L {:.1} {:.1} Z" fill="#d62728"><title>{}</title></path>"##,
                x,
                y - 6.0,
                x + 5.5,
                y + 4.0,
                x - 5.5,
                y + 4.0,
                esc(&p.label)
            );
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" fill="#d62728" font-size="12">{}</text>"##,
                x + 7.0,
                label_y,
                esc(&p.label)
            );
        }
        // Legend.
        let lx = LEFT + pw + 16.0;
        let mut ly = TOP + 8.0;
        let _ = writeln!(
            s,
            r##"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="#1f77b4" stroke-width="2"/><circle cx="{}" cy="{ly}" r="4.5" fill="#1f77b4"/>"##,
            lx + 22.0,
            lx + 11.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}">LITI front (η)</text>"#,
            lx + 30.0,
            ly + 4.5
        );
        if let Some(r) = &self.reference {
            ly += 24.0;
            let _ = writeln!(
                s,
                r##"<rect x="{}" y="{}" width="10" height="10" fill="none" stroke="#2ca02c" stroke-width="2.5"/>"##,
                lx + 6.0,
                ly - 5.0
            );
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}">{}</text>"#,
                lx + 30.0,
                ly + 4.5,
                esc(&r.label)
            );
        }
        if !self.policies.is_empty() {
            ly += 24.0;
            let _ = writeln!(
                s,
                r##"<path d="M {} {} L {} {} L {} {} Z" fill="#d62728"/>"##,
                lx + 11.0,
                ly - 6.0,
                lx + 16.5,
                ly + 4.0,
                lx + 5.5,
                ly + 4.0
            );
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}">merged policies</text>"#,
                lx + 30.0,
                ly + 4.5
            );
        }
        s.push_str("</svg>\n");
        s
    }
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
        assert_eq!(
            ticks(0.0, 1.0, 5),
            vec![0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]
        );
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
