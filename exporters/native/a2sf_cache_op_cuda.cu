// ai.slimformer::A2SFCacheUpdate on ORT's CUDA execution provider.
//
// Everything runs on the provider's compute stream (KernelContext_GetGPUComputeStream) with no host
// synchronisation: the only host reads are alpha and limits, which the op declares as CPU inputs (ORT
// places them there), because the output shapes depend on the budget.
//
// Per call, with BH = batch x KV heads:
// * no eviction (P <= budget): one kernel writes the scores straight into scores_out, and the keys and
//   values are copied device-to-device -- the op is then an accumulate plus two memcpys;
// * eviction: one block per (row, head) computes the scores (or reads them from a grid-wide kernel when
//   the step has many query rows, i.e. a prompt), marks protected slots with a block scan, finds the K-th
//   largest rank key with an 8-pass radix select (keys are unique, see RankKey), and compacts the kept
//   slots in their original order with a second block scan while gathering keys, values and scores.
// The rank key and the float operations mirror the CPU kernel (a2sf_cache_op.cc), so both keep the same
// slots; scores can differ from the CPU only through powf's last bit for a multi-token step.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "a2sf_cache_op.h"

namespace slimformer_a2sf {
namespace {

constexpr int kThreads = 256;  // the radix select's 256 bins map one-to-one onto the block's threads
constexpr int kWarps = kThreads / 32;
// A step with at most this many (query row x group) terms per slot computes its scores inside the
// selection block (a decode step: one row); larger steps (prompts) get a grid-wide scores kernel first.
constexpr int64_t kFusedScoreTerms = 64;

struct DeviceProblem {
  int64_t heads, groups, past, q_len, phys, kept;
  int64_t sink, recent, window;
  float alpha, decay;
  const float* past_scores;  // [BH, P_past]
  const float* probs;        // [B, Hq, Q, P]
  const bool* new_valid;     // [B, Q]
};

__device__ __forceinline__ bool IsNegInf(float x) { return isinf(x) && x < 0.0f; }

// Steps 1-3 of the contract for one slot. __fmul_rn / __fadd_rn keep nvcc from contracting into FMAs,
// so the rounding is the CPU kernel's (and, for a one-row step, the ONNX body's, bit for bit).
__device__ float SlotScore(const DeviceProblem& p, int64_t bh, int64_t slot) {
  const int64_t b = bh / p.heads, h = bh % p.heads;
  float base;
  if (slot < p.past) {
    const float past = p.past_scores[bh * p.past + slot];
    base = IsNegInf(past) ? past : __fmul_rn(past, p.decay);
  } else {
    base = p.new_valid[b * p.q_len + slot - p.past] ? 0.0f : -INFINITY;
  }
  const float* probs = p.probs + ((b * p.heads + h) * p.groups) * p.q_len * p.phys + slot;
  float gained = 0.0f;
  for (int64_t row = 0; row < p.q_len; ++row) {
    if (!p.new_valid[b * p.q_len + row] || !InWindow(row, p.q_len, p.window)) continue;
    const float weight = powf(p.alpha, static_cast<float>(p.q_len - 1 - row));  // pow(x, 0) == 1 exactly
    if (weight == 0.0f) continue;  // an underflowed old row adds exactly nothing (as on the CPU)
    float share = probs[row * p.phys];
    for (int64_t g = 1; g < p.groups; ++g) share = __fadd_rn(share, probs[(g * p.q_len + row) * p.phys]);
    gained = __fadd_rn(gained, __fmul_rn(weight, share));
  }
  return __fadd_rn(base, gained);
}

// Grid-wide scores: x over slots, y over (row, head).
__global__ void ScoresKernel(DeviceProblem p, int64_t bh_count, float* scores) {
  for (int64_t bh = blockIdx.y; bh < bh_count; bh += gridDim.y) {
    for (int64_t slot = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; slot < p.phys;
         slot += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      scores[bh * p.phys + slot] = SlotScore(p, bh, slot);
    }
  }
}

// Inclusive prefix sum over the block's threads in thread order; *total gets the block's sum. Every
// thread of the block must call it (it synchronises).
__device__ int64_t BlockInclusiveScan(int64_t value, int64_t* total) {
  __shared__ int64_t warp_sums[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int64_t other = __shfl_up_sync(0xffffffffu, value, offset);
    if (lane >= offset) value += other;
  }
  if (lane == 31) warp_sums[warp] = value;
  __syncthreads();
  if (warp == 0) {
    int64_t sum = lane < kWarps ? warp_sums[lane] : 0;
    for (int offset = 1; offset < 32; offset <<= 1) {
      const int64_t other = __shfl_up_sync(0xffffffffu, sum, offset);
      if (lane >= offset) sum += other;
    }
    if (lane < kWarps) warp_sums[lane] = sum;
  }
  __syncthreads();
  if (warp > 0) value += warp_sums[warp - 1];
  *total = warp_sums[kWarps - 1];
  __syncthreads();  // warp_sums is reused by the next call
  return value;
}

// One block per (row, head): rank, select, compact, gather. `Unit` is the widest copy unit that divides
// both row sizes (and the pointers' alignment).
template <typename Unit>
__global__ void SelectGatherKernel(DeviceProblem p, bool fused_scores, float* scores, uint32_t* ordered,
                                   int32_t* kept_slots, const Unit* key, const Unit* value, Unit* key_out,
                                   Unit* value_out, float* scores_out, int64_t key_units, int64_t value_units) {
  const int64_t bh = blockIdx.x;
  const int64_t P = p.phys, K = p.kept;
  const int tid = threadIdx.x;
  scores += bh * P;
  ordered += bh * P;
  kept_slots += bh * K;

  if (fused_scores) {
    for (int64_t slot = tid; slot < P; slot += kThreads) scores[slot] = SlotScore(p, bh, slot);
    __syncthreads();
  }

  // Step 4: each thread owns a contiguous chunk of slots, so a scan of per-thread counts gives every
  // slot its rank among the real (finite-score) slots.
  const int64_t chunk = (P + kThreads - 1) / kThreads;
  const int64_t begin = min(P, tid * chunk), end = min(P, begin + chunk);
  int64_t mine = 0;
  for (int64_t slot = begin; slot < end; ++slot) mine += !IsNegInf(scores[slot]);
  int64_t n_real = 0;
  int64_t rank = BlockInclusiveScan(mine, &n_real) - mine;
  for (int64_t slot = begin; slot < end; ++slot) {
    const float score = scores[slot];
    const bool real = !IsNegInf(score);
    const bool protect = real && (rank < p.sink || rank >= n_real - p.recent);
    rank += real;
    ordered[slot] = OrderedBits(protect ? INFINITY : score);
  }
  __syncthreads();

  // Step 5a: the K-th largest rank key, one byte per pass from the top. Invariant: `remaining` keys
  // above-or-at the threshold still have to be found among those matching `prefix` in the decided bytes.
  __shared__ uint32_t histogram[kThreads];
  __shared__ uint64_t shared_prefix;
  __shared__ int64_t shared_remaining;
  if (tid == 0) {
    shared_prefix = 0;
    shared_remaining = K;
  }
  __syncthreads();
  for (int shift = 56; shift >= 0; shift -= 8) {
    histogram[tid] = 0;
    __syncthreads();
    const uint64_t decided = shift == 56 ? 0 : (~uint64_t{0} << (shift + 8));
    const uint64_t prefix = shared_prefix;
    const int64_t remaining = shared_remaining;
    for (int64_t slot = tid; slot < P; slot += kThreads) {
      const uint64_t rank_key = RankKeyFromBits(ordered[slot], slot);
      if ((rank_key & decided) == prefix) atomicAdd(&histogram[(rank_key >> shift) & 0xFF], 1u);
    }
    __syncthreads();
    // Thread t looks at bin 255 - t, so the scan counts keys from the largest byte value down.
    const int bin = kThreads - 1 - tid;
    const int64_t count = histogram[bin];
    int64_t total = 0;
    const int64_t above_or_at = BlockInclusiveScan(count, &total);
    if (count > 0 && above_or_at >= remaining && above_or_at - count < remaining) {
      shared_prefix = prefix | (static_cast<uint64_t>(bin) << shift);
      shared_remaining = remaining - (above_or_at - count);
    }
    __syncthreads();
  }
  const uint64_t threshold = shared_prefix;

  // Step 5b: keep key >= threshold (exactly K slots), compacted in slot order.
  int64_t keep_mine = 0;
  for (int64_t slot = begin; slot < end; ++slot) keep_mine += RankKeyFromBits(ordered[slot], slot) >= threshold;
  int64_t kept_total = 0;
  int64_t position = BlockInclusiveScan(keep_mine, &kept_total) - keep_mine;
  float* row_scores_out = scores_out + bh * K;
  for (int64_t slot = begin; slot < end; ++slot) {
    if (RankKeyFromBits(ordered[slot], slot) >= threshold) {
      kept_slots[position] = static_cast<int32_t>(slot);
      row_scores_out[position] = scores[slot];
      ++position;
    }
  }
  __syncthreads();

  // Gather, coalesced over the kept rows' units.
  const Unit* key_rows = key + bh * P * key_units;
  Unit* key_rows_out = key_out + bh * K * key_units;
  for (int64_t e = tid; e < K * key_units; e += kThreads) {
    key_rows_out[e] = key_rows[kept_slots[e / key_units] * key_units + e % key_units];
  }
  const Unit* value_rows = value + bh * P * value_units;
  Unit* value_rows_out = value_out + bh * K * value_units;
  for (int64_t e = tid; e < K * value_units; e += kThreads) {
    value_rows_out[e] = value_rows[kept_slots[e / value_units] * value_units + e % value_units];
  }
}

OrtStatus* CudaStatus(const OrtApi* api, cudaError_t error, const char* what) {
  if (error == cudaSuccess) return nullptr;
  const std::string message = std::string(kOpType) + " (CUDA): " + what + ": " + cudaGetErrorString(error);
  return api->CreateStatus(ORT_RUNTIME_EXCEPTION, message.c_str());
}

template <typename Unit>
void LaunchSelect(cudaStream_t stream, int64_t bh_count, const DeviceProblem& dp, bool fused, float* scores,
                  uint32_t* ordered, int32_t* kept, const Problem& p, const Inputs& in, const Outputs& out) {
  const int64_t key_units = p.key_dim * static_cast<int64_t>(p.elem_bytes) / sizeof(Unit);
  const int64_t value_units = p.value_dim * static_cast<int64_t>(p.elem_bytes) / sizeof(Unit);
  SelectGatherKernel<Unit><<<static_cast<unsigned>(bh_count), kThreads, 0, stream>>>(
      dp, fused, scores, ordered, kept, static_cast<const Unit*>(in.key), static_cast<const Unit*>(in.value),
      static_cast<Unit*>(out.key), static_cast<Unit*>(out.value), out.scores, key_units, value_units);
}

bool Aligned(const void* pointer, size_t bytes) { return reinterpret_cast<uintptr_t>(pointer) % bytes == 0; }

}  // namespace

OrtStatus* ComputeCuda(const OrtApi* api, OrtKernelContext* context) {
  Problem p;
  Inputs in;
  Outputs out;
  OrtStatus* status = Prepare(api, context, &p, &in, &out);
  if (status != nullptr) return status;
  const int64_t bh_count = p.batch * p.heads;
  if (bh_count == 0 || p.kept == 0) return nullptr;  // empty outputs: nothing to compute
  if (p.phys > INT32_MAX || bh_count > INT32_MAX) {
    return api->CreateStatus(ORT_INVALID_ARGUMENT, "A2SFCacheUpdate (CUDA): cache too long for int32 slots");
  }

  void* stream_handle = nullptr;
  if ((status = api->KernelContext_GetGPUComputeStream(context, &stream_handle)) != nullptr) return status;
  auto stream = static_cast<cudaStream_t>(stream_handle);
  const OrtMemoryInfo* memory = nullptr;
  if ((status = api->GetTensorMemoryInfo(in.key_value, &memory)) != nullptr) return status;
  int device = 0, current = -1;
  if ((status = api->MemoryInfoGetId(memory, &device)) != nullptr) return status;
  // This library carries its own (static) CUDA runtime: make the key's device current for the launches.
  if (cudaGetDevice(&current) != cudaSuccess || current != device) {
    if ((status = CudaStatus(api, cudaSetDevice(device), "cudaSetDevice")) != nullptr) return status;
  }

  const DeviceProblem dp{p.heads, p.groups, p.past, p.q_len, p.phys, p.kept, p.sink, p.recent, p.window,
                         p.alpha, p.decay, in.past_scores, in.probs, in.new_valid};
  const unsigned slot_blocks = static_cast<unsigned>(std::min<int64_t>((p.phys + kThreads - 1) / kThreads, 65535));
  const dim3 scores_grid(slot_blocks, static_cast<unsigned>(std::min<int64_t>(bh_count, 65535)));

  if (!p.Evicts()) {
    // Identity: K == P, so scores_out has the scratch layout [BH, P]; keys and values are copied whole.
    ScoresKernel<<<scores_grid, kThreads, 0, stream>>>(dp, bh_count, out.scores);
    const size_t rows = static_cast<size_t>(bh_count * p.phys) * p.elem_bytes;
    if ((status = CudaStatus(api, cudaGetLastError(), "scores kernel")) != nullptr) return status;
    cudaError_t error = cudaMemcpyAsync(out.key, in.key, rows * p.key_dim, cudaMemcpyDeviceToDevice, stream);
    if (error == cudaSuccess) {
      error = cudaMemcpyAsync(out.value, in.value, rows * p.value_dim, cudaMemcpyDeviceToDevice, stream);
    }
    return CudaStatus(api, error, "copying keys and values");
  }

  // Scratch from the provider's (stream-aware) allocator: scores, ordered priorities, kept slots.
  const size_t slots = static_cast<size_t>(bh_count * p.phys);
  const size_t bytes = slots * (sizeof(float) + sizeof(uint32_t)) + static_cast<size_t>(bh_count * p.kept) * sizeof(int32_t);
  void* scratch = nullptr;
  if ((status = api->KernelContext_GetScratchBuffer(context, memory, bytes, &scratch)) != nullptr) return status;
  OrtAllocator* allocator = nullptr;
  if ((status = api->KernelContext_GetAllocator(context, memory, &allocator)) != nullptr) return status;
  auto* scores = static_cast<float*>(scratch);
  auto* ordered = reinterpret_cast<uint32_t*>(scores + slots);
  auto* kept = reinterpret_cast<int32_t*>(ordered + slots);

  const bool fused = p.q_len * p.groups <= kFusedScoreTerms;
  if (!fused) ScoresKernel<<<scores_grid, kThreads, 0, stream>>>(dp, bh_count, scores);
  const size_t key_row = p.key_dim * p.elem_bytes, value_row = p.value_dim * p.elem_bytes;
  auto fits = [&](size_t unit) {
    return key_row % unit == 0 && value_row % unit == 0 && Aligned(in.key, unit) && Aligned(in.value, unit) &&
           Aligned(out.key, unit) && Aligned(out.value, unit);
  };
  if (fits(16)) {
    LaunchSelect<uint4>(stream, bh_count, dp, fused, scores, ordered, kept, p, in, out);
  } else if (fits(8)) {
    LaunchSelect<uint2>(stream, bh_count, dp, fused, scores, ordered, kept, p, in, out);
  } else if (fits(4)) {
    LaunchSelect<uint32_t>(stream, bh_count, dp, fused, scores, ordered, kept, p, in, out);
  } else {
    LaunchSelect<uint16_t>(stream, bh_count, dp, fused, scores, ordered, kept, p, in, out);
  }
  status = CudaStatus(api, cudaGetLastError(), "eviction kernels");
  // Freed at once: the arena hands the block to later work on this same stream only after it.
  allocator->Free(allocator, scratch);
  api->ReleaseAllocator(allocator);
  return status;
}

}  // namespace slimformer_a2sf
