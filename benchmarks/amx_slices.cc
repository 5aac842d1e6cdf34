// Why BlockLinear's 32-row AMX int8 calls take their K in slices (amx_sliced in ops.cc): ns per
// 8-bit record of 128 inputs (2,112 bytes) streamed from memory, one thread per core, for
//   - reading alone (the records' lines loaded, prefetched as the kernel prefetches them);
//   - the tile work alone (products and epilogues on operands in L1, nothing streamed);
//   - the group-major order (amx_tiles_together's): each record group's 16 blocks in chunks of
//     8, two token tiles, their A tiles (64 KB: 32 tokens x 2,048 inputs) swept per group;
//   - the sliced order (amx_sliced's): slices of 4 blocks (16 KB of A tiles) over batches of 4
//     groups, y carried between slices.
// Where the tile work added to the reads rather than hiding behind them, the difference between
// the last two is the A tiles' trips from L2, which share the fill buffers with the reads.
//
//   g++ -O2 -march=x86-64-v4 -mamx-tile -mamx-int8 benchmarks/amx_slices.cc -o /tmp/amx_slices \
//       -lpthread
//   /tmp/amx_slices [threads]
#include <immintrin.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace {

constexpr int64_t kRecord = 2112;  // 16 rows x 128 codes, then 16 scales and 16 minimums
constexpr int64_t kBlocks = 16;    // records of a group: 2,048 inputs
constexpr int64_t kGroups = (int64_t(1) << 30) / (kBlocks * kRecord);  // ~1 GB a thread
constexpr int kSlice = 4, kBatch = 4, kChunk = 8;

struct alignas(64) TileConfig {
  uint8_t palette = 1, start = 0, reserved[14] = {};
  uint16_t bytes[16] = {};
  uint8_t rows[16] = {};
};

// A thread's operands: the A tiles of 2 token tiles x 16 blocks, their products, y carried.
struct Scratch {
  alignas(64) int8_t a[2][kBlocks][2048];
  alignas(64) int32_t dots[16][256];
  alignas(64) float partial[kBatch][2][16][16];
  alignas(64) float scales[64];
};

void prefetch(const uint8_t* near, const uint8_t* far) {
  for (int64_t line = 0; line < kRecord; line += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(near + line), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(far + line), _MM_HINT_T2);
  }
}

// Block b's products for both token tiles into dots[2 i], dots[2 i + 1].
void products(const uint8_t* rec, Scratch& s, int64_t b, int i) {
  _tile_loadd(6, rec, 64);
  _tile_loadd(7, rec + 1024, 64);
  for (int t = 0; t < 2; ++t) {
    const int8_t* a = s.a[t][b];
    _tile_zero(0);
    _tile_loadd(4, a, 128);
    _tile_dpbsud(0, 4, 6);
    _tile_loadd(5, a + 64, 128);
    _tile_dpbsud(0, 5, 7);
    _tile_stored(0, s.dots[2 * i + t], 64);
  }
}

// y += one product's dot products, as the kernel's epilogue (convert, scale, 2 FMAs a token).
void epilogue(__m512 (&y)[16], const int32_t* dots, const float* scales) {
  const __m512 scale = _mm512_load_ps(scales), minimum = _mm512_load_ps(scales + 16);
  for (int t = 0; t < 16; ++t) {
    const __m512 sum = _mm512_cvtepi32_ps(_mm512_load_si512(dots + 16 * t));
    y[t] = _mm512_fmadd_ps(sum, _mm512_mul_ps(scale, _mm512_set1_ps(scales[32 + t])), y[t]);
    y[t] = _mm512_fmadd_ps(minimum, _mm512_set1_ps(scales[48 + t]), y[t]);
  }
}

