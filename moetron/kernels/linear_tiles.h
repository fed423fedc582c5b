// Register-tiled fp32 x @ w.T over a chunk of weight rows: the matmul inside moetron's CPU
// kernels (linear_avx2.cpp, moe_avx2.cpp). See linear_avx2.cpp for why every output element comes
// out the same bits whatever the tile, chunk, row count or thread that computes it.
//
// Legend: M rows of x, K input width, N output width (rows of w).
#pragma once
#include <stdint.h>

#include "simd_avx2.h"

namespace moetron {

// One output from its 8-lane accumulator: the fixed tree over the lanes, then the K mod 8 tail in
// order. Every tile ends each output here, so their bits agree by construction.
template <typename W>
inline float finish_dot(__m256 acc, const float* x, const W* w, int64_t K8, int64_t K) {
    float s = hsum(acc);
    for (int64_t k = K8; k < K; ++k) s = __builtin_fmaf(x[k], w_at(w + k), s);
    return s;
}

// The next tile's ROWS weight rows (the ROWS after this tile's), from column k, into L2: once per
// cache line of weights. With a few rows of x, compute could hide the weights' DRAM latency but
// the hardware prefetcher does not run far enough ahead. Prefetches never fault past the end.
template <int ROWS, typename W>
inline void prefetch_next_rows(const W* w, int64_t ldw, int64_t k) {
    constexpr int64_t LINE = 64 / sizeof(W);  // weights per cache line
    if ((k & (LINE - 1)) == 0)
        for (int j = 0; j < ROWS; ++j) _mm_prefetch(reinterpret_cast<const char*>(w + (j + ROWS) * ldw + k), _MM_HINT_T1);
}

// out[i, j] for i < MR rows of x and j < NR rows of w, all with the same per-element arithmetic.
// PREFETCH: ask for the next NR weight rows' lines into L2 while this tile computes.
// W: float or bf16 weights (simd_avx2.h), the same arithmetic on the same values.
template <int MR, int NR, bool PREFETCH = false, typename W>
inline void tile(const float* x, int64_t ldx, const W* w, int64_t ldw, float* out, int64_t ldo,
                 int64_t K) {
    __m256 acc[MR][NR];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
    const int64_t K8 = K & ~int64_t(7);
    for (int64_t k = 0; k < K8; k += 8) {
        if constexpr (PREFETCH) prefetch_next_rows<NR>(w, ldw, k);
        if constexpr (MR <= 2 && sizeof(W) == 2) {
            // bf16: x held, one weight vector widened at a time (MR * NR + MR + 1 registers; the
            // order below spilled an accumulator of the 1x8 tile to the stack). For fp32 weights
            // the order below is faster: its weight loads fold into the FMAs (1 row: +12% GB/s).
            __m256 xv[MR];
            for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(x + i * ldx + k);
            for (int j = 0; j < NR; ++j) {
                const __m256 wv = load_w(w + j * ldw + k);
                for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
            }
        } else {
            __m256 wv[NR];
            for (int j = 0; j < NR; ++j) wv[j] = load_w(w + j * ldw + k);
            for (int i = 0; i < MR; ++i) {
                __m256 xv = _mm256_loadu_ps(x + i * ldx + k);
                for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
            }
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) out[i * ldo + j] = finish_dot(acc[i][j], x + i * ldx, w + j * ldw, K8, K);
}

#if defined(__AVX512F__)
// The AVX-512 build's tile: two weight rows per 16-lane vector, lanes 0-7 the 8-lane accumulator of
// row 2j and lanes 8-15 that of row 2j + 1, each lane running tile's chain (the same FMAs on the
// same operands, k = l mod 8), then finish_dot per row: the same bits as tile, from half
// the FMA instructions. x's 8 floats are broadcast to both halves.
inline __m512 load_w_pair(const float* a, const float* b) {
    const __m512d lo = _mm512_castpd256_pd512(_mm256_castps_pd(_mm256_loadu_ps(a)));
    return _mm512_castpd_ps(_mm512_insertf64x4(lo, _mm256_castps_pd(_mm256_loadu_ps(b)), 1));
}
inline __m512 load_w_pair(const bf16* a, const bf16* b) {
    const __m256i both = _mm256_set_m128i(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)),
                                          _mm_loadu_si128(reinterpret_cast<const __m128i*>(a)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(both), 16));
}

