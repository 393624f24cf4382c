//! The folded form: unshifted ghosts absorbed by the Convs that read them.
//!
//! In the Convs-only form ([`EmitMode::Conv`](super::EmitMode::Conv)) an unshifted ghost stage is
//! one 1x1 "copy" Conv whose filter `c` has a single non-zero weight `s_c` at input `src(c)`:
//! `y_c = s_c x_src(c) + b_c`, with `x` the reduced Conv's output. Where `b_c = 0`, `y = M x`
//! need not be computed if every path from it reaches a Conv through operators that commute with
//! `M`: Relu and LeakyRelu (`f(s v) = s f(v)` for `s >= 0`), channel Split (rows of `M`) and
//! channel Concat (stacked rows over the same `x`; with real tensors beside them, as in a dense
//! block, the reading Conv reads the Concat of those and `x`). A Conv reading `M x` reads `x` (or `f(x)`)
//! with weights `W' = W M` (`W'[:, k] = Σ_{src(c)=k} s_c W[:, c]`): fewer input channels, fewer
//! MACs, no copy Conv; its zero padding stays exact because `M 0 = 0`. Where a tensor meets
//! anything else (Add, Mul, a graph output, a grouped Conv, an op this module does not know), or
//! one of its rows has a bias (or a negative scale behind an activation), exactly its channels
//! are materialised, once, just before that consumer: a 1x1 copy Conv of `x` with their scales
//! and biases, then the activation. So the rewrite is exact: the folded model computes the
//! Convs-only model's function (up to float rounding). A copy that no Conv absorbs is left as it
//! was (one copy Conv). It is channel pruning with the consumers absorbing the pruned channels;
//! the calibration fits the ghosts of channels a Conv could absorb scale-only
//! ([`crate::calib::CalibOptions::scale_only`], [`absorbable_channels`]) and the others affine.
//!
//! This pass reads only the graph (no plan): any 1x1 Conv of that shape folds, so it also
//! applies to a Convs-only ghost model written earlier (`convert g.onnx --emit fold --ratio 0`).

use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use anyhow::{Context, Result};
use serde::Serialize;

use super::{CopyRow, NamePool, copy_conv, keep};
use crate::graph::GraphIndex;
use crate::graph::analysis::{Policy, analyze};
use crate::graph::shapes::Shapes;
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

/// A tensor that is not computed: channels `sel` of the copy `rows` of real tensor `x` (`k`
/// channels), then, with `act`, that activation. A Conv can read it as `x` (or `act(x)`) when
/// every selected row is bias-free (and, behind the activation, non-negative); anything else
/// materialises exactly the selected rows: a 1x1 Conv of `x` with their scales and biases,
/// then the activation.
#[derive(Clone)]
struct Virtual {
    x: String,
    k: usize,
    rows: Rc<Vec<CopyRow>>,
    act: Option<Rc<NodeProto>>,
    sel: Vec<usize>,
    /// The copy Conv's output (the original tensor name).
    origin: Rc<str>,
}

impl Virtual {
    fn absorbable(&self) -> bool {
        let clean = |r: &CopyRow| r.bias == 0.0 && (self.act.is_none() || r.scale >= 0.0);
        self.sel.iter().all(|&i| clean(&self.rows[i]))
    }

    /// Whether `other` selects from the same copy, behind the same activation.
    fn same_source(&self, other: &Virtual) -> bool {
        let act = |v: &Virtual| v.act.as_ref().map(Rc::as_ptr);
        self.x == other.x && Rc::ptr_eq(&self.rows, &other.rows) && act(self) == act(other)
    }
}

/// One input of a deferred channel Concat: a real tensor (`channels` wide) or a virtual one.
#[derive(Clone)]
enum Seg {
    Real(String, usize),
    Virt(Virtual),
}

/// A channel Concat not computed yet because some of its inputs are virtual (a dense block's
/// `Concat(features, relu(ghosted conv))`): a Conv reading it reads the Concat of its real
/// inputs and the virtual inputs' real tensors, with weights to match; anything else gets the
/// original Concat, its virtual inputs materialised.
#[derive(Clone)]
struct Mixed {
    segs: Vec<Seg>,
    node: NodeProto,
}

