# Sourced by scripts/test.sh and scripts/main-job.sh: makes sure $venv (default .venv) holds the
# pinned Python packages (ONNX Runtime 1.31.1, onnx, numpy, pillow, pytest) and exports
# ORT_DYLIB_PATH to its libonnxruntime.so, which the ghostsr binary loads. Expects $root.
venv=${GHOSTSR_VENV:-$root/.venv}
if ! "$venv/bin/python" -c "import onnxruntime, onnx, numpy, PIL, pytest" 2>/dev/null; then
  echo "== setting up $venv (pinned Python packages)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$root/tests/python/requirements.txt"
fi
ORT_DYLIB_PATH=$(ls "$venv"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1 | head -n 1)
export ORT_DYLIB_PATH
