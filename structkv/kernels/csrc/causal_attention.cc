// Causal grouped-query attention for prefill on CPU; see causal_attention.h for the why.
//
// Work is split into tasks of one (batch, query head, block of kBlock query rows). A task
// computes the block's scores against keys 0..end of block only (the causal triangle), as
// register tiles of kRows rows x two vectors of keys (8 x 32 with AVX-512, 4 x 16 with AVX2)
// over a copy of K transposed in panels, takes the softmax in that per-thread buffer, and
// multiplies by V in tiles of a few rows x the head dimension (or slices of it).
// Tasks run longest first on a few std::threads that pull from one atomic counter.
#include "causal_attention.h"

#include <sched.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <thread>
#include <type_traits>
#include <vector>

namespace structkv {
namespace {

// Tiles are sized to the register file: a score tile's accumulators (kRows x 2 vectors) and a
// value tile's (R x ND vectors) must stay in registers. AVX-512 has 32 registers of 16 floats;
// elsewhere (AVX2: 16 registers of 8 floats) 16-float vectors would be split in two by the
// compiler and the same tiles would need 32 registers: spilled, the kernel ran 7x slower than
// ONNX Runtime's own attention on an AVX2-only EPYC (docs/BENCHMARKS.md).
#ifdef __AVX512F__
#define STRUCTKV_VECTOR_BYTES 64
constexpr int64_t kRows = 8;     // rows of a score tile
#else
#define STRUCTKV_VECTOR_BYTES 32
constexpr int64_t kRows = 4;
#endif
constexpr int64_t kLanes = STRUCTKV_VECTOR_BYTES / 4;  // floats per vector
constexpr int64_t kCols = 2 * kLanes;                  // keys of a score tile (two vectors)
constexpr int64_t kBlock = 64;   // query rows per task
constexpr int64_t kKeys = 128;  // keys of V per L1-resident chunk

typedef float vec __attribute__((vector_size(STRUCTKV_VECTOR_BYTES)));
typedef float vecu __attribute__((vector_size(STRUCTKV_VECTOR_BYTES), aligned(4)));

inline vec load(const float* p) { return *reinterpret_cast<const vecu*>(p); }
inline void store(float* p, vec x) { *reinterpret_cast<vecu*>(p) = x; }
inline vec splat(float a) { return vec{} + a; }

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

int default_threads() {
  if (const char* env = std::getenv("STRUCTKV_ATTENTION_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// Run fn(task) for task in [0, count) on `threads` threads (the caller is one of them).
template <typename Fn>
void parallel_for(int64_t count, int threads, Fn fn) {
  std::atomic<int64_t> next{0};
  auto worker = [&](int tid) {
    for (int64_t t = next.fetch_add(1); t < count; t = next.fetch_add(1)) fn(t, tid);
  };
  int extra = static_cast<int>(std::min<int64_t>(threads, count)) - 1;
  std::vector<std::thread> pool;
  pool.reserve(std::max(extra, 0));
  for (int i = 0; i < extra; ++i) pool.emplace_back(worker, i + 1);
  worker(0);
  for (auto& th : pool) th.join();
}

// s[r][0..kCols) = scale * q[r] . kt[:, 0..kCols) for kRows rows; q rows have stride D, kt
// rows (one per head dimension) stride ldk, s rows stride lds.
inline void score_tile(const float* q, const float* kt, int64_t D, int64_t ldk, float* s,
                       int64_t lds, float scale) {
  vec acc[kRows][2] = {};
  for (int64_t d = 0; d < D; ++d) {
    const vec k0 = load(kt + d * ldk), k1 = load(kt + d * ldk + kLanes);
    for (int64_t r = 0; r < kRows; ++r) {
      const vec a = splat(q[r * D + d]);
      acc[r][0] += a * k0;
      acc[r][1] += a * k1;
    }
  }
  const vec sc = splat(scale);
  for (int64_t r = 0; r < kRows; ++r) {
    store(s + r * lds, acc[r][0] * sc);
    store(s + r * lds + kLanes, acc[r][1] * sc);
  }
}

// 2^f for |f| <= 1/2: its degree-6 Taylor polynomial's coefficients, highest degree first
// (Horner's rule), shared by the AVX-512 and AVX2 exp below.
constexpr int kExp2Terms = 7;
[[maybe_unused]] constexpr float kExp2[kExp2Terms] = {
    1.5403530393381609e-4f, 1.3333558146428443e-3f, 9.6181291076284772e-3f,
    5.5504108664821580e-2f, 2.4022650695910071e-1f, 6.9314718055994531e-1f, 1.0f};

#ifdef __AVX512F__
// exp on 16 lanes: 2^(x log2 e) = 2^n * 2^f with n = round(x log2 e), |f| <= 1/2, and 2^f from
// its degree-6 Taylor polynomial (relative error ~1.2e-7, at float precision). Why not
// std::exp: glibc's vector expf made the softmax the most expensive part of the kernel (and
// without AVX-512 GCC does not vectorise it at all: a scalar call per score).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));  // below that the result is 0 for our sums
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(kExp2[0]);
  for (int i = 1; i < kExp2Terms; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2[i]));
  return _mm512_scalef_ps(p, n);
}
#elif defined(__AVX2__) && defined(__FMA__)
// The same exp on 8 lanes; AVX2 has no scalef, so 2^n is built in the exponent bits (n >= -126
// after the clamp, so the result is a normal float).
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(kExp2[0]);
  for (int i = 1; i < kExp2Terms; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2[i]));
  const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  const __m256i e = _mm256_slli_epi32(biased, 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// row[0..len) <- exp(row - max(row[0..len))); returns their sum (the softmax denominator).
inline float softmax_numerator(float* row, int64_t len) {
#ifdef __AVX512F__
  const int64_t full = len / kLanes * kLanes;
  const __mmask16 tail = static_cast<__mmask16>((1u << (len - full)) - 1u);
  const __m512 lowest = _mm512_set1_ps(std::numeric_limits<float>::lowest());
  __m512 vm = lowest;
  for (int64_t j = 0; j < full; j += kLanes) vm = _mm512_max_ps(vm, _mm512_loadu_ps(row + j));
  vm = _mm512_max_ps(vm, _mm512_mask_loadu_ps(lowest, tail, row + full));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vm));
  __m512 vs = _mm512_setzero_ps();
  for (int64_t j = 0; j < full; j += kLanes) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(row + j), m));
    _mm512_storeu_ps(row + j, e);
    vs = _mm512_add_ps(vs, e);
  }
  if (tail) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, row + full), m));
    _mm512_mask_storeu_ps(row + full, tail, e);
    vs = _mm512_mask_add_ps(vs, tail, vs, e);
  }
  return _mm512_reduce_add_ps(vs);
