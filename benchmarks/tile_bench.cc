// BlockLinear's VNNI prompt tile alone (block_group over 8-bit blocks of 128, as `auto` runs a
// prompt), on one or more threads: ns a VPDPBUSD with the weights and y in cache, the weights
// read from memory, y stored to memory, and both, as the engine's layers do (issue 14's "where
// a prompt tile's time goes"). Each thread has buffers of its own; 0.33 ns is one VPDPBUSD a
// cycle at 3 GHz. It includes the kernels' source, so it times whatever ops.cc holds.
//
//   FLAGS="-O3 -ffast-math -std=c++17 -march=x86-64-v4 -mavx512vnni -DNDEBUG"   # repo root:
//   g++ $FLAGS -Ithird_party/onnxruntime/include benchmarks/tile_bench.cc -o /tmp/tile_bench
//   /tmp/tile_bench [K=2048] [tokens=128] [threads=2]
#include "../nanovllm_onnx/kernels/ops.cc"

#include <chrono>
#include <cstdio>
#include <random>
#include <thread>

namespace {

constexpr int kBits = 8, kParts = 4, kReps = 10;
constexpr int64_t kBlock = kParts * kPart;  // inputs a block: 128
constexpr int64_t kCached = 16;   // record groups that stay in L2 (16 x 16 rows)
constexpr int64_t kGroups = 2048; // groups a pass (32,768 rows; 66 MiB of records at K = 2,048)

struct Buffers {
  std::vector<uint8_t> weights;
  std::vector<int8_t> xq;
  std::vector<float> xscale, xsum, y;
};

Buffers make_buffers(int64_t k, int64_t tokens, unsigned seed) {
  const int64_t blocks = k / kBlock, record = record_bytes(kBits, kParts);
  Buffers b{std::vector<uint8_t>(kGroups * blocks * record), std::vector<int8_t>(tokens * k),
            std::vector<float>(tokens * blocks, 0.01f), std::vector<float>(tokens * blocks, 0.1f),
            std::vector<float>(tokens * kGroups * kRows)};
  std::mt19937 rng(seed);
  for (auto& v : b.weights) v = static_cast<uint8_t>(rng());
  for (auto& v : b.xq) v = static_cast<int8_t>(rng() % 255 - 127);
  const uint16_t small = 0x2000;  // fp16 scales and minima of ~0.008, so that y stays finite
  for (int64_t r = 0; r < kGroups * blocks; ++r)
    for (int j = 0; j < 2 * kRows; ++j)
      std::memcpy(&b.weights[r * record + value_bytes(kBits, kParts) + 2 * j], &small, 2);
  return b;
}

// Best ns a VPDPBUSD over kReps passes of kGroups groups. Weights from memory: each group its
// own records (else group g % kCached's); y to memory: each group its own columns of a
// kGroups-wide y (else those of group g % kCached in a kCached-wide one).
double time_passes(Buffers& b, int64_t k, int64_t tokens, bool weights_from_memory,
                   bool y_to_memory) {
  const int64_t blocks = k / kBlock, group_bytes = blocks * record_bytes(kBits, kParts);
  BlockStep st{};
  st.xq = b.xq.data();
  st.xscale = b.xscale.data();
  st.xsum = b.xsum.data();
  st.y = b.y.data();
  st.tokens = tokens;
  st.n = (y_to_memory ? kGroups : kCached) * kRows;
  st.blocks = blocks;
  double best = 1e30;
  for (int rep = 0; rep < kReps; ++rep) {
    const auto start = std::chrono::steady_clock::now();
    for (int64_t g = 0; g < kGroups; ++g) {
      // block_group(st, group) reads st.weights + group * group_bytes and stores y's columns
      // of `group`: the group index picks y's columns, the weights pointer the records.
      const int64_t group = y_to_memory ? g : g % kCached;
      const int64_t records = weights_from_memory ? g : g % kCached;
      st.weights = b.weights.data() + (records - group) * group_bytes;
      block_group<kBits, kParts>(st, group);
    }
    const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
    best = std::min(best, took.count());
  }
  return best * 1e9 / (double(kGroups) * kRows * k * tokens / 64);
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t k = argc > 1 ? std::atol(argv[1]) : 2048;
  const int64_t tokens = argc > 2 ? std::atol(argv[2]) : 128;
  const int threads = argc > 3 ? std::atoi(argv[3]) : 2;
  if (k % kBlock != 0 || tokens < 1 || threads < 1) {
    std::fprintf(stderr, "usage: tile_bench [K, a multiple of 128] [tokens] [threads]\n");
    return 1;
  }
  std::vector<Buffers> buffers;
  for (int i = 0; i < threads; ++i) buffers.push_back(make_buffers(k, tokens, i + 1));
  std::printf("K=%ld, %ld tokens, %d thread%s: ns a VPDPBUSD (best of %d passes), each thread\n",
              k, tokens, threads, threads == 1 ? "" : "s", kReps);
  const struct { const char* name; bool weights, y; } cases[] = {
      {"in cache", false, false}, {"weights from memory", true, false},
      {"y to memory", false, true}, {"both", true, true}};
  for (const auto& c : cases) {
    std::vector<double> ns(threads);
    std::vector<std::thread> pool;
    for (int i = 0; i < threads; ++i)
      pool.emplace_back([&, i] { ns[i] = time_passes(buffers[i], k, tokens, c.weights, c.y); });
    for (auto& t : pool) t.join();
    std::printf("  %-20s", c.name);
    for (double v : ns) std::printf(" %.3f", v);
    std::printf("\n");
  }
}
