//! The quality budget: λ chosen per layer so that a PSNR drop (`--max-psnr-drop D`) or a
//! multiply-add target (`--target-macs F`) is met at the lowest cost.
//!
//! A *sensitivity pass* ghosts one layer at a time (Convs sharing weights count as one layer),
//! at each candidate λ in [`CANDIDATES`], calibrated on the original network's features exactly
//! as [`super::calibrate`] would (data-chosen intrinsic set, least-error sources, shifts and
//! affine terms, ridge refit), and measures its *damage*: the mean squared deviation of the
//! network's output from the original output, on Y (8-bit scale, border of `scale` pixels shaved,
//! as the evaluation protocol measures). Damages of different layers are taken as additive (the
//! errors are small and mostly independent), so a greedy path from "no ghosts" adds, step by
//! step, the layer and λ with the least damage per multiply-add saved. For a MACs target the
//! first state on the path that meets it is calibrated layer by layer ([`super::calibrate`]).
//! For a PSNR budget the allowed damage is `MSE_orig * (10^(D/10) - 1)` against the HR crops;
//! the chosen state is calibrated and its drop measured on the calibration crops, and the
//! measured/predicted ratio corrects the prediction for the next try, bracketing the furthest
//! state that meets the budget (a few calibrations at most). Calibration crops serve both fitting
//! and measuring, so the measured drop is optimistic for other images; evaluate on a held-out
//! set (`ghostsr eval`).

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;

use super::fit::{Maps, PairStats};
use super::{CalibOptions, apply_weights, calibrate, capture, data, fit, fit_layer, probe_factor};
use crate::emit::fold;
use crate::emit::{EmitMode, emit};
use crate::graph::GraphIndex;
use crate::graph::analysis::{Analysis, ConvInfo};
use crate::model::Model;
use crate::onnx;
use crate::plan::kmeans::{self, PlanOptions};
use crate::plan::{LayerPlan, Plan};
use crate::report;
use crate::runner::metrics::Plane;
use crate::runner::sr::Chw;
use crate::weights::WeightSet;

/// The λ values the sensitivity pass tries for each layer (0, the layer left as it is, is the
/// start of the greedy path).
pub const CANDIDATES: [f64; 3] = [0.25, 0.5, 0.75];

/// Most calibrations a PSNR budget may run while bracketing its state.
const MAX_TRIES: usize = 5;

/// What the caller asks for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    /// At most this PSNR drop (dB, Y) on the calibration crops against the original model.
    MaxPsnrDrop(f64),
    /// Conv multiply-adds at most this fraction of the original's.
    TargetMacs(f64),
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Budget::MaxPsnrDrop(d) => write!(f, "PSNR drop <= {d} dB"),
            Budget::TargetMacs(m) => write!(f, "MACs <= {m} x original"),
        }
    }
}

/// One ghosted layer's choice.
#[derive(Clone, Debug, Serialize)]
pub struct LayerChoice {
    /// Output tensors of the Convs sharing this layer's weights (usually one).
    pub conv_outputs: Vec<String>,
    pub node: String,
    /// This layer's share of the original model's Conv multiply-adds.
    pub macs_share: f64,
    /// The λ chosen (0: left as it is).
    pub ratio: f64,
    /// Its damage in the sensitivity pass at that λ (MSE on Y, 8-bit scale).
    pub damage: f64,
}

/// The outcome of a budgeted calibration.
#[derive(Clone, Debug, Serialize)]
pub struct BudgetReport {
    pub budget: String,
    /// Whether the measured result meets the budget.
    pub met: bool,
    /// PSNR-Y (dB) of the original model on the calibration crops.
    pub original_psnr: f64,
    /// PSNR-Y (dB) of the ghost model on the calibration crops.
    pub psnr: f64,
    pub drop_db: f64,
    /// The drop the sensitivity pass predicted for this state (damages summed, uncorrected).
    pub predicted_drop_db: f64,
    /// Conv multiply-adds of the ghost model / the original's.
    pub macs_fraction: f64,
    /// Every eligible layer, in graph order.
    pub layers: Vec<LayerChoice>,
    /// Layer-by-layer calibrations run (each as long as one `convert --calib`).
    pub calibrations: usize,
    pub sensitivity_seconds: f64,
    pub total_seconds: f64,
}

