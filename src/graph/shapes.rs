//! Concrete shape inference for a probe input size.
//!
//! Dynamic dimensions of the graph inputs are bound to a probe (batch 1, spatial `probe` x
//! `probe`), then shapes are propagated node by node for the operators SR networks use, with
//! small integer tensors (Shape, Gather, Concat, ...) folded so Reshape and Resize sizes resolve.
//! An operator this module does not know leaves its outputs unknown; callers treat unknown as
//! "do not touch". Channel counts do not depend on the probe; spatial sizes scale with it,
//! which is how [`crate::report`] turns totals into multiply-adds per pixel.

use std::collections::HashMap;

use crate::graph::GraphIndex;
use crate::onnx::{self, NodeProto, tensor_proto::DataType, type_proto};

/// Inferred facts about the graph's tensors.
#[derive(Debug, Default, Clone)]
pub struct Shapes {
    pub dims: HashMap<String, Vec<i64>>,
    /// Values of small integer tensors, folded from constants and shape arithmetic.
    pub values: HashMap<String, Vec<i64>>,
    /// Spatial size bound to the dynamic dims of the inputs.
    pub probe: i64,
    /// Pixels (H*W) of the first rank-4 graph input at the probe size.
    pub input_pixels: Option<i64>,
}

impl Shapes {
    pub fn get(&self, name: &str) -> Option<&[i64]> {
        self.dims.get(name).map(Vec::as_slice)
    }

    /// Channel count (dim 1) of a rank-4 tensor.
    pub fn channels(&self, name: &str) -> Option<usize> {
        self.get(name).filter(|d| d.len() == 4).map(|d| d[1] as usize)
    }
}

/// Infers shapes for all tensors, binding dynamic input dims to `probe`.
pub fn infer(index: &GraphIndex<'_>, probe: i64) -> Shapes {
    let mut s = Shapes { probe, ..Default::default() };
    for t in &index.graph.initializer {
        s.dims.insert(onnx::tensor_name(t).to_string(), t.dims.clone());
        if t.dims.iter().product::<i64>() <= 64
            && let Ok(v) = onnx::tensor_i64(t)
        {
            s.values.insert(onnx::tensor_name(t).to_string(), v);
        }
    }
    for vi in &index.graph.input {
        let Some(name) = vi.name.as_deref() else { continue };
        if s.dims.contains_key(name) {
            continue;
        }
        let Some(type_proto::Value::TensorType(tt)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref())
        else {
            continue;
        };
        let Some(shape) = tt.shape.as_ref() else { continue };
        let rank = shape.dim.len();
        let dims: Vec<i64> = shape
            .dim
            .iter()
            .enumerate()
            .map(|(i, d)| match d.value {
                Some(onnx::tensor_shape_proto::dimension::Value::DimValue(v)) if v > 0 => v,
                _ if i == 0 => 1,
                _ if rank == 4 && i >= 2 => probe,
                _ => 1,
            })
            .collect();
        if rank == 4 && s.input_pixels.is_none() {
            s.input_pixels = Some(dims[2] * dims[3]);
        }
        s.dims.insert(name.to_string(), dims);
    }
    for node in &index.graph.node {
        infer_node(index, node, &mut s);
    }
    s
}

fn int_input(index: &GraphIndex<'_>, s: &Shapes, name: &str) -> Option<Vec<i64>> {
    if name.is_empty() {
        return None;
    }
    if let Some(v) = s.values.get(name) {
        return Some(v.clone());
    }
    index.constant(name).and_then(|t| onnx::tensor_i64(t).ok())
}

fn float_input(index: &GraphIndex<'_>, name: &str) -> Option<Vec<f32>> {
    if name.is_empty() {
        return None;
    }
    index.constant(name).and_then(|t| onnx::tensor_f32(t).ok())
}

fn broadcast(a: &[i64], b: &[i64]) -> Option<Vec<i64>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let x = if i + a.len() >= r { a[i + a.len() - r] } else { 1 };
        let y = if i + b.len() >= r { b[i + b.len() - r] } else { 1 };
        out[i] = if x == y || y == 1 {
            x
        } else if x == 1 {
            y
        } else {
            return None;
        };
    }
    Some(out)
}

