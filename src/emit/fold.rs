//! The folded form: unshifted ghosts absorbed by the Convs that read them.
//!
//! In the Convs-only form ([`EmitMode::Conv`](super::EmitMode::Conv)) an unshifted ghost stage is
//! one 1x1 "copy" Conv whose filter `c` has a single non-zero weight `s_c` at input `src(c)` and
//! no bias: `y_c = s_c x_src(c)`, with `x` the reduced Conv's output. Such a `y = M x` need not
//! be computed when every path from it reaches a Conv through operators that commute with `M`:
//! Relu and LeakyRelu (`f(s v) = s f(v)` for `s >= 0`), channel Split (rows of `M`) and channel
//! Concat (stacked rows over the same `x`). A Conv reading `M x` reads `x` with weights
//! `W' = W M` (`W'[:, k] = Σ_{src(c)=k} s_c W[:, c]`): fewer input channels, fewer MACs, and no
//! copy Conv; its zero padding stays exact because `M 0 = 0`. Where a tensor meets anything
//! else (Add, Mul, a graph output, a grouped Conv, an op this module does not know) it is
//! materialised with the copy Conv, just before that consumer, once. So the rewrite is exact:
//! the folded model computes the Convs-only model's function (up to float rounding), and a
//! ghost stage no consumer can absorb costs what it cost before. It is channel pruning with the
//! consumers absorbing the pruned channels; the calibration's scale-only fits
//! ([`crate::calib::CalibOptions::scale_only`]) make the ghosts of every layer foldable.
//!
//! This pass reads only the graph (no plan): any 1x1 Conv of that shape folds, so it also
//! applies to a Convs-only ghost model written earlier (`convert g.onnx --emit fold --ratio 0`).

use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use anyhow::{Context, Result};
use serde::Serialize;

use super::{NamePool, keep};
use crate::graph::GraphIndex;
use crate::graph::analysis::{Policy, analyze};
use crate::onnx::{self, ModelProto, NodeProto, TensorProto};

/// What folding did.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct FoldReport {
    /// Copy Convs recognised (each an unshifted ghost stage).
    pub copies: usize,
    /// Conv consumers that absorbed a copy into their weights.
    pub absorbed: usize,
    /// Tensors that had to be materialised with a copy Conv (a consumer that cannot absorb).
    pub materialised: usize,
}

/// One row of `M`: output channel = `scale` x channel `source` of the real tensor.
type Rows = Rc<Vec<(usize, f32)>>;

/// A tensor that is not computed: `rows` applied to real tensor `x` (`k` channels).
#[derive(Clone)]
struct Virtual {
    x: String,
    k: usize,
    rows: Rows,
}

/// The rows of `n` if it is a copy Conv: 1x1, one group, stride 1, no padding, no (or a zero)
/// bias, at most one non-zero weight per filter.
fn copy_rows(n: &NodeProto, index: &GraphIndex<'_>) -> Option<(usize, Vec<(usize, f32)>)> {
    if n.op_type() != "Conv" || n.domain.as_deref().is_some_and(|d| !d.is_empty()) || n.output.len() != 1 {
        return None;
    }
    let w = index.constant(n.input.get(1)?)?;
    let v = onnx::tensor_f32(w).ok()?;
    let dims = &w.dims;
    if dims.len() != 4 || dims[2] != 1 || dims[3] != 1 || dims[0] <= 0 || dims[1] <= 0 {
        return None;
    }
    let ones = |a: &str| onnx::attr_ints(n, a).is_none_or(|v| v.iter().all(|&x| x == 1));
    let zeros = onnx::attr_ints(n, "pads").is_none_or(|v| v.iter().all(|&x| x == 0));
    let plain_pad = onnx::attr_s(n, "auto_pad").is_none_or(|s| s == "NOTSET" || s == "VALID");
    if onnx::attr_i(n, "group").unwrap_or(1) != 1 || !ones("strides") || !zeros || !plain_pad {
        return None;
    }
    if let Some(b) = n.input.get(2).filter(|b| !b.is_empty()) {
        let b = onnx::tensor_f32(index.constant(b)?).ok()?;
        if b.iter().any(|&x| x != 0.0) {
            return None;
        }
    }
    let k = dims[1] as usize;
    let mut rows = Vec::with_capacity(dims[0] as usize);
    for f in v.chunks(k) {
        let mut nz = f.iter().enumerate().filter(|(_, x)| **x != 0.0);
        let row = match (nz.next(), nz.next()) {
            (None, _) => (0, 0.0),
            (Some((j, &s)), None) if s.is_finite() => (j, s),
            _ => return None,
        };
        rows.push(row);
    }
    Some((k, rows))
}

