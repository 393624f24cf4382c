//! Which Convs may be ghosted, and why the others may not.
//!
//! Two kinds of rule. Structural rules decide whether a Conv *can* be rewritten at all (2-D,
//! constant float weights, at least two filters per group, a known channel count); a plan that
//! names a Conv failing them is invalid. Policy rules follow the paper's defaults and decide
//! whether a Conv *should* be ghosted when ghostsr plans by itself: 3x3 kernels (1x1 optional),
//! at least 16 filters, and the first Conv, the last Convs and the Convs feeding an upsampler
//! stay. `--include` overrides the policy (never the structure); `--exclude` always wins.
//! Channel-order consistency (residual Adds, Concat, Split, attention) is not a reason to skip a
//! Conv: the emitter keeps every consumer exact, absorbing or restoring the channel order.

use std::collections::{HashMap, HashSet};

use anyhow::{Result, bail};
use serde::Serialize;

use crate::graph::shapes::{self, Shapes};
use crate::graph::{GraphIndex, describe};
use crate::onnx::{self, NodeProto, tensor_proto::DataType};

/// Knobs of the default policy.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Also ghost 1x1 Convs.
    pub allow_1x1: bool,
    /// Fewest filters (output channels) a Conv needs to be ghosted by default.
    pub min_channels: usize,
    /// Node or output names ghosted regardless of the policy rules.
    pub include: Vec<String>,
    /// Node or output names never ghosted.
    pub exclude: Vec<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Self { allow_1x1: false, min_channels: 16, include: vec![], exclude: vec![] }
    }
}

/// The analysis verdict for one Conv.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// A candidate; `forced` when only `--include` made it one.
    Eligible { forced: bool },
    /// Fails a policy rule (overridable with `--include`).
    Policy(String),
    /// Cannot be rewritten.
    Unsupported(String),
    /// Named by `--exclude`.
    Excluded,
}

impl Verdict {
    pub fn is_eligible(&self) -> bool {
        matches!(self, Verdict::Eligible { .. })
    }

    pub fn reason(&self) -> String {
        match self {
            Verdict::Eligible { forced: false } => "eligible".into(),
            Verdict::Eligible { forced: true } => "eligible (--include)".into(),
            Verdict::Policy(r) => format!("{r} (policy; --include overrides)"),
            Verdict::Unsupported(r) => r.clone(),
            Verdict::Excluded => "excluded by --exclude".into(),
        }
    }
}

/// Facts about one Conv node.
#[derive(Clone, Debug, Serialize)]
pub struct ConvInfo {
    pub node_index: usize,
    pub node: String,
    pub output: String,
    pub input: String,
    pub weight: String,
    pub bias: Option<String>,
    pub c_out: usize,
    /// Input channels of the whole Conv (weight dim 1 times group).
    pub c_in: usize,
    pub group: usize,
    pub kernel: [usize; 2],
    pub verdict: Verdict,
}

impl ConvInfo {
    pub fn filters_per_group(&self) -> usize {
        self.c_out / self.group
    }
}

/// Everything the planner and the emitter need to know about a graph.
pub struct Analysis {
    pub convs: Vec<ConvInfo>,
    pub shapes: Shapes,
}

impl Analysis {
    /// The Conv whose output tensor is `name`.
    pub fn conv_by_output(&self, name: &str) -> Option<&ConvInfo> {
        self.convs.iter().find(|c| c.output == name)
    }

    pub fn eligible(&self) -> impl Iterator<Item = &ConvInfo> {
        self.convs.iter().filter(|c| c.verdict.is_eligible())
    }
}

/// Spatial probe size for shape inference: divisible by the usual scales and strides.
pub const PROBE: i64 = 48;

