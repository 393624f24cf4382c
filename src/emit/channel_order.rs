//! Carrying a channel permutation through the graph, one operator family at a time.
//!
//! A permuted tensor stores original channel `perm[j]` at position `j`. Each rule here either
//! propagates the layout exactly (element-wise ops, pools, Resize, Concat, Split, per-channel
//! constants permuted to match, Conv/ConvTranspose weights permuted on their input axis) or
//! falls back to restoring the original order with a Gather. The fallback is always exact, so an
//! operator this module does not know costs a copy, never correctness.

use std::rc::Rc;

use anyhow::Result;

use super::{Emitter, Perm, inverse, is_identity};
use crate::onnx::{self, NodeProto};

/// Ops that act on each channel independently and keep the channel axis: the layout passes
/// through unchanged. Their extra inputs (Clip bounds, Resize scales) are not feature maps.
const PER_CHANNEL: &[&str] = &[
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "Tanh",
    "Elu",
    "Selu",
    "Celu",
    "HardSigmoid",
    "HardSwish",
    "Softplus",
    "Softsign",
    "Abs",
    "Neg",
    "Exp",
    "Log",
    "Sqrt",
    "Reciprocal",
    "Floor",
    "Ceil",
    "Round",
    "Sign",
    "Erf",
    "Gelu",
    "Mish",
    "Identity",
    "Cast",
    "Clip",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "GlobalLpPool",
    "MaxPool",
    "AveragePool",
    "LpPool",
    "Resize",
    "Upsample",
    "Dropout",
];

/// Broadcasting element-wise ops between feature maps and constants.
const ELEMENTWISE: &[&str] = &["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu"];

/// Emits `node`, at least one of whose inputs is permuted.
pub(super) fn carry(e: &mut Emitter<'_>, node: &NodeProto) -> Result<()> {
    let op = node.op_type();
    match op {
        "Conv" => {
            let w = e
                .index()
                .constant(&node.input[1])
                .and_then(|t| onnx::tensor_f32(t).ok().map(|v| (v, t.dims.clone())));
            match w {
                Some((w, dims)) if dims.len() == 4 => {
                    let group = onnx::attr_i(node, "group").unwrap_or(1).max(1) as usize;
                    let perm = e.perm_of(&node.input[0]);
                    let (x, w2) = conv_input(e, node, &w, &dims, group)?;
                    let mut n = node.clone();
                    if x != node.input[0] {
                        let key = format!("input-permuted {} {:?}", node.input[1], perm);
                        let base = format!("{}/ghostsr_weight", node.output[0]);
                        n.input[1] = e.derived_constant(key, &base, || onnx::f32_tensor("", &dims, &w2));
                    }
                    n.input[0] = x;
                    restore_rest(e, &mut n, 1, "Conv parameter");
                    e.push(n);
                }
                _ => e.emit_restored(node, "Conv with run-time weights"),
            }
        }
        "ConvTranspose" => conv_transpose(e, node),
        "Shape" | "Size" => {
            // Only the shape is read, and a permutation does not change it.
            let mut n = node.clone();
            n.input[0] = e.stored(&node.input[0]);
            e.push(n);
        }
        "Concat" => concat(e, node),
        "Split" => split(e, node),
        "BatchNormalization" | "InstanceNormalization" => per_channel_params(e, node),
        _ if op.starts_with("Reduce") => reduce(e, node),
        _ if PER_CHANNEL.contains(&op) => per_channel(e, node),
        _ if ELEMENTWISE.contains(&op) => elementwise(e, node),
        _ => e.emit_restored(node, &format!("{op} is not known to be channel-wise")),
    }
    Ok(())
}

/// Restores permuted inputs from position `from` on (parameters that are not feature maps).
fn restore_rest(e: &mut Emitter<'_>, n: &mut NodeProto, from: usize, why: &str) {
    for k in from..n.input.len() {
        let name = n.input[k].clone();
        if e.perm_of(&name).is_some() {
            n.input[k] = e.identity(&name, why);
        }
    }
}