/// Channel axis split sizes of `n`'s outputs, when it splits along axis 1 of a 4-D tensor.
fn channel_axis(n: &NodeProto, rank: Option<usize>) -> bool {
    let axis = onnx::attr_i(n, "axis").unwrap_or(if n.op_type() == "Split" { 0 } else { -1 });
    rank == Some(4) && (axis == 1 || axis == -3)
}

struct Folder<'a> {
    index: &'a GraphIndex<'a>,
    shapes: &'a crate::graph::shapes::Shapes,
    virt: HashMap<String, Virtual>,
    materialised: HashSet<String>,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    /// Absorbed weights already made: (weight, x, rows) -> name.
    derived: HashMap<String, String>,
    names: NamePool,
    report: FoldReport,
}

impl Folder<'_> {
    fn add_init(&mut self, base: &str, mut t: TensorProto) -> String {
        let name = self.names.fresh(base);
        t.name = Some(name.clone());
        self.inits.push(t);
        name
    }

    /// `t` computed (if it is virtual: a copy Conv writing it, emitted once, here).
    fn real(&mut self, t: &str) {
        let Some(v) = self.virt.get(t).cloned() else { return };
        if !self.materialised.insert(t.to_string()) {
            return;
        }
        let mut w = vec![0.0f32; v.rows.len() * v.k];
        for (c, &(j, s)) in v.rows.iter().enumerate() {
            w[c * v.k + j] = s;
        }
        let wname = self.add_init(
            &format!("{t}/ghostsr_fold_copy_weight"),
            onnx::f32_tensor("", &[v.rows.len() as i64, v.k as i64, 1, 1], &w),
        );
        let name = self.names.fresh(&format!("{t}/ghostsr_fold_copy"));
        self.nodes.push(onnx::node(
            "Conv",
            &name,
            &[&v.x, &wname],
            &[t],
            vec![
                onnx::attr_ints_of("kernel_shape", vec![1, 1]),
                onnx::attr_ints_of("pads", vec![0, 0, 0, 0]),
                onnx::attr_ints_of("strides", vec![1, 1]),
            ],
        ));
        self.report.materialised += 1;
    }

    /// Emits `n` as it is, its virtual inputs (and those its subgraphs read) materialised.
    fn plain(&mut self, n: &NodeProto) {
        let reads: Vec<String> = keep::reads(n).map(str::to_string).collect();
        for r in reads {
            self.real(&r);
        }
        self.nodes.push(n.clone());
    }

    fn node(&mut self, n: &NodeProto) -> Result<()> {
        let op = if n.domain.as_deref().unwrap_or("").is_empty() { n.op_type() } else { "" };
        let x0 = n.input.first().cloned().unwrap_or_default();
        let v0 = self.virt.get(&x0).cloned();
        let only_first = n.input.iter().skip(1).all(|i| !self.virt.contains_key(i));
        // A copy Conv: its output is virtual (over the copy's input, or composed with it).
        if let Some((k, rows)) = copy_rows(n, self.index)
            && self.shapes.channels(&x0) == Some(k)
        {
            self.report.copies += 1;
            let v = match v0 {
                Some(v) => {
                    let rows = rows.iter().map(|&(j, s)| (v.rows[j].0, s * v.rows[j].1)).collect();
                    Virtual { x: v.x, k: v.k, rows: Rc::new(rows) }
                }
                None => Virtual { x: x0, k, rows: Rc::new(rows) },
            };
            self.virt.insert(n.output[0].clone(), v);
            return Ok(());
        }
        let Some(v) = v0.filter(|_| only_first) else {
            // Concat of virtual tensors over one real tensor stays virtual.
            if op == "Concat" && channel_axis(n, self.shapes.get(&x0).map(<[i64]>::len)) {
                let parts: Option<Vec<Virtual>> = n.input.iter().map(|i| self.virt.get(i).cloned()).collect();
                if let Some(parts) = parts.filter(|p| p.windows(2).all(|w| w[0].x == w[1].x))
                    && let Some(first) = parts.first()
                {
                    let rows: Vec<(usize, f32)> = parts.iter().flat_map(|p| p.rows.iter().copied()).collect();
                    let v = Virtual { x: first.x.clone(), k: first.k, rows: Rc::new(rows) };
                    self.virt.insert(n.output[0].clone(), v);
                    return Ok(());
                }
            }
            self.plain(n);
            return Ok(());
        };
        let rank = self.shapes.get(&x0).map(<[i64]>::len);
        match op {
            "Relu" | "LeakyRelu" if v.rows.iter().all(|&(_, s)| s >= 0.0) && n.output.len() == 1 => {
                // f(M x) = M f(x): the activation runs on the real tensor's k channels.
                let out = self.names.fresh(&format!("{}/ghostsr_fold", n.output[0]));
                let mut m = n.clone();
                m.input[0] = v.x.clone();
                m.output[0] = out.clone();
                if let Some(name) = &n.name {
                    m.name = Some(self.names.fresh(&format!("{name}/ghostsr_fold")));
                }
                self.nodes.push(m);
                self.virt.insert(n.output[0].clone(), Virtual { x: out, k: v.k, rows: v.rows });
            }
            "Split" if channel_axis(n, rank) => {
                let sizes: Option<Vec<usize>> = n.output.iter().map(|o| self.shapes.channels(o)).collect();
                match sizes.filter(|s| s.iter().sum::<usize>() == v.rows.len()) {
                    Some(sizes) => {
                        let mut start = 0;
                        for (o, s) in n.output.iter().zip(sizes) {
                            let rows = Rc::new(v.rows[start..start + s].to_vec());
                            self.virt.insert(o.clone(), Virtual { x: v.x.clone(), k: v.k, rows });
                            start += s;
                        }
                    }
                    None => self.plain(n),
                }
            }
            "Concat" => self.plain(n),
            "Conv" => self.conv(n, &v)?,
            _ => self.plain(n),
        }
        Ok(())
    }

    /// A Conv reading virtual `v`: absorbs `M` into its weights when they are constant and
    /// ungrouped.
    fn conv(&mut self, n: &NodeProto, v: &Virtual) -> Result<()> {
        let w = n.input.get(1).and_then(|w| self.index.constant(w));
        let group = onnx::attr_i(n, "group").unwrap_or(1);
        let Some(w) = w.filter(|w| w.dims.len() == 4 && w.dims[1] as usize == v.rows.len() && group == 1)
        else {
            self.plain(n);
            return Ok(());
        };
        let data = onnx::tensor_f32(w).with_context(|| format!("weights of {}", n.input[1]))?;
        let (c_out, c_in) = (w.dims[0] as usize, w.dims[1] as usize);
        let plane = (w.dims[2] * w.dims[3]) as usize;
        let key = format!("{} {} {:?}", n.input[1], v.x, v.rows);
        let wname = match self.derived.get(&key) {
            Some(name) => name.clone(),
            None => {
                let mut out = vec![0.0f32; c_out * v.k * plane];
                for o in 0..c_out {
                    for (c, &(j, s)) in v.rows.iter().enumerate() {
                        if s == 0.0 {
                            continue;
                        }
                        let src = &data[(o * c_in + c) * plane..(o * c_in + c + 1) * plane];
                        let dst = &mut out[(o * v.k + j) * plane..(o * v.k + j + 1) * plane];
                        for (d, &x) in dst.iter_mut().zip(src) {
                            *d += s * x;
                        }
                    }
                }
                let dims = [w.dims[0], v.k as i64, w.dims[2], w.dims[3]];
                let name = self
                    .add_init(&format!("{}/ghostsr_folded", n.input[1]), onnx::f32_tensor("", &dims, &out));
                self.derived.insert(key, name.clone());
                name
            }
        };
        let mut m = n.clone();
        m.input[0] = v.x.clone();
        m.input[1] = wname;
        self.nodes.push(m);
        self.report.absorbed += 1;
        Ok(())
    }
}