/// Convs that share weights and bias: planned together, with one λ.
struct Unit<'a> {
    convs: Vec<&'a ConvInfo>,
    /// Multiply-adds of all its Convs.
    macs: u64,
}

/// Per unit and level (`[0] + CANDIDATES`): the damage and the multiply-adds saved.
type Sensitivity = (Vec<Vec<f64>>, Vec<Vec<u64>>);

/// One state of the greedy path: a λ index (into `[0] + CANDIDATES`) per unit.
#[derive(Clone)]
struct State {
    levels: Vec<usize>,
    damage: f64,
    saved: u64,
}

/// λ of level `i` (0: none).
fn level_ratio(i: usize) -> f64 {
    if i == 0 { 0.0 } else { CANDIDATES[i - 1] }
}

/// Calibrates `model` with per-layer λ meeting `budget`; returns the plan, the refit weights and
/// the report. `progress(stage, done, total)` follows the sensitivity pass and calibrations.
#[allow(clippy::too_many_arguments)]
pub fn calibrate_to_budget(
    model: &Model,
    index: &GraphIndex<'_>,
    analysis: &Analysis,
    plan_opts: &PlanOptions,
    calib: &CalibOptions,
    images: impl Into<data::ImageSource>,
    budget: Budget,
    progress: &(dyn Fn(&str, usize, usize) + Sync),
) -> Result<(Plan, WeightSet, BudgetReport)> {
    match budget {
        Budget::MaxPsnrDrop(d) => ensure!(d > 0.0 && d.is_finite(), "--max-psnr-drop must be positive"),
        Budget::TargetMacs(f) => ensure!(f > 0.0 && f < 1.0, "--target-macs must be in (0, 1)"),
    }
    let t0 = Instant::now();
    let units = units(index, analysis);
    ensure!(!units.is_empty(), "no Conv is eligible for ghosting");
    let total_macs: u64 = report::node_macs(index, &analysis.shapes).values().sum();
    ensure!(total_macs > 0, "the model's multiply-adds are unknown (shape inference failed)");

    let images: data::ImageSource = images.into();
    let probe = Probe::new(model, index, analysis, &units, calib, &images)?;
    // The budget chooses each layer's λ from measured damage itself; the per-layer guard would
    // undo layers behind its back.
    let unguarded = CalibOptions { guard_db: 0.0, ..calib.clone() };
    let (damage, saved) = probe.sensitivity(&units, plan_opts, calib, progress)?;
    let sensitivity_seconds = t0.elapsed().as_secs_f64();
    let path = greedy_path(&damage, &saved);

    let mut calibrations = 0;
    let mut run = |state: &State| -> Result<(Plan, WeightSet, f64)> {
        calibrations += 1;
        let opts = options_for(plan_opts, &units, &state.levels);
        let (plan, weights) = calibrate(model, index, analysis, &opts, &unguarded, &images, &|d, t, _| {
            progress(&format!("calibrating (try {calibrations})"), d, t)
        })?;
        let mse = probe.mse_vs_hr(&plan, &weights)?;
        Ok((plan, weights, mse))
    };
    let mse_orig = probe.mse_orig;
    let fraction = |s: &State| (total_macs - s.saved.min(total_macs)) as f64 / total_macs as f64;
    let (state, plan, weights, mse) = match budget {
        Budget::TargetMacs(f) => {
            let Some(state) = path.iter().find(|s| fraction(s) <= f) else {
                let last = path.last().map_or(1.0, fraction);
                bail!(
                    "--target-macs {f}: the lowest this model reaches with λ up to {} on every eligible Conv is {last:.3}",
                    CANDIDATES[CANDIDATES.len() - 1]
                );
            };
            let (plan, weights, mse) = run(state)?;
            (state.clone(), plan, weights, mse)
        }
        Budget::MaxPsnrDrop(d) => {
            let allowed = mse_orig * (10f64.powf(d / 10.0) - 1.0);
            // `lo`: the furthest state known to meet the budget (0, no ghosts, always does);
            // `hi`: the nearest state known not to.
            let (mut lo, mut hi) = (0usize, path.len());
            let mut best: Option<(Plan, WeightSet, f64)> = None;
            let mut k = 1.0f64;
            for _ in 0..MAX_TRIES {
                if hi - lo <= 1 {
                    break;
                }
                let predicted = path.iter().rposition(|s| k * s.damage <= allowed).unwrap_or(0);
                let idx = if predicted > lo && predicted < hi { predicted } else { (lo + hi).div_ceil(2) };
                let (plan, weights, mse) = run(&path[idx])?;
                let excess = (mse - mse_orig).max(0.0);
                if path[idx].damage > 0.0 && excess > 0.0 {
                    k = excess / path[idx].damage;
                }
                if mse <= mse_orig + allowed {
                    lo = idx;
                    best = Some((plan, weights, mse));
                } else {
                    hi = idx;
                }
            }
            let Some((plan, weights, mse)) = best else {
                bail!(
                    "--max-psnr-drop {d}: no ghosting found within the budget on the calibration crops \
                     (even the least damaging layer at λ = {} exceeds it); raise the budget",
                    CANDIDATES[0]
                );
            };
            (path[lo].clone(), plan, weights, mse)
        }
    };

    let psnr = |mse: f64| 10.0 * (255.0f64 * 255.0 / mse).log10();
    let drop_db = psnr(mse_orig) - psnr(mse);
    let met = match budget {
        Budget::MaxPsnrDrop(d) => drop_db <= d + 1e-9,
        Budget::TargetMacs(f) => fraction(&state) <= f,
    };
    let layers = units
        .iter()
        .enumerate()
        .map(|(u, unit)| LayerChoice {
            conv_outputs: unit.convs.iter().map(|c| c.output.clone()).collect(),
            node: unit.convs[0].node.clone(),
            macs_share: unit.macs as f64 / total_macs as f64,
            ratio: level_ratio(state.levels[u]),
            damage: damage[u][state.levels[u]],
        })
        .collect();
    let report = BudgetReport {
        budget: budget.to_string(),
        met,
        original_psnr: psnr(mse_orig),
        psnr: psnr(mse),
        drop_db,
        predicted_drop_db: psnr(mse_orig) - psnr(mse_orig + state.damage),
        macs_fraction: fraction(&state),
        layers,
        calibrations,
        sensitivity_seconds,
        total_seconds: t0.elapsed().as_secs_f64(),
    };
    Ok((plan, weights, report))
}

