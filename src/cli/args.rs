//! Flag groups that several verbs share: which Convs are candidates ([`PolicyArgs`]), how the
//! planner chooses ghosts ([`PlanningArgs`]), calibration ([`CalibArgs`]) and the quality budget
//! ([`BudgetArgs`]), each with its conversion into the library's option type.

use std::path::PathBuf;

use clap::Args;

use crate::calib::CalibOptions;
use crate::calib::budget::Budget;
use crate::calib::data::ImageSource;
use crate::emit::qdq::RangeRule;
use crate::graph::analysis::Policy;
use crate::plan::kmeans::PlanOptions;

/// Which Convs are candidates.
#[derive(Args, Debug, Clone)]
pub struct PolicyArgs {
    /// Also ghost 1x1 Convs (by default only 3x3 Convs are).
    #[arg(long)]
    pub allow_1x1: bool,
    /// Fewest filters a Conv needs to be ghosted by default [default: 16; with --int8 or
    /// --target cpu-int8, enough that the reduced Conv keeps 16 filters: 32 at λ=0.5].
    #[arg(long, value_name = "N")]
    pub min_channels: Option<usize>,
    /// Ghost this Conv (node name or output tensor name) even if the default policy keeps it
    /// (first/last Conv, upsampler input, kernel size, channel count). Repeatable.
    #[arg(long, value_name = "NAME")]
    pub include: Vec<String>,
    /// Never ghost this Conv (node name or output tensor name). Repeatable.
    #[arg(long, value_name = "NAME")]
    pub exclude: Vec<String>,
}

impl PolicyArgs {
    pub fn policy(&self) -> Policy {
        Policy {
            allow_1x1: self.allow_1x1,
            min_channels: self.min_channels.unwrap_or(Policy::default().min_channels),
            include: self.include.clone(),
            exclude: self.exclude.clone(),
        }
    }
}

/// How the planner chooses ghosts.
#[derive(Args, Debug, Clone)]
pub struct PlanningArgs {
    /// Fraction λ of each layer's filters that become ghosts (0 keeps every filter).
    #[arg(long, value_name = "λ", value_parser = parse_ratio)]
    pub ratio: Option<f64>,
    /// Seed for k-means (plans are deterministic for a given seed).
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// Largest shift in pixels, per axis, a ghost may use [default: 1; 0 with --int8 or
    /// --target cpu-int8, where an unshifted ghost costs one 1x1 Conv and a shift a depthwise
    /// Conv more].
    #[arg(long, value_name = "PX", value_parser = clap::value_parser!(i64).range(0..=8))]
    pub max_shift: Option<i64>,
    /// Lloyd iterations of k-means per layer, after a k-means++ start (default 5; more costs
    /// conversion time and changes little).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub kmeans_iterations: Option<u64>,
}

impl PlanningArgs {
    pub fn options(&self) -> PlanOptions {
        let d = PlanOptions::default();
        PlanOptions {
            ratio: self.ratio.unwrap_or(d.ratio),
            seed: self.seed.unwrap_or(d.seed),
            max_shift: self.max_shift.unwrap_or(d.max_shift),
            max_iterations: self.kmeans_iterations.unwrap_or(d.max_iterations),
            ..d
        }
    }

    pub fn any_set(&self) -> bool {
        self.ratio.is_some()
            || self.seed.is_some()
            || self.max_shift.is_some()
            || self.kmeans_iterations.is_some()
    }
}

