"""The ghost network in PyTorch: an ONNX SR model interpreted op by op, with a ghost plan applied.

Why an interpreter instead of re-implementing each architecture: ghostsr works on any ONNX SR
model, and plans name layers by the ORIGINAL model's tensor names (`conv_output`) while weights
travel keyed by the ORIGINAL initializer names. Running the ONNX graph itself keeps both names
meaningful without a per-model mapping, so the trainer works on every model ghostsr can rewrite.

What is here (the CLI and the training loop are in ghostsr_train.py):

- `GraphNet`: a `torch.nn.Module` that evaluates an ONNX graph (opset 11..21 for the operators
  listed in `SUPPORTED_OPS`; a model using anything else is rejected at construction with an
  error naming the node). Every float32 initializer is an `nn.Parameter`, listed in
  `weight_names` under its original name, so fine-tuning and export need no renaming.
- `GhostLayer`: the plan's substitution after one Conv (../shared/design/plan-format.md):
  output channel c is the Conv's channel c when c is intrinsic; a ghost is
  `scale * shift(x[source], dy, dx) + bias`, content moving by +dy rows and +dx columns with zero
  fill before the affine map (../shared/design/ghostshift-op.md). The shift is chosen among the
  (2m+1)^2 candidates (m = max_shift) by learnable logits with the Gumbel-softmax
  straight-through trick of GhostSR (Nie et al., arXiv 2101.08525): the forward always uses one
  candidate exactly (a one-hot 3x3 depthwise kernel, so the result is bit-for-bit a shifted
  copy), the backward sees the softmax's gradient.
- Plan reading/validation (`load_plan`, `validate_plan`) with the contract's rules, and a small
  safetensors reader/writer (the format is 8 bytes + JSON + raw data; see src/weights.rs).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

PLAN_FORMAT = "ghostsr-plan"
PLAN_VERSION = 1
# Largest max_shift ghostsr accepts (src/plan/mod.rs MAX_SHIFT_LIMIT).
MAX_SHIFT_LIMIT = 8
WEIGHTS_FORMAT = "ghostsr-weights"
WEIGHTS_VERSION = "1"


class PlanError(ValueError):
    """A plan that does not follow the format or does not fit the model."""


class ModelError(ValueError):
    """An ONNX model (or node) the interpreter cannot run."""


# ----------------------------------------------------------------------------- safetensors

_ST_DTYPES = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "F16": np.dtype("<f2")}


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file as float32 arrays (F32, F64, F16 and BF16 accepted)."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path}: too short for a safetensors file ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError(f"{path}: header length {n} runs past the end of the file")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: the header is not JSON: {e}") from None
    body = memoryview(data)[8 + n:]
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        raw = bytes(body[begin:end])
        if dtype == "BF16":
            # bfloat16 is the top half of a float32
            arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif dtype in _ST_DTYPES:
            arr = np.frombuffer(raw, dtype=_ST_DTYPES[dtype])
        else:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}; expected F32/F64/F16/BF16")
        count = int(np.prod(shape)) if shape else 1
        if arr.size != count:
            raise ValueError(f"{path}: tensor {name!r}: {arr.size} values for shape {shape}")
        out[name] = arr.astype(np.float32).reshape(shape)
    return out


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Writes F32 tensors (sorted by name) in the safetensors layout src/weights.rs reads."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    blobs, offset = [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name], dtype="<f4")
        raw = arr.tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in blobs:
            f.write(raw)


# ----------------------------------------------------------------------------- plans


def load_plan(path: str | Path) -> dict:
    """Reads a plan file and checks its envelope (format, version, max_shift, layers)."""
    path = Path(path)
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanError(f"plan {path}: cannot read it as JSON: {e}") from None
    check_envelope(plan, str(path))
    return plan


def check_envelope(plan: Any, where: str = "plan") -> None:
    if not isinstance(plan, dict):
        raise PlanError(f"{where}: a plan is a JSON object")
    fmt = plan.get("format")
    if fmt != PLAN_FORMAT:
        raise PlanError(f"{where}: unknown plan format {fmt!r} (expected {PLAN_FORMAT!r})")
    version = plan.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= PLAN_VERSION:
        raise PlanError(f"{where}: plan version {version!r} is not supported "
                        f"(this trainer reads version {PLAN_VERSION})")
    m = plan.get("max_shift")
    if not isinstance(m, int) or isinstance(m, bool) or not 0 <= m <= MAX_SHIFT_LIMIT:
        raise PlanError(f"{where}: max_shift {m!r} is not an integer in 0..={MAX_SHIFT_LIMIT}")
    if not isinstance(plan.get("layers"), list):
        raise PlanError(f"{where}: no \"layers\" list")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_layer(entry: Any, c_out: int, group: int, max_shift: int, at: str) -> None:
    """One layer entry against its Conv (`c_out` filters in `group` groups); the same rules as
    ghostsr's reader (src/plan/mod.rs), so a plan this trainer accepts, ghostsr accepts."""
    if not isinstance(entry, dict):
        raise PlanError(f"{at}: a layer entry is a JSON object")
    if entry.get("out_channels") != c_out:
        raise PlanError(f"{at}: out_channels is {entry.get('out_channels')!r} "
                        f"but the Conv has {c_out} filters")
    intrinsic, ghosts = entry.get("intrinsic"), entry.get("ghosts")
    if not isinstance(intrinsic, list) or not isinstance(ghosts, list):
        raise PlanError(f"{at}: \"intrinsic\" and \"ghosts\" must be lists")
    role = [0] * c_out  # 0 unseen, 1 intrinsic, 2 ghost
    for k, c in enumerate(intrinsic):
        if not _int(c) or not 0 <= c < c_out:
            raise PlanError(f"{at}: intrinsic channel {c!r} is out of range (the Conv has {c_out})")
        if k > 0 and intrinsic[k - 1] >= c:
            raise PlanError(f"{at}: intrinsic channels must be ascending and unique "
                            f"(... {intrinsic[k - 1]}, {c} ...)")
        role[c] = 1
    if not intrinsic:
        raise PlanError(f"{at}: no intrinsic channel: at least one filter must be kept")
    for g in ghosts:
        if not isinstance(g, dict):
            raise PlanError(f"{at}: a ghost is a JSON object, got {g!r}")
        c, src, shift = g.get("channel"), g.get("source"), g.get("shift")
        if not _int(c) or not 0 <= c < c_out:
            raise PlanError(f"{at}: ghost channel {c!r} is out of range (the Conv has {c_out})")
        if role[c] == 1:
            raise PlanError(f"{at}: channel {c} is listed both as intrinsic and as a ghost")
        if role[c] == 2:
            raise PlanError(f"{at}: ghost channel {c} is listed twice")
        role[c] = 2
        if not _int(src) or not 0 <= src < c_out or role[src] != 1:
            raise PlanError(f"{at}: ghost channel {c}: source {src!r} is not an intrinsic channel")
        if not (isinstance(shift, list) and len(shift) == 2 and all(_int(d) for d in shift)):
            raise PlanError(f"{at}: ghost channel {c}: shift {shift!r} is not [dy, dx]")
        if any(abs(d) > max_shift for d in shift):
            raise PlanError(f"{at}: ghost channel {c}: shift {shift} is beyond max_shift {max_shift}")
        for what in ("scale", "bias"):
            v = g.get(what)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)
                                  or not math.isfinite(v)):
                raise PlanError(f"{at}: ghost channel {c}: {what} {v!r} is not a finite number")
    if 0 in role:
        raise PlanError(f"{at}: channel {role.index(0)} is neither intrinsic nor a ghost: "
                        "every channel must appear exactly once")
    if group > 1:
        per = c_out // group
        counts = [sum(1 for c in intrinsic if c // per == k) for k in range(group)]
        if len(set(counts)) > 1:
            raise PlanError(f"{at}: grouped Conv ({group} groups): each group must keep the "
                            f"same number of filters, got {counts}")


# ----------------------------------------------------------------------------- ghost layer


class GhostLayer(nn.Module):
    """The plan's substitution after one Conv, with learnable shifts, scales and biases.

    `forward(xi)` takes the INTRINSIC channels of the Conv's output ([N, |I|, H, W], in the
    plan's ascending `intrinsic` order) and returns all `out_channels` in the original order.
    """

    def __init__(self, entry: dict, max_shift: int, shift_init: float = 3.0):
        super().__init__()
        self.conv_output: str = entry["conv_output"]
        self.node: str = entry.get("node", "")
        self.out_channels: int = entry["out_channels"]
        self.max_shift = max_shift
        intrinsic = list(entry["intrinsic"])
        ghosts = sorted(entry["ghosts"], key=lambda g: g["channel"])
        self.ghost_channels = [g["channel"] for g in ghosts]
        self.ghost_sources = [g["source"] for g in ghosts]
        self.plan_shifts = [tuple(g["shift"]) for g in ghosts]
        pos = {c: k for k, c in enumerate(intrinsic)}
        order = intrinsic + self.ghost_channels
        restore = [0] * len(order)
        for k, c in enumerate(order):
            restore[c] = k
        self.register_buffer("intrinsic", torch.tensor(intrinsic, dtype=torch.long), persistent=False)
        self.register_buffer("src_pos", torch.tensor([pos[s] for s in self.ghost_sources],
                                                     dtype=torch.long), persistent=False)
        self.register_buffer("restore", torch.tensor(restore, dtype=torch.long), persistent=False)
        side = 2 * max_shift + 1
        logits = torch.zeros(len(ghosts), side * side)
        for g, (dy, dx) in enumerate(self.plan_shifts):
            logits[g, self.candidate_index(dy, dx)] = shift_init
        self.logits = nn.Parameter(logits)
        self.scale = nn.Parameter(torch.tensor([float(g.get("scale", 1.0)) for g in ghosts],
                                               dtype=torch.float32))
        self.bias = nn.Parameter(torch.tensor([float(g.get("bias", 0.0)) for g in ghosts],
                                              dtype=torch.float32))
        # Set by the training loop (annealed); unused in eval mode, which takes the argmax.
        self.tau = 1.0
        self.noise = 0.0

    # Candidate k is kernel position (i, j) = (m - dy, m - dx) of a (2m+1)^2 cross-correlation
    # kernel: out[h, w] = x[h + i - m, w + j - m] = x[h - dy, w - dx], i.e. content moves +dy, +dx.
    def candidate_index(self, dy: int, dx: int) -> int:
        m = self.max_shift
        return (m - dy) * (2 * m + 1) + (m - dx)

    def candidate_shift(self, k: int) -> tuple[int, int]:
        m = self.max_shift
        return m - k // (2 * m + 1), m - k % (2 * m + 1)

    def shifts(self) -> list[tuple[int, int]]:
        """The current (argmax) shift of every ghost, in ghost-channel order."""
        return [self.candidate_shift(int(k)) for k in self.logits.detach().argmax(1)]

    def selection(self) -> torch.Tensor:
        """[G, K] weights over the candidates: exactly one-hot in value; in training mode the
        gradient is the Gumbel-softmax's (straight-through estimator)."""
        k = self.logits.shape[1]
        if not self.training:
            return F.one_hot(self.logits.detach().argmax(1), k).to(self.logits.dtype)
        y = self.logits
        if self.noise > 0:
            u = torch.rand_like(y).clamp_(1e-10, 1.0 - 1e-7)
            y = y + self.noise * -torch.log(-torch.log(u))
        soft = torch.softmax(y / self.tau, dim=1)
        hard = F.one_hot(y.detach().argmax(1), k).to(soft.dtype)
        # soft - soft.detach() is exactly 0 in value, so the forward is exactly one-hot
        return hard + (soft - soft.detach())

    def forward(self, xi: torch.Tensor) -> torch.Tensor:
        g = len(self.ghost_channels)
        if g == 0:
            return xi.index_select(1, self.restore)
        m = self.max_shift
        side = 2 * m + 1
        kernel = self.selection().to(xi.dtype).view(g, 1, side, side)
        src = xi.index_select(1, self.src_pos)
        # zero padding = the contract's zero fill; the affine map comes after it
        y = F.conv2d(src, kernel, padding=m, groups=g)
        y = y * self.scale.view(1, g, 1, 1) + self.bias.view(1, g, 1, 1)
        return torch.cat([xi, y], 1).index_select(1, self.restore)

    def export_entry(self, entry: dict) -> dict:
        """The plan entry with the learned shifts, scales and biases (other keys kept)."""
        out = dict(entry)
        shifts = self.shifts()
        scales = self.scale.detach().cpu().numpy().astype(np.float32)
        biases = self.bias.detach().cpu().numpy().astype(np.float32)
        out["ghosts"] = [
            {"channel": c, "source": s, "shift": [int(dy), int(dx)],
             # float32 values written as their exact double, so ghostsr reads the same float32
             "scale": float(scales[k]), "bias": float(biases[k])}
            for k, (c, s, (dy, dx)) in enumerate(zip(self.ghost_channels, self.ghost_sources, shifts))
        ]
        return out


# ----------------------------------------------------------------------------- operators

_ONNX_TO_TORCH = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16, onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool,
}


class Node:
    """A node with its attributes decoded (strings as str), plus its opset, for the ops."""

    def __init__(self, proto: onnx.NodeProto, opset: int):
        self.proto = proto
        self.op = proto.op_type
        self.name = proto.name or (proto.output[0] if proto.output else "?")
        self.opset = opset
        self.attrs: dict[str, Any] = {}
        for a in proto.attribute:
            v = onnx.helper.get_attribute_value(a)
            if isinstance(v, bytes):
                v = v.decode("utf-8")
            elif isinstance(v, list) and v and isinstance(v[0], bytes):
                v = [s.decode("utf-8") for s in v]
            self.attrs[a.name] = v

    def error(self, msg: str) -> ModelError:
        return ModelError(f"node {self.name!r} ({self.op}): {msg}")

    def get(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _conv_padding(n: Node, x: torch.Tensor, k: tuple[int, int], strides, dilations):
    """(pad_left, pad_right, pad_top, pad_bottom) for a 2-D Conv, auto_pad included."""
    auto = n.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        p = n.get("pads", [0, 0, 0, 0])
        return p[1], p[3], p[0], p[2]
    if auto == "VALID":
        return 0, 0, 0, 0
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise n.error(f"auto_pad {auto!r} is not supported")
    pads = []
    for axis in (0, 1):
        size = x.shape[2 + axis]
        out = -(-size // strides[axis])
        total = max(0, (out - 1) * strides[axis] + (k[axis] - 1) * dilations[axis] + 1 - size)
        small, big = total // 2, total - total // 2
        pads.append((small, big) if auto == "SAME_UPPER" else (big, small))
    return pads[1][0], pads[1][1], pads[0][0], pads[0][1]


def conv2d(n: Node, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if w.dim() != 4:
        raise n.error(f"only 2-D Convs are supported (weight shape {list(w.shape)})")
    strides = n.get("strides", [1, 1])
    dilations = n.get("dilations", [1, 1])
    left, right, top, bottom = _conv_padding(n, x, tuple(w.shape[2:]), strides, dilations)
    if left == right and top == bottom:
        padding = (top, left)
    else:
        x = F.pad(x, (left, right, top, bottom))
        padding = (0, 0)
    return F.conv2d(x, w, b, stride=strides, padding=padding, dilation=dilations,
                    groups=n.get("group", 1))


def _conv_transpose(n: Node, x, w, b=None):
    if w.dim() != 4:
        raise n.error(f"only 2-D ConvTranspose is supported (weight shape {list(w.shape)})")
    if n.get("output_shape") is not None or n.get("auto_pad", "NOTSET") not in ("NOTSET", ""):
        raise n.error("output_shape and auto_pad are not supported; use explicit pads")
    p = n.get("pads", [0, 0, 0, 0])
    if p[0] != p[2] or p[1] != p[3]:
        raise n.error(f"asymmetric pads {p} are not supported")
    return F.conv_transpose2d(x, w, b, stride=n.get("strides", [1, 1]), padding=(p[0], p[1]),
                              output_padding=n.get("output_padding", [0, 0]),
                              groups=n.get("group", 1), dilation=n.get("dilations", [1, 1]))


def _binary(fn: Callable) -> Callable:
    return lambda n, a, b: fn(a, b)


def _div(n: Node, a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")  # ONNX integer division truncates
    return a / b


def _pow(n: Node, a, b):
    return torch.pow(a, b).to(a.dtype)  # ONNX Pow's result has the base's type


def _prelu(n: Node, x, slope):
    return torch.where(x < 0, x * slope, x)


def _clip(n: Node, x, lo=None, hi=None):
    if n.opset < 11:
        lo_v, hi_v = n.get("min"), n.get("max")
    else:
        lo_v = None if lo is None else lo.item()
        hi_v = None if hi is None else hi.item()
    return torch.clamp(x, lo_v, hi_v)


def _concat(n: Node, *xs):
    return torch.cat([x for x in xs if x is not None], dim=n.get("axis"))


def _split(n: Node, x, split=None):
    axis = n.get("axis", 0)
    sizes = _ints(split) if split is not None else n.get("split")
    count = len(n.proto.output)
    if sizes is None:
        parts = n.get("num_outputs", count)
        size = x.shape[axis]
        chunk = -(-size // parts)
        sizes = [min(chunk, size - k * chunk) for k in range(parts)]
    return list(torch.split(x, list(sizes), dim=axis))


def _slice(n: Node, x, starts=None, ends=None, axes=None, steps=None):
    if n.opset < 10:
        starts, ends, axes = n.get("starts"), n.get("ends"), n.get("axes")
        steps = None
    else:
        starts, ends, axes, steps = _ints(starts), _ints(ends), _ints(axes), _ints(steps)
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st <= 0:
            raise n.error(f"step {st} is not supported (only positive steps)")
        size = x.shape[a]
        # clamp like ONNX (and numpy): ends may be INT64_MAX
        s = max(0, min(size, s + size if s < 0 else s))
        e = max(0, min(size, e + size if e < 0 else e))
        index[a % x.dim()] = slice(s, e, st)
    return x[tuple(index)]


def _depth_to_space(n: Node, x):
    b = n.get("blocksize")
    mode = n.get("mode", "DCR")
    N, C, H, W = x.shape
    c = C // (b * b)
    if mode == "DCR":
        y = x.reshape(N, b, b, c, H, W).permute(0, 3, 4, 1, 5, 2)
    elif mode == "CRD":
        y = x.reshape(N, c, b, b, H, W).permute(0, 1, 4, 2, 5, 3)
    else:
        raise n.error(f"unknown mode {mode!r}")
    return y.reshape(N, c, H * b, W * b)


def _space_to_depth(n: Node, x):
    b = n.get("blocksize")
    N, C, H, W = x.shape
    y = x.reshape(N, C, H // b, b, W // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(N, C * b * b, H // b, W // b)


def _resize(n: Node, x, roi=None, scales=None, sizes=None):
    if x.dim() != 4:
        raise n.error(f"only 4-D inputs are supported (got rank {x.dim()})")
    mode = n.get("mode", "nearest")
    ctm = n.get("coordinate_transformation_mode", "half_pixel")
    kwargs: dict[str, Any] = {}
    if sizes is not None and sizes.numel() > 0:
        s = _ints(sizes)
        if s[:2] != list(x.shape[:2]):
            raise n.error("resizing the batch or channel axis is not supported")
        kwargs["size"] = s[2:]
    elif scales is not None and scales.numel() > 0:
        s = [float(v) for v in scales.tolist()]
        if s[:2] != [1.0, 1.0]:
            raise n.error("resizing the batch or channel axis is not supported")
        kwargs["scale_factor"] = s[2:]
        kwargs["recompute_scale_factor"] = False
    else:
        raise n.error("neither scales nor sizes given")
    if n.get("antialias", 0):
        raise n.error("antialias is not supported")
    if mode == "nearest":
        nearest = n.get("nearest_mode", "round_prefer_floor")
        if ctm == "asymmetric" and nearest == "floor":
            return F.interpolate(x, mode="nearest", **kwargs)
        if ctm == "half_pixel" and nearest == "round_prefer_ceil":
            return F.interpolate(x, mode="nearest-exact", **kwargs)
        raise n.error(f"nearest with coordinate_transformation_mode {ctm!r} and nearest_mode "
                      f"{nearest!r} is not supported")
    if mode == "linear":
        if ctm in ("half_pixel", "pytorch_half_pixel"):
            return F.interpolate(x, mode="bilinear", align_corners=False, **kwargs)
        if ctm == "align_corners":
            return F.interpolate(x, mode="bilinear", align_corners=True, **kwargs)
        raise n.error(f"linear with coordinate_transformation_mode {ctm!r} is not supported")
    raise n.error(f"mode {mode!r} is not supported")


def _reduce(fn: str, axes_input_since: int) -> Callable:
    def op(n: Node, x, axes=None):
        if n.opset >= axes_input_since:
            ax = _ints(axes)
        else:
            ax = n.get("axes")
        keep = bool(n.get("keepdims", 1))
        if not ax:
            if n.get("noop_with_empty_axes", 0):
                return x
            ax = list(range(x.dim()))
        ax = [a % x.dim() for a in ax]
        if fn == "mean":
            return x.mean(dim=ax, keepdim=keep)
        if fn == "sum":
            return x.sum(dim=ax, keepdim=keep)
        if fn == "max":
            return x.amax(dim=ax, keepdim=keep)
        return x.amin(dim=ax, keepdim=keep)
    return op


def _constant(n: Node):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in n.attrs:
            v = n.attrs[key]
            if key == "value":
                return torch.from_numpy(numpy_helper.to_array(v).copy())
            dtype = torch.float32 if "float" in key else torch.int64
            return torch.tensor(v, dtype=dtype)
    raise n.error(f"unsupported Constant attribute(s) {sorted(n.attrs)}")


def _shape(n: Node, x):
    dims = list(x.shape)
    start, end = n.get("start", 0), n.get("end", None)
    return torch.tensor(dims[start:end], dtype=torch.int64)


def _gather(n: Node, x, idx):
    axis = n.get("axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    flat = x.index_select(axis, idx.reshape(-1))
    return flat.reshape(list(x.shape[:axis]) + list(idx.shape) + list(x.shape[axis + 1:]))


def _cast(n: Node, x):
    to = n.get("to")
    if to not in _ONNX_TO_TORCH:
        raise n.error(f"cast to ONNX type {to} is not supported")
    return x.to(_ONNX_TO_TORCH[to])


def _reshape(n: Node, x, shape):
    s = _ints(shape)
    if not n.get("allowzero", 0):
        s = [x.shape[k] if v == 0 else v for k, v in enumerate(s)]
    return x.reshape(s)


def _transpose(n: Node, x):
    perm = n.get("perm", list(range(x.dim() - 1, -1, -1)))
    return x.permute(perm)


def _unsqueeze(n: Node, x, axes=None):
    ax = _ints(axes) if n.opset >= 13 else n.get("axes")
    rank = x.dim() + len(ax)
    for a in sorted(a % rank for a in ax):
        x = x.unsqueeze(a)
    return x


def _squeeze(n: Node, x, axes=None):
    ax = _ints(axes) if n.opset >= 13 else n.get("axes")
    if not ax:
        return x.squeeze()
    for a in sorted((a % x.dim() for a in ax), reverse=True):
        x = x.squeeze(a)
    return x


def _flatten(n: Node, x):
    axis = n.get("axis", 1) % (x.dim() + 1) if x.dim() else 0
    lead = int(np.prod(x.shape[:axis])) if axis else 1
    return x.reshape(lead, -1)


def _gemm(n: Node, a, b, c=None):
    if n.get("transA", 0):
        a = a.t()
    if n.get("transB", 0):
        b = b.t()
    y = n.get("alpha", 1.0) * (a @ b)
    if c is not None:
        y = y + n.get("beta", 1.0) * c
    return y


def _softmax(n: Node, x):
    return torch.softmax(x, dim=n.get("axis", -1 if n.opset >= 13 else 1))


def _pad(n: Node, x, pads=None, value=None, axes=None):
    if n.opset < 11:
        p, v = n.get("pads"), n.get("value", 0.0)
    else:
        p = _ints(pads)
        v = 0.0 if value is None or value.numel() == 0 else value.item()
    if axes is not None:
        raise n.error("the axes input is not supported")
    rank = x.dim()
    # ONNX: [x1_begin, x2_begin, ..., x1_end, x2_end]; torch: last axis first, (begin, end)
    tp = []
    for a in range(rank - 1, -1, -1):
        tp += [p[a], p[a + rank]]
    mode = n.get("mode", "constant")
    if mode == "constant":
        return F.pad(x, tp, mode="constant", value=v)
    if mode in ("reflect", "edge") and rank == 4 and not any(p[k] for k in (0, 1, 4, 5)):
        return F.pad(x, tp[:4], mode="reflect" if mode == "reflect" else "replicate")
    raise n.error(f"Pad mode {mode!r} is only supported on the spatial axes of 4-D inputs")


def _expand(n: Node, x, shape):
    s = _ints(shape)
    out = torch.broadcast_shapes(tuple(x.shape), tuple(s))
    return x.expand(out)


def _constant_of_shape(n: Node, shape):
    v = n.get("value")
    fill = torch.from_numpy(numpy_helper.to_array(v).copy()) if v is not None else torch.zeros(1)
    return fill.reshape(()).expand(_ints(shape)).clone() if _ints(shape) else fill.reshape(())


# op type -> fn(node, *inputs) -> tensor or list of tensors. Missing optional inputs are None.
OPS: dict[str, Callable] = {
    "Conv": lambda n, x, w, b=None: conv2d(n, x, w, b),
    "ConvTranspose": _conv_transpose,
    "Relu": lambda n, x: torch.relu(x),
    "LeakyRelu": lambda n, x: F.leaky_relu(x, n.get("alpha", 0.01)),
    "PRelu": _prelu,
    "Sigmoid": lambda n, x: torch.sigmoid(x),
    "Tanh": lambda n, x: torch.tanh(x),
    "Sqrt": lambda n, x: torch.sqrt(x),
    "Exp": lambda n, x: torch.exp(x),
    "Log": lambda n, x: torch.log(x),
    "Neg": lambda n, x: -x,
    "Abs": lambda n, x: torch.abs(x),
    "Reciprocal": lambda n, x: 1.0 / x,
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _div,
    "Pow": _pow,
    "Max": lambda n, *xs: torch.stack(torch.broadcast_tensors(*xs)).amax(0),
    "Min": lambda n, *xs: torch.stack(torch.broadcast_tensors(*xs)).amin(0),
    "Clip": _clip,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "DepthToSpace": _depth_to_space,
    "SpaceToDepth": _space_to_depth,
    "Resize": _resize,
    "ReduceMean": _reduce("mean", 18),
    "ReduceSum": _reduce("sum", 13),
    "ReduceMax": _reduce("max", 18),
    "ReduceMin": _reduce("min", 18),
    "GlobalAveragePool": lambda n, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "GlobalMaxPool": lambda n, x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True),
    "Constant": _constant,
    "Identity": lambda n, x: x,
    "Shape": _shape,
    "Gather": _gather,
    "Cast": _cast,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Flatten": _flatten,
    "MatMul": _binary(torch.matmul),
    "Gemm": _gemm,
    "Softmax": _softmax,
    "Pad": _pad,
    "Expand": _expand,
    "ConstantOfShape": _constant_of_shape,
}
SUPPORTED_OPS = sorted(OPS)


# ----------------------------------------------------------------------------- the network


class GraphNet(nn.Module):
    """An ONNX model as a torch module, optionally with a ghost plan applied.

    `model`: the ORIGINAL onnx.ModelProto; `plan`: a plan dict (or None for the original
    network); `where`: the model's file name, for messages. `weights` (name -> array) replaces
    initializer values first (a starting point from `ghostsr plan --export-weights`).
    """

    def __init__(self, model: onnx.ModelProto, plan: dict | None = None, where: str = "model",
                 weights: dict[str, np.ndarray] | None = None, shift_init: float = 3.0):
        super().__init__()
        graph = model.graph
        self.where = where
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        if opset is None:
            raise ModelError(f"{where}: no default-domain opset_import")
        self.nodes = [Node(p, opset) for p in graph.node]
        for n in self.nodes:
            if n.proto.domain not in ("", "ai.onnx"):
                raise n.error(f"operator domain {n.proto.domain!r} is not supported "
                              f"(the trainer reads the ORIGINAL model, not a ghost model)")
            if n.op not in OPS:
                raise ModelError(f"{where}: node {n.name!r}: operator {n.op} is not supported by "
                                 f"the trainer's interpreter (supported: {', '.join(SUPPORTED_OPS)})")

        # Float32 initializers are the trainable weights, under their original names; the rest
        # (shapes, split sizes, ...) are constants.
        self.weight_names: list[str] = []
        params: list[nn.Parameter] = []
        self.constants: dict[str, torch.Tensor] = {}
        weights = dict(weights or {})
        for init in graph.initializer:
            arr = numpy_helper.to_array(init)
            if init.name in weights:
                new = weights.pop(init.name)
                if arr.dtype != np.float32:
                    raise ModelError(f"{where}: weights entry {init.name!r}: the initializer is "
                                     f"{arr.dtype}, not float32")
                if tuple(new.shape) != arr.shape:
                    raise ModelError(f"{where}: weights entry {init.name!r}: shape "
                                     f"{list(new.shape)} != the initializer's {list(arr.shape)}")
                arr = new
            if arr.dtype == np.float32:
                self.weight_names.append(init.name)
                params.append(nn.Parameter(torch.from_numpy(np.array(arr, dtype=np.float32))))
            else:
                self.constants[init.name] = torch.from_numpy(np.array(arr))
        if weights:
            raise ModelError(f"{where}: weights entries name no initializer of the model: "
                             f"{sorted(weights)[:5]}")
        self.weights = nn.ParameterList(params)
        self.weight_index = {name: k for k, name in enumerate(self.weight_names)}

        inits = {i.name for i in graph.initializer}
        inputs = [i for i in graph.input if i.name not in inits]
        if len(inputs) != 1:
            raise ModelError(f"{where}: expected one model input, found {[i.name for i in inputs]}")
        self.input_name = inputs[0].name
        dims = inputs[0].type.tensor_type.shape.dim
        self.input_channels = dims[1].dim_value if len(dims) == 4 else 0
        self.output_names = [o.name for o in graph.output]

        # When each tensor is last read, so forward() can drop intermediates early (whole-image
        # evaluation of a large model would otherwise keep every feature map alive).
        self.last_use: dict[str, int] = {}
        for k, n in enumerate(self.nodes):
            for name in n.proto.input:
                self.last_use[name] = k

        self.plan = plan
        self.ghosts = nn.ModuleList()
        self.ghost_index: dict[str, int] = {}
        if plan is not None:
            self._apply_plan(plan, shift_init)

    def _apply_plan(self, plan: dict, shift_init: float) -> None:
        check_envelope(plan, f"plan for {self.where}")
        convs = {}
        for n in self.nodes:
            if n.op == "Conv":
                convs[n.proto.output[0]] = n
        for i, entry in enumerate(plan["layers"]):
            name = entry.get("conv_output") if isinstance(entry, dict) else None
            at = f"plan layers[{i}] (conv_output {name!r})"
            if not isinstance(name, str):
                raise PlanError(f"{at}: no \"conv_output\" string")
            if name in self.ghost_index:
                raise PlanError(f"{at}: the layer is listed twice")
            node = convs.get(name)
            if node is None:
                raise PlanError(f"{at}: unknown tensor: no Conv in {self.where} writes it")
            w_name = node.proto.input[1]
            if w_name not in self.weight_index:
                raise PlanError(f"{at}: the Conv's weight {w_name!r} is not a float32 initializer")
            w = self.weights[self.weight_index[w_name]]
            validate_layer(entry, int(w.shape[0]), node.get("group", 1), plan["max_shift"], at)
            self.ghost_index[name] = len(self.ghosts)
            self.ghosts.append(GhostLayer(entry, plan["max_shift"], shift_init))

    def weight(self, name: str) -> torch.Tensor:
        return self.weights[self.weight_index[name]]

    def named_weights(self) -> dict[str, torch.Tensor]:
        return {name: self.weights[k] for k, name in enumerate(self.weight_names)}

    def ghost_layers(self) -> list[GhostLayer]:
        return list(self.ghosts)

    def _lookup(self, env: dict, name: str, n: Node):
        if name == "":
            return None  # an omitted optional input
        if name in env:
            return env[name]
        if name in self.weight_index:
            return self.weights[self.weight_index[name]]
        if name in self.constants:
            return self.constants[name]
        raise n.error(f"input {name!r} is not computed before this node (graph not sorted?)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, Any] = {self.input_name: x}
        keep = set(self.output_names)
        for k, n in enumerate(self.nodes):
            args = [self._lookup(env, name, n) for name in n.proto.input]
            while args and args[-1] is None:
                args.pop()
            ghost = self.ghost_index.get(n.proto.output[0]) if n.op == "Conv" else None
            try:
                if ghost is not None:
                    out = self._ghost_conv(n, self.ghosts[ghost], *args)
                else:
                    out = OPS[n.op](n, *args)
            except ModelError:
                raise
            except (RuntimeError, TypeError, ValueError, IndexError) as e:
                raise n.error(f"failed on inputs {[tuple(a.shape) if a is not None else None for a in args]}: {e}") from e
            outs = out if isinstance(out, list) else [out]
            for name, value in zip(n.proto.output, outs):
                if name:
                    env[name] = value
            for name in n.proto.input:
                if self.last_use.get(name) == k and name not in keep:
                    env.pop(name, None)
        return env[self.output_names[0]]

    @staticmethod
    def _ghost_conv(n: Node, layer: GhostLayer, x, w, b=None) -> torch.Tensor:
        if w.shape[0] != layer.out_channels:
            raise n.error(f"the plan says {layer.out_channels} output channels, the weight has "
                          f"{w.shape[0]}")
        if n.get("group", 1) == 1:
            # only the kept filters run (as in the rewritten model); ghost filters get no gradient
            wi = w.index_select(0, layer.intrinsic)
            bi = None if b is None else b.index_select(0, layer.intrinsic)
            xi = conv2d(n, x, wi, bi)
        else:
            # grouped: run the whole Conv and keep the intrinsic channels (same values)
            xi = conv2d(n, x, w, b).index_select(1, layer.intrinsic)
        return layer(xi)

    def export_plan(self) -> dict:
        """The plan with the learned shifts/scales/biases (format and version of the contract)."""
        if self.plan is None:
            raise PlanError("no plan to export")
        out = dict(self.plan)
        out["format"] = PLAN_FORMAT
        out["version"] = PLAN_VERSION
        out["layers"] = [self.ghosts[self.ghost_index[e["conv_output"]]].export_entry(e)
                         for e in self.plan["layers"]]
        return out

    def export_weights(self) -> dict[str, np.ndarray]:
        """Every float32 initializer, original name and shape."""
        return {name: p.detach().cpu().numpy().astype(np.float32)
                for name, p in self.named_weights().items()}
