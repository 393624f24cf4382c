//! The `eval` verb: PSNR and SSIM on Y of an SR model over a folder of HR images, by the
//! protocol of `../shared/reference/sr_eval.py` (modcrop, MATLAB bicubic downscale rounded
//! after each pass, model, 8-bit output, MATLAB Y, shave = scale, peak 255). Its PSNR numbers
//! match the reference script's within 0.02 dB.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::bicubic::imresize;
use super::image_io::load_rgb;
use super::metrics::{psnr_y, ssim_y};
use super::session::SessionConfig;
use super::sr::{ModelKind, SrModel, Tiling};

/// Evaluate an SR model on a folder of HR images: PSNR and SSIM on Y.
///
/// Each image is cropped to a multiple of the scale, downscaled with MATLAB-compatible bicubic
/// (rounded to 8 bits after each pass), super-resolved, rounded to 8 bits, and compared with the
/// HR image on the Y channel with `scale` border pixels shaved: the protocol of
/// ../shared/reference/sr_eval.py, whose PSNRs this reproduces.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// The SR model (.onnx).
    pub model: PathBuf,
    /// Folder of HR images (.png, .jpg; sorted by name).
    #[arg(long)]
    pub images: PathBuf,
    /// Upscaling factor.
    #[arg(long)]
    pub scale: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// GhostShift plugin library (default: libghostsr.so next to this executable, in the ghostsr
    /// Python package, then target/release/libghostsr.so); loaded automatically for models in
    /// the ai.ghostsr domain.
    #[arg(long)]
    pub plugin: Option<PathBuf>,
    /// ONNX Runtime intra-op threads (0: one per physical core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Tile size in model-input pixels (0, the default: whole images, as the protocol does;
    /// tiling can change the results of models with global operations).
    #[arg(long, default_value_t = 0)]
    pub tile: usize,
    /// Evaluate only the first N images (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
}

/// Scores of one image.
#[derive(Debug, Clone, Serialize)]
pub struct ImageScore {
    pub image: String,
    pub psnr_y: f64,
    pub ssim_y: f64,
    pub psnr_y_bicubic: f64,
}

/// The result of an evaluation; means are over images.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub model: String,
    pub dataset: String,
    pub kind: ModelKind,
    pub scale: usize,
    pub images: usize,
    pub psnr_y: f64,
    pub ssim_y: f64,
    pub psnr_y_bicubic: f64,
    pub ssim_y_bicubic: f64,
    pub seconds: f64,
    pub per_image: Vec<ImageScore>,
}

/// The image files of `dir` that the protocol evaluates (.png, .bmp, .jpg), sorted.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = entry.with_context(|| format!("listing {}", dir.display()))?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("").to_ascii_lowercase();
        if [".png", ".bmp", ".jpg"].iter().any(|e| name.ends_with(e)) {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        bail!("no .png/.bmp/.jpg images in {}", dir.display());
    }
    Ok(files)
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    s / n.max(1) as f64
}

/// Evaluates `model` on the images in `images` at `scale` (see [`EvalArgs`]); `on_image` is
/// called after each image.
pub fn evaluate(
    model: &Path,
    images: &Path,
    scale: usize,
    cfg: &SessionConfig,
    tiling: Tiling,
    limit: usize,
    mut on_image: impl FnMut(&ImageScore),
) -> Result<EvalReport> {
    if scale < 2 {
        bail!("--scale must be at least 2");
    }
    let mut files = image_files(images)?;
    if limit > 0 {
        files.truncate(limit);
    }
    let mut sr_model = SrModel::open(model, cfg)?;
    let t0 = std::time::Instant::now();
    let mut per_image = Vec::new();
    let mut ssim_bic = Vec::new();
    for f in &files {
        let hr = load_rgb(f)?;
        let hr = hr.crop_top_left(hr.height - hr.height % scale, hr.width - hr.width % scale);
        let lr = imresize(&hr, 1.0 / scale as f64);
        let bic = imresize(&lr, scale as f64);
        let sr = sr_model
            .super_resolve(&lr, scale, Some(&bic), tiling)
            .with_context(|| format!("super-resolving {}", f.display()))?;
        if (sr.height, sr.width) != (hr.height, hr.width) {
            bail!("{}: SR is {}x{} but HR is {}x{}", f.display(), sr.height, sr.width, hr.height, hr.width);
        }
        let score = ImageScore {
            image: f.file_name().unwrap_or_default().to_string_lossy().into_owned(),
            psnr_y: psnr_y(&sr, &hr, scale)?,
            ssim_y: ssim_y(&sr, &hr, scale)?,
            psnr_y_bicubic: psnr_y(&bic, &hr, scale)?,
        };
        ssim_bic.push(ssim_y(&bic, &hr, scale)?);
        on_image(&score);
        per_image.push(score);
    }
    let name = |p: &Path| p.file_name().unwrap_or(p.as_os_str()).to_string_lossy().into_owned();
    Ok(EvalReport {
        model: name(model),
        dataset: name(images),
        kind: sr_model.kind(),
        scale,
        images: per_image.len(),
        psnr_y: mean(per_image.iter().map(|s| s.psnr_y)),
        ssim_y: mean(per_image.iter().map(|s| s.ssim_y)),
        psnr_y_bicubic: mean(per_image.iter().map(|s| s.psnr_y_bicubic)),
        ssim_y_bicubic: mean(ssim_bic.into_iter()),
        seconds: t0.elapsed().as_secs_f64(),
        per_image,
    })
}

/// Runs the `eval` verb.
pub fn run(args: EvalArgs) -> Result<()> {
    let cfg = SessionConfig { threads: args.threads, plugin: args.plugin.clone(), ..Default::default() };
    let tiling = Tiling { tile: args.tile, overlap: 16 };
    let json = args.json;
    let report = evaluate(&args.model, &args.images, args.scale, &cfg, tiling, args.limit, |s| {
        if !json {
            println!(
                "{:<24} PSNR {:7.3} dB  SSIM {:.4}  (bicubic {:7.3} dB)",
                s.image, s.psnr_y, s.ssim_y, s.psnr_y_bicubic
            );
        }
    })?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} on {} x{} ({} images, {:.1} s): PSNR-Y {:.3} dB, SSIM-Y {:.4} (bicubic {:.3} dB, {:.4})",
            report.model,
            report.dataset,
            report.scale,
            report.images,
            report.seconds,
            report.psnr_y,
            report.ssim_y,
            report.psnr_y_bicubic,
            report.ssim_y_bicubic
        );
    }
    Ok(())
}
