"""End-to-end tests of the GhostShift ONNX Runtime plugin (libghostsr.so) from Python.

Builds tiny one-node ONNX graphs with onnx.helper, loads the plugin with
SessionOptions.register_custom_ops_library and compares against a numpy reference of the
contract in shared/design/ghostshift-op.md.

Plugin path: env GHOSTSR_PLUGIN, default target/release/libghostsr.so under the repository root
(build it with `cargo build --release`). Run: .venv/bin/python -m pytest tests/python/test_plugin.py
"""

import os
import pathlib
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

REPO = pathlib.Path(__file__).resolve().parents[2]
PLUGIN = pathlib.Path(os.environ.get("GHOSTSR_PLUGIN", REPO / "target" / "release" / "libghostsr.so"))
DOMAIN = "ai.ghostsr"

NP_TO_ONNX = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, np.int32: TensorProto.INT32}


@pytest.fixture(scope="session", autouse=True)
def plugin_exists():
    if not PLUGIN.is_file():
        pytest.fail(f"plugin not found at {PLUGIN}: run `cargo build --release` or set GHOSTSR_PLUGIN")


def make_model(attrs, dtype=np.float32, in_shape=("N", "C", "H", "W"), out_shape=None):
    """One GhostShift node X -> Y; attrs is a dict of node attributes (None values are omitted)."""
    elem = NP_TO_ONNX[dtype]
    node = helper.make_node(
        "GhostShift", ["X"], ["Y"], domain=DOMAIN, **{k: v for k, v in attrs.items() if v is not None}
    )
    x = helper.make_tensor_value_info("X", elem, None if in_shape is None else list(in_shape))
    y = helper.make_tensor_value_info("Y", elem, out_shape)
    graph = helper.make_graph([node], "ghost_shift_test", [x], [y])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)]
    )
    model.ir_version = 9
    return model.SerializeToString()


def session(model_bytes):
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(PLUGIN))
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def reference(x, sources, shifts, scales=None, biases=None):
    """The contract, element by element semantics in numpy (f32 arithmetic, one rounding at the end)."""
    n, _, h, w = x.shape
    c_g = len(sources)
    scales = np.ones(c_g, np.float32) if scales is None else np.asarray(scales, np.float32)
    biases = np.zeros(c_g, np.float32) if biases is None else np.asarray(biases, np.float32)
    xf = x.astype(np.float32)
    y = np.empty((n, c_g, h, w), np.float32)
    for g, s in enumerate(sources):
        dy, dx = shifts[2 * g], shifts[2 * g + 1]
        plane = np.zeros((n, h, w), np.float32)
        r0, r1 = max(dy, 0), min(h + dy, h)
        c0, c1 = max(dx, 0), min(w + dx, w)
        if r0 < r1 and c0 < c1:
            plane[:, r0:r1, c0:c1] = xf[:, s, r0 - dy : r1 - dy, c0 - dx : c1 - dx]
        y[:, g] = scales[g] * plane + biases[g]
    return y.astype(x.dtype)


def random_attrs(rng, c_in, affine):
    c_g = int(rng.integers(1, 7))
    sources = [int(v) for v in rng.integers(0, c_in, c_g)]
    if c_g > 1:
        sources[-1] = sources[0]  # shared source
    shifts = [int(v) for v in rng.integers(-3, 4, 2 * c_g)]
    scales = [float(v) for v in rng.uniform(-2, 2, c_g).astype(np.float32)] if affine & 1 else None
    biases = [float(v) for v in rng.uniform(-1, 1, c_g).astype(np.float32)] if affine & 2 else None
    return dict(sources=sources, shifts=shifts, scales=scales, biases=biases)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("seed", range(6))
