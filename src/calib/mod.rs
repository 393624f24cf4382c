//! Calibration: choose ghosts from data instead of from filter distances.
//!
//! The paper's training-free selection (k-means on filters, shift by filter distance) destroys
//! pretrained SR networks (IMDN x2 λ=0.5: 17 dB on Set5). [`calibrate`] runs the original model
//! on calibration crops ([`data`]) in ONNX Runtime and captures every ghosted Conv's output
//! ([`capture`]). Then, Conv by Conv in graph order, it captures the same Conv's output (and
//! input) in the PARTLY ghosted network — the layers already decided, emitted in standard ops
//! with their refit weights, run from the features kept where the network crosses that Conv
//! ([`resume`]) — and chooses, by least error against the original network's
//! feature maps ([`fit`]): the intrinsic set (k-medoids on the pairwise ghost-error matrix, per
//! group), each ghost's source and shift, and its affine terms; finally it refits the kept
//! filters by ridge least squares through the ghost map ([`refit`]). Every stage can be turned
//! off ([`CalibOptions`]) so its worth can be measured; k-means stays the starting point (the
//! layer list and, without the data-chosen set, the intrinsic channels).
//!
//! Convs that share weights (CARN) reuse the first use's intrinsic set and choose their own
//! ghosts; their refit sums the normal equations of every use so far (re-solved at each use).

pub mod budget;
pub mod builtin;
pub mod capture;
pub mod data;
pub mod fit;
pub mod quality;
pub mod refit;
pub mod resume;

use std::collections::HashMap;

use anyhow::{Context, Result, bail};

use crate::emit::{EmitMode, emit};
use crate::graph::GraphIndex;
use crate::graph::analysis::{Analysis, ConvInfo, Verdict};
use crate::model::Model;
use crate::onnx::{self, ModelProto};
use crate::plan::kmeans::{self, PlanOptions};
use crate::plan::{Ghost, LayerPlan, Plan};
use crate::runner::sr::{Channels, Chw};
use crate::weights::{WeightSet, WeightTensor};
use data::ImageSource;
use fit::{Maps, PairStats};
use refit::ConvGeom;

/// Calibration settings; each stage switch exists to measure that stage's worth.
#[derive(Clone, Debug)]
pub struct CalibOptions {
    /// Number of calibration crops.
    pub count: usize,
    /// Crop size in model-input pixels.
    pub size: usize,
    /// Random windows drawn per crop, the most detailed kept ([`data`]; 1: random crops).
    pub candidates: usize,
    /// Fit a scale and bias per ghost (off: ghost = shifted copy).
    pub affine: bool,
    /// Fit each layer on the partly ghosted network's features (off: on the original's).
    pub layer_by_layer: bool,
    /// Choose the intrinsic set from the data (off: k-means's set).
    pub data_intrinsic: bool,
    /// Ridge refit of the kept filters.
    pub refit: bool,
    /// With `refit`: also refit the pointwise (1x1) Convs that stay (after the first ghosted
    /// one) to the original network's outputs, absorbing the error the ghosts upstream leave.
    /// 3x3 Convs that stay are not refit: on CARN-M the upsampler and exit Convs overfit the
    /// calibration crops (Set5 -0.5 dB at λ=0.25; see BENCHMARKS.md).
    pub refit_others: bool,
    /// Relative ridge strength (times the mean diagonal of the patch Gram matrix).
    pub ridge: f32,
    /// Patch samples per layer and per view ([`Self::augment`]) for the refit.
    pub samples: usize,
    /// ONNX Runtime intra-op threads (0: ORT's default).
    pub threads: usize,
    /// SR factor for pre-upsampled (VDSR-like) models, whose factor the graph does not say
    /// (default 2).
    pub scale: Option<usize>,
    /// Per-layer guard (0: off): a ghosted layer whose own damage to the network output, measured
    /// on validation crops the fits never saw, exceeds the MSE of this fidelity (PSNR-Y in dB of
    /// the output against the original's, 8-bit scale) is undone and the Conv left whole. The
    /// damage is the rise of the output error the layer causes in the partly ghosted network, so
    /// it is in output units whatever the layer's feature scale. 47 dB is about 0.5 dB of PSNR
    /// on a 37 dB model: no layer may cost that alone (RDN's global-fusion and upsampler Convs
    /// cost 3-7 dB each; body layers of IMDN, CARN-M, RDN stay near 54 dB).
    pub guard_db: f64,
    /// Validation crops the guard measures on (at most `count`).
    pub guard_count: usize,
    /// Views of each fit crop (1..=8 of its flips and rotations, [`data::augment`]): more
    /// equations from the same images, at that many times the fits' time and memory.
    pub augment: usize,
    /// With the guard and `augment > 1`: fit each ghosted Conv twice, on every view and on the
    /// first view of each crop only, and keep the fit of least output error on the guard's
    /// validation crops (one more fit, refit and guard run per ghosted Conv).
    pub view_choice: bool,
    /// With `affine`: ghosts are `a x` with `a >= 0` and no bias, so that `--emit fold` can
    /// absorb them into the Convs that read them ([`crate::emit::fold`]).
    pub scale_only: bool,
}

