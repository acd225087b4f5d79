// CUDA kernels of the batched Frozen Lake: one thread per env, calling the same __host__ __device__ functions as
// the CPU loop (frozen_lake.h). Launchers take raw pointers and a stream, so this file needs no torch headers:
// CI compiles it with nvcc alone (compile-only) so it cannot rot on machines without a GPU. Every launcher returns
// cudaGetLastError() right after its launch (a bad configuration or a missing sm_XX image shows there, at the
// launch, not at a later sync); the torch binding turns a failure into a c10::Error (C10_CUDA_CHECK).
#include <cuda_runtime.h>

#include "frozen_lake.h"

namespace icrl {
namespace {

constexpr int THREADS = 256;

inline unsigned blocks(int64_t n) { return static_cast<unsigned>((n + THREADS - 1) / THREADS); }

__global__ void step_kernel(Batch b, Dynamics d, const int64_t* actions, StepOut o) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < b.B) step_one(b, d, i, actions[i] & 3, o);
}

__global__ void reset_kernel(Batch b, const bool* mask, StepOut o) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= b.B || !mask[i]) return;
  o.obs[i] = reset_one(b, i);
  o.reward[i] = 0.0;
  o.terminated[i] = false;
  o.truncated[i] = false;
  o.final_obs[i] = -1;
}

__global__ void seed_kernel(uint64_t seed, const bool* mask, uint64_t* rng, int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n && mask[i]) rng[i] = stream_state(seed, static_cast<uint64_t>(i));
}

__global__ void emit_kernel(Format f, const int64_t* actions, StepOut o, const bool* first, int64_t pad,
                            int64_t* out, int64_t width, int64_t* counts, int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n)
    counts[i] = emit_row(f, first[i], actions[i] & 3, o.reward[i], o.terminated[i], o.truncated[i], o.obs[i],
                         out + i * width, width, pad);
}

}  // namespace

cudaError_t launch_step(const Batch& b, const Dynamics& d, const int64_t* actions, const StepOut& o,
                        cudaStream_t s) {
  if (b.B == 0) return cudaSuccess;
  step_kernel<<<blocks(b.B), THREADS, 0, s>>>(b, d, actions, o);
  return cudaGetLastError();
}

cudaError_t launch_reset(const Batch& b, const bool* mask, const StepOut& o, cudaStream_t s) {
  if (b.B == 0) return cudaSuccess;
  reset_kernel<<<blocks(b.B), THREADS, 0, s>>>(b, mask, o);
  return cudaGetLastError();
}

cudaError_t launch_seed(uint64_t seed, const bool* mask, uint64_t* rng, int64_t n, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  seed_kernel<<<blocks(n), THREADS, 0, s>>>(seed, mask, rng, n);
  return cudaGetLastError();
}

cudaError_t launch_emit(const Format& f, const int64_t* actions, const StepOut& o, const bool* first, int64_t pad,
                        int64_t* out, int64_t width, int64_t* counts, int64_t n, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  emit_kernel<<<blocks(n), THREADS, 0, s>>>(f, actions, o, first, pad, out, width, counts, n);
  return cudaGetLastError();
}

}  // namespace icrl
