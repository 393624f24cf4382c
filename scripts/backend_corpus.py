#!/usr/bin/env python3
"""Runs ghostsr over the `onnx` package's backend test models (issue 12's corpus run).

The wheel ships only some of them (light, pytorch-*, simple); the ~1,900 node and model cases
are regenerated from the package's own case generators (`onnx.backend.test.case.node` and
`.model`, what `backend-test-tools generate-data` writes) into a cache directory outside git.

For every model:
  1. `ghostsr convert MODEL --plan EMPTY` (an empty plan): must exit 0 or 1 (a clean refusal),
     never 101 (a panic), a signal, or past the timeout; when it succeeds, the output must be
     byte for byte the input.
  2. when the main graph has Convs: `convert --emit standard --kmeans --include <every Conv>` (forced
     ghosting); a converted model must pass `onnx.checker.check_model` and, when the original
     runs in onnxruntime on its test feed, run on that same feed.

Usage: backend_corpus.py [--cache DIR] [--bin target/release/ghostsr] [--json OUT]
Exit status 0 when every rule holds. Needs onnx, onnxruntime and numpy (tests/python/requirements.txt).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 60
EMPTY_PLAN = {"format": "ghostsr-plan", "version": 1, "model_sha256": "", "max_shift": 1, "layers": []}


def generate(cache: Path) -> Path:
    """Writes the node and model test cases of the installed onnx into `cache` (once per version)."""
    import onnx.backend.test.case.node as node_cases
    import onnx.backend.test.cmd_tools as tools

    stamp = cache / ".onnx-version"
    if stamp.is_file() and stamp.read_text() == onnx.__version__:
        return cache
    models = tools.model_test.collect_testcases
    tools.model_test.collect_testcases = lambda: node_cases.collect_testcases() + models()
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tools.generate_data(argparse.Namespace(output=str(cache)))
    finally:
        tools.model_test.collect_testcases = models
    stamp.write_text(onnx.__version__)
    return cache


def collect(cache: Path) -> list[Path]:
    """Every backend test model: the regenerated cases plus those shipped in the wheel."""
    shipped = Path(onnx.__file__).parent / "backend" / "test" / "data"
    found = sorted(cache.glob("*/*/model.onnx")) + sorted(shipped.glob("*/*/model.onnx"))
    found += sorted(shipped.glob("light/*.onnx"))
    return found


def feed(model_path: Path, model: onnx.ModelProto) -> dict | None:
    """The test case's first input set, or zeros of the declared shapes (light models)."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    data = model_path.parent / "test_data_set_0"
    if data.is_dir():
        out = {}
        for j, inp in enumerate(inputs):
            p = data / f"input_{j}.pb"
            if not p.is_file() or not inp.type.HasField("tensor_type"):
                return None
            t = onnx.TensorProto()
            t.ParseFromString(p.read_bytes())
            out[inp.name] = numpy_helper.to_array(t)
        return out
    out = {}
    for inp in inputs:
        tt = inp.type.tensor_type
        if tt.elem_type != onnx.TensorProto.FLOAT:
            return None
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in tt.shape.dim]
        out[inp.name] = np.random.default_rng(0).standard_normal(dims).astype(np.float32)
    return out


def runs(path_or_bytes, inputs: dict) -> str | None:
    """None when onnxruntime loads and runs the model on `inputs`, else the error."""
    import onnxruntime as ort

    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        src = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
        ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]).run(None, inputs)
        return None
    except Exception as e:  # noqa: BLE001 - any runtime failure is the answer
        return str(e).splitlines()[0][:200]