impl Default for CalibOptions {
    fn default() -> Self {
        Self {
            count: 16,
            size: 64,
            candidates: 1,
            affine: true,
            layer_by_layer: true,
            data_intrinsic: true,
            refit: true,
            refit_others: true,
            ridge: 3e-2,
            samples: 32768,
            threads: 0,
            scale: None,
            guard_db: 47.0,
            guard_count: 8,
            augment: 2,
            view_choice: false,
            scale_only: false,
        }
    }
}

impl CalibOptions {
    /// The crops these options ask for, for a model of the given kind.
    pub fn crop_spec(&self, channels: Channels, scale: usize, pre_upsampled: bool) -> data::CropSpec {
        data::CropSpec {
            count: self.count,
            size: self.size,
            candidates: self.candidates,
            channels,
            scale,
            pre_upsampled,
        }
    }
}

/// The channel count of the model's data input.
fn input_channels(proto: &ModelProto, input: &str) -> Result<usize> {
    use onnx::tensor_shape_proto::dimension::Value;
    use onnx::type_proto::Value as T;
    let g = proto.graph.as_ref().context("no graph")?;
    let vi = g.input.iter().find(|v| v.name.as_deref() == Some(input)).context("no data input")?;
    let Some(T::TensorType(t)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        bail!("the model input is not a tensor");
    };
    match t.shape.as_ref().and_then(|s| s.dim.get(1)).and_then(|d| d.value.as_ref()) {
        Some(Value::DimValue(c)) => Ok(*c as usize),
        _ => bail!("the model input's channel count is not fixed"),
    }
}

/// The colour space of the model's data input and its channel count (RGB or Y models only).
pub(crate) fn data_channels(proto: &ModelProto, input: &str) -> Result<(Channels, usize)> {
    match input_channels(proto, input)? {
        3 => Ok((Channels::Rgb, 3)),
        1 => Ok((Channels::Y, 1)),
        c => bail!("calibration needs a 1- or 3-channel model input, this one has {c}"),
    }
}

/// Replaces initializers of `proto` by the values in `weights` (same names, same shapes).
/// Private to calibration and the CLI's convert path (the weights module may offer the same).
pub fn apply_weights(proto: &ModelProto, weights: &WeightSet) -> Result<ModelProto> {
    let mut p = proto.clone();
    weights.apply(&mut p).context("applying calibration's refit weights")?;
    Ok(p)
}

/// Stride-1, dilation-1 geometry of a Conv, or `None` when the refit does not handle it.
fn conv_geom(index: &GraphIndex<'_>, conv: &ConvInfo) -> Option<ConvGeom> {
    let node = index.node(conv.node_index);
    let ones = |name| onnx::attr_ints(node, name).is_none_or(|v| v.iter().all(|&x| x == 1));
    if !ones("strides") || !ones("dilations") {
        return None;
    }
    let [kh, kw] = conv.kernel;
    let pad = match onnx::attr_s(node, "auto_pad").as_deref() {
        None | Some("NOTSET") | Some("") => {
            let p = onnx::attr_ints(node, "pads").unwrap_or_else(|| vec![0; 4]);
            [usize::try_from(*p.first()?).ok()?, usize::try_from(*p.get(1)?).ok()?]
        }
        Some("SAME_UPPER") => [(kh - 1) / 2, (kw - 1) / 2],
        Some("SAME_LOWER") => [kh / 2, kw / 2],
        Some("VALID") => [0, 0],
        _ => return None,
    };
    Some(ConvGeom { c_in: conv.c_in, c_out: conv.c_out, group: conv.group, kernel: conv.kernel, pad })
}

/// The model's factor: output size / input size on a 16 x 16 probe.
pub(crate) fn probe_factor(
    session: &mut ort::session::Session,
    input: &str,
    c: usize,
    out: &str,
) -> Result<usize> {
    let probe = Chw { channels: c, height: 16, width: 16, data: vec![0.5; c * 256] };
    let y = capture::run(session, input, std::slice::from_ref(&probe), &[out.to_string()])?;
    if y[0].h % 16 != 0 || y[0].h == 0 {
        bail!("a 16x16 input gave a {}x{} output: not an integer upscaling", y[0].w, y[0].h);
    }
    Ok(y[0].h / 16)
}

/// A calibration step the guard decides on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Ghosting a Conv (with its fits and the refit of its kept filters).
    Ghost,
    /// Refitting a Conv that stays whole to the original's output.
    Refit,
}

