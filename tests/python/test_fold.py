"""`--emit fold`: unshifted, bias-free ghost copies absorbed by the Convs that read them.

The folded model must compute the Convs-only ghost model's function (float, 1e-4), read fewer
channels in its absorbing Convs, keep a copy Conv only where a consumer cannot absorb (Add,
Concat into a non-Conv, a graph output), and quantize to a model whose every Conv is a QLinearConv.
"""

from __future__ import annotations

import collections
import re

import numpy as np
import onnx
import pytest
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from conftest import REPO, SHARED, ghostsr

FIXTURE = REPO / "fixtures" / "edsr_baseline_b4c32_x2.onnx"
CALIB = ["--calib", SHARED / "images" / "BSD68", "--calib-count", "8", "--calib-size", "48"]


def run(path, x):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})


def conv(name, x, w, y, pad):
    return helper.make_node("Conv", [x, w], [y], name=name, kernel_shape=[w_k(pad)] * 2, pads=[pad] * 4)


def w_k(pad):
    return 2 * pad + 1


def split_model(path, bias=None):
    """x -> reduced 3x3 Conv (6 filters) -> copy Conv (12 rows: 6 identity, 5 positive scales, one
    zero) -> LeakyRelu -> Split [4, 8]: the 4 go to Concat -> graph output `d` (not absorbable), the 8
    to a 3x3 Conv -> Relu -> 1x1 Conv -> Add with the LeakyRelu output's first 8 channels -> `z`."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(6, 3, 3, 3)).astype(np.float32)
    copy = np.zeros((12, 6, 1, 1), np.float32)
    src = [0, 1, 2, 3, 4, 5, 0, 2, 5, 1, 3, 4]
    for c, s in enumerate(src):
        copy[c, s] = 1.0 if c < 6 else (0.0 if c == 11 else 0.3 + 0.2 * c)
    w2 = rng.normal(size=(8, 8, 3, 3)).astype(np.float32)
    w3 = rng.normal(size=(8, 8, 1, 1)).astype(np.float32)
    nodes = [
        conv("c1", "x", "w1", "r", 1),
        helper.make_node("Conv", ["r", "copy"] + (["cb"] if bias is not None else []), ["y"], name="copy",
                         kernel_shape=[1, 1]),
        helper.make_node("LeakyRelu", ["y"], ["a"], name="act", alpha=0.1),
        helper.make_node("Split", ["a", "sizes"], ["d0", "rest"], name="split", axis=1),
        helper.make_node("Concat", ["d0", "d0"], ["d"], name="cat", axis=1),
        conv("c2", "rest", "w2", "h", 1),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        conv("c3", "hr", "w3", "h3", 0),
        helper.make_node("Add", ["h3", "rest"], ["z"], name="add"),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in
             [(w1, "w1"), (copy, "copy"), (w2, "w2"), (w3, "w3"), (np.array([4, 8], np.int64), "sizes")]]
    if bias is not None:
        inits.append(numpy_helper.from_array(np.asarray(bias, np.float32), "cb"))
    g = helper.make_graph(nodes, "fold", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 8, 16, 16]) for n in ("d", "z")], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))


@pytest.mark.parametrize("bias", [None, [0, 0.5, 0, -0.25] + [0] * 8])
def test_fold_through_leaky_relu_split_and_concat_is_exact(tmp_path, bias):
    """Biased rows (here in the Split's first part, which no Conv reads) are computed before the
    activation by the copy that materialises them; the bias-free part is absorbed by c2."""
    src, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    split_model(src, bias)
    proc = ghostsr("convert", src, "-o", out, "--emit", "fold", "--ratio", "0", "--kmeans", "--include", "c2")
    assert "folded:         1 ghost copies, absorbed by 1 Conv reads, 2 still computed" in proc.stdout, proc.stdout
    onnx.checker.check_model(str(out), full_check=True)
    x = np.random.default_rng(1).random((1, 3, 16, 16), dtype=np.float32)
    for a, b in zip(run(src, x), run(out, x)):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-4, np.abs(a - b).max()
    m = onnx.load(str(out))
    inits = {t.name: t for t in m.graph.initializer}
    nodes = {n.name: n for n in m.graph.node}
    # c2 reads the 6 reduced channels (LeakyRelu'd), not the 8 copies.
    assert list(inits[nodes["c2"].input[1]].dims) == [8, 6, 3, 3]
    assert nodes["act/ghostsr_fold"].input == ["r"]
    # The Add and the graph output (a Concat of copies) read copies: 1x1 Convs of the reduced
    # tensor, then the activation.
    copies = [n for n in m.graph.node if n.name.endswith("ghostsr_fold_copy")]
    assert all(n.input[0] == "r" for n in copies) and len(copies) == 2
    acts = [n for n in m.graph.node if n.name.endswith("ghostsr_fold_act")]
    assert sorted(n.output[0] for n in acts) == ["d", "rest"]
    assert all(n.op_type == "LeakyRelu" for n in acts)


def test_negative_or_biased_copies_are_left_alone(tmp_path):
    src, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    split_model(src)
    m = onnx.load(str(src))
    copy = next(t for t in m.graph.initializer if t.name == "copy")
    a = numpy_helper.to_array(copy).copy()
    a[7, 2] = -0.5  # a negative scale does not commute with LeakyRelu
    copy.CopyFrom(numpy_helper.from_array(a, "copy"))
    onnx.save(m, str(src))
    ghostsr("convert", src, "-o", out, "--emit", "fold", "--ratio", "0", "--kmeans", "--include", "c2")
    x = np.random.default_rng(2).random((1, 3, 16, 16), dtype=np.float32)
    for p, q in zip(run(src, x), run(out, x)):
        assert np.abs(p - q).max() < 1e-4
    m = onnx.load(str(out))
    inits = {t.name: t for t in m.graph.initializer}
    c2 = next(n for n in m.graph.node if n.name == "c2")
    assert c2.input[0] == "rest" and list(inits[c2.input[1]].dims) == [8, 8, 3, 3]
    assert sum(n.op_type == "Conv" for n in m.graph.node) == 4


def test_folded_ghost_model_equals_the_conv_form_and_quantizes_to_qlinearconvs(tmp_path):
    f, plan, c, q = tmp_path / "f.onnx", tmp_path / "p.json", tmp_path / "c.onnx", tmp_path / "q.onnx"
    proc = ghostsr("convert", FIXTURE, "-o", f, *CALIB, "--emit", "fold", "--max-shift", "0", "--ratio", "0.5",
                   "--save-plan", plan)
    absorbed = re.search(r"absorbed by (\d+) Conv reads", proc.stdout)
    assert absorbed and int(absorbed.group(1)) > 0, proc.stdout
    # The same plan in the Convs-only form: the same function, more MACs.
    ghostsr("convert", FIXTURE, "-o", c, "--plan", plan, "--emit", "conv")
    ghostsr("convert", FIXTURE, "-o", f, "--plan", plan, "--emit", "fold", "--force")
    x = np.random.default_rng(3).random((1, 3, 24, 20), dtype=np.float32)
    a, b = run(c, x)[0], run(f, x)[0]
    assert np.abs(a - b).max() < 1e-4, np.abs(a - b).max()
    convs = lambda p: sum(n.op_type == "Conv" for n in onnx.load(str(p)).graph.node)  # noqa: E731
    assert convs(f) < convs(c)
    ghostsr("convert", FIXTURE, "-o", q, *CALIB, "--emit", "fold", "--int8", "--ratio", "0.5")
    onnx.checker.check_model(str(q), full_check=True)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "q.opt.onnx")
    ort.InferenceSession(str(q), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    assert ops["QLinearConv"] == convs(f) and ops["Conv"] == 0 and ops["FusedConv"] == 0, ops


def test_dense_concat_of_features_and_a_relu_of_copies_folds_into_the_next_conv(tmp_path):
    """RDN's dense block: h = Conv(x); a = Relu(copy(r)); Conv reads Concat(h, a) and a later
    Concat(Concat(h, a), a2): each reading Conv gets the Concat of h and Relu(r) instead."""
    rng = np.random.default_rng(4)
    w0 = rng.normal(size=(5, 3, 3, 3)).astype(np.float32)
    w1 = rng.normal(size=(4, 5, 3, 3)).astype(np.float32)
    copy = np.zeros((8, 4, 1, 1), np.float32)
    for c, s in enumerate([0, 1, 2, 3, 0, 1, 3, 3]):
        copy[c, s] = 1.0 if c < 4 else 0.25 * c
    w2 = rng.normal(size=(6, 13, 3, 3)).astype(np.float32)
    w3 = rng.normal(size=(2, 13, 1, 1)).astype(np.float32)
    nodes = [
        conv("c0", "x", "w0", "h", 1),
        conv("c1", "h", "w1", "r", 1),
        helper.make_node("Conv", ["r", "copy"], ["y"], name="copy", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["y"], ["a"], name="relu"),
        helper.make_node("Concat", ["h", "a"], ["cat"], name="cat", axis=1),
        conv("c2", "cat", "w2", "z", 1),
        conv("c3", "cat", "w3", "z3", 0),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in [(w0, "w0"), (w1, "w1"), (copy, "copy"), (w2, "w2"), (w3, "w3")]]
    g = helper.make_graph(nodes, "dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 6, 12, 12]),
                           helper.make_tensor_value_info("z3", TensorProto.FLOAT, [1, 2, 12, 12])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    src, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(m, str(src))
    proc = ghostsr("convert", src, "-o", out, "--emit", "fold", "--ratio", "0", "--kmeans", "--include", "c2")
    assert "folded:         1 ghost copies, absorbed by 2 Conv reads, 0 still computed" in proc.stdout, proc.stdout
    onnx.checker.check_model(str(out), full_check=True)
    x = np.random.default_rng(5).random((1, 3, 12, 12), dtype=np.float32)
    for p, q in zip(run(src, x), run(out, x)):
        assert np.abs(p - q).max() < 1e-4 * max(1.0, np.abs(p).max()), np.abs(p - q).max()
    f = onnx.load(str(out))
    inits = {t.name: t for t in f.graph.initializer}
    by_name = {n.name: n for n in f.graph.node}
    assert list(inits[by_name["c2"].input[1]].dims) == [6, 9, 3, 3], "5 feature + 4 reduced channels"
    assert by_name["c2"].input[0] == by_name["c3"].input[0], "one Concat shared by both readers"
    assert not any(n.name == "copy" for n in f.graph.node)
