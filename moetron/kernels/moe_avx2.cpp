// A whole routed-expert SwiGLU layer in one call (fp32, AVX2): moetron's serving MoE.
//
// out[t] = sum_k weight[t, k] * w2[e] (silu(w1[e] x_t) * w3[e] x_t), e = expert_ids[t, k], with
// three parallel phases over (expert, weight-row chunk) work items and one pass over tokens:
//   1. each expert's rows (its tokens, gathered) times w1 and w3, fused into h = silu(a) * b;
//   2. h times w2;
//   3. each token's top-k results summed in k order, scaled by its routing weights.
// Python would spend more time dispatching a decode step's few rows per expert (sort, gather,
// three matmuls, silu, scatter per expert) than the matmuls take. Every matmul element comes from
// linear_tiles.h, silu from exp8 lane-wise, the sum in a fixed order: a token's output has the same
// bits whatever else is routed with it.
//
// Legend: T tokens, K experts per token, D width, I expert hidden width, E experts,
// P = T * K routed pairs in expert order.
#include <stdint.h>

#include <vector>

#include "export.h"
#include "moe.h"

using namespace moetron;

namespace {

struct Item {
    int64_t expert, n0, n1;
};

// Work items: each expert with rows, its weight rows (of width K) cut into chunk_rows(K) chunks.
std::vector<Item> chunk_items(const std::vector<int64_t>& counts, int64_t num_rows, int64_t K) {
    const int64_t rows = chunk_rows(K);
    std::vector<Item> items;
    for (int64_t e = 0; e < static_cast<int64_t>(counts.size()); ++e)
        if (counts[e] > 0)
            for (int64_t n0 = 0; n0 < num_rows; n0 += rows)
                items.push_back({e, n0, n0 + rows < num_rows ? n0 + rows : num_rows});
    return items;
}

// h[:, n0:n1] = silu(a) * b lane-wise; the last partial vector is masked, its lanes computed by the
// same operations as any other.
void silu_mul(float* h, const float* b, int64_t ld, int64_t rows, int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < rows; ++m)
        for (int64_t n = n0; n < n1; n += 8) {
            const __m256i mask = _mm256_castps_si256(first_lanes(n1 - n));
            const __m256 a = _mm256_maskload_ps(h + m * ld + n, mask);
            const __m256 bv = _mm256_maskload_ps(b + m * ld + n, mask);
            _mm256_maskstore_ps(h + m * ld + n, mask, _mm256_mul_ps(silu8(a), bv));
        }
}

}  // namespace

namespace moetron {

// The pairs (t, k) whose expert lies in [first_expert, first_expert + E) run that expert, whose
// weights are the E stacked here; the others (another rank's experts, or id -1) are skipped.
// `finish` then runs once per token t in the parallel region, given y (the pairs' outputs in expert
// order) and slot_of_pair (-1 for a skipped pair): the combine of moe_experts, or expert_outputs'
// copy-out.
template <typename Finish>
void routed_pairs(const float* x, const int64_t* expert_ids, int64_t first_expert, Weight w1, Weight w3,
                  Weight w2, int64_t T, int64_t K, int64_t D, int64_t I, int64_t E, int num_threads,
                  Finish finish) {
    const int64_t P = T * K;
    // Pairs in expert order (stable: by token, then k): counting sort.
    std::vector<int64_t> counts(E, 0), start(E + 1, 0), slot_of_pair(P, -1);
    auto local = [&](int64_t p) {
        const int64_t e = expert_ids[p] - first_expert;
        return e >= 0 && e < E ? e : -1;
    };
    for (int64_t p = 0; p < P; ++p)
        if (local(p) >= 0) ++counts[local(p)];
    for (int64_t e = 0; e < E; ++e) start[e + 1] = start[e] + counts[e];
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < P; ++p)
        if (local(p) >= 0) slot_of_pair[p] = fill[local(p)]++;
    const int64_t num_pairs = start[E];
    // Workspace: gathered rows xs [N, D], h and b [N, I], y [N, D] for the N local pairs. Kept per
    // calling thread and only grown: a fresh allocation per call page-faults (and zeroes) tens of MB
    // per prefill layer.
    static thread_local std::vector<float> workspace;
    const size_t need = static_cast<size_t>(num_pairs * (2 * D + 2 * I));
    if (workspace.size() < need) workspace.resize(need);
    float* const xs = workspace.data();
    float* const h = xs + num_pairs * D;
    float* const b = h + num_pairs * I;
    float* const y = b + num_pairs * I;
    for (int64_t p = 0; p < P; ++p) {
        if (slot_of_pair[p] < 0) continue;
        const float* src = x + (p / K) * D;
        float* dst = xs + slot_of_pair[p] * D;
        for (int64_t i = 0; i < D; ++i) dst[i] = src[i];
    }
    const std::vector<Item> up = chunk_items(counts, I, D), down = chunk_items(counts, D, I);
    const int64_t num_up = static_cast<int64_t>(up.size()), num_down = static_cast<int64_t>(down.size());
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
    {
        // Dynamic: experts get unequal row counts, so equal item counts are not equal work.
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < num_up; ++c) {
            const Item& it = up[c];
            const int64_t rows = counts[it.expert], first = start[it.expert];
            const float* xe = xs + first * D;
            float *he = h + first * I, *be = b + first * I;
            linear_chunk(xe, D, w1 + it.expert * I * D, D, he, I, rows, D, it.n0, it.n1);
            linear_chunk(xe, D, w3 + it.expert * I * D, D, be, I, rows, D, it.n0, it.n1);
            silu_mul(he, be, I, rows, it.n0, it.n1);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < num_down; ++c) {
            const Item& it = down[c];
            const int64_t rows = counts[it.expert], first = start[it.expert];
            linear_chunk(h + first * I, I, w2 + it.expert * D * I, I, y + first * D, D, rows, I,
                         it.n0, it.n1);
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; ++t) finish(t, y, slot_of_pair.data());
    }
}

