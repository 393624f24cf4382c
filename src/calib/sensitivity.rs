//! Output-aware channel weights: how much an error in each output channel of a Conv matters to
//! the Convs that read it.
//!
//! The ghost fits minimise feature-map error, every channel alike; but an error `e_c` in
//! channel `c` reaches the network through its consumers, and a consumer Conv with weights `W`
//! turns it into an output error of about `Σ_o Σ_taps W[o, c', i, j]² · |e_c|²` (errors
//! uncorrelated over pixels and channels: the diagonal of the consumer's Gauss-Newton matrix).
//! [`channel_weights`] walks forward from the Conv's output through the ops that keep channels
//! apart (the emitter's per-channel and element-wise tables, [`crate::emit::channel_order`]),
//! Concat (channel offset) and Split (channel range) to every consumer Conv or ConvTranspose and
//! sums those squared weight norms per channel, times the mean slope of an activation that reads
//! the Conv's output directly (measured on the original network's captured output: ReLU's
//! fraction of positive values, LeakyReLU's and Sigmoid's mean derivative). Statistics paths
//! (Reduce*, global pools, Shape, Pow) carry no per-pixel error and stop the walk; so does any
//! op the tables do not know. A channel that reaches nothing gets weight 0: ghosting it is free.

use crate::emit::channel_order::{ELEMENTWISE, PER_CHANNEL};
use crate::graph::GraphIndex;
use crate::graph::shapes::Shapes;
use crate::onnx::{self, NodeProto};

use super::fit::Maps;

/// Walk steps at most (paths through dense Concat chains and residual Adds multiply).
const MAX_VISITS: usize = 20_000;

/// Per-pixel ops that keep channels but lose the spatial error map (pools to one value per
/// channel): the walk stops there.
fn statistics(op: &str) -> bool {
    op.starts_with("Global") || op.starts_with("Reduce")
}

/// Mean derivative of activation `node` over channel `c` of `pre` (its input), if it is an
/// activation whose slope depends on the data.
fn slope(node: &NodeProto, pre: &Maps, c: usize) -> Option<f64> {
    let op = node.op_type();
    let n = pre.pixels() as f64;
    let values = (0..pre.n).flat_map(|k| pre.plane(k, c).iter().map(|&v| v as f64));
    match op {
        "Relu" => Some(values.filter(|&v| v > 0.0).count() as f64 / n),
        "LeakyRelu" => {
            let alpha = onnx::attr_f(node, "alpha").unwrap_or(0.01) as f64;
            let pos = values.filter(|&v| v > 0.0).count() as f64 / n;
            Some(pos + alpha * (1.0 - pos))
        }
        "Sigmoid" => Some(
            values
                .map(|v| {
                    let s = 1.0 / (1.0 + (-v).exp());
                    s * (1.0 - s)
                })
                .sum::<f64>()
                / n,
        ),
        _ => None,
    }
}

/// The squared norm of input channel `c` (of the whole input) over the filters that read it.
fn consumer_norm(index: &GraphIndex<'_>, node: &NodeProto, c: usize) -> Option<f64> {
    let t = index.constant(node.input.get(1)?)?;
    let w = onnx::tensor_f32(t).ok()?;
    let dims = &t.dims;
    if dims.len() < 3 {
        return None;
    }
    let group = onnx::attr_i(node, "group").unwrap_or(1).max(1) as usize;
    let plane: usize = dims[2..].iter().map(|&d| d.max(0) as usize).product();
    let sq = |s: &[f32]| s.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>();
    if node.op_type() == "Conv" {
        // [c_out, c_in / group, k...]: filters of c's group, input column c - group start.
        let (c_out, cig) = (dims[0] as usize, dims[1] as usize);
        let g = c / cig.max(1);
        let per = c_out / group;
        let col = c - g * cig;
        Some((g * per..(g + 1) * per).map(|o| sq(&w[(o * cig + col) * plane..][..plane])).sum())
    } else {
        // ConvTranspose [c_in, c_out / group, k...]: input channel c is row c.
        let row = w.len() / (dims[0] as usize).max(1);
        (c < dims[0] as usize).then(|| sq(&w[c * row..(c + 1) * row]))
    }
}