/// What calibration decided for one step (a Conv ghosted, or a Conv that stays refit).
#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerDecision {
    pub node: String,
    pub conv_output: String,
    pub step: Step,
    /// Whether the step was kept (false: the guard undid it; a ghosted Conv stays whole, a
    /// refit Conv keeps its original weights).
    pub kept: bool,
    /// The layer's own damage to the network output on the validation crops, as a fidelity
    /// (PSNR-Y, dB, of the output with the layer against the output before it); null when the
    /// guard is off or the layer did not change the output.
    pub damage_fidelity_db: Option<f64>,
    /// With `view_choice`: whether the guard kept the fit on the first view of each crop only
    /// (true) over the fit on every view (false); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_view_only: Option<bool>,
}

/// One candidate fit of a ghosted Conv, with the guard's output error for it.
struct Variant {
    err: f64,
    layer: LayerPlan,
    weights: WeightSet,
    equations: Option<Vec<refit::GroupEquations>>,
    state: ModelProto,
    next: Option<resume::Resume>,
    /// `Some(v)`: fit on every `v`-th crop (the first view of each), `None`: on every view.
    views: Option<usize>,
}

/// The first view of each crop in [`data::augment`]'s order (`views` views per crop).
fn first_views(m: &Maps, views: usize) -> Maps {
    let plane = m.c * m.h * m.w;
    let data = m.data.chunks_exact(plane).step_by(views.max(1)).flatten().copied().collect::<Vec<f32>>();
    Maps { n: data.len() / plane.max(1), c: m.c, h: m.h, w: m.w, data }
}

/// Wall time per calibration phase, printed to stderr when `GHOSTSR_CALIB_PROFILE` is set (to
/// see where calibration's time goes; not part of any output format).
#[derive(Default)]
struct Profile {
    on: bool,
    phases: std::cell::RefCell<Vec<(&'static str, f64, usize)>>,
}

impl Profile {
    fn new() -> Self {
        Self { on: std::env::var_os("GHOSTSR_CALIB_PROFILE").is_some(), phases: Default::default() }
    }

    /// Runs `f`, adding its wall time to phase `name`.
    fn time<T>(&self, name: &'static str, f: impl FnOnce() -> T) -> T {
        let t = std::time::Instant::now();
        let r = f();
        let dt = t.elapsed().as_secs_f64();
        let mut phases = self.phases.borrow_mut();
        match phases.iter_mut().find(|p| p.0 == name) {
            Some(p) => {
                p.1 += dt;
                p.2 += 1;
            }
            None => phases.push((name, dt, 1)),
        }
        r
    }

    fn print(&self) {
        if self.on {
            for (name, s, n) in self.phases.borrow().iter() {
                eprintln!("calib profile: {name:<14} {s:8.2} s over {n} calls");
            }
        }
    }
}

/// Per-layer decisions of a calibration, in graph order.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CalibReport {
    pub guard_db: f64,
    pub layers: Vec<LayerDecision>,
}

/// Plans every eligible Conv from calibration data (see the module docs) and returns the plan
/// with the refit weights (replacement values for original initializers; apply them with
/// [`apply_weights`] before emitting the plan). `progress(done, total, layer)` follows the
/// layers.
pub fn calibrate(
    model: &Model,
    index: &GraphIndex<'_>,
    analysis: &Analysis,
    plan_opts: &PlanOptions,
    calib: &CalibOptions,
    images: impl Into<ImageSource>,
    progress: &(dyn Fn(usize, usize, &str) + Sync),
) -> Result<(Plan, WeightSet)> {
    calibrate_with_report(model, index, analysis, plan_opts, calib, images, progress).map(|(p, w, _)| (p, w))
}

/// The network output's Y planes (8-bit, shaved) on `crops` with `layers` ghosted and `weights`
/// applied (all standard ops).
#[allow(clippy::too_many_arguments)]
pub(crate) fn output_planes(
    proto: &ModelProto,
    analysis: &Analysis,
    plan: &Plan,
    weights: &WeightSet,
    input: &str,
    output: &str,
    crops: &[Chw],
    threads: usize,
    shave: usize,
) -> Result<Vec<crate::runner::metrics::Plane>> {
    let want = [output.to_string()];
    let (ghosted, _) = emit(&apply_weights(proto, weights)?, analysis, plan, EmitMode::Standard)?;
    let mut s = capture::open(&capture::prune_to(&ghosted, &want)?, threads)?;
    budget::y_planes(&capture::run(&mut s, input, crops, &want)?[0], shave)
}

