// A MoE layer's routing and row moves for CPU training (model/routed_swiglu_cpu.py, model/moe.py):
//   * top-K choice on the router's probabilities and its gradient; where each pair's row goes in the
//     experts' buffer (a counting sort, for torch's argsort and five map-building ops);
//   * dispatch of token rows to the experts' buffer, the weighted combine back, and the two backward
//     moves, each one pass that gathers, converts and weighs at once. torch needed 3-5 whole-tensor
//     ops for each (a zero row appended, index_select, dtype casts, a product with the weights, a
//     sum over the K choices).
//
// The arithmetic is torch's, operation for operation, so the results are its bits: widening bf16 is
// exact, products are rounded to fp32 before they are added (no FMA: -ffp-contract=off), sums over
// a token's K choices run k = 0, 1, ... from 0, and rounding to bf16 is torch's (to_bf16). Only
// the router weights' gradient (a dot product over D) sums in its own fixed order.
//
// Legend: T tokens, K choices per token, P = T * K pairs (t * K + k), S buffer rows, D width.
// pair_S[s]: the pair buffer row s holds, or P for a padding row (zero). slot_P[p]: the buffer row
// of pair p, or S if the pair was dropped (it contributes nothing).
#include <stdint.h>

#include <type_traits>
#include <vector>

#include "export.h"
#include "simd_avx2.h"

using namespace moetron;

namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) { return load_w(p); }

inline void store8(float* p, __m256 v) { store_w(p, v); }
inline void store8(bf16* p, __m256 v) { store_w(p, v); }

inline float at(const float* p) { return *p; }
inline float at(const bf16* p) { return w_at(p); }

// out = x (converted), or zeros for a null x.
template <typename In, typename Out>
inline void copy_row(const In* x, Out* out, int64_t D) {
    int64_t d = 0;
    if (x == nullptr) {
        for (; d + 8 <= D; d += 8) store8(out + d, _mm256_setzero_ps());
        for (; d < D; ++d) store_w(out + d, 0.0f);
        return;
    }
    for (; d + 8 <= D; d += 8) store8(out + d, load8(x + d));
    for (; d < D; ++d) store_w(out + d, at(x + d));
}

template <typename In, typename Out>
void dispatch(const In* x_TD, const int64_t* pair_S, int64_t S, int64_t K, int64_t T, int64_t D, Out* out_SD,
              int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1) schedule(static)
    for (int64_t s = 0; s < S; ++s) {
        const int64_t t = pair_S[s] / K;
        copy_row(t < T ? x_TD + t * D : static_cast<const In*>(nullptr), out_SD + s * D, D);
    }
}

// out[t] = sum_k scale_k * rows[slot_P[t*K + k]] in fp32, each product rounded before it is added.
// scale_TK null: every scale is 1 (no products).
template <typename In, typename Out>
void gather_sum(const In* rows_SD, int64_t S, const int64_t* slot_P, const float* scale_TK, int64_t T,
                int64_t K, int64_t D, Out* out_TD, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1) schedule(static)
    for (int64_t t = 0; t < T; ++t) {
        Out* out = out_TD + t * D;
        int64_t d = 0;
        for (; d + 8 <= D; d += 8) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t k = 0; k < K; ++k) {
                const int64_t s = slot_P[t * K + k];
                if (s >= S) continue;  // dropped: torch adds a zero row's product, +0
                __m256 v = load8(rows_SD + s * D + d);
                if (scale_TK) v = _mm256_mul_ps(v, _mm256_set1_ps(scale_TK[t * K + k]));
                acc = _mm256_add_ps(acc, v);
            }
            store8(out + d, acc);
        }
        for (; d < D; ++d) {
            float acc = 0.0f;
            for (int64_t k = 0; k < K; ++k) {
                const int64_t s = slot_P[t * K + k];
                if (s >= S) continue;
                float v = at(rows_SD + s * D + d);
                if (scale_TK) v = v * scale_TK[t * K + k];
                acc = acc + v;
            }
            store_w(out + d, acc);
        }
    }
}

// dot() for fp32 or bf16 rows on both sides (the same order: 8 lanes of FMAs, hsum, the tail).
template <typename A, typename B>
inline float dot_rows(const A* a, const B* b, int64_t n) {
    if constexpr (std::is_same_v<A, float>) {
        return dot(a, b, n);
    } else {
        __m256 acc = _mm256_setzero_ps();
        const int64_t n8 = n & ~int64_t(7);
        for (int64_t i = 0; i < n8; i += 8) acc = _mm256_fmadd_ps(load8(a + i), load8(b + i), acc);
        float s = hsum(acc);
        for (int64_t i = n8; i < n; ++i) s = __builtin_fmaf(at(a + i), at(b + i), s);
        return s;
    }
}

