// ONNX Runtime custom-op library: registers structkv::CausalAttention (opset 1) for the CPU
// execution provider, computed by causal_attention.cc.
//
//   CausalAttention(q [B, H, N, D], k [B, G, N, D], v [B, G, N, D]) -> out [B, H, N, D]
//   attribute scale (float, optional; 0 or absent = 1/sqrt(D)); fp32; H a multiple of G.
//   attribute bf16 (int, optional; 1 = both products in bf16 with fp32 accumulation where the
//   CPU has AVX512-BF16, fp32 elsewhere; absent or 0 = fp32).
//
// Why no onnxruntime headers: the onnxruntime pip wheel ships none and this package builds the
// library on the user's machine on first use. The C API is a stable, append-only ABI, so the
// few entries used here are declared below by their position in the OrtApi function table and
// the layout of OrtCustomOp (version 16: the V2 callbacks that return a status).
#include <cstddef>
#include <cstdint>
#include <string>

#include "causal_attention.h"

namespace {

struct OrtStatus;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtValue;
struct OrtTensorTypeAndShapeInfo;
struct OrtCustomOpDomain;
struct OrtSessionOptions;

constexpr int kOrtFail = 1;
constexpr int kOrtInvalidArgument = 2;
constexpr int kElementFloat = 1;  // ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT

// Positions in OrtApi (onnxruntime_c_api.h; unchanged since API version 1).
enum ApiIndex : size_t {
  kCreateStatus = 0,
  kCreateCustomOpDomain = 26,
  kCustomOpDomainAdd = 27,
  kAddCustomOpDomain = 28,
  kGetTensorMutableData = 51,
  kGetDimensionsCount = 61,
  kGetDimensions = 62,
  kGetTensorTypeAndShape = 65,
  kKernelInfoGetAttributeFloat = 85,
  kKernelInfoGetAttributeInt64 = 86,
  kKernelContextGetInput = 90,
  kKernelContextGetOutput = 91,
  kReleaseStatus = 93,
  kReleaseTensorTypeAndShapeInfo = 99,
};

using Fn = void (*)();
struct OrtApiTable {
  Fn entries[128];
};
struct OrtApiBase {
  const OrtApiTable* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};

const OrtApiTable* g_api = nullptr;

template <typename Sig>
Sig api(ApiIndex i) {
  return reinterpret_cast<Sig>(g_api->entries[i]);
}

OrtStatus* make_status(int code, const std::string& msg) {
  return api<OrtStatus* (*)(int, const char*)>(kCreateStatus)(code, msg.c_str());
}

void release(OrtStatus* status) {
  if (status) api<void (*)(OrtStatus*)>(kReleaseStatus)(status);
}

// Shape of a tensor value; returns a status on failure.
OrtStatus* shape_of(const OrtValue* value, int64_t* dims, size_t* rank) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatus* s = api<OrtStatus* (*)(const OrtValue*, OrtTensorTypeAndShapeInfo**)>(
          kGetTensorTypeAndShape)(value, &info))
    return s;
  OrtStatus* s = api<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, size_t*)>(
      kGetDimensionsCount)(info, rank);
  if (!s && *rank <= 8)
    s = api<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t)>(kGetDimensions)(
        info, dims, *rank);
  api<void (*)(OrtTensorTypeAndShapeInfo*)>(kReleaseTensorTypeAndShapeInfo)(info);
  return s;
}

OrtStatus* data_of(const OrtValue* value, void** data) {
  return api<OrtStatus* (*)(const OrtValue*, void**)>(kGetTensorMutableData)(value, data);
}

struct Kernel {
  float scale = 0.0f;
  int64_t bf16 = 0;
};

// OrtCustomOp, version 16 layout.
struct CustomOp {
  uint32_t version;
  void* (*CreateKernel)(const CustomOp*, const OrtApiTable*, const OrtKernelInfo*);
  const char* (*GetName)(const CustomOp*);
  const char* (*GetExecutionProviderType)(const CustomOp*);
  int (*GetInputType)(const CustomOp*, size_t);
  size_t (*GetInputTypeCount)(const CustomOp*);
  int (*GetOutputType)(const CustomOp*, size_t);
  size_t (*GetOutputTypeCount)(const CustomOp*);
  void (*KernelCompute)(void*, OrtKernelContext*);
  void (*KernelDestroy)(void*);
  int (*GetInputCharacteristic)(const CustomOp*, size_t);
  int (*GetOutputCharacteristic)(const CustomOp*, size_t);
  int (*GetInputMemoryType)(const CustomOp*, size_t);
  int (*GetVariadicInputMinArity)(const CustomOp*);
  int (*GetVariadicInputHomogeneity)(const CustomOp*);
  int (*GetVariadicOutputMinArity)(const CustomOp*);
  int (*GetVariadicOutputHomogeneity)(const CustomOp*);
  OrtStatus* (*CreateKernelV2)(const CustomOp*, const OrtApiTable*, const OrtKernelInfo*, void**);
  OrtStatus* (*KernelComputeV2)(void*, OrtKernelContext*);
  void* InferOutputShapeFn;
  void* GetStartVersion;
  void* GetEndVersion;
  void* GetMayInplace;
  void* ReleaseMayInplace;
  void* GetAliasMap;
  void* ReleaseAliasMap;
};

