//! The `ghostsr` command line: flags, help texts, progress and summaries.
//!
//! Each verb parses its flags into the library's option types and calls the pipeline (model I/O
//! -> analysis -> plan -> emit); nothing here walks a graph. Errors are returned with context and
//! printed once by `main`, with the whole cause chain.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::calib::budget::{Budget, BudgetReport};
use crate::calib::{self, CalibOptions};
use crate::emit::{self, EmitMode};
use crate::graph::GraphIndex;
use crate::graph::analysis::{self, Policy};
use crate::model::{self, WriteOptions};
use crate::plan::Plan;
use crate::plan::kmeans::{self, PlanOptions};
use crate::report::{self, thousands};
use crate::weights::WeightSet;

const ABOUT: &str = "Make pretrained ONNX super-resolution models cheaper with ghost features (GhostSR).";
const LONG_ABOUT: &str = "\
Make pretrained ONNX super-resolution models cheaper with ghost features (GhostSR).

In a pretrained SR network many Conv output channels are near copies of others, shifted by a
pixel. ghostsr clusters each eligible Conv's filters (k-means), keeps the filter nearest each
centroid (intrinsic) and replaces the others by shifted copies of intrinsic outputs (ghosts):
the Conv becomes a smaller Conv + GhostShift + Concat, and the rest of the network stays exact.

Typical use:
  ghostsr inspect model.onnx                      what would be ghosted, and why not
  ghostsr convert model.onnx -o model.ghost.onnx  plan and rewrite (needs the plugin to run)
  ghostsr convert model.onnx -o g.onnx --emit standard   standard ONNX ops only
  ghostsr plan model.onnx -o plan.json            write the plan (for a trainer, or to edit)
  ghostsr convert model.onnx --plan plan.json -o model.ghost.onnx
  ghostsr plan model.onnx -o plan.json --export-weights w.safetensors   weights for a trainer
  ghostsr convert model.onnx --plan tuned.json --weights tuned.safetensors -o model.ghost.onnx
  ghostsr convert model.onnx -o g.onnx --calib BSD68/   ghosts chosen from calibration data
      (much better quality without training; needs ORT_DYLIB_PATH)
  ghostsr eval model.ghost.onnx --images Set5/ --scale 2       PSNR/SSIM (needs ORT_DYLIB_PATH)
  ghostsr bench model.onnx model.ghost.onnx --size 128x128     latency ratio
  ghostsr sweep model.onnx --images Set5/ --scale 2 --calib BSD68/ --plot sweep.svg

Running models needs ONNX Runtime 1.31.1: set ORT_DYLIB_PATH to libonnxruntime.so.1.31.1
(pip install onnxruntime==1.31.1; it is in site-packages/onnxruntime/capi/). Ghost models in
plugin form load target/release/libghostsr.so automatically (--plugin PATH overrides).";

#[derive(Parser, Debug)]
#[command(name = "ghostsr", version, about = ABOUT, long_about = LONG_ABOUT)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List operators, parameters, multiply-adds, and every Conv with why it is or is not eligible.
    Inspect(InspectArgs),
    /// Plan the ghosts (k-means on filters) and write the plan as JSON.
    Plan(PlanArgs),
    /// Rewrite a model into its ghost form, from a plan file or planning on the fly.
    Convert(ConvertArgs),
    /// Generate a synthetic SR network (EDSR, EDSR-baseline, RDN-, RCAN-style) with deterministic
    /// weights, for fixtures, tests and benchmarks.
    Generate(crate::generate::GenerateArgs),
    /// Upscale an image (PNG/JPEG) with an SR model, original or ghost, in ONNX Runtime.
    Upscale(crate::runner::upscale::UpscaleArgs),
    /// PSNR/SSIM on Y of a model over a folder of HR images (the reference protocol).
    Eval(crate::runner::eval::EvalArgs),
    /// Time an original and a ghost model in one process, interleaved, and report the ratio.
    Bench(crate::runner::bench::BenchArgs),
    /// PSNR against multiply-adds for several ratios, paper selection and (with --calib)
    /// calibrated: a table, JSON, and an SVG plot.
    Sweep(SweepArgs),
}

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

