//! `ghostsr convert`: rewrite a model into its ghost form, from a plan file or planning on the
//! fly, apply fine-tuned weights, and print what changed.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;

use super::args::{BudgetArgs, CalibArgs, Int8Args, PlanningArgs, PolicyArgs};
use super::plan::make_plan;
use crate::calib;
use crate::calib::CalibReport;
use crate::calib::budget::BudgetReport;
use crate::calib::data::ImageSource;
use crate::calib::quality::{self, Quality};
use crate::emit::qdq::{self, QuantReport, Target};
use crate::emit::{self, EmitMode};
use crate::graph::GraphIndex;
use crate::graph::analysis::{self, Policy};
use crate::model::{self, WriteOptions};
use crate::plan::Plan;
use crate::report::{self, thousands};
use crate::weights::WeightSet;

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
    /// Runtime); `standard`, `conv` and `fold` use standard ONNX ops only (`conv`: Convs only,
    /// fastest on ONNX Runtime's CPU provider in float; `fold`: `conv` with unshifted ghosts
    /// absorbed by the Convs that read them, fastest under int8; it fits those ghosts without
    /// bias).
    #[arg(long, value_enum, default_value_t = EmitMode::Plugin)]
    pub emit: EmitMode,
    /// Deployment target: `cpu` is `--emit conv`, `cpu-int8` is `--emit fold --int8` (fastest
    /// on ONNX Runtime's CPU provider).
    #[arg(long, value_enum, conflicts_with = "emit")]
    pub target: Option<Target>,
    #[command(flatten)]
    pub int8: Int8Args,
    /// Apply a --plan whose `model_sha256` names another model file (by default such a plan
    /// is refused: it was made for different weights, usually a different model).
    #[arg(long, requires = "plan")]
    pub force_plan: bool,
    /// Also write the plan that was applied to this path.
    #[arg(long, value_name = "PLAN")]
    pub save_plan: Option<PathBuf>,
    /// Write the ghost model in float16 (for GPU deployments in half precision). A float16
    /// input model is handled without this flag and stays float16.
    #[arg(long)]
    pub fp16: bool,
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
    /// With --emit fold: copy Convs found, Convs that absorbed one, copies still computed.
    #[serde(skip_serializing_if = "Option::is_none")]
    folded: Option<emit::fold::FoldReport>,
    seconds: Timings,
    /// With --max-psnr-drop or --target-macs: each layer's λ and the measured result.
    #[serde(skip_serializing_if = "Option::is_none")]
    budget: Option<BudgetReport>,
    /// With --int8 or --target cpu-int8: what was quantized.
    #[serde(skip_serializing_if = "Option::is_none")]
    int8: Option<QuantReport>,
    /// The ghost model against the original on held-out calibration crops (null when it could
    /// not be measured; `quality_error` says why).
    quality: Option<Quality>,
    #[serde(skip_serializing_if = "Option::is_none")]
    quality_error: Option<String>,
    /// Calibration's per-layer decisions (what the guard kept and undid).
    #[serde(skip_serializing_if = "Option::is_none")]
    calibration: Option<CalibReport>,
}

#[derive(serde::Serialize, Default)]
struct Timings {
    load: f64,
    analyse: f64,
    plan: f64,
    emit: f64,
    save: f64,
    quality: f64,
    total: f64,
}