OrtStatus* create_kernel(const CustomOp*, const OrtApiTable*, const OrtKernelInfo* info,
                         void** out) {
  auto* kernel = new Kernel();
  // An absent attribute is an error status from the API: keep the default then.
  release(api<OrtStatus* (*)(const OrtKernelInfo*, const char*, float*)>(
      kKernelInfoGetAttributeFloat)(info, "scale", &kernel->scale));
  release(api<OrtStatus* (*)(const OrtKernelInfo*, const char*, int64_t*)>(
      kKernelInfoGetAttributeInt64)(info, "bf16", &kernel->bf16));
  *out = kernel;
  return nullptr;
}

OrtStatus* compute(void* state, OrtKernelContext* context) {
  const auto* kernel = static_cast<const Kernel*>(state);
  auto get_input = api<OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**)>(
      kKernelContextGetInput);
  const OrtValue* in[3];
  int64_t dims[3][8];
  size_t rank[3];
  void* data[3];
  for (size_t i = 0; i < 3; ++i) {
    if (OrtStatus* s = get_input(context, i, &in[i])) return s;
    if (OrtStatus* s = shape_of(in[i], dims[i], &rank[i])) return s;
    if (rank[i] != 4)
      return make_status(kOrtInvalidArgument,
                         "structkv::CausalAttention: q, k and v must be 4-D [B, heads, N, D]");
    if (OrtStatus* s = data_of(in[i], &data[i])) return s;
  }
  const int64_t B = dims[0][0], H = dims[0][1], N = dims[0][2], D = dims[0][3];
  const int64_t G = dims[1][1];
  for (int i = 1; i < 3; ++i)
    if (dims[i][0] != B || dims[i][1] != G || dims[i][2] != N || dims[i][3] != D)
      return make_status(kOrtInvalidArgument,
                         "structkv::CausalAttention: k and v must be [B, G, N, D] with q's B, "
                         "N and D (prefill only: no past keys)");
  if (G <= 0 || H % G != 0)
    return make_status(kOrtInvalidArgument,
                       "structkv::CausalAttention: query heads must be a multiple of KV heads");
  OrtValue* out = nullptr;
  if (OrtStatus* s =
          api<OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**)>(
              kKernelContextGetOutput)(context, 0, dims[0], 4, &out))
    return s;
  void* out_data = nullptr;
  if (OrtStatus* s = data_of(out, &out_data)) return s;
  try {
    structkv::causal_attention(static_cast<const float*>(data[0]),
                               static_cast<const float*>(data[1]),
                               static_cast<const float*>(data[2]), static_cast<float*>(out_data),
                               B, H, G, N, D, kernel->scale, 0, kernel->bf16 != 0);
  } catch (const std::exception& e) {
    return make_status(kOrtFail, std::string("structkv::CausalAttention: ") + e.what());
  }
  return nullptr;
}

CustomOp make_op() {
  CustomOp op{};
  op.version = 16;
  op.GetName = [](const CustomOp*) { return "CausalAttention"; };
  op.GetExecutionProviderType = [](const CustomOp*) { return "CPUExecutionProvider"; };
  op.GetInputType = [](const CustomOp*, size_t) { return kElementFloat; };
  op.GetInputTypeCount = [](const CustomOp*) { return size_t{3}; };
  op.GetOutputType = [](const CustomOp*, size_t) { return kElementFloat; };
  op.GetOutputTypeCount = [](const CustomOp*) { return size_t{1}; };
  op.KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
  op.GetInputCharacteristic = [](const CustomOp*, size_t) { return 0; };   // required
  op.GetOutputCharacteristic = [](const CustomOp*, size_t) { return 0; };  // required
  op.GetInputMemoryType = [](const CustomOp*, size_t) { return 0; };       // default (CPU)
  op.GetVariadicInputMinArity = [](const CustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const CustomOp*) { return 1; };
  op.GetVariadicOutputMinArity = [](const CustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const CustomOp*) { return 1; };
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute;
  return op;
}

CustomOp g_op = make_op();

}  // namespace

// Entry point of SessionOptions.register_custom_ops_library(path).
extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(
    OrtSessionOptions* options, const OrtApiBase* base) {
  g_api = base->GetApi(16);
  if (!g_api) return nullptr;  // an ONNX Runtime older than 1.16: it cannot report a status
  OrtCustomOpDomain* domain = nullptr;  // lives as long as the process: sessions point at it
  if (OrtStatus* s = api<OrtStatus* (*)(const char*, OrtCustomOpDomain**)>(
          kCreateCustomOpDomain)("structkv", &domain))
    return s;
  if (OrtStatus* s = api<OrtStatus* (*)(OrtCustomOpDomain*, const CustomOp*)>(
          kCustomOpDomainAdd)(domain, &g_op))
    return s;
  return api<OrtStatus* (*)(OrtSessionOptions*, OrtCustomOpDomain*)>(kAddCustomOpDomain)(
      options, domain);
}