template <int MR, int NP, bool PREFETCH = false, typename W>
inline void tile_pairs(const float* x, int64_t ldx, const W* w, int64_t ldw, float* out, int64_t ldo, int64_t K) {
    __m512 acc[MR][NP];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_setzero_ps();
    const int64_t K8 = K & ~int64_t(7);
    for (int64_t k = 0; k < K8; k += 8) {
        if constexpr (PREFETCH) prefetch_next_rows<2 * NP>(w, ldw, k);
        __m512 wv[NP];
        for (int j = 0; j < NP; ++j) wv[j] = load_w_pair(w + 2 * j * ldw + k, w + (2 * j + 1) * ldw + k);
        for (int i = 0; i < MR; ++i) {
            const __m512 xv = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(x + i * ldx + k))));
            for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NP; ++j)
            for (int half = 0; half < 2; ++half) {
                const __m512d both = _mm512_castps_pd(acc[i][j]);
                const __m256 lanes = _mm256_castpd_ps(half ? _mm512_extractf64x4_pd(both, 1) : _mm512_castpd512_pd256(both));
                out[i * ldo + 2 * j + half] = finish_dot(lanes, x + i * ldx, w + (2 * j + half) * ldw, K8, K);
            }
}
#endif

// Rows [m0, m0 + MR) of x against weight rows [n0, n1), NR at a time, then one at a time.
template <int MR, int NR, typename W, bool PREFETCH = false>
inline void row_block(const float* x, int64_t ldx, const W* w, int64_t ldw, float* out,
                      int64_t ldo, int64_t K, int64_t m0, int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + NR <= n1; n += NR)
        tile<MR, NR, PREFETCH>(x + m0 * ldx, ldx, w + n * ldw, ldw, out + m0 * ldo + n, ldo, K);
    for (; n < n1; ++n) tile<MR, 1>(x + m0 * ldx, ldx, w + n * ldw, ldw, out + m0 * ldo + n, ldo, K);
}

#if defined(__AVX512F__)
// row_block with tile_pairs: 2 * NP weight rows per tile, then one at a time.
template <int MR, int NP, typename W>
inline void row_block_pairs(const float* x, int64_t ldx, const W* w, int64_t ldw, float* out, int64_t ldo, int64_t K,
                            int64_t m0, int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + 2 * NP <= n1; n += 2 * NP)
        tile_pairs<MR, NP>(x + m0 * ldx, ldx, w + n * ldw, ldw, out + m0 * ldo + n, ldo, K);
    for (; n < n1; ++n) tile<MR, 1>(x + m0 * ldx, ldx, w + n * ldw, ldw, out + m0 * ldo + n, ldo, K);
}
#endif

// Weight rows per work item: about 384 KiB of weights (96 rows at K = 1024), which stay in the
// 512 KiB L2 while every row block of x passes over them, and few enough rows to spread one row's N
// over the threads. A multiple of every NR and of 8 (the r8 quantized layout's row groups: 24).
// (A fixed 96 rows put K = 2048's 768 KiB chunks in L3: the expert down-projections of a prefill
// ran 5-8% slower.)
inline int64_t chunk_rows(int64_t K) {
    const int64_t rows = 96 * 1024 / (K > 0 ? K : 1) / 24 * 24;
    return rows < 24 ? 24 : rows > 96 ? 96 : rows;
}
// Rows of x per pass over a weight chunk (kept in L1/L2 together with it).
constexpr int64_t M_CHUNK = 64;


