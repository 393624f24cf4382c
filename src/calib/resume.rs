//! Running only the part of the network a calibration step changes.
//!
//! Calibration decides Convs in graph order, and deciding Conv k (ghosting it, or refitting it)
//! changes no tensor that the nodes before it compute. So the features where the network
//! crosses Conv k's position — the *cut*: every tensor computed before the node and read at or
//! after it — are the same before and after the step. [`Resume`] keeps those features, per set
//! of crops, for the state decided so far; the capture of Conv k's input and output, the guard's
//! run of the network output and the move to the next step's cut all start from there
//! ([`capture::prune_from`]) instead of from the network input. On IMDN this halves the guard's
//! work and makes the captures almost free (BENCHMARKS.md, issue 9).
//!
//! The network in a calibration state is emitted in [`EmitMode::Conv`] form: every original
//! tensor keeps its name and channel order, so a cut named on the original graph is valid in
//! every state. Cut tensors that are not float `[1, C, H, W]` (shapes, scalars) are replaced by
//! the tensors they are computed from. A model with subgraphs (If, Loop) always runs whole.

use std::collections::{BTreeSet, HashMap, HashSet};

use anyhow::{Context, Result, ensure};

use super::capture;
use super::fit::Maps;
use crate::emit::{EmitMode, emit};
use crate::graph::analysis::Analysis;
use crate::onnx::ModelProto;
use crate::plan::{LayerPlan, Plan};
use crate::runner::sr::Chw;
use crate::weights::WeightSet;

/// The cuts of a model's graph (see the module docs).
pub struct Cuts {
    input: String,
    /// Per node: its inputs that depend on the data input.
    dynamic_inputs: Vec<Vec<String>>,
    /// Producing node of each tensor computed from the data input.
    producer: HashMap<String, usize>,
    /// Tensors that can be fed back (float `[1, C, H, W]`; the data input).
    feedable: HashSet<String>,
    /// False for graphs with subgraphs: then every run starts from the input.
    usable: bool,
}

impl Cuts {
    /// The cuts of `proto`; `probe` (one crop) finds which tensors are float NCHW.
    pub fn new(proto: &ModelProto, probe: &Chw, threads: usize) -> Result<Self> {
        let input = capture::input_name(proto)?;
        let g = proto.graph.as_ref().context("the model has no graph")?;
        let mut producer: HashMap<String, usize> = HashMap::new();
        let mut dynamic_inputs = Vec::with_capacity(g.node.len());
        let mut usable = true;
        for (i, n) in g.node.iter().enumerate() {
            usable &= n.attribute.iter().all(|a| a.g.is_none() && a.graphs.is_empty());
            let dyn_in: Vec<String> =
                n.input.iter().filter(|t| **t == input || producer.contains_key(*t)).cloned().collect();
            if !dyn_in.is_empty() {
                for o in n.output.iter().filter(|o| !o.is_empty()) {
                    producer.insert(o.clone(), i);
                }
            }
            dynamic_inputs.push(dyn_in);
        }
        let mut names: Vec<String> = producer.keys().cloned().collect();
        names.sort();
        let mut feedable = if usable && !names.is_empty() {
            // Untyped outputs: ONNX Runtime infers each one's type (shapes are int64).
            let mut p = proto.clone();
            let g = p.graph.as_mut().context("the model has no graph")?;
            let outs: HashSet<String> = g.output.iter().filter_map(|o| o.name.clone()).collect();
            g.output.extend(
                names
                    .iter()
                    .filter(|n| !outs.contains(*n))
                    .map(|n| crate::onnx::ValueInfoProto { name: Some(n.clone()), ..Default::default() }),
            );
            let mut s = capture::open(&p, threads)?;
            capture::nchw_outputs(&mut s, &input, probe, &names)?
        } else {
            HashSet::new()
        };
        feedable.insert(input.clone());
        Ok(Self { input, dynamic_inputs, producer, feedable, usable })
    }

    /// The tensors to keep to resume the network at node `pos` (sorted; position 0: the input).
    pub fn at(&self, pos: usize) -> Vec<String> {
        let mut stack: Vec<&String> = Vec::new();
        for ins in self.dynamic_inputs.iter().skip(pos) {
            stack.extend(ins.iter().filter(|t| self.producer.get(*t).is_none_or(|&p| p < pos)));
        }
        let (mut cut, mut seen) = (BTreeSet::new(), HashSet::new());
        while let Some(t) = stack.pop() {
            if !seen.insert(t) {
                continue;
            }
            match self.producer.get(t) {
                Some(&p) if !self.feedable.contains(t) => stack.extend(self.dynamic_inputs[p].iter()),
                _ => {
                    cut.insert(t.clone());
                }
            }
        }
        cut.into_iter().collect()
    }
}