/// Per output channel of the Conv writing `tensor`: the squared weight norms its consumer Convs
/// give it (see the module docs). `pre` is the original network's `tensor` (for activation
/// slopes; `None`: slope 1). Channels the walk cannot follow count nothing.
pub fn channel_weights(
    index: &GraphIndex<'_>,
    shapes: &Shapes,
    tensor: &str,
    pre: Option<&Maps>,
) -> Vec<f64> {
    let Some(channels) = shapes.channels(tensor).or(pre.map(|m| m.c)) else {
        return Vec::new();
    };
    let mut w = vec![0.0; channels];
    // (tensor, where each original channel sits in it, the factor each carries)
    let mut stack: Vec<(String, Vec<Option<usize>>, Vec<f64>)> =
        vec![(tensor.to_string(), (0..channels).map(Some).collect(), vec![1.0; channels])];
    let mut visits = 0;
    while let Some((t, map, mult)) = stack.pop() {
        for &ni in index.consumers(&t) {
            visits += 1;
            if visits > MAX_VISITS {
                return w;
            }
            let node = index.node(ni);
            let op = node.op_type();
            let out = |k: usize| node.output.get(k).filter(|o| !o.is_empty()).cloned();
            match op {
                "Conv" | "ConvTranspose" => {
                    if node.input.first() != Some(&t) {
                        continue;
                    }
                    for (c, m) in map.iter().enumerate() {
                        if let Some(norm) = m.and_then(|cc| consumer_norm(index, node, cc)) {
                            w[c] += mult[c] * norm;
                        }
                    }
                }
                "Concat" => {
                    let axis = onnx::attr_i(node, "axis").unwrap_or(0);
                    if !(axis == 1 || axis == -3) {
                        continue;
                    }
                    let counts: Option<Vec<usize>> = node.input.iter().map(|i| shapes.channels(i)).collect();
                    let (Some(counts), Some(o)) = (counts, out(0)) else { continue };
                    // The tensor may be concatenated more than once.
                    for (k, _) in node.input.iter().enumerate().filter(|(_, i)| **i == t) {
                        let offset: usize = counts[..k].iter().sum();
                        stack.push((
                            o.clone(),
                            map.iter().map(|m| m.map(|c| c + offset)).collect(),
                            mult.clone(),
                        ));
                    }
                }
                "Split" => {
                    let axis = onnx::attr_i(node, "axis").unwrap_or(0);
                    let sizes: Option<Vec<usize>> = node.output.iter().map(|o| shapes.channels(o)).collect();
                    let (true, Some(sizes)) = (axis == 1 || axis == -3, sizes) else { continue };
                    let mut start = 0;
                    for (k, &s) in sizes.iter().enumerate() {
                        if let Some(o) = out(k) {
                            let part = map
                                .iter()
                                .map(|m| m.filter(|c| (start..start + s).contains(c)).map(|c| c - start));
                            stack.push((o, part.collect(), mult.clone()));
                        }
                        start += s;
                    }
                }
                _ if statistics(op) => {}
                _ if PER_CHANNEL.contains(&op) || ELEMENTWISE.contains(&op) => {
                    let Some(o) = out(0) else { continue };
                    // Element-wise ops must keep the channel count (no broadcast over channels
                    // from this tensor) to keep the map.
                    if shapes.channels(&o).is_some_and(|c| c != shapes.channels(&t).unwrap_or(c)) {
                        continue;
                    }
                    let mut mult = mult.clone();
                    if let (Some(pre), true) = (pre, t == tensor && node.input.first() == Some(&t)) {
                        for (c, f) in mult.iter_mut().enumerate() {
                            if let Some(s) = slope(node, pre, c) {
                                *f *= s;
                            }
                        }
                    }
                    stack.push((o, map.clone(), mult));
                }
                _ => {}
            }
        }
    }
    w
}