#elif defined(__AVX2__) && defined(__FMA__)
  const int64_t full = len / kLanes * kLanes;
  float m = std::numeric_limits<float>::lowest();
  __m256 vm = _mm256_set1_ps(m);
  for (int64_t j = 0; j < full; j += kLanes) vm = _mm256_max_ps(vm, _mm256_loadu_ps(row + j));
  alignas(32) float lanes8[kLanes];
  _mm256_store_ps(lanes8, vm);
  for (int64_t i = 0; i < kLanes; ++i) m = std::max(m, lanes8[i]);
  for (int64_t j = full; j < len; ++j) m = std::max(m, row[j]);
  const __m256 mv = _mm256_set1_ps(m);
  __m256 vs = _mm256_setzero_ps();
  for (int64_t j = 0; j < full; j += kLanes) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), mv));
    _mm256_storeu_ps(row + j, e);
    vs = _mm256_add_ps(vs, e);
  }
  _mm256_store_ps(lanes8, vs);
  float sum = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) sum += lanes8[i];
  if (len > full) {  // the tail through the same exp (its unused lanes are not stored or summed)
    for (int64_t i = 0; i < kLanes; ++i) lanes8[i] = full + i < len ? row[full + i] : m;
    _mm256_store_ps(lanes8, exp8(_mm256_sub_ps(_mm256_load_ps(lanes8), mv)));
    for (int64_t j = full; j < len; ++j) {
      row[j] = lanes8[j - full];
      sum += row[j];
    }
  }
  return sum;
#else
  float m = std::numeric_limits<float>::lowest();
  for (int64_t j = 0; j < len; ++j) m = std::max(m, row[j]);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < len; ++j) {
    const float e = std::exp(row[j] - m);
    row[j] = e;
    sum += e;
  }
  return sum;
#endif
}

// ---- bf16 products (attribute bf16=1): the same tasks, with both matrix products as
// AVX512-BF16 dot products (vdpbf16ps: two bf16 products per fp32 lane, accumulated in fp32),
// so each instruction does twice the multiply-adds of an fp32 FMA. Scores, the softmax and the
// output stay fp32; Q, K, V and the softmax numerators are rounded to bf16 (8 significant
// bits), as in torch's bf16 SDPA. Layouts put the pair a dot product consumes side by side:
// K as [D/2, Np, 2] (two head dimensions of one key), V as [Np/2, D, 2] (one head dimension of
// two keys), a query row and a numerator row as plain bf16 rows read as 32-bit pairs.
typedef uint16_t bf16;