/// Features of one set of crops at a cut, for the state decided so far.
#[derive(Clone)]
pub struct Resume {
    /// The node the cut is at (0: the network input).
    pub pos: usize,
    pub maps: HashMap<String, Maps>,
}

impl Resume {
    /// The network input: `crops` (all of one size) under the data input's name.
    pub fn start(input: &str, crops: &[Chw]) -> Result<Self> {
        let first = crops.first().context("no calibration crops")?;
        let mut m = Maps { n: crops.len(), c: first.channels, h: first.height, w: first.width, data: vec![] };
        for x in crops {
            ensure!((x.channels, x.height, x.width) == (m.c, m.h, m.w), "calibration crops differ in size");
            m.data.extend_from_slice(&x.data);
        }
        Ok(Self { pos: 0, maps: HashMap::from([(input.to_string(), m)]) })
    }
}

/// The model in a calibration state: `layers` ghosted and `weights` applied, in
/// [`EmitMode::Conv`] form (every original tensor under its own name and channel order).
pub fn state_model(
    proto: &ModelProto,
    analysis: &Analysis,
    sha256: &str,
    max_shift: i64,
    weights: &WeightSet,
    layers: &[LayerPlan],
) -> Result<ModelProto> {
    if layers.is_empty() && weights.tensors.is_empty() {
        return Ok(proto.clone());
    }
    let plan = Plan::new(sha256, max_shift, layers.to_vec());
    Ok(emit(&super::apply_weights(proto, weights)?, analysis, &plan, EmitMode::Conv)?.0)
}

/// `want` in `state`, computed from the features in `from` (those in `from` are copied).
pub fn eval(state: &ModelProto, from: &Resume, want: &[String], threads: usize) -> Result<Vec<Maps>> {
    let stops: HashSet<String> = from.maps.keys().cloned().collect();
    let compute: Vec<String> = want.iter().filter(|w| !stops.contains(*w)).cloned().collect();
    let mut computed: HashMap<String, Maps> = HashMap::new();
    if !compute.is_empty() {
        let (sub, inputs) = capture::prune_from(state, &compute, &stops)?;
        ensure!(!inputs.is_empty(), "internal error: no features to resume the network from");
        let mut s = capture::open(&sub, threads)?;
        let feeds: Vec<(&str, &Maps)> = inputs.iter().map(|n| (n.as_str(), &from.maps[n])).collect();
        let outs = capture::run_fed(&mut s, &feeds, &compute)?;
        computed = compute.into_iter().zip(outs).collect();
    }
    want.iter()
        .map(|w| match from.maps.get(w) {
            Some(m) => Ok(m.clone()),
            None => computed.remove(w).with_context(|| format!("internal error: '{w}' not computed")),
        })
        .collect()
}

/// Moves `r` to the cut at node `pos` in `state`; if `r` is past it, from the latest of
/// `restarts` (still valid features at earlier cuts, the network input first) not past it.
/// Without usable cuts `r` stays at the input.
pub fn advance(
    state: &ModelProto,
    cuts: &Cuts,
    r: &mut Resume,
    restarts: &[Resume],
    pos: usize,
    threads: usize,
) -> Result<()> {
    if !cuts.usable || r.pos == pos {
        return Ok(());
    }
    if r.pos > pos {
        *r = restart(restarts, pos)?;
        if r.pos == pos {
            return Ok(());
        }
    }
    let names = cuts.at(pos);
    let maps = eval(state, r, &names, threads)?;
    *r = Resume { pos, maps: names.into_iter().zip(maps).collect() };
    Ok(())
}

/// After a kept refit of weights that an earlier Conv at node `from` shares, every feature kept
/// after `from` is stale: only the restarts at or before it stay, and the fit crops go back to
/// the latest of them.
pub fn rewind(
    fit_restarts: &mut Vec<Resume>,
    guard_restarts: &mut Vec<Resume>,
    from: usize,
) -> Result<Resume> {
    fit_restarts.retain(|r| r.pos <= from);
    guard_restarts.retain(|r| r.pos <= from);
    restart(fit_restarts, from)
}

