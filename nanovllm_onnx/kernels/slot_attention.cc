// SlotAttention: causal grouped-query attention over per-sequence KV-cache slots, updated in
// place, for ONNX Runtime's CPU provider. nano-vllm-onnx's own kernel: ONNX Runtime's
// GroupQueryAttention reads each KV head once per query head with a one-row GEMM and runs at
// about half the machine's memory bandwidth on a batch of decodes; here the query heads that
// share a KV head go through the cache together and each key tile is read once.
//
// Inputs: 0 qkv [T, (H + 2 KVH) * D] packed tokens, row after row (q, k, v of each token)
//         1 past_key [B, KVH, C / 16, D, 16] keys in tiles of 16 positions, dimension-major
//         2 past_value [B, KVH, C, D]
//         3 past_lens [B] int32: tokens already in each row's cache
//         4 query_lens [B] int32: new tokens of each row (0: idle row, untouched)
//         5 cos [max_positions, D / 2], 6 sin: rotary tables (rotate-half)
// Outputs: 0 attn [T, H * D]; 1 present_key, 2 present_value: the caches with the new rotated
// keys and values at positions past_len .. past_len + query_len - 1. Bind them to the same
// buffers as the past inputs (IOBinding) and the update is in place; otherwise the past is
// copied first. Attributes: num_heads, kv_num_heads, scale.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int kTile = 16;      // key positions per tile (one 512-bit vector of floats)
constexpr int kQueryBlock = 8;  // query tokens of one row that a task handles together

typedef float vec __attribute__((vector_size(64), aligned(4)));

inline vec load(const float* p) { vec v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }
inline vec splat(float x) { return vec{} + x; }

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

// One task: query tokens [first, last) of row `row`, every query head of KV head `kv_head`.
struct Task {
  int64_t row, kv_head, first, last;
};

struct Step {
  Shape s;
  float scale;
  const float* qkv;
  const float* cos;
  const float* sin;
  const float* keys;    // present_key
  const float* values;  // present_value
  float* out;
  const int32_t* past_lens;
  std::vector<int64_t> offsets;  // first packed token of each row
  std::vector<Task> tasks;
};

// scores[n][t * 16 + i] = q[n] . key(t * 16 + i) for tiles [0, tiles), NR query vectors.
template <int NR, int DC>
void score_tiles(const float* q, const float* tiles, int64_t num_tiles, float* scores,
                 int64_t stride) {
  constexpr int D = DC * kTile;
  for (int64_t t = 0; t < num_tiles; ++t) {
    const float* tile = tiles + t * D * kTile;
    vec acc[NR] = {};
    for (int d = 0; d < D; ++d) {
      vec k = load(tile + d * kTile);
      for (int n = 0; n < NR; ++n) acc[n] += q[n * D + d] * k;
    }
    for (int n = 0; n < NR; ++n) store(scores + n * stride + t * kTile, acc[n]);
  }
}

// out[n] = sum_l p[n][l] * value(l) for l < len, NR query vectors (D = DC * 16).
template <int NR, int DC>
void weigh_values(const float* p, int64_t stride, const float* values, int64_t len,
                  float* out) {
  constexpr int D = DC * kTile;
  vec acc[NR][DC] = {};
  for (int64_t l = 0; l < len; ++l) {
    vec v[DC];
    for (int c = 0; c < DC; ++c) v[c] = load(values + l * D + c * kTile);
    for (int n = 0; n < NR; ++n) {
      float w = p[n * stride + l];
      for (int c = 0; c < DC; ++c) acc[n][c] += w * v[c];
    }
  }
  for (int n = 0; n < NR; ++n)
    for (int c = 0; c < DC; ++c) store(out + n * D + c * kTile, acc[n][c]);
}

// The NR-wide kernels for n query vectors, NR = 8, 4, 2, 1 until none is left.
template <int DC>
void score_all(const float* q, int n, const float* tiles, int64_t num_tiles, float* scores,
               int64_t stride) {
  constexpr int D = DC * kTile;
  for (; n >= 8; n -= 8, q += 8 * D, scores += 8 * stride)
    score_tiles<8, DC>(q, tiles, num_tiles, scores, stride);
  for (; n >= 4; n -= 4, q += 4 * D, scores += 4 * stride)
    score_tiles<4, DC>(q, tiles, num_tiles, scores, stride);
  for (; n >= 2; n -= 2, q += 2 * D, scores += 2 * stride)
    score_tiles<2, DC>(q, tiles, num_tiles, scores, stride);
  if (n) score_tiles<1, DC>(q, tiles, num_tiles, scores, stride);
}

