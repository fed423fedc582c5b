// GGML's block-quantized weight formats (the layouts of ggml-common.h, so GGUF tensors are used as
// they lie in the file) and the integer dot products moetron's quantized matmuls are made of.
//
// Activations are quantized per row to Q8_0 blocks (32 int8 and one fp16 scale, as llama.cpp does
// on x86), so a block's dot product is an exact int32 sum; only the per-block scaling is float.
// Each int32 lane sums four adjacent products, whichever instruction computes it: AVX2's
// maddubs + madd, or AVX512-VNNI's dpbusd in one step. The lanes are the same integers, so the
// AVX2 and AVX-512 builds of these kernels give the same bits.
#pragma once
#include <immintrin.h>
#include <stdint.h>

#include "simd_avx2.h"

namespace moetron {

// ggml_type ids (ggml.h), the format codes the C interface takes; 1000 + id: the same blocks in
// moetron's 8-row interleaved layout (quant_tiles.h).
enum Format : int { F32 = 0, Q4_0 = 2, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30, Q4_0_R8 = 1002, Q8_0_R8 = 1008, Q4_K_R8 = 1012, Q5_K_R8 = 1013, Q6_K_R8 = 1014 };

struct BlockQ8_0 {
    uint16_t d;  // fp16 scale
    int8_t qs[32];
};
struct BlockQ4_0 {
    uint16_t d;
    uint8_t qs[16];  // element j in the low nibble of qs[j], j + 16 in its high nibble; value - 8
};
struct BlockQ4_K {
    uint16_t d, dmin;     // super-block scales of the 6-bit sub-block scales and mins
    uint8_t scales[12];   // 8 scales and 8 mins, 6 bits each
    uint8_t qs[128];      // 256 4-bit values: 64 per 32 bytes, low nibbles first
};
struct BlockQ5_K {
    uint16_t d, dmin;    // as Q4_K's
    uint8_t scales[12];  // as Q4_K's
    uint8_t qh[32];      // the fifth bit: value 64g + l (l < 32) bit 2g of qh[l], 64g + 32 + l bit 2g + 1
    uint8_t qs[128];     // the low 4 bits, as Q4_K's values
};
struct BlockQ6_K {
    uint8_t ql[128];     // low 4 bits (see q6_k_dot for the order)
    uint8_t qh[64];      // high 2 bits
    int8_t scales[16];   // one per 16 values
    uint16_t d;
};
struct BlockQ8_K {  // activations for Q4_K: one fp32 scale per 256, sums of each 16 for the mins
    float d;
    int8_t qs[256];
    int16_t bsums[16];
};
static_assert(sizeof(BlockQ8_0) == 34 && sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_K) == 144 && sizeof(BlockQ5_K) == 176 &&
              sizeof(BlockQ6_K) == 210);

inline float fp16_to_fp32(uint16_t h) { return _cvtsh_ss(h); }
inline uint16_t fp32_to_fp16(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }

// One row of K floats (K a multiple of 32) as Q8_0 blocks, as llama.cpp's x86 quantize_row_q8_0:
// d = max|x| / 127 stored as fp16, q = x * (127 / max|x|) rounded to nearest even.
inline void quantize_row_q8_0(const float* x, BlockQ8_0* y, int64_t K) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < K / 32; ++b) {
        __m256 v[4];
        __m256 amax = _mm256_setzero_ps();
        for (int i = 0; i < 4; ++i) {
            v[i] = _mm256_loadu_ps(x + b * 32 + i * 8);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v[i]));
        }
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_movehdup_ps(m));
        const float max_abs = _mm_cvtss_f32(m);
        y[b].d = fp32_to_fp16(max_abs / 127.f);
        const __m256 inv = _mm256_set1_ps(max_abs != 0.0f ? 127.f / max_abs : 0.0f);
        __m256i q[4];
        for (int i = 0; i < 4; ++i)
            q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_ROUND_NEAREST));
        // int32 -> int16 -> int8 packs interleave 128-bit lanes; the permute puts them back in order.
        const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        const __m256i ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y[b].qs), ordered);
    }
}

// One row of K floats (K a multiple of 256) as Q8_K blocks, as llama.cpp's quantize_row_q8_K_ref:
// the value of largest magnitude (the first one on ties) maps to -128, the rest round to nearest
// even, at most 127; bsums are the sums of each 16. Vectorised, the same numbers as that scalar loop.
inline void quantize_row_q8_k(const float* x, BlockQ8_K* y, int64_t K) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < K / 256; ++b) {
        const float* xb = x + b * 256;
        __m256 vmax = _mm256_setzero_ps();
        for (int i = 0; i < 32; ++i) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign_bit, _mm256_loadu_ps(xb + 8 * i)));
        const float amax = hmax(vmax);
        if (amax == 0.0f) {
            y[b] = BlockQ8_K{};
            continue;
        }
        float max = 0.0f;
        for (int i = 0; i < 32; ++i) {
            const __m256 hit = _mm256_cmp_ps(_mm256_andnot_ps(sign_bit, _mm256_loadu_ps(xb + 8 * i)), _mm256_set1_ps(amax), _CMP_EQ_OQ);
            const int mask = _mm256_movemask_ps(hit);
            if (mask) {
                max = xb[8 * i + __builtin_ctz(mask)];
                break;
            }
        }
        const float iscale = -128.f / max;
        const __m256 scale = _mm256_set1_ps(iscale);
        for (int g = 0; g < 16; ++g) {  // 16 values: two vectors, packed to 16 int8, summed
            __m256i q[2];
            for (int h = 0; h < 2; ++h) {
                const __m256 v = _mm256_round_ps(_mm256_mul_ps(scale, _mm256_loadu_ps(xb + 16 * g + 8 * h)),
                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                q[h] = _mm256_min_epi32(_mm256_cvtps_epi32(v), _mm256_set1_epi32(127));
            }
            const __m256i sum = _mm256_add_epi32(q[0], q[1]);
            __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
            s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
            s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
            y[b].bsums[g] = static_cast<int16_t>(_mm_cvtsi128_si32(s));
            const __m256i words = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8);  // 16 int16 in order
            const __m128i bytes = _mm_packs_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(y[b].qs + 16 * g), bytes);
        }
        y[b].d = 1.0f / iscale;
    }
}

// 8 int32 lanes, lane l = the sum of products 4l..4l+3 of unsigned u and signed s (exact: |u| <= 128,
// |s| <= 127, so maddubs' int16 pair sums never saturate).
inline __m256i dot_lanes_us(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// The 32 signed products of w and a as 8 int32 lanes (the sign trick: |w| times a with w's sign).
inline __m256i dot_lanes(__m256i w, __m256i a) {
    return dot_lanes_us(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
}

// A Q4_0 block's 32 values as int8 in [-8, 7], in element order.
inline __m256i unpack_q4_0(const BlockQ4_0& b) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.qs));
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
    return _mm256_sub_epi8(_mm256_and_si256(both, _mm256_set1_epi8(0x0F)), _mm256_set1_epi8(8));
}

inline __m256i load_q8(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// Q4_K's 6-bit scale and min of sub-block j (llama.cpp's get_scale_min_k4).
inline void q4_k_scale_min(int j, const uint8_t* q, int& scale, int& min) {
    if (j < 4) {
        scale = q[j] & 63;
        min = q[j + 4] & 63;
    } else {
        scale = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        min = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

}  // namespace moetron
