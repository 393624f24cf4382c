"""The GPU check of the CUDA path; run through scripts/gpu-check.sh (its header explains the rows,
the preparation on the CPU machine and the exit codes). Needs numpy and onnxruntime (the GPU
build on the GPU machine); `--prepare` also needs onnx (the CPU machine's .venv has it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

NO_DEVICE = "no CUDA device"
# Random one-node cases: (N, C_i, C_g, H, W, max |shift|), shifts up to and beyond H and W.
SMALL_CASES = [(1, 4, 9, 7, 16, 9), (2, 3, 5, 5, 6, 8), (2, 1, 6, 3, 24, 30), (1, 8, 8, 16, 40, 2)]
# The large shapes of the issue: (N, C_i, C_g, H, W, dtype).
LARGE_CASES = [(1, 256, 256, 720, 1280, "float32"), (1, 64, 64, 2160, 3840, "float16")]
BENCH_ARCHS = ["edsr-baseline", "edsr"]
BENCH_SIZES = ["180x320", "360x640"]
BENCH_FORMS = ["standard", "plugin", "fused", "conv"]
# (row label, `ghostsr bench --tf32` value, float16 models): true fp32, TF32 (ORT's CUDA default
# on Ampere+), and fp16 models (TF32 does not apply to them).
BENCH_PRECISIONS = [("fp32", "off", False), ("tf32", "on", False), ("fp16", None, True)]


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, group: str, check: str, result: str, detail: str = "") -> None:
        self.rows.append((group, check, result, detail))
        print(f"  {group:<12} {check:<44} {result:<14} {detail}", flush=True)

    def failed(self) -> int:
        return sum(r[2] == "FAIL" for r in self.rows)

    def no_device(self) -> int:
        return sum(r[2] == NO_DEVICE for r in self.rows)

    def markdown(self) -> str:
        lines = ["| group | check | result | detail |", "|---|---|---|---|"]
        lines += [f"| {g} | {c} | {r} | {d} |" for g, c, r, d in self.rows]
        return "\n".join(lines)


def case_name(dtype: str, i: int) -> str:
    return f"gs_{dtype}_{i}.onnx"


def case_attrs(i: int, c_in: int, c_g: int, max_shift: int) -> dict:
    rng = np.random.default_rng(100 + i)
    sources = rng.integers(0, c_in, c_g).tolist()
    shifts = rng.integers(-max_shift, max_shift + 1, 2 * c_g).tolist()
    scales = [1.0 if g % 3 == 0 else float(rng.uniform(-2, 2)) for g in range(c_g)]
    biases = [0.0 if g % 3 == 0 else (-0.0 if g % 3 == 1 else float(rng.uniform(-1, 1))) for g in range(c_g)]
    return {"sources": sources, "shifts": shifts, "scales": scales, "biases": biases}


def prepare(out: Path) -> None:
    """One-node GhostShift models (made here: the GPU machine may not have the onnx package)."""
    import onnx
    from onnx import TensorProto, helper

    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    cases = [(n, ci, cg, h, w, s) for n, ci, cg, h, w, s in SMALL_CASES]
    cases += [(n, ci, cg, h, w, 2) for n, ci, cg, h, w, _ in LARGE_CASES]
    for dtype, elem in (("float32", TensorProto.FLOAT), ("float16", TensorProto.FLOAT16)):
        for i, (_n, c_in, c_g, _h, _w, max_shift) in enumerate(cases):
            a = case_attrs(i, c_in, c_g, max_shift)
            node = helper.make_node("GhostShift", ["X"], ["Y"], domain="ai.ghostsr", name="ghost_shift", **a)
            graph = helper.make_graph(
                [node],
                "gpu_check",
                [helper.make_tensor_value_info("X", elem, ["N", c_in, "H", "W"])],
                [helper.make_tensor_value_info("Y", elem, ["N", c_g, "H", "W"])],
            )
            m = helper.make_model(
                graph,
                opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.ghostsr", 1)],
                ir_version=8,
            )
            onnx.save(m, models / case_name(dtype, i))
    print(f"gpu-check: models written to {models}")


def sh(cmd: list[str], timeout: int = 600, env: dict | None = None) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        return p.returncode, (p.stdout + p.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return 127, str(e)


def environment(t: Table, ort, plugin: Path) -> bool:
    code, text = sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    has_gpu = code == 0 and bool(text)
    t.add("environment", "driver (nvidia-smi)", "ok" if has_gpu else NO_DEVICE, text.splitlines()[0] if has_gpu else "")
    capi = Path(ort.__file__).parent / "capi"
    provider = capi / "libonnxruntime_providers_cuda.so"
    if provider.is_file():
        code, text = sh(["ldd", str(provider)])
        missing = [line.split()[0] for line in text.splitlines() if "not found" in line]
        t.add("environment", "ldd libonnxruntime_providers_cuda.so", "FAIL" if missing else "ok",
              ("missing: " + ", ".join(missing)) if missing else f"onnxruntime {ort.__version__}")
    else:
        t.add("environment", "ldd libonnxruntime_providers_cuda.so", NO_DEVICE if not has_gpu else "FAIL",
              f"onnxruntime {ort.__version__} has no CUDA provider (stage it: ../shared/gpu/stage-onnxruntime-gpu.sh)")
    if plugin.is_file():
        code, text = sh(["readelf", "-d", str(plugin)])
        needed = [line.split("[")[1].rstrip("]") for line in text.splitlines() if "(NEEDED)" in line]
        bad = [n for n in needed if "cudart" in n]
        size = plugin.stat().st_size
        ok = code == 0 and not bad and size <= 5 << 20
        t.add("environment", "CUDA plugin NEEDED list, size", "ok" if ok else "FAIL",
              f"{', '.join(needed)}; {size / 2**20:.1f} MiB")
    else:
        t.add("environment", "CUDA plugin", "FAIL", f"{plugin} missing (build it: scripts/test.sh)")
    cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    return has_gpu and cuda_ep and plugin.is_file()


def session(ort, model: Path, plugin: Path, cuda: bool, profile: bool = False):
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(plugin))
    if cuda:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if profile:
        so.enable_profiling = True
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    return ort.InferenceSession(str(model), so, providers=providers)


def same_bits(a: np.ndarray, b: np.ndarray, identity: list[bool]) -> int:
    """Elements that differ: bit for bit, except that two NaNs agree in the channels with an
    affine map (the GPU returns the canonical NaN there; identity channels copy bits, so NaN
    payloads and -0.0 must match). Returns the count of differing elements (-1: shapes)."""
    if a.shape != b.shape:
        return -1
    u = np.uint16 if a.dtype == np.float16 else np.uint32
    diff = a.view(u) != b.view(u)
    affine = ~np.array(identity, dtype=bool)[None, :, None, None]
    diff &= ~(np.isnan(a) & np.isnan(b) & affine)
    return int(diff.sum())


def inputs(shape: tuple, dtype: str, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32).astype(dtype)
    flat = x.reshape(-1)
    flat[:: 97] = -0.0  # the identity entries must keep -0.0 and NaN payloads
    flat[5 :: 1009] = np.nan
    return x


def placement(t: Table, ort, models: Path, plugin: Path, device: bool) -> None:
    for dtype in ("float32", "float16"):
        name = f"GhostShift {dtype} on CUDAExecutionProvider"
        if not device:
            t.add("placement", name, NO_DEVICE)
            continue
        try:
            s = session(ort, models / case_name(dtype, 0), plugin, cuda=True, profile=True)
            n, c_in, _cg, h, w, _ = SMALL_CASES[0]
            s.run(None, {"X": inputs((n, c_in, h, w), dtype, 1)})
            prof = json.load(open(s.end_profiling()))
            eps = {e["args"].get("provider") for e in prof if e.get("cat") == "Node" and "ghost_shift" in e.get("name", "")}
            t.add("placement", name, "ok" if eps == {"CUDAExecutionProvider"} else "FAIL", f"profile: {sorted(map(str, eps))}")
        except Exception as e:  # noqa: BLE001 - any failure is a row
            t.add("placement", name, "FAIL", str(e).splitlines()[0][:160])


def correctness(t: Table, ort, models: Path, plugin: Path, device: bool) -> None:
    cases = [(n, ci, cg, h, w, s, d) for d in ("float32", "float16") for n, ci, cg, h, w, s in SMALL_CASES]
    cases += [(n, ci, cg, h, w, 2, d) for n, ci, cg, h, w, d in LARGE_CASES]
    for i, (n, ci, cg, h, w, max_shift, dtype) in enumerate(cases):
        idx = i % len(SMALL_CASES) if i < 2 * len(SMALL_CASES) else len(SMALL_CASES) + i - 2 * len(SMALL_CASES)
        a = case_attrs(idx, ci, cg, max_shift)
        identity = [sc == 1.0 and b == 0.0 for sc, b in zip(a["scales"], a["biases"])]
        one(t, ort, models / case_name(dtype, idx), plugin, device, (n, ci, h, w), dtype,
            f"{n}x{ci}->{cg}x{h}x{w} {dtype}", identity)


def one(t: Table, ort, model: Path, plugin: Path, device: bool, shape: tuple, dtype: str, label: str,
        identity: list[bool]) -> None:
    name = f"CUDA == CPU kernel {label}"
    if not device:
        t.add("correctness", name, NO_DEVICE)
        return
    try:
        x = inputs(shape, dtype, 7)
        want = session(ort, model, plugin, cuda=False).run(None, {"X": x})[0]
        got = session(ort, model, plugin, cuda=True).run(None, {"X": x})[0]
        bad = same_bits(got, want, identity)
        t.add("correctness", name, "ok" if bad == 0 else "FAIL", "" if bad == 0 else f"{bad} elements differ")
    except Exception as e:  # noqa: BLE001
        t.add("correctness", name, "FAIL", str(e).splitlines()[0][:160])


def make_models(t: Table, bin_: Path, work: Path, gen_extra: tuple[str, ...] = ()) -> dict[str, Path]:
    """Generated originals (key: arch), their ghost forms (arch.form) and float16 copies of each
    (arch.fp16, arch.form.fp16). The float16 copies are the float32 models narrowed by `ghostsr
    convert --ratio 0 --fp16` (an empty plan: same ghosts, same weights, only the precision
    differs). A failed step is a FAIL row; `gen_extra` shrinks the networks for tests."""
    made: dict[str, Path] = {}
    work.mkdir(parents=True, exist_ok=True)

    def narrow(key: str, src: Path) -> None:
        dst = src.with_suffix(".fp16.onnx")
        code, text = sh([str(bin_), "convert", str(src), "-o", str(dst), "--ratio", "0", "--kmeans", "--fp16",
                         "--force"])
        if code != 0:
            t.add("correctness", f"convert --fp16 {key}", "FAIL", text[-160:])
        else:
            made[f"{key}.fp16"] = dst

    for arch in BENCH_ARCHS:
        orig = work / f"{arch}_x2.onnx"
        code, text = sh([str(bin_), "generate", arch, "--scale", "2", *gen_extra, "-o", str(orig), "--force"])
        if code != 0:
            t.add("correctness", f"generate {arch} x2", "FAIL", text[-160:])
            continue
        made[arch] = orig
        narrow(arch, orig)
        for form in BENCH_FORMS:
            g = work / f"{arch}_x2.{form}.onnx"
            code, text = sh([str(bin_), "convert", str(orig), "-o", str(g), "--emit", form, "--force"])
            if code != 0:
                t.add("correctness", f"convert {arch} {form}", "FAIL", text[-160:])
            else:
                made[f"{arch}.{form}"] = g
                narrow(f"{arch}.{form}", g)
    return made


def whole_models(t: Table, ort, bin_: Path, out: Path, plugin: Path, device: bool) -> dict[str, Path]:
    if not device:
        for form in ("plugin", "fused"):
            t.add("correctness", f"EDSR-baseline x2 {form} form within 1e-4 of CPU", NO_DEVICE)
        return {}
    made = make_models(t, bin_, out / "work")
    for form in ("plugin", "fused"):
        g = made.get(f"edsr-baseline.{form}")
        name = f"EDSR-baseline x2 {form} form within 1e-4 of CPU"
        if g is None:
            t.add("correctness", name, "FAIL", "model not made")
            continue
        try:
            x = np.random.default_rng(3).random((1, 3, 48, 64), dtype=np.float32)
            s_cpu = session(ort, g, plugin, cuda=False)
            feed = {s_cpu.get_inputs()[0].name: x}
            want = s_cpu.run(None, feed)[0]
            so = session(ort, g, plugin, cuda=True)
            got = so.run(None, feed)[0]
            err = float(np.max(np.abs(got - want)))
            t.add("correctness", name, "ok" if err <= 1e-4 else "FAIL", f"max |diff| {err:.2e}")
        except Exception as e:  # noqa: BLE001
            t.add("correctness", name, "FAIL", str(e).splitlines()[0][:160])
    return made


def kernel_speed(t: Table, ort, models: Path, plugin: Path, device: bool) -> None:
    for j, (n, ci, cg, h, w, dtype) in enumerate(LARGE_CASES):
        name = f"kernel GB/s vs D2D copy {n}x{cg}x{h}x{w} {dtype}"
        if not device:
            t.add("speed", name, NO_DEVICE)
            continue
        try:
            import torch
        except ImportError:
            t.add("speed", name, "n/a", "no PyTorch for the copy reference")
            continue
        try:
            x = inputs((n, ci, h, w), dtype, 9)
            s = session(ort, models / case_name(dtype, len(SMALL_CASES) + j), plugin, cuda=True)
            xv = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
            yv = ort.OrtValue.ortvalue_from_shape_and_type((n, cg, h, w), x.dtype, "cuda", 0)
            b = s.io_binding()
            b.bind_ortvalue_input("X", xv)
            b.bind_ortvalue_output("Y", yv)
            times = []
            for k in range(25):
                t0 = time.perf_counter()
                s.run_with_iobinding(b)
                if k >= 5:
                    times.append(time.perf_counter() - t0)
            moved = 2 * n * cg * h * w * x.itemsize
            k_gbs = moved / float(np.median(times)) / 1e9
            tx = torch.empty(n * cg * h * w, dtype=getattr(torch, dtype), device="cuda")
            ty = torch.empty_like(tx)
            ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ct = []
            for k in range(25):
                ev0.record()
                ty.copy_(tx)
                ev1.record()
                torch.cuda.synchronize()
                if k >= 5:
                    ct.append(ev0.elapsed_time(ev1) / 1e3)
            c_gbs = moved / float(np.median(ct)) / 1e9
            ratio = k_gbs / c_gbs
            t.add("speed", name, "ok" if ratio >= 0.8 else "below target",
                  f"kernel {k_gbs:.0f} GB/s, copy {c_gbs:.0f} GB/s, {ratio:.0%} (target >= 80%)")
        except Exception as e:  # noqa: BLE001
            t.add("speed", name, "FAIL", str(e).splitlines()[0][:160])


def bench_command(bin_: Path, plugin: Path, made: dict[str, Path], arch: str, size: str, precision: str,
                  provider: str = "cuda", runs: int = 20) -> list[str] | None:
    """One interleaved `ghostsr bench` of the original against every form, in one precision
    (None when a model is missing): the standard form is the ghost, the others `--also`."""
    tf32, fp16 = next((tf, h) for p, tf, h in BENCH_PRECISIONS if p == precision)
    suffix = ".fp16" if fp16 else ""
    models = [made.get(arch + suffix)] + [made.get(f"{arch}.{form}{suffix}") for form in BENCH_FORMS]
    if any(m is None for m in models):
        return None
    cmd = [str(bin_), "bench", str(models[0]), str(models[1])]
    for m in models[2:]:
        cmd += ["--also", str(m)]
    cmd += ["--size", size, "--provider", provider, "--runs", str(runs), "--plugin", str(plugin), "--json"]
    if tf32 is not None:
        cmd += ["--tf32", tf32]
    return cmd


def bench_rows(t: Table, bin_: Path, plugin: Path, made: dict[str, Path], device: bool) -> None:
    env = dict(os.environ, GHOSTSR_CUDA_SYNC="0")
    for arch in BENCH_ARCHS:
        for size in BENCH_SIZES:
            for precision, _tf32, _fp16 in BENCH_PRECISIONS:
                names = [f"bench {arch} x2 {size} {precision} {form}/orig" for form in BENCH_FORMS]
                if not device:
                    for name in names:
                        t.add("speed", name, NO_DEVICE)
                    continue
                cmd = bench_command(bin_, plugin, made, arch, size, precision)
                if cmd is None:
                    for name in names:
                        t.add("speed", name, "FAIL", "model not made")
                    continue
                code, text = sh(cmd, env=env)
                try:
                    r = json.loads(text.splitlines()[-1]) if code == 0 else None
                except (ValueError, IndexError):
                    r = None
                if r is None:
                    why = text.splitlines()[-1][:160] if text else f"exit {code}"
                    for name in names:
                        t.add("speed", name, "FAIL", why)
                    continue
                timings = [(r["ghost"], r["ratio"])] + [(tm, ratio) for tm, ratio in r.get("also", [])]
                for name, (tm, ratio) in zip(names, timings):
                    t.add("speed", name, "measured",
                          f"orig {r['orig']['median_ms']:.2f} ms, ghost {tm['median_ms']:.2f} ms, "
                          f"ratio {ratio:.3f} ({tm['input']}, median of {r['runs']})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--plugin", type=Path, required=True)
    ap.add_argument("--bin", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prepare", action="store_true")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    models = a.out / "models"
    if a.prepare or not models.is_dir():
        try:
            prepare(a.out)
        except ImportError:
            print(f"gpu-check: {models} is missing and the onnx package is not here: "
                  "run scripts/gpu-check.sh --prepare on the CPU machine and carry out/gpu-check", file=sys.stderr)
            return 2
        if a.prepare:
            return 0
    import onnxruntime as ort

    print(f"gpu-check: onnxruntime {ort.__version__} ({ort.__file__}), plugin {a.plugin}", flush=True)
    t = Table()
    t0 = time.time()
    device = environment(t, ort, a.plugin)
    placement(t, ort, models, a.plugin, device)
    correctness(t, ort, models, a.plugin, device)
    made = whole_models(t, ort, a.bin, a.out, a.plugin, device)
    kernel_speed(t, ort, models, a.plugin, device)
    if not a.quick:
        bench_rows(t, a.bin, a.plugin, made, device)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "table.md").write_text(t.markdown() + "\n")
    print(f"\n{t.markdown()}\n\ngpu-check: {time.time() - t0:.0f} s; table in {a.out / 'table.md'}")
    if t.failed():
        print(f"gpu-check: FAILED: {t.failed()} row(s)", file=sys.stderr)
        return 1
    if not device:
        print(f"gpu-check: no CUDA device on this machine (or no CUDA-enabled onnxruntime): {t.no_device()} GPU "
              "rows were not run. Run scripts/gpu-check.sh on a GPU machine (see its header).", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    if shutil.which("readelf") is None:
        print("gpu-check: readelf (binutils) is needed", file=sys.stderr)
    sys.exit(main())