def test_matches_reference(dtype, seed):
    rng = np.random.default_rng(seed)
    n, c_in, h, w = (int(v) for v in (rng.integers(1, 3), rng.integers(1, 5), rng.integers(1, 14), rng.integers(1, 14)))
    attrs = random_attrs(rng, c_in, affine=seed % 4)
    sess = session(make_model(attrs, dtype))
    for _ in range(2):  # the same session with fresh inputs
        x = rng.uniform(-4, 4, (n, c_in, h, w)).astype(dtype)
        (y,) = sess.run(None, {"X": x})
        want = reference(x, **attrs)
        assert y.dtype == dtype and y.shape == want.shape
        np.testing.assert_array_equal(y, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_large_tensor_parallel_path(dtype):
    rng = np.random.default_rng(42)
    x = rng.standard_normal((2, 8, 96, 80)).astype(dtype)
    attrs = dict(
        sources=[g % 8 for g in range(16)],
        shifts=[v for g in range(16) for v in (g % 7 - 3, 3 - g % 7)],
        scales=[0.5 + 0.1 * g for g in range(16)],
        biases=[0.01 * g for g in range(16)],
    )
    (y,) = session(make_model(attrs, dtype)).run(None, {"X": x})
    np.testing.assert_array_equal(y, reference(x, **attrs))


def test_shape_inference_sets_output_type_and_shape():
    """With no declared output type/shape, the plugin's shape inference supplies both."""
    attrs = dict(sources=[0, 1, 1], shifts=[1, 0, 0, -1, 2, 2])
    sess = session(make_model(attrs, np.float16, in_shape=("batch", 2, "height", 7), out_shape=None))
    out = sess.get_outputs()[0]
    assert out.type == "tensor(float16)"
    assert out.shape == ["batch", 3, "height", 7]
    x = np.arange(2 * 2 * 5 * 7, dtype=np.float16).reshape(2, 2, 5, 7)
    (y,) = sess.run(None, {"X": x})
    np.testing.assert_array_equal(y, reference(x, **attrs))


def expect_ghostshift_error(fn):
    with pytest.raises(Exception) as info:
        fn()
    assert "GhostShift" in str(info.value), str(info.value)
    return str(info.value)


BAD_ATTRS = {
    "source_out_of_range": (dict(sources=[0, 5], shifts=[0, 0, 1, 1]), "sources[1] = 5"),
    "negative_source": (dict(sources=[-1], shifts=[0, 0]), "sources[0] = -1"),
    "odd_shifts": (dict(sources=[0, 1], shifts=[0, 0, 1]), "'shifts' has 3 values"),
    "short_shifts": (dict(sources=[0, 1], shifts=[0, 0]), "'shifts' has 2 values"),
    "scales_length": (dict(sources=[0, 1], shifts=[0, 0, 1, 1], scales=[1.0]), "'scales' has 1 values"),
    "biases_length": (dict(sources=[0], shifts=[0, 0], biases=[1.0, 2.0]), "'biases' has 2 values"),
    "missing_sources": (dict(shifts=[0, 0]), "'sources'"),
}


@pytest.mark.parametrize("case", sorted(BAD_ATTRS))
def test_bad_attributes_give_ghostshift_errors(case):
    attrs, fragment = BAD_ATTRS[case]
    x = np.zeros((1, 2, 4, 4), np.float32)
    # Declared input shape is known (C_i = 2), so errors may come at session creation or at run.
    msg = expect_ghostshift_error(lambda: session(make_model(attrs, in_shape=(1, 2, 4, 4))).run(None, {"X": x}))
    assert fragment in msg, msg


def test_source_out_of_range_with_unknown_channels_fails_at_run():
    attrs = dict(sources=[0, 3], shifts=[0, 0, 1, 1])
    sess = session(make_model(attrs))  # C unknown until run time
    sess.run(None, {"X": np.zeros((1, 4, 3, 3), np.float32)})  # fine with 4 channels
    msg = expect_ghostshift_error(lambda: sess.run(None, {"X": np.zeros((1, 2, 3, 3), np.float32)}))
    assert "sources[1] = 3" in msg and "[0, 2)" in msg, msg


def test_wrong_rank():
    attrs = dict(sources=[0], shifts=[0, 0])
    # Declared rank 3: rejected by shape inference at session creation or by the kernel at run.
    msg = expect_ghostshift_error(
        lambda: session(make_model(attrs, in_shape=(1, 2, 4))).run(None, {"X": np.zeros((1, 2, 4), np.float32)})
    )
    assert "rank 4" in msg, msg
    # Undeclared rank: only the kernel can tell.
    sess = session(make_model(attrs, in_shape=None))
    msg = expect_ghostshift_error(lambda: sess.run(None, {"X": np.zeros((2, 4), np.float32)}))
    assert "rank 4" in msg, msg


def test_wrong_type_is_a_clean_error():
    attrs = dict(sources=[0], shifts=[0, 0])
    with pytest.raises(Exception) as info:
        session(make_model(attrs, np.int32)).run(None, {"X": np.zeros((1, 1, 2, 2), np.int32)})
    # No kernel is registered for int32: the runtime rejects the model (type constraint).
    assert "GhostShift" in str(info.value) or "Type" in str(info.value) or "type" in str(info.value), str(info.value)


def test_exported_symbols():
    """Only RegisterCustomOps is exported as a (non-versioned) text symbol."""
    out = subprocess.run(["nm", "-D", "--defined-only", str(PLUGIN)], capture_output=True, text=True, check=True).stdout
    text = [line.split()[-1] for line in out.splitlines() if len(line.split()) == 3 and line.split()[1] in "TtWi"]
    text = [name for name in text if "@" not in name]
    assert text == ["RegisterCustomOps"], out
