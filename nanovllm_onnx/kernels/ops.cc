// nano-vllm-onnx's own ONNX Runtime CPU ops (domain "nanovllm"): SlotAttention, then SwiGLU,
// SkipRMSNorm, BlockLinear and BlockGather.
//
// SlotAttention: causal grouped-query attention over per-sequence KV-cache slots, updated in
// place. ONNX Runtime's
// GroupQueryAttention reads each KV head once per query head with a one-row GEMM and runs at
// about half the machine's memory bandwidth on a batch of decodes; here the query heads that
// share a KV head go through the cache together and each key tile is read once.
//
// Inputs: 0 qkv [T, (H + 2 KVH) * D] packed tokens, row after row (q, k, v of each token)
//         1 past_key [B, KVH, C / 16, D, 16] keys in tiles of 16 positions, dimension-major
//         2 past_value [B, KVH, C, D] (both float, or both float16: half the memory traffic;
//           or both int8, a quarter: see the int8 layout below)
//         3 past_lens [B] int32: tokens already in each row's cache
//         4 query_lens [B] int32: new tokens of each row (0: idle row, untouched)
//         5 cos [max_positions, D / 2], 6 sin: rotary tables (rotate-half)
//         7 prompt_rows [T] uint8, optional: each token's role (BlockLinear's input 2); on
//           AMX a row of prompt tokens (head size a multiple of 32) runs on the bf16 tiles
// Outputs: 0 attn [T, H * D]; 1 present_key, 2 present_value: the caches with the new rotated
// keys and values at positions past_len .. past_len + query_len - 1. Bind them to the same
// buffers as the past inputs (IOBinding) and the update is in place; otherwise the past is
// copied first. Attributes: num_heads, kv_num_heads, scale.
// An int8 cache holds each position's key (and value) as symmetric codes, round(x * 127 /
// max |x|), and its float scale max |x| / 127, whose 4 bytes follow the D codes as if they
// were 4 more dimensions (little-endian, byte j at dimension D + j): the caches are
// [B, KVH, C / 16, D + 4, 16] and [B, KVH, C, D + 4], a position's bytes where the float
// caches have its floats, so that the engine copies a position as it copies a float one.
// Scores are the codes' dot products times the key's scale, and a value weighs by its scale
// times the softmax's weight (prompt rows on AMX's bf16 tiles take codes times scales, rounded
// as a float cache's keys and values are): some 0.04% of perplexity (SmolLM2-135M,
// benchmarks/rounding_quality.py), where fp8's 3 or 2 mantissa bits cost 2% or 9%.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

// The avx512_amx build's bf16 tiles (TDPBF16PS), which take prompt tokens: BlockLinear's
// bf16 path and SlotAttention's prompt rows.
#if defined(__AMX_INT8__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define AMX_BF16
#endif
// A token row's role (the graph's prompt_rows input, kernels/__init__.py's roles): 1 a prompt
// token, 2 a generated token of an engine that does not promise batch invariance, 0 another.
constexpr uint8_t kPromptRole = 1, kEitherRole = 2;

constexpr int kTile = 16;      // key positions per tile (one 512-bit vector of floats)
constexpr int kQueryBlock = 8;  // query tokens of one row that a task handles together
#ifdef AMX_BF16
constexpr bool kAmxPrompts = true;  // prompt rows' attention on the bf16 tiles
#else
constexpr bool kAmxPrompts = false;
#endif
constexpr int kPromptBlock = 32;  // a prompt row's query tokens a task takes there

// A tile's 16 floats (fp32 or fp16 caches are loaded as floats), and acc + x * v, fused where
// the CPU has FMA. Written `acc += x * v`, -ffast-math leaves GCC free to contract and
// reassociate a chain of them differently in each instantiation: the AVX2 build's attention
// gave a query other floats when a short prompt's queries were split into more tasks
// (batch-dependent outputs). The intrinsics are kept as written; the portable build (no FMA)
// is compiled without reassociation or contraction instead (setup.py).
#ifdef __AVX512F__
typedef float vec __attribute__((vector_size(64), aligned(4)));

inline vec load(const float* p) { return (vec)_mm512_loadu_ps(p); }
inline vec load(const _Float16* p) {  // (GCC scalarizes the generic conversion)
  return (vec)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline vec load(const int8_t* p) {
  return (vec)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
      reinterpret_cast<const __m128i*>(p))));
}
// The 16 float scales of an int8 key tile's positions from its 4 byte rows (D .. D + 3).
inline vec load_scales(const int8_t* rows) {
  __m512i bits = _mm512_setzero_si512();
  for (int j = 0; j < 4; ++j)
    bits = _mm512_or_si512(bits, _mm512_slli_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                                                       reinterpret_cast<const __m128i*>(
                                                           rows + j * kTile))),
                                                   8 * j));
  return (vec)_mm512_castsi512_ps(bits);
}
inline void store(float* p, vec v) { _mm512_storeu_ps(p, (__m512)v); }
inline void store(_Float16* p, vec v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline vec fmadd(float x, vec v, vec acc) {
  return (vec)_mm512_fmadd_ps(_mm512_set1_ps(x), (__m512)v, (__m512)acc);
}
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
// AVX2: two registers. As a 64-byte generic vector GCC moved every multiply-add's result
// through the stack and general registers: attention 4-5x slower (attn_bench).
struct vec {
  __m256 lo, hi;
};
inline vec operator*(vec v, float s) {
  return {_mm256_mul_ps(v.lo, _mm256_set1_ps(s)), _mm256_mul_ps(v.hi, _mm256_set1_ps(s))};
}
inline vec operator*(vec a, vec b) {
  return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)};
}
inline vec load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline vec load(const _Float16* p) {
  const auto* h = reinterpret_cast<const __m128i*>(p);
  return {_mm256_cvtph_ps(_mm_loadu_si128(h)), _mm256_cvtph_ps(_mm_loadu_si128(h + 1))};
}
inline vec load(const int8_t* p) {
  auto eight = [](const int8_t* at) {
    return _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(at))));
  };
  return {eight(p), eight(p + 8)};
}
inline void store(float* p, vec v) {
  _mm256_storeu_ps(p, v.lo);
  _mm256_storeu_ps(p + 8, v.hi);
}
inline void store(_Float16* p, vec v) {
  auto* h = reinterpret_cast<__m128i*>(p);
  _mm_storeu_si128(h, _mm256_cvtps_ph(v.lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  _mm_storeu_si128(h + 1, _mm256_cvtps_ph(v.hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline vec fmadd(float x, vec v, vec acc) {
  const __m256 b = _mm256_set1_ps(x);
  return {_mm256_fmadd_ps(b, v.lo, acc.lo), _mm256_fmadd_ps(b, v.hi, acc.hi)};
}
#else
typedef float vec __attribute__((vector_size(64), aligned(4)));
typedef _Float16 half_vec __attribute__((vector_size(32), aligned(2)));

inline vec load(const float* p) { vec v; std::memcpy(&v, p, sizeof v); return v; }
inline vec load(const _Float16* p) {
  half_vec h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, vec);
}
inline vec load(const int8_t* p) {
  vec v;
  for (int i = 0; i < kTile; ++i) v[i] = p[i];
  return v;
}
inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }
inline void store(_Float16* p, vec v) {
  for (int i = 0; i < kTile; ++i) p[i] = _Float16(v[i]);
}
inline vec fmadd(float x, vec v, vec acc) { return acc + x * v; }
#endif

#ifndef __AVX512F__
inline vec load_scales(const int8_t* rows) {  // (see the AVX-512 one)
  float scales[kTile];
  for (int i = 0; i < kTile; ++i) {
    const uint32_t bits = uint32_t(uint8_t(rows[i])) | uint32_t(uint8_t(rows[kTile + i])) << 8 |
                          uint32_t(uint8_t(rows[2 * kTile + i])) << 16 |
                          uint32_t(uint8_t(rows[3 * kTile + i])) << 24;
    std::memcpy(&scales[i], &bits, 4);
  }
  return load(scales);
}
#endif

// A cache type's elements per position beyond its D: an int8 position's scale (see the top).
template <typename T>
constexpr int kScaleBytes = std::is_same_v<T, int8_t> ? 4 : 0;

// The float scale of an int8 value row (its bytes after the D codes).
inline float value_scale(const int8_t* row, int64_t D) {
  float scale;
  std::memcpy(&scale, row + D, 4);
  return scale;
}

// int8 caches: a position's scale (-ffast-math computes peak / 127 by the reciprocal anyway:
// written so, every build computes the same) and the inverse its codes are rounded by.
inline float position_scale(float peak) { return peak * (1.f / 127.f); }
inline float code_factor(float peak) { return peak > 0.f ? 127.f / peak : 0.f; }
inline void put_scale(float scale, int8_t* at, int64_t step) {  // its bytes at at[j * step]
  uint8_t bytes[4];
  std::memcpy(bytes, &scale, 4);
  for (int j = 0; j < 4; ++j) at[j * step] = int8_t(bytes[j]);
}

// A value's D floats into an int8 cache row: its codes, then its scale's bytes.
inline void quantize_value(const float* x, int64_t D, int8_t* row) {
  float peak = 0.f;
  for (int64_t d = 0; d < D; ++d) peak = std::max(peak, std::fabs(x[d]));
  const float inv = code_factor(peak);
  for (int64_t d = 0; d < D; ++d) row[d] = int8_t(std::nearbyint(x[d] * inv));
  put_scale(position_scale(peak), row + D, 1);
}

// Columns [first, last] of a float key tile [D][16] into an int8 key tile [D + 4][16]: each
// column's codes and scale as quantize_value's.
inline void quantize_keys(const float* tile, int64_t D, int64_t first, int64_t last,
                          int8_t* out) {
  float peak[kTile] = {}, inv[kTile];
  for (int64_t d = 0; d < D; ++d)
    for (int64_t c = first; c <= last; ++c)
      peak[c] = std::max(peak[c], std::fabs(tile[d * kTile + c]));
  for (int64_t c = first; c <= last; ++c) inv[c] = code_factor(peak[c]);
  for (int64_t d = 0; d < D; ++d)
    for (int64_t c = first; c <= last; ++c)
      out[d * kTile + c] = int8_t(std::nearbyint(tile[d * kTile + c] * inv[c]));
  for (int64_t c = first; c <= last; ++c)
    put_scale(position_scale(peak[c]), out + D * kTile + c, kTile);
}

// Runs f, turning an exception into the status ONNX Runtime expects (none may cross the C API).
template <typename F>
OrtStatusPtr guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const Ort::Exception& e) {
    return Ort::Status(e).release();
  } catch (const std::exception& e) {
    return Ort::Status(e.what(), ORT_FAIL).release();
  }
}

// What every op here shares: ONNX Runtime's CPU provider, and a Kernel made from the node's
// attributes by its constructor (an invalid attribute: a status, not an exception).
template <typename Op, typename Kernel>
struct CpuOp : Ort::CustomOpBase<Op, Kernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info,
                              void** kernel) const {
    return guarded([&] { *kernel = new Kernel(api, info); });
  }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
};

// An op of Inputs float inputs and Outputs float outputs.
template <typename Op, typename Kernel, size_t Inputs, size_t Outputs>
struct FloatOp : CpuOp<Op, Kernel> {
  size_t GetInputTypeCount() const { return Inputs; }
  ONNXTensorElementDataType GetInputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return Outputs; }
  ONNXTensorElementDataType GetOutputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
};

// x[i], x[i + D/2] rotated by the angle of `pos` (cos/sin rows of D/2), written to out, scaled.
void rotate(const float* x, const float* cos, const float* sin, int half, float scale,
            float* out) {
  for (int i = 0; i < half; ++i) {
    out[i] = (x[i] * cos[i] - x[i + half] * sin[i]) * scale;
    out[i + half] = (x[i + half] * cos[i] + x[i] * sin[i]) * scale;
  }
}

struct Shape {
  int64_t heads, kv_heads, head_dim, rows, capacity, tokens, max_positions;
};

// One task: query tokens [first, last) of row `row`, every query head of KV head `kv_head`;
// where they are all of the row's new tokens, it appends their keys and values first.
struct Task {
  int64_t row, kv_head, first, last;
  bool appends;
  bool prompt;  // its tokens are prompt tokens on the bf16 tiles (amx_prompt_attention)
};

struct Step {
  Shape s;
  float scale;
  const float* qkv;
  const float* cos;
  const float* sin;
  void* keys;    // present_key (float or _Float16)
  void* values;  // present_value
  float* out;
  const int32_t* past_lens;
  std::vector<int64_t> offsets;  // first packed token of each row
  std::vector<Task> tasks;
  std::vector<Task> appends;  // (row, KV head) of the rows split into several tasks
};

// scores[n][t * 16 + i] = q[n] . key(t * 16 + i) for tiles [0, tiles), NR query vectors, TW
// tiles at a time: each accumulator is a chain of D dependent FMAs, so a few query vectors
// (a decode's 3 of a KV head) score several tiles together to keep 8 or more chains in
// flight. Every score is the same chain of FMAs whatever NR and TW.
// With `values`, each step also prefetches the keys kAhead tiles on and the values of its own
// tiles (weighed next): a decode reads its keys and values once, from memory, in tasks of
// some tens of KB, where the hardware prefetcher lags (a batched decode reached ~9 GB/s of
// ~30 without). The first chunk of a task's query vectors does; the others find them cached.
constexpr int kAhead = 2;  // 4 KB on of fp16 keys: more is no faster

template <int NR, int TW, int DC, bool kPrefetch, typename T>
void score_tiles(const float* q, const T* tiles, int64_t num_tiles, float* scores,
                 int64_t stride, const T* values) {
  constexpr int D = DC * kTile, kRow = D + kScaleBytes<T>, kTileSize = kRow * kTile;
  constexpr int kLines = TW * kTileSize * sizeof(T) / 64;  // of TW tiles' keys (or values)
  int64_t t = 0;
  for (; t + TW <= num_tiles; t += TW) {
    const T* tile = tiles + t * kTileSize;
    const char* keys_ahead = reinterpret_cast<const char*>(
        tiles + std::min(t + kAhead, num_tiles - TW) * kTileSize);
    const char* tile_values = reinterpret_cast<const char*>(values + t * kTile * kRow);
    vec acc[NR][TW] = {};
    for (int d = 0; d < D; ++d) {
      for (int i = d * kLines / D; i < (d + 1) * kLines / D && kPrefetch; ++i) {
        __builtin_prefetch(keys_ahead + i * 64);
        __builtin_prefetch(tile_values + i * 64, 0, 2);  // to the L2: the keys pass the L1
      }
      vec k[TW];
      for (int w = 0; w < TW; ++w) k[w] = load(tile + w * kTileSize + d * kTile);
      for (int n = 0; n < NR; ++n)
        for (int w = 0; w < TW; ++w) acc[n][w] = fmadd(q[n * D + d], k[w], acc[n][w]);
    }
    if constexpr (kScaleBytes<T> > 0)
      for (int w = 0; w < TW; ++w) {
        const vec scale = load_scales(tile + w * kTileSize + D * kTile);
        for (int n = 0; n < NR; ++n) acc[n][w] = acc[n][w] * scale;
      }
    for (int n = 0; n < NR; ++n)
      for (int w = 0; w < TW; ++w) store(scores + n * stride + (t + w) * kTile, acc[n][w]);
  }
  if constexpr (TW > 1)
    if (t < num_tiles)
      score_tiles<NR, 1, DC, kPrefetch>(q, tiles + t * kTileSize, num_tiles - t,
                                        scores + t * kTile, stride, values + t * kTile * kRow);
}

// out[n] = scale[n] * sum_l p[n][l] * value(l) for l < len, NR query vectors (D = DC * 16).
// Its steps also prefetch `ahead_lines` cache lines from `ahead` into the L2, spread evenly.
template <int NR, int DC, typename T>
void weigh_values(const float* p, int64_t stride, const float* scale, const T* values,
                  int64_t len, float* out, const char* ahead, int64_t ahead_lines) {
  constexpr int D = DC * kTile, kRow = D + kScaleBytes<T>;
  vec acc[NR][DC] = {};
  const int64_t per_step = (ahead_lines + len - 1) / len;
  for (int64_t l = 0; l < len; ++l) {
    for (int64_t i = l * per_step; i < std::min((l + 1) * per_step, ahead_lines); ++i)
      __builtin_prefetch(ahead + i * 64, 0, 2);
    vec v[DC];
    for (int c = 0; c < DC; ++c) v[c] = load(values + l * kRow + c * kTile);
    float value_weight = 1.f;  // an int8 value's scale
    if constexpr (kScaleBytes<T> > 0) value_weight = value_scale(values + l * kRow, D);
    for (int n = 0; n < NR; ++n) {
      float w = p[n * stride + l];
      if constexpr (kScaleBytes<T> > 0) w *= value_weight;
      for (int c = 0; c < DC; ++c) acc[n][c] = fmadd(w, v[c], acc[n][c]);
    }
  }
  for (int n = 0; n < NR; ++n)
    for (int c = 0; c < DC; ++c) store(out + n * D + c * kTile, acc[n][c] * scale[n]);
}

// Calls kernel<NR>(offset) for query vectors [offset, offset + NR) in chunks of at most
// `widest` (at most 8), so that a chunk's accumulators stay in registers. The chunks are of
// even size (21 at most 5: 5, 4, 4, 4, 4, not 5, 5, 5, 5, 1): a chunk of one or two vectors
// waits on its few accumulators' FMA latency at every step.
template <template <int> class Kernel, typename... Args>
void in_chunks(int n, int widest, Args... args) {
  widest = std::min(widest, 8);
  const int chunks = (n + widest - 1) / widest;
  for (int offset = 0, c = 0; offset < n; ++c) {
    const int nr = (n - offset + chunks - c - 1) / (chunks - c);
    switch (nr) {
      case 1: Kernel<1>::run(offset, args...); break;
      case 2: Kernel<2>::run(offset, args...); break;
      case 3: Kernel<3>::run(offset, args...); break;
      case 4: Kernel<4>::run(offset, args...); break;
      case 5: Kernel<5>::run(offset, args...); break;
      case 6: Kernel<6>::run(offset, args...); break;
      case 7: Kernel<7>::run(offset, args...); break;
      default: Kernel<8>::run(offset, args...); break;
    }
    offset += nr;
  }
}

// Register blocking. AVX-512 (32 registers of 16 floats): 5-8 query vectors score 2 tiles
// at a time (16 chains: 8 chains of 4-cycle FMAs on 2 ports, beside the key conversions, left
// the FMA ports idle half of a prompt), and a weighing chunk holds NR * DC accumulators and DC
// value vectors in 28 registers. AVX2 (16 of 8 floats: a vec takes two) scores at most 6
// query vectors, one tile at a time where more than 2 (more spilled to the stack on every FMA:
// a batched decode 1.8x faster so; its weighing still spills).
#ifdef __AVX512F__
constexpr bool kWideTiles = true;
constexpr int kScored = 8, kWeighRegisters = 28;
#else
constexpr bool kWideTiles = false;
constexpr int kScored = 6, kWeighRegisters = 24;
#endif

template <int DC, typename T>
struct Scorer {
  template <int NR>
  struct Kernel {
    static void run(int offset, const float* q, const T* tiles, int64_t num_tiles,
                    float* scores, int64_t stride, const T* values) {
      constexpr int TW = kWideTiles ? (NR == 1 ? 8 : NR == 2 ? 4 : 2)
                                    : (NR == 1 ? 3 : NR == 2 ? 2 : 1);
      if (offset == 0)
        score_tiles<NR, TW, DC, true>(q, tiles, num_tiles, scores, stride, values);
      else
        score_tiles<NR, TW, DC, false>(q + offset * DC * kTile, tiles, num_tiles,
                                       scores + offset * stride, stride, values);
    }
  };
};

template <int DC, typename T>
struct Weigher {
  template <int NR>
  struct Kernel {
    static void run(int offset, const float* p, int64_t stride, const float* scale,
                    const T* values, int64_t len, float* out, const char* ahead,
                    int64_t ahead_lines) {
      weigh_values<NR, DC>(p + offset * stride, stride, scale + offset, values, len,
                           out + offset * DC * kTile, ahead, offset == 0 ? ahead_lines : 0);
    }
  };
};

