// Native ONNX Runtime kernels for ai.slimformer::A2SFCacheUpdate (version 1).
//
// The contract (inputs, outputs, shapes, dtypes, semantics) is the module docstring of
// exporters/onnx_cache_op.py; these kernels reproduce its ONNX function body. What is shared between the
// CPU kernel (a2sf_cache_op.cc) and the CUDA kernel (a2sf_cache_op_cuda.cu) lives here: input
// validation, the op's schema for ORT, and the total order used to rank slots.
//
// Written against ORT's C API only (no C++ wrapper, no exceptions across the ABI): the C API is
// append-only, so a library built against ORT_API_VERSION N loads in every onnxruntime >= 1.N.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "onnxruntime_c_api.h"

#if defined(__CUDACC__)
#define A2SF_HOST_DEVICE __host__ __device__
#else
#define A2SF_HOST_DEVICE
#endif

namespace slimformer_a2sf {

constexpr const char* kDomain = "ai.slimformer";
constexpr const char* kOpType = "A2SFCacheUpdate";
constexpr int kOpVersion = 1;
// The oldest C API this library needs: KernelContext_ParallelFor (1.17), KernelContext_GetScratchBuffer
// (1.18). Requesting it (rather than the headers' ORT_API_VERSION) keeps the library loadable on every
// onnxruntime >= 1.18; exporters/native/__init__.py checks that before registering.
#define A2SF_MIN_API_VERSION 18
constexpr uint32_t kMinApiVersion = A2SF_MIN_API_VERSION;

enum InputIndex : size_t { kKey, kValue, kPastScores, kProbs, kNewValid, kAlpha, kLimits, kInputCount };
enum OutputIndex : size_t { kKeyOut, kValueOut, kScoresOut, kOutputCount };

// One call's shapes and scalar inputs, validated against the contract.
struct Problem {
  int64_t batch = 0;      // B
  int64_t heads = 0;      // H, KV heads
  int64_t groups = 0;     // G = Hq / H query heads per KV head
  int64_t past = 0;       // P_past
  int64_t q_len = 0;      // Q, tokens in this step
  int64_t phys = 0;       // P = P_past + Q, stored slots after appending
  int64_t key_dim = 0;    // D
  int64_t value_dim = 0;  // Dv
  int64_t kept = 0;       // K = min(P, budget)
  size_t elem_bytes = 0;  // bytes per key / value element (4 or 2)
  float alpha = 1.0f;
  float decay = 1.0f;  // alpha^Q, computed once on the host with the same powf as the ONNX body's Pow
  int64_t budget = 0, sink = 0, recent = 0, window = 0;

  bool Evicts() const { return kept < phys; }
};

// The inputs' data pointers (device pointers for the CUDA kernel, except alpha and limits, which ORT
// hands over in host memory because the output shapes depend on them).
struct Inputs {
  const void* key = nullptr;
  const void* value = nullptr;
  const float* past_scores = nullptr;
  const float* probs = nullptr;
  const bool* new_valid = nullptr;
  const OrtValue* key_value = nullptr;  // for the memory info (device id) of the CUDA kernel
};

struct Outputs {
  void* key = nullptr;
  void* value = nullptr;
  float* scores = nullptr;
};

// Reads and validates every input, computes K and allocates the three outputs. Returns an ORT status
// (nullptr = success) whose message names the offending input.
OrtStatus* Prepare(const OrtApi* api, OrtKernelContext* context, Problem* problem, Inputs* inputs,
                   Outputs* outputs);

// Ranking key of a slot: larger = kept first. It reproduces the function body's TopK, which orders by
// priority (protected slots +inf, then score, empty slots -inf) and breaks ties by the LOWER slot index
// (ORT's TopK comparator), with two deliberate choices: -0.0 ranks equal to +0.0 (as float comparison
// has it), and NaN ranks below every number, so that a NaN score can never corrupt the selection.
A2SF_HOST_DEVICE inline uint32_t OrderedBits(float priority) {
  if (priority != priority) return 0u;  // NaN
  if (priority == 0.0f) priority = 0.0f;  // -0.0 -> +0.0
  uint32_t bits;
  memcpy(&bits, &priority, sizeof(bits));
  // Flip negatives entirely and set the sign bit of positives: unsigned order == float order.
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Priority in the high half, the slot's index reversed in the low half: every key is distinct, so "the K
// largest keys" is one exact set whatever the selection algorithm (nth_element on the CPU, a radix
// select on the GPU).
A2SF_HOST_DEVICE inline uint64_t RankKeyFromBits(uint32_t ordered, int64_t slot) {
  return (static_cast<uint64_t>(ordered) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(slot));
}

A2SF_HOST_DEVICE inline uint64_t RankKey(float priority, int64_t slot) {
  return RankKeyFromBits(OrderedBits(priority), slot);
}

// Row weight alpha^(Q-1-t), 0 outside the score window (window 0 = every row) and for padding rows.
A2SF_HOST_DEVICE inline bool InWindow(int64_t row, int64_t q_len, int64_t window) {
  return window == 0 || row >= q_len - window;
}

using ComputeFn = OrtStatus* (*)(const OrtApi* api, OrtKernelContext* context);

// The op's kernel state: no per-node data, only the API table ORT handed over and the provider's compute.
struct Kernel {
  const OrtApi* api;
  ComputeFn compute;
};

// An OrtCustomOp for one execution provider and one key/value element type (float or float16). ORT
// merges the ops of the same name into one schema and picks the kernel whose types and provider match.
struct OpDefinition : OrtCustomOp {
  OpDefinition(const char* provider, ONNXTensorElementDataType cache_type, ComputeFn compute,
               bool host_scalars);

  const char* provider_;
  ONNXTensorElementDataType cache_type_;
  ComputeFn compute_;
  bool host_scalars_;  // CUDA: alpha and limits stay in host memory
};

OrtStatus* ComputeCpu(const OrtApi* api, OrtKernelContext* context);
#if defined(SLIMFORMER_A2SF_CUDA)
OrtStatus* ComputeCuda(const OrtApi* api, OrtKernelContext* context);
#endif

}  // namespace slimformer_a2sf
