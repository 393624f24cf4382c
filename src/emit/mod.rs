//! Emitting: apply a [`Plan`] to a model and produce the ghost model.
//!
//! Each planned Conv becomes a reduced Conv (the intrinsic filters, pretrained weights kept), a
//! ghost stage and a Concat. The ghost stage is `ai.ghostsr::GhostShift` in [`EmitMode::Plugin`]
//! and a Gather + one-hot depthwise Conv in [`EmitMode::Standard`] (standard ops only, exactly the
//! same function: the depthwise Conv's zero padding is GhostShift's zero fill, its weight the
//! scale, its bias the bias). [`EmitMode::Fused`] drops the Concat: one GhostShift writes every
//! channel, intrinsic ones as unshifted copies, in the original order; [`EmitMode::Conv`] does
//! the same with a one-hot 1x1 Conv (the copies) and the one-hot depthwise Conv. The Concat lays channels out as intrinsic-then-ghosts, a
//! permutation of the original order; [`channel_order`] carries that permutation through the
//! rest of the graph, absorbing it where that is exact (Conv/ConvTranspose weights, per-channel
//! constants, element-wise ops, Concat, Split) and restoring the original order with a Gather
//! where it is not (unknown ops, DepthToSpace, graph outputs). The result computes exactly the
//! function the plan defines and keeps every graph output in its original channel order.

mod channel_order;
pub mod fold;
pub mod fp16;
mod keep;
pub mod qdq;

use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::graph::analysis::{Analysis, ConvInfo};
use crate::graph::{GraphIndex, describe};
use crate::onnx::{self, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, ValueInfoProto};
use crate::plan::{LayerPlan, Plan};

use crate::ops::GHOST_SHIFT;

/// How ghost channels are computed in the emitted graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EmitMode {
    /// `ai.ghostsr::GhostShift` (needs the plugin at run time; fastest).
    Plugin,
    /// Standard ONNX ops only (Gather + one-hot depthwise Conv); runs anywhere.
    Standard,
    /// One `ai.ghostsr::GhostShift` that writes the whole output in the original channel order
    /// (intrinsic channels as unshifted copies): no Concat, no channel permutation, least memory
    /// traffic. Needs the plugin.
    Fused,
    /// Standard ONNX Convs only, every channel in the original order: the reduced Conv, a
    /// one-hot 1x1 Conv that copies each output channel's source, and a one-hot depthwise Conv
    /// for shift, scale and bias (where no ghost of a Conv shifts, the 1x1 Conv carries scale
    /// and bias and is the whole ghost stage). No Concat, Gather or permutation, so ONNX
    /// Runtime's CPU provider keeps the whole network in its blocked NCHWc layout and fuses the
    /// following Relu or residual Add into the depthwise Conv (fastest there; see BENCHMARKS.md).
    Conv,
    /// The Convs-only form with every unshifted, unbiased ghost stage absorbed by the Convs that
    /// read it (through Relu, LeakyRelu, Split and Concat): they read the reduced Conv's output
    /// with folded weights, so the copy Conv goes and they do fewer MACs ([`fold`]).
    Fold,
}

/// What the emitter did, for summaries and tests.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EmitReport {
    pub layers_rewritten: usize,
    /// Consumers whose weights or constants absorbed a channel permutation.
    pub absorbed: usize,
    /// Gathers inserted to restore or convert a channel order: (tensor, why).
    pub reorders: Vec<(String, String)>,
    /// With [`EmitMode::Fold`]: what folding did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub folded: Option<fold::FoldReport>,
}