/// Which Convs are candidates.
#[derive(Args, Debug, Clone)]
pub struct PolicyArgs {
    /// Also ghost 1x1 Convs (by default only 3x3 Convs are).
    #[arg(long)]
    pub allow_1x1: bool,
    /// Fewest filters a Conv needs to be ghosted by default.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub min_channels: usize,
    /// Ghost this Conv (node name or output tensor name) even if the default policy keeps it
    /// (first/last Conv, upsampler input, kernel size, channel count). Repeatable.
    #[arg(long, value_name = "NAME")]
    pub include: Vec<String>,
    /// Never ghost this Conv (node name or output tensor name). Repeatable.
    #[arg(long, value_name = "NAME")]
    pub exclude: Vec<String>,
}

impl PolicyArgs {
    fn policy(&self) -> Policy {
        Policy {
            allow_1x1: self.allow_1x1,
            min_channels: self.min_channels,
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
    /// Largest shift in pixels, per axis, a ghost may use.
    #[arg(long, value_name = "PX", value_parser = clap::value_parser!(i64).range(0..=8))]
    pub max_shift: Option<i64>,
    /// Lloyd iterations of k-means per layer, after a k-means++ start (default 5; more costs
    /// conversion time and changes little).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub kmeans_iterations: Option<u64>,
}

impl PlanningArgs {
    fn options(&self) -> PlanOptions {
        let d = PlanOptions::default();
        PlanOptions {
            ratio: self.ratio.unwrap_or(d.ratio),
            seed: self.seed.unwrap_or(d.seed),
            max_shift: self.max_shift.unwrap_or(d.max_shift),
            max_iterations: self.kmeans_iterations.unwrap_or(d.max_iterations),
            ..d
        }
    }

    fn any_set(&self) -> bool {
        self.ratio.is_some()
            || self.seed.is_some()
            || self.max_shift.is_some()
            || self.kmeans_iterations.is_some()
    }
}

/// Calibration: choose ghosts from data (needs ORT_DYLIB_PATH).
#[derive(Args, Debug, Clone)]
pub struct CalibArgs {
    /// Calibrate on crops of the HR images in DIR: run the original model (ONNX Runtime, CPU)
    /// and, Conv by Conv on the partly ghosted network, choose intrinsic channels, sources,
    /// shifts and affine terms by least error against the original's feature maps, then refit
    /// the kept filters (ridge least squares). Without it, ghosts come from k-means on filters.
    #[arg(long, value_name = "DIR")]
    pub calib: Option<PathBuf>,
    /// Number of calibration crops.
    #[arg(long, value_name = "N", default_value_t = 16, requires = "calib")]
    pub calib_count: usize,
    /// Calibration crop size in model-input pixels.
    #[arg(long, value_name = "S", default_value_t = 64, requires = "calib")]
    pub calib_size: usize,
    /// Calibration: draw N random windows per crop and keep the most detailed (the most energy
    /// in HR minus bicubic-upscaled LR, i.e. what the network has to add); 1: random crops.
    #[arg(long, value_name = "N", default_value_t = CalibOptions::default().candidates, requires = "calib")]
    pub calib_candidates: usize,
    /// Calibration: ghosts are plain shifted copies (no fitted scale and bias).
    #[arg(long, requires = "calib")]
    pub no_affine: bool,
    /// Calibration: fit every layer on the original network's features instead of the partly
    /// ghosted network's.
    #[arg(long, requires = "calib")]
    pub no_layer_by_layer: bool,
    /// Calibration: keep k-means's intrinsic channels instead of choosing them from the data.
    #[arg(long, requires = "calib")]
    pub no_data_intrinsic: bool,
    /// Calibration: do not refit the kept filters.
    #[arg(long, requires = "calib")]
    pub no_refit: bool,
    /// Calibration: refit only the ghosted Convs' kept filters, not the 1x1 Convs that stay.
    #[arg(long, requires = "calib")]
    pub no_refit_others: bool,
    /// Calibration: relative ridge strength of the refit.
    #[arg(long, value_name = "R", default_value_t = 3e-2, requires = "calib")]
    pub calib_ridge: f32,
    /// Calibration: input patches sampled per layer for the refit.
    #[arg(long, value_name = "N", default_value_t = 32768, requires = "calib")]
    pub calib_samples: usize,
    /// Calibration: ONNX Runtime threads (0: one per physical core).
    #[arg(long, value_name = "N", default_value_t = 0, requires = "calib")]
    pub calib_threads: usize,
}

impl CalibArgs {
    fn options(&self) -> CalibOptions {
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
            ..CalibOptions::default()
        }
    }
}

/// Quality budget: λ chosen per layer (needs --calib).
#[derive(Args, Debug, Clone)]
pub struct BudgetArgs {
    /// Choose λ per layer so that PSNR-Y on the calibration crops drops at most D dB against
    /// the original model, ghosting as much as that allows: a sensitivity pass ghosts each layer
    /// alone at λ = 0.25, 0.5 and 0.75, then a few layer-by-layer calibrations bracket the
    /// budget. Prints each layer's choice. Needs --calib; replaces --ratio.
    #[arg(long, value_name = "D", requires = "calib", conflicts_with_all = ["ratio", "target_macs"],
          value_parser = parse_positive)]
    pub max_psnr_drop: Option<f64>,
    /// Choose λ per layer so that the Conv multiply-adds are at most F times the original's, at
    /// the least quality loss the sensitivity pass predicts. Needs --calib; replaces --ratio.
    #[arg(long, value_name = "F", requires = "calib", conflicts_with = "ratio", value_parser = parse_fraction)]
    pub target_macs: Option<f64>,
}

