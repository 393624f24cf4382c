// Host build of the CUDA kernel's logic (ghost_shift_core.h), for the Rust tests in
// src/plugin/cuda_host.rs: runs the kernel's grid on the CPU, block by block and thread by
// thread, calling the same gs_block function the CUDA kernel calls. Compiled by the system C++
// compiler (build.rs), no nvcc needed.
#include <stdint.h>

#include "ghost_shift_core.h"

namespace {

// Emulates a launch: `grid_rows` and `grid_planes` stand for gridDim.y and gridDim.z (the kernel
// caps them at 65535; the tests make them small to exercise the grid-stride loops), `threads`
// for blockDim.x.
template <typename T, int VEC>
void emulate(const T* x, T* y, const ghostsr::GsAttr* attrs, int32_t c_in, int32_t c_g, int32_t h, int32_t w,
             int64_t planes, int32_t grid_rows, int32_t grid_planes, int32_t threads) {
  const int64_t per_block = (int64_t)threads * VEC;
  const int64_t tiles = (w + per_block - 1) / per_block;
  for (int64_t bz = 0; bz < grid_planes; bz++)
    for (int32_t by = 0; by < grid_rows; by++)
      for (int64_t bx = 0; bx < tiles; bx++)
        for (int32_t t = 0; t < threads; t++)
          ghostsr::gs_block<T, VEC>(x, y, attrs, c_in, c_g, h, w, planes, bz, grid_planes, by, grid_rows,
                                    (bx * threads + t) * VEC);
}

template <typename T>
int run(const T* x, T* y, const void* attrs, int64_t n, int64_t c_in, int64_t c_g, int64_t h, int64_t w,
        int32_t force_scalar, int32_t grid_rows, int32_t grid_planes, int32_t threads) {
  const int64_t planes = n * c_g;
  if (planes <= 0 || h <= 0 || w <= 0) return 0;
  if (grid_rows <= 0 || grid_planes <= 0 || threads <= 0) return 1;
  const ghostsr::GsAttr* a = static_cast<const ghostsr::GsAttr*>(attrs);
  const int vec = force_scalar ? 1 : ghostsr::gs_vec_width((int32_t)sizeof(T), (int32_t)w);
  if (vec == 16 / (int)sizeof(T)) {
    emulate<T, 16 / sizeof(T)>(x, y, a, (int32_t)c_in, (int32_t)c_g, (int32_t)h, (int32_t)w, planes, grid_rows,
                               grid_planes, threads);
  } else {
    emulate<T, 1>(x, y, a, (int32_t)c_in, (int32_t)c_g, (int32_t)h, (int32_t)w, planes, grid_rows, grid_planes,
                  threads);
  }
  return 0;
}

}  // namespace

extern "C" int ghostsr_host_ghost_shift_f32(const float* x, float* y, const void* attrs, int64_t n, int64_t c_in,
                                            int64_t c_g, int64_t h, int64_t w, int32_t force_scalar,
                                            int32_t grid_rows, int32_t grid_planes, int32_t threads) {
  return run<float>(x, y, attrs, n, c_in, c_g, h, w, force_scalar, grid_rows, grid_planes, threads);
}

extern "C" int ghostsr_host_ghost_shift_f16(const void* x, void* y, const void* attrs, int64_t n, int64_t c_in,
                                            int64_t c_g, int64_t h, int64_t w, int32_t force_scalar,
                                            int32_t grid_rows, int32_t grid_planes, int32_t threads) {
  return run<ghostsr::half_bits>(static_cast<const ghostsr::half_bits*>(x), static_cast<ghostsr::half_bits*>(y), attrs,
                                 n, c_in, c_g, h, w, force_scalar, grid_rows, grid_planes, threads);
}

extern "C" uint16_t ghostsr_host_float_to_half(float f) { return ghostsr::gs_float_to_half(f); }
extern "C" float ghostsr_host_half_to_float(uint16_t h) { return ghostsr::gs_half_to_float(h); }

extern "C" int32_t ghostsr_host_vec_width(int32_t elem_bytes, int32_t w) {
  return ghostsr::gs_vec_width(elem_bytes, w);
}
