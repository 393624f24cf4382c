// The per-element logic of the GhostShift CUDA kernel (ai.ghostsr::GhostShift, see
// shared/design/ghostshift-op.md), as __host__ __device__ code: cuda_ops/ghost_shift.cu runs it
// on the GPU, and cuda_ops/host_shim.cpp compiles the very same functions with the host C++
// compiler, so the Rust tests (src/plugin/cuda_host.rs) check it against the CPU kernel on any
// machine, without nvcc or a GPU.
//
// Work split (the kernel's grid is (column tiles, rows, N*C_g planes)): one plane = one ghost
// channel g of one batch item, whose attributes are read once into registers; for each row the
// valid column span is computed once (gs_row_span), then each thread writes VEC consecutive
// columns (gs_thread): the source element, bit-copied for an identity entry (scale 1, bias 0,
// like the CPU kernel's copy_from_slice, so -0.0 and NaN payloads survive) or scale*x+bias with
// two roundings (no FMA), and the bias outside the span. Indices inside a plane are 32-bit.
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define GS_HD __host__ __device__ __forceinline__
#else
#define GS_HD inline
#endif
#if defined(__CUDA_ARCH__)
#define GS_UNROLL _Pragma("unroll")
#else
#define GS_UNROLL
#endif

namespace ghostsr {

// One ghost channel's attributes as packed by the plugin (src/plugin/cuda_attrs.rs, 8 words,
// 32 bytes: one record per channel so a block reads its channel with two 16-byte loads).
struct GsAttr {
  int32_t source;    // input channel, validated to [0, C_i)
  int32_t dy;        // shifts, clamped to [-2^30, 2^30] (anything >= H or W is all border)
  int32_t dx;
  float scale;
  float bias;
  uint32_t identity;  // 1 when scale == 1 and bias == 0 (the CPU kernel's copy test)
  uint32_t pad0;
  uint32_t pad1;
};
static_assert(sizeof(GsAttr) == 32, "GsAttr is 8 words");

// float16 as raw bits.
struct half_bits {
  uint16_t bits;
};

GS_HD float gs_bits_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
GS_HD uint32_t gs_f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

// float16 -> float32 (exact).
GS_HD float gs_half_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#else
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) {  // inf, or NaN: quieted with its payload kept (like x86's F16C)
    return gs_bits_f32(sign | 0x7f800000u | (man != 0 ? 0x400000u : 0u) | (man << 13));
  }
  if (exp == 0) {
    if (man == 0) return gs_bits_f32(sign);
    // subnormal: normalise
    int e = -1;
    do {
      e++;
      man <<= 1;
    } while ((man & 0x400u) == 0);
    return gs_bits_f32(sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13));
  }
  return gs_bits_f32(sign | ((exp + 127 - 15) << 23) | (man << 13));
#endif
}

// float32 -> float16, round to nearest even (NaN stays NaN, quiet, with the top payload bits).
GS_HD uint16_t gs_float_to_half(float f) {
#if defined(__CUDA_ARCH__)
  uint16_t h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#else
  const uint32_t x = gs_f32_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t exp = (x >> 23) & 0xffu;
  const uint32_t man = x & 0x7fffffu;
  if (exp == 0xff) {
    if (man == 0) return (uint16_t)(sign | 0x7c00u);
    return (uint16_t)(sign | 0x7e00u | (man >> 13));
  }
  const int32_t e = (int32_t)exp - 127 + 15;
  if (e >= 0x1f) return (uint16_t)(sign | 0x7c00u);  // overflow -> inf
  if (e <= 0) {
    if (e < -10) return (uint16_t)sign;  // below half the smallest subnormal -> +-0
    const uint32_t m = man | 0x800000u;
    const uint32_t shift = (uint32_t)(14 - e);
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) r++;
    return (uint16_t)(sign | r);
  }
  uint32_t r = ((uint32_t)e << 10) | (man >> 13);
  const uint32_t rem = man & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r++;  // a carry into the exponent is right
  return (uint16_t)(sign | r);
#endif
}

GS_HD float gs_load(const float* p) { return *p; }
GS_HD float gs_load(const half_bits* p) { return gs_half_to_float(p->bits); }
GS_HD void gs_from_float(float v, float* out) { *out = v; }
GS_HD void gs_from_float(float v, half_bits* out) { out->bits = gs_float_to_half(v); }

// scale * v + bias with two roundings (the CPU kernel and numpy do not fuse).
GS_HD float gs_affine(float scale, float v, float bias) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(scale, v), bias);
#else
  volatile float m = scale * v;  // volatile: no contraction even under -ffp-contract=fast
  return m + bias;