impl BudgetArgs {
    fn budget(&self) -> Option<Budget> {
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

fn parse_ratio(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if (0.0..1.0).contains(&v) { Ok(v) } else { Err(format!("{v} is outside [0, 1)")) }
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The ONNX model.
    pub model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// The original ONNX model.
    pub model: PathBuf,
    /// Where to write the plan (JSON).
    #[arg(short, long, value_name = "PLAN")]
    pub output: PathBuf,
    /// Also write the current weights and biases of every planned Conv to this path
    /// (safetensors, keyed by the original initializer names, original shapes, F32): what a
    /// trainer fine-tunes and `convert --weights` applies.
    #[arg(long, value_name = "PATH")]
    pub export_weights: Option<PathBuf>,
    /// Replace output files that exist.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub planning: PlanningArgs,
    #[command(flatten)]
    pub calib: CalibArgs,
    #[command(flatten)]
    pub budget: BudgetArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// The original ONNX model.
    pub model: PathBuf,
    /// Where to write the ghost model.
    #[arg(short, long, value_name = "OUT")]
    pub output: PathBuf,
    /// Apply this plan instead of planning (see `ghostsr plan`).
    #[arg(long, value_name = "PLAN")]
    pub plan: Option<PathBuf>,
    /// Replace initializers of the model with these (fine-tuned) values before analysing,
    /// planning and rewriting: a safetensors file keyed by the original initializer names, in
    /// the original shapes (see `plan --export-weights`). Every name, shape and value is checked.
    #[arg(long, value_name = "PATH")]
    pub weights: Option<PathBuf>,
    /// How to compute ghosts: `plugin` uses ai.ghostsr::GhostShift (load libghostsr.so in ONNX
    /// Runtime); `standard` and `conv` use standard ONNX ops only (`conv`: Convs only, fastest
    /// on ONNX Runtime's CPU provider).
    #[arg(long, value_enum, default_value_t = EmitMode::Plugin)]
    pub emit: EmitMode,
    /// Also write the plan that was applied to this path.
    #[arg(long, value_name = "PLAN")]
    pub save_plan: Option<PathBuf>,
    /// Replace output files that exist.
    #[arg(long)]
    pub force: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub planning: PlanningArgs,
    #[command(flatten)]
    pub calib: CalibArgs,
    #[command(flatten)]
    pub budget: BudgetArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

/// Parses the command line and runs the verb.
pub fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Inspect(a) => inspect(&a),
        Command::Plan(a) => plan(&a),
        Command::Convert(a) => convert(&a),
        Command::Generate(a) => crate::generate::run(&a),
        Command::Upscale(a) => crate::runner::upscale::run(a),
        Command::Eval(a) => crate::runner::eval::run(a),
        Command::Bench(a) => crate::runner::bench::run(a),
        Command::Sweep(a) => sweep(&a),
    }
}

fn inspect(a: &InspectArgs) -> Result<()> {
    let m = model::load(&a.model)?;
    let index = GraphIndex::new(m.graph()).with_context(|| format!("in {}", a.model.display()))?;
    let analysis = analysis::analyze(&index, &a.policy.policy())?;
    let report = report::inspect(&a.model.display().to_string(), &m.proto, &index, &analysis);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report::render(&report));
        if report.convs_eligible == 0 {
            println!("  no Conv is eligible: see the reasons above (--include NAME overrides the policy)");
        }
    }
    Ok(())
}