/// Analyses every Conv of the graph under `policy`.
pub fn analyze(index: &GraphIndex<'_>, policy: &Policy) -> Result<Analysis> {
    let shapes = shapes::infer(index, PROBE);
    let graph = index.graph;
    let conv_ids: Vec<usize> = (0..graph.node.len()).filter(|&i| graph.node[i].op_type() == "Conv").collect();

    // Names given to --include/--exclude must exist: a typo should not silently do nothing.
    for name in policy.include.iter().chain(&policy.exclude) {
        let known = conv_ids.iter().any(|&i| {
            let n = &graph.node[i];
            n.name.as_deref() == Some(name.as_str()) || n.output.first() == Some(name)
        });
        if !known {
            bail!("--include/--exclude names '{name}', but no Conv node has that name or output tensor");
        }
    }

    let feature = |i: usize| -> bool {
        let n = &graph.node[i];
        n.input
            .get(1)
            .and_then(|w| index.constant(w))
            .map(|w| w.dims.first().copied().unwrap_or(0))
            .unwrap_or(0)
            >= policy.min_channels as i64
    };
    let first = reaches_input_without_feature_conv(index, &feature);
    let (last, feeds_upsampler) = downstream_roles(index);

    let mut convs = Vec::new();
    for &i in &conv_ids {
        let n = &graph.node[i];
        let output = n.output.first().cloned().unwrap_or_default();
        let mut info = ConvInfo {
            node_index: i,
            node: n.name.clone().unwrap_or_default(),
            output: output.clone(),
            input: n.input.first().cloned().unwrap_or_default(),
            weight: n.input.get(1).cloned().unwrap_or_default(),
            bias: n.input.get(2).filter(|b| !b.is_empty()).cloned(),
            c_out: 0,
            c_in: 0,
            group: onnx::attr_i(n, "group").unwrap_or(1).max(1) as usize,
            kernel: [0, 0],
            verdict: Verdict::Eligible { forced: false },
        };
        if let Err(reason) = structure(index, &shapes, &mut info) {
            info.verdict = Verdict::Unsupported(reason);
            convs.push(info);
            continue;
        }
        let named = |list: &[String]| list.iter().any(|s| *s == info.node || *s == info.output);
        info.verdict = if named(&policy.exclude) {
            Verdict::Excluded
        } else if named(&policy.include) {
            Verdict::Eligible { forced: true }
        } else if let Some(reason) =
            policy_reason(policy, &info, first.contains(&i), last.contains(&i), feeds_upsampler.get(&i))
        {
            Verdict::Policy(reason)
        } else {
            Verdict::Eligible { forced: false }
        };
        convs.push(info);
    }
    Ok(Analysis { convs, shapes })
}

/// Structural rules; fills the channel and kernel facts. `Err` is the reason it cannot be ghosted.
fn structure(index: &GraphIndex<'_>, shapes: &Shapes, info: &mut ConvInfo) -> Result<(), String> {
    let Some(w) = index.constant(&info.weight) else {
        return Err("weights are computed at run time, not a constant initializer".into());
    };
    if w.data_type != Some(DataType::Float as i32) {
        return Err("weights are not float32".into());
    }
    if w.dims.len() != 4 {
        return Err(format!("not a 2-D convolution (weight rank {})", w.dims.len()));
    }
    if let Some(b) = &info.bias {
        match index.constant(b) {
            Some(t) if t.data_type == Some(DataType::Float as i32) => {}
            _ => return Err("bias is not a constant float32 initializer".into()),
        }
    }
    conv_attributes(index.node(info.node_index), &w.dims)?;
    let (c_out, cin_g) = (w.dims[0] as usize, w.dims[1] as usize);
    info.c_out = c_out;
    info.c_in = cin_g * info.group;
    info.kernel = [w.dims[2] as usize, w.dims[3] as usize];
    if c_out % info.group != 0 {
        return Err(format!("{c_out} filters do not divide into {} groups", info.group));
    }
    if let Some(c) = shapes.channels(&info.input).filter(|&c| c != info.c_in) {
        return Err(format!(
            "the input has {c} channels but the weights expect {cin_g} per group x {} groups = {}",
            info.group, info.c_in
        ));
    }
    if info.filters_per_group() < 2 {
        return Err(format!(
            "depthwise-like Conv ({} filter per group): nothing to share",
            info.filters_per_group()
        ));
    }
    if shapes.channels(&info.output).is_none() {
        return Err("output shape could not be inferred (an operator upstream is not understood)".into());
    }
    Ok(())
}

/// Checks a 2-D Conv's attributes against its weight dims (`[c_out, c_in/group, kh, kw]`): a
/// model with other values is invalid, and its Conv is left alone with the reason.
fn conv_attributes(n: &NodeProto, w: &[i64]) -> Result<(), String> {
    if let Some(d) = w.iter().find(|&&d| d < 1) {
        return Err(format!("invalid weights: dims {w:?} include {d}"));
    }
    let bad = |what: &str| Err(format!("invalid attribute: {what}"));
    if let Some(g) = onnx::attr_i(n, "group").filter(|&g| g < 1) {
        return bad(&format!("group = {g} must be at least 1"));
    }
    let nd = w.len() - 2;
    let checks: [(&str, usize, i64); 4] =
        [("kernel_shape", nd, 1), ("strides", nd, 1), ("dilations", nd, 1), ("pads", 2 * nd, 0)];
    for (name, len, min) in checks {
        let Some(v) = onnx::attr_ints(n, name) else { continue };
        if v.len() != len {
            return bad(&format!("{name} = {v:?} needs {len} values for a {nd}-D Conv"));
        }
        if let Some(x) = v.iter().find(|&&x| x < min) {
            return bad(&format!("{name} = {v:?} has {x}; each value must be at least {min}"));
        }
        if name == "kernel_shape" && v[..] != w[2..] {
            return bad(&format!("kernel_shape = {v:?} differs from the weights' {:?}", &w[2..]));
        }
    }
    if let Some(p) = onnx::attr_s(n, "auto_pad")
        && !matches!(p.as_str(), "NOTSET" | "SAME_UPPER" | "SAME_LOWER" | "VALID")
    {
        return bad(&format!("auto_pad = {p:?} is not NOTSET, SAME_UPPER, SAME_LOWER or VALID"));
    }
    Ok(())
}

