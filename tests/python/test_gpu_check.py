"""scripts/gpu-check.sh on a machine without a CUDA device: it must run through every row, mark
the GPU rows "no CUDA device", and exit 3 with a message saying so (not crash, not pass)."""

from __future__ import annotations

import os
import subprocess
import sys

import onnxruntime as ort
from conftest import PLUGIN, REPO


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
