//! The CPU int8 target: a float model (an original, or a ghost model in the Convs-only form) in,
//! a statically quantized QDQ model out, in the layout ONNX Runtime's CPU provider fuses into
//! QLinearConv / QLinearAdd / QLinearConcat / QLinearLeakyRelu and friends.
//!
//! Every float activation that an int8-capable op reads or writes gets a QuantizeLinear ->
//! DequantizeLinear pair (uint8, asymmetric, one range per tensor); Conv weights become int8
//! per output channel (symmetric, zero point 0) and biases int32 with scale `input scale x
//! weight scale`, each behind a DequantizeLinear. A Relu that is a Conv's only consumer is folded
//! into the Conv's output quantizer (zero point 0 clamps at zero exactly), as ONNX Runtime's own
//! quantizer does. Ranges come from the model's own features on the calibration crops, under a
//! [`RangeRule`]: SR activations have long tails, and min/max spends most of the 256 levels on
//! a few outliers. Why the ghost stage is the Convs-only form (a one-hot 1x1 copy and a one-hot
//! depthwise Conv, both quantized): it keeps the whole network in ONNX Runtime's NHWC int8 path;
//! the Concat-and-permute forms turn Splits of permuted tensors into Gathers (or copy Convs) and
//! their Transposes cost more than the copies, and shifting with Pad/Slice/Concat on the uint8
//! tensor costs more than the depthwise Conv (measured in BENCHMARKS.md). int8 plans default to
//! unshifted ghosts ([`INT8_MAX_SHIFT`]), whose ghost stage is the copy Conv alone, and
//! `--target cpu-int8` quantizes the folded form ([`super::fold`]), where the Convs reading
//! those copies absorb them and no copy runs at all.

use std::collections::{HashMap, HashSet};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;

use super::{EmitMode, NamePool};
use crate::calib::data::{self, ImageSource};
use crate::calib::{CalibOptions, capture};
use crate::onnx::{self, ModelProto, NodeProto, TensorProto, tensor_proto::DataType};
use crate::runner::session::ort_err;
use crate::runner::sr::Chw;

/// How an activation's quantization range is chosen from its calibration values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RangeRule {
    /// The smallest and largest value seen (what `quantize_static` does by default).
    MinMax,
    /// The 0.001st and 99.999th percentiles.
    Percentile,
    /// The clipping range, among min/max and percentile ranges from 99.99999% down to 99%, whose
    /// quantize-dequantize round trip has the least squared error on the calibration values.
    Mse,
}

/// Deployment targets `convert --target` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// Float, ONNX Runtime CPU provider: the Convs-only form (`--emit conv`).
    Cpu,
    /// int8, ONNX Runtime CPU provider: the folded form (`--emit fold`: unshifted ghosts absorbed
    /// by the Convs reading them, where exact), then QDQ quantization (`--int8`).
    CpuInt8,
}

/// The emit form and whether to quantize, from `--target`, `--int8` and `--emit`: `cpu-int8`
/// uses the folded form (fastest under int8, BENCHMARKS.md), `cpu` and `--int8` the Convs-only
/// form unless `--emit` asks otherwise; the GhostShift forms cannot be quantized (the op has no
/// int8 kernel).
pub fn resolve(target: Option<Target>, int8: bool, emit: EmitMode) -> Result<(EmitMode, bool)> {
    let int8 = int8 || target == Some(Target::CpuInt8);
    let mode = match (target, emit) {
        (Some(Target::CpuInt8), _) => EmitMode::Fold,
        (Some(Target::Cpu), _) => EmitMode::Conv,
        (None, EmitMode::Plugin) if int8 => EmitMode::Conv,
        (None, m) => m,
    };
    if int8 && matches!(mode, EmitMode::Fused) {
        bail!("--int8 cannot quantize the fused GhostShift form: use --emit conv (the default with --int8)");
    }
    Ok((mode, int8))
}

/// Fewest filters a reduced int8 Conv should keep: ONNX Runtime 1.31's QLinearConv runs a 3x3
/// Conv with 8 filters 2.4x slower than the same Conv with 16 (IMDN's 48->16 Convs ghosted at
/// λ=0.5, per-node profile in BENCHMARKS.md), so ghosting such a Conv costs time under int8.
pub const INT8_MIN_REDUCED_FILTERS: usize = 16;

/// The default `--min-channels` under int8 at ghost ratio `ratio`: the fewest filters a Conv
/// needs for its reduced Conv to keep [`INT8_MIN_REDUCED_FILTERS`].
pub fn int8_min_channels(ratio: f64) -> usize {
    let keep = (1.0 - ratio).max(1e-3);
    (INT8_MIN_REDUCED_FILTERS as f64 / keep - 1e-9).ceil() as usize
}

