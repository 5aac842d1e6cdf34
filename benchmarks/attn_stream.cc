// What bounds a batched decode's SlotAttention (ops.cc's run_task on the float path, fp16
// cache): µs per task (one sequence's KV head: 288 positions, 4 query heads, D = 64) with
// each thread streaming tasks of its own from memory, for
//   - reading alone: the task's keys, then its values, loaded with the kernel's prefetches
//     (keys 2 tiles ahead into L1, the values into L2 while scoring, the next task's keys
//     into L2 while weighing);
//   - the arithmetic alone: the kernel's scoring, softmax and weighing on 8 tasks that stay
//     in L2;
//   - both, as the kernel runs.
// Each in slots of `capacity` positions (the engine's slots are as long as the context, the
// tasks' 288 positions a prefix of each: the reads jump from slot to slot) and packed (capacity
// 288: one stream).
//
//   g++ -O3 -march=x86-64-v4 benchmarks/attn_stream.cc -o /tmp/attn_stream -lpthread
//   /tmp/attn_stream [threads] [capacity]
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

namespace {

constexpr int D = 64, kTile = 16, kLen = 288, kTiles = kLen / kTile, NR = 4;
constexpr int64_t kUsed = int64_t(kLen) * D * 2;  // bytes of a task's keys (or values)
constexpr int kTasks = 16 * 128;  // a thread's: 16 layers x 128 (sequence, KV head) slots

enum class Work { kRead, kCompute, kBoth };

inline __m512 exp_ps(__m512 x) {  // ops.cc's
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

inline __m512 load(const uint8_t* p) {  // 16 fp16 as floats
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

float q[NR * D];
thread_local float scores[NR * kLen], out[NR * D];

// One task as the kernel runs it: keys (tiles [D][16]) scored 2 tiles at a time, softmax,
// values (positions [D]) weighed; with kRead only the loads.
template <Work kWork>
__attribute__((noinline)) float task(const uint8_t* keys, const uint8_t* values,
                                     const uint8_t* next_keys) {
  constexpr bool kMath = kWork != Work::kRead;
  __m512 sink = _mm512_setzero_ps();
  for (int t = 0; t < kTiles; t += 2) {
    const uint8_t* tile = keys + t * kTile * D * 2;
    const uint8_t* keys_ahead = keys + std::min(t + 2, kTiles - 2) * kTile * D * 2;  // (clamped)
    __m512 acc[NR][2] = {};
    for (int d = 0; d < D; ++d) {  // a line of each stream per step
      _mm_prefetch(reinterpret_cast<const char*>(keys_ahead + d * 64), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(values + t * kTile * D * 2 + d * 64),
                   _MM_HINT_T1);
      const __m512 k0 = load(tile + d * 32), k1 = load(tile + 2048 + d * 32);
      if constexpr (kMath)
        for (int n = 0; n < NR; ++n) {
          const __m512 x = _mm512_set1_ps(q[n * D + d]);
          acc[n][0] = _mm512_fmadd_ps(x, k0, acc[n][0]);
          acc[n][1] = _mm512_fmadd_ps(x, k1, acc[n][1]);
        }
      else
        sink = _mm512_add_ps(sink, _mm512_add_ps(k0, k1));
    }
    if constexpr (kMath)
      for (int n = 0; n < NR; ++n) {
        _mm512_storeu_ps(scores + n * kLen + t * kTile, acc[n][0]);
        _mm512_storeu_ps(scores + n * kLen + (t + 1) * kTile, acc[n][1]);
      }
  }
  if constexpr (kMath)
    for (int n = 0; n < NR; ++n) {
      float* row = scores + n * kLen;
      __m512 peak = _mm512_loadu_ps(row);
      for (int l = 0; l < kLen; l += kTile) peak = _mm512_max_ps(peak, _mm512_loadu_ps(row + l));
      const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(peak));
      for (int l = 0; l < kLen; l += kTile)
        _mm512_storeu_ps(row + l, exp_ps(_mm512_sub_ps(_mm512_loadu_ps(row + l), shift)));
    }
  constexpr int64_t kNextLines = kUsed / 64, kPerStep = (kNextLines + kLen - 1) / kLen;
  __m512 acc[NR][4] = {};
  for (int l = 0; l < kLen; ++l) {
    for (int64_t i = l * kPerStep; i < std::min((l + 1) * kPerStep, kNextLines); ++i)
      _mm_prefetch(reinterpret_cast<const char*>(next_keys + i * 64), _MM_HINT_T1);
    __m512 v[4];
    for (int c = 0; c < 4; ++c) v[c] = load(values + l * D * 2 + c * 32);
    if constexpr (kMath)
      for (int n = 0; n < NR; ++n) {
        const __m512 w = _mm512_set1_ps(scores[n * kLen + l]);
        for (int c = 0; c < 4; ++c) acc[n][c] = _mm512_fmadd_ps(w, v[c], acc[n][c]);
      }
    else
      sink = _mm512_add_ps(sink, _mm512_add_ps(_mm512_add_ps(v[0], v[1]),
                                               _mm512_add_ps(v[2], v[3])));
  }
  for (int n = 0; n < NR; ++n)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out + n * D + c * 16, acc[n][c]);
  return _mm512_reduce_add_ps(sink) + out[5];
}

// µs per task, each thread running its tasks over its own slots (kCompute: 8 of them).
template <Work kWork>
double run(const std::vector<uint8_t*>& memory, int64_t slot) {
  double best = 1e30;
  for (int rep = 0; rep < 3; ++rep) {
    const auto start = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    for (uint8_t* base : memory)
      pool.emplace_back([base, slot] {
        float s = 0;
        const int tasks = kWork == Work::kCompute ? 8 : kTasks;
        for (int i = 0; i < kTasks; ++i) {
          const uint8_t* keys = base + (i % tasks) * 2 * slot;
          s += task<kWork>(keys, keys + slot, base + ((i + 1) % tasks) * 2 * slot);
        }
        if (s == 1.2345f) printf(" ");
      });
    for (auto& thread : pool) thread.join();
    best = std::min(best, std::chrono::duration<double, std::micro>(
                              std::chrono::steady_clock::now() - start).count() / kTasks);
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? atoi(argv[1]) : 2;
  const int capacity = argc > 2 ? atoi(argv[2]) : 4096;
  for (int i = 0; i < NR * D; ++i) q[i] = 0.01f * (i % 7);
  for (const int positions : {capacity, kLen}) {
    const int64_t slot = int64_t(positions) * D * 2;
    std::vector<uint8_t*> memory(threads);
    for (auto& m : memory) {  // keys and values of every slot: fp16 1.0 (no denormals)
      m = static_cast<uint8_t*>(aligned_alloc(4096, size_t(kTasks) * 2 * slot));
      for (int64_t i = 0; i < kTasks * 2 * slot; i += 2) m[i] = 0, m[i + 1] = 0x3c;
    }
    const double bytes = 2.0 * kUsed * threads / 1e3;  // per µs: GB/s
    printf("slots of %d positions, %d threads: µs a task (GB/s of keys and values)\n",
           positions, threads);
    for (int round = 0; round < 3; ++round) {
      const double read = run<Work::kRead>(memory, slot);
      const double math = run<Work::kCompute>(memory, slot);
      const double both = run<Work::kBoth>(memory, slot);
      printf("  reading alone %5.2f (%4.1f)  arithmetic alone %5.2f  both %5.2f (%4.1f)\n", read,
             bytes / read, math, both, bytes / both);
    }
    for (auto* m : memory) free(m);
  }
}