fn norm_axis(axis: i64, rank: usize) -> usize {
    if axis < 0 { (axis + rank as i64).max(0) as usize } else { axis as usize }
}

/// Spatial output size of a Conv or pool along one axis; `None` for attributes no valid model
/// has (a stride, dilation or kernel below 1, negative pads) or an empty output.
fn conv_out(
    inp: i64,
    k: i64,
    stride: i64,
    dil: i64,
    pad_begin: i64,
    pad_end: i64,
    auto_pad: &str,
) -> Option<i64> {
    if k < 1 || stride < 1 || dil < 1 || pad_begin < 0 || pad_end < 0 {
        return None;
    }
    let eff = (k - 1).checked_mul(dil)?.checked_add(1)?;
    let o = match auto_pad {
        "SAME_UPPER" | "SAME_LOWER" => inp.checked_add(stride - 1)? / stride,
        "VALID" => inp.checked_sub(eff)? / stride + 1,
        "NOTSET" | "" => inp.checked_add(pad_begin)?.checked_add(pad_end)?.checked_sub(eff)? / stride + 1,
        _ => return None,
    };
    (o >= 1).then_some(o)
}

fn spatial_attrs(node: &NodeProto, kernel: &[i64]) -> (Vec<i64>, Vec<i64>, Vec<i64>, String) {
    let nd = kernel.len();
    let strides = onnx::attr_ints(node, "strides").filter(|v| v.len() == nd).unwrap_or(vec![1; nd]);
    let dil = onnx::attr_ints(node, "dilations").filter(|v| v.len() == nd).unwrap_or(vec![1; nd]);
    let pads = onnx::attr_ints(node, "pads").filter(|v| v.len() == 2 * nd).unwrap_or(vec![0; 2 * nd]);
    let auto_pad = onnx::attr_s(node, "auto_pad").unwrap_or_else(|| "NOTSET".into());
    (strides, dil, pads, auto_pad)
}

