#!/usr/bin/env python3
"""ghostsr reference trainer: learn a ghost plan's shifts (and scales, biases, weights) in PyTorch.

ghostsr (the Rust tool) rewrites a pretrained SR model from a ghost plan; choosing the plan
without training (k-means, or `--calib`) loses some quality. This trainer takes the ORIGINAL
ONNX model, a plan (and optionally starting weights), builds the ghost network in PyTorch by
interpreting the ONNX graph (ghostnet.py), and trains it on HR patches:

- shifts: per ghost, logits over the (2m+1)^2 candidate shifts (m = the plan's max_shift),
  initialised to favour the plan's shift; Gumbel-softmax with a hard one-hot forward and the
  soft gradient (straight-through), noise and temperature annealed (GhostSR, Nie et al.,
  arXiv 2101.08525);
- per-ghost scale and bias (from the plan, default 1 and 0);
- every float32 initializer of the model (unless frozen), L1 loss, Adam.

It writes the result in ghostsr's interchange formats: a plan (same format, learned shifts,
scales and biases) and a safetensors file of the model's float32 initializers keyed by their
ORIGINAL names, so `ghostsr convert MODEL --plan OUT.json --weights OUT.safetensors` builds the
trained ghost model (its output equals this trainer's ghost network, up to float rounding).

Data: random crops of the HR images in --train; LR = MATLAB-compatible bicubic downscale (the
evaluation protocol of ../shared/models/README.md, so training sees the degradation the
benchmarks use). Model inputs follow ghostsr's convention (src/runner/sr.rs): 3-channel models
take RGB in [0, 1]; 1-channel models take Y/255 (MATLAB Y); a model whose output is as large as
its input (VDSR) takes the bicubic-upscaled image and needs --scale.

Run `python ghostsr_train.py --help` for the flags; trainers/pytorch/README.md for the workflow.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ghostnet import (  # noqa: E402
    WEIGHTS_FORMAT, WEIGHTS_VERSION, GraphNet, ModelError, PlanError, load_plan, read_safetensors,
    write_safetensors,
)

IMAGE_SUFFIXES = (".png", ".bmp", ".jpg", ".jpeg")


class UsageError(ValueError):
    """Bad command-line input (a missing folder, a model that needs --scale, ...)."""


# ----------------------------------------------------------------------------- images
# MATLAB-compatible bicubic resize and colour conversion: the same maths as
# ../shared/reference/sr_eval.py (the reference evaluation protocol).


def _cubic(x):
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    return ((1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
            + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


def _contributions(in_len: int, out_len: int, scale: float):
    kw = 4.0
    if scale < 1:
        def h(x):
            return scale * _cubic(scale * x)
        kw = kw / scale
    else:
        h = _cubic
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - kw / 2)
    p = int(math.ceil(kw)) + 2
    ind = left[:, None] + np.arange(p)[None, :]  # 1-based
    w = h(u[:, None] - ind)
    w = w / w.sum(1, keepdims=True)
    aux = np.concatenate([np.arange(1, in_len + 1), np.arange(in_len, 0, -1)])
    ind = aux[np.mod(ind - 1, 2 * in_len).astype(int)] - 1  # symmetric padding, 0-based
    keep = np.any(w != 0, axis=0)
    return w[:, keep], ind[:, keep]


def imresize(img: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB imresize(img, scale, 'bicubic'), HxWxC uint8 -> uint8 (rounded after each pass)."""
    a = img.astype(np.float64)
    h, w = a.shape[:2]
    oh, ow = int(math.ceil(h * scale)), int(math.ceil(w * scale))
    for dim in (0, 1):  # MATLAB resizes rows first
        n_in, n_out = (h, oh) if dim == 0 else (a.shape[1], ow)
        wt, ind = _contributions(n_in, n_out, scale)
        if dim == 0:
            a = np.einsum("ok,okwc->owc", wt, a[ind])
        else:
            a = np.einsum("ok,hokc->hoc", wt, a[:, ind])
        a = np.clip(np.floor(a + 0.5), 0, 255)  # MATLAB keeps uint8: rounds half away from zero
    return a.astype(np.uint8)


def ycbcr(a: np.ndarray):
    a = a.astype(np.float64)
    y = 16.0 + (65.481 * a[..., 0] + 128.553 * a[..., 1] + 24.966 * a[..., 2]) / 255.0
    cb = 128.0 + (-37.797 * a[..., 0] - 74.203 * a[..., 1] + 112.0 * a[..., 2]) / 255.0
    cr = 128.0 + (112.0 * a[..., 0] - 93.786 * a[..., 1] - 18.214 * a[..., 2]) / 255.0
    return y, cb, cr


