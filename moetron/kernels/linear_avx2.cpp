// Batch-invariant fp32 linear (out = x @ w.T) for AVX2+FMA CPUs: moetron's serving matmul.
//
// Every output element out[m, n] is one dot product computed the same way whatever M is, which
// tile it falls in and which thread runs it: eight fp32 lanes accumulate x[m, k] * w[n, k] with
// FMA in increasing k (lane l takes k = l mod 8), the lanes are summed in one fixed tree, then the
// k tail (K mod 8) is added in order. So a token's result does not depend on what shares its
// batch, by construction rather than by padding a vendor kernel's shapes.
//
// Speed: register tiles of MR rows x NR weight rows (12 accumulators for 4x3) load each weight
// vector once per MR rows; one row (decode) streams the weights at memory bandwidth, which MKL's
// 1-row sgemv does not reach on this class of CPU. Threads split the weight rows (N), so each
// weight byte is read by one thread only. Built by moetron/kernels/cpu_kernels.py with -fopenmp,
// which binds to the OpenMP runtime torch already loaded (one thread pool, no oversubscription).
//
// Legend: M rows of x, K input width, N output width (rows of w).
#include <stdint.h>

#include "simd_avx2.h"

using moetron::hsum;

namespace {

// out[i, j] for i < MR rows of x and j < NR rows of w, all with the same per-element arithmetic.
template <int MR, int NR>
inline void tile(const float* x, int64_t ldx, const float* w, int64_t ldw, float* out, int64_t ldo,
                 int64_t K) {
    __m256 acc[MR][NR];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
    const int64_t K8 = K & ~int64_t(7);
    for (int64_t k = 0; k < K8; k += 8) {
        __m256 wv[NR];
        for (int j = 0; j < NR; ++j) wv[j] = _mm256_loadu_ps(w + j * ldw + k);
        for (int i = 0; i < MR; ++i) {
            __m256 xv = _mm256_loadu_ps(x + i * ldx + k);
            for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) {
            float s = hsum(acc[i][j]);
            for (int64_t k = K8; k < K; ++k) s = __builtin_fmaf(x[i * ldx + k], w[j * ldw + k], s);
            out[i * ldo + j] = s;
        }
}

// Rows [m0, m0 + MR) of x against weight rows [n0, n1), NR at a time, then one at a time.
template <int MR, int NR>
inline void row_block(const float* x, int64_t ldx, const float* w, int64_t ldw, float* out,
                      int64_t ldo, int64_t K, int64_t m0, int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + NR <= n1; n += NR)
        tile<MR, NR>(x + m0 * ldx, ldx, w + n * ldw, ldw, out + m0 * ldo + n, ldo, K);
    for (; n < n1; ++n) tile<MR, 1>(x + m0 * ldx, ldx, w + n * ldw, ldw, out + m0 * ldo + n, ldo, K);
}

// Weight rows per work item: small enough to spread one row's N over the threads, large enough
// that the item's weights (64 rows x K floats) stay in L2 while every row block of x passes over them.
constexpr int64_t N_CHUNK = 64;
// Rows of x per pass over a weight chunk (kept in L1/L2 together with it).
constexpr int64_t M_CHUNK = 64;

}  // namespace

extern "C" {

void moetron_linear_f32(const float* x, int64_t ldx, const float* w, int64_t ldw, float* out,
                        int64_t ldo, int64_t M, int64_t K, int64_t N, int num_threads) {
    const int64_t num_chunks = (N + N_CHUNK - 1) / N_CHUNK;
    // The caller passes torch's thread count: omp_set_num_threads is per calling thread, and the
    // serving engine steps the model from its own thread.
    if (num_threads > num_chunks) num_threads = static_cast<int>(num_chunks);
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)
    for (int64_t c = 0; c < num_chunks; ++c) {
        const int64_t n0 = c * N_CHUNK, n1 = n0 + N_CHUNK < N ? n0 + N_CHUNK : N;
        for (int64_t mc = 0; mc < M; mc += M_CHUNK) {
            const int64_t me = mc + M_CHUNK < M ? mc + M_CHUNK : M;
            int64_t m = mc;
            for (; m + 4 <= me; m += 4) row_block<4, 3>(x, ldx, w, ldw, out, ldo, K, m, n0, n1);
            for (; m + 2 <= me; m += 2) row_block<2, 6>(x, ldx, w, ldw, out, ldo, K, m, n0, n1);
            for (; m < me; ++m) row_block<1, 8>(x, ldx, w, ldw, out, ldo, K, m, n0, n1);
        }
    }
}

}  // extern "C"