/// The default `--max-shift` under int8: unshifted ghosts. Their ghost stage is one 1x1 Conv
/// carrying the scales and biases, where a shift needs a one-hot depthwise Conv as well, and
/// ONNX Runtime 1.31's int8 depthwise Conv costs twice the copy (a third of a ghosted layer's
/// time on EDSR-baseline); on IMDN at λ=0.5 unshifted ghosts score as shifted ones do on Set5
/// and run 14 % faster (BENCHMARKS.md).
pub const INT8_MAX_SHIFT: i64 = 0;

/// Ops whose float inputs and outputs are quantized: those ONNX Runtime's CPU provider runs on
/// uint8 data when a DequantizeLinear feeds them and a QuantizeLinear follows.
/// [`MOVES_DATA`] ops among them only move values and keep their input's parameters.
const INT8_OPS: &[&str] = &[
    "Conv",
    "Add",
    "Mul",
    "Concat",
    "LeakyRelu",
    "Sigmoid",
    "GlobalAveragePool",
    "AveragePool",
    "Split",
    "MaxPool",
    "DepthToSpace",
    "SpaceToDepth",
    "Transpose",
    "Reshape",
    "Gather",
];

/// Ops that only move values (ONNX Runtime drops their DequantizeLinear/QuantizeLinear pair
/// when both sides share parameters).
const MOVES_DATA: &[&str] =
    &["Split", "MaxPool", "DepthToSpace", "SpaceToDepth", "Transpose", "Reshape", "Gather"];

/// Fraction of each tail that the percentile rule clips.
const PERCENTILE_TAIL: f64 = 1e-5;
/// Tail fractions the MSE rule tries (0: min/max).
const MSE_TAILS: &[f64] = &[0.0, 1e-7, 1e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2];
/// Calibration values kept per tensor for the range rules (a strided subsample).
const SAMPLES_PER_TENSOR: usize = 1 << 20;

/// What quantization did, for summaries and tests.
#[derive(Clone, Debug, Default, Serialize)]
pub struct QuantReport {
    pub rule: Option<RangeRule>,
    /// Activations behind a QuantizeLinear/DequantizeLinear pair.
    pub activations: usize,
    /// Convs with int8 weights.
    pub convs: usize,
    /// Relus folded into their Conv's output quantizer.
    pub relus_folded: usize,
}

/// An activation's uint8 quantization: `x ≈ scale * (q - zero_point)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QParams {
    pub scale: f32,
    pub zero_point: u8,
}

impl QParams {
    /// uint8 parameters covering `[lo, hi]`, widened to include 0 (zero padding must be exact).
    pub fn from_range(lo: f32, hi: f32) -> Self {
        let (lo, hi) = (lo.min(0.0), hi.max(0.0));
        // A tensor that stayed (almost) zero on every crop, e.g. a dead Relu: scale 1 as ONNX
        // Runtime's quantizer uses, since a tiny scale would overflow the int32 bias of the
        // Conv reading it (bias scale = input scale x weight scale).
        let scale = if hi - lo < 1e-6 { 1.0 } else { (hi - lo) / 255.0 };
        let zero_point = (-lo / scale).round().clamp(0.0, 255.0) as u8;
        Self { scale, zero_point }
    }

    fn round_trip(&self, x: f32) -> f32 {
        let q = (x / self.scale).round_ties_even() + self.zero_point as f32;
        (q.clamp(0.0, 255.0) - self.zero_point as f32) * self.scale
    }
}

/// Calibration values of one tensor: exact extremes and a subsample.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub min: f32,
    pub max: f32,
    pub sample: Vec<f32>,
}