/// Calibration: choose ghosts from data (needs ONNX Runtime).
#[derive(Args, Debug, Clone)]
pub struct CalibArgs {
    /// Calibrate on crops of the HR images in DIR: run the original model (ONNX Runtime, CPU)
    /// and, Conv by Conv on the partly ghosted network, choose intrinsic channels, sources,
    /// shifts and affine terms by least error against the original's feature maps, then refit
    /// the kept filters (ridge least squares). `convert` without it calibrates on a small
    /// built-in set of natural images (six public-domain/CC0 photographs compiled into the
    /// binary); `plan` without it uses k-means on filters.
    #[arg(long, value_name = "DIR", conflicts_with = "kmeans")]
    pub calib: Option<PathBuf>,
    /// Choose ghosts by k-means on filter weights and shift by filter distance (the paper's
    /// training-free selection) instead of calibrating. It needs no images and takes seconds,
    /// but destroys pretrained SR networks: IMDN x2 at λ=0.5 falls from 38.0 to 15.4 dB on Set5
    /// (calibrated: about 37.3). `convert` still measures and prints the damage.
    #[arg(long)]
    pub kmeans: bool,
    /// Number of calibration crops.
    #[arg(long, value_name = "N", default_value_t = 16, conflicts_with = "kmeans")]
    pub calib_count: usize,
    /// Calibration crop size in model-input pixels.
    #[arg(long, value_name = "S", default_value_t = 64, conflicts_with = "kmeans")]
    pub calib_size: usize,
    /// Calibration: draw N random windows per crop and keep the most detailed (the most energy
    /// in HR minus bicubic-upscaled LR, i.e. what the network has to add); 1: random crops.
    #[arg(long, value_name = "N", default_value_t = CalibOptions::default().candidates, conflicts_with = "kmeans")]
    pub calib_candidates: usize,
    /// Calibration: ghosts are plain shifted copies (no fitted scale and bias).
    #[arg(long, conflicts_with = "kmeans")]
    pub no_affine: bool,
    /// Calibration: fit every layer on the original network's features instead of the partly
    /// ghosted network's.
    #[arg(long, conflicts_with = "kmeans")]
    pub no_layer_by_layer: bool,
    /// Calibration: keep k-means's intrinsic channels instead of choosing them from the data.
    #[arg(long, conflicts_with = "kmeans")]
    pub no_data_intrinsic: bool,
    /// Calibration: do not refit the kept filters.
    #[arg(long, conflicts_with = "kmeans")]
    pub no_refit: bool,
    /// Calibration: refit only the ghosted Convs' kept filters, not the 1x1 Convs that stay.
    #[arg(long, conflicts_with = "kmeans")]
    pub no_refit_others: bool,
    /// Calibration: relative ridge strength of the refit.
    #[arg(long, value_name = "R", default_value_t = 3e-2, conflicts_with = "kmeans")]
    pub calib_ridge: f32,
    /// Calibration: input patches sampled per layer for the refit, per view of the crops
    /// (`--calib-augment`).
    #[arg(long, value_name = "N", default_value_t = 32768, conflicts_with = "kmeans")]
    pub calib_samples: usize,
    /// Calibration: undo a ghosted layer whose own damage to the network output, on validation
    /// crops the fits never saw, exceeds the output error of this fidelity (PSNR-Y dB of the
    /// output against the original's; 47 ≈ 0.5 dB of PSNR lost by that layer alone); 0: off.
    #[arg(long, value_name = "DB", default_value_t = CalibOptions::default().guard_db, conflicts_with = "kmeans")]
    pub calib_guard_db: f64,
    /// Calibration: fit on this many views (1-8) of each crop, its flips and rotations: more
    /// equations from the same images, at that many times the fits' time and memory.
    #[arg(long, value_name = "V", default_value_t = CalibOptions::default().augment as u8, value_parser = clap::value_parser!(u8).range(1..=8),
          conflicts_with = "kmeans")]
    pub calib_augment: u8,
    /// Calibration: fit each ghosted Conv on every view and on the first view of each crop
    /// only, and keep the fit the guard measures better (about 1.5x the calibration time).
    #[arg(long, conflicts_with = "kmeans")]
    pub calib_view_choice: bool,
    /// Calibration: ghosts are scaled copies `a x` with `a >= 0` and no bias, the ghosts that
    /// `--emit fold` absorbs into the Convs reading them (on by default with `--emit fold`).
    #[arg(long, conflicts_with_all = ["kmeans", "no_affine"])]
    pub calib_scale_only: bool,
    /// Calibration: ONNX Runtime threads (0: one per physical core).
    #[arg(long, value_name = "N", default_value_t = 0, conflicts_with = "kmeans")]
    pub calib_threads: usize,
}