#ifdef __AVX512F__
// e^x for softmax's shifted scores (x <= 0): x = n ln 2 + r with |r| <= ln 2 / 2 (ln 2 in two
// parts), e^r by Cephes' expf polynomial, times 2^n (VSCALEFPS). Within 2 ulp of e^x; inline,
// where glibc's vector expf is a call per 16 scores (the softmax took ~1/5 of a 7-token call).
inline __m512 exp_ps(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}
#endif

// Softmax's numerators: row[0, len) = e^(row - its max), row[len, end) = 0 (the row has room up
// to a multiple of 16 past len); returns 1 / their sum, which scales the weighed values (one
// multiply per output rather than per key). Its floats depend only on the row's values and
// len: a query's weights are the same in a decode and in a verification of several tokens.
inline float softmax_numerators(float* row, int64_t len, int64_t end) {
#ifdef __AVX512F__
  const int64_t full = len / kTile * kTile;
  const __mmask16 tail = static_cast<__mmask16>((1u << (len - full)) - 1);
  __m512 peak = _mm512_set1_ps(row[0]);
  for (int64_t l = 0; l < full; l += kTile) peak = _mm512_max_ps(peak, _mm512_loadu_ps(row + l));
  peak = _mm512_mask_max_ps(peak, tail, peak, _mm512_maskz_loadu_ps(tail, row + full));
  const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(peak));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t l = 0; l < full; l += kTile) {
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(row + l), shift));
    _mm512_storeu_ps(row + l, e);
    sum = _mm512_add_ps(sum, e);
  }
  int64_t l = full;
  if (tail) {
    const __m512 e = _mm512_maskz_mov_ps(
        tail, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, row + full), shift)));
    _mm512_storeu_ps(row + full, e);
    sum = _mm512_add_ps(sum, e);
    l += kTile;
  }
  for (; l < end; ++l) row[l] = 0.f;
  return 1.f / _mm512_reduce_add_ps(sum);
#else
  float peak = row[0];  // (built with -ffast-math: no infinities)
  for (int64_t l = 1; l < len; ++l) peak = std::max(peak, row[l]);
  float sum = 0.f;
  for (int64_t l = 0; l < len; ++l) {
    row[l] = std::exp(row[l] - peak);
    sum += row[l];
  }
  for (int64_t l = len; l < end; ++l) row[l] = 0.f;
  return 1.f / sum;
#endif
}

// Rotated keys and values of row b's new tokens into KV head g's caches. The keys gather in a
// float tile first, written out a row of 16 positions at a time where the tile fills (a
// prompt's), else position by position (a decode's one key).
template <typename T>
void append(const Step& st, int64_t b, int64_t g) {
  const Shape& s = st.s;
  const int64_t D = s.head_dim, half = D / 2, row = D + kScaleBytes<T>;
  const int64_t width = (s.heads + 2 * s.kv_heads) * D;
  const int64_t slot = b * s.kv_heads + g;
  const int64_t past = st.past_lens[b], len = st.offsets[b + 1] - st.offsets[b];
  T* keys = static_cast<T*>(st.keys) + slot * s.capacity * row;
  T* values = static_cast<T*>(st.values) + slot * s.capacity * row;
  float k[128], tile[128 * kTile];
  for (int64_t j = 0; j < len; ++j) {
    const float* tok = st.qkv + (st.offsets[b] + j) * width;
    const int64_t pos = past + j, column = pos % kTile;
    rotate(tok + (s.heads + g) * D, st.cos + pos * half, st.sin + pos * half, half, 1.f, k);
    for (int64_t d = 0; d < D; ++d) tile[d * kTile + column] = k[d];
    if (column == kTile - 1 || j == len - 1) {  // the tile's new columns [first, column]
      const int64_t first = pos - column < past ? past % kTile : 0;
      T* dst = keys + (pos / kTile) * row * kTile;
      if constexpr (kScaleBytes<T> > 0)
        quantize_keys(tile, D, first, column, dst);
      else
        for (int64_t d = 0; d < D; ++d)
          if (first == 0 && column == kTile - 1)
            store(dst + d * kTile, load(tile + d * kTile));
          else
            for (int64_t c = first; c <= column; ++c) dst[d * kTile + c] = T(tile[d * kTile + c]);
    }
    const float* v = tok + (s.heads + s.kv_heads + g) * D;
    if constexpr (kScaleBytes<T> > 0)
      quantize_value(v, D, values + pos * row);
    else
      for (int64_t d = 0; d < D; d += kTile) store(values + pos * D + d, load(v + d));
  }
}

#ifdef AMX_BF16
template <int DC, typename T>
void amx_prompt_attention(const float* q, int64_t num_q, int64_t group, int64_t first_len,
                          const T* key_tiles, const T* values, int64_t keys, float* out);
#endif

// next_keys, next_lines: what to prefetch while weighing the values (see run_tasks).
template <int DC, typename T>
void run_task(const Step& st, const Task& task, const char* next_keys, int64_t next_lines) {
  constexpr int D = DC * kTile;
  const Shape& s = st.s;
  const int64_t group = s.heads / s.kv_heads;
  const int64_t past = st.past_lens[task.row];
  const int64_t width = (s.heads + 2 * s.kv_heads) * D;
  const int64_t num_q = (task.last - task.first) * group;
  const int64_t keys = past + task.last;  // the block's last query sees keys [0, keys)
  const int64_t num_tiles = (keys + kTile - 1) / kTile;
  const int64_t stride = num_tiles * kTile;

  if (task.appends) append<T>(st, task.row, task.kv_head);
  thread_local std::vector<float> q, scores, inverse_sums, out;
  q.resize(num_q * D);
  // (the bf16 tiles write whole tiles of 16 query vectors)
  out.resize((task.prompt ? (num_q + kTile - 1) / kTile * kTile : num_q) * D);
  // Query vectors, token-major: n = (token - first) * group + head within the group.
  for (int64_t j = task.first; j < task.last; ++j) {
    const float* tok = st.qkv + (st.offsets[task.row] + j) * width;
    const int64_t pos = past + j;
    for (int64_t h = 0; h < group; ++h) {
      const int64_t head = task.kv_head * group + h;
      rotate(tok + head * D, st.cos + pos * (D / 2), st.sin + pos * (D / 2), D / 2, st.scale,
             &q[((j - task.first) * group + h) * D]);
    }
  }
  const int64_t slot = task.row * s.kv_heads + task.kv_head;
  const int64_t slot_size = s.capacity * (D + kScaleBytes<T>);
  const T* key_tiles = static_cast<const T*>(st.keys) + slot * slot_size;
  const T* values = static_cast<const T*>(st.values) + slot * slot_size;
  bool done = false;
#ifdef AMX_BF16
  if constexpr (DC % 2 == 0) {  // (a tile product takes 32 of D)
    if (task.prompt) {
      amx_prompt_attention<DC, T>(q.data(), num_q, group, past + task.first + 1, key_tiles,
                                  values, keys, out.data());
      done = true;
    }
  }
#endif
  if (!done) {
    scores.resize(num_q * stride);
    inverse_sums.resize(num_q);
    // All of a KV head's query vectors at once where they fit (kScored), so that
    // the keys and values are read once.
    in_chunks<Scorer<DC, T>::template Kernel>(static_cast<int>(num_q), kScored, q.data(),
                                              key_tiles, num_tiles, scores.data(), stride,
                                              values);
    // Softmax of each query over the keys it sees (causal: up to its own position).
    for (int64_t n = 0; n < num_q; ++n)
      inverse_sums[n] =
          softmax_numerators(&scores[n * stride], past + task.first + n / group + 1, keys);
    in_chunks<Weigher<DC, T>::template Kernel>(
        static_cast<int>(num_q), std::max(1, kWeighRegisters / DC - 1), scores.data(), stride,
        inverse_sums.data(), values, keys, out.data(), next_keys, next_lines);
  }
  for (int64_t j = task.first; j < task.last; ++j) {
    float* dst = st.out + (st.offsets[task.row] + j) * s.heads * D + task.kv_head * group * D;
    std::memcpy(dst, &out[(j - task.first) * group * D], group * D * sizeof(float));
  }
}

template <int DC, typename T>
void run_tasks(void* data, size_t i) {
  const Step& st = *static_cast<const Step*>(data);
  // The next task's keys (most likely this thread's next task, else found in this core's
  // cache by the other's) go to the L2 while this one weighs its values, which come from the
  // L2 (prefetched while scoring) and left the memory idle. A core's misses queue for its
  // fill buffers, each held for the memory's latency (perf: the samples sit on the prefetches
  // and the tiles' first loads): busy through the weighing too, a batched decode ran 1.07-1.09x
  // (attn_bench decode32), where the next task's first tiles fetched at this one's start were
  // evicted again before use.
  const char* next_keys = nullptr;
  int64_t next_lines = 0;
  const Task& task = st.tasks[i];
  if (i + 1 < st.tasks.size() && (st.tasks[i + 1].row != task.row ||
                                  st.tasks[i + 1].kv_head != task.kv_head)) {
    const Task& next = st.tasks[i + 1];  // (the blocks of one prompt share their keys)
    const int64_t row = DC * kTile + kScaleBytes<T>;
    const int64_t slot = next.row * st.s.kv_heads + next.kv_head;
    next_keys = reinterpret_cast<const char*>(static_cast<const T*>(st.keys) +
                                              slot * st.s.capacity * row);
    const int64_t tiles = (st.past_lens[next.row] + next.last + kTile - 1) / kTile;
    next_lines = tiles * row * kTile * int64_t(sizeof(T)) / 64;
  }
  run_task<DC, T>(st, task, next_keys, next_lines);
}

// The appends of the rows that several tasks share, before any of them runs: task i's.
template <typename T>
void run_appends(void* data, size_t i) {
  const Step& st = *static_cast<const Step*>(data);
  append<T>(st, st.appends[i].row, st.appends[i].kv_head);
}

template <typename T>
void (*task_runner(int64_t head_dim))(void*, size_t) {
  switch (head_dim) {
    case 16: return run_tasks<1, T>;
    case 32: return run_tasks<2, T>;
    case 64: return run_tasks<4, T>;
    case 128: return run_tasks<8, T>;
    default: return nullptr;
  }
}

struct SlotAttentionKernel {
  int64_t heads, kv_heads;
  float scale;

  SlotAttentionKernel(const OrtApi&, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    heads = ki.GetAttribute<int64_t>("num_heads");
    kv_heads = ki.GetAttribute<int64_t>("kv_num_heads");
    scale = ki.GetAttribute<float>("scale");
  }

  static void check(bool ok, const std::string& what) {
    if (!ok) ORT_CXX_API_THROW("SlotAttention: " + what, ORT_INVALID_ARGUMENT);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] { Compute(Ort::KernelContext(context)); });
  }

  // One task per KV head of each row and block of at most kQueryBlock of its query tokens.
  // Where that leaves fewer tasks than twice the threads (the engine's pool: one per CPU),
  // the blocks are split further, into blocks of even size: a speculative verification (7
  // tokens) on a model with 3 KV heads would be 3 compute-bound tasks on 2 threads, one
  // thread idle a third of the call; 6 tasks of 4 and 3 tokens even them out (each block
  // reads the keys again, cheap next to scoring them). A decode's single token is one block.
  // (The CPU count is read once: glibc reads it from /sys, some microseconds, every call.)
  // A row's leading prompt tokens (roles, where given) take the bf16 tiles on AMX, in blocks
  // of kPromptBlock tokens: each task rounds the keys and values it reads to bf16 tiles, for
  // all its queries. Its generated tokens (recomputed after a preemption) keep the float
  // path, as every token's path follows its own role.
  static void add_tasks(Step& st, const int32_t* query, const uint8_t* roles) {
    const Shape& s = st.s;
    std::vector<int64_t> prompts(s.rows, 0);  // each row's leading prompt tokens on the tiles
    if (kAmxPrompts && s.head_dim % 32 == 0 && roles != nullptr)
      for (int64_t b = 0; b < s.rows; ++b)
        while (prompts[b] < query[b] && roles[st.offsets[b] + prompts[b]] == kPromptRole)
          ++prompts[b];
    auto blocks_of = [](int64_t n, int64_t block) { return (n + block - 1) / block; };
    int64_t tasks = 0;
    for (int64_t b = 0; b < s.rows; ++b)
      tasks += s.kv_heads * (blocks_of(prompts[b], kPromptBlock) +
                             blocks_of(query[b] - prompts[b], kQueryBlock));
    static const int64_t wanted = 2 * std::max(1u, std::thread::hardware_concurrency());
    const int64_t split = tasks == 0 ? 1 : (wanted + tasks - 1) / tasks;
    for (int64_t b = 0; b < s.rows; ++b) {
      const int64_t n = query[b], p = prompts[b];
      // tokens [0, p) in `tiled` blocks, [p, n) in `plain` ones; block i of m over [lo, hi):
      // tokens [lo + (hi - lo) i / m, lo + (hi - lo) (i + 1) / m)
      const int64_t tiled = std::min(p, blocks_of(p, kPromptBlock) * split);
      const int64_t plain = std::min(n - p, blocks_of(n - p, kQueryBlock) * split);
      const bool alone = tiled + plain == 1;
      for (int64_t g = 0; g < s.kv_heads; ++g) {
        for (int64_t i = 0; i < tiled; ++i)
          st.tasks.push_back({b, g, p * i / tiled, p * (i + 1) / tiled, alone, true});
        for (int64_t i = 0; i < plain; ++i)
          st.tasks.push_back({b, g, p + (n - p) * i / plain, p + (n - p) * (i + 1) / plain,
                              alone, false});
        if (tiled + plain > 1) st.appends.push_back({b, g, 0, n, true, false});
      }
    }
  }

  void Compute(Ort::KernelContext ctx) {
    auto qkv = ctx.GetInput(0), past_key = ctx.GetInput(1), past_value = ctx.GetInput(2);
    auto past_lens = ctx.GetInput(3), query_lens = ctx.GetInput(4);
    auto cos = ctx.GetInput(5), sin = ctx.GetInput(6);
    const auto qkv_shape = qkv.GetTensorTypeAndShapeInfo().GetShape();
    const auto key_info = past_key.GetTensorTypeAndShapeInfo();
    const auto key_shape = key_info.GetShape();
    const auto value_shape = past_value.GetTensorTypeAndShapeInfo().GetShape();
    const auto cache_type = key_info.GetElementType();
    const bool half = cache_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    const bool int8 = cache_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
    check(past_value.GetTensorTypeAndShapeInfo().GetElementType() == cache_type &&
              (half || int8 || cache_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT),
          "the caches must both be float, both float16 or both int8");
    const int64_t scale_bytes = int8 ? kScaleBytes<int8_t> : 0;
    const auto cos_shape = cos.GetTensorTypeAndShapeInfo().GetShape();
    check(value_shape.size() == 4 && key_shape.size() == 5, "cache ranks");
    Step st;
    Shape& s = st.s;
    s = {heads, kv_heads, value_shape[3] - scale_bytes, value_shape[0], value_shape[2],
         qkv_shape[0], cos_shape[0]};
    check(key_shape == std::vector<int64_t>{s.rows, s.kv_heads, s.capacity / kTile,
                                            value_shape[3], kTile} && s.capacity % kTile == 0,
          "past_key must be [B, kv_heads, capacity / 16, head_dim, 16] beside past_value "
          "[B, kv_heads, capacity, head_dim] (int8: head_dim + 4 for the scales)");
    check(value_shape[1] == kv_heads && heads % kv_heads == 0, "num_heads / kv_num_heads");
    check(qkv_shape.size() == 2 && qkv_shape[1] == (heads + 2 * kv_heads) * s.head_dim,
          "qkv must be [tokens, (num_heads + 2 kv_num_heads) * head_dim]");
    check(cos_shape.size() == 2 && cos_shape[1] * 2 == s.head_dim, "cos/sin [positions, D/2]");
    check(past_lens.GetTensorTypeAndShapeInfo().GetElementCount() == size_t(s.rows) &&
              query_lens.GetTensorTypeAndShapeInfo().GetElementCount() == size_t(s.rows),
          "past_lens and query_lens need one entry per cache row");

    const int32_t* past = past_lens.GetTensorData<int32_t>();
    const int32_t* query = query_lens.GetTensorData<int32_t>();
    st.offsets.assign(1, 0);
    for (int64_t b = 0; b < s.rows; ++b) {
      const int64_t end = int64_t(past[b]) + query[b];
      check(past[b] >= 0 && query[b] >= 0, "negative length");
      check(end <= s.capacity && end <= s.max_positions,
            "row " + std::to_string(b) + " reaches position " + std::to_string(end) +
                " beyond the cache capacity or rotary table");
      st.offsets.push_back(st.offsets.back() + query[b]);
    }
    check(st.offsets.back() == s.tokens, "query_lens must add up to the qkv tokens");

    auto out = ctx.GetOutput(0, {s.tokens, heads * s.head_dim});
    auto present_key = ctx.GetOutput(1, key_shape);
    auto present_value = ctx.GetOutput(2, value_shape);
    void* keys = present_key.GetTensorMutableRawData();
    void* values = present_value.GetTensorMutableRawData();
    // Not bound in place (a plain run): start from a copy of the past.
    const size_t cache_bytes =
        size_t(s.rows * s.kv_heads * s.capacity * value_shape[3]) * (half ? 2 : int8 ? 1 : 4);
    if (keys != past_key.GetTensorRawData())
      std::memcpy(keys, past_key.GetTensorRawData(), cache_bytes);
    if (values != past_value.GetTensorRawData())
      std::memcpy(values, past_value.GetTensorRawData(), cache_bytes);

    st.scale = scale;
    st.qkv = qkv.GetTensorData<float>();
    st.cos = cos.GetTensorData<float>();
    st.sin = sin.GetTensorData<float>();
    st.keys = keys;
    st.values = values;
    st.out = out.GetTensorMutableData<float>();
    st.past_lens = past;
    auto fn = half   ? task_runner<_Float16>(s.head_dim)
              : int8 ? task_runner<int8_t>(s.head_dim)
                     : task_runner<float>(s.head_dim);
    check(fn != nullptr, "head_dim must be 16, 32, 64 or 128");  // (append's buffers: 128)
    auto roles = ctx.GetInputCount() > 7 ? ctx.GetInput(7) : Ort::ConstValue{nullptr};
    check(roles == nullptr ||
              roles.GetTensorTypeAndShapeInfo().GetElementCount() == size_t(s.tokens),
          "prompt_rows needs one entry per token of qkv");
    add_tasks(st, query, roles == nullptr ? nullptr : roles.GetTensorData<uint8_t>());
    if (st.tasks.empty()) return;
    if (!st.appends.empty())
      ctx.ParallelFor(half   ? run_appends<_Float16>
                      : int8 ? run_appends<int8_t>
                             : run_appends<float>,
                      st.appends.size(), 0, &st);
    ctx.ParallelFor(fn, st.tasks.size(), 0, &st);
  }
};

// One registration per cache type (same name: ONNX Runtime picks by the bound types).
template <ONNXTensorElementDataType kCache>
struct SlotAttentionOp : CpuOp<SlotAttentionOp<kCache>, SlotAttentionKernel> {
  const char* GetName() const { return "SlotAttention"; }
  size_t GetInputTypeCount() const { return 8; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    if (i == 1 || i == 2) return kCache;
    if (i == 7) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    return (i == 3 || i == 4) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32
                              : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 7 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : kCache;
  }
};

