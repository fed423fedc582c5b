// The routed-expert SwiGLU layer of moe_avx2.cpp, for the fused decoder layer (layer_avx2.cpp).
#pragma once
#include <stdint.h>

#include "weights.h"

namespace moetron {

// out[t] = sum_k weights[t, k] * SwiGLU_{expert_ids[t, k]}(x[t]); see moe_avx2.cpp. The expert
// weights in any format of weights.h.
void moe_experts(const float* x, const int64_t* expert_ids, const float* weights, Weight w1, Weight w3, Weight w2,
                 float* out, int64_t T, int64_t K, int64_t D, int64_t I, int64_t E, int num_threads);

}  // namespace moetron
