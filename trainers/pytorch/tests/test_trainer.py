"""Tests of the reference trainer (trainers/pytorch), run by scripts/test.sh in .venv-torch.

What they pin down, each against something the trainer does not share code with:
- the ONNX interpreter (ghostnet.GraphNet) equals onnxruntime on the original models;
- a plan's substitution equals `ghostsr convert --emit standard` run in onnxruntime, and a ghost
  layer equals the contract's formula written out in numpy (shift direction, zero fill, affine);
- training exports a plan + weights that `ghostsr convert --plan --weights` accepts and whose
  converted model (standard and plugin form) equals the trainer's network; a fixed seed gives
  identical files; gradients do move a shift; bad plans and unknown ops fail with clear errors.

Paths: the repository is three levels up; test data in <repo>/../shared; the binary is
$GHOSTSR_BIN (default target/release/ghostsr), the plugin $GHOSTSR_PLUGIN (default
target/release/libghostsr.so). Nothing is skipped: a missing binary or data is an error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

HERE = Path(__file__).resolve().parent
TRAINER = HERE.parent
sys.path.insert(0, str(TRAINER))

import ghostsr_train as gt  # noqa: E402
from ghostnet import GhostLayer, GraphNet, ModelError, PlanError, read_safetensors  # noqa: E402

REPO = TRAINER.parent.parent
SHARED = REPO.parent / "shared"
MODELS = SHARED / "models"
BSD68 = SHARED / "images" / "BSD68"
SET5 = SHARED / "images" / "Set5"
FIXTURE = REPO / "fixtures" / "edsr_baseline_b4c32_x2.onnx"
BIN = Path(os.environ.get("GHOSTSR_BIN", REPO / "target" / "release" / "ghostsr"))
PLUGIN = Path(os.environ.get("GHOSTSR_PLUGIN", REPO / "target" / "release" / "libghostsr.so"))
# ghostsr's calibration runs models through ONNX Runtime: use this venv's library (1.31.1).
ORT_LIB = next((Path(ort.__file__).parent / "capi").glob("libonnxruntime.so.1.*"), None)

# One intra-op thread: these tensors are tiny, and on a busy 2-core machine two OpenMP threads
# spend most of their time waiting for each other (measured 10x slower than one thread here).
torch.set_num_threads(1)

ALL_MODELS = [FIXTURE] + sorted(MODELS.glob("*.onnx"))
# ghostsr's default policy leaves FSRCNN's small Convs alone: include two so its plan is not empty.
EXTRA_PLAN_ARGS = {"fsrcnn_y_x2.onnx": ["--include", "/first_part/first_part.0/Conv",
                                         "--include", "/mid_part/mid_part.10/Conv"]}


def setup_module(module):
    for what, path in (("ghostsr binary (GHOSTSR_BIN)", BIN), ("plugin (GHOSTSR_PLUGIN)", PLUGIN),
                       ("fixture", FIXTURE), ("BSD68", BSD68), ("Set5", SET5)):
        if not path.exists():
            raise RuntimeError(f"{what} not found at {path}: build with `cargo build --release`")
    if len(ALL_MODELS) < 5:
        raise RuntimeError(f"expected the shared models in {MODELS}")


def ghostsr(*args, ok: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if ORT_LIB is not None:
        env.setdefault("ORT_DYLIB_PATH", str(ORT_LIB))
    proc = subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)
    if ok and proc.returncode != 0:
        raise AssertionError(f"ghostsr {' '.join(map(str, args))} exited {proc.returncode}:\n"
                             f"{proc.stderr}")
    return proc


def crops(channels: int, n: int = 2, h: int = 20, w: int = 24) -> np.ndarray:
    """Natural-image crops (PAN explodes on uniform noise): RGB in [0,1] or Y/255."""
    out = []
    for k, name in enumerate(["baby.png", "butterfly.png", "bird.png"][:n]):
        a = np.asarray(Image.open(SET5 / name).convert("RGB"))[60 + 20 * k:60 + 20 * k + h,
                                                                 80:80 + w]
        if channels == 3:
            out.append(a.astype(np.float32).transpose(2, 0, 1) / 255.0)
        else:
            out.append((gt.ycbcr(a)[0] / 255.0).astype(np.float32)[None])
    return np.stack(out)


def ort_run(model, x: np.ndarray, plugin: bool = False) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if plugin:
        opts.register_custom_ops_library(str(PLUGIN))
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def torch_run(net: GraphNet, x: np.ndarray) -> np.ndarray:
    net.eval()
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


def assert_close(got: np.ndarray, want: np.ndarray, what: str, atol: float = 1e-4) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    diff = float(np.abs(got.astype(np.float64) - want).max())
    assert diff <= atol, f"{what}: max |diff| {diff:.3e} > {atol}"


# ----------------------------------------------------------------------------- 1. interpreter


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda p: p.name)
def test_interpreter_matches_onnxruntime(model):
    proto = onnx.load(str(model))
    net = GraphNet(proto, None, model.name)
    x = crops(net.input_channels)
    # A model exported with a fixed batch (RDN from Keras: batch 1) gets that many crops.
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value
    x = x[:batch] if batch > 0 else x
    assert_close(torch_run(net, x), ort_run(model, x), f"{model.name} (no plan)")


# ----------------------------------------------------------------------------- 2. plan semantics

PLAN_MODELS = [FIXTURE] + [MODELS / n for n in ("imdn_x2.onnx", "carn_m_x2.onnx", "pan_x2.onnx",
                                                "vdsr_y.onnx", "fsrcnn_y_x2.onnx")]


@pytest.mark.parametrize("model", PLAN_MODELS, ids=lambda p: p.name)
def test_plan_matches_ghostsr_standard_form(model, tmp_path):
    plan = tmp_path / "plan.json"
    ghostsr("plan", model, "-o", plan, "--ratio", "0.5", *EXTRA_PLAN_ARGS.get(model.name, []))
    layers = json.loads(plan.read_text())["layers"]
    assert sum(len(entry["ghosts"]) for entry in layers) > 0, "the plan has no ghost"
    out = tmp_path / "ghost.onnx"
    ghostsr("convert", model, "--plan", plan, "--emit", "standard", "-o", out)
    net = gt.build_net(model, plan)
    x = crops(net.input_channels)
    assert_close(torch_run(net, x), ort_run(out, x), f"{model.name} ratio 0.5")


def test_calibrated_plan_with_affine_and_weights_matches_ghostsr(tmp_path):
    """Calibration writes scales, biases and refit weights: all three must mean the same here."""
    plan, weights, out = tmp_path / "cal.json", tmp_path / "cal.safetensors", tmp_path / "g.onnx"
    ghostsr("plan", FIXTURE, "-o", plan, "--ratio", "0.5", "--calib", BSD68, "--calib-count", "4",
            "--calib-size", "32", "--export-weights", weights)
    ghosts = [g for entry in json.loads(plan.read_text())["layers"] for g in entry["ghosts"]]
    assert any(g.get("scale", 1.0) != 1.0 or g.get("bias", 0.0) != 0.0 for g in ghosts)
    ghostsr("convert", FIXTURE, "--plan", plan, "--weights", weights, "--emit", "standard", "-o", out)
    net = gt.build_net(FIXTURE, plan, weights)
    x = crops(3)
    assert_close(torch_run(net, x), ort_run(out, x), "calibrated fixture")


def test_ghost_layer_follows_the_contract_formula():
    """S[g,h,w] = X[source, h-dy, w-dx] (zero outside), Y = scale*S + bias, for every shift."""
    m = 2
    side = 2 * m + 1
    shifts = [(dy, dx) for dy in range(-m, m + 1) for dx in range(-m, m + 1)]
    c_out = 1 + len(shifts)
    rng = np.random.default_rng(3)
    scales, biases = rng.normal(size=len(shifts)), rng.normal(size=len(shifts))
    entry = {"conv_output": "t", "out_channels": c_out, "intrinsic": [0],
             "ghosts": [{"channel": k + 1, "source": 0, "shift": list(s), "scale": float(scales[k]),
                         "bias": float(biases[k])} for k, s in enumerate(shifts)]}
    layer = GhostLayer(entry, m).eval()
    assert layer.logits.shape == (len(shifts), side * side)
    x = rng.normal(size=(1, 1, 6, 7)).astype(np.float32)
    with torch.no_grad():
        y = layer(torch.from_numpy(x)).numpy()
    want = np.zeros((1, c_out, 6, 7), np.float64)
    want[0, 0] = x[0, 0]
    for k, (dy, dx) in enumerate(shifts):
        for h in range(6):
            for w in range(7):
                inside = 0 <= h - dy < 6 and 0 <= w - dx < 7
                s = x[0, 0, h - dy, w - dx] if inside else 0.0
                want[0, k + 1, h, w] = np.float32(scales[k]) * s + np.float32(biases[k])
    assert_close(y, want, "GhostLayer vs contract", atol=1e-5)
    assert layer.shifts() == shifts


# ----------------------------------------------------------------------------- 3. training


@pytest.fixture(scope="module")
def fixture_plan(tmp_path_factory) -> Path:
    plan = tmp_path_factory.mktemp("plan") / "plan.json"
    ghostsr("plan", FIXTURE, "-o", plan, "--ratio", "0.5")
    return plan


def _train_args(plan: Path, out: Path, *extra: str) -> list[str]:
    return [str(FIXTURE), "--plan", str(plan), "--train", str(BSD68), "--iters", "4",
            "--batch", "2", "--patch", "12", "--seed", "7", "--threads", "1", "--log-every", "0",
            "--out-plan", str(out / "tuned.json"), "--out-weights", str(out / "tuned.safetensors"),
            *extra]


def test_smoke_training_exports_what_ghostsr_converts(fixture_plan, tmp_path):
    torch.manual_seed(7)
    net = gt.build_net(FIXTURE, fixture_plan)
    before = {k: v.detach().clone() for k, v in net.named_weights().items()}
    kind = gt.probe_kind(net, FIXTURE.name, None)
    assert (kind.channels, kind.factor, kind.scale) == (3, 2, 2)
    sampler = gt.PatchSampler(BSD68, kind, patch=12, seed=7)
    x0, t0 = sampler.batch(2)
    assert tuple(x0.shape) == (2, 3, 12, 12) and tuple(t0.shape) == (2, 3, 24, 24)
    # noise high enough that the hard forward tries other shifts: exercises that path too
    cfg = gt.TrainConfig(iters=4, batch=2, noise_start=2.0, log_every=0)
    stats = gt.train(net, sampler.batch, cfg)
    assert len(stats["losses"]) == 4 and all(np.isfinite(stats["losses"]))
    changed = [k for k, v in net.named_weights().items() if not torch.equal(v.detach(), before[k])]
    assert changed, "no weight changed"

    plan_out, weights_out = tmp_path / "tuned.json", tmp_path / "tuned.safetensors"
    gt.export(net, FIXTURE, plan_out, weights_out)
    tuned = json.loads(plan_out.read_text())
    original = json.loads(fixture_plan.read_text())
    for key in ("format", "version", "model_sha256", "max_shift"):
        assert tuned[key] == original[key], key
    assert [e["conv_output"] for e in tuned["layers"]] == [e["conv_output"] for e in original["layers"]]
    saved = read_safetensors(weights_out)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(FIXTURE)).graph.initializer}
    assert set(saved) == set(inits)
    assert all(saved[k].shape == inits[k].shape for k in saved)
    assert any(not np.array_equal(saved[k], inits[k]) for k in saved)

    # ghostsr validates the plan and the weights and rewrites; both forms equal the trainer
    x = crops(3)
    want = torch_run(net, x)
    for emit in ("standard", "plugin"):
        out = tmp_path / f"ghost.{emit}.onnx"
        ghostsr("convert", FIXTURE, "--plan", plan_out, "--weights", weights_out, "--emit", emit,
                "-o", out)
        assert_close(ort_run(out, x, plugin=emit == "plugin"), want, f"converted ({emit})")
    # and the exported files read back into the same network
    assert_close(torch_run(gt.build_net(FIXTURE, plan_out, weights_out), x), want, "re-read")


def test_cli_is_deterministic_for_a_seed(fixture_plan, tmp_path, capsys):
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        out.mkdir()
        assert gt.main(_train_args(fixture_plan, out)) == 0
        outs.append(((out / "tuned.json").read_bytes(), (out / "tuned.safetensors").read_bytes()))
    assert outs[0] == outs[1], "same seed, different results"
    out = tmp_path / "c"
    out.mkdir()
    assert gt.main(_train_args(fixture_plan, out, "--seed", "8")) == 0
    assert (out / "tuned.safetensors").read_bytes() != outs[0][1], "the seed changes nothing"


def _shift_model() -> onnx.ModelProto:
    """x [N,1,H,W] -> Conv 1x1 (1 -> 2 channels, both copies of x) -> y."""
    w = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[1, 1])
    graph = helper.make_graph(
        [node], "shift", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, "h", "w"])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_gradients_move_a_shift():
    """The target's channel 1 is x moved by (1, -1); the plan starts at (0, 0)."""
    torch.manual_seed(0)
    plan = {"format": "ghostsr-plan", "version": 1, "max_shift": 1, "layers": [
        {"conv_output": "y", "out_channels": 2, "intrinsic": [0],
         "ghosts": [{"channel": 1, "source": 0, "shift": [0, 0]}]}]}
    net = GraphNet(_shift_model(), plan, "synthetic")
    layer = net.ghost_layers()[0]
    assert layer.shifts() == [(0, 0)]
    gen = torch.Generator().manual_seed(0)

    def batches(n):
        x = torch.rand(n, 1, 16, 16, generator=gen)
        moved = torch.zeros_like(x)
        moved[:, :, 1:, :-1] = x[:, :, :-1, 1:]  # content +1 row, -1 column, zero fill
        return x, torch.cat([x, moved], 1)

    cfg = gt.TrainConfig(iters=60, batch=4, shift_lr=0.1, noise_start=0.0, freeze_weights=True,
                         log_every=0)
    gt.train(net, batches, cfg)
    assert layer.shifts() == [(1, -1)]
    assert net.export_plan()["layers"][0]["ghosts"][0]["shift"] == [1, -1]
    x, t = batches(2)
    with torch.no_grad():
        assert float((net(x) - t).abs().max()) < 0.05, "scale/bias did not settle near 1/0"


