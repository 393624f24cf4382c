//! Graph analysis: an index over an ONNX graph, concrete shape inference, and the decision of
//! which Convs may be ghosted.
//!
//! [`GraphIndex`] answers "who produces / consumes this tensor" and "is this a constant";
//! [`shapes`] infers concrete shapes for a probe input size (channel counts for the emitter,
//! spatial sizes for multiply-add counts); [`analysis`] applies the eligibility rules and the
//! paper's default policy and records, for every Conv, why it is or is not a candidate. The
//! graph itself is never modified here: emitting is [`crate::emit`]'s job.

pub mod analysis;
pub mod shapes;

use std::collections::{HashMap, HashSet};

use anyhow::{Result, bail};

use crate::onnx::{self, GraphProto, NodeProto, TensorProto};

/// Read-only index over a graph's tensors and nodes.
pub struct GraphIndex<'a> {
    pub graph: &'a GraphProto,
    initializers: HashMap<&'a str, &'a TensorProto>,
    /// Outputs of `Constant` nodes that carry a `value` tensor.
    constants: HashMap<&'a str, &'a TensorProto>,
    producer: HashMap<&'a str, usize>,
    consumers: HashMap<&'a str, Vec<usize>>,
    pub graph_inputs: HashSet<&'a str>,
    pub graph_outputs: HashSet<&'a str>,
}

impl<'a> GraphIndex<'a> {
    /// Indexes `graph`; fails if the nodes are not in topological order or a tensor is written
    /// twice (ONNX requires both, and the emitter relies on them).
    pub fn new(graph: &'a GraphProto) -> Result<Self> {
        let initializers: HashMap<&str, &TensorProto> =
            graph.initializer.iter().map(|t| (onnx::tensor_name(t), t)).collect();
        let graph_inputs: HashSet<&str> = graph.input.iter().filter_map(|v| v.name.as_deref()).collect();
        let graph_outputs: HashSet<&str> = graph.output.iter().filter_map(|v| v.name.as_deref()).collect();
        let mut producer = HashMap::new();
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut constants = HashMap::new();
        let mut defined: HashSet<&str> = graph_inputs.iter().copied().collect();
        defined.extend(initializers.keys().copied());
        for (i, n) in graph.node.iter().enumerate() {
            for inp in &n.input {
                if inp.is_empty() {
                    continue;
                }
                if !defined.contains(inp.as_str()) {
                    bail!(
                        "node {} reads '{}' before any node writes it (the graph is not topologically sorted or the tensor is missing)",
                        describe(n),
                        inp
                    );
                }
                let list = consumers.entry(inp.as_str()).or_default();
                if list.last() != Some(&i) {
                    list.push(i);
                }
            }
            for out in &n.output {
                if out.is_empty() {
                    continue;
                }
                if producer.insert(out.as_str(), i).is_some() || initializers.contains_key(out.as_str()) {
                    bail!("tensor '{}' is written twice (second time by node {})", out, describe(n));
                }
                defined.insert(out.as_str());
            }
            if n.op_type() == "Constant"
                && let (Some(t), Some(out)) =
                    (onnx::attr(n, "value").and_then(|a| a.t.as_ref()), n.output.first())
            {
                constants.insert(out.as_str(), t);
            }
        }
        Ok(Self { graph, initializers, constants, producer, consumers, graph_inputs, graph_outputs })
    }

    pub fn node(&self, i: usize) -> &'a NodeProto {
        &self.graph.node[i]
    }

    /// The initializer or `Constant` value named `name`.
    pub fn constant(&self, name: &str) -> Option<&'a TensorProto> {
        self.initializers.get(name).or_else(|| self.constants.get(name)).copied()
    }

    pub fn initializer(&self, name: &str) -> Option<&'a TensorProto> {
        self.initializers.get(name).copied()
    }

    pub fn producer(&self, tensor: &str) -> Option<usize> {
        self.producer.get(tensor).copied()
    }

    pub fn consumers(&self, tensor: &str) -> &[usize] {
        self.consumers.get(tensor).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// `Conv "name"` or `Conv (writes "out")` when the node has no name: for messages.
pub fn describe(n: &NodeProto) -> String {
    match n.name.as_deref() {
        Some(name) if !name.is_empty() => format!("{} \"{}\"", n.op_type(), name),
        _ => format!("{} (writes \"{}\")", n.op_type(), n.output.first().map(String::as_str).unwrap_or("")),
    }
}