/// Whether a ghost stage on `tensor` (a Conv output of the original graph) could be absorbed
/// anywhere: some path from it reaches an ungrouped Conv with constant weights through Relu,
/// LeakyRelu and channel Splits only. The calibration fits such a layer's ghosts scale-only
/// (foldable); elsewhere a bias-free fit would only lose accuracy, the copy Conv staying anyway.
/// (Concat is not followed: it folds only when all its inputs are copies of one tensor.)
pub fn absorbable(index: &GraphIndex<'_>, tensor: &str) -> bool {
    let mut stack = vec![tensor];
    let mut seen = HashSet::new();
    while let Some(t) = stack.pop() {
        if !seen.insert(t) {
            continue;
        }
        for &i in index.consumers(t) {
            let n = index.node(i);
            if n.domain.as_deref().is_some_and(|d| !d.is_empty())
                || n.input.first().map(String::as_str) != Some(t)
            {
                continue;
            }
            match n.op_type() {
                "Conv" => {
                    let w = n.input.get(1).and_then(|w| index.constant(w));
                    if onnx::attr_i(n, "group").unwrap_or(1) == 1 && w.is_some_and(|w| w.dims.len() == 4) {
                        return true;
                    }
                }
                "Relu" | "LeakyRelu" => stack.extend(n.output.iter().map(String::as_str)),
                "Split" if channel_axis(n, Some(4)) => stack.extend(n.output.iter().map(String::as_str)),
                _ => {}
            }
        }
    }
    false
}

