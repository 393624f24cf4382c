#!/usr/bin/env bash
# Runs every test of ghostsr, from a fresh machine: creates .venv with the pinned Python
# packages (ONNX Runtime 1.31.1, whose libonnxruntime.so the Rust side loads through
# ORT_DYLIB_PATH; onnx, numpy, pillow and pytest for the cross-checks), builds the release
# binary and the GhostShift plugin, then runs the Rust tests and the Python cross-checks, the
# CUDA build (nvcc from PyPI in .venv-cuda; its clippy, the host-side tests of the kernel logic,
# the plugin tests and the GPU check's dry run on it) and the reference trainer's tests (PyTorch,
# in its own .venv-torch).
#
#   scripts/test.sh            everything (what CI runs)
#   SKIP_LINT=1 scripts/test.sh  without rustfmt/clippy
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
# shellcheck source=scripts/venv.sh
. scripts/venv.sh

if [ -z "${SKIP_LINT:-}" ]; then
  echo "== rustfmt and clippy"
  cargo fmt --check
  cargo clippy --release --all-targets -- -D warnings
fi

echo "== build (release: the ghostsr binary and target/release/libghostsr.so)"
cargo build --release --all-targets

echo "== Rust tests"
cargo test --release

echo "== Python cross-checks (onnxruntime $("$venv/bin/python" -c 'import onnxruntime; print(onnxruntime.__version__)'))"
GHOSTSR_BIN=$root/target/release/ghostsr GHOSTSR_PLUGIN=$root/target/release/libghostsr.so \
  "$venv/bin/python" -m pytest tests/python -q

echo "== CUDA build (--features cuda; nvcc from PyPI): compile, clippy, host-side kernel tests, plugin tests on its CPU kernels"
cuda_venv=${GHOSTSR_CUDA_VENV:-$root/.venv-cuda}
cuda_home=$(ls -d "$cuda_venv"/lib/python3*/site-packages/nvidia/cu13 2>/dev/null | head -n 1 || true)
if [ -z "$cuda_home" ] || [ ! -x "$cuda_home/bin/nvcc" ]; then
  python3 -m venv "$cuda_venv"
  "$cuda_venv/bin/pip" install -q --disable-pip-version-check \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*"
  cuda_home=$(ls -d "$cuda_venv"/lib/python3*/site-packages/nvidia/cu13 | head -n 1)
fi
# A separate target dir keeps the CPU build above untouched.
export GHOSTSR_CUDA_HOME=$cuda_home
if [ -z "${SKIP_LINT:-}" ]; then
  CARGO_TARGET_DIR=$root/target/cuda cargo clippy --release --all-targets --features cuda -- -D warnings
fi
CARGO_TARGET_DIR=$root/target/cuda cargo build --release --features cuda --lib
cuda_plugin=$root/target/cuda/release/libghostsr.so
exports=$(nm -D --defined-only "$cuda_plugin" | awk '$2 == "T" {print $3}')
[ "$exports" = "RegisterCustomOps" ] || { echo "CUDA plugin exports: $exports"; exit 1; }
for so in "$root/target/release/libghostsr.so" "$cuda_plugin"; do
  size=$(stat -c %s "$so")
  [ "$size" -le $((5 << 20)) ] || { echo "$so is $size bytes (> 5 MB): is it stripped?"; exit 1; }
done
echo "CUDA plugin built: $cuda_plugin ($(stat -c %s "$cuda_plugin") bytes, exports only RegisterCustomOps)"
# The kernel's logic compiled for the host against the CPU kernel, the CUDA error paths, the
# CUDA-plugin check; then the plugin tests and the GPU check's dry run on the CUDA build.
CARGO_TARGET_DIR=$root/target/cuda cargo test --release --features cuda --lib -- plugin:: runner::cuda_plugin
GHOSTSR_BIN=$root/target/release/ghostsr GHOSTSR_PLUGIN=$cuda_plugin \
  "$venv/bin/python" -m pytest tests/python/test_plugin.py tests/python/test_gpu_check.py -q

echo "== reference trainer (trainers/pytorch, PyTorch in its own venv)"
# A separate venv: torch pulls ~5.4 GB of CUDA wheels, which the main cross-checks do not need.
# Created once and reused; the install (~75 s on a fast link) runs only when an import fails.
torch_venv=${GHOSTSR_TORCH_VENV:-$root/.venv-torch}
if ! "$torch_venv/bin/python" -c "import torch, onnx, onnxruntime, numpy, PIL, pytest" 2>/dev/null; then
  echo "== setting up $torch_venv (pinned torch and cross-check packages)"
  python3 -m venv "$torch_venv"
  "$torch_venv/bin/pip" install -q --disable-pip-version-check -r trainers/pytorch/requirements.txt
fi
GHOSTSR_BIN=$root/target/release/ghostsr GHOSTSR_PLUGIN=$root/target/release/libghostsr.so \
  "$torch_venv/bin/python" -m pytest trainers/pytorch/tests -q

echo "== pip package: the wheel in a fresh venv, no ORT_DYLIB_PATH (scripts/test-wheel.sh)"
scripts/test-wheel.sh