// act[i] = silu(gate[i]) * up[i], for SwiGLU and for BlockLinear's fused input (swiglu).
// Never inlined: both must compute the same floats, and a copy inlined elsewhere could be
// vectorized differently (another exp).
__attribute__((noinline)) void silu_times(const float* gate, const float* up, float* act,
                                          int64_t n) {
  for (int64_t i = 0; i < n; ++i) act[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

// SwiGLU: act = silu(gate) * up of gate_up [T, 2I] (gate first). With a second output, each
// row of act is divided by its max |act| (at least 1e-30), returned as scale [T, 1]: the
// int8 GEMM that follows then sees one activation scale per token. One node where the
// standard ops take eight (Split, Sigmoid, 2 Mul, Abs, ReduceMax, Max, Div).
struct SwiGLUKernel {
  SwiGLUKernel(const OrtApi&, const OrtKernelInfo*) {}

  struct Rows {
    const float* gate_up;
    float* act;
    float* scale;  // null: no per-row scaling
    int64_t width;
  };

  static void row(void* data, size_t r) {
    const Rows& rows = *static_cast<const Rows*>(data);
    const int64_t n = rows.width;
    const float* gate = rows.gate_up + r * 2 * n;
    const float* up = gate + n;
    float* act = rows.act + r * n;
    // Scalar std::exp: the vector exp_ps (2 ulp) gained nothing here (the op is memory-bound:
    // 1,024 rows 1.00x, the 135M decode no faster) and changed the floats, hence the tokens.
    silu_times(gate, up, act, n);
    if (rows.scale == nullptr) return;
    float peak = 0.f;
    for (int64_t i = 0; i < n; ++i) peak = std::max(peak, std::fabs(act[i]));
    peak = std::max(peak, 1e-30f);
    rows.scale[r] = peak;
    const float inv = 1.f / peak;
    for (int64_t i = 0; i < n; ++i) act[i] *= inv;
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] {
      Ort::KernelContext ctx(context);
      auto input = ctx.GetInput(0);
      const auto shape = input.GetTensorTypeAndShapeInfo().GetShape();
      if (shape.size() != 2 || shape[1] % 2)
        ORT_CXX_API_THROW("SwiGLU: gate_up must be [tokens, 2 * width]", ORT_INVALID_ARGUMENT);
      const int64_t tokens = shape[0], width = shape[1] / 2;
      Rows rows{input.GetTensorData<float>(),
                ctx.GetOutput(0, {tokens, width}).GetTensorMutableData<float>(), nullptr, width};
      if (ctx.GetOutputCount() > 1)
        rows.scale = ctx.GetOutput(1, {tokens, 1}).GetTensorMutableData<float>();
      ctx.ParallelFor(row, tokens, 0, &rows);
    });
  }
};

struct SwiGLUOp : FloatOp<SwiGLUOp, SwiGLUKernel, 1, 2> {
  const char* GetName() const { return "SwiGLU"; }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const {
    return i == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
};

// SkipRMSNorm: sum = x + residual and y = sum / sqrt(mean(sum^2) + epsilon) * gamma, row by
// row (x, residual [T, H], gamma [H]; outputs y, sum). ONNX Runtime's
// SkipSimplifiedLayerNormalization does the same, but sums the squares one float at a time (no
// reassociation) and divides every element: 3.5% of a 1B model's 128-token prefill, 1.1% here
// (-ffast-math vectorizes both loops; the portable build keeps the serial sum). A row's floats
// depend on its own values only, whatever shares the call.
struct SkipRMSNormKernel {
  float epsilon;

  SkipRMSNormKernel(const OrtApi&, const OrtKernelInfo* info)
      : epsilon(Ort::ConstKernelInfo(info).GetAttribute<float>("epsilon")) {}

  struct Rows {
    const float *x, *residual, *gamma;
    float *y, *sum;
    int64_t width;
    float epsilon;
  };

  static void row(void* data, size_t r) {
    const Rows& rows = *static_cast<const Rows*>(data);
    const int64_t n = rows.width, at = static_cast<int64_t>(r) * n;
    const float *x = rows.x + at, *residual = rows.residual + at;
    float *sum = rows.sum + at, *y = rows.y + at;
    float squares = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      sum[i] = x[i] + residual[i];
      squares += sum[i] * sum[i];
    }
    const float inv = 1.f / std::sqrt(squares / static_cast<float>(n) + rows.epsilon);
    for (int64_t i = 0; i < n; ++i) y[i] = sum[i] * inv * rows.gamma[i];
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] {
      Ort::KernelContext ctx(context);
      auto x = ctx.GetInput(0), residual = ctx.GetInput(1), gamma = ctx.GetInput(2);
      const auto shape = x.GetTensorTypeAndShapeInfo().GetShape();
      if (shape.size() != 2 || residual.GetTensorTypeAndShapeInfo().GetShape() != shape ||
          gamma.GetTensorTypeAndShapeInfo().GetShape() != std::vector<int64_t>{shape[1]})
        ORT_CXX_API_THROW("SkipRMSNorm: x and residual must be [tokens, H], gamma [H]",
                          ORT_INVALID_ARGUMENT);
      float* y = ctx.GetOutput(0, shape).GetTensorMutableData<float>();
      float* sum = ctx.GetOutput(1, shape).GetTensorMutableData<float>();
      Rows rows{x.GetTensorData<float>(), residual.GetTensorData<float>(),
                gamma.GetTensorData<float>(), y, sum, shape[1], epsilon};
      ctx.ParallelFor(row, shape[0], 0, &rows);
    });
  }
};

struct SkipRMSNormOp : FloatOp<SkipRMSNormOp, SkipRMSNormKernel, 3, 2> {
  const char* GetName() const { return "SkipRMSNorm"; }
};

// BlockLinear: y [T, N] = x [T, K] @ W.T for 4- or 8-bit weights in blocks of 32 or 128 inputs
// with a float scale and minimum each, w = q * scale + min: GGUF's Q4_1 as it is (Q4_0, Q8_0 and
// other symmetric blocks are the case min = -2^(bits-1) scale). ONNX Runtime's MatMulNBits
// only takes integer zero points at speed, so Q4_1 cost two more nodes per projection there;
// here the minimum is one more FMA per block. x is quantized to int8 per block too (like
// MatMulNBits' accuracy level 4, llama.cpp's Q8_1) and each block's dot products run as
// u8 x s8 VNNI: a 4-bit decode of blocks of 32 streams 5 bits per weight, the least a format
// with two fp16 per block of 32 can. Blocks of 128 (what the converter makes of a float
// checkpoint's 8-bit weights) take one epilogue (the int32 sums to floats, scaled, the
// minimum's term) per 128 inputs rather than per 32, and AMX tile products of 64 inputs
// rather than 32: a served-like wave's 32-row decode steps of a 1B model 1.2x faster (the
// prompt steps, on the bf16 tiles, alike; benchmarks/README.md).
//
// weights: uint8 [ceil(N / 16), ceil(K / block), record], one record per 16 output rows x
// `block` inputs: its parts of 32 inputs (block / 32 of them) one after another, each the
// values as 8 vectors of 16 rows x 4 inputs (VPDPBUSD's layout: byte r * 4 + c of vector v is
// row r's input 4v + c of the part); 8 bits: vector v is bytes 64v..64v+63 (a part is 512
// bytes), 4 bits: vectors 2p and 2p + 1 are the low and high nibbles of bytes 64p..64p+63 (256
// bytes); then 16 fp16 scales and 16 fp16 minimums. Attributes: K, N, bits, block (32 if
// absent, or 128).
// Optional input 2, prompt_rows (uint8 [tokens]), each row's path in the AMX build (other
// builds ignore it): 0 the int8 path, 1 (a prompt token) bf16 (see AMX_BF16), 2 (a
// generated token of an engine that does not promise batch invariance) whichever is faster
// for the call (bf16_either). Attribute swiglu = 1: x is gate_up [T, 2K] (SwiGLU's input) and
// the op multiplies silu(gate) * up, made a row at a time as the row is quantized or rounded
// to bf16: a down projection without the T x K floats of SwiGLU's output written and read
// back (~5% of a 1B prompt step of 1,024 tokens went to SwiGLU).
constexpr int kRows = 16;   // output rows of one record
constexpr int kPart = 32;   // inputs of one record part (and K of a bf16 tile)
constexpr int kWidePart = 4;  // parts of a block of 128

constexpr int64_t part_bytes(int64_t bits) { return kRows * kPart * bits / 8; }
// A record's values: where its scales and minimums begin.
constexpr int64_t value_bytes(int64_t bits, int64_t parts) { return parts * part_bytes(bits); }
constexpr int64_t record_bytes(int64_t bits, int64_t parts) {
  return value_bytes(bits, parts) + 4 * kRows;
}

// Row x of BlockLinear's input as the K values it multiplies: x itself, or where swiglu (x is
// [gate, up], 2K wide) silu(gate) * up, in the calling thread's buffer (until its next call).
inline const float* input_row(const float* x, int64_t k, bool swiglu) {
  if (!swiglu) return x;
  thread_local std::vector<float> act;
  act.resize(k);
  silu_times(x, x + k, act.data(), k);
  return act.data();
}

// The code of row r's input i (0 .. 32 parts - 1) in a record, and the row's scale and minimum.
inline int record_code(const uint8_t* rec, int64_t bits, int r, int i) {
  rec += i / kPart * part_bytes(bits);
  i %= kPart;
  const int v = i / 4, c = i % 4;
  if (bits == 8) return rec[v * 64 + r * 4 + c];
  return (rec[(v / 2) * 64 + r * 4 + c] >> (4 * (v % 2))) & 0x0F;
}
// index 0..15: the rows' scales, 16..31: their minimums.
inline float record_half(const uint8_t* rec, int64_t bits, int64_t parts, int index) {
  _Float16 h;
  std::memcpy(&h, rec + value_bytes(bits, parts) + 2 * index, 2);
  return float(h);
}

#ifdef __AMX_INT8__
// The call's whole 16-token tiles in the layout of the AMX tiles (amx_layout): per tile and
// block, its A tiles (16 tokens x the block's int8 in one run: 32 inputs, one tile, in 512 bytes
// where a strided one reads 16 lines; 128, two tiles of 64 read at a stride of 128)
// and its tokens' xscale and xsum (16 floats each: the epilogue's broadcasts off one address
// register rather than 32).
struct AmxRows {
  int8_t* a;      // [tiles][blocks][16][block]
  float* xscale;  // [tiles][blocks][16]
  float* xsum;    // [tiles][blocks][16]
};
#endif

struct BlockStep {
  const uint8_t* weights;
  const int8_t* xq;      // [T, blocks * block] activations as int8
  const float* xscale;   // [T, blocks]: x ~ xq * xscale
  const float* xsum;     // [T, blocks]: sum of the block's x (as quantized)
  float* y;
  int64_t tokens, n, blocks;
  const int64_t* runs;  // the call's tasks: runs of record groups (plan_runs)
  std::atomic<uint64_t>* threads;  // the threads that ran them (thread_bit)
  bool spread = false;  // the later tiles prefetch the next group (spreads_next_group)
#ifdef __AMX_INT8__
  AmxRows amx;  // where AMX takes the call's tiles (tokens >= kAmxFrom)
#endif
};

// One token row of x to int8 blocks of Block inputs (zero past K).
template <int Block>
void quantize_row(const float* x, int64_t k, int64_t blocks, int8_t* q, float* scale,
                  float* sum) {
  for (int64_t b = 0; b < blocks; ++b) {
    float v[Block] = {};
    const int64_t n = std::min<int64_t>(Block, k - b * Block);
    std::memcpy(v, x + b * Block, n * sizeof(float));
    float peak = 0.f;
    for (int i = 0; i < Block; ++i) peak = std::max(peak, std::fabs(v[i]));
    const float s = peak / 127.f, inv = peak > 0.f ? 127.f / peak : 0.f;
    int total = 0;
    for (int i = 0; i < Block; ++i) {
      const int r = static_cast<int>(std::nearbyint(v[i] * inv));
      q[b * Block + i] = static_cast<int8_t>(r);
      total += r;
    }
    scale[b] = s;
    sum[b] = s * total;
  }
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
#define BLOCK_LINEAR_SIMD
// The vector operations of a tile. AVX-512: one vector holds a record vector's 16 rows.
struct Isa {
  using F = __m512;
  using I = __m512i;
  static constexpr int kVectors = 1;  // vectors per 16 rows
  static I load(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static I zero() { return _mm512_setzero_si512(); }
  static I add(I a, I b) { return _mm512_add_epi32(a, b); }
  // Low (high = false) or high nibbles of every byte.
  static I nibbles(I w, bool high) {
    const I low = _mm512_set1_epi8(0x0F);
    return _mm512_and_si512(high ? _mm512_srli_epi16(w, 4) : w, low);
  }
  // Whether dot4 takes codes up to 255 as they are: then the high nibbles can stay in place
  // (16 x their value) and their dot products be shifted back instead.
  static constexpr bool kWideCodes = true;
  static constexpr int kEightBitOffset = 0;  // codes as they are (see the AVX2 dot4)
  static I high_nibbles_in_place(I w) { return _mm512_and_si512(w, _mm512_set1_epi8(char(0xF0))); }
  static I shift_right(I a, int n) { return _mm512_srai_epi32(a, n); }
  // acc += w (16 rows x 4 codes) . the 4 int8 activations at x. Tiles of several tokens
  // (kEmbedded) have VPDPBUSD broadcast them itself ({1to16}; GCC does not fold a set1 into
  // it): a VPBROADCASTD of its own a product cost a 1B layer's calls of 4-128 rows
  // 1.09-1.18x (Zen 4, kernel_bench). One-token decodes keep the VPBROADCASTD: with the
  // embedded broadcast, 8-bit blocks of 128 decoded 0.92x.
  template <int Bits, bool kEmbedded>
  static I dot4(I acc, I w, const int8_t* x) {
    if constexpr (kEmbedded) {
      asm("vpdpbusd %[x]%{1to16%}, %[w], %[acc]"
          : [acc] "+v"(acc)
          : [w] "v"(w), [x] "m"(*reinterpret_cast<const int32_t*>(x)));
      return acc;
    } else {
      int32_t x4;
      std::memcpy(&x4, x, 4);
      return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(x4));
    }
  }
  template <int Bits>
  static I finish(I acc) { return acc; }  // a block's sums as int32 (see the AVX2 dot4)
  static F fzero() { return _mm512_setzero_ps(); }
  static F fset1(float x) { return _mm512_set1_ps(x); }
  static F to_float(I a) { return _mm512_cvtepi32_ps(a); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F load_halves(const uint8_t* p) {  // 16 fp16
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static void store(float* p, F v, int64_t count) {  // the first count (<= 16) lanes
    _mm512_mask_storeu_ps(p, count >= 16 ? 0xFFFF : (1u << count) - 1, v);
  }
};
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define BLOCK_LINEAR_SIMD
// AVX2: two vectors of 8 rows per record vector. Without AVX-VNNI, VPMADDUBSW + VPMADDWD make
// the u8 x s8 dot products of 4 bytes; 8-bit codes go centered on 0 so that no int16 sum
// saturates (255 * 127 * 2 would; see dot4).
struct Isa {
  using F = __m256;
  using I = __m256i;
  static constexpr int kVectors = 2;
  static I load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const I*>(p)); }
  static I zero() { return _mm256_setzero_si256(); }
  static I add(I a, I b) { return _mm256_add_epi32(a, b); }
  static I nibbles(I w, bool high) {
    const I low = _mm256_set1_epi8(0x0F);
    return _mm256_and_si256(high ? _mm256_srli_epi16(w, 4) : w, low);
  }
#ifdef __AVXVNNI__
  static constexpr bool kWideCodes = true;
  static constexpr int kEightBitOffset = 0;
#else  // VPMADDUBSW's int16 sums would saturate (240 * 127 * 2)
  static constexpr bool kWideCodes = false;
  static constexpr int kEightBitOffset = 128;  // see dot4
#endif
  static I high_nibbles_in_place(I w) { return _mm256_and_si256(w, _mm256_set1_epi8(char(0xF0))); }
  static I shift_right(I a, int n) { return _mm256_srai_epi32(a, n); }
  // acc += w . the 4 int8 activations at `at` (VEX has no embedded broadcast: the flag is
  // AVX-512's).
  template <int Bits, bool>
  static I dot4(I acc, I w, const int8_t* at) {
    int32_t x4;
    std::memcpy(&x4, at, 4);
    const I x = _mm256_set1_epi32(x4);
#ifdef __AVXVNNI__
    return _mm256_dpbusd_avx_epi32(acc, w, x);
#else
    // 4 bits: VPMADDUBSW's int16 pair sums (at most 2 * 15 * 127) add up as int16 over the
    // block's 8 record vectors (at most 30,480), widened to int32 once a block (finish).
    I sum;
    if constexpr (Bits == 4) {
      sum = _mm256_add_epi16(acc, _mm256_maddubs_epi16(w, x));
    } else {
      // 8 bits: the codes less 128, c, as |c| (unsigned, at most 128) times x with c's sign
      // (|x| <= 127): pair sums at most 2 * 128 * 127, no saturation, one VPMADDUBSW where
      // two nibbles took two. The sums come out short of 128 * sum(x): block_tile adds it
      // back through the block's minimum (kEightBitOffset).
      const I centered = _mm256_xor_si256(w, _mm256_set1_epi8(char(0x80)));
      sum = add(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(centered),
                                                            _mm256_sign_epi8(x, centered)),
                                       _mm256_set1_epi16(1)));
    }
    // Each sum in a register of its own, as VPDPBUSD's would be: integer adds reassociate,
    // and GCC grouped a record's products first (p0 + p1 + acc), holding 8 of them at once and
    // spilling the accumulators of a 4-token tile (kernel_bench: with this barrier, calls of
    // 4-128 tokens run 1.2-1.3x faster).
    asm("" : "+x"(sum));
    return sum;
#endif
  }
  template <int Bits>
  static I finish(I acc) {  // a block's sums as int32 (see dot4)
#ifdef __AVXVNNI__
    return acc;
#else
    return Bits == 4 ? _mm256_madd_epi16(acc, _mm256_set1_epi16(1)) : acc;
#endif
  }
  static F fzero() { return _mm256_setzero_ps(); }
  static F fset1(float x) { return _mm256_set1_ps(x); }
  static F to_float(I a) { return _mm256_cvtepi32_ps(a); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F load_halves(const uint8_t* p) {  // 8 fp16
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static void store(float* p, F v, int64_t count) {  // the first count (<= 8) lanes
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, v);
    std::memcpy(p, lanes, std::min<int64_t>(count, 8) * sizeof(float));
  }
};
#endif

// A call of several tokens goes in tiles of kTokenTile tokens (block_group). AVX-512 takes
// tiles of 8 (its 32 registers hold 8 tokens' sums and dot products): a speculative
// verification of up to 7 drafts is one tile, each record vector loaded and its 4-bit codes
// unpacked once for all its tokens, not once per 4: 7 tokens 1.2x faster than 4 + 3 (AVX2's 16
// registers spill at 7).
#if defined(BLOCK_LINEAR_SIMD) && defined(__AVX512F__)
constexpr int kTokenTile = 8;
#else
constexpr int kTokenTile = 4;
#endif

#ifdef BLOCK_LINEAR_SIMD
// How far ahead of its reads the first tile over a record group prefetches the records (past
// the group's end: the run's next group, see plan_runs): into L1 1 KB ahead, and into L2 3 KB
// ahead, so that more lines are on their way than L1's fill buffers alone hold. A 1B int4
// step's BlockLinear calls on one thread from DRAM: one prefetch 1.5-3 KB ahead 5-17% faster
// than none, 4 KB 12% and 8 KB 20% slower; the two 1.03-1.07x one 2 KB ahead
// (benchmarks/README.md, decode at 1B). Calls of several tokens, which spend longer on each
// record, prefetch into L2 6 KB ahead: 1B int4 layers from DRAM (kernel_bench --layers 16),
// 2-12 tokens 1.2-1.4x faster than a group a task without prefetches, 6 KB 1.00-1.05x faster
// than 3 KB or 12 KB.
constexpr int64_t kPrefetchNear = 1024, kPrefetchFar = 3072, kPrefetchFarTiles = 6144;

// Prefetches a record's worth of lines at `near` into L1 and at `far` into L2 (past the
// weights' end: a prefetch faults nowhere).
// Every helper that only prefetches is always_inline: GCC finds such a function const (a
// prefetch is no side effect to it) and deletes the calls to it that it has not inlined by
// then, silently. So bf16_product's A and B tile prefetches were gone from 3f24ebc (a lambda
// that only prefetched) to the tenth session: its 128-row calls 0.89-0.95x.
template <int64_t kRecord>
__attribute__((always_inline)) inline void prefetch_record(const uint8_t* near,
                                                           const uint8_t* far) {
  for (int64_t line = 0; line < kRecord; line += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(near + line), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(far + line), _MM_HINT_T2);
  }
}