/// Applies `plan` (already validated against `analysis`) to `model`.
pub fn emit(
    model: &ModelProto,
    analysis: &Analysis,
    plan: &Plan,
    mode: EmitMode,
) -> Result<(ModelProto, EmitReport)> {
    if mode == EmitMode::Fold {
        let (conv, mut report) = emit(model, analysis, plan, EmitMode::Conv)?;
        let (folded, f) = fold::fold(&conv)?;
        report.folded = Some(f);
        return Ok((folded, report));
    }
    let graph = model.graph.as_ref().context("the model has no graph")?;
    let index = GraphIndex::new(graph)?;
    plan.validate(analysis)?;
    let layers: HashMap<&str, &LayerPlan> =
        plan.active_layers().map(|l| (l.conv_output.as_str(), l)).collect();

    let mut e = Emitter::new(&index, analysis, mode);
    for (i, node) in graph.node.iter().enumerate() {
        let planned = match node.op_type() {
            "Conv" => node.output.first().and_then(|o| layers.get(o.as_str())).copied(),
            _ => None,
        };
        let res = match planned {
            Some(layer) => {
                let conv =
                    analysis.conv_by_output(&layer.conv_output).context("planned Conv not analysed")?;
                e.ghost_conv(node, conv, layer)
            }
            None => e.node(node),
        };
        res.with_context(|| format!("rewriting node #{i} {}", describe(node)))?;
    }
    for out in &graph.output {
        if let Some(name) = out.name.as_deref() {
            e.identity(name, "graph output keeps its original channel order");
        }
    }

    let mut out = model.clone();
    let g = out.graph.as_mut().expect("graph checked above");
    let Emitter { nodes, inits, value_info, report, .. } = e;
    g.node = nodes;
    let new_inits = inits.len();
    g.initializer.extend(inits);
    // Drop what the rewrite replaced (and only that), then annotate the new tensors.
    keep::tidy(g, graph, out.ir_version, new_inits);
    g.value_info.extend(value_info);
    if mode != EmitMode::Standard
        && g.node.iter().any(|n| n.domain.as_deref() == Some(GHOST_SHIFT.domain_str()))
        && !out.opset_import.iter().any(|o| o.domain.as_deref() == Some(GHOST_SHIFT.domain_str()))
    {
        out.opset_import.push(OperatorSetIdProto {
            domain: Some(GHOST_SHIFT.domain_str().into()),
            version: Some(GHOST_SHIFT.version),
        });
    }
    // Consistency check: every input defined before use, no tensor written twice.
    GraphIndex::new(out.graph.as_ref().expect("graph"))
        .context("internal error: the emitted graph is inconsistent")?;
    Ok((out, report))
}

/// The names a graph already uses, tensors and nodes in one pool (so new names stay readable
/// and never collide), handing out fresh ones; shared by every rewrite in this module.
pub(crate) struct NamePool(HashSet<String>);

impl NamePool {
    pub(crate) fn of(g: &onnx::GraphProto) -> Self {
        let mut names: HashSet<String> = g.node.iter().flat_map(|n| n.output.iter().cloned()).collect();
        names.extend(g.initializer.iter().map(|t| onnx::tensor_name(t).to_string()));
        names.extend(g.input.iter().filter_map(|v| v.name.clone()));
        names.extend(g.node.iter().filter_map(|n| n.name.clone()));
        Self(names)
    }

    /// `base`, or `base_k` for the first `k` that is free; taken from then on.
    pub(crate) fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut k = 1;
        while self.0.contains(&name) {
            name = format!("{base}_{k}");
            k += 1;
        }
        self.0.insert(name.clone());
        name
    }
}

/// `stored[j] = original[perm[j]]`: how a tensor's channels are laid out after the rewrite.
pub type Perm = Rc<Vec<usize>>;

pub(crate) struct Emitter<'a> {
    index: &'a GraphIndex<'a>,
    analysis: &'a Analysis,
    mode: EmitMode,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    value_info: Vec<ValueInfoProto>,
    /// Tensors whose stored layout is a permutation: original name -> (stored name, perm).
    perms: HashMap<String, (String, Perm)>,
    /// Original names already materialised in original order by a restoring Gather.
    restored: HashSet<String>,
    /// Converted layouts already materialised: (original name, perm) -> stored name.
    converted: HashMap<(String, Vec<usize>), String>,
    /// Derived constants already emitted, keyed by what they were derived from, so Convs that
    /// shared weights in the original still share them.
    derived: HashMap<String, String>,
    names: NamePool,
    report: EmitReport,
}

impl<'a> Emitter<'a> {
    fn new(index: &'a GraphIndex<'a>, analysis: &'a Analysis, mode: EmitMode) -> Self {
        let names = NamePool::of(index.graph);
        Self {
            index,
            analysis,
            mode,
            nodes: vec![],
            inits: vec![],
            value_info: vec![],
            perms: HashMap::new(),
            restored: HashSet::new(),
            converted: HashMap::new(),
            derived: HashMap::new(),
            names,
            report: EmitReport::default(),
        }
    }

    fn fresh(&mut self, base: &str) -> String {
        self.names.fresh(base)
    }

    fn add_init(&mut self, base: &str, mut t: TensorProto) -> String {
        let name = self.fresh(base);
        t.name = Some(name.clone());
        self.inits.push(t);
        name
    }

    fn annotate(&mut self, name: &str, channels: Option<usize>) {
        self.value_info.push(onnx::value_info_nchw(name, [None, channels.map(|c| c as i64), None, None]));
    }

    pub(crate) fn perm_of(&self, t: &str) -> Option<Perm> {
        self.perms.get(t).map(|(_, p)| p.clone())
    }

    /// The name under which `t` is currently stored (its own name unless permuted).
    pub(crate) fn stored(&self, t: &str) -> String {
        self.perms.get(t).map(|(s, _)| s.clone()).unwrap_or_else(|| t.to_string())
    }