/// The rows of `n` if it is a copy Conv: 1x1, one group, stride 1, no padding, at most one
/// non-zero weight per filter.
fn copy_rows(n: &NodeProto, index: &GraphIndex<'_>) -> Option<(usize, Vec<CopyRow>)> {
    if n.op_type() != "Conv" || n.domain.as_deref().is_some_and(|d| !d.is_empty()) || n.output.len() != 1 {
        return None;
    }
    let w = index.constant(n.input.get(1)?)?;
    let v = onnx::tensor_f32(w).ok()?;
    let dims = &w.dims;
    if dims.len() != 4 || dims[2] != 1 || dims[3] != 1 || dims[0] <= 0 || dims[1] <= 0 {
        return None;
    }
    if v.len() != onnx::numel(dims) {
        return None;
    }
    let ones = |a: &str| onnx::attr_ints(n, a).is_none_or(|v| v.iter().all(|&x| x == 1));
    let zeros = onnx::attr_ints(n, "pads").is_none_or(|v| v.iter().all(|&x| x == 0));
    let plain_pad = onnx::attr_s(n, "auto_pad").is_none_or(|s| s == "NOTSET" || s == "VALID");
    if onnx::attr_i(n, "group").unwrap_or(1) != 1 || !ones("strides") || !zeros || !plain_pad {
        return None;
    }
    let c = dims[0] as usize;
    let bias = match n.input.get(2).filter(|b| !b.is_empty()) {
        Some(b) => onnx::tensor_f32(index.constant(b)?).ok().filter(|b| b.len() == c)?,
        None => vec![0.0; c],
    };
    let k = dims[1] as usize;
    let mut rows = Vec::with_capacity(c);
    for (f, &b) in v.chunks(k).zip(&bias) {
        let mut nz = f.iter().enumerate().filter(|(_, x)| **x != 0.0);
        let (source, scale) = match (nz.next(), nz.next()) {
            (None, _) => (0, 0.0),
            (Some((j, &s)), None) if s.is_finite() => (j, s),
            _ => return None,
        };
        rows.push(CopyRow { source, scale, bias: b });
    }
    Some((k, rows))
}

/// Whether `n` splits or concatenates along axis 1 of a 4-D tensor.
fn channel_axis(n: &NodeProto, rank: Option<usize>) -> bool {
    let axis = onnx::attr_i(n, "axis").unwrap_or(if n.op_type() == "Split" { 0 } else { -1 });
    rank == Some(4) && (axis == 1 || axis == -3)
}

struct Folder<'a> {
    index: &'a GraphIndex<'a>,
    shapes: &'a crate::graph::shapes::Shapes,
    virt: HashMap<String, Virtual>,
    mixed: HashMap<String, Mixed>,
    materialised: HashSet<String>,
    /// `act(x)` already emitted, by (activation node, x).
    activated: HashMap<(usize, String), String>,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    /// Absorbed weights already made: (weight, x, rows) -> name.
    derived: HashMap<String, String>,
    names: NamePool,
    report: FoldReport,
    /// Copies left as they are: no Conv could absorb any part of them (folding would only
    /// split them into several).
    keep: HashSet<String>,
    /// Copies some Conv absorbed.
    used: HashSet<Rc<str>>,
}

impl<'a> Folder<'a> {
    fn add_init(&mut self, base: &str, mut t: TensorProto) -> String {
        let name = self.names.fresh(base);
        t.name = Some(name.clone());
        self.inits.push(t);
        name
    }

    /// `t` computed (if it is virtual: a copy Conv, and the activation, writing it, emitted
    /// once, here).
    fn real(&mut self, t: &str) {
        if let Some(m) = self.mixed.get(t).cloned() {
            if self.materialised.insert(t.to_string()) {
                for i in &m.node.input {
                    self.real(i);
                }
                self.nodes.push(m.node);
            }
            return;
        }
        let Some(v) = self.virt.get(t).cloned() else { return };
        if !self.materialised.insert(t.to_string()) {
            return;
        }
        let rows: Vec<CopyRow> = v.sel.iter().map(|&i| v.rows[i]).collect();
        let copied = match v.act {
            Some(_) => self.names.fresh(&format!("{t}/ghostsr_fold_pre")),
            None => t.to_string(),
        };
        let prefix = format!("{t}/ghostsr_fold_copy");
        let name = self.names.fresh(&prefix);
        let node =
            copy_conv(&v.x, v.k, &rows, &copied, &name, &prefix, |name, tensor| self.add_init(name, tensor));
        self.nodes.push(node);
        if let Some(act) = &v.act {
            let mut m = (**act).clone();
            m.input[0] = copied;
            m.output[0] = t.to_string();
            m.name = Some(self.names.fresh(&format!("{t}/ghostsr_fold_act")));
            self.nodes.push(m);
        }
        self.report.materialised += 1;
    }