// The lines kPrefetchNear on from `rec` into L1 and `far` on into L2.
template <int64_t kRecord>
__attribute__((always_inline)) inline void prefetch_ahead(const uint8_t* rec, int64_t far) {
  prefetch_record<kRecord>(rec + kPrefetchNear, rec + far);
}

// The lines of the group after `group` that the tile of TT tokens from `token` (not the
// group's first) prefetches into L2 at block b. A group's first tile reads its records from
// memory and the others find them cached: the next group's records come in during those
// others, spread over them by their tokens, rather than in a burst that the next first tile
// waits on (two cores' first tiles ask for more than the memory gives). 1B layers of 8-bit
// blocks of 128 from memory (kernel_bench --layers 16, Zen 4): 12-24 tokens 1.2x faster,
// 32-128 1.05-1.15x; through the engine workload Bs 1.11x, a served-like wave's 32-row decode
// steps 1.14x, A's prefill 1.05x. Blocks of 32, whose tiles take longer over each byte (an
// epilogue every 32 inputs, 4-bit codes unpacked), gain nothing; where it runs:
// spreads_next_group.
template <int64_t kRecord, int TT>
__attribute__((always_inline)) inline void prefetch_next_group(const BlockStep& st,
                                                              int64_t group, int64_t token,
                                                              int64_t b) {
  if ((group + 1) * kRows >= st.n) return;  // the last group
  // In token-blocks of the later tiles: this step's [done, done + TT) of `total`.
  const int64_t total = (st.tokens - kTokenTile) * st.blocks;
  const int64_t done = (token - kTokenTile) * st.blocks + b * TT;
  const int64_t lines = st.blocks * kRecord / 64;
  const char* next = reinterpret_cast<const char*>(st.weights + (group + 1) * st.blocks * kRecord);
  for (int64_t line = done * lines / total; line < (done + TT) * lines / total; ++line)
    _mm_prefetch(next + 64 * line, _MM_HINT_T1);
}

// GCC unrolls the tile's loops over its tokens' y only up to 7 tokens by itself; at 8 it kept y
// in a stack array, zeroed by a REP STOS each tile and stored and reloaded each block. Unrolled,
// AVX-512's 32 registers hold it: a 1B model's A prefill 1.03-1.04x CPU, a served-like wave's
// prompt step 1.06x (Zen 4, kernel_bench --prefill), the same sums. AVX2's 16 registers spill
// either way, and there the unrolled loops ran 0.74-0.97x.
#ifdef __AVX512F__
#define UNROLL_TOKENS _Pragma("GCC unroll 8")
#else
#define UNROLL_TOKENS
#endif

// One record group (16 output rows, in Isa::kVectors vectors) x TT tokens over every block of
// Parts parts. A one-token decode keeps two accumulators (even and odd record vectors): two
// independent dot-product chains rather than one.
template <int Bits, int Parts, int TT>
void block_tile(const BlockStep& st, int64_t group, int64_t token) {
  using F = Isa::F;
  using I = Isa::I;
  constexpr int P = Isa::kVectors, S = TT == 1 ? 2 : 1, kVectorBytes = 64 / P;
  // One token, 4 bits: the odd (high-nibble) vectors have their own accumulator, so their
  // codes can stay 16 x as large (one AND each, no shift) and their sum be shifted back:
  // exact, as the int32 sums are (at most 128 x 240 x 128).
  constexpr bool kInPlace = TT == 1 && Bits == 4 && Isa::kWideCodes;
  // Where dot4's sums are int16 (4 bits without VNNI: at most 30,480 a part), each part's
  // go to int32 before the next part's.
  constexpr bool kWidenParts = Bits == 4 && !Isa::kWideCodes && Parts > 1;
  constexpr int64_t kBlockIn = Parts * kPart, kValueBytes = value_bytes(Bits, Parts);
  constexpr int64_t kRecord = record_bytes(Bits, Parts);
  const int64_t width = st.blocks * kBlockIn;
  F y[TT][P];
UNROLL_TOKENS
  for (int t = 0; t < TT; ++t)
    for (int h = 0; h < P; ++h) y[t][h] = Isa::fzero();
  const uint8_t* rec = st.weights + group * st.blocks * kRecord;
  for (int64_t b = 0; b < st.blocks; ++b, rec += kRecord) {
    if (token == 0)  // the first tile over the group: later ones find its records cached
      prefetch_ahead<kRecord>(rec, TT == 1 ? kPrefetchFar : kPrefetchFarTiles);
    else if (st.spread)
      prefetch_next_group<kRecord, TT>(st, group, token, b);
    // (No lambdas here: with them GCC kept acc in memory around dot4's asm, 0.43x.)
    I acc[TT][P][S], wide[TT][P];
    for (int t = 0; t < TT; ++t)
      for (int h = 0; h < P; ++h) {
        for (int i = 0; i < S; ++i) acc[t][h][i] = Isa::zero();
        if constexpr (kWidenParts) wide[t][h] = Isa::zero();
      }
    for (int s = 0; s < Parts; ++s) {
      const uint8_t* part = rec + s * part_bytes(Bits);
      const int8_t* x = st.xq + token * width + b * kBlockIn + s * kPart;
      for (int p = 0; p < Bits; ++p) {  // 64-byte vectors of bytes: 4 at 4 bits, 8 at 8
        I bytes[P];
        for (int h = 0; h < P; ++h) bytes[h] = Isa::load(part + p * 64 + h * kVectorBytes);
        // Record vector v (16 rows x the part's inputs 4v..4v+3): at 4 bits a vector's low
        // nibbles are v = 2p, its high ones 2p + 1.
        for (int half = 0; half < (Bits == 4 ? 2 : 1); ++half) {
          const int v = Bits == 4 ? 2 * p + half : p;
          I w[P];
          for (int h = 0; h < P; ++h)
            w[h] = Bits == 8       ? bytes[h]
                   : half == 0     ? Isa::nibbles(bytes[h], false)
                   : kInPlace      ? Isa::high_nibbles_in_place(bytes[h])
                                   : Isa::nibbles(bytes[h], true);
          for (int t = 0; t < TT; ++t)
            for (int h = 0; h < P; ++h)
              acc[t][h][v % S] =
                  Isa::dot4<Bits, (TT > 1)>(acc[t][h][v % S], w[h], x + t * width + 4 * v);
        }
      }
      if constexpr (kWidenParts)
        for (int t = 0; t < TT; ++t)
          for (int h = 0; h < P; ++h)
            for (int i = 0; i < S; ++i) {
              wide[t][h] = Isa::add(wide[t][h], Isa::finish<Bits>(acc[t][h][i]));
              acc[t][h][i] = Isa::zero();
            }
    }
    for (int h = 0; h < P; ++h) {
      const F scale = Isa::load_halves(rec + kValueBytes + h * kVectorBytes / 2);
      F minimum = Isa::load_halves(rec + kValueBytes + 2 * kRows + h * kVectorBytes / 2);
      if constexpr (Bits == 8 && Isa::kEightBitOffset != 0)  // the sums' missing 128 * sum(x)
        minimum = Isa::fmadd(scale, Isa::fset1(Isa::kEightBitOffset), minimum);
UNROLL_TOKENS
      for (int t = 0; t < TT; ++t) {
        const int64_t xb = (token + t) * st.blocks + b;
        I sum;
        if constexpr (kWidenParts) {
          sum = wide[t][h];
        } else {
          sum = Isa::finish<Bits>(acc[t][h][0]);
          if constexpr (kInPlace)
            sum = Isa::add(sum, Isa::shift_right(Isa::finish<Bits>(acc[t][h][1]), 4));
          else if constexpr (S == 2)
            sum = Isa::add(sum, Isa::finish<Bits>(acc[t][h][1]));
        }
        y[t][h] = Isa::fmadd(Isa::to_float(sum), Isa::mul(scale, Isa::fset1(st.xscale[xb])),
                             y[t][h]);
        y[t][h] = Isa::fmadd(minimum, Isa::fset1(st.xsum[xb]), y[t][h]);
      }
    }
  }
  for (int h = 0; h < P; ++h) {
    const int64_t col = group * kRows + h * (kRows / P);
UNROLL_TOKENS
    for (int t = 0; t < TT; ++t)
      if (col < st.n) Isa::store(st.y + (token + t) * st.n + col, y[t][h], st.n - col);
  }
}
#else
// Portable: the same arithmetic, one token at a time.
template <int Bits, int Parts, int TT>
void block_tile(const BlockStep& st, int64_t group, int64_t token) {
  constexpr int64_t kRecord = record_bytes(Bits, Parts), kBlockIn = Parts * kPart;
  const int64_t width = st.blocks * kBlockIn;
  for (int t = 0; t < TT; ++t) {
    float y[kRows] = {};
    for (int64_t b = 0; b < st.blocks; ++b) {
      const uint8_t* rec = st.weights + (group * st.blocks + b) * kRecord;
      const int8_t* xq = st.xq + (token + t) * width + b * kBlockIn;
      const int64_t xb = (token + t) * st.blocks + b;
      for (int r = 0; r < kRows; ++r) {
        int dot = 0;
        for (int i = 0; i < kBlockIn; ++i) dot += record_code(rec, Bits, r, i) * xq[i];
        y[r] += dot * record_half(rec, Bits, Parts, r) * st.xscale[xb] +
                record_half(rec, Bits, Parts, kRows + r) * st.xsum[xb];
      }
    }
    const int64_t col = group * kRows;
    std::memcpy(st.y + (token + t) * st.n + col, y,
                std::min<int64_t>(kRows, st.n - col) * sizeof(float));
  }
}
#endif

#ifdef __AMX_INT8__
// AMX (the avx512_amx build): TDPBSUD multiplies 16 tokens' int8 activations [16 x 32] by a
// block's weight codes, and a record's 8-bit values already are its B tile (8 rows of 64
// bytes: byte r * 4 + c of row v is row r's input 4v + c); 4-bit records are unpacked to such
// tiles first. A block of 128 is two products of 64 inputs (A [16 x 64], B 16 rows: two
// parts) into one C tile, and one epilogue. Its int32 dot products are VPDPBUSD's, and the
// epilogue is block_tile's, in the
// same order: y is the VNNI tiles' bit for bit, so a token's result does not depend on the
// tokens that share its call (speculative verification, batching). Per block of 32 inputs
// each 16 x 16 tile of dot products goes through memory (TILESTORED) to the AVX-512 epilogue:
// 4 vector operations per token and 16 outputs (convert, scale, 2 FMA), 64 per tile product.
// Timed alone (one thread, 1B shapes, TSC ticks per tile product), the epilogue takes ~35 and
// the tile instructions ~15-30, and the two add up rather than overlap (also with the
// epilogue reading other memory than the tiles' stores, and with only TDPBSUD left of them):
// ~75-95 in all, against the VNNI tiles' ~120 for the same products.
constexpr int kAmxTokens = 16;  // tokens per tile (the A and C tiles' rows)
// Calls of fewer tokens run only the VNNI tiles: 16 tokens on AMX 1.3x, 24 (16 + 8) 1.1x
// faster than on them (kernel_bench, 1B int4); 8 would fill half a tile for the same unpacking.
constexpr int kAmxFrom = 16;
// A product's C tile is stored once kStoreLag more products are issued (see amx_store).
constexpr int64_t kStoreLag = 3;
static_assert(kStoreLag < 4, "a product's C tile is reused 4 products on");
constexpr int kAmxPass = 4;       // token tiles per pass over a batch of groups (amx_sliced)
constexpr int kAmxProducts = 16;  // tile products per group and K slice (their sums: 16 KB)
// Bytes of a token tile's A tiles of one block, and of a block's B tiles (4-bit: unpacked).
constexpr int64_t amx_block_bytes(int parts) { return kAmxTokens * kPart * parts; }
// A tile product's inputs: a part, or two of a block of 128 (K = 64, AMX's widest).
constexpr int amx_k(int parts) { return parts == 1 ? kPart : 2 * kPart; }

// A tile configuration (palette 1): each tile's bytes per row and rows.
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t bytes[16];
  uint8_t rows[16];
};

// Sets this thread's tile shapes unless they are set: ONNX Runtime's pool threads each
// configure on first use, and its own AMX kernels (or our other path) may configure others in
// between. (Its int8 GEMM reloads its shapes, all 16 x 64, only when both bytes and rows
// differ: the int8 path's do; the bf16 path's are its own.)
void use_tiles(const TileConfig& want) {
  TileConfig have;
  _tile_storeconfig(&have);
  asm volatile("" ::: "memory");  // the intrinsics' asm names 8 of the 64 bytes they touch
  if (std::memcmp(&want, &have, sizeof want) != 0) _tile_loadconfig(&want);
}

template <int Parts>
void configure_tiles() {
  static const TileConfig want = [] {
    TileConfig c{};
    c.palette = 1;
    constexpr int k = amx_k(Parts);
    for (int t : {0, 1, 2, 3}) c.bytes[t] = 64, c.rows[t] = kAmxTokens;  // C: 16 x 16 int32
    for (int t : {4, 5}) c.bytes[t] = k, c.rows[t] = kAmxTokens;         // A: 16 x k int8
    for (int t : {6, 7}) c.bytes[t] = 64, c.rows[t] = k / 4;             // B: k inputs' codes
    return c;
  }();
  use_tiles(want);
}

// A thread's buffer of at least `count` values, 64-byte aligned (tile rows: a row that
// crosses a cache line costs a tile load two).
template <typename T>
T* tile_buffer(std::vector<T>& buffer, int64_t count) {
  buffer.resize(count + 64 / sizeof(T));
  const uintptr_t at = reinterpret_cast<uintptr_t>(buffer.data());
  return buffer.data() + (64 - at % 64) % 64 / sizeof(T);
}

// Tile `tile` of the call's whole 16-token tiles to st.amx.
template <int Parts>
void amx_layout(void* data, size_t tile) {
  const BlockStep& st = *static_cast<const BlockStep*>(data);
  constexpr int64_t kBlockIn = Parts * kPart;
  const int64_t blocks = st.blocks, width = blocks * kBlockIn;
  for (int t = 0; t < kAmxTokens; ++t) {
    const int64_t token = int64_t(tile) * kAmxTokens + t;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t at = (int64_t(tile) * blocks + b) * kAmxTokens + t;
      std::memcpy(st.amx.a + at * kBlockIn, st.xq + token * width + b * kBlockIn, kBlockIn);
      st.amx.xscale[at] = st.xscale[token * blocks + b];
      st.amx.xsum[at] = st.xsum[token * blocks + b];
    }
  }
}

// Block b's B tile into tile 6 + b % 2; a block of 128's two into tiles 6 and 7.
template <int Parts>
inline void amx_load_b(int64_t b, const uint8_t* codes) {
  if constexpr (Parts > 1) {
    _tile_loadd(6, codes, 64);
    _tile_loadd(7, codes + amx_block_bytes(Parts) / 2, 64);
  } else if (b % 2 == 0) {
    _tile_loadd(6, codes, 64);
  } else {
    _tile_loadd(7, codes, 64);
  }
}

// Product p on C tile p % 4: the A tile at a (into tile 4 + p % 2) times the B tile of block
// b (6 + b % 2). A and B alternate between two tiles each, so that a load need not wait for
// the product before to have read its tile. A block of 128: its two A tiles (a's inputs 0-63
// into tile 4, 64-127 into 5, rows 128 bytes apart) times B tiles 6 and 7, summed in C.
#define AMX_DOT(C, A, B)  \
  _tile_zero(C);            \
  _tile_loadd(A, a, kPart); \
  _tile_dpbsud(C, A, B);    \
  break
#define AMX_DOT_WIDE(C)                     \
  _tile_zero(C);                            \
  _tile_loadd(4, a, kWidePart * kPart);     \
  _tile_dpbsud(C, 4, 6);                    \
  _tile_loadd(5, a + 64, kWidePart * kPart); \
  _tile_dpbsud(C, 5, 7);                    \
  break
template <int Parts>
inline void amx_dot(int64_t p, int64_t b, const int8_t* a) {
  static_assert(Parts == 1 || Parts == kWidePart, "blocks of 32 or 128");
  if constexpr (Parts > 1) {
    switch (p % 4) {
      case 0: AMX_DOT_WIDE(0);
      case 1: AMX_DOT_WIDE(1);
      case 2: AMX_DOT_WIDE(2);
      default: AMX_DOT_WIDE(3);
    }
    return;
  }
  switch (p % 4 * 2 + b % 2) {
    case 0: AMX_DOT(0, 4, 6);
    case 1: AMX_DOT(0, 4, 7);
    case 2: AMX_DOT(1, 5, 6);
    case 3: AMX_DOT(1, 5, 7);
    case 4: AMX_DOT(2, 4, 6);
    case 5: AMX_DOT(2, 4, 7);
    case 6: AMX_DOT(3, 5, 6);
    default: AMX_DOT(3, 5, 7);
  }
}
#undef AMX_DOT
#undef AMX_DOT_WIDE