/// Progress of a multi-stage job on stderr: a rewriting counter on a terminal, a few lines per
/// stage otherwise.
fn staged_progress() -> impl Fn(&str, usize, usize) + Sync {
    let tty = std::io::stderr().is_terminal();
    move |stage, done, total| {
        if tty {
            eprint!("\r{stage}: {done}/{total}   ");
            if done == total {
                eprintln!();
            }
        } else if done == total || (total >= 8 && (done * 4 / total != (done - 1) * 4 / total)) {
            eprintln!("{stage}: {done}/{total}");
        }
    }
}

/// Progress on stderr: a rewriting counter on a terminal, a few lines otherwise.
fn progress(label: &'static str) -> impl Fn(usize, usize, &str) + Sync {
    let tty = std::io::stderr().is_terminal();
    move |done, total, _layer| {
        if tty {
            eprint!("\r{label}: {done}/{total} layers");
            if done == total {
                eprintln!();
            }
        } else if total >= 8 && (done * 4 / total != (done - 1) * 4 / total) {
            eprintln!("{label}: {done}/{total} layers");
        }
    }
}

fn sweep(a: &SweepArgs) -> Result<()> {
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

/// A plan (and calibration's refit weights, and the budget's report) as the flags ask.
fn make_plan(
    m: &model::Model,
    index: &GraphIndex<'_>,
    analysis: &analysis::Analysis,
    p: &PlanningArgs,
    c: &CalibArgs,
    b: &BudgetArgs,
) -> Result<(Plan, Option<WeightSet>, Option<BudgetReport>)> {
    if analysis.eligible().next().is_none() {
        bail!(
            "{}: no Conv is eligible for ghosting; run `ghostsr inspect {}` to see why each is skipped (--include NAME overrides the policy)",
            m.path.display(),
            m.path.display()
        );
    }
    let what = |dir: &Path| format!("calibrating {} on {}", m.path.display(), dir.display());
    match (&c.calib, b.budget()) {
        (Some(dir), Some(budget)) => {
            let (plan, weights, report) = calib::budget::calibrate_to_budget(
                m,
                index,
                analysis,
                &p.options(),
                &c.options(),
                dir,
                budget,
                &staged_progress(),
            )
            .with_context(|| what(dir))?;
            eprint!("{}", calib::budget::render(&report));
            Ok((plan, Some(weights), Some(report)))
        }
        (Some(dir), None) => {
            let (plan, weights) = calib::calibrate(
                m,
                index,
                analysis,
                &p.options(),
                &c.options(),
                dir,
                &progress("calibrating"),
            )
            .with_context(|| what(dir))?;
            Ok((plan, Some(weights), None))
        }
        (None, Some(_)) => bail!("--max-psnr-drop and --target-macs need --calib DIR"),
        (None, None) => Ok((
            kmeans::plan_model(index, analysis, &m.sha256, &p.options(), &progress("planning"))?,
            None,
            None,
        )),
    }
}

fn plan(a: &PlanArgs) -> Result<()> {
    let protect = [a.model.as_path()];
    let opts = WriteOptions { protect: &protect, force: a.force };
    model::check_output_path(&a.output, opts)?;
    if let Some(w) = &a.export_weights {
        model::check_output_path(w, opts)?;
        if w == &a.output {
            bail!("--export-weights and -o name the same file");
        }
    }
    let m = model::load(&a.model)?;
    let index = GraphIndex::new(m.graph()).with_context(|| format!("in {}", a.model.display()))?;
    let analysis = analysis::analyze(&index, &a.policy.policy())?;
    let (plan, refit, _) = make_plan(&m, &index, &analysis, &a.planning, &a.calib, &a.budget)?;
    let refit = refit.filter(|w| !w.tensors.is_empty());
    let exported = match &a.export_weights {
        Some(_) => {
            // The planned Convs' weights as the model has them, with calibration's refit values
            // (which may also cover Convs that stay) on top: `convert --plan --weights` then
            // reproduces the calibrated model.
            let mut set = WeightSet::export(&m.proto, &plan)
                .with_context(|| format!("exporting the weights of {}", a.model.display()))?;
            if let Some(r) = &refit {
                set.tensors.extend(r.tensors.clone());
            }
            Some(set)
        }
        None => {
            if refit.is_some() {
                eprintln!(
                    "ghostsr: note: calibration also refit weights; a plan file alone does not carry them \
                     (add --export-weights PATH, use `convert --calib` for the refit model, or --no-refit)"
                );
            }
            None
        }
    };
    model::write_atomic(&a.output, plan.to_json().as_bytes(), opts)?;
    if let (Some(w), Some(set)) = (&a.export_weights, &exported) {
        model::write_atomic(w, &set.to_bytes(&WeightSet::metadata(&m.sha256)), opts)?;
        eprintln!("ghostsr: exported {} tensors of the planned Convs -> {}", set.tensors.len(), w.display());
    }
    let ghosts: usize = plan.layers.iter().map(|l| l.ghosts.len()).sum();
    let total: usize = plan.layers.iter().map(|l| l.out_channels).sum();
    eprintln!(
        "ghostsr: planned {} Convs ({ghosts} of {total} channels become ghosts) -> {}",
        plan.layers.len(),
        a.output.display()
    );
    Ok(())
}

/// The numbers `convert` prints.
#[derive(serde::Serialize)]
struct ConvertSummary {
    input: String,
    output: String,
    emit: EmitMode,
    convs_ghosted: usize,
    convs_total: usize,
    params_before: u64,
    params_after: u64,
    macs_per_pixel_before: f64,
    macs_per_pixel_after: f64,
    reorders: Vec<(String, String)>,
    absorbed: usize,
    seconds: Timings,
    /// With --max-psnr-drop or --target-macs: each layer's λ and the measured result.
    #[serde(skip_serializing_if = "Option::is_none")]
    budget: Option<BudgetReport>,
}

#[derive(serde::Serialize, Default)]
struct Timings {
    load: f64,
    analyse: f64,
    plan: f64,
    emit: f64,
    save: f64,
    total: f64,
}

fn convert(a: &ConvertArgs) -> Result<()> {
    let t0 = Instant::now();
    let mut t = Timings::default();
    if a.plan.is_some() && a.calib.calib.is_some() {
        bail!("--plan applies a plan file as it is; --calib only applies when ghostsr plans");
    }
    if a.plan.is_some() && a.planning.any_set() {
        bail!(
            "--plan applies a plan file as it is; --ratio, --seed, --max-shift and --kmeans-iterations only apply when ghostsr plans"
        );
    }
    let mut protect: Vec<&Path> = vec![a.model.as_path()];
    if let Some(p) = &a.plan {
        protect.push(p.as_path());
    }
    if let Some(w) = &a.weights {
        protect.push(w.as_path());
    }
    let opts = WriteOptions { protect: &protect, force: a.force };
    model::check_output_path(&a.output, opts)?;
    if let Some(p) = &a.save_plan {
        model::check_output_path(p, opts)?;
        if p == &a.output {
            bail!("--save-plan and -o name the same file");
        }
    }
    let mut lap = Instant::now();
    let mut tick = |slot: &mut f64| {
        *slot = lap.elapsed().as_secs_f64();
        lap = Instant::now();
    };
    let mut m = model::load(&a.model)?;
    if let Some(w) = &a.weights {
        apply_weights(&mut m, w)?;
    }
    tick(&mut t.load);
    let index = GraphIndex::new(m.graph()).with_context(|| format!("in {}", a.model.display()))?;
    let analysis = analysis::analyze(&index, &a.policy.policy())?;
    tick(&mut t.analyse);
    let (plan, weights, budget) = match &a.plan {
        Some(p) => {
            let plan = Plan::read(p)?;
            plan.validate(&analysis)
                .with_context(|| format!("plan {} does not fit {}", p.display(), a.model.display()))?;
            (plan, None, None)
        }
        None => make_plan(&m, &index, &analysis, &a.planning, &a.calib, &a.budget)?,
    };
    tick(&mut t.plan);
    // Refit weights from calibration replace the original initializers before the rewrite.
    let source = match &weights {
        Some(w) if !w.tensors.is_empty() => std::borrow::Cow::Owned(calib::apply_weights(&m.proto, w)?),
        _ => std::borrow::Cow::Borrowed(&m.proto),
    };
    let (out, emitted) = emit::emit(&source, &analysis, &plan, a.emit)
        .with_context(|| format!("rewriting {}", a.model.display()))?;
    tick(&mut t.emit);
    let bytes = model::encode(&out);
    model::write_atomic(&a.output, &bytes, opts)?;
    if let Some(p) = &a.save_plan {
        model::write_atomic(p, plan.to_json().as_bytes(), opts)?;
    }
    tick(&mut t.save);
    t.total = t0.elapsed().as_secs_f64();

    let before = report::inspect("", &m.proto, &index, &analysis);
    let out_index = GraphIndex::new(out.graph.as_ref().context("no graph")?)?;
    let out_analysis = analysis::analyze(&out_index, &Policy::default())?;
    let after = report::inspect("", &out, &out_index, &out_analysis);
    let summary = ConvertSummary {
        input: a.model.display().to_string(),
        output: a.output.display().to_string(),
        emit: a.emit,
        convs_ghosted: emitted.layers_rewritten,
        convs_total: analysis.convs.len(),
        params_before: before.params,
        params_after: after.params,
        macs_per_pixel_before: before.macs_per_pixel,
        macs_per_pixel_after: after.macs_per_pixel,
        reorders: emitted.reorders,
        absorbed: emitted.absorbed,
        seconds: t,
        budget,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary);
    }
    Ok(())
}

