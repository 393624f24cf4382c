// GhostShift CUDA kernels (ai.ghostsr::GhostShift, see shared/design/ghostshift-op.md), called
// from src/plugin/cuda.rs. Plain CUDA C with an extern "C" interface; every entry point returns
// a cudaError_t as int (0 = success) and never aborts.
//
// The per-element logic lives in ghost_shift_core.h (also compiled for the host and tested from
// Rust against the CPU kernel). Grid: x = column tiles (a warp-multiple of threads x VEC columns),
// y = row groups (blockDim.y rows per block), z = N*C_g planes (both grid-stride beyond the grid
// limits). Attributes: one 32-byte GsAttr record per ghost channel in device memory, uploaded per
// device on the compute stream.

#include <cuda_runtime.h>
#include <stdint.h>

#include "ghost_shift_core.h"

using ghostsr::GsAttr;
using ghostsr::half_bits;

namespace {

constexpr int kThreads = 256;

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    ghost_shift_kernel(const T* __restrict__ x, T* __restrict__ y, const GsAttr* __restrict__ attrs, int32_t c_in,
                       int32_t c_g, int32_t h, int32_t w, int64_t planes) {
  const int64_t col0 = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  const int32_t row0 = (int32_t)(blockIdx.y * blockDim.y + threadIdx.y);
  ghostsr::gs_block<T, VEC>(x, y, attrs, c_in, c_g, h, w, planes, blockIdx.z, gridDim.z, row0,
                            (int32_t)(gridDim.y * blockDim.y), col0);
}

template <typename T, int VEC>
cudaError_t launch_vec(const T* x, T* y, const GsAttr* attrs, int32_t c_in, int32_t c_g, int32_t h, int32_t w,
                       int64_t planes, cudaStream_t stream) {
  // A block is a warp-multiple wide strip of one row (SR rows of 320-640 pixels would leave most
  // of a 256-wide block idle), stacked over several rows to make 256 threads.
  const int64_t cols = (w + VEC - 1) / VEC;
  const int64_t bx = cols >= kThreads ? kThreads : (cols + 31) / 32 * 32;
  const int64_t by = kThreads / bx;
  const int64_t tiles = (cols + bx - 1) / bx;
  const int64_t row_blocks = (h + by - 1) / by;
  const unsigned rows = (unsigned)(row_blocks < 65535 ? row_blocks : 65535);
  const unsigned zs = (unsigned)(planes < 65535 ? planes : 65535);
  dim3 grid((unsigned)tiles, rows, zs);
  dim3 block((unsigned)bx, (unsigned)by);
  ghost_shift_kernel<T, VEC><<<grid, block, 0, stream>>>(x, y, attrs, c_in, c_g, h, w, planes);
  return cudaGetLastError();
}

template <typename T>
int launch(const T* x, T* y, const void* attrs, int64_t n, int64_t c_in, int64_t c_g, int64_t h, int64_t w,
           cudaStream_t stream) {
  if (stream == nullptr) return (int)cudaErrorInvalidResourceHandle;  // never the legacy stream
  const int64_t planes = n * c_g;
  if (planes <= 0 || h <= 0 || w <= 0) return 0;
  // 32-bit indices inside a plane and in the channel count.
  if (h * w >= ((int64_t)1 << 31) || c_in >= ((int64_t)1 << 31) || c_g >= ((int64_t)1 << 31))
    return (int)cudaErrorInvalidValue;
  const GsAttr* a = static_cast<const GsAttr*>(attrs);
  const int vec = ghostsr::gs_vec_width((int32_t)sizeof(T), (int32_t)w);
  cudaError_t e;
  if (vec == 16 / (int)sizeof(T)) {
    e = launch_vec<T, 16 / sizeof(T)>(x, y, a, (int32_t)c_in, (int32_t)c_g, (int32_t)h, (int32_t)w, planes, stream);
  } else {
    e = launch_vec<T, 1>(x, y, a, (int32_t)c_in, (int32_t)c_g, (int32_t)h, (int32_t)w, planes, stream);
  }
  return (int)e;
}

// Runs `f` with `device` current, restoring the caller's device (ONNX Runtime's thread may have
// another one current).
template <typename F>
int on_device(int device, F f) {
  int prev = -1;
  cudaError_t e = cudaGetDevice(&prev);
  if (e != cudaSuccess) return (int)e;
  if (prev != device && (e = cudaSetDevice(device)) != cudaSuccess) return (int)e;
  int r = f();
  if (prev != device) {
    cudaError_t e2 = cudaSetDevice(prev);
    if (r == 0) r = (int)e2;
  }
  return r;
}

}  // namespace

// The device that owns `ptr` (an ONNX Runtime tensor buffer).
extern "C" int ghostsr_cuda_device_of(const void* ptr, int* device) {
  cudaPointerAttributes attr;
  cudaError_t e = cudaPointerGetAttributes(&attr, ptr);
  if (e != cudaSuccess) return (int)e;
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) return (int)cudaErrorInvalidDevicePointer;
  *device = attr.device;
  return 0;
}

// Allocates `bytes` on `device` and copies `host` there on `stream`, then waits for that stream:
// the copy from pageable memory may otherwise still be in flight when a kernel on another
// stream reads the buffer. Done once per kernel instance and device.
extern "C" int ghostsr_cuda_upload(int device, const void* host, size_t bytes, void** dev, cudaStream_t stream) {
  *dev = nullptr;
  if (stream == nullptr) return (int)cudaErrorInvalidResourceHandle;
  return on_device(device, [&]() -> int {
    void* p = nullptr;
    cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) return (int)e;
    e = cudaMemcpyAsync(p, host, bytes, cudaMemcpyHostToDevice, stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
    if (e != cudaSuccess) {
      cudaFree(p);
      return (int)e;
    }
    *dev = p;
    return 0;
  });
}

extern "C" int ghostsr_cuda_free(int device, void* dev) {
  return on_device(device, [&]() -> int { return (int)cudaFree(dev); });
}

extern "C" const char* ghostsr_cuda_error_string(int code) { return cudaGetErrorString((cudaError_t)code); }

// Waits for `stream` and returns the first error of the work on it (the sync-and-check mode).
extern "C" int ghostsr_cuda_sync(cudaStream_t stream) {
  cudaError_t e = cudaStreamSynchronize(stream);
  if (e == cudaSuccess) e = cudaGetLastError();
  return (int)e;
}

extern "C" int ghostsr_ghost_shift_f32(int device, const float* x, float* y, const void* attrs, int64_t n,
                                       int64_t c_in, int64_t c_g, int64_t h, int64_t w, cudaStream_t stream) {
  return on_device(device, [&]() { return launch<float>(x, y, attrs, n, c_in, c_g, h, w, stream); });
}

extern "C" int ghostsr_ghost_shift_f16(int device, const void* x, void* y, const void* attrs, int64_t n,
                                       int64_t c_in, int64_t c_g, int64_t h, int64_t w, cudaStream_t stream) {
  return on_device(device, [&]() {
    return launch<half_bits>(static_cast<const half_bits*>(x), static_cast<half_bits*>(y), attrs, n, c_in, c_g, h, w,
                             stream);
  });
}
