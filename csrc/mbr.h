// MBR scores kernel (CUDA C++ twin of kernels/mbr.py). Raw device pointers and a stream: no torch C++ API.
#pragma once
#include <cstdint>

namespace sealong {

// dtype codes: 0 float32, 1 float16, 2 bfloat16. mask: uint8 [B, N] contiguous or 0 (all valid).
// out: float32 [B, N] contiguous. emb strides are in elements. Throws std::invalid_argument on bad sizes
// and std::runtime_error when the launch fails.
void mbr_scores_launch(uintptr_t emb, uintptr_t mask, uintptr_t out, int64_t B, int64_t N, int64_t D,
                       int64_t stride_b, int64_t stride_n, int64_t stride_d, int dtype, bool normalize,
                       bool include_self, float eps, uintptr_t stream);

}  // namespace sealong