pub fn run(a: &ConvertArgs) -> Result<()> {
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
    // Analysis, planning and emitting work in float32; a float16 model is widened (exactly) and
    // the ghost model narrowed back below.
    let input_fp16 = emit::fp16::widen(&mut m)?;
    if let Some(w) = &a.weights {
        apply_weights(&mut m, w)?;
    }
    tick(&mut t.load);
    let index = GraphIndex::new(m.graph()).with_context(|| format!("in {}", a.model.display()))?;
    let (mode, int8) = qdq::resolve(a.target, a.int8.int8, a.emit)?;
    // int8 planning defaults (BENCHMARKS.md, int8 on CPU): only Convs whose reduced int8 Conv
    // stays efficient, and unshifted ghosts, whose whole ghost stage is one 1x1 Conv.
    let mut policy = a.policy.policy();
    let mut planning = a.planning.clone();
    if int8 && a.plan.is_none() {
        if a.policy.min_channels.is_none() {
            policy.min_channels = qdq::int8_min_channels(planning.options().ratio);
        }
        planning.max_shift = planning.max_shift.or(Some(qdq::INT8_MAX_SHIFT));
    }
    let analysis = analysis::analyze(&index, &policy)?;
    if int8 && a.plan.is_none() && a.policy.min_channels.is_none() && analysis.eligible().next().is_none() {
        bail!(
            "{}: no Conv is eligible for ghosting under int8: at λ={} a Conv needs {} filters for its reduced int8 Conv to keep {} (smaller ones run slower in ONNX Runtime); pass --min-channels N to ghost smaller Convs, or --ratio 0 to quantize the original",
            a.model.display(),
            planning.options().ratio,
            policy.min_channels,
            qdq::INT8_MIN_REDUCED_FILTERS
        );
    }
    tick(&mut t.analyse);
    let (plan, weights, budget, calibration) = match &a.plan {
        Some(p) => {
            let plan = Plan::read(p)?;
            check_plan_model(&plan, p, &m, a.force_plan)?;
            plan.validate(&analysis)
                .with_context(|| format!("plan {} does not fit {}", p.display(), a.model.display()))?;
            (plan, None, None, None)
        }
        None => {
            // The folded form absorbs only bias-free, non-negative ghosts: fit those.
            let mut calib_args = a.calib.clone();
            calib_args.calib_scale_only |= mode == EmitMode::Fold && !a.calib.no_affine;
            make_plan(&m, &index, &analysis, &planning, &calib_args, &a.budget, true)?
        }
    };
    tick(&mut t.plan);
    // Refit weights from calibration replace the original initializers before the rewrite.
    let source = match &weights {
        Some(w) if !w.tensors.is_empty() => std::borrow::Cow::Owned(calib::apply_weights(&m.proto, w)?),
        _ => std::borrow::Cow::Borrowed(&m.proto),
    };
    let (out, emitted) = emit::emit(&source, &analysis, &plan, mode)
        .with_context(|| format!("rewriting {}", a.model.display()))?;
    if int8 && (input_fp16 || a.fp16) {
        bail!(
            "--int8 writes a uint8/int8 model; it does not combine with float16 (--fp16 or a float16 input)"
        );
    }
    let out = if input_fp16 || a.fp16 {
        emit::fp16::to_f16(&out).with_context(|| format!("writing {} in float16", a.output.display()))?
    } else {
        out
    };
    // Activation ranges come from the same images calibration uses (built-in unless --calib).
    let quantized = match (int8, a.calib.source(true)) {
        (false, _) => None,
        (true, None) => {
            bail!("--int8 measures activation ranges on images: drop --kmeans or add --calib DIR")
        }
        (true, Some(images)) => Some(
            qdq::quantize_calibrated(&out, &images, &a.calib.options(), a.int8.int8_ranges)
                .with_context(|| format!("quantizing the rewrite of {}", a.model.display()))?,
        ),
    };
    tick(&mut t.emit);
    let bytes = model::encode(quantized.as_ref().map_or(&out, |(q, _)| q));
    model::write_atomic(&a.output, &bytes, opts)?;
    if let Some(p) = &a.save_plan {
        model::write_atomic(p, plan.to_json().as_bytes(), opts)?;
    }
    tick(&mut t.save);
    // Always measured, so that no conversion is silently broken: on the calibration images
    // (the built-in set unless --calib names a folder), other windows than the fits used.
    let images = a.calib.source(true).unwrap_or(ImageSource::Builtin);
    let (quality, quality_error) = if plan.layers.iter().all(|l| l.ghosts.is_empty()) {
        // Nothing ghosted: the rewrite computes what the original does.
        (None, None)
    } else {
        match quality::measure(&m, &analysis, &plan, weights.as_ref(), &a.calib.options(), &images) {
            Ok(q) => (Some(q), None),
            Err(e) => {
                eprintln!("ghostsr: WARNING: the ghost model's quality was NOT measured: {e:#}");
                (None, Some(format!("{e:#}")))
            }
        }
    };
    tick(&mut t.quality);
    t.total = t0.elapsed().as_secs_f64();

    let before = report::inspect("", &m.proto, &index, &analysis);
    let out_index = GraphIndex::new(out.graph.as_ref().context("no graph")?)?;
    let out_analysis = analysis::analyze(&out_index, &Policy::default())?;
    let after = report::inspect("", &out, &out_index, &out_analysis);
    let summary = ConvertSummary {
        input: a.model.display().to_string(),
        output: a.output.display().to_string(),
        emit: mode,
        convs_ghosted: emitted.layers_rewritten,
        convs_total: analysis.convs.len(),
        params_before: before.params,
        params_after: after.params,
        macs_per_pixel_before: before.macs_per_pixel,
        macs_per_pixel_after: after.macs_per_pixel,
        reorders: emitted.reorders,
        absorbed: emitted.absorbed,
        folded: emitted.folded,
        seconds: t,
        budget,
        int8: quantized.map(|(_, r)| r),
        quality,
        quality_error,
        calibration,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        // The warning goes to stderr too, where a script's user sees it.
        if let Some(q) = summary.quality.as_ref().filter(|q| q.is_bad()) {
            eprint!("{}", quality::warning(q));
        }
    } else {
        print_summary(&summary);
    }
    Ok(())
}