impl CalibArgs {
    /// The calibration images: `--calib DIR`, else (with `builtin_by_default`, and not
    /// `--kmeans`) the built-in set, else none (k-means).
    pub fn source(&self, builtin_by_default: bool) -> Option<ImageSource> {
        match &self.calib {
            Some(d) => Some(ImageSource::Dir(d.clone())),
            None if builtin_by_default && !self.kmeans => Some(ImageSource::Builtin),
            None => None,
        }
    }

    pub fn options(&self) -> CalibOptions {
        CalibOptions {
            count: self.calib_count,
            size: self.calib_size,
            candidates: self.calib_candidates,
            affine: !self.no_affine,
            layer_by_layer: !self.no_layer_by_layer,
            data_intrinsic: !self.no_data_intrinsic,
            refit: !self.no_refit,
            refit_others: !self.no_refit_others,
            ridge: self.calib_ridge,
            threads: self.calib_threads,
            samples: self.calib_samples,
            guard_db: self.calib_guard_db,
            augment: usize::from(self.calib_augment),
            view_choice: self.calib_view_choice,
            scale_only: self.calib_scale_only,
            ..CalibOptions::default()
        }
    }
}

/// Quality budget: λ chosen per layer (calibrates: on --calib DIR, or in `convert` on the
/// built-in set).
#[derive(Args, Debug, Clone)]
pub struct BudgetArgs {
    /// Choose λ per layer so that PSNR-Y on the calibration crops drops at most D dB against
    /// the original model, ghosting as much as that allows: a sensitivity pass ghosts each layer
    /// alone at λ = 0.25, 0.5 and 0.75, then a few layer-by-layer calibrations bracket the
    /// budget. Prints each layer's choice. Calibrates; replaces --ratio.
    #[arg(long, value_name = "D", conflicts_with_all = ["ratio", "target_macs", "kmeans"],
          value_parser = parse_positive)]
    pub max_psnr_drop: Option<f64>,
    /// Choose λ per layer so that the Conv multiply-adds are at most F times the original's, at
    /// the least quality loss the sensitivity pass predicts. Calibrates; replaces --ratio.
    #[arg(long, value_name = "F", conflicts_with_all = ["ratio", "kmeans"], value_parser = parse_fraction)]
    pub target_macs: Option<f64>,
}

impl BudgetArgs {
    pub fn budget(&self) -> Option<Budget> {
        self.max_psnr_drop.map(Budget::MaxPsnrDrop).or(self.target_macs.map(Budget::TargetMacs))
    }
}

fn parse_positive(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if v > 0.0 && v.is_finite() { Ok(v) } else { Err(format!("{v} is not a positive number")) }
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if v > 0.0 && v < 1.0 { Ok(v) } else { Err(format!("{v} is outside (0, 1)")) }
}

pub fn parse_ratio(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if (0.0..1.0).contains(&v) { Ok(v) } else { Err(format!("{v} is outside [0, 1)")) }
}

/// int8 output (ONNX Runtime CPU provider).
#[derive(Args, Debug, Clone)]
pub struct Int8Args {
    /// Write a statically quantized int8 model (QDQ: uint8 activations, int8 per-channel
    /// weights, int32 biases), activation ranges from the calibration crops (the built-in
    /// images unless --calib names a folder).
    /// Ghost stages use the Convs-only form (it replaces the default `--emit plugin`; `--emit
    /// standard` is kept; `--emit fused` is refused: GhostShift has no int8 kernel). `--ratio 0`
    /// quantizes the original network.
    #[arg(long)]
    pub int8: bool,
    /// How --int8 picks each activation's range from its calibration values.
    #[arg(long, value_enum, default_value_t = RangeRule::Percentile, value_name = "RULE")]
    pub int8_ranges: RangeRule,
}