// c = product p's C tile, stored once product p + kStoreLag is issued, before product p + 4
// takes the tile back (a store waits for its TDPBSUD to finish, and the tile instructions
// behind it wait too). Standalone, in L1, TSC ticks a product: 16 without stores, 25-33
// stored one product on, 20-28 three on; 1B 8-bit layers from memory (kernel_bench --layers
// 16, 2 threads): 32 tokens 1.07-1.08x, 16 and 64 1.01-1.03x faster than one on; a
// served-like wave's 32-row decode steps 1.04x. The store names exactly c (the intrinsic's
// "memory" clobber would keep y in memory rather than registers).
#define AMX_STORE(C)                                                                      \
  asm volatile("tilestored %%tmm" #C ", (%1,%2,1)" : "=m"(c) : "r"(c), "r"(int64_t{64})); \
  break
inline void amx_store(int64_t p, int32_t (&c)[256]) {
  switch (p % 4) {
    case 0: AMX_STORE(0);
    case 1: AMX_STORE(1);
    case 2: AMX_STORE(2);
    default: AMX_STORE(3);
  }
}
#undef AMX_STORE

// y [16 tokens] += a block's dot products, as block_tile adds them (xscale and xsum: the
// block's 16 tokens'). While AMX works, the core runs 512-bit multiplies, FMAs and
// conversions on one port instead of two, adds still on two (standalone: 64 FMAs, VMULPS,
// VCVTDQ2PS or VPDPBUSD beside one TDPBSUD 2.1x as long as alone, 64 VADDPS 1.2x): this
// epilogue's 4 a token, 64 cycles a product, bound the path with the tile instructions (which
// it does not overlap much). Starting the C tiles at 1.5 x 2^23's bit pattern (every dot
// product is below 2^22: then the float of a C element minus 1.5 x 2^23 is the dot product,
// exactly) trades the conversion for a subtraction, an add: 1.12x standalone in L1, but in the
// kernel the C tiles' extra load costs more (1B int8 layer and LM head, 16-64 tokens: 0.90-0.99x).
__attribute__((always_inline)) inline void amx_epilogue(__m512 (&y)[kAmxTokens],
                                                        const int32_t (&dots)[256],
                                                        const uint8_t* halves, const float* xscale,
                                                        const float* xsum) {
  const __m512 scale = Isa::load_halves(halves), minimum = Isa::load_halves(halves + 2 * kRows);
#pragma GCC unroll 16
  for (int t = 0; t < kAmxTokens; ++t) {
    const __m512 sum = Isa::to_float(_mm512_load_si512(dots + t * kRows));
    y[t] = Isa::fmadd(sum, Isa::mul(scale, Isa::fset1(xscale[t])), y[t]);
    y[t] = Isa::fmadd(minimum, Isa::fset1(xsum[t]), y[t]);
  }
}

inline void amx_store_y(const BlockStep& st, int64_t group, int64_t tile,
                        const __m512 (&y)[kAmxTokens]) {
  const int64_t col = group * kRows;
  for (int t = 0; t < kAmxTokens; ++t)
    Isa::store(st.y + (tile * kAmxTokens + t) * st.n + col, y[t], st.n - col);
}

// A block's 4-bit codes (its record's values) as B tiles at `out`, the low and the high nibbles
// of each 64 bytes in turn; returns out.
template <int Parts>
const uint8_t* unpack_codes(const uint8_t* values, uint8_t* out) {
  for (int v = 0; v < 4 * Parts; ++v) {  // the parts' vectors of bytes, in order
    const __m512i w = Isa::load(values + v * 64);
    _mm512_store_si512(out + 2 * v * 64, Isa::nibbles(w, false));
    _mm512_store_si512(out + 2 * v * 64 + 64, Isa::nibbles(w, true));
  }
  // tileloadd's asm does not say that it reads them
  asm volatile("" ::"m"(*reinterpret_cast<const uint8_t(*)[amx_block_bytes(Parts)]>(out)));
  return out;
}

// A call's one whole 16-token tile (16-31 tokens: more go through amx_sliced), record group
// `group` over every block: block b + kStoreLag's product issued before block b's epilogue (on
// C tiles of their own), so the tile unit works ahead and the vector ports overlap the reads of
// the records. Each record is read just before its products, prefetched ahead as block_tile
// does (a 4-bit one unpacked to B tiles then), so the reads from memory overlap the tile
// products rather than add to them: 1B int4 layers from DRAM (kernel_bench --layers 16), 16
// tokens 1.1-1.3x faster than when a group's 4-bit records were unpacked first, prefetched
// into L2 during the run's group before (1.01x). (In K slices: 1.00x.) Returns the tokens done.
template <int Bits, int Parts>
int64_t amx_tile(const BlockStep& st, int64_t group) {
  constexpr int64_t kRecord = record_bytes(Bits, Parts), kValueBytes = value_bytes(Bits, Parts);
  constexpr int64_t kTileBytes = amx_block_bytes(Parts);
  const int64_t blocks = st.blocks;
  const uint8_t* records = st.weights + group * blocks * kRecord;
  alignas(64) uint8_t unpacked[2][kTileBytes];  // 4 bits: a block's codes as B tiles
  alignas(64) int32_t dots[4][256];
  auto product = [&](int64_t b) {  // issues block b's, stores block b - kStoreLag's
    if (b < blocks) {
      const uint8_t* codes = records + b * kRecord;
      prefetch_ahead<kRecord>(codes, kPrefetchFarTiles);
      if constexpr (Bits == 4) codes = unpack_codes<Parts>(codes, unpacked[b % 2]);
      amx_load_b<Parts>(b, codes);
      amx_dot<Parts>(b, b, st.amx.a + b * kTileBytes);
    }
    const int64_t done = b - kStoreLag;
    if (done >= 0 && done < blocks) amx_store(done, dots[done % 4]);
  };
  __m512 y[kAmxTokens];
  for (auto& v : y) v = Isa::fzero();
  for (int64_t b = 0; b < kStoreLag; ++b) product(b);
  for (int64_t b = 0; b < blocks; ++b) {
    product(b + kStoreLag);
    amx_epilogue(y, dots[b % 4], records + b * kRecord + kValueBytes,
                 st.amx.xscale + b * kAmxTokens, st.amx.xsum + b * kAmxTokens);
  }
  amx_store_y(st, group, 0, y);
  return kAmxTokens;
}

// K slices (amx_sliced): a slice's A tiles take at most kSliceBytes, so that they stay in L1
// while a batch of up to kSliceGroups record groups goes through them.
constexpr int64_t kSliceBytes = 16384;
constexpr int64_t kSliceGroups = 4;

// Groups first..first + count - 1 (up to kSliceGroups), token tiles tile0..tile0 + tiles - 1 (up to
// kAmxPass), a K slice at a time: each group's products over the slice's blocks (each block's B
// tiles loaded once for the tiles), then its tiles' epilogues, y carried in `partial` between
// slices. Taken group by group instead (a group's blocks in chunks of 8, as until the thirty-ninth
// session), each group sweeps all its A tiles (64 KB for 32 tokens x 2,048 inputs) from L2, through
// the fill buffers that the records' reads from memory hold: the tile work added to the reads
// rather than hiding behind them (a 32-row call took about a one-row call's time plus its tile
// work). Here a slice's A tiles (16 KB) serve the batch's groups from L1. benchmarks/amx_slices.cc
// (a thread per core, records streamed from memory, ns a 2,112-byte record): group by group
// 205-209, sliced 167-172, reading alone 130-160, the tile work alone 85-100. 1B layers from memory
// (kernel_bench --layers 16, 2 threads, wall, against group by group): 8-bit blocks of 128 at 32,
// 48 and 64 rows 1.12-1.22x, 1.25-1.30x and 1.15-1.20x faster, 80-256 rows 1.13-1.22x, the LM head
// at 32 rows 1.18x; blocks of 32 (4 or 8 bits) 1.04-1.14x at 32-128 rows. The epilogues add the
// blocks in the same order (y through memory between slices, exactly): the same sums as the other
// paths.
template <int Bits, int Parts>
void amx_sliced(const BlockStep& st, int64_t first, int64_t count, int64_t tile0,
                int64_t tiles) {
  constexpr int64_t kRecord = record_bytes(Bits, Parts), kValueBytes = value_bytes(Bits, Parts);
  constexpr int64_t kTileBytes = amx_block_bytes(Parts);
  const int64_t blocks = st.blocks;
  const int64_t slice = std::clamp<int64_t>(kSliceBytes / (tiles * kTileBytes), 1,
                                            kAmxProducts / tiles);
  alignas(64) int32_t dots[kAmxProducts][256];
  alignas(64) uint8_t unpacked[2][kTileBytes];  // 4 bits: a block's codes as B tiles
  alignas(64) float partial[kSliceGroups][kAmxPass][kAmxTokens][kRows];
  for (int64_t b0 = 0; b0 < blocks; b0 += slice) {
    const int64_t b1 = std::min(blocks, b0 + slice);
    for (int64_t g = 0; g < count; ++g) {
      const int64_t group = first + g;
      const uint8_t* records = st.weights + group * blocks * kRecord;
      // The chunk after this one, in the order they are read: the next group's slice, else
      // the batch's first group's next slice, else the next batch's first records.
      const uint8_t* next = g + 1 < count ? records + (blocks + b0) * kRecord
                            : b1 < blocks ? st.weights + (first * blocks + b1) * kRecord
                                          : st.weights + (first + count) * blocks * kRecord;
      int64_t p = 0;
      for (int64_t b = b0; b < b1; ++b) {
        // The next record to load into L1, this one's counterpart in the next chunk into L2.
        prefetch_record<kRecord>(b + 1 < b1 ? records + (b + 1) * kRecord : next,
                                 next + (b - b0) * kRecord);
        const uint8_t* codes = records + b * kRecord;
        if constexpr (Bits == 4) codes = unpack_codes<Parts>(codes, unpacked[b % 2]);
        amx_load_b<Parts>(b, codes);
        for (int64_t i = 0; i < tiles; ++i, ++p) {
          amx_dot<Parts>(p, b, st.amx.a + ((tile0 + i) * blocks + b) * kTileBytes);
          if (p >= kStoreLag) amx_store(p - kStoreLag, dots[p - kStoreLag]);
        }
      }
      for (int64_t q = std::max<int64_t>(0, p - kStoreLag); q < p; ++q) amx_store(q, dots[q]);
      for (int64_t i = 0; i < tiles; ++i) {
        __m512 y[kAmxTokens];
        for (int t = 0; t < kAmxTokens; ++t)
          y[t] = b0 == 0 ? Isa::fzero() : _mm512_load_ps(partial[g][i][t]);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t at = ((tile0 + i) * blocks + b) * kAmxTokens;
          amx_epilogue(y, dots[(b - b0) * tiles + i], records + b * kRecord + kValueBytes,
                       st.amx.xscale + at, st.amx.xsum + at);
        }
        if (b1 == blocks) amx_store_y(st, group, tile0 + i, y);
        else for (int t = 0; t < kAmxTokens; ++t) _mm512_store_ps(partial[g][i][t], y[t]);
      }
    }
  }
}

#ifdef AMX_BF16
// The bf16 path (the avx512_amx build) for rows that are prompt tokens (BlockLinear's input
// 2): each record is dequantized once per call to TDPBF16PS's B tile (w = q * scale + min in
// fp32, rounded to the nearest bf16), the prompt rows rounded to bf16 in A tiles of 16 tokens,
// and the products accumulate in fp32 over all of K in tiles: no per-block epilogue, which
// bounds the int8 tiles. A row's result depends on its own values only (tile rows are
// independent, K goes in one order), so it is the same with any number of prompt rows in the
// call. Generated tokens take it only where marked 2 and the call is big enough (bf16_either):
// else the int8 path, faster for few rows, and the same with any number of rows.
// Measured against the AMX int8 tiles (1B layer shapes, CPU time): 1.3-1.9x on 64 tokens,
// 1.5-2.1x on 128, 1.7-2.3x on 512; below ~20 rows the dequantization, a fixed cost per call,
// makes it slower (one row: ~0.2-0.3x), the price of results that do not depend on the call.
// Its K unit is a record part (32 inputs: `blocks` here counts parts, `parts` a record's).
constexpr int64_t kTileValues = kRows * kPart;  // bf16 of one A or B tile (1 KB)
struct Bf16Step {
  const uint8_t* weights;
  const uint16_t* a;     // the prompt rows in A tiles: [ceil(P / 16), blocks, 16 rows, 32]
  const int64_t* rows;   // y's row of prompt row i
  float* y;
  int64_t prompts, n, blocks, groups, parts, strip;  // strip: groups per task
  int64_t unit_groups, unit_blocks, chunk_tiles;  // a unit of dequantized B; token tiles
  bool held;  // units of a group pair: C held in the tile registers over the unit's blocks
};

constexpr int64_t kChunkBlocks = 8;  // K blocks per pass: a group pair's B tiles stay in L1

// Whether a call's rows of role 2 (prompt_rows) go on the bf16 path: where it has prompt rows
// (their dequantized weights then serve the rest for little more than a second A tile: the
// int8 path would read the weights again), or enough rows of role 2 that the bf16 path, whose
// dequantization is a fixed cost per call, is the faster. Measured, 1B layer, 16 layers'
// weights from memory, 2 threads, the bf16 path's speed over the int8 path's (CPU time): 4
// bits 16 rows 0.89-0.91x, 24 1.13x, 32 1.24-1.29x; 8 bits (1.8x the bytes to dequantize) 24
// rows 0.89x, 32 0.91x, 48 1.21x, 64 1.48x (with the int8 path's K slices, thirty-ninth
// session: 4 bits 16 rows 0.75x, 24 1.04x, 32 1.06x; 8 bits 32 rows 0.83x, 48 1.06x, 64
// 1.23x). 8 bits in blocks of 128, whose int8 path takes one epilogue per 128 inputs: 16 rows
// 0.58x, 32 0.75x, 64 0.81x, 128 0.91x, 256 0.93-1.01x, 512 1.19x, 1,024 1.30x before the K
// slices; with them 192 rows 0.86x, 256 0.91x, 384 0.91x, 512 0.93x, 768 0.94x, 1,024 0.93x:
// there the int8 path is the faster at any count.
inline bool bf16_either(const uint8_t* role, int64_t tokens, int64_t bits, int64_t parts) {
  int64_t count = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    if (role[t] == kPromptRole) return true;
    count += role[t] == kEitherRole;
  }
  return bits == 4 ? count >= 24 : parts == 1 && count >= 48;
}

// A call's plan (bf16_task's units and token chunks). Where the A tiles and two pairs' B tiles
// (a_bytes + 4 x blocks KB) fit in half the L2, so that both stream from L2, the tasks hold
// the C tiles over all of K, a group pair at a time, for all the rows at once. Past that the
// A tiles come from L3 (over all of K there, one thread, 2048 x 8192 down projection at
// 48-128 tokens: 0.61-0.65x): up to 256 rows, passes of kChunkBlocks blocks over all of a
// task's groups (C through memory between passes); past 256 rows, blocked for the L2 as a GEMM
// is: a task dequantizes its 8 groups' B tiles for a K block of 64 (512 KB) once and keeps
// them in L2 while the prompt rows go through in chunks of 8 token tiles (their A tiles of the
// K block: 512 KB), C held over the K block (C through memory between K blocks only in the
// 8192-input down projection). At 1024 rows (1B layer, 2 threads) 0.98-1.14x the passes, the
// served-like wave's prompt steps 1.09-1.11x (quiet); the products stay at ~13-15 ns per
// TDPBF16PS whatever the blocking (tasks of 8 or 16 groups, K blocks of 16-64, chunks of 4-16
// tiles, the next chunk's A tiles prefetched into L2: all within the noise), against ~8.5 in
// a microbenchmark with both operands from L2 and ~5.5 from L1: the blocking is not what
// bounds them. With A and B read from L1 buffers, writing y was: a 1,024-row gate_up call (64
// MB of y) took 55-58 CPU ms so, 31 without its y stores (A-stationary sweeps of 8-16 blocks
// over all group pairs, y's lines prefetched for writing, or y staged in L1: 0.97-1.06x). With
// the operands streamed as here it is not: a build skipping half of gate_up's y stores ran the
// served-like wave's prompt steps 0.96x (sixteenth session). At 256
// rows the blocked plan was 0.96-0.99x (its first chunk's dequantization overlaps half the
// products). (All measured without bf16_product's A and B prefetches, which
// the compiler had dropped: see prefetch_ahead. The 128-192-row calls' 0.91-0.96x, blamed on
// this loop's generalization, was that: with them back, 1B layer, 3 runs of 21 rounds, load
// 3-6: 128 rows 0.99-1.01x the eighth session's build, 192 rows 0.95-1.01x (a copy of one
// build against itself: up to +-6%), 1024 rows 1.04-1.11x the build without them; the blocked
// plan at 1024 rows 1.13-1.24x the passes.)
constexpr int64_t kBlockGroups = 8;  // a blocked call's task: 8 groups
constexpr int64_t kBlockK = 64;      // K blocks of a blocked call's K block
constexpr int64_t kBlockTiles = 8;   // token tiles of a blocked call's token chunk
void bf16_plan(Bf16Step& st, int64_t tiles, int64_t a_bytes) {
  const int64_t blocks = st.blocks, groups = st.groups;
  if (a_bytes + 4 * blocks * kTileValues * 2 <= (1 << 20)) {
    // Tasks of 16 groups (down to 4 while that leaves fewer than 8 tasks: 2 threads, of
    // unequal speed on a shared machine): the first pair's dequantization, which nothing
    // overlaps, is a smaller part of a longer task (2048 x 16384 at 128 tokens, one thread:
    // 1.09x vs 1.05x with 4).
    st.strip = std::clamp<int64_t>(groups / 16 * 2, 4, 16);
    st.unit_groups = 2, st.unit_blocks = blocks, st.chunk_tiles = tiles, st.held = true;
  } else if (tiles <= 2 * kBlockTiles) {
    // tasks of 16 groups read the A tiles (from L3 past 1 MB) 4x less often than tasks of 4:
    // 1.17-1.19x on the down projection at 256 tokens, one thread; smaller A tiles keep tasks
    // of 4 (with 16, the 135M shapes ran 0.93-0.95x at 256-512 tokens)
    st.strip = a_bytes < (1 << 20) ? 4 : std::clamp<int64_t>(groups / 16 * 2, 4, 16);
    st.unit_groups = st.strip;
    st.unit_blocks = kChunkBlocks, st.chunk_tiles = tiles, st.held = false;
  } else {
    st.strip = kBlockGroups, st.unit_groups = 2, st.unit_blocks = std::min(blocks, kBlockK);
    st.chunk_tiles = kBlockTiles, st.held = true;
  }
}

// One record part (its values, and its record's scales and minimums at `halves`) dequantized
// to bf16 as TDPBF16PS's B tile: tile row j holds inputs 2j and 2j + 1
// of the 16 output rows, [output row][input % 2]. Record vector v (byte 4r + c: row r's input
// 4v + c) gives tile rows 2v (c = 0, 1) and 2v + 1 (c = 2, 3); each tile row's halves, rows
// 0-7 and 8-15, are made in that order (one VPERMB brings their bytes to the low bytes of
// 16 lanes) so that cvtne2ps gives the tile row as is. A 4-bit code becomes its float in one
// VPERMPS of {0, ..., 15}, which reads the low 4 bits of each lane: ~130 vector uops per
// record instead of ~190 by widening, converting and interleaving (the same fp32 FMA and bf16
// rounding, so the same bits). It does not overlap the tile products (their costs add): 1B
// layer int4 1.2-1.3x faster at 16 tokens, 1.02-1.17x at 128, engine prefill 1.05-1.07x.
template <int Bits>
void dequantize_part(const uint8_t* rec, const uint8_t* halves, uint16_t* tile) {
  // pick[c][h]: lane l's low byte takes row 8h + l / 2's input 2c + l % 2 of a record
  // vector, its byte 4 (8h + l / 2) + 2c + l % 2 (tile row 2v + c, half h).
  __m512i pick[2][2];
  for (int c = 0; c < 2; ++c)
    for (int h = 0; h < 2; ++h) {
      alignas(64) uint8_t index[64] = {};
      for (int l = 0; l < 16; ++l) index[4 * l] = 4 * (8 * h + l / 2) + 2 * c + l % 2;
      pick[c][h] = _mm512_load_si512(index);
    }
  const __m512i pair = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i pair_high = _mm512_add_epi32(pair, _mm512_set1_epi32(8));
  const __m512 scale = Isa::load_halves(halves);
  const __m512 minimum = Isa::load_halves(halves + 2 * kRows);
  const __m512 s[2] = {_mm512_permutexvar_ps(pair, scale),
                       _mm512_permutexvar_ps(pair_high, scale)};  // [half]: rows in pair order
  const __m512 m[2] = {_mm512_permutexvar_ps(pair, minimum),
                       _mm512_permutexvar_ps(pair_high, minimum)};
  const __m512 codes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int p = 0; p < Bits; ++p) {  // the record's 64-byte vectors of bytes
    const __m512i bytes = _mm512_loadu_si512(rec + 64 * p);
    for (int c = 0; c < 2; ++c) {
      __m512 w[2][2];  // [nibble][half]
      for (int h = 0; h < 2; ++h) {
        if constexpr (Bits == 8) {  // the lanes' other bytes zero
          const __m512i q = _mm512_maskz_permutexvar_epi8(0x1111111111111111, pick[c][h], bytes);
          w[0][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), s[h], m[h]);
        } else {
          const __m512i q = _mm512_permutexvar_epi8(pick[c][h], bytes);
          w[0][h] = _mm512_fmadd_ps(_mm512_permutexvar_ps(q, codes), s[h], m[h]);
          w[1][h] = _mm512_fmadd_ps(
              _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), codes), s[h], m[h]);
        }
      }
      // 8 bits: record vector p; 4 bits: 2p (low nibbles) and 2p + 1 (high).
      for (int n = 0; n < (Bits == 8 ? 1 : 2); ++n) {
        const int v = Bits == 8 ? p : 2 * p + n;
        _mm512_store_si512(tile + 64 * v + 32 * c,
                           (__m512i)_mm512_cvtne2ps_pbh(w[n][1], w[n][0]));
      }
    }
  }
}

struct Bf16Rows {
  const float* x;
  const int64_t* rows;
  int64_t k, width, blocks, prompts;  // width: x's row (2K where swiglu)
  uint16_t* a;
};

// A tile i of the prompt rows: rows 16i .. 16i + 15 rounded to the nearest bf16, block by
// block (zeros past K and past the last row).
void prompt_tile(void* data, size_t i) {
  const Bf16Rows& r = *static_cast<const Bf16Rows*>(data);
  for (int64_t t = 0; t < kRows; ++t) {
    const int64_t row = int64_t(i) * kRows + t;
    const float* x =
        row < r.prompts ? input_row(r.x + r.rows[row] * r.width, r.k, r.width != r.k) : nullptr;
    uint16_t* a = r.a + int64_t(i) * r.blocks * kTileValues + t * kPart;
    for (int64_t b = 0; b < r.blocks; ++b, a += kTileValues) {
      // (a block of 128's parts past K: none)
      const int64_t count = x ? std::clamp<int64_t>(r.k - b * kPart, 0, kPart) : 0;
      const __mmask16 low = count >= 16 ? 0xFFFF : (1u << count) - 1;
      const __mmask16 high = count >= 32 ? 0xFFFF : count <= 16 ? 0 : (1u << (count - 16)) - 1;
      const float* block = x + b * kPart;
      const __m512 x0 = _mm512_maskz_loadu_ps(low, block);
      const __m512 x1 = _mm512_maskz_loadu_ps(high, block + 16);
      _mm512_storeu_si512(a, (__m512i)_mm512_cvtne2ps_pbh(x1, x0));
    }
  }
}

