// ai.slimformer::A2SFCacheUpdate for ONNX Runtime: input validation, the op's registration and the CPU
// kernel. Built by exporters/native/build.py into libslimformer_a2sf.so (CPU) and, together with
// a2sf_cache_op_cuda.cu, into libslimformer_a2sf_cuda.so (CUDA, with this CPU kernel too).
//
// Per (batch row, KV head) the kernel does what the function body in exporters/onnx_cache_op.py does
// with ~60 nodes: accumulate the step's probabilities into the scores, rank the slots, keep the top K in
// their original order and gather keys, values and scores. Float behaviour follows the body closely:
// the GQA sum runs over the group in order, alpha^k uses the same powf, and for a one-token decode step
// the scores come out bit-identical; a multi-token step differs only by the body's MatMul summation
// order (a few ulp).

#include "a2sf_cache_op.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

namespace slimformer_a2sf {

#define A2SF_RETURN_IF_ERROR(expr)    \
  do {                                \
    OrtStatus* status_ = (expr);      \
    if (status_ != nullptr) return status_; \
  } while (0)

namespace {

OrtStatus* Fail(const OrtApi* api, const std::string& message) {
  return api->CreateStatus(ORT_INVALID_ARGUMENT, (std::string(kOpType) + ": " + message).c_str());
}

struct TensorInfo {
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> dims;
  const void* data = nullptr;