/// Folds every foldable copy Conv of `model` into its consumers (see the module doc).
pub fn fold(model: &ModelProto) -> Result<(ModelProto, FoldReport)> {
    let graph = model.graph.as_ref().context("the model has no graph")?;
    let index = GraphIndex::new(graph)?;
    let analysis = analyze(&index, &Policy::default())?;
    let mut f = Folder {
        index: &index,
        shapes: &analysis.shapes,
        virt: HashMap::new(),
        materialised: HashSet::new(),
        nodes: vec![],
        inits: vec![],
        derived: HashMap::new(),
        names: NamePool::of(graph),
        report: FoldReport::default(),
    };
    for node in &graph.node {
        f.node(node).with_context(|| format!("folding {}", crate::graph::describe(node)))?;
    }
    for out in &graph.output {
        if let Some(name) = out.name.as_deref() {
            f.real(name);
        }
    }
    let Folder { nodes, inits, report, .. } = f;
    let mut out = model.clone();
    let g = out.graph.as_mut().expect("graph checked above");
    g.node = nodes;
    let new_inits = inits.len();
    g.initializer.extend(inits);
    keep::tidy(g, graph, out.ir_version, new_inits);
    GraphIndex::new(out.graph.as_ref().expect("graph"))
        .context("internal error: the folded graph is inconsistent")?;
    Ok((out, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::GraphProto;

    fn graph(tail: Vec<NodeProto>, w2: &[i64]) -> GraphProto {
        let w2n: i64 = w2.iter().product();
        GraphProto {
            node: [vec![onnx::node("Conv", "c1", &["x", "w1"], &["y"], vec![])], tail].concat(),
            initializer: vec![
                onnx::f32_tensor("w1", &[8, 4, 3, 3], &[0.1; 8 * 4 * 9]),
                onnx::f32_tensor("w2", w2, &vec![0.1; w2n as usize]),
            ],
            input: vec![onnx::value_info_nchw("x", [Some(1), Some(4), Some(8), Some(8)])],
            ..Default::default()
        }
    }

    fn absorbable_in(g: &GraphProto) -> bool {
        absorbable(&GraphIndex::new(g).unwrap(), "y")
    }

    #[test]
    fn ghosts_are_absorbable_through_activations_and_channel_splits_into_ungrouped_convs() {
        let split = |out: [&str; 2]| onnx::node("Split", "s", &["a"], &out, vec![onnx::attr_int("axis", 1)]);
        let act = onnx::node("LeakyRelu", "l", &["y"], &["a"], vec![]);
        let add = onnx::node("Add", "add", &["p", "p"], &["z"], vec![]);
        let conv = |x: &str, group: i64| {
            onnx::node("Conv", "c2", &[x, "w2"], &["o"], vec![onnx::attr_int("group", group)])
        };
        let g = graph(vec![act.clone(), split(["p", "q"]), add.clone(), conv("q", 1)], &[4, 4, 3, 3]);
        assert!(absorbable_in(&g), "one Split output reaches a Conv");
        let g = graph(vec![act.clone(), split(["p", "q"]), add.clone(), conv("q", 2)], &[4, 2, 3, 3]);
        assert!(!absorbable_in(&g), "a grouped Conv cannot absorb");
        let g =
            graph(vec![onnx::node("Add", "add", &["y", "y"], &["p"], vec![]), conv("p", 1)], &[4, 8, 3, 3]);
        assert!(!absorbable_in(&g), "an Add in between needs the channels");
        let g = graph(vec![onnx::node("Sigmoid", "sg", &["y"], &["p"], vec![]), conv("p", 1)], &[4, 8, 3, 3]);
        assert!(!absorbable_in(&g), "Sigmoid does not commute with a scale");
        let g = graph(vec![onnx::node("Relu", "r", &["y"], &["p"], vec![]), conv("p", 1)], &[4, 8, 3, 3]);
        assert!(absorbable_in(&g));
    }

    #[test]
    fn copy_rows_accept_one_weight_per_filter_and_no_bias_only() {
        let copy = |w: &[f32], bias: Option<&[f32]>| {
            let mut inits = vec![onnx::f32_tensor("w", &[3, 2, 1, 1], w)];
            let mut ins = vec!["x", "w"];
            if let Some(b) = bias {
                inits.push(onnx::f32_tensor("b", &[3], b));
                ins.push("b");
            }
            let g = GraphProto {
                node: vec![onnx::node(
                    "Conv",
                    "k",
                    &ins,
                    &["y"],
                    vec![onnx::attr_ints_of("kernel_shape", vec![1, 1])],
                )],
                initializer: inits,
                input: vec![onnx::value_info_nchw("x", [Some(1), Some(2), Some(8), Some(8)])],
                ..Default::default()
            };
            let index = GraphIndex::new(&g).unwrap();
            copy_rows(&g.node[0], &index)
        };
        let w = [1.0, 0.0, 0.0, 0.5, 0.0, 0.0];
        assert_eq!(copy(&w, None), Some((2, vec![(0, 1.0), (1, 0.5), (0, 0.0)])));
        assert_eq!(copy(&w, Some(&[0.0; 3])), Some((2, vec![(0, 1.0), (1, 0.5), (0, 0.0)])));
        assert_eq!(copy(&w, Some(&[0.0, 0.1, 0.0])), None, "a bias does not fold");
        assert_eq!(copy(&[1.0, 1.0, 0.0, 0.5, 0.0, 0.0], None), None, "a mix of two channels is no copy");
    }
}
