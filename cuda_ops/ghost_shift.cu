// GhostShift CUDA kernels (ai.ghostsr::GhostShift, see shared/design/ghostshift-op.md), called
// from src/plugin/cuda.rs. Plain CUDA C with an extern "C" interface; every entry point returns
// a cudaError_t as int (0 = success) and never aborts.
//
// Attributes live in one device buffer, uploaded once per kernel instance:
//   int32 sources[C_g], int32 dy[C_g], int32 dx[C_g], float scales[C_g], float biases[C_g].
// One thread per output element (grid-stride loop over N*C_g*H*W); a pixel whose source is out of
// range reads 0 before the affine map, so it becomes biases[g]. The multiply and the add are
// rounded separately (__fmul_rn/__fadd_rn: no FMA contraction), like the CPU kernel.

#include <cuda_runtime.h>
#include <stdint.h>

namespace {

// float16 as raw bits, converted with the PTX instructions (exact widening; round to nearest
// even when narrowing). This avoids cuda_fp16.h, which needs the CCCL headers (nv/target).
struct half_bits {
  uint16_t bits;
};

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const half_bits* p) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p->bits));
  return f;
}
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(half_bits* p, float v) {
  uint16_t h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
  p->bits = h;
}

template <typename T>
__global__ void ghost_shift_kernel(const T* __restrict__ x, T* __restrict__ y, const int32_t* __restrict__ attrs,
                                   int64_t c_in, int64_t c_g, int64_t h, int64_t w, int64_t total) {
  const int32_t* sources = attrs;
  const int32_t* dys = attrs + c_g;
  const int32_t* dxs = attrs + 2 * c_g;
  const float* scales = reinterpret_cast<const float*>(attrs + 3 * c_g);
  const float* biases = scales + c_g;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t col = i % w;
    int64_t t = i / w;
    const int64_t row = t % h;
    t /= h;
    const int64_t g = t % c_g;
    const int64_t n = t / c_g;
    const int64_t sr = row - dys[g];
    const int64_t sc = col - dxs[g];
    float v = 0.0f;
    if (sr >= 0 && sr < h && sc >= 0 && sc < w) {
      v = load(x + ((n * c_in + sources[g]) * h + sr) * w + sc);
    }
    store(y + i, __fadd_rn(__fmul_rn(scales[g], v), biases[g]));
  }
}

template <typename T>
int launch(const T* x, T* y, const void* attrs, int64_t n, int64_t c_in, int64_t c_g, int64_t h, int64_t w,
           cudaStream_t stream) {
  const int64_t total = n * c_g * h * w;
  if (total <= 0) return 0;
  const int threads = 256;
  int64_t blocks = (total + threads - 1) / threads;
  if (blocks > 65536) blocks = 65536;  // grid-stride loop covers the rest
  ghost_shift_kernel<T><<<(unsigned)blocks, threads, 0, stream>>>(x, y, static_cast<const int32_t*>(attrs), c_in,
                                                                   c_g, h, w, total);
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" int ghostsr_cuda_upload(const void* host, size_t bytes, void** dev) {
  *dev = nullptr;
  cudaError_t e = cudaMalloc(dev, bytes);
  if (e != cudaSuccess) return (int)e;
  e = cudaMemcpy(*dev, host, bytes, cudaMemcpyHostToDevice);
  if (e != cudaSuccess) {
    cudaFree(*dev);
    *dev = nullptr;
  }
  return (int)e;
}

extern "C" int ghostsr_cuda_free(void* dev) { return (int)cudaFree(dev); }

extern "C" const char* ghostsr_cuda_error_string(int code) { return cudaGetErrorString((cudaError_t)code); }

extern "C" int ghostsr_ghost_shift_f32(const float* x, float* y, const void* attrs, int64_t n, int64_t c_in,
                                       int64_t c_g, int64_t h, int64_t w, cudaStream_t stream) {
  return launch<float>(x, y, attrs, n, c_in, c_g, h, w, stream);
}

extern "C" int ghostsr_ghost_shift_f16(const void* x, void* y, const void* attrs, int64_t n, int64_t c_in,
                                       int64_t c_g, int64_t h, int64_t w, cudaStream_t stream) {
  return launch<half_bits>(static_cast<const half_bits*>(x), static_cast<half_bits*>(y), attrs, n, c_in, c_g, h, w, stream);
}
