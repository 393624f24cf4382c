"""PEP 517 build backend of the ghostsr wheel: maturin, plus the GhostShift plugin.

maturin (``bindings = "bin"``) packs the ``ghostsr`` executable as a script and the Python
package in ``python/ghostsr``, but it has no way to add the crate's cdylib to a ``bin`` wheel.
So this backend first builds the plugin with cargo (same profile and target directory as
maturin's build, so the library crate is compiled once), stages it, stripped, as
``python/ghostsr/libghostsr.so`` together with ``_build_info.py`` (version, build kind), and then
hands over to maturin, whose ``include`` setting in pyproject.toml picks both up.

Config settings (``pip wheel . --config-settings features=cuda``, or
``scripts/build-wheel.sh --features cuda``):

- ``features``: ``cuda`` builds the CUDA variant: ``--features cuda`` for cargo and maturin,
  the distribution renamed ``ghostsr-cuda`` (depending on ``onnxruntime-gpu``), and
  ``ghostsr.BUILD == "cuda"``.
- ``build-args``: passed on to maturin as it is (e.g. ``--compatibility pypi``).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

__all__ = ["build_sdist", "build_wheel", "get_requires_for_build_sdist", "get_requires_for_build_wheel"]

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "python" / "ghostsr"
STAGED = ("libghostsr.so", "_build_info.py")
# Distribution name and onnxruntime package of each build kind.
BUILDS = {"cpu": ("ghostsr", "onnxruntime"), "cuda": ("ghostsr-cuda", "onnxruntime-gpu")}


def build_kind(config_settings: Mapping[str, Any] | None) -> str:
    features = (config_settings or {}).get("features") or os.environ.get("GHOSTSR_WHEEL_FEATURES", "")
    names = {f for f in re.split(r"[\s,]+", str(features)) if f}
    unknown = names - {"cuda"}
    if unknown:
        raise ValueError(f"unknown ghostsr wheel feature(s) {sorted(unknown)}; the only one is 'cuda'")
    return "cuda" if "cuda" in names else "cpu"


def crate_version() -> str:
    text = (ROOT / "Cargo.toml").read_text()
    package = text.split("[package]", 1)[1].split("\n[", 1)[0]
    m = re.search(r'^version\s*=\s*"([^"]+)"', package, re.M)
    if not m:
        raise RuntimeError("no version in Cargo.toml's [package]")
    return m.group(1)


def build_plugin(kind: str) -> Path:
    """`cargo build --release --lib` (with the cuda feature for that kind); the cdylib's path."""
    cmd = ["cargo", "build", "--release", "--lib", "--message-format=json-render-diagnostics"]
    if kind == "cuda":
        cmd += ["--features", "cuda"]
    print("Running `{}`".format(" ".join(cmd)), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, check=True, text=True).stdout
    for line in out.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") == "compiler-artifact" and "cdylib" in msg.get("target", {}).get("kind", []):
            for f in msg.get("filenames", []):
                if f.endswith(".so"):
                    return Path(f)
    raise RuntimeError("cargo built no cdylib (libghostsr.so)")


def stage(kind: str, plugin: Path) -> None:
    dist, _ = BUILDS[kind]
    target = PACKAGE / "libghostsr.so"
    shutil.copyfile(plugin, target)
    os.chmod(target, 0o755)
    # The release profile keeps line tables for profiling; the wheel does not need them.
    strip = shutil.which("strip")
    if strip:
        subprocess.run([strip, "--strip-unneeded", str(target)], check=True)
    else:
        print("warning: `strip` not found: libghostsr.so goes into the wheel unstripped", file=sys.stderr)
    (PACKAGE / "_build_info.py").write_text(
        '"""Written by the build backend (python/_backend/ghostsr_backend.py)."""\n\n'
        f"BUILD = {kind!r}\nDISTRIBUTION = {dist!r}\nVERSION = {crate_version()!r}\n"
    )


def rename_distribution(wheel: Path, name: str, requirements: Mapping[str, str]) -> Path:
    """Rewrites `wheel` as distribution `name` (dist-info and data folders, METADATA's Name and
    the Requires-Dist lines named in `requirements`, RECORD); returns the new wheel's path."""
    old_prefix = wheel.name.split("-", 1)[0]  # e.g. "ghostsr"
    new_prefix = re.sub(r"[-_.]+", "_", name)
    version = wheel.name.split("-")[1]
    new_path = wheel.with_name(new_prefix + wheel.name[len(old_prefix):])

    def rename(path: str) -> str:
        for suffix in (".dist-info/", ".data/"):
            old = f"{old_prefix}-{version}{suffix}"
            if path.startswith(old):
                return f"{new_prefix}-{version}{suffix}" + path[len(old):]
        return path

    with zipfile.ZipFile(wheel) as src:
        entries = [(info, src.read(info)) for info in src.infolist()]
    records = []
    with zipfile.ZipFile(new_path, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = None
        for info, data in entries:
            path = rename(info.filename)
            if path.endswith(".dist-info/RECORD"):
                record_name = path
                continue
            if path.endswith(".dist-info/METADATA"):
                text = data.decode()
                text = re.sub(r"^Name: .*$", f"Name: {name}", text, count=1, flags=re.M)
                for old, new in requirements.items():
                    text = re.sub(rf"^Requires-Dist: {re.escape(old)}(?=[\s<>=!~;(]|$)",
                                  f"Requires-Dist: {new}", text, flags=re.M)
                data = text.encode()
            info.filename = path
            dst.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append((path, f"sha256={digest}", str(len(data))))
        if record_name is None:
            raise RuntimeError(f"{wheel} has no RECORD")
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([*records, (record_name, "", "")])
        # The fixed timestamp maturin gives every entry, so the rename stays reproducible.
        dst.writestr(zipfile.ZipInfo(record_name, date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())
    wheel.unlink()
    return new_path


# maturin is imported where it is used, so the helpers above can be tested without it.
def get_requires_for_build_wheel(config_settings: Mapping[str, Any] | None = None) -> list[str]:
    import maturin

    return maturin.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_sdist(config_settings: Mapping[str, Any] | None = None) -> list[str]:
    import maturin

    return maturin.get_requires_for_build_sdist(config_settings)


def build_sdist(sdist_directory: str, config_settings: Mapping[str, Any] | None = None) -> str:
    import maturin

    return maturin.build_sdist(sdist_directory, config_settings)


def build_wheel(wheel_directory: str, config_settings: Mapping[str, Any] | None = None,
                metadata_directory: str | None = None) -> str:
    import maturin

    kind = build_kind(config_settings)
    settings = dict(config_settings or {})
    args = maturin.get_maturin_pep517_args(settings)
    if kind == "cuda":
        args = [*args, "--features", "cuda"]
    settings["build-args"] = shlex.join(args)
    settings.pop("maturin.build-args", None)
    staged = [PACKAGE / f for f in STAGED]
    try:
        stage(kind, build_plugin(kind))
        with tempfile.TemporaryDirectory() as tmp:
            # No metadata_directory: this backend offers no prepare_metadata hook (the CUDA
            # build renames the distribution after maturin has written it).
            name = maturin.build_wheel(tmp, settings, None)
            wheel = Path(tmp) / name
            if kind != "cpu":
                dist, runtime = BUILDS[kind]
                wheel = rename_distribution(wheel, dist, {BUILDS["cpu"][1]: runtime})
            shutil.move(str(wheel), os.path.join(wheel_directory, wheel.name))
            return wheel.name
    finally:
        for f in staged:
            f.unlink(missing_ok=True)