/// Data input and weights for a Conv reading a possibly permuted tensor: the permutation is
/// moved into the weights' input-channel axis when every channel stays in its group.
pub(super) fn conv_input(
    e: &mut Emitter<'_>,
    node: &NodeProto,
    w: &[f32],
    dims: &[i64],
    group: usize,
) -> Result<(String, Vec<f32>)> {
    let x = &node.input[0];
    let Some(p) = e.perm_of(x) else {
        return Ok((x.clone(), w.to_vec()));
    };
    let (c_out, cin_g) = (dims[0] as usize, dims[1] as usize);
    let plane = (dims[2] * dims[3]) as usize;
    let fits = p.len() == cin_g * group && p.iter().enumerate().all(|(j, &c)| j / cin_g == c / cin_g);
    if !fits {
        return Ok((e.identity(x, "grouped Conv whose groups the channel order would mix"), w.to_vec()));
    }
    let cout_g = c_out / group;
    let mut out = vec![0.0f32; w.len()];
    for o in 0..c_out {
        let g = o / cout_g;
        for jl in 0..cin_g {
            let src_local = p[g * cin_g + jl] - g * cin_g;
            let dst = (o * cin_g + jl) * plane;
            let src = (o * cin_g + src_local) * plane;
            out[dst..dst + plane].copy_from_slice(&w[src..src + plane]);
        }
    }
    let stored = e.stored(x);
    e.note_absorbed();
    Ok((stored, out))
}

fn conv_transpose(e: &mut Emitter<'_>, node: &NodeProto) {
    let x = node.input[0].clone();
    let group = onnx::attr_i(node, "group").unwrap_or(1);
    let w = e
        .index()
        .constant(&node.input[1])
        .and_then(|t| onnx::tensor_f32(t).ok().map(|v| (v, t.dims.clone())));
    match (e.perm_of(&x), w, group) {
        (Some(p), Some((w, dims)), 1) if dims.len() >= 3 && dims[0] as usize == p.len() => {
            // Weight [C_in, C_out, k...]: input channel j is row j.
            let row = w.len() / p.len();
            let mut w2 = vec![0.0f32; w.len()];
            for (j, &c) in p.iter().enumerate() {
                w2[j * row..(j + 1) * row].copy_from_slice(&w[c * row..(c + 1) * row]);
            }
            let mut n = node.clone();
            n.input[0] = e.stored(&x);
            e.note_absorbed();
            let key = format!("input-permuted {} {:?}", node.input[1], p);
            let base = format!("{}/ghostsr_weight", node.output[0]);
            n.input[1] = e.derived_constant(key, &base, || onnx::f32_tensor("", &dims, &w2));
            restore_rest(e, &mut n, 1, "ConvTranspose parameter");
            e.push(n);
        }
        _ => e.emit_restored(node, "ConvTranspose with grouped or run-time weights"),
    }
}

/// Channel-wise ops: the layout of input 0 passes to every output.
fn per_channel(e: &mut Emitter<'_>, node: &NodeProto) {
    let x = &node.input[0];
    let p = e.perm_of(x);
    let shapes = e.shapes();
    let keeps_channels = match (shapes.get(x), node.output.first().and_then(|o| shapes.get(o))) {
        (Some(a), Some(b)) => a.len() == 4 && b.len() == 4 && a[1] == b[1],
        _ => false,
    };
    // MaxPool's optional Indices output encodes channel positions; Dropout's mask is fine.
    let index_output = node.op_type() == "MaxPool" && node.output.len() > 1;
    if p.is_none() || !keeps_channels || index_output {
        e.emit_restored(node, &format!("{} output shape not understood", node.op_type()));
        return;
    }
    let mut n = node.clone();
    n.input[0] = e.stored(x);
    restore_rest(e, &mut n, 1, "operator parameter");
    for o in n.output.iter_mut() {
        if !o.is_empty() {
            *o = e.set_layout(&o.clone(), p.clone());
        }
    }
    e.push(n);
}

/// How one input of an element-wise op relates to the output's channel axis.
enum Role {
    /// Broadcast over channels (scalar, channel dim 1, or rank < 3).
    Invariant,
    /// A constant with one value per channel along axis `usize` of its own dims.
    PerChannel(usize),
    /// A feature map with its own layout.
    Member(Option<Perm>),
}