/// [`calibrate`] with the per-layer decisions.
pub fn calibrate_with_report(
    model: &Model,
    index: &GraphIndex<'_>,
    analysis: &Analysis,
    plan_opts: &PlanOptions,
    calib: &CalibOptions,
    images: impl Into<ImageSource>,
    progress: &(dyn Fn(usize, usize, &str) + Sync),
) -> Result<(Plan, WeightSet, CalibReport)> {
    let images: ImageSource = images.into();
    let prof = Profile::new();
    let start = kmeans::plan_model(index, analysis, &model.sha256, plan_opts, &|_, _, _| {})?;
    let proto = &model.proto;
    let input = capture::input_name(proto)?;
    let (channels, c_in) = data_channels(proto, &input)?;
    let final_out = model.graph().output.first().and_then(|o| o.name.clone()).context("no graph output")?;

    // Layers in graph order.
    // Layers with no ghost (λ = 0 for that layer) stay as they are.
    let mut layers: Vec<(&LayerPlan, &ConvInfo)> = start
        .active_layers()
        .map(|l| Ok((l, analysis.conv_by_output(&l.conv_output).context("planned Conv not analysed")?)))
        .collect::<Result<_>>()?;
    layers.sort_by_key(|(_, c)| c.node_index);
    let first_ghost = layers.first().map_or(usize::MAX, |(_, c)| c.node_index);

    let refittable = |conv: &ConvInfo| refittable(model, index, analysis, conv);
    // Every step in graph order: ghosted Convs, and the pointwise Convs after the first ghosted
    // one (refit only, to absorb the error upstream ghosts leave).
    let planned: HashMap<&str, &LayerPlan> = layers.iter().map(|(l, c)| (c.output.as_str(), *l)).collect();
    let mut steps: Vec<(Option<&LayerPlan>, &ConvInfo)> = analysis
        .convs
        .iter()
        .filter_map(|c| match planned.get(c.output.as_str()) {
            Some(l) => Some((Some(*l), c)),
            None => (calib.refit
                && calib.refit_others
                && c.node_index > first_ghost
                && !matches!(c.verdict, Verdict::Unsupported(_))
                // 3x3 refits overfit CARN-M's upsampler and exit Convs unguarded; the guard
                // keeps each only where it lowers the validation error.
                && (c.kernel == [1, 1] || calib.guard_db > 0.0)
                && refittable(c))
            .then_some((None, c)),
        })
        .collect();
    steps.sort_by_key(|(_, c)| c.node_index);

    // The original network's features: every step's output (and input, for a refit on the
    // original's features or for the first step, which sees the original's features anyway).
    let mut names: Vec<String> = steps.iter().map(|(_, c)| c.output.clone()).collect();
    if calib.refit && !calib.layer_by_layer {
        names.extend(steps.iter().map(|(_, c)| c.input.clone()));
    } else if let (true, Some((_, first))) = (calib.refit, steps.first()) {
        names.push(first.input.clone());
    }
    names.sort();
    names.dedup();
    let mut session = capture::open(&capture::with_outputs(proto, &names)?, calib.threads)?;
    let factor = probe_factor(&mut session, &input, c_in, &final_out)?;
    let scale = if factor == 1 { calib.scale.unwrap_or(2) } else { factor };
    let spec = calib.crop_spec(channels, scale, factor == 1);
    let crops = data::augment(&data::crops(&images, &spec)?, calib.augment);
    let truth: HashMap<String, Maps> = prof.time("truth run", || {
        Ok::<_, anyhow::Error>(
            names.iter().cloned().zip(capture::run(&mut session, &input, &crops, &names)?).collect(),
        )
    })?;
    drop(session);

    // The guard's validation crops (other windows than the fits' and the quality report's) and
    // the original output on them.
    let guard = calib.guard_db > 0.0;
    let shave = scale;
    let guard_crops: Vec<Chw> = if guard {
        let spec = data::CropSpec { count: calib.guard_count.clamp(1, calib.count), ..spec };
        data::samples_seeded(&images, &spec, data::GUARD_SEED)?.into_iter().map(|s| s.lr).collect()
    } else {
        Vec::new()
    };
    // Each step runs only the network after its Conv, from the features kept at its cut, for
    // the fit crops and the guard's crops ([`resume`]).
    let cuts = prof.time("cuts", || resume::Cuts::new(proto, &crops[0], calib.threads))?;
    let fit_start = resume::Resume::start(&input, &crops)?;
    let mut fit_at = fit_start.clone();
    let guard_start = if guard { Some(resume::Resume::start(&input, &guard_crops)?) } else { None };
    let mut guard_at = guard_start.clone();
    // A refit of weights that an earlier Conv shares (CARN) changes features from that Conv on:
    // the features at such earlier Convs' cuts are kept too, to restart from there.
    let shares_from = |conv: &ConvInfo| {
        let first = analysis.convs.iter().filter(|c| c.weight == conv.weight).map(|c| c.node_index).min();
        first.filter(|&f| f < conv.node_index && calib.refit && refittable(conv))
    };
    let restart_at: Vec<Option<usize>> = steps.iter().map(|(_, c)| shares_from(c)).collect();
    let mut fit_restarts = vec![fit_start.clone()];
    let mut guard_restarts: Vec<resume::Resume> = guard_start.iter().cloned().collect();
    // Keeps `r` among `restarts` if a step from `k` on may restart there.
    let keep = |restarts: &mut Vec<resume::Resume>, r: &resume::Resume, k: usize| {
        if restart_at[k.min(restart_at.len())..].contains(&Some(r.pos))
            && !restarts.iter().any(|s| s.pos == r.pos)
        {
            restarts.push(r.clone());
        }
    };
    let want_out = [final_out.clone()];
    let original_out = match &guard_start {
        Some(g) => budget::y_planes(
            &prof.time("guard", || resume::eval(proto, g, &want_out, calib.threads))?[0],
            shave,
        )?,
        None => Vec::new(),
    };
    // The output error (MSE against the original's output) of the state decided so far, and
    // the most a layer may add to it.
    let mut err_so_far = 0.0;
    let max_damage = 255.0f64 * 255.0 / 10f64.powf(calib.guard_db / 10.0);
    let mut report = CalibReport { guard_db: calib.guard_db, layers: Vec::new() };

    let mut done: Vec<LayerPlan> = Vec::new();
    let mut weights = WeightSet::default();
    // The network in the state decided so far (every original tensor under its own name).
    let mut state = proto.clone();
    let state_of = |layers: &[LayerPlan], w: &WeightSet| {
        resume::state_model(proto, analysis, &model.sha256, plan_opts.max_shift, w, layers)
    };
    let mut first_intrinsic: HashMap<(String, Option<String>), Vec<usize>> = HashMap::new();
    let mut equations: HashMap<String, Vec<Vec<refit::GroupEquations>>> = HashMap::new();
    let total = layers.len();
    for (k, &(start_layer, conv)) in steps.iter().enumerate() {
        let at = || format!("calibrating Conv \"{}\" (output \"{}\")", conv.node, conv.output);
        let y_true = &truth[&conv.output];
        let do_refit = calib.refit && refittable(conv);
        // Convs that stay are only visited for a refit, of whole-image (not pooled) features.
        if start_layer.is_none() && !(do_refit && y_true.h * y_true.w >= 64) {
            continue;
        }
        let pos = conv.node_index;
        // The first node this step can change: a refit changes every Conv sharing the weights.
        let changes_from = restart_at[k].unwrap_or(pos);
        // The next step's cut, which the guard's run of this step computes on the way.
        let next_pos = steps.get(k + 1).map(|(_, c)| c.node_index);
        // This Conv's output (and input) in the partly ghosted network.
        // (With nothing decided yet the original's features serve, if captured: the guard may
        // have undone the first layers, and only the first step's input is captured.)
        let nothing_yet = done.is_empty() && weights.tensors.is_empty() && truth.contains_key(&conv.input);
        let current: Option<Vec<Maps>> = if calib.layer_by_layer && !nothing_yet {
            let mut want = vec![conv.output.clone()];
            if do_refit {
                want.push(conv.input.clone());
            }
            prof.time("advance", || {
                resume::advance(&state, &cuts, &mut fit_at, &fit_restarts, pos, calib.threads)
            })
            .with_context(at)?;
            keep(&mut fit_restarts, &fit_at, k);
            Some(
                prof.time("capture", || resume::eval(&state, &fit_at, &want, calib.threads))
                    .with_context(at)?,
            )
        } else {
            None
        };
        let x_cur = || match &current {
            Some(c) => &c[1],
            None => &truth[&conv.input],
        };
        // Runs the guard on the tentative state `layers` + `w`: the new output error, and the
        // guard crops' features at the next step's cut in that state.
        let mut guard_run =
            |layers: &[LayerPlan], w: &WeightSet| -> Result<(f64, ModelProto, Option<resume::Resume>)> {
                let tentative = prof.time("state emit", || state_of(layers, w))?;
                let Some(g_at) = guard_at.as_mut() else {
                    return Ok((0.0, tentative, None));
                };
                prof.time("advance", || {
                    resume::advance(&state, &cuts, g_at, &guard_restarts, changes_from, calib.threads)
                })?;
                let mut want = want_out.to_vec();
                let next_cut = match next_pos {
                    Some(p) if cuts.usable() && p > pos => cuts.at(p),
                    _ => Vec::new(),
                };
                want.extend(next_cut.iter().cloned());
                let mut outs = prof.time("guard", || resume::eval(&tentative, g_at, &want, calib.threads))?;
                let rest = outs.split_off(1);
                let err = budget::mse(&budget::y_planes(&outs[0], shave)?, &original_out)?;
                let next = (!next_cut.is_empty()).then(|| resume::Resume {
                    pos: next_pos.unwrap_or(0),
                    maps: next_cut.into_iter().zip(rest).collect(),
                });
                Ok((err, tentative, next))
            };
        let Some(start_layer) = start_layer else {
            // A Conv that stays: refit all its filters to the original's output.
            let all: Vec<usize> = (0..conv.c_out).collect();
            // (Only the guard undoes a step, so only then is the state before it kept.)
            let before = guard.then(|| weights.clone());
            prof.time("refit", || {
                refit_into(
                    index,
                    conv,
                    x_cur(),
                    y_true,
                    &all,
                    &[],
                    calib,
                    calib.augment,
                    &mut equations,
                    &mut weights,
                )
            })
            .with_context(at)?;
            let (err, tentative, next) = guard_run(&done, &weights).with_context(at)?;
            // Kept only if it lowers the output error on the validation crops.
            let kept = !guard || err < err_so_far;
            if kept {
                err_so_far = err;
                state = tentative;
                if let Some(next) = next {
                    guard_at = Some(next);
                }
                // Shared weights: an earlier Conv's features changed too (see below).
                if changes_from < pos {
                    fit_at = resume::rewind(&mut fit_restarts, &mut guard_restarts, changes_from)?;
                }
            } else if let Some(before) = before {
                weights = before;
                if let Some(uses) = equations.get_mut(&conv.weight) {
                    uses.pop();
                }
            }
            if guard {
                report.layers.push(LayerDecision {
                    node: conv.node.clone(),
                    conv_output: conv.output.clone(),
                    step: Step::Refit,
                    kept,
                    damage_fidelity_db: None,
                    first_view_only: None,
                });
            }
            continue;
        };
        let y_cur = current.as_ref().map_or(y_true, |c| &c[0]);
        // Scale-only ghosts where a consumer can absorb them (`--emit fold`), affine elsewhere.
        let fold = match calib.scale_only {
            true => crate::emit::fold::absorbable_channels(index, &analysis.shapes, &conv.output, conv.c_out),
            false => vec![],
        };
        let key = (conv.weight.clone(), conv.bias.clone());
        let first_use = !first_intrinsic.contains_key(&key);
        let weights_before = guard.then(|| weights.clone());
        // The fit on every view of the fit crops, and (with `view_choice`) the fit on their first
        // views only; the guard keeps the one of least output error on its validation crops.
        let mut variants: Vec<Option<usize>> = vec![None];
        if guard && calib.view_choice && calib.augment > 1 && y_true.n >= 2 * calib.augment {
            variants.push(Some(calib.augment));
        }
        let mut best: Option<Variant> = None;
        for &views in &variants {
            let sub = |m: &Maps| views.map(|v| first_views(m, v));
            let (yt_sub, yc_sub) = (sub(y_true), sub(y_cur));
            let yt = yt_sub.as_ref().unwrap_or(y_true);
            let yc = yc_sub.as_ref().unwrap_or(y_cur);
            let stats = prof.time("pair stats", || {
                PairStats::compute(yt, yc, plan_opts.max_shift).scale_only(fold.clone())
            });
            let intrinsic = match first_intrinsic.get(&key) {
                Some(i) => i.clone(),
                None if calib.data_intrinsic => {
                    let keep = start_layer.intrinsic.len() / conv.group;
                    prof.time("intrinsic", || {
                        fit::select_intrinsic(&stats.error_matrix(calib.affine), conv.group, keep, 20)
                    })
                }
                None => start_layer.intrinsic.clone(),
            };
            let layer = fit_layer(conv, &stats, intrinsic, calib.affine);
            layer.validate(conv.c_out, conv.group, plan_opts.max_shift).with_context(at)?;
            // One variant: refit in place; several: each from the weights before this step.
            let mut w = if variants.len() > 1 { weights.clone() } else { std::mem::take(&mut weights) };
            let mut eq = None;
            if do_refit {
                let x_sub = sub(x_cur());
                prof.time("refit", || {
                    refit_into(
                        index,
                        conv,
                        x_sub.as_ref().unwrap_or(x_cur()),
                        yt,
                        &layer.intrinsic,
                        &layer.ghosts,
                        calib,
                        if views.is_some() { 1 } else { calib.augment },
                        &mut equations,
                        &mut w,
                    )
                })
                .with_context(at)?;
                // This use's equations go back in for the variant kept.
                eq = equations.get_mut(&conv.weight).and_then(Vec::pop);
            }
            let mut with = done.clone();
            with.push(layer.clone());
            let (err, tentative, next) = guard_run(&with, &w).with_context(at)?;
            if best.as_ref().is_none_or(|b| err < b.err) {
                best = Some(Variant { err, layer, weights: w, equations: eq, state: tentative, next, views });
            }
        }
        let Variant { err, layer, weights: w, equations: eq, state: tentative, next, views } =
            best.context("internal error: no fit variant")?;
        weights = w;
        if let Some(eq) = eq {
            equations.entry(conv.weight.clone()).or_default().push(eq);
        }
        if first_use {
            first_intrinsic.insert(key.clone(), layer.intrinsic.clone());
        }
        let mut decision = LayerDecision {
            node: conv.node.clone(),
            conv_output: conv.output.clone(),
            step: Step::Ghost,
            kept: true,
            damage_fidelity_db: None,
            first_view_only: (variants.len() > 1).then_some(views.is_some()),
        };
        if guard {
            let damage = err - err_so_far;
            decision.damage_fidelity_db = (damage > 0.0).then(|| 10.0 * (255.0f64 * 255.0 / damage).log10());
            if damage > max_damage
                && let Some(before) = weights_before
            {
                // Undo: the Conv stays whole, with its original weights, and a later use of the
                // same weights chooses its own intrinsic set.
                decision.kept = false;
                weights = before;
                if do_refit && let Some(uses) = equations.get_mut(&conv.weight) {
                    uses.pop();
                }
                if first_use {
                    first_intrinsic.remove(&key);
                }
            } else {
                err_so_far = err;
            }
        }
        let kept = decision.kept;
        report.layers.push(decision);
        if kept {
            done.push(layer);
            state = tentative;
            if let Some(next) = next {
                guard_at = Some(next);
            }
        }
        // A refit of weights an earlier Conv shares changes features before this cut (the
        // guard's run of the step started before them, so its next cut holds).
        if kept && changes_from < pos {
            fit_at = resume::rewind(&mut fit_restarts, &mut guard_restarts, changes_from)?;
        }
        if let Some(g) = &guard_at {
            keep(&mut guard_restarts, g, k + 1);
        }
        fit_restarts.retain(|r| r.pos == 0 || restart_at[k + 1..].contains(&Some(r.pos)));
        guard_restarts.retain(|r| r.pos == 0 || restart_at[k + 1..].contains(&Some(r.pos)));
        progress(report.layers.iter().filter(|l| l.step == Step::Ghost).count(), total, &conv.output);
    }
    prof.print();
    // The plan lists layers in the k-means plan's order.
    let order: HashMap<&str, usize> =
        start.layers.iter().enumerate().map(|(i, l)| (l.conv_output.as_str(), i)).collect();
    done.sort_by_key(|l| order[l.conv_output.as_str()]);
    let plan = Plan::new(&model.sha256, plan_opts.max_shift, done);
    plan.validate(analysis).context("internal error: the calibrated plan is invalid")?;
    Ok((plan, weights, report))
}