// out[t] = weight_0 * y_0 + weight_1 * y_1 + ... in k order, y_k = row(k) ([D] each): a product,
// then one FMA per further expert. The one combine of every path (one process, or a rank
// combining the expert outputs the exchange brought back), so their bits agree.
template <typename Row>
void combine_token(float* o, Row row, const float* weights, int64_t K, int64_t D) {
    const int64_t D8 = D & ~int64_t(7);
    for (int64_t k = 0; k < K; ++k) {
        const float* yk = row(k);
        const float wk = weights[k];
        const __m256 wv = _mm256_set1_ps(wk);
        for (int64_t i = 0; i < D8; i += 8) {
            const __m256 v = _mm256_loadu_ps(yk + i);
            _mm256_storeu_ps(o + i, k == 0 ? _mm256_mul_ps(wv, v) : _mm256_fmadd_ps(wv, v, _mm256_loadu_ps(o + i)));
        }
        for (int64_t i = D8; i < D; ++i) o[i] = k == 0 ? wk * yk[i] : __builtin_fmaf(wk, yk[i], o[i]);
    }
}

void moe_experts(const float* x, const int64_t* expert_ids, const float* weights, Weight w1, Weight w3, Weight w2,
                 float* out, int64_t T, int64_t K, int64_t D, int64_t I, int64_t E, int num_threads) {
    routed_pairs(x, expert_ids, 0, w1, w3, w2, T, K, D, I, E, num_threads,
                 [&](int64_t t, const float* y, const int64_t* slot_of_pair) {
                     auto row = [&](int64_t k) { return y + slot_of_pair[t * K + k] * D; };
                     combine_token(out + t * D, row, weights + t * K, K, D);
                 });
}

void expert_outputs(const float* x, const int64_t* expert_ids, int64_t first_expert, Weight w1, Weight w3,
                    Weight w2, float* out, int64_t T, int64_t K, int64_t D, int64_t I, int64_t E, int num_threads) {
    routed_pairs(x, expert_ids, first_expert, w1, w3, w2, T, K, D, I, E, num_threads,
                 [&](int64_t t, const float* y, const int64_t* slot_of_pair) {
                     for (int64_t k = 0; k < K; ++k) {
                         const int64_t slot = slot_of_pair[t * K + k];
                         if (slot < 0) continue;
                         const float* src = y + slot * D;
                         float* dst = out + (t * K + k) * D;
                         for (int64_t i = 0; i < D; ++i) dst[i] = src[i];
                     }
                 });
}

}  // namespace moetron

extern "C" {

// x [T, D], expert_ids / weights [T, K] (int64 / fp32), w1 / w3 [E, I, D], w2 [E, D, I], all
// contiguous, each in the format its code names (weights.h). Writes out [T, D].
void moetron_moe_swiglu(const float* x, const int64_t* expert_ids, const float* weights, const void* w1,
                        int w1_format, const void* w3, int w3_format, const void* w2, int w2_format, float* out,
                        int64_t T, int64_t K, int64_t D, int64_t I, int64_t E, int num_threads) {
    moe_experts(x, expert_ids, weights, {w1, w1_format}, {w3, w3_format}, {w2, w2_format}, out, T, K, D, I, E,
                num_threads);
}

// Expert parallelism's half of the layer: x [T, D] (every rank's routed rows), expert_ids [T, K]
// (global ids; -1 for padding), w1 / w3 [E, I, D], w2 [E, D, I] the E experts from first_expert on.
// Writes out[t, k] ([T, K, D]) for the pairs routed to those experts and leaves the others as the
// caller filled them (-0.0, the exact identity of the sum that brings them home).
void moetron_moe_expert_outputs(const float* x, const int64_t* expert_ids, int64_t first_expert, const void* w1,
                                int w1_format, const void* w3, int w3_format, const void* w2, int w2_format,
                                float* out, int64_t T, int64_t K, int64_t D, int64_t I, int64_t E, int num_threads) {
    expert_outputs(x, expert_ids, first_expert, {w1, w1_format}, {w3, w3_format}, {w2, w2_format}, out, T, K, D,
                   I, E, num_threads);
}

// h[t] = h[t] + sum_k weights[t, k] * y[t, k] (y [T, K, D]): moe_block's combine and residual add,
// op for op, on expert outputs computed elsewhere.
void moetron_moe_combine(float* h, const float* y, const float* weights, int64_t T, int64_t K, int64_t D) {
    std::vector<float> o(D);
    for (int64_t t = 0; t < T; ++t) {
        combine_token(o.data(), [&](int64_t k) { return y + (t * K + k) * D; }, weights + t * K, K, D);
        for (int64_t i = 0; i < D; ++i) h[t * D + i] = h[t * D + i] + o[i];
    }
}

}  // extern "C"

MOETRON_EXPORT(moetron_moe_swiglu);
MOETRON_EXPORT(moetron_moe_expert_outputs);
MOETRON_EXPORT(moetron_moe_combine);