    /// Records that original tensor `t` is produced in layout `perm` and returns the name the
    /// producing node must write. An identity layout keeps the original name.
    pub(crate) fn set_layout(&mut self, t: &str, perm: Option<Perm>) -> String {
        match perm.filter(|p| !is_identity(p)) {
            None => t.to_string(),
            Some(p) => {
                let stored = self.fresh(&format!("{t}/ghostsr_perm"));
                self.annotate(&stored, Some(p.len()));
                self.perms.insert(t.to_string(), (stored.clone(), p));
                stored
            }
        }
    }

    /// `t` in its original channel order: inserts (once) a Gather that restores it.
    pub(crate) fn identity(&mut self, t: &str, why: &str) -> String {
        let Some((stored, perm)) = self.perms.get(t).cloned() else {
            return t.to_string();
        };
        if self.restored.insert(t.to_string()) {
            let inv = inverse(&perm);
            self.gather(&stored, &inv, t, why, t);
        }
        t.to_string()
    }

    /// `t` laid out as `target` (`None` = original order), converting with one Gather if needed.
    pub(crate) fn in_layout(&mut self, t: &str, target: Option<&Perm>, why: &str) -> String {
        let Some(target) = target.filter(|p| !is_identity(p)) else {
            return self.identity(t, why);
        };
        let current = self.perm_of(t);
        if current.as_ref() == Some(target) {
            return self.stored(t);
        }
        let key = (t.to_string(), target.to_vec());
        if let Some(name) = self.converted.get(&key) {
            return name.clone();
        }
        // new[j] = original[target[j]] = stored[inv_current[target[j]]]
        let idx: Vec<usize> = match &current {
            Some(cur) => {
                let inv = inverse(cur);
                target.iter().map(|&c| inv[c]).collect()
            }
            None => target.to_vec(),
        };
        let src = self.stored(t);
        let out = self.fresh(&format!("{t}/ghostsr_reorder"));
        self.gather(&src, &idx, &out, why, t);
        self.converted.insert(key, out.clone());
        out
    }

    /// A Gather along channels that stands in for an original op (a Split of a permuted tensor):
    /// not an extra copy, so not counted as a reorder.
    pub(crate) fn gather_into(&mut self, input: &str, idx: &[usize], output: &str, original: &str) {
        let idx64: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
        let ind = self.add_init(
            &format!("{original}/ghostsr_channels"),
            onnx::i64_tensor("", &[idx64.len() as i64], &idx64),
        );
        let name = self.fresh(&format!("{original}/ghostsr_split"));
        self.nodes.push(onnx::node(
            "Gather",
            &name,
            &[input, &ind],
            &[output],
            vec![onnx::attr_int("axis", 1)],
        ));
        if output != original {
            self.annotate(output, Some(idx.len()));
        }
    }

    fn gather(&mut self, input: &str, idx: &[usize], output: &str, why: &str, original: &str) {
        let idx64: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
        let ind = self.add_init(
            &format!("{original}/ghostsr_order"),
            onnx::i64_tensor("", &[idx64.len() as i64], &idx64),
        );
        let name = self.fresh(&format!("{original}/ghostsr_gather"));
        let node = onnx::node("Gather", &name, &[input, &ind], &[output], vec![onnx::attr_int("axis", 1)]);
        self.nodes.push(node);
        if output != original {
            self.annotate(output, Some(idx.len()));
        }
        self.report.reorders.push((original.to_string(), why.to_string()));
    }

    /// Emits an original node, carrying channel layouts through it.
    fn node(&mut self, node: &NodeProto) -> Result<()> {
        // A subgraph reads outer tensors by their original names: give it those.
        for name in keep::subgraph_reads(node) {
            if self.perms.contains_key(name) {
                self.identity(name, "read inside a subgraph (If/Loop/Scan body)");
            }
        }
        let permuted = node.input.iter().any(|i| self.perms.contains_key(i));
        if !permuted {
            self.nodes.push(node.clone());
            return Ok(());
        }
        channel_order::carry(self, node)
    }

    /// Pushes `node` after restoring every permuted input to its original order.
    pub(crate) fn emit_restored(&mut self, node: &NodeProto, why: &str) {
        let mut n = node.clone();
        for inp in n.input.iter_mut() {
            if self.perms.contains_key(inp.as_str()) {
                *inp = self.identity(inp, why);
            }
        }
        self.nodes.push(n);
    }

    pub(crate) fn push(&mut self, node: NodeProto) {
        self.nodes.push(node);
    }

    pub(crate) fn shapes(&self) -> &crate::graph::shapes::Shapes {
        &self.analysis.shapes
    }

