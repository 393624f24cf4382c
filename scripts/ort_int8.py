"""ONNX Runtime's own int8 quantization of a model, the baseline of BENCHMARKS.md's int8 section.

    .venv/bin/python scripts/ort_int8.py MODEL OUT [--images DIR] [--seed N]

quantize_static: QDQ, per-channel int8 weights, uint8 activations, MinMax ranges, calibrated on 16
random 64x64 crops of the images (bicubic x1/2, RGB in [0, 1], NCHW).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from PIL import Image
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static


def crops(images: Path, n: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    paths = sorted(p for p in images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    if not paths:
        raise SystemExit(f"no images in {images}")
    out = []
    for _ in range(n):
        im = Image.open(paths[rng.integers(len(paths))]).convert("RGB")
        im = im.resize((im.width // 2, im.height // 2), Image.BICUBIC)
        a = np.asarray(im, dtype=np.float32) / 255
        y, x = rng.integers(a.shape[0] - size + 1), rng.integers(a.shape[1] - size + 1)
        out.append(a[y : y + size, x : x + size].transpose(2, 0, 1)[None].copy())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--images", type=Path, default=Path(__file__).resolve().parents[2] / "shared/images/BSD68")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.out.exists():
        raise SystemExit(f"{a.out} exists; not overwriting it")
    name = onnx.load(str(a.model)).graph.input[0].name
    feeds = iter([{name: c} for c in crops(a.images, 16, 64, a.seed)])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(feeds, None)

    quantize_static(str(a.model), str(a.out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