def rgb_from_ycbcr(y, cb, cr) -> np.ndarray:
    m = np.array([[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0],
                  [112.0, -93.786, -18.214]]) / 255.0
    ycc = np.stack([y - 16.0, cb - 128.0, cr - 128.0], -1)
    return np.clip(np.round(ycc @ np.linalg.inv(m).T), 0, 255).astype(np.uint8)


def image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def load_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# ----------------------------------------------------------------------------- model kind


@dataclass
class ModelKind:
    """What the model takes: `channels` 3 (RGB in [0,1]) or 1 (Y/255); `factor` output/input size
    (1: fed the bicubic-upscaled image, like VDSR); `scale` the SR scale of the data."""
    channels: int
    factor: int
    scale: int

    @property
    def pre_upsampled(self) -> bool:
        return self.factor == 1


def probe_kind(net: GraphNet, where: str, scale: int | None) -> ModelKind:
    """The model's kind from its input channels and a 16x16 probe run (as src/runner/sr.rs)."""
    c = net.input_channels
    if c not in (1, 3):
        raise ModelError(f"{where}: expected 1 or 3 input channels, the input has {c}")
    was = net.training
    net.eval()
    with torch.no_grad():
        out = net(torch.full((1, c, 16, 16), 0.5))
    net.train(was)
    if out.dim() != 4 or out.shape[1] != c or out.shape[2] % 16 or out.shape[2] != out.shape[3]:
        raise ModelError(f"{where}: a [1, {c}, 16, 16] input gave {list(out.shape)}: "
                         "not an integer upscaling")
    factor = out.shape[2] // 16
    if factor == 1:
        if scale is None:
            raise UsageError(f"{where} takes an HR-sized (bicubic-upscaled) input: give --scale")
        return ModelKind(c, 1, scale)
    if scale is not None and scale != factor:
        raise UsageError(f"--scale {scale} but {where} upscales by {factor}")
    return ModelKind(c, factor, factor)


def model_arrays(kind: ModelKind, hr: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """(model input CHW float32, target CHW float32, extras for evaluation) for one HR image
    (already cropped to a multiple of the scale)."""
    s = kind.scale
    lr = imresize(hr, 1.0 / s)
    extras = {"lr": lr}
    if kind.channels == 3:
        x = lr.astype(np.float32).transpose(2, 0, 1) / 255.0
        t = hr.astype(np.float32).transpose(2, 0, 1) / 255.0
        if kind.pre_upsampled:
            x = imresize(lr, float(s)).astype(np.float32).transpose(2, 0, 1) / 255.0
        return x, t, extras
    src = imresize(lr, float(s)) if kind.pre_upsampled else lr
    x = (ycbcr(src)[0] / 255.0).astype(np.float32)[None]
    t = (ycbcr(hr)[0] / 255.0).astype(np.float32)[None]
    return x, t, extras


class PatchSampler:
    """Random aligned (input, target) patches from a folder of HR images, with the 8 flips and
    rotations; `patch` is the model-input side in pixels. Deterministic for a given seed."""

    def __init__(self, folder: str | Path, kind: ModelKind, patch: int, seed: int):
        self.kind, self.patch = kind, patch
        self.rng = np.random.default_rng(seed)
        self.pairs = []
        s = kind.scale
        for path in image_files(folder):
            hr = load_rgb(path)
            h, w = hr.shape[:2]
            hr = hr[:h - h % s, :w - w % s]
            if min(hr.shape[:2]) // s < 1:
                continue
            x, t, _ = model_arrays(kind, hr)
            if min(x.shape[1:]) >= patch:  # smaller images cannot give a whole patch
                self.pairs.append((x, t))
        if not self.pairs:
            raise UsageError(f"no image in {folder} is large enough for --patch {patch}")

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        p, f = self.patch, self.kind.factor
        xs, ts = [], []
        for _ in range(n):
            x, t = self.pairs[self.rng.integers(len(self.pairs))]
            i = self.rng.integers(x.shape[1] - p + 1)
            j = self.rng.integers(x.shape[2] - p + 1)
            xp = x[:, i:i + p, j:j + p]
            tp = t[:, i * f:(i + p) * f, j * f:(j + p) * f]
            k = self.rng.integers(8)
            if k & 1:
                xp, tp = xp[:, :, ::-1], tp[:, :, ::-1]
            if k & 2:
                xp, tp = xp[:, ::-1], tp[:, ::-1]
            if k & 4:
                xp, tp = xp.transpose(0, 2, 1), tp.transpose(0, 2, 1)
            xs.append(np.ascontiguousarray(xp))
            ts.append(np.ascontiguousarray(tp))
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ts))