    pub(crate) fn index(&self) -> &GraphIndex<'a> {
        self.index
    }

    /// A new initializer derived from others; `key` describes the derivation completely, and an
    /// identical earlier derivation is reused instead of duplicated.
    pub(crate) fn derived_constant(
        &mut self,
        key: String,
        base: &str,
        make: impl FnOnce() -> TensorProto,
    ) -> String {
        if let Some(name) = self.derived.get(&key) {
            return name.clone();
        }
        let name = self.add_init(base, make());
        self.derived.insert(key, name.clone());
        name
    }

    pub(crate) fn note_absorbed(&mut self) {
        self.report.absorbed += 1;
    }

    /// Rewrites one planned Conv into reduced Conv + ghost stage + Concat.
    fn ghost_conv(&mut self, node: &NodeProto, conv: &ConvInfo, layer: &LayerPlan) -> Result<()> {
        let index = self.index;
        let w_t = index.constant(&conv.weight).context("weights are not constant")?;
        let w = onnx::tensor_f32(w_t)?;
        let dim = w.len() / conv.c_out;
        let bias = match &conv.bias {
            Some(b) => Some(onnx::tensor_f32(index.constant(b).context("bias is not constant")?)?),
            None => None,
        };
        let kept = &layer.intrinsic;
        if !kept.len().is_multiple_of(conv.group) {
            bail!("{} intrinsic filters do not divide into {} groups", kept.len(), conv.group);
        }
        let mut w_red: Vec<f32> = Vec::with_capacity(kept.len() * dim);
        for &c in kept {
            w_red.extend_from_slice(&w[c * dim..(c + 1) * dim]);
        }
        let mut w_dims = w_t.dims.clone();
        w_dims[0] = kept.len() as i64;

        // The input may itself be permuted by an earlier ghost layer: absorb it if we can.
        let x_perm = self.perm_of(&node.input[0]);
        let (x, w_red) = channel_order::conv_input(self, node, &w_red, &w_dims, conv.group)?;
        let absorbed = x != node.input[0];
        let out = &conv.output;
        let key = format!("reduced {} {kept:?} {:?}", conv.weight, x_perm.filter(|_| absorbed));
        let w_name = self.derived_constant(key, &format!("{out}/ghostsr_weight"), || {
            onnx::f32_tensor("", &w_dims, &w_red)
        });
        let mut inputs = vec![x, w_name];
        if let (Some(b), Some(b_name)) = (&bias, &conv.bias) {
            let b_red: Vec<f32> = kept.iter().map(|&c| b[c]).collect();
            let key = format!("reduced {b_name} {kept:?}");
            inputs.push(self.derived_constant(key, &format!("{out}/ghostsr_bias"), || {
                onnx::f32_tensor("", &[kept.len() as i64], &b_red)
            }));
        }
        let intr = self.fresh(&format!("{out}/ghostsr_intrinsic"));
        let mut reduced = node.clone();
        reduced.name = Some(self.fresh(&format!("{}/ghostsr_reduced", node.name.as_deref().unwrap_or(out))));
        reduced.input = inputs;
        reduced.output = vec![intr.clone()];
        self.nodes.push(reduced);
        self.annotate(&intr, Some(kept.len()));

        let pos: HashMap<usize, usize> = kept.iter().enumerate().map(|(j, &c)| (c, j)).collect();
        let entry = |g: &crate::plan::Ghost| Shifted {
            source: pos[&g.source],
            shift: g.shift,
            scale: g.scale(),
            bias: g.bias(),
        };
        if matches!(self.mode, EmitMode::Fused | EmitMode::Conv) {
            // The ghost stage writes the whole output in the original channel order: intrinsic
            // channels are unshifted copies, so no Concat and no permutation downstream.
            let by_channel: HashMap<usize, &crate::plan::Ghost> =
                layer.ghosts.iter().map(|g| (g.channel, g)).collect();
            let entries: Vec<Shifted> = (0..conv.c_out)
                .map(|c| match by_channel.get(&c) {
                    Some(g) => entry(g),
                    None => Shifted { source: pos[&c], shift: [0, 0], scale: 1.0, bias: 0.0 },
                })
                .collect();
            let stored = self.set_layout(out, None);
            if self.mode == EmitMode::Conv {
                self.conv_shift(&intr, kept.len(), &entries, &stored, out);
            } else {
                self.ghost_shift_node(&intr, &entries, &stored, out);
            }
            self.report.layers_rewritten += 1;
            return Ok(());
        }
        let entries: Vec<Shifted> = layer.ghosts_by_channel().into_iter().map(entry).collect();
        let ghost_out = self.fresh(&format!("{out}/ghostsr_ghosts"));
        match self.mode {
            EmitMode::Standard => self.standard_shift(&intr, &entries, &ghost_out, out),
            _ => self.ghost_shift_node(&intr, &entries, &ghost_out, out),
        }
        self.annotate(&ghost_out, Some(entries.len()));
        let order: Perm = Rc::new(layer.emitted_order());
        let stored = self.set_layout(out, Some(order));
        let name = self.fresh(&format!("{out}/ghostsr_concat"));
        self.nodes.push(onnx::node(
            "Concat",
            &name,
            &[&intr, &ghost_out],
            &[&stored],
            vec![onnx::attr_int("axis", 1)],
        ));
        self.report.layers_rewritten += 1;
        Ok(())
    }

    /// `ai.ghostsr::GhostShift(input) -> output` computing `entries` (scales and biases only
    /// when some differ from 1 and 0).
    fn ghost_shift_node(&mut self, input: &str, entries: &[Shifted], output: &str, base: &str) {
        let names = GHOST_SHIFT.attrs;
        let attr = |c: &'static std::ffi::CStr| crate::ops::ghost_shift::cstr_str(c);
        let mut attrs = vec![
            onnx::attr_ints_of(attr(names.sources), entries.iter().map(|e| e.source as i64).collect()),
            onnx::attr_ints_of(attr(names.shifts), entries.iter().flat_map(|e| e.shift).collect()),
        ];
        if entries.iter().any(|e| e.scale != 1.0) {
            attrs.push(onnx::attr_floats_of(attr(names.scales), entries.iter().map(|e| e.scale).collect()));
        }
        if entries.iter().any(|e| e.bias != 0.0) {
            attrs.push(onnx::attr_floats_of(attr(names.biases), entries.iter().map(|e| e.bias).collect()));
        }
        let name = self.fresh(&format!("{base}/ghostsr_shift"));
        let mut n = onnx::node(GHOST_SHIFT.name_str(), &name, &[input], &[output], attrs);
        n.domain = Some(GHOST_SHIFT.domain_str().into());
        self.nodes.push(n);
    }

    /// The same function as [`Self::ghost_shift_node`] in Convs only: a 1x1 Conv whose one-hot
    /// rows copy each entry's source out of the `c_in` channels of `input`, then the one-hot
    /// depthwise Conv of [`Self::depthwise_shift`]. A copy through a one-hot row is exact (the
    /// other terms are zeros), and unlike a Gather a Conv keeps ONNX Runtime's blocked layout.
    /// When no entry shifts (a `--max-shift 0` plan, or a layer whose ghosts all fit unshifted)
    /// the 1x1 Conv carries the scales and biases itself and is the whole ghost stage: the
    /// depthwise Conv would only repeat them (and costs twice the copy under int8, see
    /// BENCHMARKS.md).
    fn conv_shift(&mut self, input: &str, c_in: usize, entries: &[Shifted], output: &str, base: &str) {
        let unshifted = entries.iter().all(|e| e.shift == [0, 0]);
        let rows: Vec<CopyRow> = entries
            .iter()
            .map(|e| match unshifted {
                true => CopyRow { source: e.source, scale: e.scale, bias: e.bias },
                false => CopyRow { source: e.source, scale: 1.0, bias: 0.0 },
            })
            .collect();
        let copied =
            if unshifted { output.to_string() } else { self.fresh(&format!("{base}/ghostsr_sources")) };
        let prefix = format!("{base}/ghostsr_select");
        let name = self.fresh(&prefix);
        let node = copy_conv(input, c_in, &rows, &copied, &name, &prefix, |name, tensor| {
            self.add_init(name, tensor)
        });
        self.nodes.push(node);
        if unshifted {
            return;
        }
        self.annotate(&copied, Some(entries.len()));
        self.depthwise_shift(&copied, entries, output, base);
    }

    /// The same function as [`Self::ghost_shift_node`] in standard ops: Gather the sources, then
    /// a depthwise Conv whose one-hot kernel moves each channel by (dy, dx). With padding m,
    /// `out[h,w] = sum K[i,j] x[h+i-m, w+j-m]`, so the tap at (m-dy, m-dx) reads x[h-dy, w-dx];
    /// the zero padding is GhostShift's zero fill, the tap's weight the scale, the Conv bias the
    /// bias.
    fn standard_shift(&mut self, input: &str, entries: &[Shifted], output: &str, base: &str) {
        let sources: Vec<i64> = entries.iter().map(|e| e.source as i64).collect();
        let idx = self.add_init(
            &format!("{base}/ghostsr_source_index"),
            onnx::i64_tensor("", &[sources.len() as i64], &sources),
        );
        let gathered = self.fresh(&format!("{base}/ghostsr_sources"));
        let gname = self.fresh(&format!("{base}/ghostsr_gather_sources"));
        self.nodes.push(onnx::node(
            "Gather",
            &gname,
            &[input, &idx],
            &[&gathered],
            vec![onnx::attr_int("axis", 1)],
        ));
        self.annotate(&gathered, Some(entries.len()));
        self.depthwise_shift(&gathered, entries, output, base);
    }

    /// Depthwise Conv computing `scale * shift(input[k]) + bias` for entry k, whose source is
    /// already at channel k of `input`.
    fn depthwise_shift(&mut self, gathered: &str, entries: &[Shifted], output: &str, base: &str) {
        let m = entries.iter().flat_map(|e| e.shift).map(i64::abs).max().unwrap_or(0);
        let k = (2 * m + 1) as usize;
        let mut kern = vec![0.0f32; entries.len() * k * k];
        for (gi, e) in entries.iter().enumerate() {
            let (i, j) = ((m - e.shift[0]) as usize, (m - e.shift[1]) as usize);
            kern[gi * k * k + i * k + j] = e.scale;
        }
        let c_g = entries.len() as i64;
        let kname = self.add_init(
            &format!("{base}/ghostsr_shift_kernel"),
            onnx::f32_tensor("", &[c_g, 1, k as i64, k as i64], &kern),
        );
        let mut ins = vec![gathered.to_string(), kname];
        if entries.iter().any(|e| e.bias != 0.0) {
            let b: Vec<f32> = entries.iter().map(|e| e.bias).collect();
            ins.push(self.add_init(&format!("{base}/ghostsr_shift_bias"), onnx::f32_tensor("", &[c_g], &b)));
        }
        let name = self.fresh(&format!("{base}/ghostsr_shift"));
        let ins_ref: Vec<&str> = ins.iter().map(String::as_str).collect();
        self.nodes.push(onnx::node(
            "Conv",
            &name,
            &ins_ref,
            &[output],
            vec![
                onnx::attr_int("group", c_g),
                onnx::attr_ints_of("kernel_shape", vec![k as i64, k as i64]),
                onnx::attr_ints_of("pads", vec![m, m, m, m]),
                onnx::attr_ints_of("strides", vec![1, 1]),
                onnx::attr_ints_of("dilations", vec![1, 1]),
            ],
        ));
    }
}

