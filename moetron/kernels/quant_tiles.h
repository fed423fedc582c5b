// x @ w.T over a chunk of block-quantized weight rows (Q8_0, Q4_0, Q4_K): the quantized twin of
// linear_tiles.h, used through weights.h's linear_chunk.
//
// Each x row is quantized on its own (Q8_0, or Q8_K for Q4_K; quant_blocks.h), and every output
// element is one fixed sequence: per weight block, the exact int32 lanes of its dot product with
// the x block, scaled by the two blocks' scales and accumulated lane-wise with FMA in block order;
// then the lanes summed by hsum. No step depends on the tile, chunk, row count or thread, so a
// row's result is the same bits whatever else is computed with it.
//
// Legend: M rows of x, K input width, N output width (rows of w), nb blocks per row.
#pragma once
#include <stdint.h>

#include <type_traits>
#include <vector>

#include "quant_blocks.h"
#include "simd_avx2.h"

namespace moetron {

// A Q8_0 or Q4_0 weight block as 32 int8 values.
inline __m256i block_values(const BlockQ8_0& b) { return load_q8(b.qs); }
inline __m256i block_values(const BlockQ4_0& b) { return unpack_q4_0(b); }

// out[i, j] for MR rows of quantized x and NR weight rows of nb Q8_0/Q4_0 blocks each.
template <int MR, int NR, typename B>
inline void qtile(const BlockQ8_0* xq, int64_t nb, const B* w, float* out, int64_t ldo) {
    __m256 acc[MR][NR];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        __m256i values[NR], magnitudes[NR];
        float dw[NR];
        for (int j = 0; j < NR; ++j) {
            const B& block = w[j * nb + b];
            values[j] = block_values(block);
            magnitudes[j] = _mm256_sign_epi8(values[j], values[j]);
            dw[j] = fp16_to_fp32(block.d);
        }
        for (int i = 0; i < MR; ++i) {
            const BlockQ8_0& xb = xq[i * nb + b];
            const __m256i xv = load_q8(xb.qs);
            const float dx = fp16_to_fp32(xb.d);
            for (int j = 0; j < NR; ++j) {
                const __m256i lanes = dot_lanes_us(magnitudes[j], _mm256_sign_epi8(xv, values[j]));
                acc[i][j] = _mm256_fmadd_ps(_mm256_set1_ps(dw[j] * dx), _mm256_cvtepi32_ps(lanes), acc[i][j]);
            }
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) out[i * ldo + j] = hsum(acc[i][j]);
}

// One Q4_K weight row (nb super-blocks) times one Q8_K x row. Per super-block: the int32 lanes of
// the eight sub-blocks' products, each times its 6-bit scale, summed; the mins' term is one int.
inline float q4_k_dot(const BlockQ4_K* w, const BlockQ8_K* x, int64_t nb) {
    __m256 acc = _mm256_setzero_ps();
    float acc_min = 0.0f;
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int64_t b = 0; b < nb; ++b) {
        const BlockQ4_K& wb = w[b];
        const BlockQ8_K& xb = x[b];
        __m256i sum = _mm256_setzero_si256();
        int sum_min = 0;
        for (int g = 0; g < 4; ++g) {  // 64 values: sub-blocks 2g (low nibbles) and 2g + 1 (high)
            const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb.qs + 32 * g));
            const __m256i lo = _mm256_and_si256(packed, low);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
            int scale_lo, min_lo, scale_hi, min_hi;
            q4_k_scale_min(2 * g, wb.scales, scale_lo, min_lo);
            q4_k_scale_min(2 * g + 1, wb.scales, scale_hi, min_hi);
            const __m256i p_lo = dot_lanes_us(lo, load_q8(xb.qs + 64 * g));
            const __m256i p_hi = dot_lanes_us(hi, load_q8(xb.qs + 64 * g + 32));
            sum = _mm256_add_epi32(sum, _mm256_mullo_epi32(p_lo, _mm256_set1_epi32(scale_lo)));
            sum = _mm256_add_epi32(sum, _mm256_mullo_epi32(p_hi, _mm256_set1_epi32(scale_hi)));
            sum_min += min_lo * (xb.bsums[4 * g] + xb.bsums[4 * g + 1]);
            sum_min += min_hi * (xb.bsums[4 * g + 2] + xb.bsums[4 * g + 3]);
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(xb.d * fp16_to_fp32(wb.d)), _mm256_cvtepi32_ps(sum), acc);
        acc_min = __builtin_fmaf(xb.d * fp16_to_fp32(wb.dmin), static_cast<float>(sum_min), acc_min);
    }
    return hsum(acc) - acc_min;
}