/// The report as a table: each layer's λ, then the measured result.
pub fn render(r: &BudgetReport) -> String {
    let mut out = format!("quality budget: {}\n", r.budget);
    out += &format!("  {:<44} {:>8} {:>6} {:>10}\n", "layer (Conv output)", "MACs %", "λ", "damage");
    for l in &r.layers {
        let name = match l.conv_outputs.len() {
            1 => l.conv_outputs[0].clone(),
            n => format!("{} (+{} sharing its weights)", l.conv_outputs[0], n - 1),
        };
        out += &format!("  {:<44} {:>8.2} {:>6} {:>10.4}\n", name, 100.0 * l.macs_share, l.ratio, l.damage);
    }
    out += &format!(
        "  PSNR-Y on the calibration crops: {:.3} -> {:.3} dB (drop {:.3} dB, predicted {:.3}); MACs {:.3} x original{}\n",
        r.original_psnr,
        r.psnr,
        r.drop_db,
        r.predicted_drop_db,
        r.macs_fraction,
        if r.met { "" } else { "  (budget NOT met)" }
    );
    out += &format!(
        "  {} calibration(s), sensitivity pass {:.1} s, total {:.1} s\n",
        r.calibrations, r.sensitivity_seconds, r.total_seconds
    );
    out
}

/// Eligible Convs grouped by shared weights and bias, in graph order.
fn units<'a>(index: &GraphIndex<'_>, analysis: &'a Analysis) -> Vec<Unit<'a>> {
    let macs = report::node_macs(index, &analysis.shapes);
    let mut convs: Vec<&ConvInfo> = analysis.eligible().collect();
    convs.sort_by_key(|c| c.node_index);
    let mut out: Vec<Unit> = Vec::new();
    let mut by_key: HashMap<(&str, Option<&str>), usize> = HashMap::new();
    for c in convs {
        let m = macs.get(&c.node_index).copied().unwrap_or(0);
        match by_key.get(&(c.weight.as_str(), c.bias.as_deref())) {
            Some(&u) => {
                out[u].convs.push(c);
                out[u].macs += m;
            }
            None => {
                by_key.insert((c.weight.as_str(), c.bias.as_deref()), out.len());
                out.push(Unit { convs: vec![c], macs: m });
            }
        }
    }
    out
}