/// The latest of `restarts` at or before node `pos`.
pub fn restart(restarts: &[Resume], pos: usize) -> Result<Resume> {
    restarts
        .iter()
        .filter(|r| r.pos <= pos)
        .max_by_key(|r| r.pos)
        .cloned()
        .context("internal error: no features to restart the network from")
}

impl Cuts {
    /// Whether runs can start from a cut (false: always from the input).
    pub fn usable(&self) -> bool {
        self.usable
    }

    /// The data input's name.
    pub fn input(&self) -> &str {
        &self.input
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{
        GraphProto, OperatorSetIdProto, attr_int, attr_ints_of, f32_tensor, i64_tensor, node, value_info_nchw,
    };

    /// x -> Conv(1->4) -> a -> Relu -> r -> Conv(4->1) -> b; y = b * float(shape(a)[1]), the
    /// shape arithmetic computed before the second Conv (as IMDN's contrast layers do).
    fn model() -> ModelProto {
        let conv = |i: &str, w: &str, o: &str| {
            node(
                "Conv",
                o,
                &[i, w],
                &[o],
                vec![attr_ints_of("kernel_shape", vec![3, 3]), attr_ints_of("pads", vec![1; 4])],
            )
        };
        let w = |name: &str, dims: &[i64]| {
            let n = dims.iter().product::<i64>() as usize;
            f32_tensor(name, dims, &(0..n).map(|i| ((i * 37 % 17) as f32 - 8.0) / 20.0).collect::<Vec<_>>())
        };
        let graph = GraphProto {
            name: Some("shapes".into()),
            node: vec![
                conv("x", "w1", "a"),
                node("Relu", "relu", &["a"], &["r"], vec![]),
                node("Shape", "shape", &["a"], &["s"], vec![]),
                node("Gather", "gather", &["s", "one"], &["g"], vec![attr_int("axis", 0)]),
                node("Cast", "cast", &["g"], &["t"], vec![attr_int("to", 1)]),
                conv("r", "w2", "b"),
                node("Mul", "mul", &["b", "t"], &["y"], vec![]),
            ],
            initializer: vec![w("w1", &[4, 1, 3, 3]), w("w2", &[1, 4, 3, 3]), i64_tensor("one", &[], &[1])],
            input: vec![value_info_nchw("x", [Some(1), Some(1), None, None])],
            output: vec![value_info_nchw("y", [Some(1), Some(1), None, None])],
            ..Default::default()
        };
        ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
            graph: Some(graph),
            ..Default::default()
        }
    }

    fn crops() -> Vec<Chw> {
        (0..2)
            .map(|k| Chw {
                channels: 1,
                height: 6,
                width: 7,
                data: (0..42).map(|i| ((i * 13 + k * 5) % 11) as f32 / 10.0).collect(),
            })
            .collect()
    }

    #[test]
    fn a_cut_replaces_shape_arithmetic_by_its_source_and_resumes_exactly() {
        let p = model();
        let crops = crops();
        let cuts = Cuts::new(&p, &crops[0], 1).unwrap();
        // At the second Conv (node 5): a (read by Shape's chain, which is not a feature map)
        // and r; the scalar t and the int64 s, g are recomputed from a.
        assert_eq!(cuts.at(5), vec!["a".to_string(), "r".to_string()]);
        assert_eq!(cuts.at(0), vec!["x".to_string()]);
        let start = Resume::start("x", &crops).unwrap();
        let want = ["y".to_string()];
        let full = eval(&p, &start, &want, 1).unwrap().remove(0);
        let mut r = start.clone();
        let restarts = [start.clone()];
        advance(&p, &cuts, &mut r, &restarts, 5, 1).unwrap();
        assert_eq!(r.pos, 5);
        assert!(!r.maps.contains_key("x"));
        let resumed = eval(&p, &r, &want, 1).unwrap().remove(0);
        assert_eq!((resumed.n, resumed.c, resumed.h, resumed.w), (2, 1, 6, 7));
        let max = full.data.iter().zip(&resumed.data).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(max < 1e-6, "resumed output differs by {max}");
        // The output really depends on t (= 4): not a model whose shape branch is dead.
        assert!(full.data.iter().any(|v| v.abs() > 1e-3));
        // Moving back resumes from the input.
        advance(&p, &cuts, &mut r, &restarts, 0, 1).unwrap();
        assert_eq!(r.pos, 0);
        assert!(r.maps.contains_key("x"));
    }
}