/// Refuses a plan recorded for another model file (its `model_sha256` differs from the sha256
/// of the model being converted) unless `force`; a plan without a hash is applied as it is.
fn check_plan_model(plan: &Plan, plan_path: &Path, m: &model::Model, force: bool) -> Result<()> {
    if plan.model_sha256.is_empty() || plan.model_sha256.eq_ignore_ascii_case(&m.sha256) {
        return Ok(());
    }
    if force {
        eprintln!(
            "ghostsr: warning: plan {} was made for the model with sha256 {}, not {} (sha256 {}); applying it anyway (--force-plan)",
            plan_path.display(),
            plan.model_sha256,
            m.path.display(),
            m.sha256
        );
        return Ok(());
    }
    bail!(
        "plan {} was made for the model with sha256 {}, but {} has sha256 {}: it belongs to another model \
         (or other weights). Make a plan for this model with `ghostsr plan`, or pass --force-plan to apply it anyway",
        plan_path.display(),
        plan.model_sha256,
        m.path.display(),
        m.sha256
    )
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
    if let Some(f) = &s.folded {
        println!(
            "  folded:         {} ghost copies, absorbed by {} Conv reads, {} still computed",
            f.copies, f.absorbed, f.materialised
        );
    }
    if let Some(q) = &s.int8 {
        println!(
            "  int8:           {} activations quantized ({:?} ranges), {} Convs with int8 weights, {} Relus folded",
            q.activations,
            q.rule.unwrap_or(qdq::RangeRule::Percentile),
            q.convs,
            q.relus_folded
        );
    }
    let t = &s.seconds;
    println!(
        "  time:           {:.2} s (load {:.2}, analyse {:.2}, plan {:.2}, emit {:.2}, save {:.2}, quality {:.2})",
        t.total, t.load, t.analyse, t.plan, t.emit, t.save, t.quality
    );
    if let Some(q) = &s.quality {
        let text = quality::render(q);
        // The summary line on stdout; the warning, if any, on stderr.
        let (line, warning) = text.split_at(text.find("ghostsr: WARNING").unwrap_or(text.len()));
        print!("{line}");
        eprint!("{warning}");
    }
}