    /// The real tensor a Conv absorbing `v` reads: `x`, or `act(x)` (emitted once).
    fn absorbed_input(&mut self, v: &Virtual) -> String {
        let Some(act) = &v.act else { return v.x.clone() };
        let key = (Rc::as_ptr(act) as usize, v.x.clone());
        if let Some(name) = self.activated.get(&key) {
            return name.clone();
        }
        let out = self.names.fresh(&format!("{}/ghostsr_fold", act.output[0]));
        let mut m = (**act).clone();
        m.input[0] = v.x.clone();
        m.output[0] = out.clone();
        let base = act.name.clone().unwrap_or_else(|| act.output[0].clone());
        m.name = Some(self.names.fresh(&format!("{base}/ghostsr_fold")));
        self.nodes.push(m);
        self.activated.insert(key, out.clone());
        out
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
        let rank = self.shapes.get(&x0).map(<[i64]>::len);
        // A copy Conv of a real tensor: its output is virtual.
        if let Some((k, rows)) = copy_rows(n, self.index)
            && self.shapes.channels(&x0) == Some(k)
            && !self.keep.contains(&n.output[0])
            && !self.virt.contains_key(&x0)
        {
            self.report.copies += 1;
            let sel = (0..rows.len()).collect();
            let origin = Rc::from(n.output[0].as_str());
            let v = Virtual { x: x0, k, rows: Rc::new(rows), act: None, sel, origin };
            self.virt.insert(n.output[0].clone(), v);
            return Ok(());
        }
        // A Concat of selections of one copy is a selection of it.
        if op == "Concat" && channel_axis(n, rank) && n.output.len() == 1 {
            let parts: Option<Vec<Virtual>> = n.input.iter().map(|i| self.virt.get(i).cloned()).collect();
            if let Some(parts) = parts.filter(|p| p.windows(2).all(|w| w[0].same_source(&w[1])))
                && let Some(first) = parts.first()
            {
                let sel = parts.iter().flat_map(|p| p.sel.iter().copied()).collect();
                let v = Virtual { sel, ..first.clone() };
                self.virt.insert(n.output[0].clone(), v);
                return Ok(());
            }
        }
        let deferred = |f: &Self, i: &str| f.virt.contains_key(i) || f.mixed.contains_key(i);
        if op == "Concat"
            && channel_axis(n, rank)
            && n.output.len() == 1
            && n.input.iter().any(|i| deferred(self, i))
        {
            let mut segs = Vec::new();
            for i in &n.input {
                if let Some(v) = self.virt.get(i) {
                    segs.push(Seg::Virt(v.clone()));
                } else if let Some(m) = self.mixed.get(i) {
                    segs.extend(m.segs.iter().cloned());
                } else if let Some(c) = self.shapes.channels(i) {
                    segs.push(Seg::Real(i.clone(), c));
                } else {
                    self.plain(n);
                    return Ok(());
                }
            }
            self.mixed.insert(n.output[0].clone(), Mixed { segs, node: n.clone() });
            return Ok(());
        }
        let only_first = n.input.iter().skip(1).all(|i| !deferred(self, i));
        if op == "Conv"
            && only_first
            && let Some(m) = self.mixed.get(&x0).cloned()
        {
            return self.mixed_conv(n, &m);
        }
        let Some(v) = self.virt.get(&x0).cloned().filter(|_| only_first) else {
            self.plain(n);
            return Ok(());
        };
        match op {
            "Relu" | "LeakyRelu" if v.act.is_none() && n.output.len() == 1 => {
                // f(s x) = s f(x) for s >= 0: bias-free non-negative rows stay absorbable.
                let v = Virtual { act: Some(Rc::new(n.clone())), ..v };
                self.virt.insert(n.output[0].clone(), v);
            }
            "Split" if channel_axis(n, rank) => {
                let sizes: Option<Vec<usize>> = n.output.iter().map(|o| self.shapes.channels(o)).collect();
                match sizes.filter(|s| s.iter().sum::<usize>() == v.sel.len()) {
                    Some(sizes) => {
                        let mut start = 0;
                        for (o, s) in n.output.iter().zip(sizes) {
                            let sel = v.sel[start..start + s].to_vec();
                            self.virt.insert(o.clone(), Virtual { sel, ..v.clone() });
                            start += s;
                        }
                    }
                    None => self.plain(n),
                }
            }
            "Conv" if v.absorbable() => self.conv(n, &v)?,
            _ => self.plain(n),
        }
        Ok(())
    }

