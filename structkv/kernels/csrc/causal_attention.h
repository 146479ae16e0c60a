// Causal grouped-query attention for prefill on CPU (fp32): the kernel behind the engine's
// ai.structkv::CausalAttention operator.
//
// Why it exists: ONNX Runtime's CPU attention kernels (GroupQueryAttention, Attention,
// MultiHeadAttention) compute every query row against every key and only then mask the upper
// triangle, so a causal prefill pays for twice the work it needs and writes an N x N score
// buffer per head. This kernel walks query blocks and stops each at its diagonal, keeps one
// block's scores in a per-thread buffer that stays in cache, and reads the KV heads of a group
// directly (no repeat_kv).
#pragma once

#include <cstdint>

namespace structkv {

// q: [B, H, N, D], k and v: [B, G, N, D], out: [B, H, N, D], all contiguous row-major fp32.
// H must be a multiple of G (query head h reads KV head h / (H / G)). Query i attends to keys
// 0..i of its own sequence. scale multiplies the scores before the softmax (1/sqrt(D) when
// the caller passes 0). threads <= 0 uses the CPUs this process may run on. bf16: both matrix
// products in bf16 with fp32 accumulation (twice the multiply-adds per instruction on CPUs with
// AVX512-BF16; inputs rounded to 8 significant bits); where the library was built without
// AVX512-BF16, or for a head dimension other than 32/64/128/256, it computes in fp32.
void causal_attention(const float* q, const float* k, const float* v, float* out, int64_t B,
                      int64_t H, int64_t G, int64_t N, int64_t D, float scale, int threads,
                      bool bf16 = false);

}  // namespace structkv