/// Plan options with each unit's λ from `levels`.
fn options_for(base: &PlanOptions, units: &[Unit], levels: &[usize]) -> PlanOptions {
    let mut layer_ratios = BTreeMap::new();
    for (unit, &l) in units.iter().zip(levels) {
        for c in &unit.convs {
            layer_ratios.insert(c.output.clone(), level_ratio(l));
        }
    }
    PlanOptions { layer_ratios, ..base.clone() }
}

/// Multiply-adds a unit saves at λ: its ghost share times its cost.
fn saved_macs(unit: &Unit, opts: &PlanOptions) -> u64 {
    let c = unit.convs[0];
    let ghosts = c.c_out - opts.keep_per_group(c) * c.group;
    (unit.macs as f64 * ghosts as f64 / c.c_out as f64).round() as u64
}

/// The greedy path from no ghosts: at each step the unit and higher λ with the least added
/// damage per multiply-add saved (jumps over a λ are allowed, since damage is measured, not
/// convex).
fn greedy_path(damage: &[Vec<f64>], saved: &[Vec<u64>]) -> Vec<State> {
    let mut s = State { levels: vec![0; damage.len()], damage: 0.0, saved: 0 };
    let mut path = vec![s.clone()];
    loop {
        let mut best: Option<(f64, usize, usize)> = None;
        for u in 0..damage.len() {
            let at = s.levels[u];
            for j in at + 1..damage[u].len() {
                let gain = saved[u][j].saturating_sub(saved[u][at]);
                if gain == 0 {
                    continue;
                }
                let cost = (damage[u][j] - damage[u][at]).max(0.0) / gain as f64;
                if best.is_none_or(|(b, _, _)| cost < b) {
                    best = Some((cost, u, j));
                }
            }
        }
        let Some((_, u, j)) = best else { break };
        s.damage += damage[u][j] - damage[u][s.levels[u]];
        s.saved = s.saved + saved[u][j] - saved[u][s.levels[u]];
        s.levels[u] = j;
        path.push(s.clone());
    }
    path
}

/// The calibration crops, the original network's features on them, and the measurements.
struct Probe<'m> {
    model: &'m Model,
    index: &'m GraphIndex<'m>,
    analysis: &'m Analysis,
    input: String,
    output: String,
    crops: Vec<Chw>,
    threads: usize,
    shave: usize,
    /// Y planes of the HR crops, shaved.
    hr: Vec<Plane>,
    /// Y planes of the original model's outputs.
    orig: Vec<Plane>,
    mse_orig: f64,
    /// Every eligible Conv's output and input in the original network.
    truth: HashMap<String, Maps>,
}

impl<'m> Probe<'m> {
    fn new(
        model: &'m Model,
        index: &'m GraphIndex<'m>,
        analysis: &'m Analysis,
        units: &[Unit],
        calib: &CalibOptions,
        images: &data::ImageSource,
    ) -> Result<Self> {
        let proto = &model.proto;
        let input = capture::input_name(proto)?;
        let (channels, c_in) = super::data_channels(proto, &input)?;
        let output = model.graph().output.first().and_then(|o| o.name.clone()).context("no graph output")?;
        let mut names: Vec<String> = vec![output.clone()];
        for c in units.iter().flat_map(|u| &u.convs) {
            names.push(c.output.clone());
            names.push(c.input.clone());
        }
        names.sort();
        names.dedup();
        let mut session = capture::open(&capture::with_outputs(proto, &names)?, calib.threads)?;
        let factor = probe_factor(&mut session, &input, c_in, &output)?;
        let scale = if factor == 1 { calib.scale.unwrap_or(2) } else { factor };
        let samples = data::samples(images, &calib.crop_spec(channels, scale, factor == 1))?;
        let crops: Vec<Chw> = samples.iter().map(|s| s.lr.clone()).collect();
        let truth: HashMap<String, Maps> =
            names.iter().cloned().zip(capture::run(&mut session, &input, &crops, &names)?).collect();
        let shave = scale;
        let hr = samples.iter().map(|s| Plane::y_shaved(&s.hr, shave)).collect::<Result<Vec<_>>>()?;
        let orig = y_planes(&truth[&output], shave)?;
        let mse_orig = mse(&orig, &hr)?;
        ensure!(mse_orig > 0.0, "the original model reproduces the calibration crops exactly");
        Ok(Probe {
            model,
            index,
            analysis,
            input,
            output,
            crops,
            threads: calib.threads,
            shave,
            hr,
            orig,
            mse_orig,
            truth,
        })
    }

