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
// The arithmetic is the kernel's own (it includes ops.cc: score_tiles, softmax_numerators and
// weigh_values, with their prefetches); reading alone loads the same lines with the same
// prefetches.
//
//   FLAGS="-O3 -ffast-math -std=c++17 -march=x86-64-v4 -DNDEBUG -pthread"   # repo root:
//   g++ $FLAGS -Ithird_party/onnxruntime/include benchmarks/attn_stream.cc -o /tmp/attn_stream
//   /tmp/attn_stream [threads] [capacity]
#include "../nanovllm_onnx/kernels/ops.cc"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

namespace {

constexpr int D = 64, kLen = 288, kTiles = kLen / kTile, NR = 4;
constexpr int64_t kUsed = int64_t(kLen) * D * 2;  // bytes of a task's keys (or values)
constexpr int kTasks = 16 * 128;  // a thread's: 16 layers x 128 (sequence, KV head) slots

enum class Work { kRead, kCompute, kBoth };

// 16 fp16 of the cache as floats (ops.cc's load)
inline __m512 load_half(const uint8_t* p) {
  return (__m512)load(reinterpret_cast<const _Float16*>(p));
}

float q[NR * D];
thread_local float scores[NR * kLen], out[NR * D];

// One task: the kernel's (run_task's float path for a decode: 4 query vectors, 2 tiles at a
// time), or with kRead only its loads and prefetches: keys 2 tiles ahead into L1, the values
// into L2 while scoring, the next task's keys into L2 while weighing.
template <Work kWork>
__attribute__((noinline)) float task(const uint8_t* keys, const uint8_t* values,
                                     const uint8_t* next_keys) {
  const auto* key_tiles = reinterpret_cast<const _Float16*>(keys);
  const auto* value_rows = reinterpret_cast<const _Float16*>(values);
  constexpr int64_t kNextLines = kUsed / 64;
  if constexpr (kWork != Work::kRead) {
    score_tiles<NR, 2, D / kTile, true>(q, key_tiles, kTiles, scores, kLen, value_rows);
    float inverse_sums[NR];
    for (int n = 0; n < NR; ++n)
      inverse_sums[n] = softmax_numerators(scores + n * kLen, kLen, kLen);
    weigh_values<NR, D / kTile>(scores, kLen, inverse_sums, value_rows, kLen, out,
                                reinterpret_cast<const char*>(next_keys), kNextLines);
    return out[5];
  }
  __m512 sink = _mm512_setzero_ps();
  for (int t = 0; t < kTiles; t += 2) {
    const uint8_t* tile = keys + t * kTile * D * 2;
    const uint8_t* keys_ahead = keys + std::min(t + kAhead, kTiles - 2) * kTile * D * 2;
    for (int d = 0; d < D; ++d) {  // a line of each stream per step
      __builtin_prefetch(keys_ahead + d * 64);
      __builtin_prefetch(values + t * kTile * D * 2 + d * 64, 0, 2);
      sink = _mm512_add_ps(sink, _mm512_add_ps(load_half(tile + d * 32),
                                               load_half(tile + 2048 + d * 32)));
    }
  }
  constexpr int64_t kPerStep = (kNextLines + kLen - 1) / kLen;
  for (int l = 0; l < kLen; ++l) {
    for (int64_t i = l * kPerStep; i < std::min((l + 1) * kPerStep, kNextLines); ++i)
      __builtin_prefetch(next_keys + i * 64, 0, 2);
    for (int c = 0; c < 4; ++c) sink = _mm512_add_ps(sink, load_half(values + l * D * 2 + c * 32));
  }
  return _mm512_reduce_add_ps(sink);
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