    /// The weights of Conv `n` when a fold can rewrite them: constant, ungrouped, 4-D with
    /// `width` input channels, plain float32 of their declared size. Anything else (`None`)
    /// leaves the Conv as it is.
    fn dense_weights(&self, n: &NodeProto, width: usize) -> Option<(&'a TensorProto, Vec<f32>)> {
        let w = self.index.constant(n.input.get(1)?)?;
        let shaped = w.dims.len() == 4 && w.dims.iter().all(|&d| d > 0) && w.dims[1] as usize == width;
        if !shaped || onnx::attr_i(n, "group").unwrap_or(1) != 1 {
            return None;
        }
        let data = onnx::tensor_f32(w).ok().filter(|d| d.len() == onnx::numel(&w.dims))?;
        Some((w, data))
    }

    /// A Conv reading a deferred Concat: reads the Concat of the real inputs and the virtual
    /// inputs' real tensors, each virtual part of its weights absorbed as in [`Self::conv`].
    fn mixed_conv(&mut self, n: &NodeProto, m: &Mixed) -> Result<()> {
        let width: usize = m.segs.iter().map(|s| if let Seg::Real(_, c) = s { *c } else { 0 }).sum::<usize>()
            + m.segs.iter().map(|s| if let Seg::Virt(v) = s { v.sel.len() } else { 0 }).sum::<usize>();
        let ok = m.segs.iter().all(|s| !matches!(s, Seg::Virt(v) if !v.absorbable()));
        let Some((w, data)) = self.dense_weights(n, width).filter(|_| ok) else {
            self.plain(n);
            return Ok(());
        };
        let (c_out, c_in) = (w.dims[0] as usize, w.dims[1] as usize);
        let plane = (w.dims[2] * w.dims[3]) as usize;
        // The new input, segment by segment, and where each old input column goes.
        let mut inputs = Vec::new();
        let mut cols: Vec<(usize, f32)> = Vec::with_capacity(c_in);
        let mut new_c = 0;
        for seg in &m.segs {
            match seg {
                Seg::Real(name, c) => {
                    inputs.push(name.clone());
                    cols.extend((0..*c).map(|j| (new_c + j, 1.0)));
                    new_c += c;
                }
                Seg::Virt(v) => {
                    inputs.push(self.absorbed_input(v));
                    cols.extend(v.sel.iter().map(|&i| (new_c + v.rows[i].source, v.rows[i].scale)));
                    new_c += v.k;
                    self.used.insert(v.origin.clone());
                }
            }
        }
        let mut out = vec![0.0f32; c_out * new_c * plane];
        for o in 0..c_out {
            for (c, &(j, s)) in cols.iter().enumerate() {
                if s == 0.0 {
                    continue;
                }
                let src = &data[(o * c_in + c) * plane..(o * c_in + c + 1) * plane];
                let dst = &mut out[(o * new_c + j) * plane..(o * new_c + j + 1) * plane];
                for (d, &x) in dst.iter_mut().zip(src) {
                    *d += s * x;
                }
            }
        }
        let key = format!("concat {}", inputs.join(" "));
        let cat = match self.derived.get(&key) {
            Some(name) => name.clone(),
            None => {
                let out_name = self.names.fresh(&format!("{}/ghostsr_fold", m.node.output[0]));
                let mut c = m.node.clone();
                c.input = inputs.clone();
                c.output = vec![out_name.clone()];
                let base = m.node.name.clone().unwrap_or_else(|| m.node.output[0].clone());
                c.name = Some(self.names.fresh(&format!("{base}/ghostsr_fold")));
                self.nodes.push(c);
                self.derived.insert(key, out_name.clone());
                out_name
            }
        };
        let dims = [w.dims[0], new_c as i64, w.dims[2], w.dims[3]];
        let wname =
            self.add_init(&format!("{}/ghostsr_folded", n.input[1]), onnx::f32_tensor("", &dims, &out));
        let mut nn = n.clone();
        nn.input[0] = cat;
        nn.input[1] = wname;
        self.nodes.push(nn);
        self.report.absorbed += 1;
        Ok(())
    }

