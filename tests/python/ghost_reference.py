"""Independent reference for a ghost plan, built from standard ONNX ops.

`build_reference(original, plan)` returns the ORIGINAL model with every Conv the plan lists kept
intact (all its filters, untouched weights) and, right after it, a chain of plain opset-17 nodes
that substitutes the ghost channels exactly as the plan format defines them:

    out[:, c] = Y[:, c]                                   c intrinsic
    out[:, c] = scale * shift(Y[:, source], dy, dx) + bias   c a ghost

where shift moves content +dy rows and +dx columns with zero fill (before the affine map). Each
channel is sliced out on its own (runs of consecutive intrinsic channels in one Slice), a shift
is a zero Pad followed by a Slice, and all C channels are concatenated back in ORIGINAL order.
The Conv's consumers (and the graph output, if the Conv output is one) then read the new tensor.

This deliberately shares nothing with the Rust emitter: no weight surgery, no channel
permutation, no Gather, no depthwise Conv.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import helper, numpy_helper

INT64_MAX = np.iinfo(np.int64).max


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the outer scope."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = []
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs = [attr.g]
        elif attr.type == onnx.AttributeProto.GRAPHS:
            graphs = list(attr.graphs)
        for g in graphs:
            for n in g.node:
                names.update(n.input)
                names.update(_subgraph_inputs(n))
    return names


class _Builder:
    def __init__(self, graph: onnx.GraphProto, prefix: str):
        self.graph = graph
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.count = 0
        taken = {i.name for i in graph.initializer}
        taken |= {n for node in graph.node for n in list(node.input) + list(node.output)}
        taken |= {i.name for i in graph.input} | {o.name for o in graph.output}
        self.taken = taken

    def fresh(self, hint: str) -> str:
        while True:
            name = f"{self.prefix}/{hint}_{self.count}"
            self.count += 1
            if name not in self.taken:
                self.taken.add(name)
                return name

    def const(self, hint: str, array: np.ndarray) -> str:
        name = self.fresh(hint)
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], hint: str, **attrs) -> str:
        out = self.fresh(hint)
        self.nodes.append(
            helper.make_node(op, inputs, [out], name=self.fresh(op), **attrs)
        )
        return out


def _ints(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def _substitute(b: _Builder, y: str, layer: dict, max_shift: int, np_dtype) -> str:
    """Emit the nodes for one layer; returns the name of the substituted tensor."""
    c_out = int(layer["out_channels"])
    intrinsic = sorted(int(c) for c in layer["intrinsic"])
    ghosts = {int(g["channel"]): g for g in layer["ghosts"]}
    assert set(intrinsic).isdisjoint(ghosts), "a channel is both intrinsic and ghost"
    assert set(intrinsic) | set(ghosts) == set(range(c_out)), "plan does not cover every channel"

    axis1 = b.const("axis1", _ints([1]))
    spatial_axes = b.const("axes_hw", _ints([2, 3]))
    slice_cache: dict[int, str] = {}

    def channel_slice(lo: int, hi: int) -> str:
        return b.node(
            "Slice",
            [y, b.const("start", _ints([lo])), b.const("end", _ints([hi])), axis1],
            f"ch{lo}_{hi}",
        )

    def source_channel(src: int) -> str:
        if src not in slice_cache:
            slice_cache[src] = channel_slice(src, src + 1)
        return slice_cache[src]

    pieces: list[str] = []
    c = 0
    while c < c_out:
        if c not in ghosts:
            # a run of consecutive intrinsic channels: one Slice
            hi = c
            while hi < c_out and hi not in ghosts:
                hi += 1
            pieces.append(channel_slice(c, hi))
            c = hi
            continue
        g = ghosts[c]
        src = int(g["source"])
        assert src in intrinsic, f"ghost {c}: source {src} is not intrinsic"
        dy, dx = (int(v) for v in g["shift"])
        assert abs(dy) <= max_shift and abs(dx) <= max_shift
        t = source_channel(src)
        if dy or dx:
            # zero-pad |dy| rows on the side the content moves away from, then cut |dy| rows off
            # the other side: out[h] = x[h - dy], zero where h - dy is outside [0, H).
            pads = [0, 0, max(dy, 0), max(dx, 0), 0, 0, max(-dy, 0), max(-dx, 0)]
            t = b.node(
                "Pad",
                [t, b.const("pads", _ints(pads)), b.const("zero", np.zeros((), np_dtype))],
                f"pad{c}",
                mode="constant",
            )
            starts = [max(-dy, 0), max(-dx, 0)]
            ends = [-dy if dy > 0 else INT64_MAX, -dx if dx > 0 else INT64_MAX]
            t = b.node(
                "Slice",
                [t, b.const("start", _ints(starts)), b.const("end", _ints(ends)), spatial_axes],
                f"shift{c}",
            )
        scale = float(g.get("scale", 1.0))
        bias = float(g.get("bias", 0.0))
        if "scale" in g:
            t = b.node("Mul", [t, b.const("scale", np.asarray(scale, np_dtype))], f"scale{c}")
        if "bias" in g:
            t = b.node("Add", [t, b.const("bias", np.asarray(bias, np_dtype))], f"bias{c}")
        pieces.append(t)
        c += 1

    if len(pieces) == 1:
        return b.node("Identity", pieces, "ghosted")
    return b.node("Concat", pieces, "ghosted", axis=1)


def _elem_dtype(graph: onnx.GraphProto, conv: onnx.NodeProto):
    weights = {i.name: i for i in graph.initializer}
    w = weights.get(conv.input[1])
    if w is not None:
        return helper.tensor_dtype_to_np_dtype(w.data_type)
    return np.float32


def build_reference(original: onnx.ModelProto, plan: dict) -> onnx.ModelProto:
    """The original model with the plan's substitution applied after each listed Conv."""
    return build_reference_with_names(original, plan)[0]


