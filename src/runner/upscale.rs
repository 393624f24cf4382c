//! The `upscale` verb: super-resolve one image file with an ONNX SR model.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use super::image_io::{load_rgb, save_rgb};
use super::session::SessionConfig;
use super::sr::{SrModel, Tiling};

/// Upscale one image with an SR model.
///
/// Reads a PNG or JPEG, runs the model (in overlapping tiles for large images) with the same
/// pre- and post-processing as `eval`, and writes PNG or JPEG by the output's extension.
#[derive(Debug, Clone, clap::Args)]
pub struct UpscaleArgs {
    /// The SR model (.onnx); RGB and Y-channel (VDSR- and FSRCNN-style) models are recognised.
    pub model: PathBuf,
    /// Input image (the low-resolution image).
    pub input: PathBuf,
    /// Output image (.png, .jpg or .jpeg).
    pub output: PathBuf,
    /// Upscaling factor; needed only for models that take a bicubic-upscaled input (VDSR-like),
    /// otherwise it must match the model's own factor.
    #[arg(long)]
    pub scale: Option<usize>,
    /// GhostShift plugin library (default: libghostsr.so next to this executable, in the ghostsr
    /// Python package, then target/release/libghostsr.so); loaded automatically for models in
    /// the ai.ghostsr domain.
    #[arg(long)]
    pub plugin: Option<PathBuf>,
    /// ONNX Runtime intra-op threads (0: one per physical core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Tile size in model-input pixels for large images (0: whole image in one run).
    #[arg(long, default_value_t = 256)]
    pub tile: usize,
    /// Context pixels added on every side of each tile and cut away afterwards.
    #[arg(long, default_value_t = 16)]
    pub overlap: usize,
    /// Overwrite the output if it exists.
    #[arg(long)]
    pub force: bool,
}

/// Runs the `upscale` verb.
pub fn run(args: UpscaleArgs) -> Result<()> {
    if args.output.exists() && !args.force {
        bail!("{} exists; pass --force to overwrite it", args.output.display());
    }
    let cfg = SessionConfig { threads: args.threads, plugin: args.plugin.clone(), ..Default::default() };
    let mut model = SrModel::open(&args.model, &cfg)?;
    let kind = model.kind();
    let scale = match (args.scale, kind.pre_upsampled()) {
        (Some(s), _) => s,
        (None, false) => kind.factor,
        (None, true) => bail!("{} takes a bicubic-upscaled input; pass --scale", args.model.display()),
    };
    if scale == 0 {
        bail!("--scale must be at least 1");
    }
    let lr = load_rgb(&args.input)?;
    let t0 = std::time::Instant::now();
    let sr = model
        .super_resolve(&lr, scale, None, Tiling { tile: args.tile, overlap: args.overlap })
        .with_context(|| format!("upscaling {}", args.input.display()))?;
    save_rgb(&args.output, &sr)?;
    eprintln!(
        "{} ({}x{}) -> {} ({}x{}) in {:.2} s",
        args.input.display(),
        lr.width,
        lr.height,
        args.output.display(),
        sr.width,
        sr.height,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
