//! What survives a rewrite: the original initializers, graph inputs and shape annotations the
//! rewrite did not replace, so that an empty plan gives back the same model byte for byte.
//!
//! An initializer is dropped only when the original graph read it (directly or from inside an
//! If/Loop/Scan body) and the rewritten one no longer does: a replaced weight. Everything else
//! stays, including initializers no node reads, which may be the default value of a graph
//! input. A dropped initializer that was also listed as a graph input (IR version 3, or PyTorch's
//! `keep_initializers_as_inputs=True`) loses that input entry too, and under IR version 3, where
//! every initializer must be a graph input, the new initializers get one.

use std::collections::HashSet;

use crate::onnx::{self, GraphProto, NodeProto, TensorShapeProto, TypeProto, ValueInfoProto, type_proto};

/// Names `node` reads: its inputs and, recursively, every name read inside its subgraphs (a
/// body reads outer tensors by name, without listing them as the node's inputs).
pub(crate) fn reads(node: &NodeProto) -> impl Iterator<Item = &str> {
    let mut names: Vec<&str> = node.input.iter().map(String::as_str).collect();
    names.extend(subgraph_reads(node));
    names.into_iter().filter(|n| !n.is_empty())
}

/// Names read inside `node`'s subgraphs (If branches, Loop and Scan bodies), at any depth.
pub(crate) fn subgraph_reads(node: &NodeProto) -> Vec<&str> {
    let mut out = Vec::new();
    for a in &node.attribute {
        for g in a.g.iter().chain(&a.graphs) {
            for n in &g.node {
                out.extend(reads(n));
            }
            out.extend(g.output.iter().filter_map(|o| o.name.as_deref()));
        }
    }
    out
}

/// Every name the graph's nodes read (with subgraphs) or the graph outputs.
fn used_names(g: &GraphProto) -> HashSet<&str> {
    let mut used: HashSet<&str> = g.node.iter().flat_map(reads).collect();
    used.extend(g.output.iter().filter_map(|o| o.name.as_deref()));
    used
}

/// Tidies the rewritten graph `g` (nodes and initializers already in place, the original's
/// followed by the new ones) against the `original` graph.
pub(crate) fn tidy(g: &mut GraphProto, original: &GraphProto, ir_version: Option<i64>, new_inits: usize) {
    let before: HashSet<String> = used_names(original).into_iter().map(str::to_string).collect();
    let after: HashSet<String> = used_names(g).into_iter().map(str::to_string).collect();
    let replaced = |name: &str| before.contains(name) && !after.contains(name);
    let dropped: HashSet<String> =
        g.initializer.iter().map(|t| onnx::tensor_name(t).to_string()).filter(|n| replaced(n)).collect();
    g.initializer.retain(|t| !dropped.contains(onnx::tensor_name(t)));
    g.input.retain(|v| !v.name.as_deref().is_some_and(|n| dropped.contains(n)));

    // Shape annotations of tensors that no longer exist go; all others stay as they were.
    let orig_defined: HashSet<&str> =
        original.node.iter().flat_map(|n| n.output.iter().map(String::as_str)).collect();
    let produced: HashSet<&str> = g.node.iter().flat_map(|n| n.output.iter().map(String::as_str)).collect();
    g.value_info.retain(|v| {
        v.name
            .as_deref()
            .is_none_or(|n| produced.contains(n) || !(orig_defined.contains(n) || dropped.contains(n)))
    });

    // IR version 3: every initializer must also be a graph input.
    if ir_version.is_some_and(|v| v < 4) {
        let first_new = g.initializer.len().saturating_sub(new_inits);
        let inputs: Vec<ValueInfoProto> = g.initializer[first_new..].iter().map(input_for).collect();
        g.input.extend(inputs);
    }
}

/// A graph input entry declaring an initializer's type and shape.
fn input_for(t: &onnx::TensorProto) -> ValueInfoProto {
    use onnx::tensor_shape_proto::{Dimension, dimension::Value};
    let dim =
        t.dims.iter().map(|&d| Dimension { value: Some(Value::DimValue(d)), ..Default::default() }).collect();
    ValueInfoProto {
        name: t.name.clone(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: t.data_type,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}
