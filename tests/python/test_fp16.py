"""Half precision through `ghostsr convert`: a float32 model converted with --fp16, and a
float16 model converted as it is, give float16 ghost models that onnx's checker accepts and
that ONNX Runtime runs (the GhostShift float16 kernel included) close to the float32 ghost model."""

from __future__ import annotations

import subprocess

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper
from conftest import BIN, PLUGIN


def run(model, x):
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(PLUGIN))
    s = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def to_fp16(src, dst):
    """A plain float16 copy of a float32 model (what a user's own fp16 export would look like)."""
    m = onnx.load(src)
    for i, t in enumerate(m.graph.initializer):
        if t.data_type == TensorProto.FLOAT:
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.save(m, dst)


def test_fp16_ghost_models_run_close_to_fp32(tmp_path):
    orig = tmp_path / "eb.onnx"
    subprocess.run([str(BIN), "generate", "edsr-baseline", "--scale", "2", "--blocks", "2", "--channels", "16",
                    "-o", str(orig)], check=True, capture_output=True)
    g32, g16 = tmp_path / "g32.onnx", tmp_path / "g16.onnx"
    subprocess.run([str(BIN), "convert", str(orig), "-o", str(g32), "--seed", "1", "--kmeans"], check=True, capture_output=True)
    subprocess.run([str(BIN), "convert", str(orig), "-o", str(g16), "--seed", "1", "--fp16", "--kmeans"], check=True,
                   capture_output=True)
    orig16, g16b = tmp_path / "eb16.onnx", tmp_path / "g16b.onnx"
    to_fp16(orig, orig16)
    # plan, then convert --plan, on the float16 file (the plan is made on the widened weights)
    plan = tmp_path / "plan16.json"
    subprocess.run([str(BIN), "plan", str(orig16), "-o", str(plan), "--seed", "1"], check=True, capture_output=True)
    subprocess.run([str(BIN), "convert", str(orig16), "-o", str(g16b), "--plan", str(plan)], check=True,
                   capture_output=True)

    # Every model comes from the same k-means plan (`plan` plans with k-means; `convert` would
    # calibrate by default), so they differ only in precision and form.
    others = []
    for form in ("fused", "standard", "conv"):
        others.append(tmp_path / f"g16_{form}.onnx")
        subprocess.run([str(BIN), "convert", str(orig), "-o", str(others[-1]), "--seed", "1", "--fp16", "--emit", form, "--kmeans"],
                       check=True, capture_output=True)

    x = np.random.default_rng(0).random((1, 3, 24, 20), dtype=np.float32)
    want = run(g32, x)
    for g in [g16, g16b, *others]:
        m = onnx.load(g)
        onnx.checker.check_model(m, full_check=True)
        assert any(n.op_type == "GhostShift" for n in m.graph.node) == ("standard" not in g.name and "conv" not in g.name)
        assert m.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
        got = run(g, x.astype(np.float16))
        assert got.dtype == np.float16 and got.shape == want.shape
        err = np.abs(got.astype(np.float32) - want)
        assert float(err.max()) <= 2e-2 * max(1.0, float(np.abs(want).max())), (g.name, float(err.max()))
    # A float16 input keeps its weights exactly: both fp16 ghost models have the same initializers.
    a = {t.name: numpy_helper.to_array(t) for t in onnx.load(g16).graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in onnx.load(g16b).graph.initializer}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
