#!/usr/bin/env bash
# Builds the ghostsr wheel into dist/: the `ghostsr` executable, libghostsr.so (stripped) and
# the Python package, through the same PEP 517 backend as `pip install .` (python/_backend).
#
#   scripts/build-wheel.sh                    dist/ghostsr-VERSION-py3-none-manylinux_*.whl (CPU)
#   scripts/build-wheel.sh --features cuda    dist/ghostsr_cuda-...whl: CPU + CUDA kernels,
#                                             depends on onnxruntime-gpu; ghostsr.BUILD == "cuda"
#
# The CUDA build needs nvcc: GHOSTSR_CUDA_HOME (see README.md, "Building the CUDA kernel"); it
# uses target/cuda, like scripts/test.sh, so the CPU build in target/ stays untouched.
# Extra arguments after `--` go to maturin (default: --compatibility pypi, a manylinux tag).
set -euo pipefail
cd "$(dirname "$0")/.."
features=""
maturin_args="--compatibility pypi"
while [ $# -gt 0 ]; do
  case "$1" in
    --features) features=${2:?--features needs a value}; shift 2 ;;
    --features=*) features=${1#--features=}; shift ;;
    --) shift; maturin_args="$*"; break ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "build-wheel.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done
if [ "$features" = cuda ]; then
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/cuda}
elif [ -n "$features" ]; then
  echo "build-wheel.sh: unknown feature '$features' (the only one is cuda)" >&2; exit 2
fi
mkdir -p dist
python3 -m pip wheel . --no-deps --disable-pip-version-check -w dist \
  --config-settings "features=$features" --config-settings "build-args=$maturin_args"
ls -l dist/*.whl