    /// The model's output planes with `plan` (and `weights`) applied.
    fn ghost_output(&self, plan: &Plan, weights: &WeightSet) -> Result<Vec<Plane>> {
        let base = apply_weights(&self.model.proto, weights)?;
        let (ghosted, _) = emit(&base, self.analysis, plan, EmitMode::Standard)?;
        let want = [self.output.clone()];
        let mut s = capture::open(&capture::prune_to(&ghosted, &want)?, self.threads)?;
        let out = capture::run(&mut s, &self.input, &self.crops, &want)?;
        y_planes(&out[0], self.shave)
    }

    fn mse_vs_hr(&self, plan: &Plan, weights: &WeightSet) -> Result<f64> {
        mse(&self.ghost_output(plan, weights)?, &self.hr)
    }

    /// `(damage[u][level], saved[u][level])` for every unit and level (`[0] + CANDIDATES`).
    fn sensitivity(
        &self,
        units: &[Unit],
        plan_opts: &PlanOptions,
        calib: &CalibOptions,
        progress: &(dyn Fn(&str, usize, usize) + Sync),
    ) -> Result<Sensitivity> {
        let total = units.len() * CANDIDATES.len();
        let mut damage = Vec::new();
        let mut saved = Vec::new();
        for (u, unit) in units.iter().enumerate() {
            let first = unit.convs[0];
            let at = || format!("sensitivity of Conv \"{}\" (output \"{}\")", first.node, first.output);
            // Pair statistics on the original features do not depend on λ.
            let stats: Vec<PairStats> = unit
                .convs
                .iter()
                .map(|c| {
                    let y = &self.truth[&c.output];
                    PairStats::compute(y, y, plan_opts.max_shift).scale_only(match calib.scale_only {
                        true => {
                            fold::absorbable_channels(self.index, &self.analysis.shapes, &c.output, c.c_out)
                        }
                        false => vec![],
                    })
                })
                .collect();
            let (mut d, mut s) = (vec![0.0], vec![0u64]);
            for k in 0..CANDIDATES.len() {
                let levels: Vec<usize> = (0..units.len()).map(|v| if v == u { k + 1 } else { 0 }).collect();
                let opts = options_for(plan_opts, units, &levels);
                s.push(saved_macs(unit, &opts));
                let keep = opts.keep_per_group(first);
                if keep * first.group == first.c_out {
                    d.push(0.0);
                } else {
                    let (plan, weights) =
                        self.ghost_unit(unit, &stats, &opts, calib, keep).with_context(at)?;
                    d.push(mse(&self.ghost_output(&plan, &weights).with_context(at)?, &self.orig)?);
                }
                progress("sensitivity", u * CANDIDATES.len() + k + 1, total);
            }
            damage.push(d);
            saved.push(s);
        }
        Ok((damage, saved))
    }

    /// One unit ghosted alone, fitted as calibration fits it (on the original's features).
    fn ghost_unit(
        &self,
        unit: &Unit,
        stats: &[PairStats],
        opts: &PlanOptions,
        calib: &CalibOptions,
        keep: usize,
    ) -> Result<(Plan, WeightSet)> {
        let first = unit.convs[0];
        let intrinsic = if calib.data_intrinsic {
            fit::select_intrinsic(&stats[0].error_matrix(calib.affine), first.group, keep, 20)
        } else {
            let w = self.index.constant(&first.weight).context("weights are not constant")?;
            kmeans::plan_layer(first, &onnx::tensor_f32(w)?, opts, opts.seed)?.intrinsic
        };
        let mut layers: Vec<LayerPlan> = Vec::new();
        let mut weights = WeightSet::default();
        let mut equations = HashMap::new();
        for (c, st) in unit.convs.iter().zip(stats) {
            let layer = fit_layer(c, st, intrinsic.clone(), calib.affine);
            if calib.refit && super::refittable(self.model, self.index, self.analysis, c) {
                super::refit_into(
                    self.index,
                    c,
                    &self.truth[&c.input],
                    &self.truth[&c.output],
                    &layer.intrinsic,
                    &layer.ghosts,
                    calib,
                    1, // the budget's probe crops are not augmented
                    &mut equations,
                    &mut weights,
                )?;
            }
            layers.push(layer);
        }
        Ok((Plan::new(&self.model.sha256, opts.max_shift, layers), weights))
    }
}