// dy_SD[s] = dout[t] * w[t, k] rounded to Out, for the pair (t, k) row s holds (zeros for padding);
// dw_TK[t, k] = sum_d dout[t, d] * y[slot of (t, k), d] (0 for a dropped pair), fixed order.
template <typename G, typename Out>
void combine_backward(const G* dout_TD, const float* w_TK, const Out* y_SD, const int64_t* slot_P,
                      const int64_t* pair_S, int64_t S, int64_t T, int64_t K, int64_t D, Out* dy_SD, float* dw_TK,
                      int num_threads) {
    const int64_t P = T * K;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
    {
#pragma omp for schedule(static) nowait
        for (int64_t s = 0; s < S; ++s) {
            const int64_t p = pair_S[s];
            Out* dy = dy_SD + s * D;
            if (p >= P) {
                copy_row(static_cast<const float*>(nullptr), dy, D);
                continue;
            }
            const G* dout = dout_TD + (p / K) * D;
            const __m256 w = _mm256_set1_ps(w_TK[p]);
            int64_t d = 0;
            for (; d + 8 <= D; d += 8) store8(dy + d, _mm256_mul_ps(load8(dout + d), w));
            for (; d < D; ++d) store_w(dy + d, at(dout + d) * w_TK[p]);
        }
        if (dw_TK) {
#pragma omp for schedule(static)
            for (int64_t p = 0; p < P; ++p) {
                const int64_t s = slot_P[p];
                dw_TK[p] = s < S ? dot_rows(dout_TD + (p / K) * D, y_SD + s * D, D) : 0.0f;
            }
        }
    }
}

}  // namespace

extern "C" {

// Each token's K experts by probs_TE + bias_E (descending; the lower expert first among equal scores,
// where torch.topk leaves the choice unspecified), weighted by the unbiased probabilities, divided by their sum if `normalize` (summed
// from 0 in choice order, as torch sums): ids_TK, weights_TK.
void moetron_moe_topk(const float* probs_TE, const float* bias_E, int64_t T, int64_t E, int64_t K, int normalize,
                      int64_t* ids_TK, float* weights_TK, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1) schedule(static)
    for (int64_t t = 0; t < T; ++t) {
        const float* p = probs_TE + t * E;
        uint64_t taken = 0;  // E <= 64 (checked by the caller)
        float chosen = 0.0f;
        for (int64_t j = 0; j < K; ++j) {
            int64_t best = -1;
            float best_score = 0.0f;
            for (int64_t e = 0; e < E; ++e) {
                const float score = p[e] + bias_E[e];
                if (!(taken >> e & 1) && (best < 0 || score > best_score)) best = e, best_score = score;
            }
            taken |= uint64_t(1) << best;
            ids_TK[t * K + j] = best;
            weights_TK[t * K + j] = p[best];
            chosen = chosen + p[best];
        }
        if (normalize)
            for (int64_t j = 0; j < K; ++j) weights_TK[t * K + j] = weights_TK[t * K + j] / chosen;
    }
}

// The gradient of moetron_moe_topk's weights with respect to probs_TE: dprobs_TE is zero but at the
// chosen experts, where it is dw_k (unnormalised) or (dw_k - sum_j dw_j w_j) / sum_j p_j.
void moetron_moe_topk_backward(const float* dweights_TK, const float* weights_TK, const float* probs_TE,
                               const int64_t* ids_TK, int64_t T, int64_t E, int64_t K, int normalize,
                               float* dprobs_TE, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1) schedule(static)
    for (int64_t t = 0; t < T; ++t) {
        float* dp = dprobs_TE + t * E;
        for (int64_t e = 0; e < E; ++e) dp[e] = 0.0f;
        const float* dw = dweights_TK + t * K;
        const int64_t* ids = ids_TK + t * K;
        if (!normalize) {
            for (int64_t j = 0; j < K; ++j) dp[ids[j]] = dw[j];
            continue;
        }
        float chosen = 0.0f, weighted = 0.0f;
        for (int64_t j = 0; j < K; ++j) {
            chosen = chosen + probs_TE[t * E + ids[j]];
            weighted = weighted + dw[j] * weights_TK[t * K + j];
        }
        for (int64_t j = 0; j < K; ++j) dp[ids[j]] = (dw[j] - weighted) / chosen;
    }
}

