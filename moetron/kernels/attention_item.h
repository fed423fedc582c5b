// One (query row, kv head) item of causal attention over the paged KV cache: shared by the
// attention kernel (attention_avx2.cpp) and the fused decoder layer (layer_avx2.cpp).
#pragma once
#include <math.h>
#include <stdint.h>

#include <vector>

#include "simd_avx2.h"

namespace moetron {

// C: the cache's element type, float or bf16 (widened exactly in registers, simd_avx2.h).
template <typename C>
inline void attend_item(const float* q_Hd, int64_t ldq_h, const C* k_cache, const C* v_cache,
                 const int64_t* block_table, int64_t num_keys, int64_t kv_head, int64_t r, int64_t G,
                 int64_t d, int64_t S, float scale, float* out_Hd, std::vector<float>& scratch) {
    const int64_t padded = (num_keys + 7) & ~int64_t(7);
    scratch.resize(static_cast<size_t>(r * padded + d));
    float* acc = scratch.data() + r * padded;
    const int64_t row = G * d;  // floats per cached token
    // Scores: one dot product per (head, key).
    for (int64_t j = 0; j < num_keys; ++j) {
        const C* k = k_cache + (block_table[j / S] * S + j % S) * row + kv_head * d;
        for (int64_t h = 0; h < r; ++h) scratch[h * padded + j] = dot(q_Hd + h * ldq_h, k, d) * scale;
    }
    for (int64_t h = 0; h < r; ++h) {
        float* s = scratch.data() + h * padded;
        // Softmax over the P keys, 8 at a time; padding lanes are masked to exact zeros.
        __m256 vmax = _mm256_set1_ps(-INFINITY);
        for (int64_t j = 0; j < padded; j += 8) {
            const __m256 valid = first_lanes(num_keys - j);
            vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_loadu_ps(s + j), valid));
        }
        const __m256 m = _mm256_set1_ps(hmax(vmax));
        __m256 vsum = _mm256_setzero_ps();
        for (int64_t j = 0; j < padded; j += 8) {
            const __m256 valid = first_lanes(num_keys - j);
            const __m256 p = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), m)), valid);
            _mm256_storeu_ps(s + j, p);
            vsum = _mm256_add_ps(vsum, p);
        }
        const float inv_sum = 1.0f / hsum(vsum);
        // Value sum in key order: acc[0:d] += p_j * v_j.
        for (int64_t i = 0; i < d; ++i) acc[i] = 0.0f;
        const int64_t d8 = d & ~int64_t(7);
        for (int64_t j = 0; j < num_keys; ++j) {
            const C* v = v_cache + (block_table[j / S] * S + j % S) * row + kv_head * d;
            const __m256 p = _mm256_set1_ps(s[j]);
            for (int64_t i = 0; i < d8; i += 8)
                _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(p, load_w(v + i), _mm256_loadu_ps(acc + i)));
            for (int64_t i = d8; i < d; ++i) acc[i] = __builtin_fmaf(s[j], w_at(v + i), acc[i]);
        }
        float* o = out_Hd + h * d;
        for (int64_t i = 0; i < d; ++i) o[i] = acc[i] * inv_sum;
    }
}

}  // namespace moetron