/// One output channel of a ghost stage: `scale * shift(input[source], shift) + bias`, with
/// `source` an index into the reduced Conv's output.
struct Shifted {
    source: usize,
    shift: [i64; 2],
    scale: f32,
    bias: f32,
}

/// One filter of a copy Conv: `scale * x[source] + bias`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct CopyRow {
    pub source: usize,
    pub scale: f32,
    pub bias: f32,
}

/// The one-hot 1x1 "copy" Conv `name`: output channel `o` of `output` is
/// `rows[o].scale * input[rows[o].source] + rows[o].bias`, exact because every other term is a
/// zero. The conv form's unshifted ghost stage (and its source selection before a shift), and
/// the folded form's materialised channels. Its weight (and bias, only when one is non-zero)
/// go through `add_init` as `{prefix}_weight` / `{prefix}_bias`.
pub(crate) fn copy_conv(
    input: &str,
    c_in: usize,
    rows: &[CopyRow],
    output: &str,
    name: &str,
    prefix: &str,
    mut add_init: impl FnMut(&str, TensorProto) -> String,
) -> NodeProto {
    let c_out = rows.len() as i64;
    let mut onehot = vec![0.0f32; rows.len() * c_in];
    for (o, r) in rows.iter().enumerate() {
        onehot[o * c_in + r.source] = r.scale;
    }
    let weight = onnx::f32_tensor("", &[c_out, c_in as i64, 1, 1], &onehot);
    let mut ins = vec![input.to_string(), add_init(&format!("{prefix}_weight"), weight)];
    if rows.iter().any(|r| r.bias != 0.0) {
        let b: Vec<f32> = rows.iter().map(|r| r.bias).collect();
        ins.push(add_init(&format!("{prefix}_bias"), onnx::f32_tensor("", &[c_out], &b)));
    }
    let ins: Vec<&str> = ins.iter().map(String::as_str).collect();
    onnx::node(
        "Conv",
        name,
        &ins,
        &[output],
        vec![
            onnx::attr_ints_of("kernel_shape", vec![1, 1]),
            onnx::attr_ints_of("pads", vec![0, 0, 0, 0]),
            onnx::attr_ints_of("strides", vec![1, 1]),
            onnx::attr_ints_of("dilations", vec![1, 1]),
        ],
    )
}

