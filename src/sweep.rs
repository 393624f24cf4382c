//! The sweep report: quality against cost for several ratios and planning methods.
//!
//! For each ratio λ and each method (the paper's k-means selection, and calibration when a
//! calibration folder is given) the model is planned, emitted, evaluated with the reference
//! PSNR protocol ([`crate::runner::eval`]) and its multiply-adds counted ([`crate::report`]).
//! Quality is measured on the standard form and cost on the plugin form (GhostShift costs no
//! multiply-adds; the two compute the same function). The result renders as a text table and as
//! an SVG plot of PSNR against MACs, one line per method.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::calib::{self, CalibOptions};
use crate::emit::{self, EmitMode};
use crate::graph::GraphIndex;
use crate::graph::analysis::{self, Policy};
use crate::model::{self, Model};
use crate::onnx::ModelProto;
use crate::plan::kmeans::{self, PlanOptions};
use crate::report;
use crate::runner::eval;
use crate::runner::session::SessionConfig;
use crate::runner::sr::Tiling;

/// What to sweep.
pub struct SweepOptions {
    pub ratios: Vec<f64>,
    pub plan: PlanOptions,
    pub policy: Policy,
    /// Calibration folder and settings; without it only the paper's selection is swept.
    pub calib: Option<(PathBuf, CalibOptions)>,
    pub images: PathBuf,
    pub scale: usize,
    pub session: SessionConfig,
    /// Evaluate at most this many images (0: all).
    pub limit: usize,
}

/// One planned and measured model.
#[derive(Clone, Debug, Serialize)]
pub struct SweepPoint {
    pub method: String,
    pub ratio: f64,
    pub macs_per_pixel: f64,
    pub psnr_y: f64,
    pub ssim_y: f64,
    /// Planning (and calibration) time.
    pub plan_seconds: f64,
}

/// The whole sweep.
#[derive(Clone, Debug, Serialize)]
pub struct SweepReport {
    pub model: String,
    pub images: String,
    pub scale: usize,
    pub original_macs_per_pixel: f64,
    pub original_psnr_y: f64,
    pub original_ssim_y: f64,
    pub points: Vec<SweepPoint>,
}

fn macs_per_pixel(proto: &ModelProto) -> Result<f64> {
    let index = GraphIndex::new(proto.graph.as_ref().context("no graph")?)?;
    let analysis = analysis::analyze(&index, &Policy::default())?;
    Ok(report::inspect("", proto, &index, &analysis).macs_per_pixel)
}

fn evaluate(proto: &ModelProto, path: &Path, opts: &SweepOptions) -> Result<eval::EvalReport> {
    std::fs::write(path, model::encode(proto)).with_context(|| format!("writing {}", path.display()))?;
    eval::evaluate(path, &opts.images, opts.scale, &opts.session, Tiling::NONE, opts.limit, |_| {})
}

