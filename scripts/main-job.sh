#!/usr/bin/env bash
# The README's main job, from a fresh checkout: sets up .venv with ONNX Runtime 1.31.1 (once;
# scripts/venv.sh), then builds ghostsr and converts the shipped CARN-M x2 (fixtures/): calibrated
# on the built-in image set, with the quality it kept measured and printed. Extra arguments go
# to `ghostsr convert` (e.g. --ratio 0.25, --json).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
# shellcheck source=scripts/venv.sh
. scripts/venv.sh
mkdir -p out
exec cargo run --release -- convert fixtures/carn_m_x2.onnx -o out/carn_m_x2.ghost.onnx --force "$@"