/// `weights` scaled to mean 1 (all ones if they sum to nothing), so that weighting an error
/// matrix keeps its scale.
pub fn normalised(weights: &[f64]) -> Vec<f64> {
    let mean = weights.iter().sum::<f64>() / weights.len().max(1) as f64;
    if !(mean > 0.0 && mean.is_finite()) {
        return vec![1.0; weights.len()];
    }
    weights.iter().map(|w| w / mean).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calib::fit::{PairStats, select_intrinsic};
    use crate::graph::shapes;
    use crate::onnx::{GraphProto, ModelProto, attr_int, f32_tensor, node, value_info_nchw};

    /// x (2 ch) -> Conv a (4 ch, 1x1) -> Relu -> r; Concat(x, r) -> Conv b (6 -> 3, 1x1) and
    /// r -> Split [1, 3] -> s1 -> Conv c (1 -> 1). Conv b reads a's channel 2 with zero weights,
    /// a's channel 0 with weight `w0`.
    fn model(w0: f32) -> ModelProto {
        let mut wb = vec![0.5f32; 3 * 6];
        for o in 0..3 {
            wb[o * 6 + 2] = w0; // a's channel 0 (Concat offset 2)
            wb[o * 6 + 4] = 0.0; // a's channel 2
        }
        let graph = GraphProto {
            node: vec![
                node("Conv", "a", &["x", "wa"], &["a"], vec![]),
                node("Relu", "relu", &["a"], &["r"], vec![]),
                node("Concat", "cat", &["x", "r"], &["cat"], vec![attr_int("axis", 1)]),
                node("Conv", "b", &["cat", "wb"], &["b"], vec![]),
                node("Split", "split", &["r"], &["s0", "s1"], vec![attr_int("axis", 1)]),
                node("Conv", "c", &["s0", "wc"], &["y"], vec![]),
            ],
            initializer: vec![
                f32_tensor("wa", &[4, 2, 1, 1], &[1.0; 8]),
                f32_tensor("wb", &[3, 6, 1, 1], &wb),
                f32_tensor("wc", &[1, 1, 1, 1], &[2.0]),
                crate::onnx::i64_tensor("split", &[2], &[1, 3]),
            ],
            input: vec![value_info_nchw("x", [Some(1), Some(2), Some(8), Some(8)])],
            output: vec![
                value_info_nchw("y", [Some(1), Some(1), None, None]),
                value_info_nchw("b", [Some(1), Some(3), None, None]),
            ],
            ..Default::default()
        };
        let mut g = graph;
        // Split sizes as an input (opset 13+).
        g.node[4].input.push("split".into());
        ModelProto { graph: Some(g), ..Default::default() }
    }

    #[test]
    fn weights_follow_concat_split_and_consumer_norms() {
        let m = model(2.0);
        let g = m.graph.as_ref().unwrap();
        let index = GraphIndex::new(g).unwrap();
        let shapes = shapes::infer(&index, 8);
        let w = channel_weights(&index, &shapes, "a", None);
        // Channel 0: Conv b 3 * 2² + Conv c (through the Split's first part) 2²; channel 2:
        // Conv b's zero column only; channels 1, 3: 3 * 0.5².
        assert_eq!(w, vec![12.0 + 4.0, 0.75, 0.0, 0.75]);
        // With data, ReLU's slope: channel 1 positive half the time.
        let mut pre = Maps::zeros(1, 4, 2, 2);
        for (i, v) in pre.data.iter_mut().enumerate() {
            *v = if i % 4 < 2 { 1.0 } else { -1.0 };
        }
        // Channel c's plane is values 4c..4c+4: "positive" where i % 4 < 2, so half of each.
        let w = channel_weights(&index, &shapes, "a", Some(&pre));
        assert_eq!(w, vec![8.0, 0.375, 0.0, 0.375]);
    }

    #[test]
    fn a_channel_no_consumer_reads_is_the_one_ghosted() {
        // Four channels, two pairs of near copies (0 ~ 1, 2 ~ 3); keep 3. Unweighted, the
        // cheapest ghost is channel 3 (the closer copy); with channel 2 worthless to the
        // consumers, channel 2 is ghosted instead.
        let mut y = Maps::zeros(2, 4, 6, 6);
        for k in 0..2 {
            for p in 0..36 {
                let base = ((p * 7 + k * 3) % 11) as f32 / 5.0 - 1.0;
                let other = ((p * 5 + k) % 13) as f32 / 6.0 - 1.0;
                let i = |c: usize| (k * 4 + c) * 36 + p;
                y.data[i(0)] = base;
                y.data[i(1)] = base + 0.3 * (((p * 3) % 5) as f32 - 2.0);
                y.data[i(2)] = other;
                y.data[i(3)] = other + 0.1 * (((p * 3) % 5) as f32 - 2.0);
            }
        }
        let st = PairStats::compute(&y, &y, 0);
        let e = st.error_matrix(true);
        assert_eq!(select_intrinsic(&e, 1, 3, 10), vec![0, 1, 2]);
        let m = model(2.0);
        let index = GraphIndex::new(m.graph.as_ref().unwrap()).unwrap();
        let w = normalised(&channel_weights(&index, &shapes::infer(&index, 8), "a", None));
        let weighted: Vec<Vec<f64>> =
            e.iter().zip(&w).map(|(row, wc)| row.iter().map(|v| v * wc).collect()).collect();
        assert_eq!(select_intrinsic(&weighted, 1, 3, 10), vec![0, 1, 3]);
    }

    #[test]
    fn normalised_weights_have_mean_one_and_survive_zeros() {
        assert_eq!(normalised(&[1.0, 3.0]), vec![0.5, 1.5]);
        assert_eq!(normalised(&[0.0, 0.0]), vec![1.0, 1.0]);
    }
}