/// Reads, validates and applies a weights file to the loaded model (before anything reads it).
fn apply_weights(m: &mut model::Model, path: &Path) -> Result<()> {
    let (set, meta) = WeightSet::read_with_metadata(path)?;
    if let Some(sha) = meta.get("model_sha256").filter(|s| !s.is_empty() && **s != m.sha256) {
        eprintln!(
            "ghostsr: warning: {} was exported from a model with sha256 {sha}, not {} ({}); applying it by tensor names",
            path.display(),
            m.path.display(),
            m.sha256
        );
    }
    let n = set
        .apply(&mut m.proto)
        .with_context(|| format!("weights file {} does not fit {}", path.display(), m.path.display()))?;
    eprintln!("ghostsr: applied {n} tensors from {}", path.display());
    Ok(())
}

fn print_summary(s: &ConvertSummary) {
    let ratio = |a: f64, b: f64| if a > 0.0 { b / a } else { 1.0 };
    println!("ghostsr: {} -> {} ({:?} form)", s.input, s.output, s.emit);
    println!("  Convs ghosted:  {} of {}", s.convs_ghosted, s.convs_total);
    println!(
        "  params:         {} -> {} ({:.2}x)",
        thousands(s.params_before),
        thousands(s.params_after),
        ratio(s.params_before as f64, s.params_after as f64)
    );
    println!(
        "  MACs/pixel:     {} -> {} ({:.2}x)",
        thousands(s.macs_per_pixel_before.round() as u64),
        thousands(s.macs_per_pixel_after.round() as u64),
        ratio(s.macs_per_pixel_before, s.macs_per_pixel_after)
    );
    let mut why: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for (_, reason) in &s.reorders {
        *why.entry(reason.as_str()).or_default() += 1;
    }
    println!(
        "  channel order:  absorbed into {} consumers, {} Gather(s) inserted",
        s.absorbed,
        s.reorders.len()
    );
    for (reason, n) in why {
        println!("                  {n} x {reason}");
    }
    let t = &s.seconds;
    println!(
        "  time:           {:.2} s (load {:.2}, analyse {:.2}, plan {:.2}, emit {:.2}, save {:.2})",
        t.total, t.load, t.analyse, t.plan, t.emit, t.save
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ghostsr").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_parse_and_bad_values_are_refused() {
        let Command::Convert(c) =
            parse(&["convert", "m.onnx", "-o", "g.onnx", "--ratio", "0.25", "--emit", "standard"])
                .unwrap()
                .command
        else {
            panic!("not convert")
        };
        assert_eq!(c.planning.ratio, Some(0.25));
        assert_eq!(c.emit, EmitMode::Standard);
        assert_eq!(c.planning.options().max_shift, 1, "default max shift");
        for bad in [
            &["convert", "m.onnx", "-o", "g.onnx", "--ratio", "1.0"][..],
            &["convert", "m.onnx", "-o", "g.onnx", "--ratio", "-0.1"],
            &["convert", "m.onnx", "-o", "g.onnx", "--max-shift", "9"],
            &["convert", "m.onnx", "-o", "g.onnx", "--emit", "other"],
            &["convert", "m.onnx"],
            &["plan", "m.onnx"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be refused");
        }
        let Command::Plan(p) =
            parse(&["plan", "m.onnx", "-o", "p.json", "--include", "a", "--include", "b", "--allow-1x1"])
                .unwrap()
                .command
        else {
            panic!("not plan")
        };
        assert_eq!(p.policy.include, vec!["a", "b"]);
        assert!(p.policy.policy().allow_1x1);
    }

    #[test]
    fn budget_flags_need_calibration_and_exclude_ratio_and_each_other() {
        let base = ["convert", "m.onnx", "-o", "g.onnx", "--calib", "dir"];
        let with =
            |extra: &[&'static str]| -> Vec<&'static str> { base.iter().chain(extra).copied().collect() };
        let Command::Convert(c) = parse(&with(&["--max-psnr-drop", "0.3"])).unwrap().command else {
            panic!("not convert")
        };
        assert_eq!(c.budget.budget(), Some(Budget::MaxPsnrDrop(0.3)));
        let Command::Plan(p) =
            parse(&["plan", "m.onnx", "-o", "p.json", "--calib", "d", "--target-macs", "0.6"])
                .unwrap()
                .command
        else {
            panic!("not plan")
        };
        assert_eq!(p.budget.budget(), Some(Budget::TargetMacs(0.6)));
        for bad in [
            vec!["convert", "m.onnx", "-o", "g.onnx", "--max-psnr-drop", "0.3"],
            vec!["convert", "m.onnx", "-o", "g.onnx", "--target-macs", "0.5"],
            with(&["--max-psnr-drop", "0.3", "--target-macs", "0.5"]),
            with(&["--max-psnr-drop", "0.3", "--ratio", "0.5"]),
            with(&["--target-macs", "0.5", "--ratio", "0.5"]),
            with(&["--target-macs", "1.0"]),
            with(&["--target-macs", "0"]),
            with(&["--max-psnr-drop", "-1"]),
            with(&["--max-psnr-drop", "nan"]),
        ] {
            assert!(parse(&bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn a_plan_file_and_planning_flags_exclude_each_other() {
        let Command::Convert(c) =
            parse(&["convert", "m.onnx", "-o", "g.onnx", "--plan", "p.json", "--ratio", "0.3"])
                .unwrap()
                .command
        else {
            panic!("not convert")
        };
        let err = convert(&c).unwrap_err().to_string();
        assert!(err.contains("--plan applies a plan file as it is"), "{err}");
    }
}