# ----------------------------------------------------------------------------- building


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_net(model_path: str | Path, plan_path: str | Path | None = None,
              weights_path: str | Path | None = None, shift_init: float = 3.0) -> GraphNet:
    """The ghost network of an ORIGINAL model + plan (+ starting weights)."""
    model_path = Path(model_path)
    try:
        model = onnx.load(str(model_path))
    except Exception as e:  # onnx raises DecodeError and friends
        raise ModelError(f"cannot read ONNX model {model_path}: {e}") from None
    plan = load_plan(plan_path) if plan_path is not None else None
    weights = None
    if weights_path is not None:
        try:
            weights = read_safetensors(weights_path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelError(f"weights {weights_path}: {e}") from None
    where = model_path.name
    try:
        return GraphNet(model, plan, where, weights, shift_init)
    except PlanError as e:
        raise PlanError(f"plan {plan_path}: {e}") from None


# ----------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    iters: int = 300
    batch: int = 16
    lr: float = 1e-4
    affine_lr: float = 1e-3
    shift_lr: float = 1e-2
    tau_start: float = 1.0
    tau_end: float = 0.1
    noise_start: float = 0.3
    noise_end: float = 0.0
    freeze: tuple[str, ...] = ()
    freeze_weights: bool = False
    log_every: int = 10
    # Weight of the teacher term: loss = (1 - distill) * L1(out, HR) + distill * L1(out, teacher).
    distill: float = 0.0
    # "constant", or "cosine": every group's learning rate decays to 1 % of its start.
    lr_schedule: str = "constant"


def schedule(start: float, end: float, frac: float, geometric: bool = False) -> float:
    if geometric and start > 0 and end > 0:
        return start * (end / start) ** frac
    return start + (end - start) * frac


def train(net: GraphNet, batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
          cfg: TrainConfig, log: Callable[[str], None] = print,
          teacher: GraphNet | None = None) -> dict:
    """Adam on L1 loss; returns {'losses': [...], 'lrs': [weights' lr per iteration], 'seconds': ...}.

    With `teacher` (the original network) and `cfg.distill` > 0 the loss also pulls the output
    towards the teacher's on the same patch: the ghost network's job is to keep the pretrained
    function, and the teacher's output is a denser, noise-free target than the HR patch of a
    small training set."""
    if cfg.distill and teacher is None:
        raise UsageError("distillation needs the original network as teacher")
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise UsageError(f"unknown learning-rate schedule {cfg.lr_schedule!r} (constant, cosine)")
    unknown = [n for n in cfg.freeze if n not in net.weight_index]
    if unknown:
        raise UsageError(f"--freeze names no float initializer of {net.where}: {unknown}")
    weights = []
    for name, p in net.named_weights().items():
        trainable = not cfg.freeze_weights and name not in cfg.freeze
        p.requires_grad_(trainable)
        if trainable:
            weights.append(p)
    layers = net.ghost_layers()
    groups = [
        {"params": weights, "lr": cfg.lr},
        {"params": [p for g in layers for p in (g.scale, g.bias)], "lr": cfg.affine_lr},
        {"params": [g.logits for g in layers], "lr": cfg.shift_lr},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise UsageError("nothing to train: no ghost layer and every weight frozen")
    opt = torch.optim.Adam(groups)
    base_lrs = [g["lr"] for g in opt.param_groups]
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    plan_shifts = [g.plan_shifts for g in layers]
    net.train()
    losses, lrs, window, t0 = [], [], [], time.time()
    for it in range(cfg.iters):
        frac = it / max(1, cfg.iters - 1)
        for g in layers:
            g.tau = schedule(cfg.tau_start, cfg.tau_end, frac, geometric=True)
            g.noise = schedule(cfg.noise_start, cfg.noise_end, frac)
        if cfg.lr_schedule == "cosine":
            f = 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * frac))
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = base * f
        lrs.append(opt.param_groups[0]["lr"])
        x, t = batches(cfg.batch)
        out = net(x)
        loss = F.l1_loss(out, t) if cfg.distill < 1 else out.new_zeros(())
        if cfg.distill > 0:
            with torch.no_grad():
                target = teacher(x)
            loss = (1 - cfg.distill) * loss + cfg.distill * F.l1_loss(out, target)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"iteration {it + 1}: the loss is {loss.item()} "
                                     "(lower --lr / --affine-lr)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        window.append(loss.item())
        if cfg.log_every and ((it + 1) % cfg.log_every == 0 or it + 1 == cfg.iters):
            changed = sum(a != b for g, ps in zip(layers, plan_shifts)
                          for a, b in zip(g.shifts(), ps))
            total = sum(len(ps) for ps in plan_shifts)
            dt = time.time() - t0
            log(f"iter {it + 1}/{cfg.iters}  L1 {np.mean(window):.5f}  "
                f"shifts changed {changed}/{total}  {dt / (it + 1):.2f} s/iter")
            window = []
    net.eval()
    return {"losses": losses, "lrs": lrs, "seconds": time.time() - t0}