def ghostsr(binary: Path, args: list[str]) -> tuple[str, str, bytes]:
    """(status, stderr tail, stdout): status is ok, refused (exit 1), panic (101), hang or exit N."""
    try:
        r = subprocess.run([str(binary), *args], capture_output=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return "hang", "", b""
    err = r.stderr.decode(errors="replace").strip().splitlines()
    tail = err[-1][:300] if err else ""
    status = {0: "ok", 1: "refused", 101: "panic"}.get(r.returncode, f"exit {r.returncode}")
    return status, tail, r.stdout


def check_one(binary: Path, plan: Path, model_path: Path, work: Path) -> dict:
    name = str(model_path)
    res: dict = {"model": name}
    out = work / "empty.onnx"
    status, tail, _ = ghostsr(binary, ["convert", name, "--plan", str(plan), "-o", str(out), "--force", "--json"])
    res["empty"] = status
    if status == "ok":
        res["identical"] = out.read_bytes() == model_path.read_bytes()
    elif status != "refused":
        res["error"] = tail
    try:
        model = onnx.load(name)
    except Exception:  # noqa: BLE001 - ghostsr's verdict above is what counts
        return res
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.output and n.output[0]]
    if not convs:
        return res
    args = ["convert", name, "--emit", "standard", "--kmeans", "-o", str(work / "ghost.onnx"), "--force", "--json"]
    for n in convs:
        args += ["--include", n.output[0]]
    status, tail, stdout = ghostsr(binary, args)
    res["forced"] = status
    if status != "ok":
        if status != "refused":
            res["forced_error"] = tail
        return res
    res["ghosted"] = json.loads(stdout or b"{}").get("convs_ghosted", 0)
    ghost = onnx.load(str(work / "ghost.onnx"))
    try:
        onnx.checker.check_model(ghost)
        res["checker"] = "ok"
    except Exception as e:  # noqa: BLE001
        res["checker"] = str(e).splitlines()[0][:200]
    inputs = feed(model_path, model)
    if inputs is not None and runs(name, inputs) is None:
        err = runs(str(work / "ghost.onnx"), inputs)
        res["runs"] = "ok" if err is None else err
    return res


def run(cache: Path, binary: Path, workers: int) -> dict:
    t0 = time.monotonic()
    generate(cache)
    models = collect(cache)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plan = tmp / "empty.plan.json"
        plan.write_text(json.dumps(EMPTY_PLAN))

        def one(k_path):
            k, path = k_path
            work = tmp / f"w{k}"
            work.mkdir()
            return check_one(binary, plan, path, work)

        with cf.ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one, enumerate(models)))
    bad = lambda r: r.get("empty") in ("panic", "hang") or str(r.get("empty", "")).startswith("exit")  # noqa: E731
    summary = {
        "models": len(results),
        "seconds": round(time.monotonic() - t0, 1),
        "loaded": sum(r.get("empty") == "ok" for r in results),
        "refused": sum(r.get("empty") == "refused" for r in results),
        "not_identical": [r["model"] for r in results if r.get("identical") is False],
        "crashed": [r for r in results if bad(r) or r.get("forced") not in (None, "ok", "refused")],
        "with_convs": sum("forced" in r for r in results),
        "converted": sum(r.get("forced") == "ok" for r in results),
        "ghosted_some": sum(r.get("ghosted", 0) > 0 for r in results),
        "checker_failures": [r for r in results if r.get("checker") not in (None, "ok")],
        "run_checked": sum("runs" in r for r in results),
        "run_failures": [r for r in results if r.get("runs") not in (None, "ok")],
    }
    return summary


def failures(s: dict) -> list[str]:
    out = []
    for key in ("not_identical", "crashed", "checker_failures", "run_failures"):
        if s[key]:
            out.append(f"{key}: {json.dumps(s[key][:10], indent=1)} ({len(s[key])} in all)")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=REPO / "target" / "onnx-backend-corpus")
    ap.add_argument("--bin", type=Path, default=Path(os.environ.get("GHOSTSR_BIN", REPO / "target/release/ghostsr")))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the summary here")
    a = ap.parse_args()
    a.cache.mkdir(parents=True, exist_ok=True)
    s = run(a.cache, a.bin, a.workers)
    text = json.dumps(s, indent=1)
    if a.json:
        a.json.write_text(text)
    counts = {k: v for k, v in s.items() if not isinstance(v, list)}
    print(json.dumps(counts))
    bad = failures(s)
    for line in bad:
        print(line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