/// Whether `conv`'s weights can be refit: constant, stride 1, dilation 1, and read by no other
/// node, unless every reader is a Conv with the same weight and bias (CARN's shared blocks: the
/// equations of every use are summed), since one refit could not serve different uses.
fn refittable(model: &Model, index: &GraphIndex<'_>, analysis: &Analysis, conv: &ConvInfo) -> bool {
    let readers =
        |name: &str| model.graph().node.iter().flat_map(|n| &n.input).filter(|i| i.as_str() == name).count();
    let same: Vec<&ConvInfo> = analysis.convs.iter().filter(|c| c.weight == conv.weight).collect();
    readers(&conv.weight) == same.len()
        && same.iter().all(|c| c.bias == conv.bias)
        && conv.bias.as_deref().is_none_or(|b| readers(b) == same.len())
        && index.constant(&conv.weight).is_some()
        && conv.bias.as_deref().is_none_or(|b| index.constant(b).is_some())
        && conv_geom(index, conv).is_some()
}

/// The plan of `conv` with the given intrinsic channels: every other channel a ghost with the
/// source, shift (and, with `affine`, scale and bias) of least error in `stats`.
fn fit_layer(conv: &ConvInfo, stats: &PairStats, intrinsic: Vec<usize>, affine: bool) -> LayerPlan {
    let is_kept: Vec<bool> = (0..conv.c_out).map(|c| intrinsic.binary_search(&c).is_ok()).collect();
    let ghosts: Vec<Ghost> = (0..conv.c_out)
        .filter(|&c| !is_kept[c])
        .map(|c| {
            let (source, di, f) = stats.best(c, &intrinsic, affine);
            Ghost {
                channel: c,
                source,
                shift: stats.shifts[di],
                scale: affine.then_some(f.scale),
                bias: affine.then_some(f.bias),
            }
        })
        .collect();
    LayerPlan {
        conv_output: conv.output.clone(),
        node: conv.node.clone(),
        out_channels: conv.c_out,
        intrinsic,
        ghosts,
    }
}

