// StructKV structural compaction on the GPU (method.md §4): top-k of the (pooled) centrality
// over the non-window tokens, plus the observation window, in ascending index order, then a
// gather of the hidden rows and original position ids. This is the subgraph that the ONNX
// `compact.onnx` expresses with TopK/Sort/Gather. No TensorRT plugin wraps these kernels yet
// (planned), and nothing here runs without a GPU.
//
// Why one block and a radix select instead of a sort: k is a large fraction of N (20%), the
// output must be in index order anyway, and a threshold + stable compaction gives exactly
// that order with no sort: four 8-bit histogram passes find the k-th largest key, then one
// prefix-sum pass writes the survivors in index order. Ties at the threshold go to the lowest
// indices, which makes the result deterministic.

#include "compact.h"

#include <cstdint>
#include <cuda_runtime.h>

namespace structkv {
namespace {

constexpr int kThreads = 1024;

// Order-preserving map from float to uint32 (larger float -> larger key; -0 == +0 handled).
__device__ __forceinline__ uint32_t float_key(float f) {
  uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Max pooling over the n - window candidates only, as the torch path (structkv.saliency.
// pool_scores) does: the window's scores never leak into the tokens just before it.
__device__ float pooled(const float* scores, int candidates, int j, int kernel) {
  const int r = kernel / 2;
  const int lo = j - r < 0 ? 0 : j - r;
  const int hi = j + r >= candidates ? candidates - 1 : j + r;
  float m = scores[lo];
  for (int i = lo + 1; i <= hi; ++i) m = fmaxf(m, scores[i]);
  return m;
}

// Block-wide exclusive scan of one int per thread; returns this thread's offset, sets *total.
__device__ int block_exclusive_scan(int value, int* shared, int* total) {
  const int tid = threadIdx.x;
  shared[tid] = value;
  __syncthreads();
  for (int offset = 1; offset < blockDim.x; offset <<= 1) {
    int add = tid >= offset ? shared[tid - offset] : 0;
    __syncthreads();
    shared[tid] += add;
    __syncthreads();
  }
  const int inclusive = shared[tid];
  *total = shared[blockDim.x - 1];
  __syncthreads();
  return inclusive - value;
}

// One block: select indices into out_idx[0 .. k_eff + window) in ascending order.
__global__ void select_kernel(const float* scores, int n, int k, int window, int pool_kernel,
                              int32_t* out_idx) {
  __shared__ uint32_t hist[256];
  __shared__ int scan[kThreads];
  __shared__ uint32_t prefix_s;
  __shared__ int remaining_s;
  __shared__ int base_s;
  __shared__ int ties_base_s;

  const int candidates = n - window;
  const int k_eff = k < candidates ? k : candidates;
  const int tid = threadIdx.x;

  // Radix select of the k_eff-th largest key, 8 bits at a time from the top.
  if (tid == 0) {
    prefix_s = 0;
    remaining_s = k_eff;
  }
  __syncthreads();
  for (int shift = 24; shift >= 0 && k_eff > 0; shift -= 8) {
    for (int b = tid; b < 256; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    const uint32_t mask_hi = shift == 24 ? 0u : (0xFFFFFFFFu << (shift + 8));
    for (int j = tid; j < candidates; j += blockDim.x) {
      uint32_t key = float_key(pooled(scores, candidates, j, pool_kernel));
      if ((key & mask_hi) == (prefix_s & mask_hi)) atomicAdd(&hist[(key >> shift) & 0xFF], 1u);
    }
    __syncthreads();
    if (tid == 0) {
      int remaining = remaining_s;
      for (int b = 255; b >= 0; --b) {
        if ((int)hist[b] >= remaining) {
          prefix_s |= (uint32_t)b << shift;
          break;
        }
        remaining -= hist[b];
      }
      remaining_s = remaining;
    }
    __syncthreads();
  }
  // prefix_s is now the threshold key; remaining_s ties at the threshold are taken
  // (lowest indices first); everything strictly above it is taken.
  const uint32_t threshold = prefix_s;
  const int ties_wanted = k_eff > 0 ? remaining_s : 0;
  if (tid == 0) {
    base_s = 0;
    ties_base_s = 0;
  }
  __syncthreads();
  for (int start = 0; start < candidates; start += blockDim.x) {
    const int j = start + tid;
    bool above = false, tie = false;
    if (j < candidates && k_eff > 0) {
      const uint32_t key = float_key(pooled(scores, candidates, j, pool_kernel));
      above = key > threshold;
      tie = key == threshold;
    }
    int tie_total;
    const int tie_rank = ties_base_s + block_exclusive_scan(tie ? 1 : 0, scan, &tie_total);
    const bool keep = above || (tie && tie_rank < ties_wanted);
    int kept_total;
    const int offset = block_exclusive_scan(keep ? 1 : 0, scan, &kept_total);
    if (keep) out_idx[base_s + offset] = j;
    __syncthreads();
    if (tid == 0) {
      base_s += kept_total;
      ties_base_s += tie_total;
    }
    __syncthreads();
  }
  for (int t = tid; t < window; t += blockDim.x) out_idx[k_eff + t] = candidates + t;
}

__global__ void gather_kernel(const float* hidden, const int64_t* positions, const int32_t* idx,
                              int rows, int dim, float* out_hidden, int64_t* out_positions) {
  const int row = blockIdx.x;
  if (row >= rows) return;
  const int src = idx[row];
  for (int d = threadIdx.x; d < dim; d += blockDim.x)
    out_hidden[(size_t)row * dim + d] = hidden[(size_t)src * dim + d];
  if (threadIdx.x == 0) out_positions[row] = positions[src];
}

}  // namespace

int compact_output_rows(int n, int k, int window) {
  const int candidates = n - window;
  return (k < candidates ? k : candidates) + window;
}

cudaError_t launch_select(const float* scores, int n, int k, int window, int pool_kernel,
                          int32_t* out_idx, cudaStream_t stream) {
  if (n <= window || window < 0 || k < 0 || pool_kernel < 1 || pool_kernel % 2 == 0)
    return cudaErrorInvalidValue;
  select_kernel<<<1, kThreads, 0, stream>>>(scores, n, k, window, pool_kernel, out_idx);
  return cudaGetLastError();
}

cudaError_t launch_gather(const float* hidden, const int64_t* positions, const int32_t* idx,
                          int rows, int dim, float* out_hidden, int64_t* out_positions,
                          cudaStream_t stream) {
  if (rows <= 0 || dim <= 0) return cudaErrorInvalidValue;
  gather_kernel<<<rows, 256, 0, stream>>>(hidden, positions, idx, rows, dim, out_hidden,
                                          out_positions);
  return cudaGetLastError();
}

}  // namespace structkv