def test_distillation_follows_the_teacher_and_cosine_decays_the_rates():
    """The HR targets are all zero; the teacher (the original network) outputs [x, x]. The
    student starts from halved weights: with --distill 1 it must move to the teacher, with 0 to
    the zeros. The cosine schedule starts at the given rate and ends at 1 % of it."""
    model = _shift_model()
    plan = {"format": "ghostsr-plan", "version": 1, "max_shift": 1, "layers": [
        {"conv_output": "y", "out_channels": 2, "intrinsic": [0],
         "ghosts": [{"channel": 1, "source": 0, "shift": [0, 0]}]}]}
    teacher = GraphNet(model, None, "synthetic")
    gen = torch.Generator().manual_seed(0)

    def batches(n):
        x = torch.rand(n, 1, 8, 8, generator=gen)
        return x, torch.zeros(n, 2, 8, 8)

    x, _ = batches(2)
    with torch.no_grad():
        want = teacher(x)
    far = {}
    for distill in (1.0, 0.0):
        torch.manual_seed(0)
        net = GraphNet(model, plan, "synthetic", weights={"w": np.full((2, 1, 1, 1), 0.5, np.float32)})
        cfg = gt.TrainConfig(iters=150, batch=4, lr=0.02, affine_lr=0.02, noise_start=0.0,
                             log_every=0, distill=distill, lr_schedule="cosine")
        stats = gt.train(net, batches, cfg, teacher=teacher)
        with torch.no_grad():
            far[distill] = float((net(x) - want).abs().max())
        lrs = stats["lrs"]
        assert lrs[0] == pytest.approx(0.02) and lrs[-1] == pytest.approx(0.0002)
        assert all(a >= b for a, b in zip(lrs, lrs[1:])), "the cosine schedule is not monotone"
    assert far[1.0] < 0.02, f"distillation did not reach the teacher: {far}"
    assert far[0.0] > 0.2, f"without distillation the HR target (zeros) should win: {far}"
    with pytest.raises(gt.UsageError, match="teacher"):
        gt.train(GraphNet(model, plan, "synthetic"), batches, gt.TrainConfig(iters=1, distill=0.5))