impl Observed {
    fn add(&mut self, data: &[f32], keep: usize) {
        if self.sample.is_empty() {
            self.min = f32::INFINITY;
            self.max = f32::NEG_INFINITY;
        }
        for &v in data {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
        let step = data.len().div_ceil(keep.max(1)).max(1);
        self.sample.extend(data.iter().step_by(step).copied().filter(|v| v.is_finite()));
    }
}

/// The range `rule` picks for `obs`.
pub fn choose_range(obs: &Observed, rule: RangeRule) -> (f32, f32) {
    let mut s: Vec<f32> = obs.sample.clone();
    if s.is_empty() || !obs.min.is_finite() || !obs.max.is_finite() {
        return (0.0, 1.0);
    }
    s.sort_by(f32::total_cmp);
    let tails = |t: f64| -> (f32, f32) {
        if t == 0.0 {
            return (obs.min, obs.max);
        }
        let at = |q: f64| s[((q * (s.len() - 1) as f64).round() as usize).min(s.len() - 1)];
        (at(t), at(1.0 - t))
    };
    match rule {
        RangeRule::MinMax => (obs.min, obs.max),
        RangeRule::Percentile => tails(PERCENTILE_TAIL),
        RangeRule::Mse => {
            let mut best = (f64::INFINITY, (obs.min, obs.max));
            for &t in MSE_TAILS {
                let (lo, hi) = tails(t);
                let q = QParams::from_range(lo, hi);
                let err: f64 = s.iter().map(|&x| ((q.round_trip(x) - x) as f64).powi(2)).sum();
                if err < best.0 {
                    best = (err, (lo, hi));
                }
            }
            best.1
        }
    }
}

/// Which tensors get quantized and how Relus fold, decided from the graph alone.
#[derive(Clone, Debug, Default)]
pub struct QdqLayout {
    /// Activations to quantize, in first-use order, each with the tensor whose values set its
    /// range (itself, or a folded Relu's output).
    pub tensors: Vec<(String, String)>,
    /// Relu nodes (by output) folded into the Conv before them: Relu output -> Conv output.
    pub folded: HashMap<String, String>,
    /// Outputs that take their input's parameters: data movement (Split, MaxPool), which ONNX
    /// Runtime then runs on the uint8 data without requantizing, and Convs that only copy
    /// channels (the ghost stage's one-hot 1x1 Conv), whose copies are then exact.
    pub same_as: HashMap<String, String>,
}

impl QdqLayout {
    /// The tensors to capture during calibration.
    pub fn observed(&self) -> Vec<String> {
        let mut v: Vec<String> = self.tensors.iter().map(|(_, r)| r.clone()).collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Decides what [`quantize`] will quantize in `proto`.
pub fn layout(proto: &ModelProto) -> Result<QdqLayout> {
    let g = proto.graph.as_ref().context("the model has no graph")?;
    let opset = proto
        .opset_import
        .iter()
        .find(|o| o.domain.as_deref().unwrap_or("").is_empty())
        .and_then(|o| o.version)
        .unwrap_or(1);
    ensure!(
        opset >= 13,
        "int8 needs ONNX opset 13 or later (per-channel DequantizeLinear); the model has {opset}"
    );
    let ints = integer_tensors(proto);
    let inits: HashSet<&str> = g.initializer.iter().map(onnx::tensor_name).collect();
    let constants: HashSet<&str> = g
        .node
        .iter()
        .filter(|n| n.op_type() == "Constant")
        .flat_map(|n| n.output.iter().map(String::as_str))
        .collect();
    let outputs: HashSet<&str> = g.output.iter().filter_map(|o| o.name.as_deref()).collect();
    let mut consumers: HashMap<&str, Vec<&NodeProto>> = HashMap::new();
    for n in &g.node {
        for i in n.input.iter().filter(|i| !i.is_empty()) {
            consumers.entry(i.as_str()).or_default().push(n);
        }
    }
    let activation =
        |t: &str| !t.is_empty() && !ints.contains(t) && !inits.contains(t) && !constants.contains(t);
    let inits_by_name: HashMap<&str, &TensorProto> =
        g.initializer.iter().map(|t| (onnx::tensor_name(t), t)).collect();
    let mut out = QdqLayout::default();
    let mut seen = HashSet::new();
    for n in &g.node {
        if n.op_type() == "Conv"
            && let Some(y) = n.output.first()
            && let Some([relu]) = consumers.get(y.as_str()).map(Vec::as_slice)
            && relu.op_type() == "Relu"
            && activation(y)
            && !outputs.contains(y.as_str())
            && relu.output.first().is_some_and(|r| activation(r))
        {
            out.folded.insert(relu.output[0].clone(), y.clone());
        }
    }
    for n in g
        .node
        .iter()
        .filter(|n| INT8_OPS.contains(&n.op_type()) && n.domain.as_deref().unwrap_or("").is_empty())
    {
        let moves = match n.op_type() {
            "Conv" => is_channel_copy(n, &inits_by_name),
            op => MOVES_DATA.contains(&op),
        };
        if moves && let Some(x) = n.input.first().filter(|x| activation(x)) {
            for o in n.output.iter().filter(|o| activation(o) && !out.folded.values().any(|c| c == *o)) {
                out.same_as.insert(o.clone(), x.clone());
            }
        }
        let data_inputs = match n.op_type() {
            // Weights and biases are quantized per channel, not as activations.
            "Conv" => &n.input[..1.min(n.input.len())],
            op if MOVES_DATA.contains(&op) => &n.input[..1.min(n.input.len())],
            _ => &n.input[..],
        };
        for t in data_inputs.iter().chain(n.output.iter()) {
            if !activation(t) || !seen.insert(t.clone()) {
                continue;
            }
            // A folded Relu's output is written by the Conv's quantizer.
            if let Some((relu_out, _)) = out.folded.iter().find(|(_, c)| *c == t) {
                seen.insert(relu_out.clone());
                out.tensors.push((t.clone(), relu_out.clone()));
            } else if !out.folded.contains_key(t) {
                out.tensors.push((t.clone(), t.clone()));
            }
        }
    }
    Ok(out)
}

/// A Conv whose every output is a copy of one input channel: 1x1, one group, no bias, each
/// filter a single 1.
fn is_channel_copy(n: &NodeProto, inits: &HashMap<&str, &TensorProto>) -> bool {
    let Some(w) = n.input.get(1).and_then(|w| inits.get(w.as_str())) else { return false };
    let no_bias = n.input.get(2).is_none_or(|b| b.is_empty());
    let one_group = onnx::attr_i(n, "group").unwrap_or(1) == 1;
    let Ok(v) = onnx::tensor_f32(w) else { return false };
    let Some(&c_out) = w.dims.first() else { return false };
    if !(no_bias && one_group && w.dims.len() == 4 && w.dims[2] == 1 && w.dims[3] == 1 && c_out > 0) {
        return false;
    }
    let c_in = v.len() / c_out as usize;
    v.chunks(c_in.max(1))
        .all(|f| f.iter().filter(|&&x| x == 1.0).count() == 1 && f.iter().all(|&x| x == 0.0 || x == 1.0))
}

/// Tensors that hold integers (shape arithmetic): never quantized.
fn integer_tensors(proto: &ModelProto) -> HashSet<String> {
    let g = proto.graph.as_ref().expect("checked by the caller");
    let float = DataType::Float as i32;
    let mut ints: HashSet<String> = g
        .initializer
        .iter()
        .filter(|t| t.data_type != Some(float))
        .map(|t| onnx::tensor_name(t).to_string())
        .collect();
    let inits: HashSet<&str> = g.initializer.iter().map(onnx::tensor_name).collect();
    for n in &g.node {
        let int_out = match n.op_type() {
            "Shape" | "Size" | "NonZero" | "ArgMax" | "ArgMin" => true,
            "Cast" => onnx::attr_i(n, "to") != Some(float as i64),
            "Constant" => {
                onnx::attr(n, "value").and_then(|a| a.t.as_ref()).is_some_and(|t| t.data_type != Some(float))
                    || onnx::attr(n, "value_ints").is_some()
                    || onnx::attr(n, "value_int").is_some()
            }
            _ => {
                let ins: Vec<&String> = n.input.iter().filter(|i| !i.is_empty()).collect();
                !ins.is_empty()
                    && ins.iter().all(|i| {
                        ints.contains(i.as_str()) || (inits.contains(i.as_str()) && ints.contains(i.as_str()))
                    })
            }
        };
        if int_out {
            ints.extend(n.output.iter().cloned());
        }
    }
    ints
}

/// Runs `proto` on `crops` and records every tensor in `names`.
pub fn observe(
    proto: &ModelProto,
    crops: &[Chw],
    names: &[String],
    threads: usize,
) -> Result<HashMap<String, Observed>> {
    use ort::value::TensorRef;
    let input = capture::input_name(proto)?;
    let outputs: Vec<String> = names.iter().filter(|n| **n != input).cloned().collect();
    let mut session = capture::open(&capture::with_outputs(proto, &outputs)?, threads)?;
    let keep = SAMPLES_PER_TENSOR / crops.len().max(1);
    let mut obs: HashMap<String, Observed> = HashMap::new();
    for x in crops {
        let shape = [1usize, x.channels, x.height, x.width];
        let tensor = TensorRef::from_array_view((shape, &x.data[..])).map_err(ort_err)?;
        let got =
            session.run(ort::inputs![tensor]).map_err(ort_err).context("running the calibration model")?;
        for name in names {
            let values: &[f32] = if *name == input {
                &x.data
            } else {
                let v = got.get(name.as_str()).with_context(|| format!("no output '{name}'"))?;
                v.try_extract_tensor::<f32>().map_err(ort_err).with_context(|| format!("tensor '{name}'"))?.1
            };
            obs.entry(name.clone()).or_default().add(values, keep);
        }
    }
    Ok(obs)
}

/// Rewrites `proto` as a QDQ model: the activations of `lay` quantized with `params` (keyed by
/// the quantized tensor's name), Conv weights int8 per channel, biases int32.
pub fn quantize(
    proto: &ModelProto,
    lay: &QdqLayout,
    params: &HashMap<String, QParams>,
) -> Result<(ModelProto, QuantReport)> {
    let g = proto.graph.as_ref().context("the model has no graph")?;
    let inits: HashMap<&str, &TensorProto> =
        g.initializer.iter().map(|t| (onnx::tensor_name(t), t)).collect();
    let names = NamePool::of(g);
    let graph_outputs: HashSet<&str> = g.output.iter().filter_map(|o| o.name.as_deref()).collect();
    let mut wr = Writer { names, nodes: vec![], inits: vec![] };
    let mut report = QuantReport { relus_folded: lay.folded.len(), ..Default::default() };
    // Quantized tensor -> (what consumers read, its parameters).
    let mut dq: HashMap<String, (String, QParams)> = HashMap::new();
    let pending: HashMap<&str, &str> = lay.tensors.iter().map(|(t, r)| (t.as_str(), r.as_str())).collect();
    let param = |t: &str| params.get(t).copied().with_context(|| format!("no range for tensor '{t}'"));

    // The data input is quantized before any node reads it.
    for v in &g.input {
        if let Some(name) = v.name.as_deref().filter(|n| pending.contains_key(n)) {
            let pair = wr.qdq_pair(name, None, param(name)?);
            dq.insert(name.to_string(), pair);
            report.activations += 1;
        }
    }
    for n in &g.node {
        if n.op_type() == "Relu" && n.output.first().is_some_and(|o| lay.folded.contains_key(o)) {
            continue;
        }
        let mut node = n.clone();
        let in_params = node.input.first().and_then(|i| dq.get(i)).map(|(_, p)| *p);
        for i in node.input.iter_mut() {
            if let Some((read, _)) = dq.get(i.as_str()) {
                *i = read.clone();
            }
        }
        if n.op_type() == "Conv"
            && let Some(xp) = in_params
            && let Some(w) = n.input.get(1).and_then(|w| inits.get(w.as_str()))
            && w.data_type == Some(DataType::Float as i32)
        {
            let at = || format!("quantizing the weights of Conv '{}'", n.name());
            let wv = onnx::tensor_f32(w).with_context(at)?;
            let c_out = *w.dims.first().context("weights without dims").with_context(at)? as usize;
            ensure!(c_out > 0 && wv.len() % c_out == 0, "weights of shape {:?}: {}", w.dims, at());
            let per = wv.len() / c_out;
            let scales: Vec<f32> = (0..c_out)
                .map(|o| wv[o * per..(o + 1) * per].iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0)
                .map(|s| if s > 0.0 { s } else { 1.0 })
                .collect();
            let q: Vec<u8> = wv
                .iter()
                .enumerate()
                .map(|(k, &v)| (v / scales[k / per]).round_ties_even().clamp(-127.0, 127.0) as i8 as u8)
                .collect();
            let base = n.input[1].clone();
            let (wq, ws, wz) = (
                wr.fresh(format!("{base}/int8")),
                wr.fresh(format!("{base}/scale")),
                wr.fresh(format!("{base}/zero_point")),
            );
            wr.inits.push(raw_tensor(&wq, &w.dims, DataType::Int8, q));
            wr.inits.push(onnx::f32_tensor(&ws, &[c_out as i64], &scales));
            wr.inits.push(raw_tensor(&wz, &[c_out as i64], DataType::Int8, vec![0; c_out]));
            let wdq = wr.fresh(format!("{base}/dequantized"));
            let name = wr.fresh(format!("{base}/DequantizeLinear"));
            wr.nodes.push(onnx::node(
                "DequantizeLinear",
                &name,
                &[&wq, &ws, &wz],
                &[&wdq],
                vec![onnx::attr_int("axis", 0)],
            ));
            node.input[1] = wdq;
            if let Some(b) = n.input.get(2).filter(|b| !b.is_empty()).and_then(|b| inits.get(b.as_str())) {
                let bv = onnx::tensor_f32(b).with_context(at)?;
                ensure!(bv.len() == c_out, "bias of {} values for {c_out} filters: {}", bv.len(), at());
                let bs: Vec<f32> = scales.iter().map(|s| s * xp.scale).collect();
                let bq: Vec<u8> = bv
                    .iter()
                    .zip(&bs)
                    .flat_map(|(v, s)| {
                        ((v / s).round_ties_even().clamp(i32::MIN as f32, i32::MAX as f32) as i32)
                            .to_le_bytes()
                    })
                    .collect();
                let bbase = n.input[2].clone();
                let (bqn, bsn, bzn) = (
                    wr.fresh(format!("{bbase}/int32")),
                    wr.fresh(format!("{bbase}/scale")),
                    wr.fresh(format!("{bbase}/zero_point")),
                );
                wr.inits.push(raw_tensor(&bqn, &[c_out as i64], DataType::Int32, bq));
                wr.inits.push(onnx::f32_tensor(&bsn, &[c_out as i64], &bs));
                wr.inits.push(raw_tensor(&bzn, &[c_out as i64], DataType::Int32, vec![0; 4 * c_out]));
                let bdq = wr.fresh(format!("{bbase}/dequantized"));
                let name = wr.fresh(format!("{bbase}/DequantizeLinear"));
                wr.nodes.push(onnx::node(
                    "DequantizeLinear",
                    &name,
                    &[&bqn, &bsn, &bzn],
                    &[&bdq],
                    vec![onnx::attr_int("axis", 0)],
                ));
                node.input[2] = bdq;
            }
            report.convs += 1;
        }
        // A quantized graph output keeps its name on the DequantizeLinear; the node writes a
        // fresh one (ONNX Runtime fuses a Conv only when its output feeds the QuantizeLinear
        // alone).
        let mut outs = vec![];
        for o in node.output.iter_mut() {
            let original = o.clone();
            if pending.contains_key(o.as_str()) && graph_outputs.contains(o.as_str()) {
                *o = wr.fresh(format!("{o}/float"));
            }
            outs.push((original, o.clone()));
        }
        wr.nodes.push(node);
        for (o, written) in &outs {
            let Some(&range_of) = pending.get(o.as_str()) else { continue };
            // A folded Relu: the dequantized Conv output takes the Relu output's name.
            let read_as = if range_of != o { Some(range_of) } else { (written != o).then_some(o.as_str()) };
            let (read, p) = wr.qdq_pair(written, read_as, param(o)?);
            if let Some(r) = read_as {
                dq.insert(r.to_string(), (read.clone(), p));
            }
            dq.insert(o.clone(), (read, p));
            report.activations += 1;
        }
    }
    let mut out = proto.clone();
    let og = out.graph.as_mut().expect("graph checked above");
    og.node = wr.nodes;
    og.initializer.extend(wr.inits);
    let used: HashSet<String> = og.node.iter().flat_map(|n| n.input.iter().cloned()).collect();
    og.initializer.retain(|t| used.contains(onnx::tensor_name(t)));
    let produced: HashSet<String> = og.node.iter().flat_map(|n| n.output.iter().cloned()).collect();
    og.value_info.retain(|v| v.name.as_ref().is_some_and(|n| produced.contains(n)));
    crate::graph::GraphIndex::new(og).context("internal error: the quantized graph is inconsistent")?;
    Ok((out, report))
}

/// The quantized graph being written, and the names taken.
struct Writer {
    names: NamePool,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
}

impl Writer {
    fn fresh(&mut self, base: String) -> String {
        self.names.fresh(&base)
    }

    /// `t -> QuantizeLinear -> DequantizeLinear -> read_as` (a fresh name when `None`).
    fn qdq_pair(&mut self, t: &str, read_as: Option<&str>, p: QParams) -> (String, QParams) {
        let s = self.fresh(format!("{t}/scale"));
        let z = self.fresh(format!("{t}/zero_point"));
        self.inits.push(onnx::f32_tensor(&s, &[], &[p.scale]));
        self.inits.push(raw_tensor(&z, &[], DataType::Uint8, vec![p.zero_point]));
        let q = self.fresh(format!("{t}/quantized"));
        let out = match read_as {
            Some(r) => r.to_string(),
            None => self.fresh(format!("{t}/dequantized")),
        };
        let (qn, dqn) =
            (self.fresh(format!("{t}/QuantizeLinear")), self.fresh(format!("{t}/DequantizeLinear")));
        self.nodes.push(onnx::node("QuantizeLinear", &qn, &[t, &s, &z], &[&q], vec![]));
        self.nodes.push(onnx::node("DequantizeLinear", &dqn, &[&q, &s, &z], &[&out], vec![]));
        (out, p)
    }
}

fn raw_tensor(name: &str, dims: &[i64], ty: DataType, raw: Vec<u8>) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims: dims.to_vec(),
        data_type: Some(ty as i32),
        raw_data: Some(raw),
        ..Default::default()
    }
}

/// Quantizes `proto` with ranges observed on calibration crops from `images` (made as the
/// calibration of ghosts makes them, for this model's kind) under `rule`.
pub fn quantize_calibrated(
    proto: &ModelProto,
    images: &ImageSource,
    calib: &CalibOptions,
    rule: RangeRule,
) -> Result<(ModelProto, QuantReport)> {
    let lay = layout(proto)?;
    if lay.tensors.is_empty() {
        bail!("nothing to quantize: the model has no Conv, Add, Mul, Concat or activation on float data");
    }
    let crops = calibration_crops(proto, images, calib)?;
    let obs = observe(proto, &crops, &lay.observed(), calib.threads)?;
    let mut params: HashMap<String, QParams> = HashMap::new();
    for (t, r) in &lay.tensors {
        let p = match lay.same_as.get(t).and_then(|x| params.get(x)) {
            Some(p) => *p,
            None => {
                let (lo, hi) = choose_range(&obs[r], rule);
                // A folded Relu clamps at zero: the range starts there.
                let lo = if lay.folded.contains_key(r) { 0.0 } else { lo };
                QParams::from_range(lo, hi)
            }
        };
        params.insert(t.clone(), p);
    }
    let (out, mut report) = quantize(proto, &lay, &params)?;
    report.rule = Some(rule);
    Ok((out, report))
}

/// The model-input crops calibration uses, for `proto`'s channels and SR factor.
fn calibration_crops(proto: &ModelProto, images: &ImageSource, calib: &CalibOptions) -> Result<Vec<Chw>> {
    let input = capture::input_name(proto)?;
    let (channels, c_in) = crate::calib::data_channels(proto, &input)?;
    let final_out = proto
        .graph
        .as_ref()
        .and_then(|g| g.output.first())
        .and_then(|o| o.name.clone())
        .context("no graph output")?;
    let mut session =
        capture::open(&capture::prune_to(proto, std::slice::from_ref(&final_out))?, calib.threads)?;
    let factor = crate::calib::probe_factor(&mut session, &input, c_in, &final_out)?;
    let scale = if factor == 1 { calib.scale.unwrap_or(2) } else { factor };
    data::crops(images, &calib.crop_spec(channels, scale, factor == 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{GraphProto, OperatorSetIdProto};

    /// x[1,2,4,4] -> Conv(3x3, 4 filters, bias) -> Relu -> Conv(1x1, 2 filters) -> Add(x) -> y.
    fn model() -> ModelProto {
        let w1: Vec<f32> = (0..4 * 2 * 9).map(|i| ((i * 7) % 11) as f32 * 0.1 - 0.5).collect();
        let w2: Vec<f32> = (0..2 * 4).map(|i| i as f32 * 0.25 - 1.0).collect();
        let pads = onnx::attr_ints_of("pads", vec![1, 1, 1, 1]);
        ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
            graph: Some(GraphProto {
                name: Some("t".into()),
                node: vec![
                    onnx::node("Conv", "c1", &["x", "w1", "b1"], &["a"], vec![pads]),
                    onnx::node("Relu", "r", &["a"], &["ar"], vec![]),
                    onnx::node("Conv", "c2", &["ar", "w2"], &["b"], vec![]),
                    onnx::node("Add", "add", &["b", "x"], &["y"], vec![]),
                ],
                initializer: vec![
                    onnx::f32_tensor("w1", &[4, 2, 3, 3], &w1),
                    onnx::f32_tensor("b1", &[4], &[0.1, -0.2, 0.3, 0.0]),
                    onnx::f32_tensor("w2", &[2, 4, 1, 1], &w2),
                ],
                input: vec![onnx::value_info_nchw("x", [Some(1), Some(2), Some(4), Some(4)])],
                output: vec![onnx::value_info_nchw("y", [None; 4])],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn layout_quantizes_activations_and_folds_the_relu() {
        let lay = layout(&model()).unwrap();
        let t: Vec<(&str, &str)> = lay.tensors.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        // x (Conv and Add input), a (range of the folded Relu's output), b, and the graph output.
        assert_eq!(t, [("x", "x"), ("a", "ar"), ("b", "b"), ("y", "y")]);
        assert_eq!(lay.folded.get("ar").map(String::as_str), Some("a"));
    }

    #[test]
    fn quantize_writes_int8_weights_int32_biases_and_qdq_pairs() {
        let m = model();
        let lay = layout(&m).unwrap();
        let params: HashMap<String, QParams> = [
            ("x".to_string(), QParams::from_range(0.0, 1.0)),
            ("a".to_string(), QParams::from_range(0.0, 2.0)),
            ("b".to_string(), QParams::from_range(-3.0, 3.0)),
            ("y".to_string(), QParams::from_range(-4.0, 4.0)),
        ]
        .into();
        let (q, report) = quantize(&m, &lay, &params).unwrap();
        assert_eq!((report.activations, report.convs, report.relus_folded), (4, 2, 1));
        let g = q.graph.as_ref().unwrap();
        assert!(!g.node.iter().any(|n| n.op_type() == "Relu"), "the Relu is folded");
        let count = |op: &str| g.node.iter().filter(|n| n.op_type() == op).count();
        assert_eq!(count("QuantizeLinear"), 4);
        assert_eq!(count("DequantizeLinear"), 4 + 2 + 1, "activations, weights, the bias");
        // The folded Relu's output is the dequantized Conv output, and c2 reads it.
        let dq_ar = g.node.iter().find(|n| n.output.first().map(String::as_str) == Some("ar")).unwrap();
        assert_eq!(dq_ar.op_type(), "DequantizeLinear");
        let init = |name: &str| g.initializer.iter().find(|t| onnx::tensor_name(t) == name).unwrap();
        let w1 = onnx::tensor_f32(init("w1/scale")).unwrap();
        // Filter 0's largest magnitude maps to ±127.
        let wq = &init("w1/int8").raw_data.as_ref().unwrap()[..18];
        assert!(wq.iter().any(|&v| v as i8 == 127 || v as i8 == -127), "{wq:?} with scale {}", w1[0]);
        // The bias scale is the input scale times each filter's weight scale.
        let bs = onnx::tensor_f32(init("b1/scale")).unwrap();
        for (b, w) in bs.iter().zip(&w1) {
            assert!((b - w * params["x"].scale).abs() < 1e-9);
        }
        let bq = init("b1/int32").raw_data.as_ref().unwrap();
        let b0 = i32::from_le_bytes(bq[..4].try_into().unwrap());
        assert_eq!(b0, (0.1 / bs[0]).round() as i32);
        // The Add reads both operands dequantized and writes a fresh name; the graph output y
        // is its quantize-dequantize round trip.
        let add = g.node.iter().find(|n| n.op_type() == "Add").unwrap();
        assert!(add.input.iter().all(|i| i.ends_with("/dequantized")), "{:?}", add.input);
        assert_eq!(add.output, ["y/float"]);
        let y = g.node.iter().find(|n| n.output.first().map(String::as_str) == Some("y")).unwrap();
        assert_eq!(y.op_type(), "DequantizeLinear");
    }

    #[test]
    fn the_mse_rule_clips_long_tails_and_keeps_uniform_ranges() {
        // A million values in [0, 1) and one outlier at 2: clipping it costs less squared error
        // than the coarser steps that covering it would.
        let mut v: Vec<f32> = (0..1_000_000).map(|i| (i % 1000) as f32 / 1000.0).collect();
        v.push(2.0);
        let mut obs = Observed::default();
        obs.add(&v, v.len());
        assert_eq!(choose_range(&obs, RangeRule::MinMax), (0.0, 2.0));
        let (_, hi) = choose_range(&obs, RangeRule::Mse);
        assert!(hi < 1.01, "MSE keeps the bulk, not the outlier: hi = {hi}");
        let (_, hi) = choose_range(&obs, RangeRule::Percentile);
        assert!(hi < 1.01, "the percentile rule clips it too: hi = {hi}");
        let uniform: Vec<f32> = (0..10_000).map(|i| i as f32 / 10_000.0 - 0.5).collect();
        let mut obs = Observed::default();
        obs.add(&uniform, uniform.len());
        let (lo, hi) = choose_range(&obs, RangeRule::Mse);
        assert!(lo < -0.49 && hi > 0.49, "no tail to clip: {lo} {hi}");
    }

    #[test]
    fn ranges_include_zero_and_round_trip() {
        let p = QParams::from_range(0.5, 2.0);
        assert_eq!(p.zero_point, 0);
        assert!((p.scale - 2.0 / 255.0).abs() < 1e-9);
        let p = QParams::from_range(-1.0, 1.0);
        assert_eq!(p.round_trip(0.0), 0.0);
        // A dead tensor keeps a usable scale (the next Conv's int32 bias must not overflow).
        assert_eq!(QParams::from_range(0.0, 0.0), QParams { scale: 1.0, zero_point: 0 });
        assert!((p.round_trip(5.0) - (255.0 - p.zero_point as f32) * p.scale).abs() < 1e-6);
    }

    #[test]
    fn int8_picks_the_convs_only_form_and_refuses_the_fused_one() {
        let r = |t, i, e| resolve(t, i, e).map_err(|e| e.to_string());
        assert_eq!(r(None, false, EmitMode::Plugin), Ok((EmitMode::Plugin, false)));
        assert_eq!(r(None, true, EmitMode::Plugin), Ok((EmitMode::Conv, true)));
        assert_eq!(r(None, true, EmitMode::Standard), Ok((EmitMode::Standard, true)));
        assert_eq!(r(Some(Target::CpuInt8), false, EmitMode::Plugin), Ok((EmitMode::Fold, true)));
        assert_eq!(r(None, true, EmitMode::Fold), Ok((EmitMode::Fold, true)));
        assert_eq!(r(Some(Target::Cpu), false, EmitMode::Plugin), Ok((EmitMode::Conv, false)));
        assert!(r(None, true, EmitMode::Fused).unwrap_err().contains("fused"));
    }

    #[test]
    fn int8_ghosts_only_convs_whose_reduced_conv_keeps_16_filters() {
        assert_eq!(int8_min_channels(0.0), 16);
        assert_eq!(int8_min_channels(0.5), 32);
        assert_eq!(int8_min_channels(0.75), 64);
        // 16 / 0.625 = 25.6 filters.
        assert_eq!(int8_min_channels(0.375), 26);
    }

    #[test]
    fn a_dead_input_keeps_the_next_bias_in_int32() {
        // The Relu'd tensor "a" was zero on every crop: its range is [0, 0].
        let m = model();
        let lay = layout(&m).unwrap();
        let params: HashMap<String, QParams> = [
            ("x".to_string(), QParams::from_range(0.0, 1.0)),
            ("a".to_string(), QParams::from_range(0.0, 0.0)),
            ("b".to_string(), QParams::from_range(-3.0, 3.0)),
            ("y".to_string(), QParams::from_range(-4.0, 4.0)),
        ]
        .into();
        let (q, _) = quantize(&m, &lay, &params).unwrap();
        let g = q.graph.as_ref().unwrap();
        let scale = g.initializer.iter().find(|t| onnx::tensor_name(t) == "a/scale").unwrap();
        assert_eq!(onnx::tensor_f32(scale).unwrap(), [1.0]);
    }

    #[test]
    fn old_opsets_are_refused() {
        let mut m = model();
        m.opset_import[0].version = Some(11);
        assert!(layout(&m).unwrap_err().to_string().contains("opset 13"));
    }
}