template <int DC>
void weigh_all(const float* p, int n, int64_t stride, const float* values, int64_t len,
               float* out) {
  constexpr int D = DC * kTile;
  for (; n >= 4; n -= 4, p += 4 * stride, out += 4 * D)
    weigh_values<4, DC>(p, stride, values, len, out);
  for (; n >= 2; n -= 2, p += 2 * stride, out += 2 * D)
    weigh_values<2, DC>(p, stride, values, len, out);
  if (n) weigh_values<1, DC>(p, stride, values, len, out);
}

template <int DC>
void run_task(const Step& st, const Task& task) {
  constexpr int D = DC * kTile;
  const Shape& s = st.s;
  const int64_t group = s.heads / s.kv_heads;
  const int64_t past = st.past_lens[task.row];
  const int64_t width = (s.heads + 2 * s.kv_heads) * D;
  const int64_t num_q = (task.last - task.first) * group;
  const int64_t keys = past + task.last;  // the block's last query sees keys [0, keys)
  const int64_t num_tiles = (keys + kTile - 1) / kTile;
  const int64_t stride = num_tiles * kTile;

  thread_local std::vector<float> q, scores, out;
  q.resize(num_q * D);
  scores.resize(num_q * stride);
  out.resize(num_q * D);
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
  score_all<DC>(q.data(), static_cast<int>(num_q), st.keys + slot * s.capacity * D,
                num_tiles, scores.data(), stride);
  // Softmax of each query over the keys it sees (causal: up to its own position).
  for (int64_t n = 0; n < num_q; ++n) {
    float* row = &scores[n * stride];
    const int64_t len = past + task.first + n / group + 1;
    float peak = row[0];  // (built with -ffast-math: no infinities)
    for (int64_t l = 1; l < len; ++l) peak = std::max(peak, row[l]);
    float sum = 0.f;
    for (int64_t l = 0; l < len; ++l) {
      row[l] = std::exp(row[l] - peak);
      sum += row[l];
    }
    const float inv = 1.f / sum;
    for (int64_t l = 0; l < len; ++l) row[l] *= inv;
    for (int64_t l = len; l < keys; ++l) row[l] = 0.f;
  }
  weigh_all<DC>(scores.data(), static_cast<int>(num_q), stride,
                st.values + slot * s.capacity * D, keys, out.data());
  for (int64_t j = task.first; j < task.last; ++j) {
    float* dst = st.out + (st.offsets[task.row] + j) * s.heads * D + task.kv_head * group * D;
    std::memcpy(dst, &out[(j - task.first) * group * D], group * D * sizeof(float));
  }
}

// Rotated keys and values of every new token into the caches (cheap: done serially).
void append(const Step& st, float* keys, float* values) {
  const Shape& s = st.s;
  const int64_t D = s.head_dim, half = D / 2;
  const int64_t width = (s.heads + 2 * s.kv_heads) * D;
  std::vector<float> k(D);
  for (int64_t b = 0; b < s.rows; ++b) {
    const int64_t len = st.offsets[b + 1] - st.offsets[b];
    for (int64_t j = 0; j < len; ++j) {
      const float* tok = st.qkv + (st.offsets[b] + j) * width;
      const int64_t pos = st.past_lens[b] + j;
      for (int64_t g = 0; g < s.kv_heads; ++g) {
        const int64_t slot = b * s.kv_heads + g;
        rotate(tok + (s.heads + g) * D, st.cos + pos * half, st.sin + pos * half, half, 1.f,
               k.data());
        float* tile = keys + slot * s.capacity * D + (pos / kTile) * D * kTile + pos % kTile;
        for (int64_t d = 0; d < D; ++d) tile[d * kTile] = k[d];
        std::memcpy(values + (slot * s.capacity + pos) * D, tok + (s.heads + s.kv_heads + g) * D,
                    D * sizeof(float));
      }
    }
  }
}