def build_reference_with_names(original: onnx.ModelProto,
                               plan: dict) -> tuple[onnx.ModelProto, dict[str, str]]:
    """build_reference, plus {conv_output: name of its substituted tensor in the reference}.

    In the reference, `conv_output` itself still carries the Conv's untouched output; the
    tensor that the rest of the network reads (what the plan says the layer outputs) is the
    substituted one."""
    assert plan.get("format") == "ghostsr-plan", plan.get("format")
    assert int(plan.get("version", 1)) == 1
    max_shift = int(plan.get("max_shift", 1))
    model = copy.deepcopy(original)
    graph = model.graph

    producers = {}
    for idx, node in enumerate(graph.node):
        for out in node.output:
            producers[out] = idx

    layers = {}
    for layer in plan["layers"]:
        y = layer["conv_output"]
        assert y not in layers, f"layer {y} listed twice"
        assert y in producers, f"unknown conv_output {y}"
        conv = graph.node[producers[y]]
        assert conv.op_type in ("Conv", "ConvTranspose"), f"{y} is produced by {conv.op_type}"
        layers[y] = layer

    b = _Builder(graph, "ghost_reference")
    new_nodes: list[onnx.NodeProto] = []
    renamed: dict[str, str] = {}
    for node in graph.node:
        # consumers of a substituted tensor read the new one (a Conv output feeds later nodes only)
        fresh = copy.deepcopy(node)
        for i, name in enumerate(fresh.input):
            if name in renamed:
                fresh.input[i] = renamed[name]
        assert not (_subgraph_inputs(node) & set(renamed)), "subgraph consumer not supported"
        new_nodes.append(fresh)
        if node.op_type in ("Conv", "ConvTranspose") and node.output[0] in layers:
            y = node.output[0]
            b.nodes = []
            dtype = _elem_dtype(graph, node)
            renamed[y] = _substitute(b, y, layers[y], max_shift, dtype)
            new_nodes.extend(b.nodes)

    del graph.node[:]
    graph.node.extend(new_nodes)
    for out in graph.output:
        if out.name in renamed:
            out.name = renamed[out.name]
    # value_info of the rewritten tensors stays valid (same shape), nothing else to fix
    return model, renamed


def channel_semantics(y: np.ndarray, layer: dict) -> np.ndarray:
    """numpy version of the plan semantics on one Conv output (N, C, H, W), for self-tests."""
    out = y.copy()
    _, _, h, w = y.shape
    for g in layer["ghosts"]:
        c, src = int(g["channel"]), int(g["source"])
        dy, dx = (int(v) for v in g["shift"])
        s = np.zeros_like(y[:, src])
        ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        s[:, yd, xd] = y[:, src][:, ys, xs]
        out[:, c] = float(g.get("scale", 1.0)) * s + float(g.get("bias", 0.0))
    return out
