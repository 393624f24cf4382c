"""scripts/gpu-check.sh on a machine without a CUDA device: it must run through every row, mark
the GPU rows "no CUDA device", and exit 3 with a message saying so (not crash, not pass)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import onnxruntime as ort
import onnx
from conftest import BIN, PLUGIN, REPO


def test_gpu_check_without_a_device_runs_through_and_says_so(tmp_path):
    env = dict(os.environ, GPU_CHECK_OUT=str(tmp_path / "gpu-check"), GHOSTSR_CUDA_PLUGIN=str(PLUGIN),
               PYTHON=sys.executable)
    p = subprocess.run(["bash", str(REPO / "scripts" / "gpu-check.sh"), "--quick"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    table = (tmp_path / "gpu-check" / "table.md").read_text()
    assert (tmp_path / "gpu-check" / "models" / "gs_float16_0.onnx").is_file(), out
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert p.returncode in (0, 1), out  # a GPU machine: the rows ran
        return
    assert p.returncode == 3, out
    assert "gpu-check: no CUDA device on this machine" in p.stderr, out
    assert "| FAIL |" not in table, table
    gpu_rows = [line for line in table.splitlines() if line.startswith(("| placement", "| correctness", "| speed"))]
    assert len(gpu_rows) >= 16 and all("| no CUDA device |" in r for r in gpu_rows), table
    assert "| environment | CUDA plugin NEEDED list, size | ok |" in table, table


def gpu_check():
    sys.path.insert(0, str(REPO / "scripts"))
    import gpu_check as g  # noqa: PLC0415 - the script, imported for its functions

    return g


def test_bench_rows_cover_fp32_tf32_fp16_for_every_form():
    g = gpu_check()
    t = g.Table()
    g.bench_rows(t, BIN, PLUGIN, {}, device=False)
    names = {c for _g, c, _r, _d in t.rows}
    want = {f"bench {a} x2 {s} {p} {f}/orig" for a in ("edsr", "edsr-baseline") for s in ("180x320", "360x640")
            for p in ("fp32", "tf32", "fp16") for f in ("standard", "plugin", "fused", "conv")}
    assert names == want and len(t.rows) == 48, sorted(names ^ want)
    assert all(r == g.NO_DEVICE and grp == "speed" for grp, _c, r, _d in t.rows)


def test_bench_models_and_commands_run_on_cpu(tmp_path):
    """The models the GPU bench rows use (float16 copies included) are made, and the commands
    set --tf32 off / on / nothing; the fp16 one runs here on the CPU provider with float16 inputs,
    the TF32 ones are refused there, naming the flag."""
    g = gpu_check()
    t = g.Table()
    made = g.make_models(t, BIN, tmp_path / "work", ("--blocks", "2", "--channels", "16"))
    assert not t.rows, t.markdown()

    def elem(path):
        return onnx.load(path).graph.input[0].type.tensor_type.elem_type

    for arch in g.BENCH_ARCHS:
        for key in [arch] + [f"{arch}.{f}" for f in g.BENCH_FORMS]:
            assert elem(made[key]) == onnx.TensorProto.FLOAT, key
            assert elem(made[key + ".fp16"]) == onnx.TensorProto.FLOAT16, key
    cmds = {p: g.bench_command(BIN, PLUGIN, made, "edsr-baseline", "24x32", p, provider="cpu", runs=2)
            for p in ("fp32", "tf32", "fp16")}
    assert cmds["fp32"][-2:] == ["--tf32", "off"] and cmds["tf32"][-2:] == ["--tf32", "on"], cmds
    assert "--tf32" not in cmds["fp16"] and all(c.count("--also") == 3 for c in cmds.values()), cmds
    assert g.bench_command(BIN, PLUGIN, {}, "edsr", "24x32", "fp16") is None
    p = subprocess.run(cmds["fp16"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(p.stdout.splitlines()[-1])
    assert [r["orig"]["input"], r["ghost"]["input"]] + [a[0]["input"] for a in r["also"]] == ["float16"] * 5, r
    assert r["orig"]["model"].endswith(".fp16.onnx") and r["ratio"] > 0, r
    p = subprocess.run(cmds["tf32"], capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "--tf32" in p.stderr and "CPU provider" in p.stderr, p.stderr
