"""ghostsr: make pretrained ONNX super-resolution models cheaper with ghost features (GhostSR).

The wheel holds the ``ghostsr`` command line (installed on ``PATH``) and ``libghostsr.so``, the
ONNX Runtime custom-op library that runs ghost models (op ``ai.ghostsr::GhostShift``)::

    import onnxruntime as ort
    import ghostsr

    so = ort.SessionOptions()
    so.register_custom_ops_library(ghostsr.get_library_path())

``python -m ghostsr ARGS`` runs the command line, like ``ghostsr ARGS``.
"""

from __future__ import annotations

import os
import sysconfig
from importlib import metadata
from pathlib import Path

try:  # written by the build backend (python/_backend) into the wheel
    from ._build_info import BUILD, DISTRIBUTION, VERSION
except ImportError:  # a source checkout without a wheel build
    BUILD, DISTRIBUTION, VERSION = "source", "ghostsr", "0+source"

__all__ = ["BUILD", "__version__", "get_executable_path", "get_library_path"]

#: The package version (the Rust crate's version).
__version__: str = VERSION

_BUILDS = {"cpu": "ghostsr", "cuda": "ghostsr-cuda"}


def get_library_path(build: str | None = None) -> str:
    """Path of the GhostShift custom-op library, for
    ``SessionOptions.register_custom_ops_library``.

    ``BUILD`` says which build this is: ``"cpu"`` (the ``ghostsr`` package: CPU kernel) or
    ``"cuda"`` (the ``ghostsr-cuda`` package: CPU and CUDA kernels). Pass ``build`` to insist
    on one: a mismatch raises ``RuntimeError`` naming the package to install.
    """
    if build is not None and build != BUILD:
        want = _BUILDS.get(build)
        if want is None:
            raise ValueError(f"unknown ghostsr build {build!r}; builds are {sorted(_BUILDS)}")
        raise RuntimeError(
            f"this is the {BUILD} build of ghostsr ({DISTRIBUTION} {__version__}); "
            f"the {build} build is the package {want} (pip install {want})"
        )
    path = Path(__file__).resolve().parent / "libghostsr.so"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: install ghostsr from a wheel (pip install ghostsr, or "
            "pip install . in a checkout) rather than importing the source tree"
        )
    return str(path)


def get_executable_path() -> str:
    """Path of the ``ghostsr`` executable that came with this package."""
    candidates = []
    try:  # the installed files of this distribution (any scheme: venv, --user, --prefix)
        for f in metadata.distribution(DISTRIBUTION).files or []:
            if f.name == "ghostsr" and f.parent.name in ("bin", "scripts"):
                candidates.append(Path(f.locate()))
    except metadata.PackageNotFoundError:
        pass
    for scheme in (None, f"{os.name}_user"):
        try:
            scripts = sysconfig.get_path("scripts", scheme) if scheme else sysconfig.get_path("scripts")
        except KeyError:
            continue
        candidates.append(Path(scripts) / "ghostsr")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c.resolve())
    tried = ", ".join(str(c) for c in candidates) or "nothing"
    raise FileNotFoundError(f"the ghostsr executable was not found (tried {tried})")