const TileConfig& bf16_tiles() {
  static const TileConfig config = [] {
    TileConfig c{};
    c.palette = 1;
    for (int t = 0; t < 8; ++t) c.bytes[t] = 64, c.rows[t] = kRows;  // C 0-3, A 4-5, B 6-7
    return c;
  }();
  return config;
}

// Two rows of 16 floats as the 16 bf16 pairs (a[i], b[i]) of a TDPBF16PS B tile row.
inline __m512i bf16_pairs(__m512 a, __m512 b) {
  static const __m512i order = [] {
    alignas(64) int16_t index[32];
    for (int i = 0; i < 16; ++i) index[2 * i] = int16_t(i), index[2 * i + 1] = int16_t(16 + i);
    return _mm512_load_si512(index);
  }();
  return _mm512_permutexvar_epi16(order, (__m512i)_mm512_cvtne2ps_pbh(b, a));
}

// 32 floats rounded to bf16, in order (an A tile row).
inline void store_bf16(uint16_t* to, const float* from) {
  _mm512_store_si512(to, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(from + 16),
                                                      _mm512_loadu_ps(from)));
}

// Prompt rows' attention on the bf16 tiles (SlotAttention's task of a prompt row, see
// run_task): one KV head's num_q query vectors q [num_q, D] (rotated and scaled), vector n seeing
// the first first_len + n / group keys of the `keys` the task reads. The scores are bf16
// products summed in fp32 (the query and key vectors rounded to bf16, as BlockLinear rounds
// prompt rows), the softmax in fp32 as on the float path, its numerators rounded to bf16 to
// weigh the values (bf16 too); out [16 ceil(num_q / 16), D] gets each vector's output.
// A vector's floats depend on its own keys only: the keys past it weigh exactly 0.
template <int DC, typename T>
void amx_prompt_attention(const float* q, int64_t num_q, int64_t group, int64_t first_len,
                          const T* key_tiles, const T* values, int64_t keys, float* out) {
  constexpr int D = DC * kTile, kChunks = D / 32;  // a product takes 32 of a vector's D
  constexpr int kRow = D + kScaleBytes<T>;
  const int64_t q_tiles = (num_q + kRows - 1) / kRows, tiles = (keys + kTile - 1) / kTile;
  const int64_t stride = (keys + 31) / 32 * 32, blocks = stride / 32;  // blocks of 32 keys
  // The tiles are all rounded first, then multiplied: a tile load of lines just stored waits
  // for the stores (rounded one tile at a time, just before its products: 1.2x slower).
  thread_local std::vector<uint16_t> a_buffer, b_buffer, v_buffer;
  thread_local std::vector<float> score_buffer;
  uint16_t* qa = tile_buffer(a_buffer, (q_tiles * kChunks + blocks) * kTileValues);
  uint16_t* pa = qa + q_tiles * kChunks * kTileValues;  // a query tile's weights [block]
  uint16_t* kb = tile_buffer(b_buffer, tiles * kChunks * kTileValues);
  uint16_t* vb = tile_buffer(v_buffer, blocks * DC * kTileValues);
  float* scores = tile_buffer(score_buffer, q_tiles * kRows * stride);
  use_tiles(bf16_tiles());
  alignas(64) static const float zeros[D] = {};
  for (int64_t n = 0; n < q_tiles * kRows; ++n)
    for (int c = 0; c < kChunks; ++c)
      store_bf16(qa + ((n / kRows * kChunks) + c) * kTileValues + n % kRows * 32,
                 n < num_q ? q + n * D + 32 * c : zeros);
  for (int64_t t = 0; t < tiles; ++t) {  // keys as B tiles [tile][32 of D]
    const T* tile = key_tiles + t * kRow * kTile;  // [D][16 positions]
    vec scale = {};  // an int8 tile's keys: codes times their scales, rounded as floats are
    if constexpr (kScaleBytes<T> > 0) scale = load_scales(tile + D * kTile);
    auto key = [&](int d) {
      if constexpr (kScaleBytes<T> > 0) return (__m512)(load(tile + d * kTile) * scale);
      else return (__m512)load(tile + d * kTile);
    };
    for (int c = 0; c < kChunks; ++c)
      for (int j = 0; j < kRows; ++j) {
        const int d = 32 * c + 2 * j;
        _mm512_store_si512(kb + (t * kChunks + c) * kTileValues + j * 32,
                           bf16_pairs(key(d), key(d + 1)));
      }
  }
  for (int64_t blk = 0; blk < blocks; ++blk)  // values as B tiles [block][16 of D], 0 past keys
    for (int sl = 0; sl < DC; ++sl)
      for (int j = 0; j < kRows; ++j) {
        const int64_t key = blk * 32 + 2 * j;
        auto row = [&](int64_t k) {
          if (k >= keys) return _mm512_setzero_ps();
          const __m512 v = (__m512)load(values + k * kRow + sl * kTile);
          if constexpr (kScaleBytes<T> > 0)
            return _mm512_mul_ps(v, _mm512_set1_ps(value_scale(values + k * kRow, D)));
          else
            return v;
        };
        _mm512_store_si512(vb + (blk * DC + sl) * kTileValues + j * 32,
                           bf16_pairs(row(key), row(key + 1)));
      }
  for (int64_t t = 0; t < tiles; ++t)
    for (int64_t qt = 0; qt < q_tiles; ++qt) {
      _tile_zero(0);
      for (int c = 0; c < kChunks; ++c) {
        _tile_loadd(4, qa + (qt * kChunks + c) * kTileValues, 64);
        _tile_loadd(6, kb + (t * kChunks + c) * kTileValues, 64);
        _tile_dpbf16ps(0, 4, 6);
      }
      _tile_stored(0, scores + qt * kRows * stride + t * kTile, stride * 4);
    }
  float inverse_sums[kRows];
  for (int64_t qt = 0; qt < q_tiles; ++qt) {
    for (int r = 0; r < kRows; ++r) {
      const int64_t n = qt * kRows + r;
      float* row = scores + n * stride;
      if (n < num_q) inverse_sums[r] = softmax_numerators(row, first_len + n / group, stride);
      else std::memset(row, 0, stride * sizeof(float));
      for (int64_t blk = 0; blk < blocks; ++blk)
        store_bf16(pa + blk * kTileValues + r * 32, row + blk * 32);
    }
    for (int s0 = 0; s0 < DC; s0 += 4) {  // 4 C tiles: 64 of D at a time
      _tile_zero(0);
      if (DC > 1) _tile_zero(1);
      if (DC > 2) {
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int64_t blk = 0; blk < blocks; ++blk) {
        _tile_loadd(4, pa + blk * kTileValues, 64);
        const uint16_t* v = vb + (blk * DC + s0) * kTileValues;
        _tile_loadd(6, v, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (DC > 1) {
          _tile_loadd(7, v + kTileValues, 64);
          _tile_dpbf16ps(1, 4, 7);
        }
        if (DC > 2) {
          _tile_loadd(6, v + 2 * kTileValues, 64);
          _tile_dpbf16ps(2, 4, 6);
          _tile_loadd(7, v + 3 * kTileValues, 64);
          _tile_dpbf16ps(3, 4, 7);
        }
      }
      float* o = out + qt * kRows * D + s0 * kTile;
      _tile_stored(0, o, D * 4);
      if (DC > 1) _tile_stored(1, o + kTile, D * 4);
      if (DC > 2) {
        _tile_stored(2, o + 2 * kTile, D * 4);
        _tile_stored(3, o + 3 * kTile, D * 4);
      }
    }
    for (int r = 0; r < kRows && qt * kRows + r < num_q; ++r)
      for (int d = 0; d < D; d += kTile) {
        float* o = out + (qt * kRows + r) * D + d;
        _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_loadu_ps(o), _mm512_set1_ps(inverse_sums[r])));
      }
  }
}

// A task's records, dequantized a chunk ahead of the tile products: each block step of the
// products calls `step`, which dequantizes the records due by then (k of the chunk's `steps`
// steps: k x records / steps of them, spread evenly), so that the vector ports dequantize
// while the AMX unit multiplies, instead of in a phase of their own. They overlap little,
// measured (1B layer, 128 tokens, one thread: products alone ~10 ms, dequantization alone ~5,
// both 17-19), and finer steps (a half, a quarter or an eighth of a record, after every
// TDPBF16PS) were slower: 0.91-0.94x at 128 tokens.
// The chunk's B tiles lie in group pairs, [group / 2][block][group % 2], so that a pair's
// tiles, read by every token pair, are 16 contiguous KB (in [block][group] order they were 4 KB
// apart, one L1 set's lines): products alone 1.1x faster.
// A chunk is a unit of the task's work: its groups (all of them, or a pair where the task
// holds C over a K block) and blocks (kChunkBlocks, a K block, or all).
template <int Bits>
struct PendingChunk {
  const uint8_t* records;  // the task's first group's record of block 0
  int64_t blocks;          // K blocks (record parts) of a group
  int64_t parts;           // parts of a record
  uint16_t* w = nullptr;   // the chunk's B tiles [group / 2][block][group % 2]
  int64_t g0 = 0, count = 0, b0 = 0, chunk = 0;  // its groups and blocks
  int64_t steps = 0, taken = 0, done = 0, g = 0, b = 0;

  void start(uint16_t* tiles, int64_t first_group, int64_t groups, int64_t first_block,
             int64_t chunk_blocks, int64_t step_count) {
    w = tiles, g0 = first_group, count = groups, b0 = first_block, chunk = chunk_blocks;
    steps = step_count;
    taken = done = g = b = 0;
  }
  __attribute__((always_inline)) void step() {
    const int64_t total = count * chunk;
    const int64_t until = taken < steps ? ++taken * total / steps : total;
    // a group's records lie in K order
    for (; done < until; ++done, ++b == chunk ? (b = 0, ++g) : 0) {
      // The part kChunkBlocks on in its group (passes: the next pass's); where a unit spans
      // all of K (held C), the one 16 on in memory, past the group's end into the next group's
      // first records, which were read cold before: 1B layers from memory, 32 rows 8-bit
      // 1.09-1.12x, 4-bit 1.04-1.06x, 128 rows 1.01-1.06x, 1,024 1.00x; 32 on no better.
      const int64_t ahead = chunk == blocks ? 16 : kChunkBlocks, u = b0 + b;
      if (chunk == blocks || u + kChunkBlocks < blocks) {
        const uint8_t* next = part(g0 + g, u + ahead);
        for (int64_t at = 0; at < part_bytes(Bits); at += 64)
          _mm_prefetch(reinterpret_cast<const char*>(next + at), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(halves(g0 + g, u + ahead)), _MM_HINT_T1);
      }
      dequantize_part<Bits>(part(g0 + g, u), halves(g0 + g, u),
                            w + ((g / 2 * chunk + b) * 2 + g % 2) * kTileValues);
    }
  }
  void finish() { taken = steps, step(); }
  // Part u of group g's records (u past the group's end: the next group's), and its record's
  // scales and minimums.
  const uint8_t* record(int64_t g, int64_t u) const {
    return records + (g * (blocks / parts) + u / parts) * record_bytes(Bits, parts);
  }
  const uint8_t* part(int64_t g, int64_t u) const {
    return record(g, u) + u % parts * part_bytes(Bits);
  }
  const uint8_t* halves(int64_t g, int64_t u) const {
    return record(g, u) + value_bytes(Bits, parts);
  }
};

constexpr int64_t kPrefetchBlocks = 2;  // A tiles ahead, prefetched into L1

// (always_inline: see prefetch_ahead)
__attribute__((always_inline)) inline void prefetch_tile(const void* tile) {
  for (int64_t at = 0; at < kTileValues * 2; at += 64)
    _mm_prefetch(static_cast<const char*>(tile) + at, _MM_HINT_T0);
}

// The C tiles (token tile tt, group g at c + (tt * count + g) * 256 floats) += the products of
// NT A tiles (a + tt * blocks KB: a token tile's blocks) with NG groups' B tiles (group g's of
// block b at w + b * stride + g KB) over `chunk` blocks, in order; zero first where `zero`.
// Each block's products are followed by a step of `pending`. Where `fetch`, the A tiles
// kPrefetchBlocks blocks ahead (past the chunk: the next call's, from next_a, unless null) and
// the next call's C tiles (next_c, unless null) are prefetched into L1: they come from L2 (a
// 128-token chunk's A tiles are 64 KB, the C tiles 32 KB), and the products wait on those
// loads. With the B tiles in pairs (PendingChunk), 1B layer 1.03-1.10x faster at 64-512 tokens.
// Where `fetch_w` (C held over all of K: a pair's B tiles, 2 x blocks KB, stream from L2 too),
// the B tiles as well (past the chunk: the next call's, from next_w, unless null).
template <int Bits, int NT, int NG>
void bf16_product(const uint16_t* a, int64_t a_stride, const uint16_t* w, int64_t stride,
                  int64_t chunk, float* c, int64_t count, bool zero, PendingChunk<Bits>& pending,
                  bool fetch, const uint16_t* next_a, const float* next_c,
                  bool fetch_w, const uint16_t* next_w, float* y, int64_t y_stride) {
  constexpr int64_t kC = kRows * kRows;
  float* c1 = c + count * kC;  // token tile 1
  if (zero) {
    _tile_zero(0);
    if constexpr (NG == 2) _tile_zero(1);
    if constexpr (NT == 2) _tile_zero(2);
    if constexpr (NT == 2 && NG == 2) _tile_zero(3);
  } else {
    _tile_loadd(0, c, 64);
    if constexpr (NG == 2) _tile_loadd(1, c + kC, 64);
    if constexpr (NT == 2) _tile_loadd(2, c1, 64);
    if constexpr (NT == 2 && NG == 2) _tile_loadd(3, c1 + kC, 64);
  }
  for (int64_t b = 0; b < chunk; ++b, w += stride, a += kTileValues) {
    _tile_loadd(4, a, 64);
    _tile_loadd(6, w, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NG == 2) {
      _tile_loadd(7, w + kTileValues, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (NT == 2) {
      _tile_loadd(5, a + a_stride, 64);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NG == 2) _tile_dpbf16ps(3, 5, 7);
    }
    // The A (or B) tiles kPrefetchBlocks blocks on (tiles `step` apart a block): this call's,
    // or past its chunk the next call's (from `next`, unless null); `pair` on, the second's
    // (always_inline: see prefetch_ahead).
    auto tiles_ahead = [&](const uint16_t* here, const uint16_t* next, int64_t step,
                           int64_t pair) __attribute__((always_inline)) {
      const int64_t ahead = b + kPrefetchBlocks;
      const uint16_t* tile = ahead < chunk ? here + kPrefetchBlocks * step
                             : next        ? next + (ahead - chunk) * step
                                           : nullptr;
      if (!tile) return;
      prefetch_tile(tile);
      if (pair) prefetch_tile(tile + pair);
    };
    if (fetch) tiles_ahead(a, next_a, kTileValues, NT == 2 ? a_stride : 0);
    if (fetch_w) tiles_ahead(w, next_w, stride, NG == 2 ? kTileValues : 0);
    if (next_c && b < NT * NG) prefetch_tile(next_c + b / NG * count * kC + b % NG * kC);
    pending.step();
  }
  if (y) {
    const int64_t bytes = y_stride * 4;
    _tile_stored(0, y, bytes);
    if constexpr (NG == 2) _tile_stored(1, y + kRows, bytes);
    if constexpr (NT == 2) _tile_stored(2, y + kRows * y_stride, bytes);
    if constexpr (NT == 2 && NG == 2) _tile_stored(3, y + kRows * y_stride + kRows, bytes);
    return;
  }
  _tile_stored(0, c, 64);
  if constexpr (NG == 2) _tile_stored(1, c + kC, 64);
  if constexpr (NT == 2) _tile_stored(2, c1, 64);
  if constexpr (NT == 2 && NG == 2) _tile_stored(3, c1 + kC, 64);
}

// One task: st.strip record groups against every prompt row, unit by unit (bf16_plan): a unit's
// records (its groups and K blocks) are multiplied with every token tile, 2 token tiles x 2
// groups at a time, while the next unit's records are dequantized (into another slot). A unit
// is kChunkBlocks blocks of all the groups (passes over K: the sums go through memory between
// passes, the same sums in the same order), or where st.held a group pair over a K block (all
// of K, or 64 blocks): the sums stay in the tile registers from its first block to its last.
// With more than one token chunk a K block's units stay dequantized while the chunks go
// through. The round trips cost: this loop alone (no dequantization) takes ~9 ns per
// TDPBF16PS in passes, ~6 with no C loads and stores, ~5 for the instruction (a
// microbenchmark); passes of 4 or 16 blocks (32 or 64 in the microbenchmark), every other pass
// in reverse order, or 2 or 8 groups per task were no faster. Over all of K both the A and the
// B tiles stream from L2 (4 KB per 4 TDPBF16PS, prefetched), hence only where they fit; there,
// one thread, the 2048-input projections of the 1B layer ran 1.05-1.21x faster than in passes
// at 16-192 tokens (gate_up 1.13-1.21x at 32-192), int8 0.96-1.19x; 1B layer 1.02-1.10x (2
// threads), engine A's prefill 1.09x.
// A blocked call's last K block stores its C tiles to y directly (tilestored, y's rows apart)
// where its rows are consecutive: at 1024 rows the C tiles (512 KB a task) were read back from
// L2/L3 for y: gate_up 1.10x, qkv 1.13x. Streaming them to y (vmovntps, no reads for
// ownership) was slower: 0.96-0.98x. Smaller calls keep the C buffer (their y stores direct:
// workload A's 128-row prefill 0.92x in one run without the A and B prefetches; with them,
// 64-192-row calls 0.99-1.05x, within a same-build control's 0.96-1.06x: no clear gain).
template <int Bits>
void bf16_task(void* data, size_t strip) {
  const Bf16Step& st = *static_cast<const Bf16Step*>(data);
  constexpr int64_t kC = kRows * kRows;
  const int64_t first = int64_t(strip) * st.strip;
  const int64_t count = std::min(st.strip, st.groups - first), blocks = st.blocks;
  const int64_t tiles = (st.prompts + kRows - 1) / kRows, a_stride = blocks * kTileValues;
  const int64_t unit_groups = std::min(st.unit_groups, count), unit_blocks = st.unit_blocks;
  const int64_t units = (count + unit_groups - 1) / unit_groups;  // group units per K block
  const int64_t k_blocks = (blocks + unit_blocks - 1) / unit_blocks;
  const int64_t chunks = (tiles + st.chunk_tiles - 1) / st.chunk_tiles;  // token chunks
  // Unit j (K block j / units, group unit j % units) lies in slot j % slots: two (the one in
  // use, the next one) with one token chunk, else a K block's units and the next one.
  const int64_t slots = chunks == 1 ? 2 : units + 1;
  const int64_t unit_values = (unit_groups + 1) / 2 * 2 * unit_blocks * kTileValues;
  thread_local std::vector<uint16_t> buffer;
  uint16_t* w = tile_buffer(buffer, slots * unit_values);  // [slot][group / 2][block][2]
  thread_local std::vector<float> sums;  // C tiles [token tile][group]
  float* c = tile_buffer(sums, tiles * count * kC);
  using Product = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, float*,
                           int64_t, bool, PendingChunk<Bits>&, bool, const uint16_t*,
                           const float*, bool, const uint16_t*, float*, int64_t);
  static constexpr Product kProducts[2][2] = {
      {bf16_product<Bits, 1, 1>, bf16_product<Bits, 1, 2>},
      {bf16_product<Bits, 2, 1>, bf16_product<Bits, 2, 2>}};
  // Where the call is blocked (more than one token chunk), its token tiles whole, consecutive
  // rows of y and its groups' outputs all in y, its last K block stores the C tiles to y
  // directly (else to c, copied at the end).
  auto to_y = [&](int64_t t, int64_t g, int64_t nt, int64_t ng) -> float* {
    const int64_t last = (t + nt) * kRows - 1;
    if (chunks == 1 || last >= st.prompts ||
        st.rows[last] - st.rows[t * kRows] != last - t * kRows ||
        (first + g + ng) * kRows > st.n)
      return nullptr;
    return st.y + st.rows[t * kRows] * st.n + (first + g) * kRows;
  };
  use_tiles(bf16_tiles());
  PendingChunk<Bits> pending{
      st.weights + first * blocks / st.parts * record_bytes(Bits, st.parts), blocks, st.parts};
  pending.start(w, 0, unit_groups, 0, std::min(unit_blocks, blocks), 0);
  pending.finish();
  // (in passes, one token pair's A tiles stay in L1: nothing to prefetch)
  const bool fetch = st.held || tiles > 2;
  // Step (kb, tc, gu): group unit gu's products with token chunk tc over K block kb, in that
  // order; a unit is dequantized during its predecessor's products with the first chunk.
  for (int64_t kb = 0, tc = 0, gu = 0; kb < k_blocks;) {
    const int64_t j = kb * units + gu, g0 = gu * unit_groups, b0 = kb * unit_blocks;
    const int64_t groups = std::min(unit_groups, count - g0);
    const int64_t chunk = std::min(unit_blocks, blocks - b0);
    const int64_t t0 = tc * st.chunk_tiles, t1 = std::min(tiles, t0 + st.chunk_tiles);
    int64_t nkb = kb, ntc = tc, ngu = gu + 1;  // the next step
    if (ngu == units) ngu = 0, ++ntc;
    if (ntc == chunks) ntc = 0, ++nkb;
    const int64_t nt0 = ntc * st.chunk_tiles, ng0 = ngu * unit_groups, nb0 = nkb * unit_blocks;
    uint16_t* wc = w + j % slots * unit_values;
    uint16_t* wn = w + (nkb * units + ngu) % slots * unit_values;
    asm volatile("" ::: "memory");  // tileloadd's asm does not say that it reads them
    const int64_t due = j + 1;  // the next unit to dequantize, during the first chunk
    const int64_t due_g = due % units * unit_groups, due_b = due / units * unit_blocks;
    const bool dequantize = tc == 0 && due_b < blocks;
    pending.start(w + due % slots * unit_values, due_g,
                  dequantize ? std::min(unit_groups, count - due_g) : 0, due_b,
                  std::min(unit_blocks, blocks - due_b),
                  (groups + 1) / 2 * ((t1 - t0 + 1) / 2) * chunk);
    for (int64_t g = g0; g < g0 + groups; g += 2)
      for (int64_t t = t0; t < t1; t += 2) {
        int64_t nt = t + 2, ng = g, nb = b0;  // the next call's token tile, group and block
        if (nt >= t1) nt = t0, ng += 2;
        const bool same = ng < g0 + groups;  // in this step
        if (!same) nt = nt0, ng = ng0, nb = nb0;
        const bool ahead = nb < blocks;
        const uint16_t* nw = same ? wc + (ng - g0) * chunk * kTileValues : wn;
        kProducts[t + 1 < t1][g + 1 < count](
            st.a + t * a_stride + b0 * kTileValues, a_stride, wc + (g - g0) * chunk * kTileValues,
            2 * kTileValues, chunk, c + (t * count + g) * kC, count, b0 == 0, pending, fetch,
            fetch && ahead ? st.a + nt * a_stride + nb * kTileValues : nullptr,
            fetch && ahead && nb > 0 ? c + (nt * count + ng) * kC : nullptr, st.held,
            ahead ? nw : nullptr,
            b0 + chunk == blocks ? to_y(t, g, 1 + (t + 1 < t1), 1 + (g + 1 < count)) : nullptr,
            st.n);
      }
    pending.finish();
    asm volatile("" ::: "memory");  // a later unit overwrites these tiles
    kb = nkb, tc = ntc, gu = ngu;
  }
  for (int64_t t0 = 0; t0 < tiles; t0 += st.chunk_tiles)  // the calls' tiles (as above)
    for (int64_t g = 0, t1 = std::min(tiles, t0 + st.chunk_tiles); g < count; g += 2)
      for (int64_t t = t0; t < t1; t += 2) {
        const int64_t nt = 1 + (t + 1 < t1), ng = 1 + (g + 1 < count);
        if (to_y(t, g, nt, ng)) continue;
        for (int64_t i = t; i < t + nt; ++i)
          for (int64_t j = g; j < g + ng; ++j) {
            const int64_t col = (first + j) * kRows;
            const float* ct = c + (i * count + j) * kC;
            for (int64_t r = 0; r < kRows; ++r) {
              const int64_t row = i * kRows + r;
              if (row < st.prompts && col < st.n)
                Isa::store(st.y + st.rows[row] * st.n + col, _mm512_load_ps(ct + r * kRows),
                           st.n - col);
            }
          }
      }
}
#endif
#endif