# ----------------------------------------------------------------------------- errors


def _plan_with(tmp_path, fixture_plan, edit) -> Path:
    plan = json.loads(fixture_plan.read_text())
    edit(plan)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(plan))
    return path


@pytest.mark.parametrize("edit, words", [
    (lambda p: p["layers"][1].update(conv_output="/no/such/tensor"),
     ["layers[1]", "/no/such/tensor", "unknown tensor"]),
    (lambda p: p["layers"][0]["ghosts"][0].update(shift=[2, 0]), ["layers[0]", "beyond max_shift"]),
    (lambda p: p["layers"][0]["ghosts"][0].update(source=p["layers"][0]["ghosts"][1]["channel"]),
     ["layers[0]", "not an intrinsic channel"]),
    (lambda p: p["layers"][0]["ghosts"].pop(), ["layers[0]", "neither intrinsic nor a ghost"]),
    (lambda p: p.update(version=2), ["version 2"]),
    (lambda p: p.update(format="other"), ["unknown plan format"]),
], ids=["unknown-conv-output", "shift", "source", "missing-channel", "version", "format"])
def test_bad_plan_is_a_clear_error(edit, words, fixture_plan, tmp_path, capsys):
    bad = _plan_with(tmp_path, fixture_plan, edit)
    with pytest.raises(PlanError) as err:
        gt.build_net(FIXTURE, bad)
    for w in words:
        assert w in str(err.value), f"{w!r} not in: {err.value}"
    assert str(bad) in str(err.value), "the message names the plan file"
    # the CLI: exit 1, one line on stderr, no traceback
    assert gt.main([str(FIXTURE), "--plan", str(bad), "--iters", "0"]) == 1
    stderr = capsys.readouterr().err
    assert "error" in stderr and words[0] in stderr and "Traceback" not in stderr


def test_unknown_operator_names_the_node():
    model = _shift_model()
    model.graph.node.append(helper.make_node("LpNormalization", ["y"], ["z"], name="odd_node"))
    model.graph.output[0].name = "z"
    with pytest.raises(ModelError, match="odd_node.*LpNormalization"):
        GraphNet(model, None, "m.onnx")


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        gt.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--plan", "--weights", "--train", "--iters", "--lr", "--patch", "--batch",
                 "--seed", "--threads", "--out-plan", "--out-weights", "--eval", "--distill",
                 "--lr-schedule"):
        assert flag in text