#endif
}

// The valid part of one output row: source row `src_row` (or -1: the whole row is border) and
// output columns [c0, c1), whose source column is col - dx = col - c0 + s0.
struct GsSpan {
  int32_t src_row;
  int32_t c0;
  int32_t c1;
  int32_t s0;
};

GS_HD int64_t gs_clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Computed once per row; 64-bit here because row - dy may leave the 32-bit range.
GS_HD GsSpan gs_row_span(int32_t row, int32_t h, int32_t w, int32_t dy, int32_t dx) {
  GsSpan s;
  const int64_t sr = (int64_t)row - (int64_t)dy;
  s.src_row = (sr >= 0 && sr < h) ? (int32_t)sr : -1;
  s.c0 = (int32_t)gs_clamp64((int64_t)dx, 0, w);
  s.c1 = (int32_t)gs_clamp64((int64_t)w + (int64_t)dx, 0, w);
  if (s.c1 < s.c0) s.c1 = s.c0;
  s.s0 = (int32_t)((int64_t)s.c0 - (int64_t)dx);
  if (s.src_row < 0) s.c1 = s.c0;  // nothing valid in this row
  return s;
}

// Elements per thread: a 16-byte vector store when the width allows (then every row starts
// 16-byte aligned, given a 16-byte aligned tensor), else 1.
GS_HD int32_t gs_vec_width(int32_t elem_bytes, int32_t w) {
  const int32_t v = 16 / elem_bytes;
  return (w % v == 0) ? v : 1;
}

// 16 bytes as one store on the device.
template <typename T, int VEC>
GS_HD void gs_store(T* dst, const T (&vals)[VEC]) {
#if defined(__CUDA_ARCH__)
  if (VEC * sizeof(T) == 16) {
    uint4 u;
    memcpy(&u, vals, 16);
    *reinterpret_cast<uint4*>(dst) = u;
  } else
#endif
  {
    for (int i = 0; i < VEC; i++) dst[i] = vals[i];
  }
}

// One thread's work: output columns [col0, col0 + VEC) of one row. `src_plane` is the source
// channel's plane, `dst_row` the output row; col0 + VEC <= w (the caller checks col0 < w, and
// VEC divides w).
template <typename T, int VEC>
GS_HD void gs_thread(const T* __restrict__ src_plane, T* __restrict__ dst_row, const GsSpan& s, int32_t w,
                     int32_t col0, const GsAttr& a) {
  T vals[VEC];
  T border;
  gs_from_float(a.bias, &border);
  const T* src_row = src_plane + (s.src_row < 0 ? 0 : s.src_row) * w;
GS_UNROLL
  for (int i = 0; i < VEC; i++) {
    const int32_t col = col0 + i;
    if (col >= s.c0 && col < s.c1) {
      const T* p = src_row + (col - s.c0 + s.s0);
      if (a.identity) {
        vals[i] = *p;  // bit copy
      } else {
        gs_from_float(gs_affine(a.scale, gs_load(p), a.bias), &vals[i]);
      }
    } else {
      vals[i] = border;
    }
  }
  gs_store<T, VEC>(dst_row + col0, vals);
}

// What one CUDA thread does: thread column `col0` (a multiple of VEC) of the rows row0,
// row0 + row_step, ... of the planes plane0, plane0 + plane_step, ... (plane = n * C_g + g), the
// grid-stride loops of the kernel. Per plane the attributes are read once into registers; per
// row the span is computed once. Plane offsets are 64-bit, everything inside a plane 32-bit (the
// launcher checks H*W < 2^31).
template <typename T, int VEC>
GS_HD void gs_block(const T* __restrict__ x, T* __restrict__ y, const GsAttr* __restrict__ attrs, int32_t c_in,
                    int32_t c_g, int32_t h, int32_t w, int64_t planes, int64_t plane0, int64_t plane_step,
                    int32_t row0, int32_t row_step, int64_t col0) {
  if (col0 >= w) return;
  const int64_t hw = (int64_t)h * w;
  for (int64_t plane = plane0; plane < planes; plane += plane_step) {
    const int64_t n = plane / c_g;
    const GsAttr a = attrs[plane - n * c_g];
    const T* src_plane = x + (n * c_in + a.source) * hw;
    T* dst_plane = y + plane * hw;
    for (int32_t row = row0; row < h; row += row_step) {
      const GsSpan s = gs_row_span(row, h, w, a.dy, a.dx);
      gs_thread<T, VEC>(src_plane, dst_plane + row * w, s, w, (int32_t)col0, a);
    }
  }
}

}  // namespace ghostsr
