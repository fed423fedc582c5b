// The language-model loss's per-row work (model/loss.py), one pass over the logits a row at a time
// instead of seven whole-block torch ops (a cast to fp32, max, gather, subtract and exp, sum,
// scale, scatter-add of the one-hot, a cast back): each row's loss, and its gradient
// (softmax - one-hot) * weight written over its logits in their own dtype. At the demo's 4,096 x
// 8,192 bf16 logits torch's ops took ~35 ms of a 48 ms loss.
//
// One exp per logit, kept in a row buffer between the sum and the scaling. Rows are independent:
// the same bits on any thread, in any batch (for one build: AVX-512 sums 16 lanes, AVX2 8).
#include <math.h>
#include <stdint.h>

#include <vector>

#include "export.h"
#include "simd_avx2.h"

using namespace moetron;

namespace {

// The row loops in the widest vectors the build has: 16 lanes (AVX-512), else 8. A tail's missing
// lanes read -inf (they then add exp(-inf) = 0).
#ifdef __AVX512F__
constexpr int64_t LANES = 16;
using Vec = __m512;
template <typename L>
inline Vec load_logits(const L* row, int64_t j, int64_t V) {
    return j + LANES <= V ? load16(row + j) : load16_first(row + j, V - j, -INFINITY);
}
inline Vec splat(float x) { return _mm512_set1_ps(x); }
inline Vec vmax(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec vsub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec vexp(Vec x) { return exp16(x); }
inline float reduce_max(Vec v) { return _mm512_reduce_max_ps(v); }
inline float reduce_add(Vec v) { return _mm512_reduce_add_ps(v); }
inline Vec load_f32(const float* p) { return _mm512_loadu_ps(p); }
inline void store_f32(float* p, Vec v) { _mm512_storeu_ps(p, v); }
template <typename L>
inline void store_out(L* p, Vec v) { store16(p, v); }
#else
constexpr int64_t LANES = 8;
using Vec = __m256;
template <typename L>
inline Vec load_logits(const L* row, int64_t j, int64_t V) {
    if (j + LANES <= V) return load_w(row + j);
    alignas(32) float tail[8];
    for (int64_t i = 0; i < 8; ++i) tail[i] = j + i < V ? w_at(row + j + i) : -INFINITY;
    return _mm256_load_ps(tail);
}
inline Vec splat(float x) { return _mm256_set1_ps(x); }
inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec vsub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec vexp(Vec x) { return exp8(x); }
inline float reduce_max(Vec v) { return hmax(v); }
inline float reduce_add(Vec v) { return hsum(v); }
inline Vec load_f32(const float* p) { return _mm256_loadu_ps(p); }
inline void store_f32(float* p, Vec v) { _mm256_storeu_ps(p, v); }
template <typename L>
inline void store_out(L* p, Vec v) { store_w(p, v); }
#endif

template <typename L>
void loss_rows(L* logits_NV, const int64_t* targets_N, int64_t N, int64_t V, int64_t ignore_index, float weight,
               float* losses_N, int num_threads) {
    const int64_t padded = (V + LANES - 1) / LANES * LANES;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
    {
        std::vector<float> e(padded);
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; ++n) {
            L* row = logits_NV + n * V;
            const int64_t target = targets_N[n];
            const bool counted = target != ignore_index;
            Vec mx = splat(-INFINITY);
            for (int64_t j = 0; j < V; j += LANES) mx = vmax(mx, load_logits(row, j, V));
            const float m = reduce_max(mx);
            const Vec shift = splat(m);
            Vec acc = splat(0.0f);
            for (int64_t j = 0; j < V; j += LANES) {
                const Vec x = vexp(vsub(load_logits(row, j, V), shift));
                store_f32(e.data() + j, x);
                acc = vadd(acc, x);
            }
            const float sum = reduce_add(acc);
            const float target_logit = counted ? w_at(row + target) : 0.0f;
            losses_N[n] = counted ? m + logf(sum) - target_logit : 0.0f;
            // d loss / d logits = (softmax - one-hot) * weight on counted rows, 0 on the others.
            const float w = counted ? weight : 0.0f;
            const Vec scale = splat(w / sum);
            int64_t j = 0;
            for (; j + LANES <= V; j += LANES) store_out(row + j, vmul(load_f32(e.data() + j), scale));
            for (; j < V; ++j) store_w(row + j, e[j] * (w / sum));
            if (counted) store_w(row + target, e[target] * (w / sum) - w);
        }
    }
}

}  // namespace

extern "C" {

// logits_NV (fp32, or bf16 if `bf16`) -> each row's cross-entropy against targets_N (0 where the
// target is ignore_index) in losses_N, and the logits overwritten with the loss's gradient for a
// loss summed with `weight` per counted row: (softmax - one-hot) * weight.
void moetron_lm_loss_rows(void* logits_NV, int bf16_logits, const int64_t* targets_N, int64_t N, int64_t V,
                          int64_t ignore_index, float weight, float* losses_N, int num_threads) {
    if (bf16_logits) {
        loss_rows(static_cast<bf16*>(logits_NV), targets_N, N, V, ignore_index, weight, losses_N, num_threads);
    } else {
        loss_rows(static_cast<float*>(logits_NV), targets_N, N, V, ignore_index, weight, losses_N, num_threads);
    }
}

}  // extern "C"

MOETRON_EXPORT(moetron_lm_loss_rows);
