//! `ghostsr sweep`: PSNR against multiply-adds for several ratios, paper selection and (with
//! --calib) calibrated.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use super::args::{CalibArgs, PlanningArgs, PolicyArgs, parse_ratio};
use crate::model::{self, WriteOptions};

#[derive(Args, Debug)]
pub struct SweepArgs {
    /// The original ONNX model.
    pub model: PathBuf,
    /// Folder of HR evaluation images (e.g. ../shared/images/Set5); never the calibration set.
    #[arg(long, value_name = "DIR")]
    pub images: PathBuf,
    /// Upscaling factor of the evaluation.
    #[arg(long, value_name = "S")]
    pub scale: usize,
    /// Ratios λ to sweep, comma-separated.
    #[arg(long, value_name = "λ,..", value_delimiter = ',', default_value = "0.25,0.5,0.75", value_parser = parse_ratio)]
    pub ratios: Vec<f64>,
    /// Write the PSNR-vs-MACs plot here (SVG).
    #[arg(long, value_name = "SVG")]
    pub plot: Option<PathBuf>,
    /// Replace the plot file if it exists.
    #[arg(long)]
    pub force: bool,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Evaluate at most N images (0: all).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub limit: usize,
    /// ONNX Runtime intra-op threads (0: one per physical core).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub threads: usize,
    #[command(flatten)]
    pub planning: PlanningArgs,
    #[command(flatten)]
    pub calib: CalibArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

pub fn run(a: &SweepArgs) -> Result<()> {
    if a.planning.ratio.is_some() {
        bail!("sweep takes --ratios (a list), not --ratio");
    }
    let protect = [a.model.as_path()];
    let opts = WriteOptions { protect: &protect, force: a.force };
    if let Some(p) = &a.plot {
        model::check_output_path(p, opts)?;
    }
    let m = model::load(&a.model)?;
    let sweep_opts = crate::sweep::SweepOptions {
        ratios: a.ratios.clone(),
        plan: a.planning.options(),
        policy: a.policy.policy(),
        calib: a.calib.calib.clone().map(|dir| (dir, a.calib.options())),
        images: a.images.clone(),
        scale: a.scale,
        session: crate::runner::session::SessionConfig { threads: a.threads, ..Default::default() },
        limit: a.limit,
    };
    let report = crate::sweep::sweep(&m, &sweep_opts, &|line| eprintln!("sweep: {line}"))?;
    if let Some(p) = &a.plot {
        model::write_atomic(p, crate::sweep::render_svg(&report).as_bytes(), opts)?;
        eprintln!("ghostsr: plot -> {}", p.display());
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", crate::sweep::render_table(&report));
    }
    Ok(())
}