fn elementwise(e: &mut Emitter<'_>, node: &NodeProto) {
    let Some(out_dims) = node.output.first().and_then(|o| e.shapes().get(o)).map(<[i64]>::to_vec) else {
        e.emit_restored(node, "output shape unknown");
        return;
    };
    if out_dims.len() != 4 {
        e.emit_restored(node, "output is not 4-D");
        return;
    }
    let c = out_dims[1];
    let mut roles = Vec::new();
    for inp in &node.input {
        let constant = e.index().constant(inp);
        let dims = match constant {
            Some(t) => Some(t.dims.clone()),
            None => e.shapes().get(inp).map(<[i64]>::to_vec),
        };
        let Some(dims) = dims.filter(|d| d.len() <= 4) else {
            e.emit_restored(node, "input shape unknown");
            return;
        };
        let axis = dims.len() as i64 - 3;
        let role = if axis < 0 || dims[axis as usize] == 1 {
            Role::Invariant
        } else if dims[axis as usize] != c {
            e.emit_restored(node, "broadcast not along channels");
            return;
        } else if constant.is_some() {
            Role::PerChannel(axis as usize)
        } else {
            Role::Member(e.perm_of(inp))
        };
        roles.push(role);
    }
    let members: Vec<&Option<Perm>> =
        roles.iter().filter_map(|r| if let Role::Member(p) = r { Some(p) } else { None }).collect();
    // One layout for all feature inputs: theirs if they agree, else the original order if any
    // input already has it (fewest Gathers), else the first input's.
    let target: Option<Perm> = if members.windows(2).all(|w| w[0] == w[1]) {
        members.first().and_then(|p| (*p).clone())
    } else if members.iter().any(|p| p.is_none()) {
        None
    } else {
        members.first().and_then(|p| (*p).clone())
    };
    let mut n = node.clone();
    for (k, role) in roles.iter().enumerate() {
        let inp = node.input[k].clone();
        match role {
            Role::Invariant => {}
            Role::Member(_) => {
                n.input[k] = e.in_layout(
                    &inp,
                    target.as_ref(),
                    "residual/element-wise operands differ in channel order",
                )
            }
            Role::PerChannel(axis) => {
                if let Some(p) = &target {
                    n.input[k] = permute_constant(e, &inp, *axis, p);
                }
            }
        }
    }
    let out = node.output[0].clone();
    n.output[0] = e.set_layout(&out, target);
    e.push(n);
}

/// A copy of constant `name` permuted along `axis`.
fn permute_constant(e: &mut Emitter<'_>, name: &str, axis: usize, p: &Perm) -> String {
    let t = e.index().constant(name).expect("checked constant");
    let Ok(v) = onnx::tensor_f32(t) else {
        return e.identity(name, "non-float constant");
    };
    let dims = t.dims.clone();
    let outer: usize = dims[..axis].iter().product::<i64>() as usize;
    let inner: usize = dims[axis + 1..].iter().product::<i64>() as usize;
    let c = dims[axis] as usize;
    let mut out = vec![0.0f32; v.len()];
    for o in 0..outer {
        for (j, &src) in p.iter().enumerate() {
            let d = (o * c + j) * inner;
            let s = (o * c + src) * inner;
            out[d..d + inner].copy_from_slice(&v[s..s + inner]);
        }
    }
    e.note_absorbed();
    let key = format!("permuted {name} axis {axis} {p:?}");
    e.derived_constant(key, &format!("{name}/ghostsr_permuted"), || onnx::f32_tensor("", &dims, &out))
}

/// BatchNormalization / InstanceNormalization: 1-D per-channel parameters follow the layout.
fn per_channel_params(e: &mut Emitter<'_>, node: &NodeProto) {
    let x = node.input[0].clone();
    let p = e.perm_of(&x);
    let c = p.as_ref().map(|p| p.len() as i64);
    let params_ok = node.input[1..]
        .iter()
        .all(|i| e.index().constant(i).is_some_and(|t| t.dims.len() == 1 && Some(t.dims[0]) == c));
    let (Some(p), true, 1) = (p, params_ok, node.output.len()) else {
        e.emit_restored(node, "normalisation with run-time parameters");
        return;
    };
    let mut n = node.clone();
    n.input[0] = e.stored(&x);
    for k in 1..n.input.len() {
        n.input[k] = permute_constant(e, &node.input[k], 0, &p);
    }
    n.output[0] = e.set_layout(&node.output[0], Some(p));
    e.push(n);
}

