// StructKV structural compaction kernels (method.md §4); see compact.cu for the algorithm.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace structkv {

// Rows the compacted sequence has: min(k, n - window) + window.
int compact_output_rows(int n, int k, int window);

// Indices (ascending, int32) of the top-k max-pooled scores among the first n - window
// tokens, followed by the window's indices. Ties go to the lowest indices. One CUDA block.
cudaError_t launch_select(const float* scores, int n, int k, int window, int pool_kernel,
                          int32_t* out_idx, cudaStream_t stream);

// out_hidden[r] = hidden[idx[r]] (rows of `dim` floats); out_positions[r] = positions[idx[r]].
cudaError_t launch_gather(const float* hidden, const int64_t* positions, const int32_t* idx,
                          int rows, int dim, float* out_hidden, int64_t* out_positions,
                          cudaStream_t stream);

}  // namespace structkv