// ns per record of one pass over the thread's records in the given order.
double run(const uint8_t* w, int order, float* sink) {
  TileConfig c;
  for (int t = 0; t < 8; ++t) c.bytes[t] = 64, c.rows[t] = 16;
  _tile_loadconfig(&c);
  auto* s = static_cast<Scratch*>(aligned_alloc(64, sizeof(Scratch)));
  std::memset(s, 1, sizeof(Scratch));
  __m512 y[16], out = _mm512_setzero_ps();
  for (auto& v : y) v = _mm512_setzero_ps();
  __m512i bits = _mm512_setzero_si512();
  const auto start = std::chrono::steady_clock::now();
  if (order == 0) {  // reading alone
    for (int64_t r = 0; r < kGroups * kBlocks; ++r) {
      const uint8_t* rec = w + r * kRecord;
      prefetch(rec + 1024, rec + 6144);
      for (int64_t line = 0; line < kRecord; line += 64)
        bits = _mm512_xor_si512(bits, _mm512_loadu_si512(rec + line));
    }
  } else if (order == 1) {  // the tile work alone, on one record in L1
    for (int64_t r = 0; r < kGroups * kBlocks; ++r) {
      products(w, *s, r % kBlocks, 0);
      for (int t = 0; t < 2; ++t) epilogue(y, s->dots[t], s->scales);
    }
  } else if (order == 2) {  // group-major, chunks of 8 blocks
    for (int64_t r = 0; r < kGroups * kBlocks; r += kChunk) {
      for (int i = 0; i < kChunk; ++i) {
        const uint8_t* rec = w + (r + i) * kRecord;
        prefetch(rec + 1024, rec + 6144);
        products(rec, *s, (r + i) % kBlocks, i);
      }
      for (int t = 0; t < 2; ++t)
        for (int i = 0; i < kChunk; ++i) epilogue(y, s->dots[2 * i + t], s->scales);
    }
  } else {  // sliced
    for (int64_t g0 = 0; g0 + kBatch <= kGroups; g0 += kBatch)
      for (int64_t b0 = 0; b0 < kBlocks; b0 += kSlice)
        for (int g = 0; g < kBatch; ++g) {
          const uint8_t* records = w + (g0 + g) * kBlocks * kRecord;
          const uint8_t* next = g + 1 < kBatch ? records + (kBlocks + b0) * kRecord
                                : b0 + kSlice < kBlocks ? w + (g0 * kBlocks + b0 + kSlice) * kRecord
                                                        : w + (g0 + kBatch) * kBlocks * kRecord;
          for (int i = 0; i < kSlice; ++i) {
            const uint8_t* rec = records + (b0 + i) * kRecord;
            prefetch(i + 1 < kSlice ? rec + kRecord : next, next + i * kRecord);
            products(rec, *s, b0 + i, i);
          }
          for (int t = 0; t < 2; ++t) {
            __m512 part[16];
            for (int r = 0; r < 16; ++r)
              part[r] = b0 ? _mm512_load_ps(s->partial[g][t][r]) : _mm512_setzero_ps();
            for (int i = 0; i < kSlice; ++i) epilogue(part, s->dots[2 * i + t], s->scales);
            for (int r = 0; r < 16; ++r)
              if (b0 + kSlice < kBlocks) _mm512_store_ps(s->partial[g][t][r], part[r]);
              else out = _mm512_add_ps(out, part[r]);
          }
        }
  }
  const double ns = std::chrono::duration<double, std::nano>(
                        std::chrono::steady_clock::now() - start).count();
  for (auto& v : y) out = _mm512_add_ps(out, v);
  *sink = _mm512_reduce_add_ps(out) + float(_mm512_reduce_add_epi32(bits));
  std::free(s);
  return ns / (kGroups * kBlocks);
}

}  // namespace

int main(int argc, char** argv) {
  constexpr int kArchRequestPermission = 0x1023, kTileData = 18;
  if (syscall(SYS_arch_prctl, kArchRequestPermission, kTileData) != 0) {
    std::fprintf(stderr, "the kernel does not grant AMX tile data\n");
    return 1;
  }
  const int threads = argc > 1 ? std::atoi(argv[1]) : 1;
  const int64_t bytes = kGroups * kBlocks * kRecord + 65536;  // (prefetches run past the end)
  std::vector<uint8_t*> records;
  for (int t = 0; t < threads; ++t) {
    auto* p = static_cast<uint8_t*>(aligned_alloc(1 << 21, (bytes + (1 << 21)) & -(1 << 21)));
    madvise(p, bytes, MADV_HUGEPAGE);  // as the engine maps its weights
    std::memset(p, 1, bytes);
    records.push_back(p);
  }
  const char* names[] = {"reading alone", "tile work alone", "group-major (chunks of 8)",
                         "sliced (4 blocks x 4 groups)"};
  std::printf("ns per 2,112-byte record, %d thread(s), 2 rounds\n", threads);
  for (int round = 0; round < 2; ++round)
    for (int order = 0; order < 4; ++order) {
      std::vector<double> ns(threads);
      std::vector<float> sink(threads);
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t)
        pool.emplace_back([&, t] { ns[t] = run(records[t], order, &sink[t]); });
      for (auto& t : pool) t.join();
      double mean = 0;
      for (double v : ns) mean += v / threads;
      std::printf("  %-30s %6.1f ns (%4.1f GB/s a thread)\n", names[order], mean,
                  kRecord / mean);
    }
}