fn concat(e: &mut Emitter<'_>, node: &NodeProto) {
    let rank = e.shapes().get(&node.input[0]).map(<[i64]>::len).unwrap_or(0);
    let axis = onnx::attr_i(node, "axis").unwrap_or(0);
    let axis = if axis < 0 { axis + rank as i64 } else { axis };
    let channels: Option<Vec<usize>> = node.input.iter().map(|i| e.shapes().channels(i)).collect();
    let (1, 4, Some(channels)) = (axis, rank, channels) else {
        e.emit_restored(node, "Concat not along channels");
        return;
    };
    // The output layout is the inputs' layouts side by side.
    let mut perm = Vec::new();
    let mut n = node.clone();
    let mut offset = 0;
    for (k, inp) in node.input.iter().enumerate() {
        match e.perm_of(inp) {
            Some(p) => {
                perm.extend(p.iter().map(|&c| c + offset));
                n.input[k] = e.stored(inp);
            }
            None => perm.extend(offset..offset + channels[k]),
        }
        offset += channels[k];
    }
    n.output[0] = e.set_layout(&node.output[0], Some(Rc::new(perm)));
    e.push(n);
}

fn split(e: &mut Emitter<'_>, node: &NodeProto) {
    let x = node.input[0].clone();
    let rank = e.shapes().get(&x).map(<[i64]>::len).unwrap_or(0);
    let axis = onnx::attr_i(node, "axis").unwrap_or(0);
    let axis = if axis < 0 { axis + rank as i64 } else { axis };
    let sizes: Option<Vec<usize>> = node.output.iter().map(|o| e.shapes().channels(o)).collect();
    let p = e.perm_of(&x);
    let (1, 4, Some(sizes), Some(p)) = (axis, rank, sizes, p) else {
        e.emit_restored(node, "Split not along channels");
        return;
    };
    // If every output's slice holds the same channels as before (in any order), the Split
    // stays. Otherwise each output is gathered straight from the permuted tensor, its channels
    // in stored order, so no full restore is needed and the outputs' layouts go on downstream.
    if sizes.iter().sum::<usize>() != p.len() {
        e.emit_restored(node, "Split sizes do not cover the channels");
        return;
    }
    let bounds: Vec<(usize, usize)> = sizes
        .iter()
        .scan(0, |start, &s| {
            *start += s;
            Some((*start - s, *start))
        })
        .collect();
    let preserved = bounds.iter().all(|&(a, b)| p[a..b].iter().all(|&c| (a..b).contains(&c)));
    if !preserved {
        let inv = inverse(&p);
        let stored = e.stored(&x);
        for (k, &(a, b)) in bounds.iter().enumerate() {
            let mut positions: Vec<usize> = (a..b).map(|c| inv[c]).collect();
            positions.sort_unstable();
            let layout: Vec<usize> = positions.iter().map(|&j| p[j] - a).collect();
            let out = node.output[k].clone();
            let layout = if is_identity(&layout) { None } else { Some(Rc::new(layout)) };
            let name = e.set_layout(&out, layout);
            e.gather_into(&stored, &positions, &name, &out);
        }
        return;
    }
    let mut n = node.clone();
    n.input[0] = e.stored(&x);
    restore_rest(e, &mut n, 1, "Split sizes");
    for (k, &(a, b)) in bounds.iter().enumerate() {
        let part: Vec<usize> = p[a..b].iter().map(|&c| c - a).collect();
        let o = node.output[k].clone();
        let layout = if is_identity(&part) { None } else { Some(Rc::new(part)) };
        n.output[k] = e.set_layout(&o, layout);
    }
    e.push(n);
}

fn reduce(e: &mut Emitter<'_>, node: &NodeProto) {
    let x = node.input[0].clone();
    let rank = e.shapes().get(&x).map(<[i64]>::len).unwrap_or(0) as i64;
    let keep = onnx::attr_i(node, "keepdims").unwrap_or(1) == 1;
    let axes = onnx::attr_ints(node, "axes").or_else(|| {
        node.input.get(1).filter(|s| !s.is_empty()).and_then(|a| {
            e.shapes()
                .values
                .get(a)
                .cloned()
                .or_else(|| e.index().constant(a).and_then(|t| onnx::tensor_i64(t).ok()))
        })
    });
    let spatial_only = axes
        .as_ref()
        .is_some_and(|a| !a.is_empty() && a.iter().all(|&v| (if v < 0 { v + rank } else { v }) >= 2));
    if rank != 4 || !keep || !spatial_only {
        e.emit_restored(node, "reduction over channels");
        return;
    }
    let p = e.perm_of(&x);
    let mut n = node.clone();
    n.input[0] = e.stored(&x);
    restore_rest(e, &mut n, 1, "reduction axes");
    n.output[0] = e.set_layout(&node.output[0], p);
    e.push(n);
}
