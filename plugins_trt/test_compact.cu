// GPU check of the compaction kernels against a plain CPU reference (run by ctest on a GPU
// machine; it builds everywhere nvcc exists). Exit 0 = all cases equal, 1 = mismatch,
// 77 = no GPU (ctest reports it as skipped).
#include "compact.h"

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

static std::vector<int> reference(const std::vector<float>& s, int k, int window, int kernel) {
  const int n = (int)s.size(), cand = n - window, r = kernel / 2;
  std::vector<float> pooled(n);
  for (int j = 0; j < cand; ++j) {  // pooling reads the candidates only (window excluded)
    float m = s[std::max(0, j - r)];
    for (int i = std::max(0, j - r); i <= std::min(cand - 1, j + r); ++i) m = std::max(m, s[i]);
    pooled[j] = m;
  }
  std::vector<int> order(cand);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return pooled[a] > pooled[b]; });
  order.resize(std::min(k, cand));
  std::sort(order.begin(), order.end());
  for (int t = cand; t < n; ++t) order.push_back(t);
  return order;
}

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("SKIP: no CUDA device\n");
    return 77;
  }
  std::mt19937 rng(0);
  int failures = 0;
  const int cases[][4] = {{64, 12, 8, 1}, {4096, 820, 8, 7}, {10000, 2000, 32, 7}, {50, 100, 8, 1}};
  for (const auto& c : cases) {
    const int n = c[0], k = c[1], window = c[2], kernel = c[3], dim = 96;
    std::vector<float> scores(n), hidden((size_t)n * dim);
    std::uniform_real_distribution<float> u(0.f, 1.f);
    for (auto& x : scores) x = u(rng);
    for (auto& x : hidden) x = u(rng);
    std::vector<int64_t> pos(n);
    std::iota(pos.begin(), pos.end(), 0);
    const int rows = structkv::compact_output_rows(n, k, window);
    float *d_s, *d_h, *d_oh;
    int64_t *d_p, *d_op;
    int32_t* d_idx;
    cudaMalloc(&d_s, n * sizeof(float));
    cudaMalloc(&d_h, hidden.size() * sizeof(float));
    cudaMalloc(&d_p, n * sizeof(int64_t));
    cudaMalloc(&d_idx, rows * sizeof(int32_t));
    cudaMalloc(&d_oh, (size_t)rows * dim * sizeof(float));
    cudaMalloc(&d_op, rows * sizeof(int64_t));
    cudaMemcpy(d_s, scores.data(), n * sizeof(float), cudaMemcpyHostToDevice);
    cudaMemcpy(d_h, hidden.data(), hidden.size() * sizeof(float), cudaMemcpyHostToDevice);
    cudaMemcpy(d_p, pos.data(), n * sizeof(int64_t), cudaMemcpyHostToDevice);
    structkv::launch_select(d_s, n, k, window, kernel, d_idx, 0);
    structkv::launch_gather(d_h, d_p, d_idx, rows, dim, d_oh, d_op, 0);
    std::vector<int32_t> idx(rows);
    std::vector<float> out_h((size_t)rows * dim);
    cudaMemcpy(idx.data(), d_idx, rows * sizeof(int32_t), cudaMemcpyDeviceToHost);
    cudaMemcpy(out_h.data(), d_oh, out_h.size() * sizeof(float), cudaMemcpyDeviceToHost);
    const auto ref = reference(scores, k, window, kernel);
    bool ok = (int)ref.size() == rows && std::equal(ref.begin(), ref.end(), idx.begin());
    for (int r = 0; ok && r < rows; ++r)
      ok = std::equal(&out_h[(size_t)r * dim], &out_h[(size_t)r * dim] + dim,
                      &hidden[(size_t)ref[r] * dim]);
    std::printf("n=%d k=%d window=%d kernel=%d: %s\n", n, k, window, kernel, ok ? "ok" : "MISMATCH");
    failures += !ok;
    cudaFree(d_s); cudaFree(d_h); cudaFree(d_p); cudaFree(d_idx); cudaFree(d_oh); cudaFree(d_op);
  }
  return failures ? 1 : 0;
}
