"""The wheel build backend's own logic (python/_backend/ghostsr_backend.py), without cargo:
which build a config setting asks for, and the CUDA variant's renaming of a built wheel.
(scripts/test-wheel.sh builds and installs the real CPU wheel.)"""
from __future__ import annotations

import base64
import csv
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python" / "_backend"))
import ghostsr_backend as backend  # noqa: E402


def test_build_kind_from_config_settings(monkeypatch):
    monkeypatch.delenv("GHOSTSR_WHEEL_FEATURES", raising=False)
    assert backend.build_kind(None) == "cpu"
    assert backend.build_kind({"features": ""}) == "cpu"
    assert backend.build_kind({"features": "cuda"}) == "cuda"
    monkeypatch.setenv("GHOSTSR_WHEEL_FEATURES", "cuda")
    assert backend.build_kind({}) == "cuda"
    with pytest.raises(ValueError, match="only one is 'cuda'"):
        backend.build_kind({"features": "cuda,rocm"})


def test_crate_version_is_cargo_tomls():
    text = (backend.ROOT / "Cargo.toml").read_text()
    assert f'version = "{backend.crate_version()}"' in text


def _fake_wheel(path: Path) -> None:
    files = {
        "ghostsr/__init__.py": b"x = 1\n",
        "ghostsr/libghostsr.so": b"\x7fELF...",
        "ghostsr-0.1.0.data/scripts/ghostsr": b"\x7fELF exe",
        "ghostsr-0.1.0.dist-info/METADATA": (
            b"Metadata-Version: 2.4\nName: ghostsr\nVersion: 0.1.0\n"
            b"Requires-Dist: onnxruntime>=1.17,<2\nRequires-Dist: onnxruntime-extensions ; extra == 'x'\n"
            b"Summary: s\n\n# ghostsr\nName: ghostsr stays in the description\n"),
        "ghostsr-0.1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\n",
    }
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("ghostsr-0.1.0.dist-info/RECORD", "stale\n")


def test_cuda_wheel_is_renamed_with_a_valid_record(tmp_path):
    wheel = tmp_path / "ghostsr-0.1.0-py3-none-manylinux_2_34_x86_64.whl"
    _fake_wheel(wheel)
    dist, runtime = backend.BUILDS["cuda"]
    out = backend.rename_distribution(wheel, dist, {"onnxruntime": runtime})
    assert out.name == "ghostsr_cuda-0.1.0-py3-none-manylinux_2_34_x86_64.whl"
    assert not wheel.exists()
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        assert names == {
            "ghostsr/__init__.py", "ghostsr/libghostsr.so", "ghostsr_cuda-0.1.0.data/scripts/ghostsr",
            "ghostsr_cuda-0.1.0.dist-info/METADATA", "ghostsr_cuda-0.1.0.dist-info/WHEEL",
            "ghostsr_cuda-0.1.0.dist-info/RECORD",
        }
        meta = z.read("ghostsr_cuda-0.1.0.dist-info/METADATA").decode()
        assert "\nName: ghostsr-cuda\n" in meta
        assert "Requires-Dist: onnxruntime-gpu>=1.17,<2\n" in meta
        # only the onnxruntime requirement itself is swapped, and the description is untouched
        assert "Requires-Dist: onnxruntime-extensions ; extra == 'x'" in meta
        assert "Name: ghostsr stays in the description" in meta
        rows = list(csv.reader(io.StringIO(z.read("ghostsr_cuda-0.1.0.dist-info/RECORD").decode())))
        assert {r[0] for r in rows} == names
        for path, digest, size in rows:
            if path.endswith("RECORD"):
                assert digest == size == ""
                continue
            data = z.read(path)
            want = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert digest == f"sha256={want}" and int(size) == len(data), path