# ----------------------------------------------------------------------------- evaluation


def psnr_y(sr: np.ndarray, hr: np.ndarray, shave: int) -> float:
    a = ycbcr(sr)[0][shave:-shave, shave:-shave]
    b = ycbcr(hr)[0][shave:-shave, shave:-shave]
    return 10 * math.log10(255.0 ** 2 / np.mean((a - b) ** 2))


@torch.no_grad()
def evaluate(net: GraphNet, kind: ModelKind, folder: str | Path) -> float:
    """Mean PSNR-Y over the images of `folder`, the reference protocol (whole images)."""
    net.eval()
    s, scores = kind.scale, []
    for path in image_files(folder):
        hr = load_rgb(path)
        h, w = hr.shape[:2]
        hr = hr[:h - h % s, :w - w % s]
        x, _, extras = model_arrays(kind, hr)
        out = net(torch.from_numpy(x)[None])[0].numpy()
        if kind.channels == 3:
            sr = np.clip(np.round(out.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)
        else:
            _, cb, cr = ycbcr(imresize(extras["lr"], float(s)))
            sr = rgb_from_ycbcr(np.clip(out[0] * 255.0, 0, 255), cb, cr)
        scores.append(psnr_y(sr, hr, s))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------- export


def export(net: GraphNet, model_path: str | Path, plan_out: str | Path | None,
           weights_out: str | Path | None) -> None:
    sha = (net.plan or {}).get("model_sha256") or sha256_file(model_path)
    if plan_out is not None:
        plan = net.export_plan()
        plan["model_sha256"] = sha
        Path(plan_out).write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")
    if weights_out is not None:
        write_safetensors(weights_out, net.export_weights(),
                          {"format": WEIGHTS_FORMAT, "version": WEIGHTS_VERSION,
                           "model_sha256": sha})


# ----------------------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="ghostsr_train.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a ghostsr ghost plan (shifts, scales, biases) and the model's "
                    "weights in PyTorch, and export them for `ghostsr convert --plan --weights`.",
        epilog="""workflow:
  ghostsr plan MODEL.onnx -o plan.json --ratio 0.5 --calib BSD68/ --export-weights w.safetensors
  python ghostsr_train.py MODEL.onnx --plan plan.json --weights w.safetensors --train BSD68/ \\
      --iters 300 --out-plan tuned.json --out-weights tuned.safetensors --eval Set5/
  ghostsr convert MODEL.onnx --plan tuned.json --weights tuned.safetensors -o MODEL.ghost.onnx
  ghostsr eval MODEL.ghost.onnx --images Set5/ --scale 2

The model is the ORIGINAL ONNX model (not a ghost model). 3-channel models take RGB in [0,1],
1-channel models Y/255; models that take an HR-sized input (VDSR) need --scale.""")
    ap.add_argument("model", help="the ORIGINAL ONNX model")
    ap.add_argument("--plan", required=True, help="ghost plan JSON (ghostsr plan / convert --save-plan)")
    ap.add_argument("--weights", help="starting weights (safetensors keyed by initializer names, "
                                      "e.g. from `ghostsr plan --calib ... --export-weights`)")
    ap.add_argument("--train", metavar="DIR", help="folder of HR training images (e.g. BSD68)")
    ap.add_argument("--eval", metavar="DIR", help="print PSNR-Y (reference protocol) of the ghost "
                                                 "network on these HR images, before and after training")
    ap.add_argument("--scale", type=int, help="SR scale for the data; needed only for models "
                                              "fed a bicubic-upscaled input (VDSR)")
    ap.add_argument("--out-plan", metavar="JSON", help="write the learned plan here")
    ap.add_argument("--out-weights", metavar="SAFETENSORS",
                    help="write every float32 initializer here (original names and shapes, F32)")
    ap.add_argument("--iters", type=int, default=300, help="training iterations (default 300)")
    ap.add_argument("--batch", type=int, default=16, help="patches per iteration (default 16)")
    ap.add_argument("--patch", type=int, default=48,
                    help="patch side in MODEL-INPUT pixels (LR pixels for upscaling models; "
                         "default 48)")
    ap.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate of the weights (1e-4)")
    ap.add_argument("--affine-lr", type=float, default=1e-3,
                    help="Adam learning rate of the ghosts' scales and biases (1e-3)")
    ap.add_argument("--shift-lr", type=float, default=1e-2,
                    help="Adam learning rate of the shift logits (1e-2; 0 keeps the plan's shifts)")
    ap.add_argument("--shift-init", type=float, default=3.0,
                    help="initial logit of the plan's shift (others 0): how strongly training "
                         "starts from the plan's shifts (default 3)")
    ap.add_argument("--tau", type=float, nargs=2, default=[1.0, 0.1], metavar=("START", "END"),
                    help="Gumbel-softmax temperature, annealed geometrically (default 1 0.1)")
    ap.add_argument("--noise", type=float, nargs=2, default=[0.3, 0.0], metavar=("START", "END"),
                    help="Gumbel noise scale, annealed linearly (default 0.3 0)")
    ap.add_argument("--freeze", action="append", default=[], metavar="NAME",
                    help="keep this initializer fixed (repeatable), e.g. a mean-shift constant")
    ap.add_argument("--freeze-weights", action="store_true",
                    help="train only the ghosts (shifts, scales, biases), no initializer")
    ap.add_argument("--distill", type=float, default=0.0, metavar="W",
                    help="weight in [0, 1] of an L1 term towards the ORIGINAL model's output on "
                         "the same patch (knowledge distillation; 1: teacher only; default 0)")
    ap.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                    help="learning rates constant, or cosine-decayed to 1%% over --iters")
    ap.add_argument("--seed", type=int, default=0, help="seed: same seed, same result (default 0)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--log-every", type=int, default=10, help="print progress every N iterations")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except (UsageError, ModelError, PlanError, FloatingPointError, OSError) as e:
        print(f"ghostsr_train: error: {e}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if not 0.0 <= args.distill <= 1.0:
        raise UsageError(f"--distill {args.distill} is outside [0, 1]")
    for flag in ("iters", "batch", "patch"):
        if getattr(args, flag) < (0 if flag == "iters" else 1):
            raise UsageError(f"--{flag} {getattr(args, flag)} is out of range")
    if args.iters > 0 and not args.train:
        raise UsageError("training needs --train DIR (or --iters 0 to only export/evaluate)")
    net = build_net(args.model, args.plan, args.weights, args.shift_init)
    where = Path(args.model).name
    kind = probe_kind(net, where, args.scale)
    ghosts = sum(len(g.ghost_channels) for g in net.ghost_layers())
    print(f"{where}: {len(net.ghost_layers())} ghosted Convs, {ghosts} ghost channels, "
          f"{len(net.weight_names)} float initializers; input {'RGB' if kind.channels == 3 else 'Y'}, "
          f"x{kind.scale}", flush=True)
    if args.eval:
        print(f"PSNR-Y {Path(args.eval).name} before: {evaluate(net, kind, args.eval):.3f} dB",
              flush=True)
    if args.iters > 0:
        sampler = PatchSampler(args.train, kind, args.patch, args.seed)
        cfg = TrainConfig(iters=args.iters, batch=args.batch, lr=args.lr, affine_lr=args.affine_lr,
                          shift_lr=args.shift_lr, tau_start=args.tau[0], tau_end=args.tau[1],
                          noise_start=args.noise[0], noise_end=args.noise[1],
                          freeze=tuple(args.freeze), freeze_weights=args.freeze_weights,
                          log_every=args.log_every, distill=args.distill,
                          lr_schedule=args.lr_schedule)
        teacher = build_net(args.model) if args.distill > 0 else None
        stats = train(net, sampler.batch, cfg, log=lambda s: print(s, flush=True),
                      teacher=teacher)
        print(f"trained {args.iters} iterations in {stats['seconds']:.1f} s", flush=True)
    if args.eval:
        print(f"PSNR-Y {Path(args.eval).name} after: {evaluate(net, kind, args.eval):.3f} dB",
              flush=True)
    export(net, args.model, args.out_plan, args.out_weights)
    for what, path in (("plan", args.out_plan), ("weights", args.out_weights)):
        if path:
            print(f"wrote {what} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