template <int DC>
void run_tasks(void* data, size_t i) {
  const Step& st = *static_cast<const Step*>(data);
  run_task<DC>(st, st.tasks[i]);
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
    try {
      Compute(Ort::KernelContext(context));
      return nullptr;
    } catch (const Ort::Exception& e) {
      return Ort::Status(e).release();
    } catch (const std::exception& e) {
      return Ort::Status(e.what(), ORT_FAIL).release();
    }
  }

  void Compute(Ort::KernelContext ctx) {
    auto qkv = ctx.GetInput(0), past_key = ctx.GetInput(1), past_value = ctx.GetInput(2);
    auto past_lens = ctx.GetInput(3), query_lens = ctx.GetInput(4);
    auto cos = ctx.GetInput(5), sin = ctx.GetInput(6);
    const auto qkv_shape = qkv.GetTensorTypeAndShapeInfo().GetShape();
    const auto key_shape = past_key.GetTensorTypeAndShapeInfo().GetShape();
    const auto value_shape = past_value.GetTensorTypeAndShapeInfo().GetShape();
    const auto cos_shape = cos.GetTensorTypeAndShapeInfo().GetShape();
    check(value_shape.size() == 4 && key_shape.size() == 5, "cache ranks");
    Step st;
    Shape& s = st.s;
    s = {heads, kv_heads, value_shape[3], value_shape[0], value_shape[2], qkv_shape[0],
         cos_shape[0]};
    check(key_shape == std::vector<int64_t>{s.rows, s.kv_heads, s.capacity / kTile, s.head_dim,
                                            kTile} && s.capacity % kTile == 0,
          "past_key must be [B, kv_heads, capacity / 16, head_dim, 16] beside past_value "
          "[B, kv_heads, capacity, head_dim]");
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
    float* keys = present_key.GetTensorMutableData<float>();
    float* values = present_value.GetTensorMutableData<float>();
    // Not bound in place (a plain run): start from a copy of the past.
    const size_t cache_bytes = size_t(s.rows * s.kv_heads * s.capacity * s.head_dim) * 4;
    if (keys != past_key.GetTensorData<float>())
      std::memcpy(keys, past_key.GetTensorData<float>(), cache_bytes);
    if (values != past_value.GetTensorData<float>())
      std::memcpy(values, past_value.GetTensorData<float>(), cache_bytes);

    st.scale = scale;
    st.qkv = qkv.GetTensorData<float>();
    st.cos = cos.GetTensorData<float>();
    st.sin = sin.GetTensorData<float>();
    st.keys = keys;
    st.values = values;
    st.out = out.GetTensorMutableData<float>();
    st.past_lens = past;
    append(st, keys, values);
    for (int64_t b = 0; b < s.rows; ++b)
      for (int64_t g = 0; g < kv_heads; ++g)
        for (int64_t j = 0; j < query[b]; j += kQueryBlock)
          st.tasks.push_back({b, g, j, std::min<int64_t>(j + kQueryBlock, query[b])});
    if (st.tasks.empty()) return;
    void (*fn)(void*, size_t) = nullptr;
    switch (s.head_dim) {
      case 16: fn = run_tasks<1>; break;
      case 32: fn = run_tasks<2>; break;
      case 64: fn = run_tasks<4>; break;
      case 128: fn = run_tasks<8>; break;
      default: check(false, "head_dim must be 16, 32, 64 or 128");
    }
    ctx.ParallelFor(fn, st.tasks.size(), 0, &st);
  }
};

struct SlotAttentionOp : Ort::CustomOpBase<SlotAttentionOp, SlotAttentionKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info,
                              void** kernel) const {
    try {
      *kernel = new SlotAttentionKernel(api, info);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return Ort::Status(e).release();
    }
  }
  const char* GetName() const { return "SlotAttention"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 7; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return (i == 3 || i == 4) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32
                              : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetOutputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  static SlotAttentionOp op;
  static Ort::CustomOpDomain domain{"nanovllm"};
  static bool added = false;
  if (!added) {
    domain.Add(&op);
    added = true;
  }
  Ort::UnownedSessionOptions(options).Add(domain);
  return nullptr;
}