fn policy_reason(
    policy: &Policy,
    info: &ConvInfo,
    is_first: bool,
    is_last: bool,
    upsampler: Option<&String>,
) -> Option<String> {
    let [kh, kw] = info.kernel;
    let kernel_ok = (kh == 3 && kw == 3) || (policy.allow_1x1 && kh == 1 && kw == 1);
    if !kernel_ok {
        let allowed = if policy.allow_1x1 { "3x3 and 1x1" } else { "3x3 (1x1 with --allow-1x1)" };
        return Some(format!("{kh}x{kw} kernel; only {allowed} kernels are ghosted"));
    }
    if info.c_out < policy.min_channels {
        return Some(format!("{} filters, fewer than {}", info.c_out, policy.min_channels));
    }
    if is_first {
        return Some("first Conv (reads the network input)".into());
    }
    if is_last {
        return Some("last Conv (its output reaches a graph output with no Conv in between)".into());
    }
    if let Some(op) = upsampler {
        return Some(format!("feeds an upsampler ({op})"));
    }
    None
}

/// Conv nodes whose data input comes from a graph input through no "feature" Conv (one with at
/// least `min_channels` filters): the entry Convs. Small Convs such as a mean shift are looked
/// through, so the first real feature extractor is still the first Conv.
fn reaches_input_without_feature_conv(
    index: &GraphIndex<'_>,
    feature: &dyn Fn(usize) -> bool,
) -> HashSet<usize> {
    let graph = index.graph;
    // raw[t]: tensor t depends on a graph input with no feature Conv on the way.
    let mut raw: HashSet<&str> = index.graph_inputs.iter().copied().collect();
    let mut first = HashSet::new();
    for (i, n) in graph.node.iter().enumerate() {
        let data_inputs: Vec<&String> = if n.op_type() == "Conv" || n.op_type() == "ConvTranspose" {
            n.input.iter().take(1).collect()
        } else {
            n.input.iter().collect()
        };
        let from_raw = data_inputs.iter().any(|t| raw.contains(t.as_str()));
        if n.op_type() == "Conv" && from_raw {
            first.insert(i);
        }
        let passes = from_raw && !(n.op_type() == "Conv" && feature(i));
        if passes {
            for o in &n.output {
                raw.insert(o.as_str());
            }
        }
    }
    first
}

/// Which Convs reach a graph output with no Conv in between (`last`), and which reach an
/// upsampler (DepthToSpace, Resize, Upsample, ConvTranspose) with no Conv in between.
fn downstream_roles(index: &GraphIndex<'_>) -> (HashSet<usize>, HashMap<usize, String>) {
    let graph = index.graph;
    let n = graph.node.len();
    // Backwards over the (topologically sorted) nodes: for each tensor, whether it reaches a
    // graph output / which upsampler it reaches before any Conv.
    let mut to_output: HashSet<&str> = index.graph_outputs.iter().copied().collect();
    let mut to_upsampler: HashMap<&str, String> = HashMap::new();
    for i in (0..n).rev() {
        let node = &graph.node[i];
        let op = node.op_type();
        let is_conv = op == "Conv";
        let is_up = matches!(op, "DepthToSpace" | "Resize" | "Upsample" | "ConvTranspose");
        let out_reaches = node.output.iter().any(|o| to_output.contains(o.as_str()));
        let out_up = node.output.iter().find_map(|o| to_upsampler.get(o.as_str()).cloned());
        for (k, inp) in node.input.iter().enumerate() {
            if inp.is_empty() || index.constant(inp).is_some() {
                continue;
            }
            // Only data inputs carry features; a Conv stops both walks.
            if (is_conv || op == "ConvTranspose") && k > 0 {
                continue;
            }
            if is_up {
                to_upsampler.entry(inp.as_str()).or_insert_with(|| op.to_string());
            }
            if is_conv {
                continue;
            }
            if out_reaches {
                to_output.insert(inp.as_str());
            }
            if let (Some(u), false) = (&out_up, is_up) {
                to_upsampler.entry(inp.as_str()).or_insert_with(|| u.clone());
            }
        }
    }
    let mut last = HashSet::new();
    let mut up = HashMap::new();
    for (i, node) in graph.node.iter().enumerate() {
        if node.op_type() != "Conv" {
            continue;
        }
        let Some(out) = node.output.first() else { continue };
        if to_output.contains(out.as_str()) {
            last.insert(i);
        }
        if let Some(u) = to_upsampler.get(out.as_str()) {
            up.insert(i, u.clone());
        }
    }
    (last, up)
}

/// For messages: the Conv named by node name or output name.
pub fn describe_conv(index: &GraphIndex<'_>, info: &ConvInfo) -> String {
    describe(index.node(info.node_index))
}