// One record group (16 output rows) for every token, in tiles of up to kTokenTile tokens, its
// weights (16 rows x K, a few KB) staying in cache from tile to tile: a task of a call of
// several tokens (4-token tiles: ~1 TFLOP/s on 32-128 tokens). A task takes a run of groups
// (plan_runs).

// The tokens after the whole tiles (0 to kTokenTile - 1) as one tile of that many.
template <int Bits, int Parts, int TT = kTokenTile - 1>
void block_rest(const BlockStep& st, int64_t group, int64_t token) {
  if constexpr (TT > 0) {
    if (st.tokens - token == TT) block_tile<Bits, Parts, TT>(st, group, token);
    else block_rest<Bits, Parts, TT - 1>(st, group, token);
  }
}

// Whether a call's later tiles prefetch the next group's records (prefetch_next_group): in
// blocks of 128 only (blocks of 32: Zen 4 0.98-1.04x, Intel 4 bits 0.93-0.98x at 24-64 tokens).
// On Intel (a 2-core Xeon with AMX; its avx512_vnni and avx2 builds alike) one later tile's
// share of the lines comes as a burst of its own: 8-bit blocks of 128, one later tile
// 0.89-0.94x, two 0.96-1.00x, three or more 1.06-1.19x; on AMD (Zen 4) 1.2x from one. Never
// after AMX's tiles, which read the group first (a rest tile there: 0.85-0.90x on that Xeon).
inline bool spreads_next_group([[maybe_unused]] int64_t tokens, int64_t parts) {
#ifndef BLOCK_LINEAR_SIMD
  return false;  // (no prefetches)
#else
  if (parts == 1) return false;
#ifdef __AMX_INT8__
  if (tokens >= kAmxFrom) return false;
#endif
  static const bool amd = (__builtin_cpu_init(), __builtin_cpu_is("amd"));
  return amd || tokens >= 3 * kTokenTile;
#endif
}

// Tokens from `t` of a record group: a call's one whole 16-token tile on AMX (more: amx_sliced,
// in block_task), the rest on the VNNI tiles.
template <int Bits, int Parts>
void block_group(const BlockStep& st, int64_t group, int64_t t = 0) {
#ifdef __AMX_INT8__
  if (t == 0 && st.tokens >= kAmxFrom) t = amx_tile<Bits, Parts>(st, group);
#endif
  for (; t + kTokenTile <= st.tokens; t += kTokenTile)
    block_tile<Bits, Parts, kTokenTile>(st, group, t);
  block_rest<Bits, Parts>(st, group, t);
}

constexpr int64_t kLeastRunBytes = 32768;
// A call's tasks: runs of consecutive record groups, each 1 / (2 x threads) of the
// groups left, down to ~32 KB of records (guided scheduling: ONNX Runtime hands tasks out in
// order). Each thread so streams long runs of records, prefetched ahead (prefetch_ahead), rather
// than every other group, and the small last runs even out the threads' ends. runs: the
// first group of each task, then the number of groups.
void plan_runs(int64_t groups, int64_t group_bytes, int threads, std::vector<int64_t>& runs) {
  const int64_t least = std::max<int64_t>(1, kLeastRunBytes / group_bytes);
  runs.assign(1, 0);
  for (int64_t g = 0; g < groups; runs.push_back(g))
    g = std::min(groups, g + std::max(least, (groups - g) / (2 * threads)));
}

// The calling thread's bit in BlockStep::threads (a pool thread's own, up to 64 threads).
inline uint64_t thread_bit() {
  static std::atomic<int> threads_seen{0};
  thread_local const uint64_t bit = uint64_t{1} << (threads_seen++ % 64);
  return bit;
}

// Task i: groups [runs[i], runs[i + 1]).
template <int Bits, int Parts>
void block_task(void* data, size_t task) {
  const BlockStep& st = *static_cast<const BlockStep*>(data);
  st.threads->fetch_or(thread_bit(), std::memory_order_relaxed);
#ifdef __AMX_INT8__
  if (st.tokens >= kAmxFrom) configure_tiles<Parts>();  // once a task: TILESTORECFG stalls
  if (st.tokens >= 2 * kAmxTokens) {  // (one tile: amx_tile, in block_group)
    const int64_t tiles = st.tokens / kAmxTokens, tiled = tiles * kAmxTokens;
    const int64_t passes = (tiles + kAmxPass - 1) / kAmxPass;  // of equal size, or nearly
    for (int64_t g = st.runs[task], end = st.runs[task + 1]; g < end; g += kSliceGroups) {
      const int64_t count = std::min(kSliceGroups, end - g);
      for (int64_t pass = 0; pass < passes; ++pass) {
        const int64_t t0 = pass * tiles / passes;
        amx_sliced<Bits, Parts>(st, g, count, t0, (pass + 1) * tiles / passes - t0);
      }
      if (tiled < st.tokens)
        for (int64_t i = g; i < g + count; ++i) block_group<Bits, Parts>(st, i, tiled);
    }
    return;
  }
#endif
  for (int64_t g = st.runs[task]; g < st.runs[task + 1]; ++g) block_group<Bits, Parts>(st, g);
}

// An optional int attribute's value, or `absent`.
int64_t attribute_or(const OrtKernelInfo* info, const char* name, int64_t absent) {
  try {
    return Ort::ConstKernelInfo(info).GetAttribute<int64_t>(name);
  } catch (const Ort::Exception&) {
    return absent;
  }
}

// The attributes of a packed block matrix [N, K] (BlockLinear's and BlockGather's), checked.
struct BlockMatrix {
  int64_t k, n, bits, block, parts, blocks, groups;

  BlockMatrix(const OrtKernelInfo* info, const char* op) {
    Ort::ConstKernelInfo ki(info);
    k = ki.GetAttribute<int64_t>("K");
    n = ki.GetAttribute<int64_t>("N");
    bits = ki.GetAttribute<int64_t>("bits");
    if (bits != 4 && bits != 8) ORT_CXX_API_THROW(std::string(op) + ": bits must be 4 or 8",
                                                  ORT_INVALID_ARGUMENT);
    block = attribute_or(info, "block", kPart);
    if (block != kPart && block != kWidePart * kPart)
      ORT_CXX_API_THROW(std::string(op) + ": block must be 32 or 128", ORT_INVALID_ARGUMENT);
    parts = block / kPart;
    blocks = (k + block - 1) / block;
    groups = (n + kRows - 1) / kRows;
  }

  int64_t record() const { return record_bytes(bits, parts); }

  void check(const Ort::ConstValue& weights, const char* op) const {
    if (weights.GetTensorTypeAndShapeInfo().GetShape() !=
        std::vector<int64_t>{groups, blocks, record()})
      ORT_CXX_API_THROW(std::string(op) + ": weights must be [ceil(N/16), ceil(K/" +
                            std::to_string(block) + "), " + std::to_string(record()) + "]",
                        ORT_INVALID_ARGUMENT);
  }
};

struct BlockLinearKernel {
  BlockMatrix m;
  int64_t width;  // x's row: K, or 2K where swiglu (gate_up)
  // The most threads seen running one call's runs (ONNX Runtime does not tell a custom op its
  // pool's size): the next calls' runs are planned for them.
  mutable std::atomic<int> threads{2};

  BlockLinearKernel(const OrtApi&, const OrtKernelInfo* info)
      : m(info, "BlockLinear"), width(m.k) {
    const int64_t swiglu = attribute_or(info, "swiglu", 0);
    if (swiglu != 0 && swiglu != 1)
      ORT_CXX_API_THROW("BlockLinear: swiglu must be 0 or 1", ORT_INVALID_ARGUMENT);
    width = swiglu ? 2 * m.k : m.k;
  }

  struct Rows {
    const float* x;
    int64_t k, width, blocks;
    int8_t* q;
    float* scale;
    float* sum;
  };

  template <int Block>
  static void quantize(void* data, size_t t) {
    const Rows& r = *static_cast<const Rows*>(data);
    quantize_row<Block>(input_row(r.x + t * r.width, r.k, r.width != r.k), r.k, r.blocks,
                        r.q + t * r.blocks * Block, r.scale + t * r.blocks,
                        r.sum + t * r.blocks);
  }

  // y [tokens, N] of x [tokens, K] on the int8 path.
  void int8_rows(Ort::KernelContext& ctx, const float* x, int64_t tokens, const uint8_t* weights,
                 float* y) const {
    thread_local std::vector<int8_t> q;
    thread_local std::vector<float> scale, sum;
    q.resize(tokens * m.blocks * m.block);
    scale.resize(tokens * m.blocks);
    sum.resize(tokens * m.blocks);
    Rows rows{x, m.k, width, m.blocks, q.data(), scale.data(), sum.data()};
    const bool wide = m.parts > 1;
    ctx.ParallelFor(wide ? quantize<kWidePart * kPart> : quantize<kPart>, tokens, 0, &rows);
    BlockStep st{weights, q.data(), scale.data(), sum.data(), y, tokens, m.n, m.blocks,
                 nullptr, nullptr};
    st.spread = spreads_next_group(tokens, m.parts);
#ifdef __AMX_INT8__
    if (tokens >= kAmxFrom) {
      thread_local std::vector<int8_t> a;
      thread_local std::vector<float> tile_scale, tile_sum;
      const int64_t tiles = tokens / kAmxTokens, values = tiles * m.blocks * kAmxTokens;
      st.amx = {tile_buffer(a, values * m.block), tile_buffer(tile_scale, values),
                tile_buffer(tile_sum, values)};
      ctx.ParallelFor(wide ? amx_layout<kWidePart> : amx_layout<1>, tiles, 0, &st);
    }
#endif
    auto task = m.bits == 4 ? (wide ? block_task<4, kWidePart> : block_task<4, 1>)
                            : (wide ? block_task<8, kWidePart> : block_task<8, 1>);
    thread_local std::vector<int64_t> runs;
    plan_runs(m.groups, m.blocks * m.record(), threads, runs);
    std::atomic<uint64_t> seen{0};
    st.runs = runs.data();
    st.threads = &seen;
    ctx.ParallelFor(task, runs.size() - 1, 0, &st);
    const int count = __builtin_popcountll(seen.load());
    if (count > threads) threads = count;
  }

#ifdef AMX_BF16
  // y's rows `prompt` of x on the bf16 path; the others (generated tokens) on the int8 path.
  void bf16_rows(Ort::KernelContext& ctx, const float* x, int64_t tokens,
                 const std::vector<int64_t>& prompt, const uint8_t* weights, float* y) const {
    const int64_t prompts = static_cast<int64_t>(prompt.size());
    const int64_t tiles = (prompts + kRows - 1) / kRows;
    thread_local std::vector<uint16_t> buffer;
    const int64_t parts = m.blocks * m.parts;  // the bf16 tiles' K unit
    uint16_t* a = tile_buffer(buffer, tiles * parts * kTileValues);
    Bf16Rows rows{x, prompt.data(), m.k, width, parts, prompts, a};
    ctx.ParallelFor(prompt_tile, tiles, 0, &rows);
    const int64_t a_bytes = tiles * parts * kTileValues * 2;
    Bf16Step st{weights, a, prompt.data(), y, prompts, m.n, parts, m.groups, m.parts};
    bf16_plan(st, tiles, a_bytes);
    ctx.ParallelFor(m.bits == 4 ? bf16_task<4> : bf16_task<8>,
                    (m.groups + st.strip - 1) / st.strip, 0, &st);
    if (prompts == tokens) return;
    // The generated rows, gathered, through the int8 path, and back to their places.
    thread_local std::vector<float> xg, yg;
    std::vector<int64_t> generated;
    for (int64_t t = 0, i = 0; t < tokens; ++t)
      if (i < prompts && prompt[i] == t) ++i;
      else generated.push_back(t);
    const int64_t count = static_cast<int64_t>(generated.size());
    xg.resize(count * width);
    yg.resize(count * m.n);
    for (int64_t i = 0; i < count; ++i)
      std::memcpy(&xg[i * width], x + generated[i] * width, width * sizeof(float));
    int8_rows(ctx, xg.data(), count, weights, yg.data());
    for (int64_t i = 0; i < count; ++i)
      std::memcpy(y + generated[i] * m.n, &yg[i * m.n], m.n * sizeof(float));
  }
#endif

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] {
      Ort::KernelContext ctx(context);
      auto x = ctx.GetInput(0), weights = ctx.GetInput(1);
      auto shape = x.GetTensorTypeAndShapeInfo().GetShape();
      if (shape.empty() || shape.back() != width)
        ORT_CXX_API_THROW(width == m.k ? "BlockLinear: x must be [..., K]"
                                       : "BlockLinear: x must be [..., 2K] (swiglu: gate, up)",
                          ORT_INVALID_ARGUMENT);
      m.check(weights, "BlockLinear");
      int64_t tokens = 1;
      for (size_t i = 0; i + 1 < shape.size(); ++i) tokens *= shape[i];
      shape.back() = m.n;
      float* y = ctx.GetOutput(0, shape).GetTensorMutableData<float>();
      if (tokens == 0) return;
      const float* xs = x.GetTensorData<float>();
      const uint8_t* w = weights.GetTensorData<uint8_t>();
      auto roles = ctx.GetInputCount() > 2 ? ctx.GetInput(2) : Ort::ConstValue{nullptr};
      if (roles != nullptr &&
          roles.GetTensorTypeAndShapeInfo().GetElementCount() != size_t(tokens))
        ORT_CXX_API_THROW("BlockLinear: prompt_rows needs one entry per token row of x",
                          ORT_INVALID_ARGUMENT);
#ifdef AMX_BF16
      if (roles != nullptr) {
        const uint8_t* role = roles.GetTensorData<uint8_t>();
        const bool either = bf16_either(role, tokens, m.bits, m.parts);
        thread_local std::vector<int64_t> prompt;  // the rows on the bf16 path
        prompt.clear();
        for (int64_t t = 0; t < tokens; ++t)
          if (role[t] == kPromptRole || (role[t] == kEitherRole && either))
            prompt.push_back(t);
        if (!prompt.empty()) return bf16_rows(ctx, xs, tokens, prompt, w, y);
      }
#endif
      int8_rows(ctx, xs, tokens, w, y);
    });
  }
};

struct BlockLinearOp : CpuOp<BlockLinearOp, BlockLinearKernel> {
  const char* GetName() const { return "BlockLinear"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 2 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
};

// BlockGather: rows [..., K] = W[ids] for int64 ids (input 0) and a matrix packed as
// BlockLinear's weights (input 1), each row dequantized as it is gathered (w = q * scale +
// min): an embedding kept in its blocks, which a tied LM head (BlockLinear) reads too.
// Attributes: K, N, bits.
struct BlockGatherKernel {
  BlockMatrix m;

  BlockGatherKernel(const OrtApi&, const OrtKernelInfo* info) : m(info, "BlockGather") {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] {
      Ort::KernelContext ctx(context);
      auto ids = ctx.GetInput(0), weights = ctx.GetInput(1);
      m.check(weights, "BlockGather");
      auto shape = ids.GetTensorTypeAndShapeInfo().GetShape();
      const int64_t count = ids.GetTensorTypeAndShapeInfo().GetElementCount();
      shape.push_back(m.k);
      float* out = ctx.GetOutput(0, shape).GetTensorMutableData<float>();
      const int64_t* id = ids.GetTensorData<int64_t>();
      const uint8_t* w = weights.GetTensorData<uint8_t>();
      const int64_t record = m.record();
      for (int64_t t = 0; t < count; ++t, out += m.k) {
        if (id[t] < 0 || id[t] >= m.n)
          ORT_CXX_API_THROW("BlockGather: id " + std::to_string(id[t]) + " is not below N = " +
                                std::to_string(m.n), ORT_INVALID_ARGUMENT);
        const int r = static_cast<int>(id[t] % kRows);
        const uint8_t* rec = w + id[t] / kRows * m.blocks * record;
        for (int64_t b = 0; b < m.blocks; ++b, rec += record) {
          const float scale = record_half(rec, m.bits, m.parts, r);
          const float minimum = record_half(rec, m.bits, m.parts, kRows + r);
          const int width = static_cast<int>(std::min<int64_t>(m.block, m.k - b * m.block));
          for (int i = 0; i < width; ++i)
            out[b * m.block + i] = record_code(rec, m.bits, r, i) * scale + minimum;
        }
      }
    });
  }
};