pub(crate) fn is_identity(p: &[usize]) -> bool {
    p.iter().enumerate().all(|(i, &v)| i == v)
}

pub(crate) fn inverse(p: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; p.len()];
    for (j, &c) in p.iter().enumerate() {
        inv[c] = j;
    }
    inv
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::analysis::{Policy, analyze};
    use crate::onnx::{GraphProto, OperatorSetIdProto};
    use crate::plan::Ghost;

    /// x[1,4,8,8] -> Conv "c1" (16 filters, 3x3) -> y1 -> `tail` nodes; graph output `out`.
    fn model(tail: Vec<NodeProto>, extra: Vec<TensorProto>, out: &str) -> ModelProto {
        let w: Vec<f32> = (0..16 * 4 * 9).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
        let mut initializer = vec![onnx::f32_tensor("w1", &[16, 4, 3, 3], &w)];
        initializer.extend(extra);
        let conv = onnx::node(
            "Conv",
            "c1",
            &["x", "w1"],
            &["y1"],
            vec![
                onnx::attr_ints_of("pads", vec![1, 1, 1, 1]),
                onnx::attr_ints_of("kernel_shape", vec![3, 3]),
            ],
        );
        let mut node = vec![conv];
        node.extend(tail);
        ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
            graph: Some(GraphProto {
                name: Some("t".into()),
                node,
                initializer,
                input: vec![onnx::value_info_nchw("x", [Some(1), Some(4), Some(8), Some(8)])],
                output: vec![onnx::value_info_nchw(out, [None, None, None, None])],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Even channels intrinsic, each odd channel a ghost of the one before: emitted order
    /// [0, 2, .., 14, 1, 3, .., 15].
    fn plan() -> Plan {
        let ghosts = (0..8).map(|k| Ghost {
            channel: 2 * k + 1,
            source: 2 * k,
            shift: [0, 1],
            scale: None,
            bias: None,
        });
        Plan::new(
            "",
            1,
            vec![LayerPlan {
                conv_output: "y1".into(),
                node: "c1".into(),
                out_channels: 16,
                intrinsic: (0..8).map(|k| 2 * k).collect(),
                ghosts: ghosts.collect(),
            }],
        )
    }

    fn run(m: &ModelProto, mode: EmitMode) -> (ModelProto, EmitReport) {
        let index = GraphIndex::new(m.graph.as_ref().unwrap()).unwrap();
        let analysis = analyze(&index, &Policy::default()).unwrap();
        emit(m, &analysis, &plan(), mode).unwrap()
    }

    fn producer<'a>(m: &'a ModelProto, tensor: &str) -> &'a NodeProto {
        m.graph.as_ref().unwrap().node.iter().find(|n| n.output.iter().any(|o| o == tensor)).unwrap()
    }

    #[test]
    fn unknown_ops_get_the_original_order_back() {
        let mut op = onnx::node("Mystery", "m", &["y1"], &["z"], vec![]);
        op.domain = Some("com.example".into());
        for mode in [EmitMode::Plugin, EmitMode::Standard] {
            let (out, report) = run(&model(vec![op.clone()], vec![], "z"), mode);
            let restore = producer(&out, "y1");
            assert_eq!(restore.op_type(), "Gather", "{mode:?}: the unknown op reads a restored y1");
            let mystery = producer(&out, "z");
            assert_eq!(mystery.input, vec!["y1".to_string()]);
            assert_eq!(report.reorders.len(), 1);
            // The restoring indices invert the emitted order.
            let idx_name = &restore.input[1];
            let g = out.graph.as_ref().unwrap();
            let idx =
                onnx::tensor_i64(g.initializer.iter().find(|t| t.name.as_ref() == Some(idx_name)).unwrap())
                    .unwrap();
            let order = plan().layers[0].emitted_order();
            for (c, &j) in idx.iter().enumerate() {
                assert_eq!(order[j as usize], c);
            }
        }
    }

    #[test]
    fn consuming_conv_absorbs_the_order_into_its_weights() {
        let w2: Vec<f32> = (0..8 * 16).map(|i| i as f32).collect();
        let relu = onnx::node("Relu", "r", &["y1"], &["a"], vec![]);
        let c2 = onnx::node(
            "Conv",
            "c2",
            &["a", "w2"],
            &["z"],
            vec![onnx::attr_ints_of("kernel_shape", vec![1, 1])],
        );
        let m = model(vec![relu, c2], vec![onnx::f32_tensor("w2", &[8, 16, 1, 1], &w2)], "z");
        let (out, report) = run(&m, EmitMode::Plugin);
        assert!(report.reorders.is_empty(), "{:?}", report.reorders);
        let c2 = producer(&out, "z");
        let g = out.graph.as_ref().unwrap();
        let w =
            onnx::tensor_f32(g.initializer.iter().find(|t| t.name.as_ref() == Some(&c2.input[1])).unwrap())
                .unwrap();
        let order = plan().layers[0].emitted_order();
        for o in 0..8 {
            for j in 0..16 {
                assert_eq!(w[o * 16 + j], w2[o * 16 + order[j]], "filter {o}, input {j}");
            }
        }
        // The fused and conv forms need no permutation at all.
        for mode in [EmitMode::Fused, EmitMode::Conv] {
            let (out, report) = run(&m, mode);
            assert!(report.reorders.is_empty() && report.absorbed == 0, "{mode:?}");
            assert_eq!(producer(&out, "z").input[1], "w2", "{mode:?}");
        }
    }

    #[test]
    fn conv_form_is_a_one_hot_copy_then_a_one_hot_depthwise_shift() {
        let (out, report) = run(&model(vec![], vec![], "y1"), EmitMode::Conv);
        assert_eq!(report.layers_rewritten, 1);
        let g = out.graph.as_ref().unwrap();
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type()).collect();
        assert_eq!(ops, ["Conv", "Conv", "Conv"], "reduced, copy, shift; no Gather or Concat");
        let weights = |n: &NodeProto| {
            let t = g.initializer.iter().find(|t| t.name.as_ref() == Some(&n.input[1])).unwrap();
            (t.dims.clone(), onnx::tensor_f32(t).unwrap())
        };
        // Copy: output channel c reads intrinsic position c / 2 (channels 2k and 2k+1 both
        // come from intrinsic channel 2k, at position k).
        let (dims, sel) = weights(&g.node[1]);
        assert_eq!(dims, [16, 8, 1, 1]);
        for c in 0..16 {
            for j in 0..8 {
                assert_eq!(sel[c * 8 + j], if j == c / 2 { 1.0 } else { 0.0 }, "copy row {c}");
            }
        }
        // Shift: intrinsic channels take the centre tap, ghosts (shift [0, 1]) the tap at (1, 0).
        let shift = producer(&out, "y1");
        assert_eq!(onnx::attr_i(shift, "group"), Some(16));
        let (dims, k) = weights(shift);
        assert_eq!(dims, [16, 1, 3, 3]);
        for c in 0..16 {
            let tap = if c % 2 == 0 { 4 } else { 3 };
            for (t, &v) in k[c * 9..(c + 1) * 9].iter().enumerate() {
                assert_eq!(v, if t == tap { 1.0 } else { 0.0 }, "channel {c} tap {t}");
            }
        }
    }

    #[test]
    fn unshifted_ghosts_in_the_conv_form_are_one_affine_copy_conv() {
        let mut p = plan();
        for g in &mut p.layers[0].ghosts {
            g.shift = [0, 0];
            g.scale = Some(-0.5);
            g.bias = Some(0.25);
        }
        let m = model(vec![], vec![], "y1");
        let index = GraphIndex::new(m.graph.as_ref().unwrap()).unwrap();
        let analysis = analyze(&index, &Policy::default()).unwrap();
        let (out, _) = emit(&m, &analysis, &p, EmitMode::Conv).unwrap();
        let g = out.graph.as_ref().unwrap();
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type()).collect();
        assert_eq!(ops, ["Conv", "Conv"], "reduced and the affine copy; no depthwise shift");
        let copy = producer(&out, "y1");
        let init = |name: &str| {
            let t = g.initializer.iter().find(|t| t.name.as_deref() == Some(name)).unwrap();
            (t.dims.clone(), onnx::tensor_f32(t).unwrap())
        };
        let (dims, w) = init(&copy.input[1]);
        assert_eq!(dims, [16, 8, 1, 1]);
        let (_, b) = init(&copy.input[2]);
        for c in 0..16 {
            let (scale, bias) = if c % 2 == 0 { (1.0, 0.0) } else { (-0.5, 0.25) };
            for j in 0..8 {
                assert_eq!(w[c * 8 + j], if j == c / 2 { scale } else { 0.0 }, "row {c}");
            }
            assert_eq!(b[c], bias, "bias {c}");
        }
    }

    #[test]
    fn depth_to_space_and_graph_outputs_see_the_original_order() {
        let d2s = onnx::node("DepthToSpace", "d", &["y1"], &["z"], vec![onnx::attr_int("blocksize", 2)]);
        let (out, report) = run(&model(vec![d2s], vec![], "z"), EmitMode::Plugin);
        assert_eq!(producer(&out, "y1").op_type(), "Gather");
        assert_eq!(report.reorders.len(), 1);
        // A ghosted Conv output that is itself a graph output keeps its name and order.
        let (out, _) = run(&model(vec![], vec![], "y1"), EmitMode::Standard);
        assert_eq!(producer(&out, "y1").op_type(), "Gather");
    }
}