/// Ridge-refits `conv`'s filters in `intrinsic` (see [`refit`]) from this use's equations and
/// those of earlier uses of the same weights, and records the new weight and bias in `weights`.
/// `x` and `y` hold `views` views of each crop; the refit samples `calib.samples` patches per
/// view (a second view adds equations instead of thinning the first's).
#[allow(clippy::too_many_arguments)]
fn refit_into(
    index: &GraphIndex<'_>,
    conv: &ConvInfo,
    x: &Maps,
    y: &Maps,
    intrinsic: &[usize],
    ghosts: &[Ghost],
    calib: &CalibOptions,
    views: usize,
    equations: &mut HashMap<String, Vec<Vec<refit::GroupEquations>>>,
    weights: &mut WeightSet,
) -> Result<()> {
    let geom = conv_geom(index, conv).context("the Conv's geometry cannot be refit")?;
    let w_t = index.constant(&conv.weight).context("weights are not constant")?;
    let w = onnx::tensor_f32(w_t)?;
    let b_t = conv.bias.as_ref().map(|b| index.constant(b).context("bias is not constant")).transpose()?;
    let b = b_t.map(onnx::tensor_f32).transpose()?;
    let eq = refit::equations(x, y, geom, b.is_some(), intrinsic, ghosts, calib.samples * views.max(1))?;
    let uses = equations.entry(conv.weight.clone()).or_default();
    uses.push(eq);
    let (w_new, b_new) = refit::solve(&w, b.as_deref(), geom, uses, calib.ridge as f64)?;
    weights.tensors.insert(conv.weight.clone(), WeightTensor { dims: w_t.dims.clone(), data: w_new });
    if let (Some(name), Some(b_t), Some(b_new)) = (&conv.bias, b_t, b_new) {
        weights.tensors.insert(name.clone(), WeightTensor { dims: b_t.dims.clone(), data: b_new });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::analysis::{Policy, analyze};
    use crate::onnx::{GraphProto, attr_ints_of, f32_tensor, node, value_info_nchw};

    /// x (1 ch) -> Conv 3x3 with bias (1 -> 4) -> y.
    fn conv_model() -> ModelProto {
        let graph = GraphProto {
            node: vec![node(
                "Conv",
                "conv",
                &["x", "w", "b"],
                &["y"],
                vec![attr_ints_of("kernel_shape", vec![3, 3]), attr_ints_of("pads", vec![1; 4])],
            )],
            initializer: vec![
                f32_tensor(
                    "w",
                    &[4, 1, 3, 3],
                    &(0..36).map(|i| (i % 7) as f32 / 7.0 - 0.4).collect::<Vec<_>>(),
                ),
                f32_tensor("b", &[4], &[0.1, -0.2, 0.0, 0.3]),
            ],
            input: vec![value_info_nchw("x", [Some(1), Some(1), None, None])],
            output: vec![value_info_nchw("y", [Some(1), Some(4), None, None])],
            ..Default::default()
        };
        ModelProto { graph: Some(graph), ..Default::default() }
    }

    fn maps(n: usize, c: usize, seed: usize) -> Maps {
        let mut m = Maps::zeros(n, c, 6, 7);
        for (i, v) in m.data.iter_mut().enumerate() {
            *v = ((i * 31 + seed * 7) % 23) as f32 / 11.0 - 1.0;
        }
        m
    }

    #[test]
    fn first_views_keeps_the_first_view_of_each_crop() {
        // 3 crops x 2 views, each plane filled with its index.
        let mut m = Maps::zeros(6, 2, 2, 2);
        for (i, v) in m.data.iter_mut().enumerate() {
            *v = (i / 8) as f32;
        }
        let f = first_views(&m, 2);
        assert_eq!((f.n, f.c, f.h, f.w), (3, 2, 2, 2));
        assert_eq!(f.data.iter().step_by(8).copied().collect::<Vec<_>>(), vec![0.0, 2.0, 4.0]);
        assert_eq!(first_views(&m, 1), m);
    }

    #[test]
    fn the_refit_samples_its_patch_count_per_view() {
        let p = conv_model();
        let index = GraphIndex::new(p.graph.as_ref().unwrap()).unwrap();
        let analysis = analyze(&index, &Policy::default()).unwrap();
        let conv = &analysis.convs[0];
        // 4 crops of 6x7 (2 crops x 2 views), no shifts: 168 positions to sample from.
        let (x, y) = (maps(4, 1, 1), maps(4, 4, 2));
        let calib = CalibOptions { samples: 10, ..Default::default() };
        // The bias column of the Gram matrix counts the sampled patches.
        let patches = |views: usize| {
            let (mut eqs, mut w) = (HashMap::new(), WeightSet::default());
            refit_into(&index, conv, &x, &y, &[0, 2], &[], &calib, views, &mut eqs, &mut w).unwrap();
            assert!(w.tensors.contains_key("w") && w.tensors.contains_key("b"));
            let g = &eqs["w"][0][0].gram;
            g[[9, 9]]
        };
        // 168 / 10 -> every 17th position: 10 patches; per view (20): every 9th: 19 patches.
        assert_eq!(patches(1), 10.0);
        assert_eq!(patches(2), 19.0);
    }
}