// Where each (token, k) pair's row goes in the experts' buffer, whose expert e holds rows
// [start_E[e], start_E[e] + capacity) (capacity < 0: unbounded). An expert's pairs keep the order of
// a stable sort by expert: by pair index t * K + k, or, when `choice_major`, all first choices before
// any second choice (k, then t: GShard's priority); those beyond its capacity are dropped.
// slot_P[p] = its row, or S if dropped; pair_S[s] = the pair in row s, or P for a padding row.
void moetron_moe_plan_rows(const int64_t* ids_TK, int64_t T, int64_t K, int64_t E, const int64_t* start_E,
                           int64_t capacity, int choice_major, int64_t S, int64_t* slot_P, int64_t* pair_S) {
    const int64_t P = T * K;
    std::vector<int64_t> filled(E, 0);
    for (int64_t s = 0; s < S; ++s) pair_S[s] = P;
    for (int64_t i = 0; i < P; ++i) {
        const int64_t p = choice_major ? (i % T) * K + i / T : i;
        const int64_t e = ids_TK[p];
        if (capacity >= 0 && filled[e] >= capacity) {
            slot_P[p] = S;
            continue;
        }
        const int64_t s = start_E[e] + filled[e]++;
        slot_P[p] = s;
        pair_S[s] = p;
    }
}

// out_SD (fp32, or bf16 if out_bf16) = the token row of each buffer row's pair (x_TD fp32, or bf16
// if x_bf16), zero for padding.
void moetron_moe_dispatch_rows(const void* x_TD, int x_bf16, const int64_t* pair_S, int64_t S, int64_t K, int64_t T,
                               int64_t D, void* out_SD, int out_bf16, int num_threads) {
    const auto run = [&](auto* x) {
        if (out_bf16)
            dispatch(x, pair_S, S, K, T, D, static_cast<bf16*>(out_SD), num_threads);
        else
            dispatch(x, pair_S, S, K, T, D, static_cast<float*>(out_SD), num_threads);
    };
    if (x_bf16)
        run(static_cast<const bf16*>(x_TD));
    else
        run(static_cast<const float*>(x_TD));
}

// out_TD (fp32, or bf16 if out_bf16: the fp32 sum rounded once) = sum_k scale_TK[t, k] *
// rows_SD[slot of (t, k)]; rows fp32 or bf16; scale_TK may be null (a plain sum: the gradient of
// the dispatch).
void moetron_moe_gather_sum_rows(const void* rows_SD, int rows_bf16, int64_t S, const int64_t* slot_P,
                                 const float* scale_TK, int64_t T, int64_t K, int64_t D, void* out_TD, int out_bf16,
                                 int num_threads) {
    const auto run = [&](auto* rows) {
        if (out_bf16)
            gather_sum(rows, S, slot_P, scale_TK, T, K, D, static_cast<bf16*>(out_TD), num_threads);
        else
            gather_sum(rows, S, slot_P, scale_TK, T, K, D, static_cast<float*>(out_TD), num_threads);
    };
    if (rows_bf16)
        run(static_cast<const bf16*>(rows_SD));
    else
        run(static_cast<const float*>(rows_SD));
}

// The combine's gradient: dy_SD (the dtype of y_SD) and, unless dw_TK is null, the weights'; dout_TD
// fp32, or bf16 if dout_bf16.
void moetron_moe_combine_backward(const void* dout_TD, int dout_bf16, const float* w_TK, const void* y_SD,
                                  int y_bf16, const int64_t* slot_P, const int64_t* pair_S, int64_t S, int64_t T,
                                  int64_t K, int64_t D, void* dy_SD, float* dw_TK, int num_threads) {
    const auto run = [&](auto* dout) {
        if (y_bf16)
            combine_backward(dout, w_TK, static_cast<const bf16*>(y_SD), slot_P, pair_S, S, T, K, D,
                             static_cast<bf16*>(dy_SD), dw_TK, num_threads);
        else
            combine_backward(dout, w_TK, static_cast<const float*>(y_SD), slot_P, pair_S, S, T, K, D,
                             static_cast<float*>(dy_SD), dw_TK, num_threads);
    };
    if (dout_bf16)
        run(static_cast<const bf16*>(dout_TD));
    else
        run(static_cast<const float*>(dout_TD));
}

}  // extern "C"

MOETRON_EXPORT(moetron_moe_topk);
MOETRON_EXPORT(moetron_moe_topk_backward);
MOETRON_EXPORT(moetron_moe_plan_rows);
MOETRON_EXPORT(moetron_moe_dispatch_rows);
MOETRON_EXPORT(moetron_moe_gather_sum_rows);
MOETRON_EXPORT(moetron_moe_combine_backward);