  int64_t Elements() const {
    int64_t n = 1;
    for (int64_t d : dims) n *= d;
    return n;
  }
};

OrtStatus* ReadInput(const OrtApi* api, OrtKernelContext* context, size_t index, TensorInfo* out,
                     const OrtValue** value_out = nullptr) {
  const OrtValue* value = nullptr;
  A2SF_RETURN_IF_ERROR(api->KernelContext_GetInput(context, index, &value));
  if (value == nullptr) return Fail(api, "input " + std::to_string(index) + " is missing");
  OrtTensorTypeAndShapeInfo* info = nullptr;
  A2SF_RETURN_IF_ERROR(api->GetTensorTypeAndShape(value, &info));
  size_t rank = 0;
  OrtStatus* status = api->GetDimensionsCount(info, &rank);
  if (status == nullptr) {
    out->dims.resize(rank);
    status = api->GetDimensions(info, out->dims.data(), rank);
  }
  if (status == nullptr) status = api->GetTensorElementType(info, &out->type);
  api->ReleaseTensorTypeAndShapeInfo(info);
  A2SF_RETURN_IF_ERROR(status);
  void* data = nullptr;
  // GetTensorMutableData (API 1) rather than GetTensorData (1.23): the data is only read.
  A2SF_RETURN_IF_ERROR(api->GetTensorMutableData(const_cast<OrtValue*>(value), &data));
  out->data = data;
  if (value_out != nullptr) *value_out = value;
  return nullptr;
}

std::string Shape(const std::vector<int64_t>& dims) {
  std::string text = "[";
  for (size_t i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
  return text + "]";
}

OrtStatus* AllocateOutput(const OrtApi* api, OrtKernelContext* context, size_t index,
                          const std::vector<int64_t>& dims, void** data) {
  OrtValue* value = nullptr;
  A2SF_RETURN_IF_ERROR(api->KernelContext_GetOutput(context, index, dims.data(), dims.size(), &value));
  return api->GetTensorMutableData(value, data);
}

}  // namespace

OrtStatus* Prepare(const OrtApi* api, OrtKernelContext* context, Problem* p, Inputs* in, Outputs* out) {
  TensorInfo key, value, past_scores, probs, new_valid, alpha, limits;
  A2SF_RETURN_IF_ERROR(ReadInput(api, context, kKey, &key, &in->key_value));
  A2SF_RETURN_IF_ERROR(ReadInput(api, context, kValue, &value));
  A2SF_RETURN_IF_ERROR(ReadInput(api, context, kPastScores, &past_scores));
  A2SF_RETURN_IF_ERROR(ReadInput(api, context, kProbs, &probs));
  A2SF_RETURN_IF_ERROR(ReadInput(api, context, kNewValid, &new_valid));
  A2SF_RETURN_IF_ERROR(ReadInput(api, context, kAlpha, &alpha));
  A2SF_RETURN_IF_ERROR(ReadInput(api, context, kLimits, &limits));

  if (key.dims.size() != 4) return Fail(api, "key must be [B, H, P, D], got " + Shape(key.dims));
  p->batch = key.dims[0];
  p->heads = key.dims[1];
  p->phys = key.dims[2];
  p->key_dim = key.dims[3];
  if (value.dims.size() != 4 || value.dims[0] != p->batch || value.dims[1] != p->heads ||
      value.dims[2] != p->phys) {
    return Fail(api, "value must be [B, H, P, Dv] like key " + Shape(key.dims) + ", got " + Shape(value.dims));
  }
  p->value_dim = value.dims[3];
  if (value.type != key.type) return Fail(api, "key and value must have the same element type");
  p->elem_bytes = key.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? 2 : 4;
  if (past_scores.dims.size() != 3 || past_scores.dims[0] != p->batch || past_scores.dims[1] != p->heads ||
      past_scores.dims[2] > p->phys) {
    return Fail(api, "past_scores must be [B, H, P_past] with P_past <= P, got " + Shape(past_scores.dims) +
                         " for key " + Shape(key.dims));
  }
  p->past = past_scores.dims[2];
  p->q_len = p->phys - p->past;
  if (probs.dims.size() != 4 || probs.dims[0] != p->batch || p->heads == 0 || probs.dims[1] % p->heads != 0 ||
      probs.dims[1] == 0 || probs.dims[2] != p->q_len || probs.dims[3] != p->phys) {
    return Fail(api, "probs must be [B, G*H, Q, P] with Q = P - P_past = " + std::to_string(p->q_len) +
                         ", got " + Shape(probs.dims) + " for key " + Shape(key.dims));
  }
  p->groups = probs.dims[1] / p->heads;
  if (new_valid.dims.size() != 2 || new_valid.dims[0] != p->batch || new_valid.dims[1] != p->q_len) {
    return Fail(api, "new_valid must be [B, Q] = [" + std::to_string(p->batch) + ", " +
                         std::to_string(p->q_len) + "], got " + Shape(new_valid.dims));
  }
  if (alpha.Elements() != 1) return Fail(api, "alpha must hold one value, got " + Shape(alpha.dims));
  if (limits.Elements() != 4) {
    return Fail(api, "limits must be (budget, sink, recent, score_window), got " + Shape(limits.dims));
  }

  // alpha and limits are host memory for both kernels (the CUDA op declares them OrtMemTypeCPUInput).
  p->alpha = *static_cast<const float*>(alpha.data);
  const auto* limit = static_cast<const int64_t*>(limits.data);
  p->budget = limit[0];
  p->sink = limit[1];
  p->recent = limit[2];
  p->window = limit[3];
  if (p->budget < 0) return Fail(api, "the budget (limits[0]) must not be negative");
  p->kept = std::min(p->phys, p->budget);
  p->decay = std::pow(p->alpha, static_cast<float>(p->q_len));

  in->key = key.data;
  in->value = value.data;
  in->past_scores = static_cast<const float*>(past_scores.data);
  in->probs = static_cast<const float*>(probs.data);
  in->new_valid = static_cast<const bool*>(new_valid.data);

  void* data = nullptr;
  A2SF_RETURN_IF_ERROR(AllocateOutput(api, context, kKeyOut, {p->batch, p->heads, p->kept, p->key_dim}, &data));
  out->key = data;
  A2SF_RETURN_IF_ERROR(
      AllocateOutput(api, context, kValueOut, {p->batch, p->heads, p->kept, p->value_dim}, &data));
  out->value = data;
  A2SF_RETURN_IF_ERROR(AllocateOutput(api, context, kScoresOut, {p->batch, p->heads, p->kept}, &data));
  out->scores = static_cast<float*>(data);
  return nullptr;
}

// ---- CPU kernel ------------------------------------------------------------------------------------

namespace {

struct CpuTask {
  const Problem* p;
  const Inputs* in;
  const Outputs* out;
};

// Scratch per worker thread, reused across calls (a decode step would otherwise allocate per node).
struct Scratch {
  std::vector<float> scores;
  std::vector<float> gained;
  std::vector<float> share;
  std::vector<uint64_t> keys;
  std::vector<int64_t> order;
};

// One (batch row, KV head): everything of the contract for that pair.
void UpdateOne(void* user_data, size_t task) {
  const CpuTask& t = *static_cast<const CpuTask*>(user_data);
  const Problem& p = *t.p;
  const int64_t b = static_cast<int64_t>(task) / p.heads;
  const int64_t h = static_cast<int64_t>(task) % p.heads;
  const int64_t P = p.phys, Q = p.q_len;
  thread_local Scratch s;
  s.scores.resize(P);
  float* scores = s.scores.data();

  // 1-3. Decayed past scores (an empty slot stays -inf), new tokens at 0 (-inf for padding), plus the
  // step's rows weighted alpha^(Q-1-t), each row summed over the KV head's query heads (GQA).
  const float* past = t.in->past_scores + task * p.past;
  for (int64_t i = 0; i < p.past; ++i) {
    scores[i] = std::isinf(past[i]) && past[i] < 0 ? past[i] : past[i] * p.decay;
  }
  const bool* valid_row = t.in->new_valid + b * Q;
  for (int64_t i = 0; i < Q; ++i) {
    scores[p.past + i] = valid_row[i] ? 0.0f : -std::numeric_limits<float>::infinity();
  }
  // The weighted probability mass is summed separately and added last, as the body does (its MatMul
  // produces the whole gain before the Add): the same rounding as the body for a one-token step.
  s.gained.assign(P, 0.0f);
  s.share.resize(P);
  float* gained = s.gained.data();
  float* share = s.share.data();
  const float* probs = t.in->probs + (b * p.heads * p.groups + h * p.groups) * Q * P;
  for (int64_t row = 0; row < Q; ++row) {
    if (!valid_row[row] || !InWindow(row, Q, p.window)) continue;
    const float w = std::pow(p.alpha, static_cast<float>(Q - 1 - row));
    // alpha^age underflows to exactly 0 for old prompt rows (alpha 0.5: ~150 rows back), which add
    // exactly nothing: skipping them makes a long prompt's scoring cost O(150 P) instead of O(Q P).
    if (w == 0.0f) continue;
    // Group sum one query head at a time (per slot the same order as ReduceSum: g = 0, 1, ...), in
    // loops over contiguous slots that the compiler vectorises.
    const float* first = probs + row * P;
    std::memcpy(share, first, P * sizeof(float));
    for (int64_t g = 1; g < p.groups; ++g) {
      const float* head = first + g * Q * P;
      for (int64_t i = 0; i < P; ++i) share[i] += head[i];
    }
    for (int64_t i = 0; i < P; ++i) gained[i] += w * share[i];
  }
  for (int64_t i = 0; i < P; ++i) scores[i] += gained[i];

  const size_t key_row = p.key_dim * p.elem_bytes, value_row = p.value_dim * p.elem_bytes;
  const auto* key = static_cast<const char*>(t.in->key) + task * P * key_row;
  const auto* value = static_cast<const char*>(t.in->value) + task * P * value_row;
  auto* key_out = static_cast<char*>(t.out->key) + task * p.kept * key_row;
  auto* value_out = static_cast<char*>(t.out->value) + task * p.kept * value_row;
  float* scores_out = t.out->scores + task * p.kept;

  if (!p.Evicts()) {  // P <= budget: identity, nothing to rank
    std::memcpy(key_out, key, P * key_row);
    std::memcpy(value_out, value, P * value_row);
    std::memcpy(scores_out, scores, P * sizeof(float));
    return;
  }

  // 4. Protected = the first `sink` and last `recent` real (finite) slots; priority +inf for them.
  int64_t n_real = 0;
  for (int64_t i = 0; i < P; ++i) n_real += !(std::isinf(scores[i]) && scores[i] < 0);
  s.keys.resize(P);
  int64_t rank = 0;
  for (int64_t i = 0; i < P; ++i) {
    const bool real = !(std::isinf(scores[i]) && scores[i] < 0);
    const bool protect = real && (rank < p.sink || rank >= n_real - p.recent);
    rank += real;
    s.keys[i] = RankKey(protect ? std::numeric_limits<float>::infinity() : scores[i], i);
  }

  // 5. The K largest keys (all distinct: the slot is part of the key), then back to slot order.
  s.order.resize(P);
  for (int64_t i = 0; i < P; ++i) s.order[i] = i;
  const uint64_t* keys = s.keys.data();
  auto better = [keys](int64_t a, int64_t c) { return keys[a] > keys[c]; };
  std::nth_element(s.order.begin(), s.order.begin() + p.kept, s.order.end(), better);
  std::sort(s.order.begin(), s.order.begin() + p.kept);
  for (int64_t k = 0; k < p.kept; ++k) {
    const int64_t slot = s.order[k];
    std::memcpy(key_out + k * key_row, key + slot * key_row, key_row);
    std::memcpy(value_out + k * value_row, value + slot * value_row, value_row);
    scores_out[k] = scores[slot];
  }
}

}  // namespace

OrtStatus* ComputeCpu(const OrtApi* api, OrtKernelContext* context) {
  Problem problem;
  Inputs inputs;
  Outputs outputs;
  A2SF_RETURN_IF_ERROR(Prepare(api, context, &problem, &inputs, &outputs));
  CpuTask task{&problem, &inputs, &outputs};
  const size_t tasks = static_cast<size_t>(problem.batch * problem.heads);
  // A decode step of a small model is a few thousand floats per (row, head): handing that to the
  // intra-op pool costs more than it saves, so only real work (a prompt, a long cache) goes parallel.
  const int64_t work = problem.batch * problem.heads *
                       (problem.q_len * problem.groups * problem.phys +
                        problem.kept * static_cast<int64_t>(problem.key_dim + problem.value_dim));
  if (tasks > 1 && work > (int64_t{1} << 16)) {
    return api->KernelContext_ParallelFor(context, UpdateOne, tasks, 0, &task);
  }
  for (size_t i = 0; i < tasks; ++i) UpdateOne(&task, i);
  return nullptr;
}

// ---- registration ----------------------------------------------------------------------------------

namespace {

OrtStatus* ORT_API_CALL CreateKernel(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo*,
                                     void** kernel) {
  *kernel = new Kernel{api, static_cast<const OpDefinition*>(op)->compute_};
  return nullptr;
}

ONNXTensorElementDataType ORT_API_CALL InputType(const OrtCustomOp* op, size_t index) {
  switch (index) {
    case kKey:
    case kValue:
      return static_cast<const OpDefinition*>(op)->cache_type_;
    case kNewValid:
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL;
    case kLimits:
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    default:
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
}

ONNXTensorElementDataType ORT_API_CALL OutputType(const OrtCustomOp* op, size_t index) {
  return index == kScoresOut ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : static_cast<const OpDefinition*>(op)->cache_type_;
}

OrtMemType ORT_API_CALL InputMemoryType(const OrtCustomOp* op, size_t index) {
  // The output shapes depend on limits, and alpha is one float: the CUDA kernel reads both on the host
  // (ORT copies them there before the call), so it never waits for the device.
  const bool host = static_cast<const OpDefinition*>(op)->host_scalars_ && (index == kAlpha || index == kLimits);
  return host ? OrtMemTypeCPUInput : OrtMemTypeDefault;
}

}  // namespace

OpDefinition::OpDefinition(const char* provider, ONNXTensorElementDataType cache_type, ComputeFn compute,
                           bool host_scalars)
    : OrtCustomOp{}, provider_(provider), cache_type_(cache_type), compute_(compute), host_scalars_(host_scalars) {
  version = kMinApiVersion;
  GetName = [](const OrtCustomOp*) { return kOpType; };
  GetExecutionProviderType = [](const OrtCustomOp* op) { return static_cast<const OpDefinition*>(op)->provider_; };
  GetInputTypeCount = [](const OrtCustomOp*) { return static_cast<size_t>(kInputCount); };
  GetOutputTypeCount = [](const OrtCustomOp*) { return static_cast<size_t>(kOutputCount); };
  GetInputType = InputType;
  GetOutputType = OutputType;
  GetInputMemoryType = InputMemoryType;
  GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
  GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
  GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
  GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
  // The V2 entry points return a status instead of throwing across the C ABI.
  CreateKernel = nullptr;
  KernelCompute = nullptr;
  CreateKernelV2 = slimformer_a2sf::CreateKernel;
  KernelComputeV2 = [](void* state, OrtKernelContext* context) -> OrtStatusPtr {
    const auto* kernel = static_cast<const Kernel*>(state);
    return kernel->compute(kernel->api, context);
  };
  KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
  GetStartVersion = [](const OrtCustomOp*) { return kOpVersion; };
  GetEndVersion = [](const OrtCustomOp*) { return kOpVersion; };
}

// ---- library entry points --------------------------------------------------------------------------

namespace {

const OpDefinition kCpuFloat("CPUExecutionProvider", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ComputeCpu, false);
const OpDefinition kCpuHalf("CPUExecutionProvider", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, ComputeCpu, false);
#if defined(SLIMFORMER_A2SF_CUDA)
const OpDefinition kCudaFloat("CUDAExecutionProvider", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ComputeCuda, true);
const OpDefinition kCudaHalf("CUDAExecutionProvider", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, ComputeCuda, true);
#endif

// A session keeps pointers into the domains added to its options, so they live as long as the library:
// one per RegisterCustomOps call (one per SessionOptions), released when the library is unloaded.
struct Domains {
  std::mutex mutex;
  std::vector<OrtCustomOpDomain*> list;
  const OrtApi* api = nullptr;