// One Q6_K weight row times one Q8_K x row. A half of 128 values holds four groups of 32 (value
// 32k + l: low nibble of ql[l + 32 (k % 2)] if k < 2 else its high nibble, bits 2k..2k+1 of qh[l]),
// each two sub-blocks of 16 with their own int8 scale. The 6-bit values enter the int8 dot product
// unsigned; their -32 offset is one int per super-block, 32 * sum(scale * x sums of its 16).
inline float q6_k_dot(const BlockQ6_K* w, const BlockQ8_K* x, int64_t nb) {
    __m256 acc = _mm256_setzero_ps();
    float acc_offset = 0.0f;
    const __m256i low = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(0x03);
    for (int64_t b = 0; b < nb; ++b) {
        const BlockQ6_K& wb = w[b];
        const BlockQ8_K& xb = x[b];
        __m256i sum = _mm256_setzero_si256();
        for (int h = 0; h < 2; ++h) {
            const __m256i ql0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb.ql + 64 * h));
            const __m256i ql1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb.ql + 64 * h + 32));
            const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb.qh + 32 * h));
            const __m256i lows[4] = {_mm256_and_si256(ql0, low), _mm256_and_si256(ql1, low),
                                     _mm256_and_si256(_mm256_srli_epi16(ql0, 4), low),
                                     _mm256_and_si256(_mm256_srli_epi16(ql1, 4), low)};
            for (int k = 0; k < 4; ++k) {
                const __m256i highs = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * k), two);
                const __m256i values = _mm256_or_si256(lows[k], _mm256_slli_epi16(highs, 4));
                const __m256i lanes = dot_lanes_us(values, load_q8(xb.qs + 128 * h + 32 * k));
                const int s0 = wb.scales[8 * h + 2 * k], s1 = wb.scales[8 * h + 2 * k + 1];
                sum = _mm256_add_epi32(sum, _mm256_mullo_epi32(lanes, _mm256_setr_epi32(s0, s0, s0, s0, s1, s1, s1, s1)));
            }
        }
        int offset = 0;
        for (int j = 0; j < 16; ++j) offset += wb.scales[j] * xb.bsums[j];
        const float scale = xb.d * fp16_to_fp32(wb.d);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(sum), acc);
        acc_offset = __builtin_fmaf(scale, static_cast<float>(32 * offset), acc_offset);
    }
    return hsum(acc) - acc_offset;
}

// The activation blocks a weight format pairs with.
template <typename B>
struct ActivationBlock {
    using type = BlockQ8_0;
    static constexpr int64_t size = 32;
    static void quantize(const float* x, type* y, int64_t K) { quantize_row_q8_0(x, y, K); }
};
template <>
struct ActivationBlock<BlockQ4_K> {
    using type = BlockQ8_K;
    static constexpr int64_t size = 256;
    static void quantize(const float* x, type* y, int64_t K) { quantize_row_q8_k(x, y, K); }
};
template <>
struct ActivationBlock<BlockQ6_K> : ActivationBlock<BlockQ4_K> {};

// x rows [0, M) quantized into a buffer kept per thread (grown only).
template <typename B>
const typename ActivationBlock<B>::type* quantize_rows(const float* x, int64_t ldx, int64_t M, int64_t K) {
    using A = typename ActivationBlock<B>::type;
    static thread_local std::vector<A> buffer;
    const int64_t nb = K / ActivationBlock<B>::size;
    if (buffer.size() < static_cast<size_t>(M * nb)) buffer.resize(M * nb);
    for (int64_t m = 0; m < M; ++m) ActivationBlock<B>::quantize(x + m * ldx, buffer.data() + m * nb, K);
    return buffer.data();
}

// out[0:M, n0:n1] = x[0:M] @ w[n0:n1].T for w rows of K / block elements each (w points at row 0).
template <typename B>
inline void quant_linear_chunk(const float* x, int64_t ldx, const B* w, float* out, int64_t ldo, int64_t M,
                               int64_t K, int64_t n0, int64_t n1) {
    constexpr int64_t M_BLOCK = 64;  // quantized x rows per pass over the chunk (kept in L2 with it)
    const auto* xq = quantize_rows<B>(x, ldx, M, K);
    const int64_t nb = K / ActivationBlock<B>::size;
    if constexpr (std::is_same_v<B, BlockQ4_K> || std::is_same_v<B, BlockQ6_K>) {
        for (int64_t n = n0; n < n1; ++n)
            for (int64_t m = 0; m < M; ++m) {
                if constexpr (std::is_same_v<B, BlockQ4_K>)
                    out[m * ldo + n] = q4_k_dot(w + n * nb, xq + m * nb, nb);
                else
                    out[m * ldo + n] = q6_k_dot(w + n * nb, xq + m * nb, nb);
            }
        return;
    } else {
        for (int64_t mc = 0; mc < M; mc += M_BLOCK) {
            const int64_t me = mc + M_BLOCK < M ? mc + M_BLOCK : M;
            int64_t n = n0;
            for (; n + 4 <= n1 && me - mc < 4; n += 4)  // few rows: four weight rows per x row
                for (int64_t m = mc; m < me; ++m) qtile<1, 4>(xq + m * nb, nb, w + n * nb, out + m * ldo + n, ldo);
            for (; n + 2 <= n1; n += 2) {
                int64_t m = mc;
                for (; m + 4 <= me; m += 4) qtile<4, 2>(xq + m * nb, nb, w + n * nb, out + m * ldo + n, ldo);
                for (; m < me; ++m) qtile<1, 2>(xq + m * nb, nb, w + n * nb, out + m * ldo + n, ldo);
            }
            for (; n < n1; ++n)
                for (int64_t m = mc; m < me; ++m) qtile<1, 1>(xq + m * nb, nb, w + n * nb, out + m * ldo + n, ldo);
        }
    }
}

}  // namespace moetron
