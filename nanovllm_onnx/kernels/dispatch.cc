// The library ONNX Runtime loads for the engine's ops: it picks, by cpuid, the build of ops.cc
// for this CPU (ops_<target>.so beside it, one per target, each compiled for its -march by
// setup.py) and registers that build's ops. The builds are separate libraries, not one: the
// inline functions of the headers (std::vector, Ort::) that each build instantiates with its
// own instructions would otherwise be merged into one copy by the linker, maybe an AVX-512 one.
//
// NANO_VLLM_ONNX_KERNEL_TARGET=<target> forces a target (tests run each one this CPU can);
// avx512_vnni on an AMX machine runs without AMX.
#include <cpuid.h>
#include <dlfcn.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include <onnxruntime_c_api.h>

namespace {

struct Target {
  const char* name;
  bool (*supported)();
  void* library;  // loaded on first use, never unloaded: sessions may still run its kernels
};

bool avx512_vnni() {
  return __builtin_cpu_supports("x86-64-v4") && __builtin_cpu_supports("avx512vnni");
}

// AMX-TILE, AMX-INT8 and AMX-BF16 (cpuid 7.0 EDX bits 24, 25, 22) with AVX512-BF16 (7.1 EAX
// bit 5) and AVX512-VBMI, whose tile state the OS saves (XCR0 bits 17, 18) and lets this
// process use: Linux asks each process to request it, once. (Every AMX CPU so far has all of
// them.)
bool amx() {
  static const bool usable = [] {
    unsigned a, b, c, d;
    if (!avx512_vnni() || !__builtin_cpu_supports("avx512vbmi") ||
        !__get_cpuid_count(7, 0, &a, &b, &c, &d) || (d >> 24 & 3) != 3 ||
        !(d >> 22 & 1) || !__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a >> 5 & 1))
      return false;
    unsigned low, high;
    asm("xgetbv" : "=a"(low), "=d"(high) : "c"(0));  // OSXSAVE: x86-64-v4 implies it
    constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM
    return (low >> 17 & 3) == 3 && syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return usable;
}

// Best first. x86-64-v4: AVX-512 F/BW/CD/DQ/VL; v3: AVX2, FMA, F16C, BMI; libgcc checks that
// the OS saves the vector registers (XGETBV) too.
Target targets[] = {
    {"avx512_amx", amx, nullptr},
    {"avx512_vnni", avx512_vnni, nullptr},
    {"avx2_vnni",
     [] { return __builtin_cpu_supports("x86-64-v3") && __builtin_cpu_supports("avxvnni"); },
     nullptr},
    {"avx2", [] { return __builtin_cpu_supports("x86-64-v3") != 0; }, nullptr},
    {"portable", [] { return true; }, nullptr},
};

using Register = OrtStatus*(ORT_API_CALL*)(OrtSessionOptions*, const OrtApiBase*);

// The target to run, or null with `error` saying why.
Target* choose(std::string& error) {
  const char* forced = std::getenv("NANO_VLLM_ONNX_KERNEL_TARGET");
  for (Target& t : targets) {
    if (forced == nullptr || !*forced) {
      if (t.supported()) return &t;
    } else if (std::strcmp(forced, t.name) == 0) {
      if (t.supported()) return &t;
      error = std::string("NANO_VLLM_ONNX_KERNEL_TARGET=") + forced + ": this CPU cannot run it";
      return nullptr;
    }
  }
  error = std::string("NANO_VLLM_ONNX_KERNEL_TARGET=") + forced +
          " is not a target (avx512_amx, avx512_vnni, avx2_vnni, avx2, portable)";
  return nullptr;
}

// The directory of this library, where its targets' builds lie.
std::string own_directory() {
  Dl_info info{};
  dladdr(reinterpret_cast<void*>(&own_directory), &info);
  std::string path = info.dli_fname ? info.dli_fname : "";
  return path.substr(0, path.rfind('/') + 1);
}

}  // namespace

// The target this process would register: "avx2", ... or "error: ..." (doctor prints it).
extern "C" __attribute__((visibility("default"))) const char* NanovllmKernelTarget() {
  static thread_local std::string answer;
  std::string error;
  Target* t = choose(error);
  answer = t ? t->name : "error: " + error;
  return answer.c_str();
}

// SHA-256 of the sources (dispatch.cc, ops.cc) the libraries were built from.
extern "C" __attribute__((visibility("default"))) const char* NanovllmKernelSource() {
  return NANOVLLM_SOURCE_HASH;
}

// The targets this CPU can run, comma-separated, best first.
extern "C" __attribute__((visibility("default"))) const char* NanovllmKernelTargets() {
  static thread_local std::string answer;
  answer.clear();
  for (const Target& t : targets) {
    if (t.supported()) answer += (answer.empty() ? "" : ",") + std::string(t.name);
  }
  return answer.c_str();
}

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  static std::mutex loading;
  std::lock_guard<std::mutex> lock(loading);
  std::string error;
  Target* t = choose(error);
  if (t != nullptr && t->library == nullptr) {
    std::string path = own_directory() + "ops_" + t->name + ".so";
    t->library = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (t->library == nullptr) error = std::string("cannot load ") + path + ": " + dlerror();
  }
  if (t == nullptr || t->library == nullptr) return api->CreateStatus(ORT_FAIL, error.c_str());
  auto register_ops = reinterpret_cast<Register>(dlsym(t->library, "RegisterCustomOps"));
  if (register_ops == nullptr) return api->CreateStatus(ORT_FAIL, "no RegisterCustomOps");
  return register_ops(options, api_base);
}