  ~Domains() {
    for (OrtCustomOpDomain* domain : list) api->ReleaseCustomOpDomain(domain);
  }
};

Domains& AllDomains() {
  static Domains domains;
  return domains;
}

}  // namespace

}  // namespace slimformer_a2sf

extern "C" {

// Called by SessionOptions.register_custom_ops_library / RegisterCustomOpsLibrary_V2.
__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                               const OrtApiBase* api_base) {
  using namespace slimformer_a2sf;
  const OrtApi* api = api_base->GetApi(kMinApiVersion);
  if (api == nullptr) {
    // Without an API table there is no way to build an error status; the Python loader refuses such
    // runtimes before registering (exporters/native/__init__.py), so this is only reached from C.
    return nullptr;
  }
  OrtCustomOpDomain* domain = nullptr;
  A2SF_RETURN_IF_ERROR(api->CreateCustomOpDomain(kDomain, &domain));
  {
    Domains& domains = AllDomains();
    std::lock_guard<std::mutex> lock(domains.mutex);
    domains.api = api;
    domains.list.push_back(domain);
  }
  const OrtCustomOp* ops[] = {
      &kCpuFloat, &kCpuHalf,
#if defined(SLIMFORMER_A2SF_CUDA)
      &kCudaFloat, &kCudaHalf,
#endif
  };
  for (const OrtCustomOp* op : ops) A2SF_RETURN_IF_ERROR(api->CustomOpDomain_Add(domain, op));
  return api->AddCustomOpDomain(options, domain);
}

// What the loader checks before registering: a JSON object naming the op, the API versions and whether
// the CUDA kernel is compiled in.
__attribute__((visibility("default"))) const char* SlimformerA2SFInfo() {
#define A2SF_STR2(x) #x
#define A2SF_STR(x) A2SF_STR2(x)
  return "{\"op\": \"ai.slimformer::A2SFCacheUpdate\", \"op_version\": 1, "
         "\"api_version_built\": " A2SF_STR(ORT_API_VERSION) ", "
         "\"api_version_required\": " A2SF_STR(A2SF_MIN_API_VERSION) ", "
#if defined(SLIMFORMER_A2SF_CUDA)
         "\"providers\": [\"CPUExecutionProvider\", \"CUDAExecutionProvider\"]}";
#else
         "\"providers\": [\"CPUExecutionProvider\"]}";
#endif
}

}  // extern "C"
