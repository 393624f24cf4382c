"""The README's commands and deployment example work as written.

Runs the README's main-job command (calibrating and converting the shipped CARN-M x2) and then executes the
Python deployment snippet verbatim, from the repository root, with the plugin built by
`cargo build --release`.
"""
import os
import re
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_readme_main_job_then_python_example(tmp_path, monkeypatch):
    assert re.search(r"^scripts/main-job.sh$", README, re.M), "README lost its main-job command"
    m = re.search(r"^cargo run --release -- (convert .*)$", README, re.M)
    assert m, "README lost the command the main job runs"
    # The script runs the very command the README shows (the test runs it with the built binary).
    script = (ROOT / "scripts" / "main-job.sh").read_text()
    assert f"cargo run --release -- {m.group(1)}" in script, "scripts/main-job.sh and README.md disagree"
    args = shlex.split(m.group(1))
    binary = os.environ.get("GHOSTSR_BIN", str(ROOT / "target/release/ghostsr"))
    done = subprocess.run([binary, *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Convs ghosted" in done.stdout
    # The default path calibrates and measures: a real model, a real quality figure.
    assert "quality:" in done.stdout and "built-in calibration set" in done.stdout, done.stdout

    block = re.search(r"### Deploy with ONNX Runtime \(Python\)\n\n```python\n(.*?)```", README, re.S)
    assert block, "README lost its Python example"
    monkeypatch.chdir(ROOT)
    scope = {}
    exec(compile(block.group(1), "README.md", "exec"), scope)
    assert scope["sr"].shape == (1, 3, 128, 128)