/// Y planes (8-bit scale, shaved) of a model output: RGB in [0, 1] is rounded to 8 bits first,
/// as the evaluation protocol does; a one-channel output is Y / 255.
pub(crate) fn y_planes(out: &Maps, shave: usize) -> Result<Vec<Plane>> {
    let hw = out.h * out.w;
    (0..out.n)
        .map(|k| {
            let data = out.data[k * out.c * hw..(k + 1) * out.c * hw].to_vec();
            match out.c {
                3 => {
                    Plane::y_shaved(&Chw { channels: 3, height: out.h, width: out.w, data }.to_rgb()?, shave)
                }
                1 => {
                    ensure!(
                        out.h > 2 * shave && out.w > 2 * shave,
                        "output too small to shave {shave} pixels"
                    );
                    let (h, w) = (out.h - 2 * shave, out.w - 2 * shave);
                    let mut p = Vec::with_capacity(h * w);
                    for r in shave..shave + h {
                        for c in shave..shave + w {
                            p.push((data[r * out.w + c] as f64 * 255.0).round().clamp(0.0, 255.0));
                        }
                    }
                    Ok(Plane { height: h, width: w, data: p })
                }
                c => bail!("the model output has {c} channels; expected 1 or 3"),
            }
        })
        .collect()
}

/// Mean squared difference pooled over all planes.
pub(crate) fn mse(a: &[Plane], b: &[Plane]) -> Result<f64> {
    ensure!(a.len() == b.len(), "plane count mismatch");
    let (mut se, mut n) = (0.0f64, 0usize);
    for (x, y) in a.iter().zip(b) {
        ensure!(x.data.len() == y.data.len(), "plane size mismatch");
        se += x.data.iter().zip(&y.data).map(|(p, q)| (p - q) * (p - q)).sum::<f64>();
        n += x.data.len();
    }
    Ok(se / n.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_path_takes_the_cheapest_damage_per_mac_first_and_may_jump() {
        // Unit 0: cheap at λ=.25, expensive after; unit 1: flat damage up to λ=.75.
        let damage = vec![vec![0.0, 1.0, 10.0, 100.0], vec![0.0, 5.0, 5.0, 5.0]];
        let saved = vec![vec![0, 10, 20, 30], vec![0, 10, 20, 30]];
        let path = greedy_path(&damage, &saved);
        assert_eq!(path[0].levels, vec![0, 0]);
        // 1/10 per MAC for unit 0 at .25 beats 5/30 for unit 1's jump to .75.
        assert_eq!(path[1].levels, vec![1, 0]);
        // Then unit 1 jumps straight to .75 (5/30) rather than stepping.
        assert_eq!(path[2].levels, vec![1, 3]);
        assert_eq!(path.last().unwrap().levels, vec![3, 3]);
        for w in path.windows(2) {
            assert!(w[1].saved > w[0].saved, "every step saves multiply-adds");
        }
        assert_eq!(path.last().unwrap().saved, 60);
        assert!((path.last().unwrap().damage - 105.0).abs() < 1e-12);
    }

    #[test]
    fn y_planes_round_rgb_to_8_bits_and_shave() {
        let m = Maps { n: 1, c: 3, h: 4, w: 4, data: vec![0.5; 48] };
        let p = y_planes(&m, 1).unwrap();
        assert_eq!((p[0].height, p[0].width), (2, 2));
        // 0.5 -> 128 (ties to even of 127.5); Y = 16 + (65.481 + 128.553 + 24.966) * 128 / 255.
        let y = 16.0 + (65.481 + 128.553 + 24.966) * 128.0 / 255.0;
        assert!(p[0].data.iter().all(|v| (v - y).abs() < 1e-9), "{:?}", p[0].data);
        let one = Maps { n: 2, c: 1, h: 3, w: 3, data: vec![0.2; 18] };
        let q = y_planes(&one, 1).unwrap();
        assert_eq!(q.len(), 2);
        assert_eq!(q[1].data, vec![51.0]);
        assert!(mse(&p, &q).is_err());
        assert_eq!(mse(&q, &q).unwrap(), 0.0);
    }
}