inline bf16 to_bf16(float x) {  // round to nearest even, as vcvtneps2bf16 does
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return static_cast<bf16>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Whether the bf16 path serves head dimension D here (elsewhere the kernel computes in fp32).
bool bf16_serves(int64_t D) {
#ifdef __AVX512BF16__
  return D == 32 || D == 64 || D == 128 || D == 256;
#else
  (void)D;
  return false;
#endif
}

#ifdef __AVX512BF16__
inline __m512 pair(const bf16* p) {  // two adjacent bf16 broadcast to 16 lanes
  uint32_t u;
  std::memcpy(&u, p, 4);
  return _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(u)));
}

inline __m512 dot(__m512 acc, __m512 a, __m512 b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

// s[r][0..32) = scale * q[r] . k[0..32) for kRows rows from bf16 q rows (stride D) and
// K in [D/2, ldk, 2] layout starting at this tile's first key.
inline void score_tile(const bf16* q, const bf16* kp, int64_t D, int64_t ldk, float* s,
                       int64_t lds, float scale) {
  __m512 acc[kRows][2];
  for (int64_t r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 2) {
    const bf16* krow = kp + d * ldk;  // (d/2) * ldk * 2
    const __m512 k0 = _mm512_loadu_ps(krow), k1 = _mm512_loadu_ps(krow + 2 * kLanes);
    for (int64_t r = 0; r < kRows; ++r) {
      const __m512 a = pair(q + r * D + d);
      acc[r][0] = dot(acc[r][0], a, k0);
      acc[r][1] = dot(acc[r][1], a, k1);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t r = 0; r < kRows; ++r) {
    _mm512_storeu_ps(s + r * lds, _mm512_mul_ps(acc[r][0], sc));
    _mm512_storeu_ps(s + r * lds + kLanes, _mm512_mul_ps(acc[r][1], sc));
  }
}

// row[0..n) (fp32, n a multiple of 32) -> bf16.
inline void row_to_bf16(const float* row, int64_t n, bf16* out) {
  for (int64_t j = 0; j < n; j += 2 * kLanes) {
    const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + j + kLanes), _mm512_loadu_ps(row + j));
    _mm512_storeu_si512(out + j, (__m512i)h);
  }
}

#else
inline void row_to_bf16(const float*, int64_t, bf16*) {}
#endif  // __AVX512BF16__

// One multiply-add step of a value tile: fp32 FMA, or (bf16) a pair of keys per lane.
template <typename T>
inline vec madd(vec acc, vec a, vec b) {
  if constexpr (std::is_same_v<T, float>) {
    return acc + a * b;
  } else {
#ifdef __AVX512BF16__
    return dot(acc, a, b);
#else
    return acc;  // unreachable: bf16_serves() is false without AVX512-BF16
#endif
  }
}

inline vec lanes(const float* p) { return splat(*p); }
#ifdef __AVX512BF16__
inline vec lanes(const bf16* p) { return pair(p); }  // an integer broadcast: bits unchanged
#else
inline vec lanes(const bf16*) { return vec{}; }  // unreachable without AVX512-BF16
#endif

