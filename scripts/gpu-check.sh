#!/usr/bin/env bash
# The GPU check of the CUDA path (issue 10): one command on a GPU machine, under 8 minutes,
# printing one table and exiting non-zero on any failure. Rows:
#   1. environment: the driver (nvidia-smi), `ldd` of ONNX Runtime's CUDA provider library, the
#      CUDA plugin's NEEDED list (the CUDA runtime is linked statically: no libcudart);
#   2. placement: one-node GhostShift models (fp32, fp16) under [CUDA, CPU] with
#      session.disable_cpu_ep_fallback=1; the profile must show GhostShift on CUDAExecutionProvider;
#   3. correctness: CUDA == CPU kernel, bit for bit, on random shapes (|shift| >= H or W, C_g > C_i,
#      N = 2) and on 1x256x720x1280 fp32 and 1x64x2160x3840 fp16; whole generated EDSR-baseline
#      x2 models (plugin and fused forms) within 1e-4 of the CPU provider;
#   4. speed: the kernel's GB/s against a device-to-device copy of the same bytes (PyTorch), and
#      `ghostsr bench --provider cuda` on generated EDSR x2 and EDSR-baseline x2 at 180x320 and
#      360x640 LR, in fp32 (--tf32 off), TF32 (--tf32 on) and fp16 (every model narrowed by
#      `ghostsr convert --ratio 0 --fp16`), the original against the standard / plugin / fused /
#      conv forms in one interleaved run per arch, size and precision, median of 20 runs.
# Every kernel call runs with GHOSTSR_CUDA_SYNC=1 (a fault is reported at its launch).
#
# On this CPU machine first (the GPU machine has no network and no Rust toolchain):
#   scripts/test.sh (or the CUDA step of it)       target/cuda/release/libghostsr.so, target/release/ghostsr
#   scripts/gpu-check.sh --prepare                 models into out/gpu-check/ (needs .venv: onnx)
#   bash ../shared/gpu/stage-onnxruntime-gpu.sh    onnxruntime-gpu parts into .ortgpu-parts/ (read
#                                                  its header: one part per device call into .ortgpu)
# Then on the GPU machine, carrying target/cuda/release/libghostsr.so, target/release/ghostsr,
# out/gpu-check and .ortgpu (last part): `bash .ortgpu/ortgpu.sh stash && scripts/gpu-check.sh`.
# The script evaluates `.ortgpu/ortgpu.sh env` itself when the staged parts are there.
#
# Without a CUDA device (this machine) it runs through, reports "no CUDA device" in the GPU rows
# and exits 3 with a message saying so (tests/python/test_gpu_check.py checks that).
#
# Options: --prepare (write the models and stop), --quick (skip the ghostsr bench rows).
# Environment: GHOSTSR_CUDA_PLUGIN, GHOSTSR_BIN, GPU_CHECK_OUT, PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -x .ortgpu/ortgpu.sh ] && [ -d /tmp/og ] && ls /tmp/og/part* >/dev/null 2>&1; then
  eval "$(bash .ortgpu/ortgpu.sh env)"
fi
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ] && [ -z "${PYTHONPATH:-}" ]; then py=.venv/bin/python; else py=python3; fi
fi
export GHOSTSR_CUDA_SYNC=1
exec "$py" scripts/gpu_check.py \
  --plugin "${GHOSTSR_CUDA_PLUGIN:-target/cuda/release/libghostsr.so}" \
  --bin "${GHOSTSR_BIN:-target/release/ghostsr}" \
  --out "${GPU_CHECK_OUT:-out/gpu-check}" "$@"
