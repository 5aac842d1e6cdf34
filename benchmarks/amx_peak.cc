// The AMX tiles' ceiling on this CPU, for BlockLinear's bf16 prompt path (issue 14): how long
// one TDPBF16PS (a 16 x 16 x 32 product, 16,384 flops) takes with its operands in the tile
// registers, read from L1, or streamed from L2 or from memory, on one thread and on every core
// at once, up to 8 (do the cores share a tile unit?). The loop is the kernels' 2 x 2
// blocking: four C tiles, two A and two B tiles loaded a step (4 KB for 4 products), C held
// over the stream.
//
//   g++ -O2 -march=sapphirerapids benchmarks/amx_peak.cc -o /tmp/amx_peak -lpthread
//   /tmp/amx_peak            # ns a product, and TOP/s a core, per operand source
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

namespace {

constexpr int kTile = 512;  // bf16 values of a 16 x 32 tile (1 KB)

struct alignas(64) TileConfig {
  uint8_t palette = 1, start = 0, reserved[14] = {};
  uint16_t bytes[16] = {};
  uint8_t rows[16] = {};
};

void use_tiles() {
  constexpr int kArchRequestPermission = 0x1023, kTileData = 18;
  if (syscall(SYS_arch_prctl, kArchRequestPermission, kTileData) != 0) {
    std::fprintf(stderr, "the kernel does not grant AMX tile data\n");
    std::exit(1);
  }
  TileConfig c;
  for (int t = 0; t < 8; ++t) c.bytes[t] = 64, c.rows[t] = 16;
  _tile_loadconfig(&c);
}

// ns a product over `steps` steps of 4 products; steps over `blocks` blocks of A and B tiles
// (2 KB of each a block, in order, then again from the first): blocks = 0 loads none.
double time_products(const uint16_t* a, const uint16_t* b, int64_t blocks, int64_t steps) {
  use_tiles();
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, a, 64);
  _tile_loadd(5, a + kTile, 64);
  _tile_loadd(6, b, 64);
  _tile_loadd(7, b + kTile, 64);
  const auto start = std::chrono::steady_clock::now();
  for (int64_t s = 0, i = 0; s < steps; ++s) {
    if (blocks) {
      const uint16_t* at = a + i * 2 * kTile;
      const uint16_t* bt = b + i * 2 * kTile;
      _tile_loadd(4, at, 64);
      _tile_loadd(6, bt, 64);
      _tile_loadd(7, bt + kTile, 64);
      _tile_loadd(5, at + kTile, 64);
      if (++i == blocks) i = 0;
    }
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  alignas(64) float sink[256];
  _tile_stored(0, sink, 64);
  const std::chrono::duration<double, std::nano> took = std::chrono::steady_clock::now() - start;
  _tile_release();
  return took.count() / (4.0 * steps);
}

}  // namespace

int main() {
  // every core at once, up to 8 (each streams its own 256 MB from memory)
  const int cores = std::clamp(static_cast<int>(std::thread::hardware_concurrency()), 1, 8);
  struct Source {
    const char* name;
    int64_t kb;  // bytes of A and B together, KB (0: no loads)
  };
  const Source sources[] = {{"registers", 0}, {"L1 (32 KB)", 32}, {"L2 (1 MB)", 1024},
                            {"memory (256 MB)", 256 * 1024}};
  std::printf("ns a TDPBF16PS (TOP/s a core): 1 thread, then %d threads at once\n", cores);
  for (const Source& src : sources) {
    const int64_t blocks = src.kb / 4;  // a block: 2 KB of A and 2 KB of B
    const int64_t steps = src.kb >= 4096 ? 2000000 : 20000000;
    std::vector<std::vector<uint16_t>> a(cores), b(cores);
    for (int c = 0; c < cores; ++c) {
      a[c].assign((blocks + 1) * 2 * kTile + 32, 0x3f80);  // 1.0
      b[c].assign((blocks + 1) * 2 * kTile + 32, 0x3f80);
    }
    auto aligned = [](std::vector<uint16_t>& v) {
      const uintptr_t at = reinterpret_cast<uintptr_t>(v.data());
      return v.data() + (64 - at % 64) % 64 / 2;
    };
    time_products(aligned(a[0]), aligned(b[0]), blocks, steps / 10);  // warm the buffers
    const double one = time_products(aligned(a[0]), aligned(b[0]), blocks, steps);
    std::vector<double> each(cores);
    std::vector<std::thread> threads;
    for (int c = 0; c < cores; ++c)
      threads.emplace_back([&, c] {
        each[c] = time_products(aligned(a[c]), aligned(b[c]), blocks, steps);
      });
    for (auto& t : threads) t.join();
    std::printf("%-16s %6.2f ns (%.2f)  |", src.name, one, 16384 / one / 1e3);
    for (double ns : each) std::printf(" %6.2f ns (%.2f)", ns, 16384 / ns / 1e3);
    std::printf("\n");
  }
}
