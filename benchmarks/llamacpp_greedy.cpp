// llama.cpp's greedy continuation of token ids, through its C API alone (libllama and ggml,
// not llama-common, which llama-server needs and which takes most of llama.cpp's build time).
// setup_peers.sh builds it. Usage: llamacpp_greedy MODEL.gguf N_NEW [THREADS]
// stdin: one prompt per line, token ids separated by spaces; stdout per prompt: one line
// "prefill_s decode_s id id ..." (argmax of the logits at each step, EOS ignored).
#include "llama.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

static double now() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

static llama_token argmax(llama_context* ctx, int32_t n_vocab) {
  const float* logits = llama_get_logits_ith(ctx, -1);
  llama_token best = 0;
  for (llama_token t = 1; t < n_vocab; ++t)
    if (logits[t] > logits[best]) best = t;
  return best;
}

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s MODEL.gguf N_NEW [THREADS]\n", argv[0]);
    return 2;
  }
  const int n_new = std::atoi(argv[2]), threads = argc > 3 ? std::atoi(argv[3]) : 2;
  llama_backend_init();
  llama_model* model = llama_model_load_from_file(argv[1], llama_model_default_params());
  if (model == nullptr) return 1;
  llama_context_params cp = llama_context_default_params();
  cp.n_ctx = 4096;
  cp.n_batch = cp.n_ubatch = 512;
  cp.n_threads = cp.n_threads_batch = threads;
  llama_context* ctx = llama_init_from_model(model, cp);
  const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
  std::string line;
  while (std::getline(std::cin, line)) {
    std::vector<llama_token> ids;
    std::istringstream in(line);
    for (llama_token t; in >> t;) ids.push_back(t);
    if (ids.empty()) continue;
    llama_memory_clear(llama_get_memory(ctx), true);
    double start = now();
    if (llama_decode(ctx, llama_batch_get_one(ids.data(), static_cast<int32_t>(ids.size()))))
      return 1;
    const double prefill = now() - start;
    std::vector<llama_token> out{argmax(ctx, n_vocab)};
    start = now();
    while (static_cast<int>(out.size()) < n_new) {
      if (llama_decode(ctx, llama_batch_get_one(&out.back(), 1))) return 1;
      out.push_back(argmax(ctx, n_vocab));
    }
    std::printf("%.6f %.6f", prefill, now() - start);
    for (llama_token t : out) std::printf(" %d", t);
    std::printf("\n");
    std::fflush(stdout);
  }
  llama_free(ctx);
  llama_model_free(model);
  return 0;
}