/// Runs the sweep; `progress` gets a line per finished point.
pub fn sweep(m: &Model, opts: &SweepOptions, progress: &dyn Fn(&str)) -> Result<SweepReport> {
    let dir = tempfile_dir()?;
    let index = GraphIndex::new(m.graph())?;
    let analysis = analysis::analyze(&index, &opts.policy)?;
    let original = evaluate(&m.proto, &dir.join("original.onnx"), opts)?;
    let mut report = SweepReport {
        model: m.path.display().to_string(),
        images: opts.images.display().to_string(),
        scale: opts.scale,
        original_macs_per_pixel: macs_per_pixel(&m.proto)?,
        original_psnr_y: original.psnr_y,
        original_ssim_y: original.ssim_y,
        points: vec![],
    };
    let mut methods = vec!["paper"];
    if opts.calib.is_some() {
        methods.push("calibrated");
    }
    for method in methods {
        for &ratio in &opts.ratios {
            let t = Instant::now();
            let plan_opts = PlanOptions { ratio, ..opts.plan.clone() };
            let (plan, weights) = match (&opts.calib, method) {
                (Some((dir, c)), "calibrated") => {
                    let (plan, w) =
                        calib::calibrate(m, &index, &analysis, &plan_opts, c, dir, &|_, _, _| {})?;
                    (plan, Some(w))
                }
                _ => (kmeans::plan_model(&index, &analysis, &m.sha256, &plan_opts, &|_, _, _| {})?, None),
            };
            let plan_seconds = t.elapsed().as_secs_f64();
            let source = match &weights {
                Some(w) if !w.tensors.is_empty() => calib::apply_weights(&m.proto, w)?,
                _ => m.proto.clone(),
            };
            let (standard, _) = emit::emit(&source, &analysis, &plan, EmitMode::Standard)?;
            let (plugin, _) = emit::emit(&source, &analysis, &plan, EmitMode::Plugin)?;
            let scores = evaluate(&standard, &dir.join(format!("{method}_{ratio}.onnx")), opts)?;
            let point = SweepPoint {
                method: method.to_string(),
                ratio,
                macs_per_pixel: macs_per_pixel(&plugin)?,
                psnr_y: scores.psnr_y,
                ssim_y: scores.ssim_y,
                plan_seconds,
            };
            progress(&format!(
                "{method:<10} λ={ratio:<5} MACs/px {:>10.0}  PSNR-Y {:.3} dB  ({:.1} s)",
                point.macs_per_pixel, point.psnr_y, plan_seconds
            ));
            report.points.push(point);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("ghostsr-sweep-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// The table `ghostsr sweep` prints.
pub fn render_table(r: &SweepReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "{} on {} x{}", r.model, r.images, r.scale);
    let _ = writeln!(
        s,
        "{:<11} {:>6} {:>12} {:>7} {:>9} {:>8} {:>8}",
        "method", "λ", "MACs/px", "MACs", "PSNR-Y", "ΔPSNR", "plan s"
    );
    let _ = writeln!(
        s,
        "{:<11} {:>6} {:>12.0} {:>7.2} {:>9.3} {:>8.3} {:>8}",
        "original", "0", r.original_macs_per_pixel, 1.0, r.original_psnr_y, 0.0, "-"
    );
    for p in &r.points {
        let _ = writeln!(
            s,
            "{:<11} {:>6} {:>12.0} {:>7.2} {:>9.3} {:>8.3} {:>8.1}",
            p.method,
            p.ratio,
            p.macs_per_pixel,
            p.macs_per_pixel / r.original_macs_per_pixel,
            p.psnr_y,
            p.psnr_y - r.original_psnr_y,
            p.plan_seconds
        );
    }
    s
}

/// An SVG plot of PSNR-Y against relative MACs: one polyline per method, the original as a
/// point.
pub fn render_svg(r: &SweepReport) -> String {
    use std::fmt::Write;
    let (w, h, left, right, top, bottom) = (640.0, 420.0, 70.0, 20.0, 40.0, 50.0);
    let rel = |p: &SweepPoint| p.macs_per_pixel / r.original_macs_per_pixel;
    let xs: Vec<f64> = r.points.iter().map(rel).chain([1.0]).collect();
    let ys: Vec<f64> = r.points.iter().map(|p| p.psnr_y).chain([r.original_psnr_y]).collect();
    let (x0, x1) = (0.0f64.min(xs.iter().cloned().fold(1.0, f64::min) - 0.05), 1.05);
    let (mut y0, mut y1) =
        (ys.iter().cloned().fold(f64::MAX, f64::min), ys.iter().cloned().fold(f64::MIN, f64::max));
    if y1 - y0 < 1.0 {
        y0 -= 0.5;
        y1 += 0.5;
    }
    let (y0, y1) = (y0.floor(), y1.ceil());
    let px = |x: f64| left + (x - x0) / (x1 - x0) * (w - left - right);
    let py = |y: f64| h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let title = Path::new(&r.model).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="22" font-size="14">{title}: PSNR-Y vs multiply-adds (x{}, {})</text>"#,
        r.scale,
        xml(&r.images)
    );
    let _ = writeln!(
        s,
        r#"<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#,
        h - bottom,
        w - right,
        h - bottom
    );
    let _ = writeln!(s, r#"<line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="black"/>"#, h - bottom);
    for k in 0..=5 {
        let x = x0 + (x1 - x0) * k as f64 / 5.0;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{x:.2}</text>"#,
            px(x),
            h - bottom + 18.0
        );
        let y = y0 + (y1 - y0) * k as f64 / 5.0;
        let _ =
            writeln!(s, r#"<text x="{}" y="{:.1}" text-anchor="end">{y:.1}</text>"#, left - 6.0, py(y) + 4.0);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{:.1}" x2="{}" y2="{:.1}" stroke="#ddd"/>"##,
            py(y),
            w - right,
            py(y)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">MACs relative to the original</text>"#,
        (left + w - right) / 2.0,
        h - 12.0
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">PSNR-Y (dB)</text>"#,
        (top + h - bottom) / 2.0,
        (top + h - bottom) / 2.0
    );
    let colours = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"];
    let mut methods: Vec<&str> = r.points.iter().map(|p| p.method.as_str()).collect();
    methods.dedup();
    for (k, method) in methods.iter().enumerate() {
        let colour = colours[k % colours.len()];
        let mut pts: Vec<&SweepPoint> = r.points.iter().filter(|p| p.method == *method).collect();
        pts.sort_by(|a, b| rel(a).total_cmp(&rel(b)));
        let line: Vec<String> =
            pts.iter().map(|p| format!("{:.1},{:.1}", px(rel(p)), py(p.psnr_y))).collect();
        let _ = writeln!(
            s,
            r#"<polyline class="method" data-method="{method}" points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
            line.join(" ")
        );
        for p in &pts {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{colour}"><title>{method} λ={} {:.3} dB</title></circle>"#,
                px(rel(p)),
                py(p.psnr_y),
                p.ratio,
                p.psnr_y
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" fill="{colour}">{method}</text>"#,
            w - right - 120.0,
            top + 16.0 * (k as f64 + 1.0)
        );
    }
    let _ = writeln!(
        s,
        r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="black"><title>original {:.3} dB</title></circle>"#,
        px(1.0),
        py(r.original_psnr_y),
        r.original_psnr_y
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="end">original</text>"#,
        px(1.0) - 6.0,
        py(r.original_psnr_y) - 6.0
    );
    s.push_str("</svg>\n");
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
