//! `ghostsr plan`: plan the ghosts (k-means on filters, or calibration on images, or a quality
//! budget) and write the plan as JSON, optionally with the weights a trainer starts from.
//! [`make_plan`] is the one place that turns the planning flags into a plan; `convert` uses it.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;

use super::args::{BudgetArgs, CalibArgs, PlanningArgs, PolicyArgs};
use super::progress::{progress, staged_progress};
use crate::calib;
use crate::calib::CalibReport;
use crate::calib::budget::BudgetReport;
use crate::calib::data::ImageSource;
use crate::graph::GraphIndex;
use crate::graph::analysis;
use crate::model::{self, WriteOptions};
use crate::plan::Plan;
use crate::plan::kmeans;
use crate::weights::WeightSet;

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

/// What [`make_plan`] returns: the plan, calibration's refit weights, the budget's report and
/// calibration's per-layer decisions (each when it applies).
pub type Planned = (Plan, Option<WeightSet>, Option<BudgetReport>, Option<CalibReport>);

/// A plan (and calibration's refit weights, and the budget's report) as the flags ask; without
/// `--calib` and `--kmeans`, `builtin_by_default` calibrates on the built-in image set.
pub fn make_plan(
    m: &model::Model,
    index: &GraphIndex<'_>,
    analysis: &analysis::Analysis,
    p: &PlanningArgs,
    c: &CalibArgs,
    b: &BudgetArgs,
    builtin_by_default: bool,
) -> Result<Planned> {
    if analysis.eligible().next().is_none() {
        bail!(
            "{}: no Conv is eligible for ghosting; run `ghostsr inspect {}` to see why each is skipped (--include NAME overrides the policy)",
            m.path.display(),
            m.path.display()
        );
    }
    let what = |src: &ImageSource| format!("calibrating {} on {}", m.path.display(), src.describe());
    match (&c.source(builtin_by_default), b.budget()) {
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
            Ok((plan, Some(weights), Some(report), None))
        }
        (Some(dir), None) => {
            let (plan, weights, report) = calib::calibrate_with_report(
                m,
                index,
                analysis,
                &p.options(),
                &c.options(),
                dir,
                &progress("calibrating"),
            )
            .with_context(|| what(dir))?;
            for l in report.layers.iter().filter(|l| !l.kept && l.step == calib::Step::Ghost) {
                eprintln!(
                    "ghostsr: left Conv \"{}\" whole: ghosting it alone cost fidelity {:.1} dB (guard {} dB)",
                    l.node,
                    l.damage_fidelity_db.unwrap_or(f64::INFINITY),
                    report.guard_db
                );
            }
            Ok((plan, Some(weights), None, Some(report)))
        }
        (None, Some(_)) => bail!("--max-psnr-drop and --target-macs calibrate: they need --calib DIR here"),
        (None, None) => Ok((
            kmeans::plan_model(index, analysis, &m.sha256, &p.options(), &progress("planning"))?,
            None,
            None,
            None,
        )),
    }
}

pub fn run(a: &PlanArgs) -> Result<()> {
    let protect = [a.model.as_path()];
    let opts = WriteOptions { protect: &protect, force: a.force };
    model::check_output_path(&a.output, opts)?;
    if let Some(w) = &a.export_weights {
        model::check_output_path(w, opts)?;
        if w == &a.output {
            bail!("--export-weights and -o name the same file");
        }
    }
    let mut m = model::load(&a.model)?;
    // float16 models are planned in float32 (exact), like convert does.
    crate::emit::fp16::widen(&mut m)?;
    let index = GraphIndex::new(m.graph()).with_context(|| format!("in {}", a.model.display()))?;
    let analysis = analysis::analyze(&index, &a.policy.policy())?;
    let (plan, refit, _, _) = make_plan(&m, &index, &analysis, &a.planning, &a.calib, &a.budget, false)?;
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