    /// A Conv reading virtual `v` (every selected row absorbable): absorbs it into its weights
    /// when they are constant and ungrouped.
    fn conv(&mut self, n: &NodeProto, v: &Virtual) -> Result<()> {
        let Some((w, data)) = self.dense_weights(n, v.sel.len()) else {
            self.plain(n);
            return Ok(());
        };
        let (c_out, c_in) = (w.dims[0] as usize, w.dims[1] as usize);
        let plane = (w.dims[2] * w.dims[3]) as usize;
        let rows: Vec<(usize, f32)> = v.sel.iter().map(|&i| (v.rows[i].source, v.rows[i].scale)).collect();
        let key = format!("{} {} {:?}", n.input[1], v.x, rows);
        let wname = match self.derived.get(&key) {
            Some(name) => name.clone(),
            None => {
                let mut out = vec![0.0f32; c_out * v.k * plane];
                for o in 0..c_out {
                    for (c, &(j, s)) in rows.iter().enumerate() {
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
        m.input[0] = self.absorbed_input(v);
        m.input[1] = wname;
        self.nodes.push(m);
        self.report.absorbed += 1;
        self.used.insert(v.origin.clone());
        Ok(())
    }
}

/// Which channels of `tensor` (a Conv output of the original graph, `c` channels) a ghost stage
/// could leave to a consumer to absorb: those from which some path reaches an ungrouped Conv
/// with constant weights through Relu, LeakyRelu and channel Splits only. The calibration fits
/// these channels' ghosts scale-only (foldable) and the others affine: those are computed by a
/// copy Conv anyway, where a bias costs nothing.
pub fn absorbable_channels(index: &GraphIndex<'_>, shapes: &Shapes, tensor: &str, c: usize) -> Vec<bool> {
    let mut out = vec![false; c];
    // (tensor t, conv channel j0, channel of t holding j0, width): conv channels j0..j0+width
    // sit at channels t0..t0+width of t.
    let mut stack = vec![(tensor.to_string(), 0usize, 0usize, c)];
    let mut seen = HashSet::new();
    while let Some((t, j0, t0, width)) = stack.pop() {
        if width == 0 || j0 + width > c || !seen.insert((t.clone(), j0, t0, width)) {
            continue;
        }
        for &i in index.consumers(&t) {
            let n = index.node(i);
            let first = n.input.first() == Some(&t);
            if n.domain.as_deref().is_some_and(|d| !d.is_empty()) {
                continue;
            }
            match n.op_type() {
                "Conv" if first => {
                    let w = n.input.get(1).and_then(|w| index.constant(w));
                    if onnx::attr_i(n, "group").unwrap_or(1) == 1 && w.is_some_and(|w| w.dims.len() == 4) {
                        out[j0..j0 + width].fill(true);
                    }
                }
                "Relu" | "LeakyRelu" if first => {
                    stack.extend(n.output.iter().map(|o| (o.clone(), j0, t0, width)))
                }
                "Split" if first && channel_axis(n, Some(4)) => {
                    let mut a = 0;
                    for o in &n.output {
                        let Some(w) = shapes.channels(o) else { break };
                        let (lo, hi) = (a.max(t0), (a + w).min(t0 + width));
                        if lo < hi {
                            stack.push((o.clone(), j0 + lo - t0, lo - a, hi - lo));
                        }
                        a += w;
                    }
                }
                "Concat" if channel_axis(n, Some(4)) && n.output.len() == 1 => {
                    let mut offset = 0;
                    for inp in &n.input {
                        let Some(w) = shapes.channels(inp) else { break };
                        if *inp == t {
                            stack.push((n.output[0].clone(), j0, offset + t0, width));
                        }
                        offset += w;
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// Folds every foldable copy Conv of `model` into its consumers (see the module doc).
pub fn fold(model: &ModelProto) -> Result<(ModelProto, FoldReport)> {
    let graph = model.graph.as_ref().context("the model has no graph")?;
    let index = GraphIndex::new(graph)?;
    let analysis = analyze(&index, &Policy::default())?;
    let pass = |keep: HashSet<String>| -> Result<Folder<'_>> {
        let mut f = Folder {
            index: &index,
            shapes: &analysis.shapes,
            virt: HashMap::new(),
            mixed: HashMap::new(),
            materialised: HashSet::new(),
            activated: HashMap::new(),
            nodes: vec![],
            inits: vec![],
            derived: HashMap::new(),
            names: NamePool::of(graph),
            report: FoldReport::default(),
            keep,
            used: HashSet::new(),
        };
        for node in &graph.node {
            f.node(node).with_context(|| format!("folding {}", crate::graph::describe(node)))?;
        }
        for out in &graph.output {
            if let Some(name) = out.name.as_deref() {
                f.real(name);
            }
        }
        Ok(f)
    };
    let mut f = pass(HashSet::new())?;
    // A copy that no Conv absorbed stays one copy Conv: run again leaving those alone.
    let unused: HashSet<String> =
        f.virt.values().filter(|v| !f.used.contains(&v.origin)).map(|v| v.origin.to_string()).collect();
    if !unused.is_empty() {
        f = pass(unused)?;
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
            node: [
                vec![onnx::node(
                    "Conv",
                    "c1",
                    &["x", "w1"],
                    &["y"],
                    vec![onnx::attr_ints_of("pads", vec![1; 4])],
                )],
                tail,
            ]
            .concat(),
            initializer: vec![
                onnx::f32_tensor("w1", &[8, 4, 3, 3], &[0.1; 8 * 4 * 9]),
                onnx::f32_tensor("w2", w2, &vec![0.1; w2n as usize]),
            ],
            input: vec![onnx::value_info_nchw("x", [Some(1), Some(4), Some(8), Some(8)])],
            ..Default::default()
        }
    }

    fn absorbable_in(g: &GraphProto) -> bool {
        absorbable_channels_in(g).iter().any(|&a| a)
    }

    fn absorbable_channels_in(g: &GraphProto) -> Vec<bool> {
        let index = GraphIndex::new(g).unwrap();
        let shapes = analyze(&index, &Policy::default()).unwrap().shapes;
        absorbable_channels(&index, &shapes, "y", 8)
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
        assert_eq!(absorbable_channels_in(&g), [false, false, false, false, true, true, true, true]);
        let g = graph(vec![act.clone(), split(["p", "q"]), add.clone(), conv("q", 2)], &[4, 2, 3, 3]);
        assert!(!absorbable_in(&g), "a grouped Conv cannot absorb");
        let g =
            graph(vec![onnx::node("Add", "add", &["y", "y"], &["p"], vec![]), conv("p", 1)], &[4, 8, 3, 3]);
        assert!(!absorbable_in(&g), "an Add in between needs the channels");
        let g = graph(vec![onnx::node("Sigmoid", "sg", &["y"], &["p"], vec![]), conv("p", 1)], &[4, 8, 3, 3]);
        assert!(!absorbable_in(&g), "Sigmoid does not commute with a scale");
        let g = graph(vec![onnx::node("Relu", "r", &["y"], &["p"], vec![]), conv("p", 1)], &[4, 8, 3, 3]);
        assert!(absorbable_in(&g));
        // A dense block: Conv(Concat(x, Relu(y))).
        let cat = onnx::node("Concat", "cat", &["x", "a"], &["p"], vec![onnx::attr_int("axis", 1)]);
        let g = graph(vec![act.clone(), cat.clone(), conv("p", 1)], &[4, 12, 3, 3]);
        assert_eq!(absorbable_channels_in(&g), [true; 8]);
        let g =
            graph(vec![act.clone(), cat, onnx::node("Mul", "m", &["p", "p"], &["q"], vec![])], &[4, 4, 3, 3]);
        assert!(!absorbable_in(&g), "a Concat read by a Mul only");
    }

    #[test]
    fn copy_rows_accept_one_weight_per_filter() {
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
        let row = |source, scale, bias| CopyRow { source, scale, bias };
        let rows = vec![row(0, 1.0, 0.0), row(1, 0.5, 0.0), row(0, 0.0, 0.0)];
        assert_eq!(copy(&w, None), Some((2, rows.clone())));
        assert_eq!(copy(&w, Some(&[0.0; 3])), Some((2, rows)));
        let biased = vec![row(0, 1.0, 0.0), row(1, 0.5, 0.1), row(0, 0.0, -2.0)];
        assert_eq!(copy(&w, Some(&[0.0, 0.1, -2.0])), Some((2, biased)), "biases are kept per row");
        assert_eq!(copy(&[1.0, 1.0, 0.0, 0.5, 0.0, 0.0], None), None, "a mix of two channels is no copy");
    }
}
