// MBR scores: mean cosine similarity of each sample to the other valid samples of its row.
//
// Same math as kernels/mbr.py: with u_j = v_j * e_j / max(||e_j||, eps) and S = sum_j u_j,
//   score_i = (u_i . S - u_i . u_i) / (n_valid - 1)      (include_self: u_i . S / n_valid)
// invalid -> -inf, a valid sample without valid peers -> 0. One block per row b: pass 1 computes the N
// weights (warp per sample); pass 2 walks D in chunks of DC columns (last chunk first), stages the weighted
// [N, DC] tile in shared memory, forms the chunk of S (all warps) and adds every u_i . S and u_i . u_i share.
// No [N, N] matrix.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "mbr.h"

namespace sealong {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileFloats = 8192;  // shared tile budget: 32 KB
constexpr int kMaxN = 1024;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ float warp_sum(float x) {
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) mbr_scores_kernel(
    const T* __restrict__ emb, const uint8_t* __restrict__ mask, float* __restrict__ out, int64_t N,
    int64_t D, int64_t stride_b, int64_t stride_n, int64_t stride_d, bool normalize, bool include_self,
    float eps, int DC) {
  extern __shared__ float smem[];
  float* w = smem;                 // [N] weight v_j / max(||e_j||, eps)
  float* dot = w + N;              // [N] u_i . S
  float* self_sim = dot + N;       // [N] u_i . u_i
  float* S = self_sim + N;         // [DC] chunk of S
  float* tile = S + DC;            // [N, DC] chunk of u
  float* partial = tile + N * DC;  // [kWarps, DC] per-warp partial sums of S
  __shared__ int n_valid;

  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const T* row = emb + b * stride_b;
  if (tid == 0) n_valid = 0;
  __syncthreads();

  // pass 1: validity and norms, one warp per sample
  for (int64_t i = warp; i < N; i += kWarps) {
    const bool valid = mask == nullptr || mask[b * N + i] != 0;
    float sq = 0.f;
    if (valid && normalize)
      for (int64_t d = lane; d < D; d += 32) {
        const float x = to_float(row[i * stride_n + d * stride_d]);
        sq += x * x;
      }
    sq = warp_sum(sq);
    if (lane == 0) {
      w[i] = valid ? (normalize ? 1.f / fmaxf(sqrtf(sq), eps) : 1.f) : 0.f;
      dot[i] = 0.f;
      self_sim[i] = 0.f;
      if (valid) atomicAdd(&n_valid, 1);
    }
  }
  __syncthreads();

  // pass 2: chunks of DC columns, last chunk first (pass 1 read it last: likeliest still in cache)
  for (int64_t d0 = ((D - 1) / DC) * DC; d0 >= 0; d0 -= DC) {
    const int dc = static_cast<int>(D - d0 < DC ? D - d0 : DC);
    for (int64_t k = tid; k < N * dc; k += kThreads) {  // threads along d: coalesced when stride_d == 1
      const int64_t i = k / dc, dd = k % dc;
      tile[i * DC + dd] = w[i] == 0.f ? 0.f : to_float(row[i * stride_n + (d0 + dd) * stride_d]) * w[i];
    }
    __syncthreads();
    for (int dd = lane; dd < dc; dd += 32) {  // chunk of S: each warp sums every kWarps-th sample...
      float s = 0.f;
      for (int64_t i = warp; i < N; i += kWarps) s += tile[i * DC + dd];
      partial[warp * DC + dd] = s;
    }
    __syncthreads();
    for (int dd = tid; dd < dc; dd += kThreads) {  // ...then the kWarps partial sums are added
      float s = 0.f;
      for (int k = 0; k < kWarps; ++k) s += partial[k * DC + dd];
      S[dd] = s;
    }
    __syncthreads();
    for (int64_t i = warp; i < N; i += kWarps) {
      float a = 0.f, c = 0.f;
      for (int dd = lane; dd < dc; dd += 32) {
        const float u = tile[i * DC + dd];
        a += u * S[dd];
        c += u * u;
      }
      a = warp_sum(a);
      c = warp_sum(c);
      if (lane == 0) {
        dot[i] += a;
        self_sim[i] += c;
      }
    }
    __syncthreads();
  }

  // mean over the other valid samples (or over all valid ones)
  for (int64_t i = tid; i < N; i += kThreads) {
    const bool valid = mask == nullptr || mask[b * N + i] != 0;
    float score;
    if (!valid)
      score = -INFINITY;
    else if (include_self)
      score = dot[i] / static_cast<float>(n_valid);
    else
      score = n_valid >= 2 ? (dot[i] - self_sim[i]) / static_cast<float>(n_valid - 1) : 0.f;
    out[b * N + i] = score;
  }
}

template <typename T>
void launch(uintptr_t emb, uintptr_t mask, uintptr_t out, int64_t B, int64_t N, int64_t D, int64_t sb,
            int64_t sn, int64_t sd, bool normalize, bool include_self, float eps, cudaStream_t stream) {
  int dc = 256;
  while (dc > 8 && static_cast<int64_t>(dc) * N > kTileFloats) dc /= 2;
  const size_t smem = sizeof(float) * (3 * N + dc + N * dc + kWarps * dc);  // <= 45.3 KB for N <= 1024
  mbr_scores_kernel<T><<<static_cast<unsigned>(B), kThreads, smem, stream>>>(
      reinterpret_cast<const T*>(emb), reinterpret_cast<const uint8_t*>(mask), reinterpret_cast<float*>(out),
      N, D, sb, sn, sd, normalize, include_self, eps, dc);
}

}  // namespace

void mbr_scores_launch(uintptr_t emb, uintptr_t mask, uintptr_t out, int64_t B, int64_t N, int64_t D,
                       int64_t stride_b, int64_t stride_n, int64_t stride_d, int dtype, bool normalize,
                       bool include_self, float eps, uintptr_t stream) {
  if (B < 0 || B > 0x7fffffff) throw std::invalid_argument("B must be in [0, 2^31), got " + std::to_string(B));
  if (N < 1 || N > kMaxN) throw std::invalid_argument("N must be in [1, 1024], got " + std::to_string(N));
  if (D < 1) throw std::invalid_argument("D must be >= 1, got " + std::to_string(D));
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype code must be 0, 1 or 2, got " + std::to_string(dtype));
  if (emb == 0 || out == 0) throw std::invalid_argument("emb and out must be device pointers, got null");
  if (B == 0) return;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == 0)
    launch<float>(emb, mask, out, B, N, D, stride_b, stride_n, stride_d, normalize, include_self, eps, s);
  else if (dtype == 1)
    launch<__half>(emb, mask, out, B, N, D, stride_b, stride_n, stride_d, normalize, include_self, eps, s);
  else
    launch<__nv_bfloat16>(emb, mask, out, B, N, D, stride_b, stride_n, stride_d, normalize, include_self, eps, s);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("mbr_scores launch failed: ") + cudaGetErrorString(err));
}

}  // namespace sealong
