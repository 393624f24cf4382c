//! Counting: parameters, multiply-adds and the per-Conv table that `inspect` and `convert`
//! print.
//!
//! Parameters are the elements of the floating-point initializers. Multiply-adds are those of
//! Conv and ConvTranspose nodes (`output elements x C_in/group x kh x kw`, and per input element
//! for ConvTranspose), from the concrete shapes [`crate::graph::shapes`] infers at a probe size,
//! divided by the probe's input pixels (and by the output pixels): figures per LR pixel and per
//! HR pixel that do not depend on the image size. GhostShift and the standard ghost stage are
//! memory operations: their cost shows up in benchmarks, not here, except the one-hot depthwise
//! Conv of the standard form, which is a Conv like any other.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::graph::GraphIndex;
use crate::graph::analysis::{Analysis, Verdict};
use crate::graph::shapes::Shapes;
use crate::onnx::{self, GraphProto, ModelProto, tensor_proto::DataType};

/// Parameter count: elements of all floating-point initializers.
pub fn params(graph: &GraphProto) -> u64 {
    let float_types =
        [DataType::Float, DataType::Float16, DataType::Double, DataType::Bfloat16].map(|t| t as i32);
    graph
        .initializer
        .iter()
        .filter(|t| t.data_type.is_some_and(|d| float_types.contains(&d)))
        .map(|t| onnx::numel(&t.dims) as u64)
        .sum()
}

/// Multiply-adds of each Conv/ConvTranspose node at the probe size (node index -> MACs).
pub fn node_macs(index: &GraphIndex<'_>, shapes: &Shapes) -> BTreeMap<usize, u64> {
    let mut out = BTreeMap::new();
    for (i, n) in index.graph.node.iter().enumerate() {
        let op = n.op_type();
        if op != "Conv" && op != "ConvTranspose" {
            continue;
        }
        let Some(w) = n.input.get(1).and_then(|w| shapes.get(w)) else { continue };
        let per: i64 = w.iter().skip(1).product();
        let elems = match op {
            "Conv" => n.output.first().and_then(|o| shapes.get(o)).map(|d| d.iter().product::<i64>()),
            _ => shapes.get(&n.input[0]).map(|d| d.iter().product::<i64>()),
        };
        if let Some(e) = elems {
            out.insert(i, (e * per) as u64);
        }
    }
    out
}

/// One row of the Conv table.
#[derive(Clone, Debug, Serialize)]
pub struct ConvRow {
    pub node: String,
    pub output: String,
    pub kernel: String,
    pub c_in: usize,
    pub c_out: usize,
    pub group: usize,
    pub macs_per_pixel: f64,
    pub eligible: bool,
    pub reason: String,
}

/// What `ghostsr inspect` reports.
#[derive(Clone, Debug, Serialize)]
pub struct Inspection {
    pub path: String,
    pub opsets: BTreeMap<String, i64>,
    pub ops: BTreeMap<String, usize>,
    pub nodes: usize,
    pub params: u64,
    /// Conv/ConvTranspose multiply-adds per input (LR) pixel.
    pub macs_per_pixel: f64,
    /// The same per output (HR) pixel, when the output size could be inferred.
    pub macs_per_output_pixel: Option<f64>,
    pub convs_total: usize,
    pub convs_eligible: usize,
    pub convs: Vec<ConvRow>,
}

/// Builds the inspection of a model.
pub fn inspect(path: &str, model: &ModelProto, index: &GraphIndex<'_>, analysis: &Analysis) -> Inspection {
    let graph = index.graph;
    let shapes = &analysis.shapes;
    let macs = node_macs(index, shapes);
    let in_px = shapes.input_pixels.unwrap_or(1).max(1) as f64;
    let out_px = graph
        .output
        .first()
        .and_then(|o| o.name.as_deref())
        .and_then(|o| shapes.get(o))
        .filter(|d| d.len() == 4)
        .map(|d| (d[2] * d[3]) as f64);
    let total: u64 = macs.values().sum();
    let mut ops = BTreeMap::new();
    for n in &graph.node {
        let key = match n.domain.as_deref() {
            Some(d) if !d.is_empty() => format!("{d}::{}", n.op_type()),
            _ => n.op_type().to_string(),
        };
        *ops.entry(key).or_insert(0) += 1;
    }
    let opsets = model
        .opset_import
        .iter()
        .map(|o| {
            (
                o.domain.clone().filter(|d| !d.is_empty()).unwrap_or_else(|| "ai.onnx".into()),
                o.version.unwrap_or(0),
            )
        })
        .collect();
    let convs: Vec<ConvRow> = analysis
        .convs
        .iter()
        .map(|c| ConvRow {
            node: c.node.clone(),
            output: c.output.clone(),
            kernel: format!("{}x{}", c.kernel[0], c.kernel[1]),
            c_in: c.c_in,
            c_out: c.c_out,
            group: c.group,
            macs_per_pixel: macs.get(&c.node_index).copied().unwrap_or(0) as f64 / in_px,
            eligible: c.verdict.is_eligible(),
            reason: c.verdict.reason(),
        })
        .collect();
    Inspection {
        path: path.to_string(),
        opsets,
        ops,
        nodes: graph.node.len(),
        params: params(graph),
        macs_per_pixel: total as f64 / in_px,
        macs_per_output_pixel: out_px.map(|p| total as f64 / p),
        convs_total: convs.len(),
        convs_eligible: analysis
            .convs
            .iter()
            .filter(|c| matches!(c.verdict, Verdict::Eligible { .. }))
            .count(),
        convs,
    }
}

/// Human-readable rendering of an inspection.
pub fn render(i: &Inspection) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "{}", i.path);
    let opsets: Vec<String> = i.opsets.iter().map(|(d, v)| format!("{d} {v}")).collect();
    let _ = writeln!(s, "  opsets:        {}", opsets.join(", "));
    let ops: Vec<String> = i.ops.iter().map(|(o, n)| format!("{o} x{n}")).collect();
    let _ = writeln!(s, "  nodes:         {} ({})", i.nodes, ops.join(", "));
    let _ = writeln!(s, "  params:        {}", thousands(i.params));
    let _ = write!(s, "  MACs/pixel:    {} per input pixel", thousands(i.macs_per_pixel.round() as u64));
    if let Some(o) = i.macs_per_output_pixel {
        let _ = write!(s, ", {} per output pixel", thousands(o.round() as u64));
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "  Convs:         {} ({} eligible)", i.convs_total, i.convs_eligible);
    for c in &i.convs {
        let mark = if c.eligible { "+" } else { "-" };
        let name = if c.node.is_empty() { &c.output } else { &c.node };
        let g = if c.group > 1 { format!(" g{}", c.group) } else { String::new() };
        let _ = writeln!(
            s,
            "    {mark} {name}  {} {}->{}{g}  {} MACs/px  {}",
            c.kernel,
            c.c_in,
            c.c_out,
            thousands(c.macs_per_pixel.round() as u64),
            c.reason
        );
    }
    s
}

/// `1234567` -> `1,234,567`.
pub fn thousands(v: u64) -> String {
    let d = v.to_string();
    let mut out = String::new();
    for (i, ch) in d.chars().enumerate() {
        if i > 0 && (d.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn thousands_separators() {
        assert_eq!(super::thousands(0), "0");
        assert_eq!(super::thousands(999), "999");
        assert_eq!(super::thousands(1000), "1,000");
        assert_eq!(super::thousands(40729603), "40,729,603");
    }
}