struct BlockGatherOp : CpuOp<BlockGatherOp, BlockGatherKernel> {
  const char* GetName() const { return "BlockGather"; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  static SlotAttentionOp<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT> op_float;
  static SlotAttentionOp<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16> op_half;
  static SlotAttentionOp<ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8> op_int8;
  static SwiGLUOp swiglu;
  static SkipRMSNormOp skip_rms_norm;
  static BlockLinearOp block_linear;
  static BlockGatherOp block_gather;
  static Ort::CustomOpDomain domain{"nanovllm"};
  static bool added = false;
  if (!added) {
    domain.Add(&op_float);
    domain.Add(&op_half);
    domain.Add(&op_int8);
    domain.Add(&swiglu);
    domain.Add(&skip_rms_norm);
    domain.Add(&block_linear);
    domain.Add(&block_gather);
    added = true;
  }
  Ort::UnownedSessionOptions(options).Add(domain);
  return nullptr;
}

// Sampling: engine/sampler.py's draw from softmax(x) over the whole vocabulary, row by row,
// called through ctypes: a row's weights e^(x - max) in token order, summed by blocks of
// kDrawBlock; the block where u x their total falls, then, by how far into it u fell, the token
// inside it (two short walks rather than one over the vocabulary). numpy took ~6 ms a step for
// 32 rows of 128,256 logits (4 passes over them, the weights written back); this reads a row
// once for its maximum and once for its weights. -inf (a masked token) weighs exactly 0, told
// by its bits: -ffast-math may assume no infinities.
namespace sampling {
constexpr int64_t kDrawBlock = 256;
constexpr uint32_t kMinusInfinity = 0xFF800000u;

// w[i] = e^(x[i] - peak) for i < n (n <= kDrawBlock); returns their sum.
inline float block_weights(const float* x, int64_t n, float peak, float* w) {
#ifdef __AVX512F__
  const __m512 shift = _mm512_set1_ps(peak);
  const __m512i masked = _mm512_set1_epi32(int(kMinusInfinity));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += kTile) {
    const __mmask16 lanes = n - i >= kTile ? 0xFFFF : (1u << (n - i)) - 1;
    const __m512 v = _mm512_maskz_loadu_ps(lanes, x + i);
    const __mmask16 live = _mm512_mask_cmpneq_epi32_mask(lanes, _mm512_castps_si512(v), masked);
    const __m512 e = _mm512_maskz_mov_ps(live, exp_ps(_mm512_sub_ps(v, shift)));
    _mm512_mask_storeu_ps(w + i, lanes, e);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
#else
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, 4);
    w[i] = bits == kMinusInfinity ? 0.f : std::exp(x[i] - peak);
    sum += w[i];
  }
  return sum;
#endif
}

inline float row_max(const float* x, int64_t n) {
#ifdef __AVX512F__
  __m512 peak = _mm512_set1_ps(x[0]);
  int64_t i = 0;
  for (; i + kTile <= n; i += kTile) peak = _mm512_max_ps(peak, _mm512_loadu_ps(x + i));
  float top = _mm512_reduce_max_ps(peak);
#else
  float top = x[0];
  int64_t i = 1;
#endif
  for (; i < n; ++i) top = std::max(top, x[i]);
  return top;
}

// The entry of w [n] where the fraction u of their (double) running sum falls; the last
// entry with weight where rounding puts it past the end. Returns it, and in u how far into
// that entry it fell.
inline int64_t walk(const float* w, int64_t n, double& u) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += w[i];
  const double target = u * total;
  double below = 0.0;
  int64_t last = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (w[i] <= 0.f) continue;
    last = i;
    if (below + w[i] > target) {
      u = (target - below) / w[i];
      return i;
    }
    below += w[i];
  }
  u = 0.999999;
  return last;
}

void draw_rows(const float* x, int64_t rows, int64_t vocab, const double* u, int64_t* tokens) {
  const int64_t blocks = (vocab + kDrawBlock - 1) / kDrawBlock;
  std::vector<float> sums(blocks);
  alignas(64) float w[kDrawBlock];
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * vocab;
    const float peak = row_max(row, vocab);
    for (int64_t b = 0; b < blocks; ++b)
      sums[b] = block_weights(row + b * kDrawBlock, std::min(kDrawBlock, vocab - b * kDrawBlock),
                              peak, w);
    double at = u[r];
    const int64_t b = walk(sums.data(), blocks, at);
    const int64_t n = std::min(kDrawBlock, vocab - b * kDrawBlock);
    block_weights(row + b * kDrawBlock, n, peak, w);
    tokens[r] = b * kDrawBlock + walk(w, n, at);
  }
}
}  // namespace sampling

// tokens [rows] drawn from softmax(x [rows, vocab]) with one uniform u [rows] each.
extern "C" __attribute__((visibility("default"))) void NanovllmDrawRows(
    const float* x, int64_t rows, int64_t vocab, const double* u, int64_t* tokens) {
  sampling::draw_rows(x, rows, vocab, u, tokens);
}

// Conversion: BlockLinear's weights made from float rows, called through ctypes by
// convert/graph.py (numpy spent 80% of a 1B model's int4 conversion in its version of this).
// The float arithmetic is numpy's, value for value: a division a / b is a * (1 / b) in double
// (what -ffast-math would make of it), which rounded to float32 is still the correctly rounded
// quotient (the double's error is far below the distance of a float quotient to a rounding
// boundary), so the bytes are those numpy's float32 arithmetic gave.
namespace convert {

inline float quotient(float a, float b) { return static_cast<float>(a * (1. / b)); }

inline uint16_t half_bits(float x) {
  const _Float16 h = static_cast<_Float16>(x);  // to nearest, ties to even
  uint16_t bits;
  std::memcpy(&bits, &h, 2);
  return bits;
}
inline float half_value(uint16_t bits) {
  _Float16 h;
  std::memcpy(&h, &bits, 2);
  return static_cast<float>(h);
}
// x as an fp16 value: the nearest, or the nearest on the side of `direction` (+1 or -1) of x.
inline float to_half(float x, int direction = 0) {
  uint16_t bits = half_bits(x);
  const float h = half_value(bits);
  if (direction > 0 ? h < x : direction < 0 && h > x) {  // one fp16 step towards direction
    const bool negative = bits & 0x8000;
    if ((bits & 0x7FFF) == 0) bits = direction > 0 ? 0x0001 : 0x8001;
    else bits += (negative == (direction < 0)) ? 1 : -1;
  }
  return half_value(bits);
}

// A weight as float32: float32 itself, or bfloat16 (a checkpoint's own: the top half of a
// float32's bits), read without a float32 copy of the tensor.
inline float value(float w) { return w; }
inline float value(uint16_t w) {
  const uint32_t bits = uint32_t(w) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// The nearest codes 0 .. top of a block's `block` values v against a scale and minimum (code
// 0 where the scale is 0).
inline void block_codes(const float* v, int64_t block, float scale, float minimum, float top,
                        uint8_t* q) {
  const double inverse = scale == 0.f ? 0. : 1. / scale;
  for (int64_t i = 0; i < block; ++i) {
    const float code = std::nearbyint(static_cast<float>((v[i] - minimum) * inverse));
    q[i] = static_cast<uint8_t>(std::min(std::max(code, 0.f), top));
  }
}

template <int Bits>
void pack(const uint8_t* q, const uint16_t* scale, const uint16_t* minimum, int64_t n,
          int64_t blocks, int64_t parts, uint8_t* out) {
  const int64_t record = record_bytes(Bits, parts), values = value_bytes(Bits, parts);
  for (int64_t g = 0; g < (n + kRows - 1) / kRows; ++g) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, n - g * kRows));
    for (int64_t b = 0; b < blocks; ++b, out += record) {
      if (rows < kRows) std::memset(out, 0, record);
      for (int r = 0; r < rows; ++r) {
        const int64_t at = (g * kRows + r) * blocks + b;
        for (int64_t s = 0; s < parts; ++s) {
          const uint8_t* codes = q + at * parts * kPart + s * kPart;
          for (int v = 0; v < 8; v += 1 + (Bits == 4)) {  // vector v: inputs 4v .. 4v + 3
            uint8_t* dst = out + s * part_bytes(Bits) + (Bits == 8 ? v : v / 2) * 64 + r * 4;
            for (int c = 0; c < 4; ++c)
              dst[c] = Bits == 8 ? codes[4 * v + c] : codes[4 * v + c] | codes[4 * v + 4 + c] << 4;
          }
        }
        std::memcpy(out + values + 2 * r, scale + at, 2);
        std::memcpy(out + values + 2 * (kRows + r), minimum + at, 2);
      }
    }
  }
}

}  // namespace convert

namespace convert {

#ifdef __F16C__
// 8 floats to their fp16 values, rounded as `Rounding` says (to nearest, down or up: to_half's
// three directions in one instruction).
template <int Rounding>
inline __m256 to_half8(__m256 x) {
  return _mm256_cvtph_ps(_mm256_cvtps_ph(x, Rounding | _MM_FROUND_NO_EXC));
}
// quotient(a, divisor) of 8 floats, `inverse` = 1 / divisor.
inline __m256 quotient8(__m256 a, __m256d inverse) {
  const __m128 low = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(a)),
                                                   inverse));
  const __m128 high = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)),
                                                    inverse));
  return _mm256_set_m128(high, low);
}
#endif

// The fp16-valued scales and minimums of blocks with these extremes: symmetric, or from the
// minimum rounded down with the scale rounded up (the extremes need no code past the range).
// 8 blocks at a time where the CPU converts to fp16 in vectors (F16C): scalar, with its
// branches, this took a third of the quantizer's time.
inline void block_ranges(const float* least, const float* greatest, int64_t blocks,
                         int64_t bits, int64_t symmetric, float* scale, float* minimum) {
  const float top = float((1 << bits) - 1), tiny = 6.103515625e-05f;  // fp16's least normal
  const float half = float(1 << (bits - 1));
  int64_t b = 0;
#ifdef __F16C__
  const __m256d inverse = _mm256_set1_pd(1. / (symmetric ? half - 1 : top));
  const __m256 least_normal = _mm256_set1_ps(tiny);
  for (; b + 8 <= blocks; b += 8) {
    const __m256 low = _mm256_loadu_ps(least + b), high = _mm256_loadu_ps(greatest + b);
    __m256 s, m;
    if (symmetric) {
      const __m256 peak = _mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), low), high);
      s = to_half8<_MM_FROUND_TO_NEAREST_INT>(
          _mm256_max_ps(quotient8(peak, inverse), least_normal));
      m = to_half8<_MM_FROUND_TO_NEAREST_INT>(_mm256_mul_ps(_mm256_set1_ps(-half), s));
    } else {
      m = to_half8<_MM_FROUND_TO_NEG_INF>(low);
      s = to_half8<_MM_FROUND_TO_POS_INF>(
          _mm256_max_ps(quotient8(_mm256_sub_ps(high, m), inverse), least_normal));
    }
    _mm256_storeu_ps(scale + b, s);
    _mm256_storeu_ps(minimum + b, m);
  }
#endif
  for (; b < blocks; ++b) {
    if (symmetric) {
      scale[b] = to_half(std::max(quotient(std::max(-least[b], greatest[b]), half - 1), tiny));
      minimum[b] = to_half(-half * scale[b]);
    } else {
      minimum[b] = to_half(least[b], -1);
      scale[b] = to_half(std::max(quotient(greatest[b] - minimum[b], top), tiny), +1);
    }
  }
}

// Row by row: the row as floats (zeros past k), each block's extremes, the blocks' scales and
// minimums, then the codes: each a loop over the whole row, which the compiler vectorizes
// (block by block, the per-block steps between them stayed scalar: 2.5-4x slower).
template <typename T>
void quantize_blocks(const T* w, int64_t n, int64_t k, int64_t block, int64_t bits,
                     int64_t symmetric, uint8_t* q, float* scale, float* minimum) {
  const int64_t blocks = (k + block - 1) / block;
  const float top = float((1 << bits) - 1);
  std::vector<float> row(blocks * block, 0.f), least(blocks), greatest(blocks);
  float* v = row.data();
  for (int64_t r = 0; r < n; ++r, w += k, q += blocks * block, scale += blocks,
               minimum += blocks) {
    for (int64_t i = 0; i < k; ++i) v[i] = value(w[i]);
    for (int64_t b = 0; b < blocks; ++b) {
      const float* values = v + b * block;
      float lo = values[0], hi = values[0];
      for (int64_t i = 1; i < block; ++i) {
        lo = std::min(lo, values[i]);
        hi = std::max(hi, values[i]);
      }
      least[b] = lo;
      greatest[b] = hi;
    }
    block_ranges(least.data(), greatest.data(), blocks, bits, symmetric, scale, minimum);
    for (int64_t b = 0; b < blocks; ++b)
      block_codes(v + b * block, block, scale[b], minimum[b], top, q + b * block);
  }
}

// w [n, k] straight to BlockLinear's records, 16 rows at a time: no codes array the size of
// the weight (fresh pages the kernel zeroes) between quantize_blocks and pack.
template <typename T>
void quantize_packed(const T* w, int64_t n, int64_t k, int64_t block, int64_t bits,
                     int64_t symmetric, uint8_t* out) {
  const int64_t blocks = (k + block - 1) / block, values = kRows * blocks, parts = block / kPart;
  std::vector<uint8_t> q(values * block);
  std::vector<float> scale(values), minimum(values);
  std::vector<uint16_t> scale_bits(values), minimum_bits(values);
  for (int64_t r = 0; r < n; r += kRows, w += kRows * k,
               out += blocks * record_bytes(bits, parts)) {
    const int64_t rows = std::min<int64_t>(kRows, n - r);
    quantize_blocks(w, rows, k, block, bits, symmetric, q.data(), scale.data(), minimum.data());
    for (int64_t i = 0; i < rows * blocks; ++i) {  // fp16 values already: exact
      scale_bits[i] = half_bits(scale[i]);
      minimum_bits[i] = half_bits(minimum[i]);
    }
    (bits == 8 ? pack<8> : pack<4>)(q.data(), scale_bits.data(), minimum_bits.data(), rows,
                                    blocks, parts, out);
  }
}

// int8's per-channel scales of w [n, k]: max(max |w| of the row, 1e-12) / 127.
template <typename T>
void channel_scales(const T* w, int64_t n, int64_t k, float* scale) {
  for (int64_t r = 0; r < n; ++r) {
    float peak = 0.f;
    for (int64_t c = 0; c < k; ++c) peak = std::max(peak, std::fabs(value(w[r * k + c])));
    scale[r] = quotient(std::max(peak, 1e-12f), 127.f);
  }
}

// The codes of inputs [first, last) of w [n, k], transposed: qt[(c - first) * ld + r] = the
// nearest of -127 .. 127 to w[r, c] / scale[r].
template <typename T>
void channel_codes(const T* w, int64_t n, int64_t k, int64_t first, int64_t last,
                   const float* scale, int8_t* qt, int64_t ld) {
  constexpr int64_t kTileRows = 64;  // rows transposed together: 64-byte runs of qt
  double inverse[kTileRows];
  for (int64_t r0 = 0; r0 < n; r0 += kTileRows) {
    const int64_t rows = std::min(kTileRows, n - r0);
    for (int64_t r = 0; r < rows; ++r) inverse[r] = 1. / scale[r0 + r];
    for (int64_t c = first; c < last; ++c) {
      for (int64_t r = 0; r < rows; ++r) {
        const float code = std::nearbyint(
            static_cast<float>(value(w[(r0 + r) * k + c]) * inverse[r]));
        qt[(c - first) * ld + r0 + r] = static_cast<int8_t>(std::min(std::max(code, -127.f),
                                                                     127.f));
      }
    }
  }
}

}  // namespace convert

// w [n, k] (float32, or bfloat16 where `bf16`; K padded with zeros to whole blocks of `block`,
// 32 or 128) to `bits` codes q [n, blocks, block] and fp16-valued scales and minimums [n,
// blocks] (graph.quantize_blocks says the rounding).
extern "C" __attribute__((visibility("default"))) void NanovllmQuantizeBlocks(
    const void* w, int64_t bf16, int64_t n, int64_t k, int64_t block, int64_t bits,
    int64_t symmetric, uint8_t* q, float* scale, float* minimum) {
  if (bf16)
    convert::quantize_blocks(static_cast<const uint16_t*>(w), n, k, block, bits, symmetric, q,
                             scale, minimum);
  else
    convert::quantize_blocks(static_cast<const float*>(w), n, k, block, bits, symmetric, q,
                             scale, minimum);
}

// NanovllmPackBlocks' records of NanovllmQuantizeBlocks' blocks of w, in one pass. out:
// [ceil(n / 16), blocks, record_bytes(bits, block / 32)].
extern "C" __attribute__((visibility("default"))) void NanovllmQuantizePacked(
    const void* w, int64_t bf16, int64_t n, int64_t k, int64_t block, int64_t bits,
    int64_t symmetric, uint8_t* out) {
  if (bf16)
    convert::quantize_packed(static_cast<const uint16_t*>(w), n, k, block, bits, symmetric, out);
  else
    convert::quantize_packed(static_cast<const float*>(w), n, k, block, bits, symmetric, out);
}

// The codes q [n, blocks, block] of w [n, blocks * block] against given scales and minimums
// [n, blocks] (fp16 values): the nearest, 0 where the scale is 0.
extern "C" __attribute__((visibility("default"))) void NanovllmBlockCodes(
    const float* w, int64_t n, int64_t blocks, int64_t block, const float* scale,
    const float* minimum, int64_t bits, uint8_t* q) {
  const float top = float((1 << bits) - 1);
  for (int64_t i = 0; i < n * blocks; ++i)
    convert::block_codes(w + i * block, block, scale[i], minimum[i], top, q + i * block);
}

// BlockLinear's records (see above) from codes q [n, blocks, block] and fp16 scales and
// minimums [n, blocks] (as uint16 bits); rows past n, to whole records, are zero. out:
// [ceil(n / 16), blocks, record_bytes(bits, block / 32)].
extern "C" __attribute__((visibility("default"))) void NanovllmPackBlocks(
    const uint8_t* q, const uint16_t* scale, const uint16_t* minimum, int64_t n,
    int64_t blocks, int64_t block, int64_t bits, uint8_t* out) {
  (bits == 8 ? convert::pack<8> : convert::pack<4>)(q, scale, minimum, n, blocks,
                                                    block / kPart, out);
}

// int8's per-channel weights (DynamicQuantizeMatMul) of w [n, k] (float32, or bfloat16 where
// `bf16`): the scales [n], one per output row (max(max |w| of the row, 1e-12) / 127), ...
extern "C" __attribute__((visibility("default"))) void NanovllmChannelScales(
    const void* w, int64_t bf16, int64_t n, int64_t k, float* scale) {
  if (bf16)
    convert::channel_scales(static_cast<const uint16_t*>(w), n, k, scale);
  else
    convert::channel_scales(static_cast<const float*>(w), n, k, scale);
}

// ... and the codes of inputs [first, last), transposed (qt [last - first, ld]: row c - first
// holds input c, at qt[(c - first) * ld + r]) = the nearest of -127 .. 127 to w / scale.
extern "C" __attribute__((visibility("default"))) void NanovllmChannelCodes(
    const void* w, int64_t bf16, int64_t n, int64_t k, int64_t first, int64_t last,
    const float* scale, int8_t* qt, int64_t ld) {
  if (bf16)
    convert::channel_codes(static_cast<const uint16_t*>(w), n, k, first, last, scale, qt, ld);
  else
    convert::channel_codes(static_cast<const float*>(w), n, k, first, last, scale, qt, ld);
}