fn infer_node(index: &GraphIndex<'_>, node: &NodeProto, s: &mut Shapes) {
    let op = node.op_type();
    let in_dims = |i: usize| -> Option<Vec<i64>> {
        node.input.get(i).filter(|n| !n.is_empty()).and_then(|n| s.dims.get(n).cloned())
    };
    let x = in_dims(0);
    let mut outs: Vec<Option<Vec<i64>>> = vec![None; node.output.len()];
    let mut out_values: Vec<Option<Vec<i64>>> = vec![None; node.output.len()];
    let same = |outs: &mut Vec<Option<Vec<i64>>>| {
        if let Some(first) = outs.first_mut() {
            *first = x.clone();
        }
    };
    match op {
        "Conv" | "MaxPool" | "AveragePool" | "LpPool" => {
            if let Some(x) = &x {
                let (kernel, c_out) = if op == "Conv" {
                    match in_dims(1) {
                        Some(w) if w.len() >= 3 => (w[2..].to_vec(), w[0]),
                        _ => (vec![], 0),
                    }
                } else {
                    (
                        onnx::attr_ints(node, "kernel_shape").unwrap_or_default(),
                        x.get(1).copied().unwrap_or(0),
                    )
                };
                if !kernel.is_empty() && x.len() == kernel.len() + 2 {
                    let (st, dil, pads, ap) = spatial_attrs(node, &kernel);
                    let nd = kernel.len();
                    let spatial: Option<Vec<i64>> = (0..nd)
                        .map(|i| conv_out(x[2 + i], kernel[i], st[i], dil[i], pads[i], pads[nd + i], &ap))
                        .collect();
                    outs[0] = spatial.map(|sp| [vec![x[0], c_out], sp].concat());
                }
            }
        }
        "ConvTranspose" => {
            if let (Some(x), Some(w)) = (&x, in_dims(1))
                && w.len() >= 3
                && x.len() == w.len()
            {
                let kernel = w[2..].to_vec();
                let nd = kernel.len();
                let group = onnx::attr_i(node, "group").unwrap_or(1);
                let (st, dil, pads, _) = spatial_attrs(node, &kernel);
                let opad =
                    onnx::attr_ints(node, "output_padding").filter(|v| v.len() == nd).unwrap_or(vec![0; nd]);
                let mut o = vec![x[0], w[1] * group];
                if let Some(os) = onnx::attr_ints(node, "output_shape").filter(|v| v.len() == nd) {
                    o.extend(os);
                } else {
                    for i in 0..nd {
                        o.push(
                            st[i] * (x[2 + i] - 1) + opad[i] + (kernel[i] - 1) * dil[i] + 1
                                - pads[i]
                                - pads[nd + i],
                        );
                    }
                }
                outs[0] = Some(o);
            }
        }
        "GhostShift" => {
            if let (Some(x), Some(src)) = (&x, onnx::attr_ints(node, "sources"))
                && x.len() == 4
            {
                outs[0] = Some(vec![x[0], src.len() as i64, x[2], x[3]]);
            }
        }
        "Relu"
        | "LeakyRelu"
        | "PRelu"
        | "Sigmoid"
        | "Tanh"
        | "Elu"
        | "Selu"
        | "Celu"
        | "HardSigmoid"
        | "HardSwish"
        | "Softplus"
        | "Softsign"
        | "Abs"
        | "Neg"
        | "Exp"
        | "Log"
        | "Sqrt"
        | "Reciprocal"
        | "Floor"
        | "Ceil"
        | "Round"
        | "Sign"
        | "Erf"
        | "Gelu"
        | "Mish"
        | "Identity"
        | "Dropout"
        | "Clip"
        | "BatchNormalization"
        | "InstanceNormalization"
        | "LRN"
        | "Softmax"
        | "LogSoftmax"
        | "Not" => {
            same(&mut outs);
            if matches!(op, "Identity") {
                out_values[0] = int_input(index, s, &node.input[0]);
            }
        }
        "Cast" => {
            same(&mut outs);
            out_values[0] = node.input.first().and_then(|n| s.values.get(n).cloned());
        }
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Max" | "Min" | "Sum" | "Mean" | "Equal" | "Greater"
        | "Less" | "And" | "Or" | "Where" => {
            let dims: Option<Vec<Vec<i64>>> = (0..node.input.len()).map(in_dims).collect();
            if let Some(dims) = dims {
                outs[0] = dims.iter().skip(1).try_fold(dims[0].clone(), |acc, d| broadcast(&acc, d));
            }
            let vals: Option<Vec<Vec<i64>>> = node.input.iter().map(|n| int_input(index, s, n)).collect();
            if let (Some(v), true) = (vals, node.input.len() == 2) {
                let (a, b) = (&v[0], &v[1]);
                let n = a.len().max(b.len());
                if (a.len() == n || a.len() == 1) && (b.len() == n || b.len() == 1) {
                    let get = |v: &Vec<i64>, i: usize| if v.len() == 1 { v[0] } else { v[i] };
                    let r: Option<Vec<i64>> = (0..n)
                        .map(|i| {
                            let (x, y) = (get(a, i), get(b, i));
                            match op {
                                "Add" => Some(x + y),
                                "Sub" => Some(x - y),
                                "Mul" => Some(x * y),
                                "Div" => x.checked_div(y),
                                _ => None,
                            }
                        })
                        .collect();
                    out_values[0] = r;
                }
            }
        }
        "Concat" => {
            let dims: Option<Vec<Vec<i64>>> = (0..node.input.len()).map(in_dims).collect();
            if let Some(dims) = dims.filter(|d| !d.is_empty()) {
                let rank = dims[0].len();
                let axis = norm_axis(onnx::attr_i(node, "axis").unwrap_or(0), rank);
                if axis < rank && dims.iter().all(|d| d.len() == rank) {
                    let mut o = dims[0].clone();
                    o[axis] = dims.iter().map(|d| d[axis]).sum();
                    outs[0] = Some(o);
                }
            }
            let vals: Option<Vec<Vec<i64>>> = node.input.iter().map(|n| int_input(index, s, n)).collect();
            out_values[0] = vals.map(|v| v.concat());
        }
        "Split" => {
            if let Some(x) = &x {
                let axis = norm_axis(onnx::attr_i(node, "axis").unwrap_or(0), x.len());
                let n_out = (node.output.len() as i64).max(1);
                let sizes = node
                    .input
                    .get(1)
                    .and_then(|n| int_input(index, s, n))
                    .or_else(|| onnx::attr_ints(node, "split"))
                    .or_else(|| {
                        let total = *x.get(axis)?;
                        let chunk = (total + n_out - 1) / n_out;
                        Some((0..n_out).map(|i| chunk.min(total - i * chunk)).collect())
                    });
                if let Some(sizes) = sizes.filter(|v| v.len() == node.output.len()) {
                    for (i, sz) in sizes.iter().enumerate() {
                        let mut o = x.clone();
                        if axis < o.len() {
                            o[axis] = *sz;
                            outs[i] = Some(o);
                        }
                    }
                }
            }
        }
        "DepthToSpace" | "SpaceToDepth" => {
            if let (Some(x), Some(b)) = (&x, onnx::attr_i(node, "blocksize"))
                && x.len() == 4
                && b > 0
                && b.checked_mul(b).is_some()
            {
                outs[0] = Some(if op == "DepthToSpace" {
                    vec![x[0], x[1] / (b * b), x[2].saturating_mul(b), x[3].saturating_mul(b)]
                } else {
                    vec![x[0], x[1] * b * b, x[2] / b, x[3] / b]
                });
            }
        }
        "Resize" | "Upsample" => {
            if let Some(x) = &x {
                let scales_name = if op == "Upsample" { node.input.get(1) } else { node.input.get(2) };
                let sizes =
                    node.input.get(3).and_then(|n| int_input(index, s, n)).filter(|v| v.len() == x.len());
                let scales = scales_name.and_then(|n| float_input(index, n)).filter(|v| v.len() == x.len());
                outs[0] = if let Some(sz) = sizes {
                    Some(sz)
                } else {
                    scales.map(|sc| {
                        x.iter().zip(sc).map(|(&d, f)| (d as f64 * f as f64).floor() as i64).collect()
                    })
                };
            }
        }
        "GlobalAveragePool" | "GlobalMaxPool" | "GlobalLpPool" => {
            if let Some(x) = &x {
                let mut o = x.clone();
                o.iter_mut().skip(2).for_each(|d| *d = 1);
                outs[0] = Some(o);
            }
        }
        op if op.starts_with("Reduce") || op == "ArgMax" || op == "ArgMin" => {
            if let Some(x) = &x {
                let keep = onnx::attr_i(node, "keepdims").unwrap_or(1) == 1;
                let axes = onnx::attr_ints(node, "axes")
                    .or_else(|| onnx::attr_i(node, "axis").map(|a| vec![a]))
                    .or_else(|| node.input.get(1).and_then(|n| int_input(index, s, n)));
                let noop = onnx::attr_i(node, "noop_with_empty_axes").unwrap_or(0) == 1;
                let axes: Vec<usize> = match axes {
                    Some(a) if !a.is_empty() => a.iter().map(|&a| norm_axis(a, x.len())).collect(),
                    _ if noop => vec![],
                    _ => (0..x.len()).collect(),
                };
                let o: Vec<i64> = x
                    .iter()
                    .enumerate()
                    .filter_map(|(i, &d)| match (axes.contains(&i), keep) {
                        (true, true) => Some(1),
                        (true, false) => None,
                        _ => Some(d),
                    })
                    .collect();
                outs[0] = Some(o);
            }
        }
        "Shape" => {
            if let Some(x) = &x {
                let rank = x.len() as i64;
                let start = norm_axis(onnx::attr_i(node, "start").unwrap_or(0), x.len()).min(x.len());
                let end =
                    onnx::attr_i(node, "end").map(|e| norm_axis(e, x.len()).min(x.len())).unwrap_or(x.len());
                let v = x[start..end.max(start)].to_vec();
                outs[0] = Some(vec![v.len() as i64]);
                let _ = rank;
                out_values[0] = Some(v);
            }
        }
        "Gather" => {
            if let (Some(x), Some(idx_dims)) = (&x, in_dims(1)) {
                let axis = norm_axis(onnx::attr_i(node, "axis").unwrap_or(0), x.len());
                if axis < x.len() {
                    let mut o = x[..axis].to_vec();
                    o.extend(&idx_dims);
                    o.extend(&x[axis + 1..]);
                    outs[0] = Some(o);
                }
                if let (Some(v), Some(idx)) = (
                    node.input.first().and_then(|n| int_input(index, s, n)),
                    int_input(index, s, &node.input[1]),
                ) && axis == 0
                {
                    let n = v.len() as i64;
                    out_values[0] =
                        idx.iter().map(|&i| v.get(if i < 0 { i + n } else { i } as usize).copied()).collect();
                }
            }
        }
        "Unsqueeze" | "Squeeze" => {
            if let Some(x) = &x {
                let axes = onnx::attr_ints(node, "axes")
                    .or_else(|| node.input.get(1).and_then(|n| int_input(index, s, n)));
                if let Some(axes) = axes {
                    let o = if op == "Unsqueeze" {
                        let r = x.len() + axes.len();
                        let ax: Vec<usize> = axes.iter().map(|&a| norm_axis(a, r)).collect();
                        let mut it = x.iter();
                        (0..r).map(|i| if ax.contains(&i) { 1 } else { *it.next().unwrap_or(&1) }).collect()
                    } else {
                        let ax: Vec<usize> = axes.iter().map(|&a| norm_axis(a, x.len())).collect();
                        x.iter().enumerate().filter(|(i, _)| !ax.contains(i)).map(|(_, &d)| d).collect()
                    };
                    outs[0] = Some(o);
                }
                out_values[0] = int_input(index, s, &node.input[0]);
            }
        }
        "Reshape" => {
            if let (Some(x), Some(target)) = (&x, node.input.get(1).and_then(|n| int_input(index, s, n))) {
                let total: i64 = x.iter().product();
                let mut o: Vec<i64> = target
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| if d == 0 { *x.get(i).unwrap_or(&0) } else { d })
                    .collect();
                let known: i64 = o.iter().filter(|&&d| d != -1).product();
                if let Some(p) = o.iter().position(|&d| d == -1)
                    && known != 0
                {
                    o[p] = total / known;
                }
                outs[0] = Some(o);
            }
        }
        "Flatten" => {
            if let Some(x) = &x {
                let axis = norm_axis(onnx::attr_i(node, "axis").unwrap_or(1), x.len()).min(x.len());
                outs[0] = Some(vec![x[..axis].iter().product(), x[axis..].iter().product()]);
            }
        }
        "Transpose" => {
            if let Some(x) = &x {
                let perm =
                    onnx::attr_ints(node, "perm").unwrap_or_else(|| (0..x.len() as i64).rev().collect());
                outs[0] = perm.iter().map(|&p| x.get(p as usize).copied()).collect();
            }
        }
        "Pad" => {
            if let Some(x) = &x {
                let pads = onnx::attr_ints(node, "pads")
                    .or_else(|| node.input.get(1).and_then(|n| int_input(index, s, n)));
                if let Some(p) = pads.filter(|p| p.len() == 2 * x.len()) {
                    outs[0] = Some(x.iter().enumerate().map(|(i, &d)| d + p[i] + p[i + x.len()]).collect());
                }
            }
        }
        "Slice" => {
            if let Some(x) = &x {
                let get = |i: usize| node.input.get(i).and_then(|n| int_input(index, s, n));
                if let (Some(starts), Some(ends)) = (get(1), get(2)) {
                    let axes = get(3).unwrap_or_else(|| (0..starts.len() as i64).collect());
                    let steps = get(4).unwrap_or_else(|| vec![1; starts.len()]);
                    let mut o = x.clone();
                    let mut ok = true;
                    for k in 0..starts.len().min(axes.len()) {
                        let a = norm_axis(axes[k], x.len());
                        if a >= x.len() || steps.get(k).copied().unwrap_or(1) != 1 {
                            ok = false;
                            break;
                        }
                        let d = x[a];
                        let clampi = |v: i64| if v < 0 { (v + d).max(0) } else { v.min(d) };
                        o[a] = (clampi(ends[k]) - clampi(starts[k])).max(0);
                    }
                    if ok {
                        outs[0] = Some(o);
                    }
                }
            }
        }
        "Constant" => {
            if let Some(t) = onnx::attr(node, "value").and_then(|a| a.t.as_ref()) {
                outs[0] = Some(t.dims.clone());
                if t.data_type == Some(DataType::Int64 as i32) || t.data_type == Some(DataType::Int32 as i32)
                {
                    out_values[0] = onnx::tensor_i64(t).ok();
                }
            }
        }
        _ => {}
    }
    for (i, out) in node.output.iter().enumerate() {
        if out.is_empty() {
            continue;
        }
        // A negative dim only comes from attributes no valid model has: leave it unknown.
        if let Some(d) = outs[i].take().filter(|d| d.iter().all(|&v| v >= 0)) {
            s.dims.insert(out.clone(), d);
        }
        if let Some(v) = out_values[i].take() {
            s.values.insert(out.clone(), v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_output_sizes() {
        assert_eq!(conv_out(64, 3, 1, 1, 1, 1, "NOTSET"), Some(64));
        assert_eq!(conv_out(64, 3, 2, 1, 1, 1, "NOTSET"), Some(32));
        assert_eq!(conv_out(63, 3, 2, 1, 0, 0, "SAME_UPPER"), Some(32));
        assert_eq!(conv_out(10, 5, 1, 1, 0, 0, "VALID"), Some(6));
        // Attributes no valid model has give "unknown", never a division by zero.
        assert_eq!(conv_out(64, 3, 0, 1, 1, 1, "NOTSET"), None);
        assert_eq!(conv_out(64, 3, 1, 0, 1, 1, "NOTSET"), None);
        assert_eq!(conv_out(64, -3, 1, 1, 1, 1, "NOTSET"), None);
        assert_eq!(conv_out(64, 3, 1, 1, -5, 1, "NOTSET"), None);
        assert_eq!(conv_out(64, 3, 1, 1, 1, 1, "SAME_SIDEWAYS"), None);
        assert_eq!(conv_out(2, 5, 1, 1, 0, 0, "VALID"), None);
    }

    /// Issue 12 item 13: `strides = [0, 0]` on Conv/MaxPool/AveragePool divided by zero.
    #[test]
    fn zero_strides_leave_the_shape_unknown_instead_of_panicking() {
        use crate::onnx::{GraphProto, TensorProto};
        for op in ["Conv", "MaxPool", "AveragePool"] {
            let mut attrs = vec![onnx::attr_ints_of("strides", vec![0, 0])];
            let mut inputs = vec!["x"];
            if op == "Conv" {
                inputs.push("w");
            } else {
                attrs.push(onnx::attr_ints_of("kernel_shape", vec![3, 3]));
            }
            let graph = GraphProto {
                node: vec![onnx::node(op, "n", &inputs, &["y"], attrs)],
                initializer: vec![TensorProto { ..onnx::f32_tensor("w", &[4, 4, 3, 3], &[0.0; 144]) }],
                input: vec![onnx::value_info_nchw("x", [Some(1), Some(4), Some(8), Some(8)])],
                ..Default::default()
            };
            let index = GraphIndex::new(&graph).unwrap();
            let s = infer(&index, 16);
            assert_eq!(s.get("y"), None, "{op}");
        }
    }

    #[test]
    fn broadcasting() {
        assert_eq!(broadcast(&[1, 64, 8, 8], &[64, 1, 1]), Some(vec![1, 64, 8, 8]));
        assert_eq!(broadcast(&[1, 64, 8, 8], &[]), Some(vec![1, 64, 8, 8]));
        assert_eq!(broadcast(&[1, 64, 8, 8], &[3, 1, 1]), None);
    }
}