// Up to this many rows, a chunk is walked weight tile by weight tile (each tile's rows of w used
// by every row of x while in L1, next tile prefetched): the weights stream from DRAM once, overlapped
// with compute. Measured at K = 1024 from DRAM, 2 threads: 8 rows 74 -> 89 GFLOP/s, 16 rows 98 -> 115;
// at 32 rows the x-block order below is faster (131 vs 98).
constexpr int64_t STREAMING_ROWS = 16;

// Rows [0, M) of x against one NR-row weight tile at n.
template <int NR, typename W>
inline void weight_tile(const float* x, int64_t ldx, const W* w, int64_t ldw, float* out, int64_t ldo,
                        int64_t M, int64_t K, int64_t n) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) tile<4, NR, true>(x + m * ldx, ldx, w + n * ldw, ldw, out + m * ldo + n, ldo, K);
    for (; m + 2 <= M; m += 2) tile<2, NR, true>(x + m * ldx, ldx, w + n * ldw, ldw, out + m * ldo + n, ldo, K);
    for (; m < M; ++m) tile<1, NR, true>(x + m * ldx, ldx, w + n * ldw, ldw, out + m * ldo + n, ldo, K);
}

#if defined(__AVX512F__)
// weight_tile with tile_pairs: rows [0, M) of x against the 2 * NP weight rows at n.
template <int NP, typename W>
inline void weight_tile_pairs(const float* x, int64_t ldx, const W* w, int64_t ldw, float* out, int64_t ldo,
                              int64_t M, int64_t K, int64_t n) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4)
        tile_pairs<4, NP, true>(x + m * ldx, ldx, w + n * ldw, ldw, out + m * ldo + n, ldo, K);
    for (; m + 2 <= M; m += 2)
        tile_pairs<2, NP, true>(x + m * ldx, ldx, w + n * ldw, ldw, out + m * ldo + n, ldo, K);
    for (; m < M; ++m) tile_pairs<1, NP, true>(x + m * ldx, ldx, w + n * ldw, ldw, out + m * ldo + n, ldo, K);
}
#endif

// out[0:M, n0:n1] = x[0:M] @ w[n0:n1].T.
template <typename W>
inline void linear_chunk(const float* x, int64_t ldx, const W* w, int64_t ldw, float* out, int64_t ldo,
                         int64_t M, int64_t K, int64_t n0, int64_t n1) {
    if (M == 1) {  // decode at batch 1: 8 weight rows at a time stream fastest (bf16: next 8 prefetched)
        row_block<1, 8, W, sizeof(W) == 2>(x, ldx, w, ldw, out, ldo, K, 0, n0, n1);
        return;
    }
    if (M <= STREAMING_ROWS) {
        int64_t n = n0;
#if defined(__AVX512F__)
        for (; n + 4 <= n1; n += 4) weight_tile_pairs<2>(x, ldx, w, ldw, out, ldo, M, K, n);
#endif
        for (; n + 3 <= n1; n += 3) weight_tile<3>(x, ldx, w, ldw, out, ldo, M, K, n);
        for (; n < n1; ++n) weight_tile<1>(x, ldx, w, ldw, out, ldo, M, K, n);
        return;
    }
    // Many rows: x M_CHUNK rows at a time over the chunk, which stays in L2.
    for (int64_t mc = 0; mc < M; mc += M_CHUNK) {
        const int64_t me = mc + M_CHUNK < M ? mc + M_CHUNK : M;
        int64_t m = mc;
#if defined(__AVX512F__)
        for (; m + 4 <= me; m += 4) row_block_pairs<4, 4>(x, ldx, w, ldw, out, ldo, K, m, n0, n1);
#endif
        for (; m + 4 <= me; m += 4) row_block<4, 3>(x, ldx, w, ldw, out, ldo, K, m, n0, n1);
        for (; m + 2 <= me; m += 2) row_block<2, 6>(x, ldx, w, ldw, out, ldo, K, m, n0, n1);
        for (; m < me; ++m) row_block<1, 8>(x, ldx, w, ldw, out, ldo, K, m, n0, n1);
    }
}

}  // namespace moetron
