"""`ghostsr convert --int8` against ONNX Runtime's own static quantizer on the same float model.

The issue's contract: ghostsr's QDQ model must be at least as good and as fast as what
`onnxruntime.quantization.quantize_static` (QDQ, per-channel int8 weights, MinMax) makes of the
same float model. Quality: fidelity to the float model's output on Set5 crops (PSNR, peak 1).
Speed, without timing in a test: after ONNX Runtime's graph optimisation both must run every Conv
as a QLinearConv and leave no more QuantizeLinear/DequantizeLinear nodes than ORT's own model.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from conftest import CROPS, CROP_H, CROP_W, IMAGES_DIR, REPO, SHARED, ghostsr

FIXTURE = REPO / "fixtures" / "edsr_baseline_b4c32_x2.onnx"
BSD68 = SHARED / "images" / "BSD68"
CALIB = ["--calib", BSD68, "--calib-count", "8", "--calib-size", "48"]


def lr_crops(n: int = 8, size: int = 48) -> list[np.ndarray]:
    """Calibration inputs for ORT's quantizer: bicubic x1/2 BSD68 images, centre crops."""
    out = []
    for p in sorted(BSD68.glob("*.png"))[:: max(1, len(list(BSD68.glob("*.png"))) // n)][:n]:
        im = Image.open(p).convert("RGB")
        im = im.resize((im.width // 2, im.height // 2), Image.BICUBIC)
        a = np.asarray(im, dtype=np.float32) / 255
        y, x = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
        out.append(a[y : y + size, x : x + size].transpose(2, 0, 1)[None].copy())
    return out


class Reader(CalibrationDataReader):
    def __init__(self, name: str):
        self.it = iter([{name: c} for c in lr_crops()])

    def get_next(self):
        return next(self.it, None)


def ort_int8(src: Path, dst: Path) -> Path:
    name = onnx.load(str(src)).graph.input[0].name
    quantize_static(str(src), str(dst), Reader(name), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return dst


def crop_inputs() -> list[np.ndarray]:
    xs = []
    for name, top, left in CROPS:
        a = np.asarray(Image.open(IMAGES_DIR / name).convert("RGB"), dtype=np.float32) / 255
        xs.append(a[top : top + CROP_H, left : left + CROP_W].transpose(2, 0, 1)[None].copy())
    return xs


def outputs(path: Path) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [s.run(None, {s.get_inputs()[0].name: x})[0] for x in crop_inputs()]


def fidelity(model: Path, reference: list[np.ndarray]) -> float:
    """PSNR (peak 1) of `model`'s outputs against the float model's, over the test crops."""
    mse = np.mean([np.mean((a - b) ** 2) for a, b in zip(outputs(model), reference)])
    return float(10 * np.log10(1.0 / mse))


def optimized_ops(path: Path, tmp: Path) -> collections.Counter:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.optimized_model_filepath = str(tmp / (path.stem + ".opt.onnx"))
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def compare(float_model: Path, tmp: Path) -> None:
    ours = tmp / (float_model.stem + ".ghostsr_int8.onnx")
    ghostsr("convert", float_model, "-o", ours, *CALIB, "--int8", "--ratio", "0", "--force")
    theirs = ort_int8(float_model, tmp / (float_model.stem + ".ort_int8.onnx"))
    for p in (ours, theirs):
        onnx.checker.check_model(str(p), full_check=True)
    reference = outputs(float_model)
    f_ours, f_theirs = fidelity(ours, reference), fidelity(theirs, reference)
    assert f_ours >= f_theirs - 0.1, f"ghostsr int8 {f_ours:.2f} dB vs ORT's quantizer {f_theirs:.2f} dB"
    convs = sum(n.op_type == "Conv" for n in onnx.load(str(float_model)).graph.node)
    o, t = optimized_ops(ours, tmp), optimized_ops(theirs, tmp)
    assert o["QLinearConv"] == convs and o["Conv"] == 0 and o["FusedConv"] == 0, o
    assert t["QLinearConv"] == convs, t
    qdq = lambda c: c["QuantizeLinear"] + c["DequantizeLinear"]  # noqa: E731
    assert qdq(o) <= qdq(t), f"ghostsr leaves {qdq(o)} Q/DQ nodes, ORT's quantizer {qdq(t)}"


def test_int8_original_matches_or_beats_ort_minmax(tmp_path):
    compare(FIXTURE, tmp_path)


def test_int8_ghost_matches_or_beats_ort_on_the_same_float_ghost(tmp_path):
    ghost = tmp_path / "ghost_float.onnx"
    ghostsr("convert", FIXTURE, "-o", ghost, *CALIB, "--target", "cpu", "--ratio", "0.5")
    compare(ghost, tmp_path)


def test_target_cpu_int8_writes_a_runnable_qdq_model(tmp_path):
    out = tmp_path / "q.onnx"
    proc = ghostsr("convert", FIXTURE, "-o", out, *CALIB, "--target", "cpu-int8", "--ratio", "0.5")
    assert "int8:" in proc.stdout
    onnx.checker.check_model(str(out), full_check=True)
    ops = collections.Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"]
    assert all(np.isfinite(y).all() for y in outputs(out))


def test_int8_conv_form_ghost_stage_is_one_affine_copy_conv(tmp_path):
    """`--int8` (Convs-only form) plans unshifted ghosts, whose ghost stage is one 1x1 Conv carrying the
    scales and biases (no one-hot depthwise Conv): ONNX Runtime fuses every Conv into a
    QLinearConv and adds no Transpose to what the quantized original needs, and the output stays
    close to the float ghost model's (as close as ONNX Runtime's quantizer gets)."""
    q, plan, flt = tmp_path / "gq.onnx", tmp_path / "plan.json", tmp_path / "g.onnx"
    ghostsr("convert", FIXTURE, "-o", q, *CALIB, "--int8", "--emit", "conv", "--ratio", "0.5",
            "--save-plan", plan)
    p = json.loads(plan.read_text())
    layers = [layer for layer in p["layers"] if layer["ghosts"]]
    assert p["max_shift"] == 0 and layers, p["max_shift"]
    assert all(g["shift"] == [0, 0] for layer in layers for g in layer["ghosts"])
    onnx.checker.check_model(str(q), full_check=True)
    convs = sum(n.op_type == "Conv" for n in onnx.load(str(FIXTURE)).graph.node)
    nodes = onnx.load(str(q)).graph.node
    ours = [n for n in nodes if n.op_type == "Conv"]
    assert len(ours) == convs + len(layers), "a reduced Conv and one copy Conv per ghosted Conv"
    assert not any(a.name == "group" and a.i > 1 for n in ours for a in n.attribute), "no depthwise Conv"
    o = optimized_ops(q, tmp_path)
    assert o["QLinearConv"] == len(ours) and o["Conv"] == 0 and o["FusedConv"] == 0, o
    original = optimized_ops(ort_int8(FIXTURE, tmp_path / "orig.ort_int8.onnx"), tmp_path)
    assert o["Transpose"] == original["Transpose"], (o, original)
    # As close to the float ghost model as ONNX Runtime's quantizer gets on that model.
    ghostsr("convert", FIXTURE, "-o", flt, "--plan", plan, "--target", "cpu")
    reference = outputs(flt)
    theirs = ort_int8(flt, tmp_path / "g.ort_int8.onnx")
    f_ours, f_theirs = fidelity(q, reference), fidelity(theirs, reference)
    assert f_ours >= f_theirs - 0.1, f"ghostsr int8 {f_ours:.2f} dB vs ORT's quantizer {f_theirs:.2f} dB"


def test_int8_ghosts_only_convs_whose_reduced_conv_keeps_16_filters(tmp_path):
    # The fixture's Convs have 32 filters: at λ=0.75 a reduced Conv would keep 8.
    out = tmp_path / "q.onnx"
    proc = ghostsr("convert", FIXTURE, "-o", out, *CALIB, "--target", "cpu-int8", "--ratio", "0.75", ok=False)
    assert proc.returncode == 1 and "--min-channels" in proc.stderr, proc.stderr
    assert not out.exists()
    proc = ghostsr("convert", FIXTURE, "-o", out, *CALIB, "--target", "cpu-int8", "--ratio", "0.75",
                   "--min-channels", "32")
    assert "Convs ghosted:  8 of 12" in proc.stdout, proc.stdout


def test_ort_int8_script_writes_ort_quantized_model_and_keeps_existing_files(tmp_path):
    """scripts/ort_int8.py, the baseline BENCHMARKS.md times ghost int8 models against."""
    out = tmp_path / "ort.onnx"
    script = REPO / "scripts" / "ort_int8.py"
    cmd = [sys.executable, str(script), str(FIXTURE), str(out), "--images", str(BSD68)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    onnx.checker.check_model(str(out), full_check=True)
    ops = optimized_ops(out, tmp_path)
    assert ops["QLinearConv"] == sum(n.op_type == "Conv" for n in onnx.load(str(FIXTURE)).graph.node), ops
    before = out.read_bytes()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "exists" in again.stderr and out.read_bytes() == before


@pytest.mark.parametrize("args,words", [
    (["--int8", "--kmeans"], ["--calib"]),
    (["--target", "cpu-int8", "--kmeans"], ["--calib"]),
    (["--int8", "--emit", "fused", *CALIB], ["fused"]),
])
def test_int8_refusals_are_clean(tmp_path, args, words):
    proc = ghostsr("convert", FIXTURE, "-o", tmp_path / "x.onnx", *args, ok=False)
    # 2: refused by the argument parser, 1: by ghostsr; never a panic (101).
    assert proc.returncode in (1, 2) and "panicked" not in proc.stderr, proc.stderr
    assert all(w in proc.stderr for w in words), proc.stderr
    assert not (tmp_path / "x.onnx").exists()