// o[r][0..ND*kLanes) += sum_j p[r][j] * v[j] for R rows, j in [0, n); p rows stride ldp, V
// rows (keys) stride D. fp32: V rows of D floats; bf16: n even, V in [n/2, D, 2] layout (each
// vector holds kLanes dims x 2 keys). ``v`` points at the slice's first column.
template <int R, int ND, typename T>
inline void value_tile(const T* p, int64_t ldp, const T* v, int64_t D, int64_t n, float* o,
                       int64_t ldo) {
  constexpr int64_t step = std::is_same_v<T, float> ? 1 : 2;
  vec acc[R][ND];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < ND; ++c) acc[r][c] = load(o + r * ldo + c * kLanes);
  for (int64_t j = 0; j < n; j += step) {
    vec vr[ND];
    for (int c = 0; c < ND; ++c)
      vr[c] = load(reinterpret_cast<const float*>(v + j * D + c * step * kLanes));
    for (int r = 0; r < R; ++r) {
      const vec a = lanes(p + r * ldp + j);
      for (int c = 0; c < ND; ++c) acc[r][c] = madd<T>(acc[r][c], a, vr[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < ND; ++c) store(o + r * ldo + c * kLanes, acc[r][c]);
}

// o[0..kBlock) = p[:, 0..n) @ v (o: kBlock x D scratch; rows past the block's are garbage), in
// column slices of ND vectors (one slice when the tile holds the whole head dimension). Keys go
// in chunks of kKeys so each chunk of V stays in L1 while every row tile reads it.
// T: float, or bf16 (n even, V in pair layout; one V offset per key either way: j0 * D).
template <int R, int ND, typename T>
void values_blocked(const T* p, int64_t ldp, const T* v, int64_t n, int64_t D, int64_t rows,
                    float* o) {
  constexpr int64_t step = std::is_same_v<T, float> ? 1 : 2;
  constexpr int64_t width = ND * kLanes;
  const int64_t tiles = round_up(rows, R);
  std::fill(o, o + tiles * D, 0.0f);
  for (int64_t c0 = 0; c0 < D; c0 += width)
    for (int64_t j0 = 0; j0 < n; j0 += kKeys) {
      const int64_t nj = std::min(kKeys, n - j0);
      for (int64_t r = 0; r < tiles; r += R)
        value_tile<R, ND>(p + r * ldp + j0, ldp, v + j0 * D + c0 * step, D, nj, o + r * D + c0, D);
    }
}

// o[0..rows) = p[:, 0..n) @ v, dispatching on the head dimension; o has kBlock x D floats.
template <typename T>
void values(const T* p, int64_t ldp, const T* v, int64_t n, int64_t D, int64_t rows, float* o) {
  if (D == 32 || D == 64 || D == 128 || D == 256) {
    if constexpr (kLanes == 16) {  // AVX-512: the whole head dimension in one tile
      switch (D) {
        case 32: values_blocked<4, 2>(p, ldp, v, n, D, rows, o); return;
        case 64: values_blocked<4, 4>(p, ldp, v, n, D, rows, o); return;
        case 128: values_blocked<2, 8>(p, ldp, v, n, D, rows, o); return;
        default: values_blocked<1, 16>(p, ldp, v, n, D, rows, o); return;
      }
    } else {  // 8 lanes, 16 registers: 2 rows x 4 vectors (32 columns) per slice
      values_blocked<2, 4>(p, ldp, v, n, D, rows, o);
      return;
    }
  }
  if constexpr (std::is_same_v<T, float>) {  // bf16_serves() keeps other dimensions in fp32
    for (int64_t r = 0; r < rows; ++r) {
      float* orow = o + r * D;
      std::fill(orow, orow + D, 0.0f);
      for (int64_t j = 0; j < n; ++j) {
        const float a = p[r * ldp + j];
        for (int64_t c = 0; c < D; ++c) orow[c] += a * v[j * D + c];
      }
    }
  }
}

}  // namespace

void causal_attention(const float* q, const float* k, const float* v, float* out, int64_t B,
                      int64_t H, int64_t G, int64_t N, int64_t D, float scale, int threads,
                      bool bf16_products) {
  if (B <= 0 || H <= 0 || N <= 0 || D <= 0) return;
  if (scale == 0.0f) scale = 1.0f / std::sqrt(static_cast<float>(D));
  if (threads <= 0) threads = default_threads();
  const bool half = bf16_products && bf16_serves(D);
  const int64_t group = H / G;
  const int64_t Np = round_up(N, kCols);

  // fp32: K transposed per (batch, KV head) in panels of kCols keys, [Np/kCols, D, kCols], zero
  // beyond N: a score tile reads its panel front to back (rows of a plain [D, Np] transpose are
  // Np floats apart, 16 KB at 4K keys: every row in the same L1 set). V read in place.
  // bf16: K as [D/2, Np, 2], V as [Np/2, D, 2].
  const size_t kv = static_cast<size_t>(B * G * D * Np);
  std::vector<float> kt(half ? 0 : kv, 0.0f);
  std::vector<bf16> kp(half ? kv : 0, 0), vp(half ? kv : 0, 0);
  parallel_for(B * G, threads, [&](int64_t bg, int) {
    const float* ks = k + bg * N * D;
    const float* vs = v + bg * N * D;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t d = 0; d < D; ++d) {
        if (!half) {
          kt[bg * D * Np + (n / kCols) * D * kCols + d * kCols + n % kCols] = ks[n * D + d];
          continue;
        }
        kp[bg * D * Np + (d / 2) * Np * 2 + n * 2 + (d & 1)] = to_bf16(ks[n * D + d]);
        vp[bg * D * Np + (n / 2) * D * 2 + d * 2 + (n & 1)] = to_bf16(vs[n * D + d]);
      }
  });

  const int64_t blocks = (N + kBlock - 1) / kBlock;
  std::vector<std::vector<float>> scores(threads), qbuf(threads), obuf(threads);
  std::vector<std::vector<bf16>> qhalf(threads), phalf(threads);
  for (int t = 0; t < threads; ++t) {
    scores[t].resize(static_cast<size_t>(kBlock * Np));
    obuf[t].resize(static_cast<size_t>(kBlock * D));
    if (half) {
      qhalf[t].resize(static_cast<size_t>(kBlock * D));
      phalf[t].resize(static_cast<size_t>(kBlock * Np));
    } else {
      qbuf[t].resize(static_cast<size_t>(kBlock * D));
    }
  }
  // Longest tasks (last query blocks) first, so the tail of the schedule is short tasks.
  parallel_for(B * H * blocks, threads, [&](int64_t task, int tid) {
    const int64_t blk = blocks - 1 - task / (B * H);
    const int64_t bh = task % (B * H);
    const int64_t b = bh / H, h = bh % H, g = h / group;
    const int64_t r0 = blk * kBlock, rows = std::min(kBlock, N - r0);
    const int64_t end = r0 + rows;  // keys [0, end) are visible to some row of the block
    const int64_t cols = round_up(end, kCols);
    const int64_t tiles = round_up(rows, kRows);
    float* s = scores[tid].data();
    const float* qh = q + (bh * N + r0) * D;
    if (half) {
#ifdef __AVX512BF16__
      bf16* qb = qhalf[tid].data();
      for (int64_t i = 0; i < rows * D; ++i) qb[i] = to_bf16(qh[i]);
      std::fill(qb + rows * D, qb + kBlock * D, bf16{0});
      const bf16* kg = kp.data() + (b * G + g) * D * Np;
      for (int64_t c = 0; c < cols; c += kCols)
        for (int64_t r = 0; r < tiles; r += kRows)
          score_tile(qb + r * D, kg + c * 2, D, Np, s + r * Np + c, Np, scale);
#endif
    } else {
      float* qb = qbuf[tid].data();
      std::memcpy(qb, qh, sizeof(float) * rows * D);
      std::fill(qb + rows * D, qb + kBlock * D, 0.0f);
      const float* ktg = kt.data() + (b * G + g) * D * Np;
      for (int64_t c = 0; c < cols; c += kCols)
        for (int64_t r = 0; r < tiles; r += kRows)
          score_tile(qb + r * D, ktg + c * D, D, kCols, s + r * Np + c, Np, scale);
    }

    // bf16 pairs keys, so its products run to the tile edge (zeros past each row's length)
    const int64_t n = half ? cols : end;
    float inv[kBlock];
    for (int64_t r = 0; r < rows; ++r) {
      float* row = s + r * Np;
      const int64_t len = r0 + r + 1;  // query r0 + r sees keys 0..r0 + r
      inv[r] = 1.0f / softmax_numerator(row, len);
      std::fill(row + len, row + n, 0.0f);
      if (half) row_to_bf16(row, cols, phalf[tid].data() + r * Np);
    }
    float* ob = obuf[tid].data();
    if (half) {
#ifdef __AVX512BF16__
      values(phalf[tid].data(), Np, vp.data() + (b * G + g) * D * Np, n, D, rows, ob);
#endif
    } else {
      values(s, Np, v + (b * G + g) * N * D, n, D, rows, ob);
    }
    float* o = out + (bh * N + r0) * D;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < D; ++c) o[r * D + c] = ob[r * D + c] * inv[r];
  });
}

}  // namespace structkv

extern "C" void structkv_causal_attention(const float* q, const float* k, const float* v,
                                          float* out, int64_t B, int64_t H, int64_t G,
                                          int64_t N, int64_t D, float scale, int threads,
                                          int bf16) {
  structkv::causal_attention(q, k, v, out, B, H, G, N, D, scale, threads, bf16 != 0);
}

// Whether bf16=1 computes in bf16 here (the library was built for a CPU with AVX512-BF16).
extern "C" __attribute__((visibility("default"))) int structkv_attention_has_bf16() {
#ifdef __AVX512BF16__
  return 1;
#else
  return 0;
#endif
}
