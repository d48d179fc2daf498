//! Charts as plain SVG (no plotting dependency): latency percentile curves
//! (x: 1/(1-percentile) on a log scale, as HdrHistogram plots them) and, for
//! sweeps, bandwidth against message size.

use std::fmt::Write;

const W: f64 = 760.0;
const H: f64 = 420.0;
const L: f64 = 80.0;
const R: f64 = 160.0;
const T: f64 = 30.0;
const B: f64 = 50.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// A series: its label and (x, y) points.
pub type Series = (String, Vec<(f64, f64)>);

fn frame(out: &mut String, title: &str, xlabel: &str, ylabel: &str) {
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="18" text-anchor="middle" font-size="14">{title}</text>"#,
        W / 2.0
    );
    let _ = writeln!(
        out,
        r#"<rect x="{L}" y="{T}" width="{}" height="{}" fill="none" stroke="black"/>"#,
        W - L - R,
        H - T - B
    );
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">{xlabel}</text>"#,
        L + (W - L - R) / 2.0,
        H - 10.0
    );
    let _ = writeln!(
        out,
        r#"<text x="14" y="{}" text-anchor="middle" transform="rotate(-90 14 {})">{ylabel}</text>"#,
        T + (H - T - B) / 2.0,
        T + (H - T - B) / 2.0
    );
}

/// Draws series with log10 x and linear y (from 0).
fn chart(
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[Series],
    xticks: &[(f64, String)],
) -> String {
    let mut out = String::new();
    frame(&mut out, title, xlabel, ylabel);
    let pts = series.iter().flat_map(|s| s.1.iter());
    let (mut xmin, mut xmax, mut ymax) = (f64::INFINITY, f64::NEG_INFINITY, 0f64);
    for &(x, y) in pts {
        xmin = xmin.min(x.log10());
        xmax = xmax.max(x.log10());
        ymax = ymax.max(y);
    }
    if !xmin.is_finite() || xmax <= xmin {
        xmax = xmin + 1.0;
    }
    let ymax = if ymax > 0.0 { ymax * 1.05 } else { 1.0 };
    let px = |x: f64| L + (x.log10() - xmin) / (xmax - xmin) * (W - L - R);
    let py = |y: f64| H - B - y / ymax * (H - T - B);
    for (x, label) in xticks {
        if x.log10() >= xmin - 1e-9 && x.log10() <= xmax + 1e-9 {
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{label}</text>"#,
                px(*x),
                H - B + 16.0
            );
        }
    }
    for k in 0..=4 {
        let y = ymax * k as f64 / 4.0;
        let label = if ymax >= 100.0 {
            format!("{y:.0}")
        } else {
            format!("{y:.3}")
        };
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{label}</text>"#,
            L - 5.0,
            py(y) + 4.0,
        );
        let _ = writeln!(
            out,
            r##"<line x1="{L}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#ddd"/>"##,
            W - R,
            py(y),
            py(y)
        );
    }
    for (i, (label, s)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = s
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            path.join(" ")
        );
        let ly = T + 16.0 + 18.0 * i as f64;
        let _ = writeln!(
            out,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="3"/>"#,
            W - R + 10.0,
            W - R + 30.0
        );
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}">{label}</text>"#,
            W - R + 35.0,
            ly + 4.0
        );
    }
    out.push_str("</svg>\n");
    out
}

/// Latency percentile curves up to p99.9: series of (percentile in [0,1], µs).
pub fn latency(series: &[Series]) -> String {
    let mapped: Vec<Series> = series
        .iter()
        .map(|(l, pts)| {
            (
                l.clone(),
                pts.iter()
                    // Up to p99.9: beyond it, preemptions of a spinning
                    // side (milliseconds) would flatten every curve.
                    .filter(|p| p.0 <= 0.999)
                    .map(|&(q, v)| (1.0 / (1.0 - q), v))
                    .collect(),
            )
        })
        .collect();
    let ticks: Vec<(f64, String)> = [
        (1.0, "0%"),
        (2.0, "50%"),
        (10.0, "90%"),
        (100.0, "99%"),
        (1000.0, "99.9%"),
        (10000.0, "99.99%"),
    ]
    .iter()
    .map(|(x, l)| (*x, l.to_string()))
    .collect();
    chart(
        "sanbench latency by percentile",
        "percentile",
        "latency (us)",
        &mapped,
        &ticks,
    )
}

/// Bandwidth against message size: series of (bytes, MB/s).
pub fn bandwidth(series: &[Series]) -> String {
    let ticks: Vec<(f64, String)> = (1..=23)
        .step_by(2)
        .map(|k| {
            let n = 1u64 << k;
            let l = if n >= 1 << 20 {
                format!("{}M", n >> 20)
            } else if n >= 1 << 10 {
                format!("{}K", n >> 10)
            } else {
                format!("{n}")
            };
            (n as f64, l)
        })
        .collect();
    chart(
        "sanbench bandwidth by message size",
        "message size (bytes)",
        "MB/s",
        series,
        &ticks,
    )
}
