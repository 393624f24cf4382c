"""Bad input: ghostsr exits 1 with a clear message on stderr, never panics, and leaves no file."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import onnx
import pytest
from onnx import helper

from conftest import IMAGES_DIR, MODELS_DIR, assert_clean_failure, ghostsr

MODEL = MODELS_DIR / "vdsr_y.onnx"  # small, plain chain of Convs, every 3x3 body Conv eligible


def listing(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def sandbox(tmp_path) -> Path:
    """A directory holding a copy of the model."""
    shutil.copy(MODEL, tmp_path / "model.onnx")
    return tmp_path


def fails_cleanly(d: Path, *args, keywords=()) -> str:
    """Run ghostsr in a directory; it must fail cleanly and leave the directory as it was."""
    before = listing(d)
    proc = ghostsr(*args, ok=False)
    err = assert_clean_failure(proc, *keywords)
    assert listing(d) == before, "a failed command created or changed files"
    return err


# ----------------------------------------------------------------------------- bad model files


@pytest.mark.parametrize("command", ["convert", "plan", "inspect"])
def test_truncated_model(sandbox, command):
    bad = sandbox / "truncated.onnx"
    bad.write_bytes(MODEL.read_bytes()[:1000])
    out = ["-o", sandbox / "out.onnx"] if command != "inspect" else []
    fails_cleanly(sandbox, command, bad, *out, keywords=["truncated.onnx", "not a valid onnx"])


@pytest.mark.parametrize("command", ["convert", "plan"])
def test_png_is_not_a_model(sandbox, command):
    png = sandbox / "bird.png"
    shutil.copy(IMAGES_DIR / "bird.png", png)
    fails_cleanly(sandbox, command, png, "-o", sandbox / "out.onnx",
                  keywords=["bird.png", "not a valid onnx"])


def test_empty_file(sandbox):
    empty = sandbox / "empty.onnx"
    empty.write_bytes(b"")
    fails_cleanly(sandbox, "convert", empty, "-o", sandbox / "out.onnx",
                  keywords=["empty.onnx", "empty"])


@pytest.mark.parametrize("command", ["convert", "plan", "inspect"])
def test_missing_input_file(sandbox, command):
    out = ["-o", sandbox / "out.onnx"] if command != "inspect" else []
    fails_cleanly(sandbox, command, sandbox / "missing.onnx", *out,
                  keywords=["missing.onnx", "no such file"])


def test_model_without_conv(sandbox):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu_only",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 3, "h", "w"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path = sandbox / "relu.onnx"
    onnx.save(model, str(path))
    fails_cleanly(sandbox, "convert", path, "-o", sandbox / "out.onnx", "--emit", "standard",
                  keywords=["relu.onnx", "conv"])
    fails_cleanly(sandbox, "plan", path, "-o", sandbox / "out.json", keywords=["relu.onnx", "conv"])
    # inspect still works on it and reports no Conv
    report = json.loads(ghostsr("inspect", path, "--json").stdout)
    assert report["convs"] == [] and report["params"] == 0


# ----------------------------------------------------------------------------- output paths


@pytest.mark.parametrize("force", [False, True])
def test_output_equal_to_input(sandbox, force):
    model = sandbox / "model.onnx"
    extra = ["--force"] if force else []
    fails_cleanly(sandbox, "convert", model, "-o", model, *extra, keywords=["input"])
    # other spellings of the same file
    (sandbox / "sub").mkdir()
    for spelling in [sandbox / "." / "model.onnx", sandbox / "sub" / ".." / "model.onnx",
                     Path(os.path.relpath(model))]:
        fails_cleanly(sandbox, "convert", model, "-o", spelling, *extra, keywords=["input"])
    link = sandbox / "link.onnx"
    link.symlink_to(model)
    fails_cleanly(sandbox, "convert", model, "-o", link, "--force", keywords=["input"])
    fails_cleanly(sandbox, "convert", link, "-o", model, "--force", keywords=["input"])
    assert model.read_bytes() == MODEL.read_bytes()


@pytest.mark.parametrize("command", ["convert", "plan"])
def test_output_exists_without_force(sandbox, command):
    existing = sandbox / "existing.out"
    existing.write_bytes(b"keep me")
    fails_cleanly(sandbox, command, sandbox / "model.onnx", "-o", existing,
                  keywords=["existing.out", "exists", "--force"])
    assert existing.read_bytes() == b"keep me"


def test_save_plan_exists_without_force(sandbox):
    existing = sandbox / "existing.plan.json"
    existing.write_text("{}")
    fails_cleanly(sandbox, "convert", sandbox / "model.onnx", "-o", sandbox / "out.onnx",
                  "--save-plan", existing, keywords=["existing.plan.json", "exists"])
    assert existing.read_text() == "{}"


def test_force_overwrites(sandbox):
    existing = sandbox / "existing.onnx"
    existing.write_bytes(b"old")
    ghostsr("convert", sandbox / "model.onnx", "-o", existing, "--force", "--emit", "standard", "--kmeans")
    onnx.checker.check_model(onnx.load(str(existing)), full_check=True)


# ----------------------------------------------------------------------------- bad plans


@pytest.fixture(scope="module")
def good_plan(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    ghostsr("plan", MODEL, "-o", path, "--ratio", "0.5")
    plan = json.loads(path.read_text())
    assert plan["max_shift"] >= 1 and len(plan["layers"]) >= 2
    return plan


def apply_bad_plan(sandbox: Path, plan: dict, *keywords: str) -> str:
    plan_file = sandbox / "bad.plan.json"
    plan_file.write_text(json.dumps(plan))
    return fails_cleanly(sandbox, "convert", sandbox / "model.onnx", "-o", sandbox / "out.onnx",
                         "--plan", plan_file, "--save-plan", sandbox / "out.plan.json",
                         keywords=keywords)


def test_plan_unknown_tensor(sandbox, good_plan):
    plan = copy.deepcopy(good_plan)
    plan["layers"][1]["conv_output"] = "no/such/tensor_xyz"
    apply_bad_plan(sandbox, plan, "no/such/tensor_xyz", "unknown")


def test_plan_tensor_not_written_by_a_conv(sandbox, good_plan):
    plan = copy.deepcopy(good_plan)
    model = onnx.load(str(MODEL))
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    plan["layers"][0]["conv_output"] = relu.output[0]
    apply_bad_plan(sandbox, plan, relu.output[0])


def test_plan_shift_beyond_max_shift(sandbox, good_plan):
    plan = copy.deepcopy(good_plan)
    ghost = plan["layers"][0]["ghosts"][0]
    ghost["shift"] = [0, -(plan["max_shift"] + 1)]
    apply_bad_plan(sandbox, plan, "shift", "max_shift", f"ghost channel {ghost['channel']}")


def test_plan_source_not_intrinsic(sandbox, good_plan):
    plan = copy.deepcopy(good_plan)
    layer = plan["layers"][0]
    layer["ghosts"][0]["source"] = layer["ghosts"][1]["channel"]
    apply_bad_plan(sandbox, plan, "source", "intrinsic", layer["conv_output"])


def test_plan_channel_repeated(sandbox, good_plan):
    plan = copy.deepcopy(good_plan)
    layer = plan["layers"][0]
    layer["ghosts"][0]["channel"] = layer["intrinsic"][0]
    apply_bad_plan(sandbox, plan, layer["conv_output"], str(layer["intrinsic"][0]))


def test_plan_channel_out_of_range(sandbox, good_plan):
    plan = copy.deepcopy(good_plan)
    layer = plan["layers"][0]
    layer["ghosts"][0]["channel"] = 999
    apply_bad_plan(sandbox, plan, "999", "range")


def test_plan_format_other(sandbox, good_plan):
    plan = copy.deepcopy(good_plan)
    plan["format"] = "other"
    apply_bad_plan(sandbox, plan, "format", "other")


def test_plan_newer_version(sandbox, good_plan):
    plan = copy.deepcopy(good_plan)
    plan["version"] = 2
    apply_bad_plan(sandbox, plan, "version")


def test_plan_not_json(sandbox):
    plan_file = sandbox / "bad.plan.json"
    plan_file.write_text('{"format": "ghostsr-plan", ')
    fails_cleanly(sandbox, "convert", sandbox / "model.onnx", "-o", sandbox / "out.onnx",
                  "--plan", plan_file, keywords=["bad.plan.json", "json"])


def test_plan_file_missing(sandbox):
    fails_cleanly(sandbox, "convert", sandbox / "model.onnx", "-o", sandbox / "out.onnx",
                  "--plan", sandbox / "nowhere.json", keywords=["nowhere.json"])


def test_include_unknown_conv(sandbox):
    fails_cleanly(sandbox, "convert", sandbox / "model.onnx", "-o", sandbox / "out.onnx",
                  "--include", "/no/such/Conv", keywords=["/no/such/Conv"])
