// x @ w.T over a chunk of block-quantized weight rows (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K): the quantized twin
// of linear_tiles.h, used through weights.h's linear_chunk.
//
// Each x row is quantized on its own (Q8_0, or Q8_K for the k-quants; quant_blocks.h). Every output
// element is then one fixed sequence, whatever the layout, tile, chunk, row count, thread or ISA:
//   out = 0; for each block b in order: out = fma(scale_b, float(isum_b), out)
// where isum_b is the block's exact integer dot product (for the k-quants, its sub-block scales
// applied in integers) and scale_b = d_w * d_x in fp32; Q4_K's and Q5_K's min term is a second such
// chain, subtracted at the end. Integer sums are exact, so how SIMD lanes split them never shows.
// A matmul's x rows are quantized once per thread and reused by its chunks (quantize_activations).
//
// Two layouts of the same blocks: GGML's (rows one after another; any row count), and "r8" for every
// format (moetron/quant/interleave.py: each 8 rows' blocks interleaved, their scales together, their
// values in 4-byte groups), where one 32-byte load holds 4 values of each of 8 rows. There
// the 8 rows are the 8 SIMD lanes, each running the chain above, so a decode step streams the
// weights with a few instructions per 256 multiply-adds (the layout llama.cpp's CPU repack uses
// for the same reason).
//
// Legend: M rows of x, K input width, N output width (rows of w), nb blocks per row.
#pragma once
#include <stdint.h>

#include <stddef.h>

#include <type_traits>
#include <vector>

#include "quant_blocks.h"
#include "simd_avx2.h"

namespace moetron {

// Q8_0 / Q4_0 blocks of 8 rows interleaved (see the header).
struct BlockQ8_0x8 {
    uint16_t d[8];
    int8_t qs[256];  // group g < 8, row r, j < 4: value 4g + j of row r at 32g + 4r + j
};
struct BlockQ4_0x8 {
    uint16_t d[8];
    uint8_t qs[128];  // group g < 4, row r, j < 4: values 4g + j (low nibble), 16 + 4g + j (high)
};
struct BlockQ4_Kx8 {
    uint16_t d[8], dmin[8];
    uint8_t scales[96];  // 4-byte group c < 3, row r: the row's packed scales[4c .. 4c + 3] at 32c + 4r
    uint8_t qs[1024];    // 4-byte group k < 32, row r: the row's qs[4k .. 4k + 3] at 32k + 4r
};
struct BlockQ5_Kx8 {  // BlockQ4_Kx8 with the rows' qh (4-byte group k < 8, row r at 32k + 4r)
    uint16_t d[8], dmin[8];
    uint8_t scales[96];
    uint8_t qh[256];
    uint8_t qs[1024];
};
struct BlockQ6_Kx8 {
    uint16_t d[8];       // the rows' d (which end a GGML block)
    uint8_t ql[1024];    // 4-byte group k < 32, row r: the row's ql[4k .. 4k + 3] at 32k + 4r
    uint8_t qh[512];     // the same for qh (k < 16)
    int8_t scales[128];  // the same for the 16 scales (k < 4)
};
static_assert(sizeof(BlockQ8_0x8) == 8 * sizeof(BlockQ8_0) && sizeof(BlockQ4_0x8) == 8 * sizeof(BlockQ4_0) &&
              sizeof(BlockQ4_Kx8) == 8 * sizeof(BlockQ4_K) && sizeof(BlockQ5_Kx8) == 8 * sizeof(BlockQ5_K) &&
              sizeof(BlockQ6_Kx8) == 8 * sizeof(BlockQ6_K));

inline int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

// --- GGML layout: one row at a time ---------------------------------------------------------------

inline int32_t block_isum(const BlockQ8_0& w, const int8_t* x) { return hsum_epi32(dot_lanes(load_q8(w.qs), load_q8(x))); }
inline int32_t block_isum(const BlockQ4_0& w, const int8_t* x) { return hsum_epi32(dot_lanes(unpack_q4_0(w), load_q8(x))); }

template <typename B>
inline float row_dot(const B* w, const BlockQ8_0* x, int64_t nb) {
    float out = 0.0f;
    for (int64_t b = 0; b < nb; ++b)
        out = __builtin_fmaf(fp16_to_fp32(w[b].d) * fp16_to_fp32(x[b].d), static_cast<float>(block_isum(w[b], x[b].qs)), out);
    return out;
}

// Q4_K: per super-block, sum_j scale_j * dot_j and sum_j min_j * (sums of x over sub-block j).
// Q5_K: the same chains, each value's fifth bit (x16) or-ed in from qh before the products.
template <typename B>  // BlockQ4_K or BlockQ5_K
inline float k4_row_dot(const B* w, const BlockQ8_K* x, int64_t nb) {
    float out = 0.0f, out_min = 0.0f;
    const __m256i low = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(0x01);
    for (int64_t b = 0; b < nb; ++b) {
        const B& wb = w[b];
        const BlockQ8_K& xb = x[b];
        __m256i sum = _mm256_setzero_si256();
        int32_t sum_min = 0;
        for (int g = 0; g < 4; ++g) {  // 64 values: sub-blocks 2g (low nibbles) and 2g + 1 (high)
            const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb.qs + 32 * g));
            __m256i q_lo = _mm256_and_si256(packed, low), q_hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
            if constexpr (std::is_same_v<B, BlockQ5_K>) {
                // Bit s of each qh byte to bit 4 (16-bit shifts: the mask drops what crosses bytes).
                const __m256i high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb.qh));
                q_lo = _mm256_or_si256(q_lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(high, 2 * g), one), 4));
                q_hi = _mm256_or_si256(q_hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(high, 2 * g + 1), one), 4));
            }
            int scale_lo, min_lo, scale_hi, min_hi;
            q4_k_scale_min(2 * g, wb.scales, scale_lo, min_lo);
            q4_k_scale_min(2 * g + 1, wb.scales, scale_hi, min_hi);
            const __m256i p_lo = dot_lanes_us(q_lo, load_q8(xb.qs + 64 * g));
            const __m256i p_hi = dot_lanes_us(q_hi, load_q8(xb.qs + 64 * g + 32));
            sum = _mm256_add_epi32(sum, _mm256_mullo_epi32(p_lo, _mm256_set1_epi32(scale_lo)));
            sum = _mm256_add_epi32(sum, _mm256_mullo_epi32(p_hi, _mm256_set1_epi32(scale_hi)));
            sum_min += min_lo * (xb.bsums[4 * g] + xb.bsums[4 * g + 1]) + min_hi * (xb.bsums[4 * g + 2] + xb.bsums[4 * g + 3]);
        }
        out = __builtin_fmaf(xb.d * fp16_to_fp32(wb.d), static_cast<float>(hsum_epi32(sum)), out);
        out_min = __builtin_fmaf(xb.d * fp16_to_fp32(wb.dmin), static_cast<float>(sum_min), out_min);
    }
    return out - out_min;
}
inline float row_dot(const BlockQ4_K* w, const BlockQ8_K* x, int64_t nb) { return k4_row_dot(w, x, nb); }
inline float row_dot(const BlockQ5_K* w, const BlockQ8_K* x, int64_t nb) { return k4_row_dot(w, x, nb); }

// Q6_K: a half of 128 values holds four groups of 32 (value 32k + l: low nibble of ql[l + 32 (k % 2)]
// if k < 2 else its high nibble, bits 2k..2k+1 of qh[l]), each two sub-blocks of 16 with their own
// int8 scale. The 6-bit values enter the dot product unsigned; their -32 offset is exact integers too.
inline float row_dot(const BlockQ6_K* w, const BlockQ8_K* x, int64_t nb) {
    float out = 0.0f;
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
        int32_t offset = 0;
        for (int j = 0; j < 16; ++j) offset += wb.scales[j] * xb.bsums[j];
        const int32_t isum = hsum_epi32(sum) - 32 * offset;
        out = __builtin_fmaf(xb.d * fp16_to_fp32(wb.d), static_cast<float>(isum), out);
    }
    return out;
}

// --- r8 layout: 8 rows as 8 lanes ---------------------------------------------------------------

// One 4-byte group of an x block, as all 8 lanes.
inline __m256i broadcast4(const int8_t* x) {
    int32_t v;
    __builtin_memcpy(&v, x, 4);
    return _mm256_set1_epi32(v);
}

// Vectors of 8 (Lanes8) or, in the AVX-512 build, 16 (Lanes16) int32/fp32 lanes: lane 8g + r is row r
// of row group g. The kernels below are written once over these; every lane runs the same chain,
// so both widths give the same bits (a wider vector only serves two groups of 8 rows at once).
struct Lanes8 {
    static constexpr int GROUPS = 1;
    using I = __m256i;
    using F = __m256;
    // 32 bytes at byte `at` of each group's block b, as one vector.
    template <typename G>
    static I load(const G* const* w, int64_t b, size_t at) {
        return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const uint8_t*>(w[0] + b) + at));
    }
    // 8 fp16 at byte `at` of each group's block b, as floats.
    template <typename G>
    static F halves(const G* const* w, int64_t b, size_t at) {
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(reinterpret_cast<const uint8_t*>(w[0] + b) + at)));
    }
    static I zero() { return _mm256_setzero_si256(); }
    static I bytes(int v) { return _mm256_set1_epi8(static_cast<char>(v)); }
    static I ints(int v) { return _mm256_set1_epi32(v); }
    static I broadcast(const int8_t* x) { return moetron::broadcast4(x); }
    static I band(I a, I b) { return _mm256_and_si256(a, b); }
    static I bor(I a, I b) { return _mm256_or_si256(a, b); }
    static I shr16(I a, int n) { return _mm256_srli_epi16(a, n); }
    static I shl16(I a, int n) { return _mm256_slli_epi16(a, n); }
    static I shr32(I a, int n) { return _mm256_srl_epi32(a, _mm_cvtsi32_si128(n)); }
    static I shl32(I a, int n) { return _mm256_sll_epi32(a, _mm_cvtsi32_si128(n)); }
    static I add(I a, I b) { return _mm256_add_epi32(a, b); }
    static I mul(I a, I b) { return _mm256_mullo_epi32(a, b); }
    // Products of unsigned 4-bit values u and int8 s, summed in pairs (`pairs`, added with
    // `add_pairs`) and then to 8 int32 lanes (`widen`). Without VNNI the pairs are maddubs's int16
    // sums, added as int16: up to 8 of them (|sum| <= 8 * 2 * 15 * 128 = 30720) are exact, and one
    // madd per 8 replaces 8. With VNNI, dpbusd's int32 lanes directly. The same integers either way.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    static I pairs(I u, I s) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s); }
    static I pairs_acc(I acc, I u, I s) { return _mm256_dpbusd_epi32(acc, u, s); }
    static I add_pairs(I a, I b) { return _mm256_add_epi32(a, b); }
    static I widen(I a) { return a; }
#else
    static I pairs(I u, I s) { return _mm256_maddubs_epi16(u, s); }
    static I pairs_acc(I acc, I u, I s) { return _mm256_add_epi16(acc, _mm256_maddubs_epi16(u, s)); }
    static I add_pairs(I a, I b) { return _mm256_add_epi16(a, b); }
    static I widen(I a) { return _mm256_madd_epi16(a, _mm256_set1_epi16(1)); }
#endif
    // Q8_0's signed weights w times x, added to int32 lanes: `q8_weights` prepares w once for every
    // x row, `q8_acc` adds one row's products, `q8_total` finishes a block given the x block's sum.
    // Without VNNI, the sign trick (|w| times x with w's sign: maddubs's pairs fit int16); with it,
    // dpbusd on w + 128 (unsigned) and 128 * sum(x) taken off at the end. The same integers.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    static I q8_weights(I w) { return _mm256_xor_si256(w, _mm256_set1_epi8(static_cast<char>(0x80))); }
    static I q8_acc(I acc, I prepared, I, I x) { return _mm256_dpbusd_epi32(acc, prepared, x); }
    static I q8_total(I acc, int32_t x_sum) { return _mm256_add_epi32(acc, _mm256_set1_epi32(-128 * x_sum)); }
#else
    static I q8_weights(I w) { return _mm256_sign_epi8(w, w); }
    static I q8_acc(I acc, I prepared, I w, I x) {
        return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(prepared, _mm256_sign_epi8(x, w)),
                                                       _mm256_set1_epi16(1)));
    }
    static I q8_total(I acc, int32_t) { return acc; }
#endif
    // Each lane's 4 bytes replaced by its bytes (b0, b1, b2, b3); ZERO gives 0 (pshufb, whose
    // indices are relative to the 16-byte lane: each 4-byte lane adds its own offset).
    static I pick(I a, uint32_t bytes) {
        const I lane_offsets = _mm256_setr_epi32(0, 0x04040404, 0x08080808, 0x0C0C0C0C, 0, 0x04040404, 0x08080808, 0x0C0C0C0C);
        return _mm256_shuffle_epi8(a, _mm256_add_epi8(_mm256_set1_epi32(static_cast<int>(bytes)), lane_offsets));
    }
    static I madd16(I a, I b) { return _mm256_madd_epi16(a, b); }
    // Signed bytes k0, k1 of each lane as two int16 (pick into the high bytes, shift back down).
    static I signed_pair(I a, int k0, int k1) {
        return _mm256_srai_epi16(pick(a, 0x00800080u | k1 << 24 | k0 << 8), 8);
    }
    // A sub-block's pair sums (V::pairs) times its scale, as int32 lanes: `scale_at` picks byte k of
    // each lane as the scale in the form `scaled` takes. Without VNNI the pair sums are int16 and the
    // scale is duplicated into both int16 halves, so one madd widens and scales at once; with VNNI
    // they are int32 already and the scale a plain int32.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    static constexpr int SUMS_Q6 = 4;  // pair sums of 6-bit values added before `scaled`: int32, any
    static constexpr uint32_t scale_bytes(int k) { return 0x80808000u | k; }
    static I scaled(I sums, I scale) { return _mm256_mullo_epi32(sums, scale); }
    static I signed_scale(I a, int k) { return _mm256_srai_epi32(pick(a, 0x00808080u | k << 24), 24); }
#else
    static constexpr int SUMS_Q6 = 2;  // int16: two of them (<= 2 * 2 * 63 * 128) are exact
    static constexpr uint32_t scale_bytes(int k) { return 0x80008000u | k << 16 | k; }
    static I scaled(I sums, I scale) { return _mm256_madd_epi16(sums, scale); }
    static I signed_scale(I a, int k) { return signed_pair(a, k, k); }
#endif
    static F floats(I a) { return _mm256_cvtepi32_ps(a); }
    static F splat(float v) { return _mm256_set1_ps(v); }
    static F fmul(F a, F b) { return _mm256_mul_ps(a, b); }
    static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
    static F fsub(F a, F b) { return _mm256_sub_ps(a, b); }
    static F fzero() { return _mm256_setzero_ps(); }
    static void store(float* out, F v) { _mm256_storeu_ps(out, v); }
};

// Two groups of 8 rows as two AVX2 registers (the AVX2 build's 16 rows per pass): each x value is
// broadcast and each x scale converted once for both groups, which a 4-bit decode, compute-bound
// on AVX2 (maddubs + int16 adds where AVX-512 has dpbusd), spends much of its time on. Every op is
// Lanes8's on each half: the same chain per lane, the same bits.
struct Lanes8x2 {
    static constexpr int GROUPS = 2;
    struct I {
        __m256i a, b;
    };
    struct F {
        __m256 a, b;
    };
    template <typename G>
    static I load(const G* const* w, int64_t b, size_t at) {
        const G* const lo[1] = {w[0]};
        const G* const hi[1] = {w[1]};
        return {Lanes8::load(lo, b, at), Lanes8::load(hi, b, at)};
    }
    template <typename G>
    static F halves(const G* const* w, int64_t b, size_t at) {
        const G* const lo[1] = {w[0]};
        const G* const hi[1] = {w[1]};
        return {Lanes8::halves(lo, b, at), Lanes8::halves(hi, b, at)};
    }
    static I both(__m256i v) { return {v, v}; }
    static I zero() { return both(Lanes8::zero()); }
    static I bytes(int v) { return both(Lanes8::bytes(v)); }
    static I ints(int v) { return both(Lanes8::ints(v)); }
    static I broadcast(const int8_t* x) { return both(Lanes8::broadcast(x)); }
    static I band(I x, I y) { return {Lanes8::band(x.a, y.a), Lanes8::band(x.b, y.b)}; }
    static I bor(I x, I y) { return {Lanes8::bor(x.a, y.a), Lanes8::bor(x.b, y.b)}; }
    static I shr16(I x, int n) { return {Lanes8::shr16(x.a, n), Lanes8::shr16(x.b, n)}; }
    static I shl16(I x, int n) { return {Lanes8::shl16(x.a, n), Lanes8::shl16(x.b, n)}; }
    static I shr32(I x, int n) { return {Lanes8::shr32(x.a, n), Lanes8::shr32(x.b, n)}; }
    static I shl32(I x, int n) { return {Lanes8::shl32(x.a, n), Lanes8::shl32(x.b, n)}; }
    static I add(I x, I y) { return {Lanes8::add(x.a, y.a), Lanes8::add(x.b, y.b)}; }
    static I mul(I x, I y) { return {Lanes8::mul(x.a, y.a), Lanes8::mul(x.b, y.b)}; }
    static I pairs(I u, I s) { return {Lanes8::pairs(u.a, s.a), Lanes8::pairs(u.b, s.b)}; }
    static I pairs_acc(I acc, I u, I s) { return {Lanes8::pairs_acc(acc.a, u.a, s.a), Lanes8::pairs_acc(acc.b, u.b, s.b)}; }
    static I add_pairs(I x, I y) { return {Lanes8::add_pairs(x.a, y.a), Lanes8::add_pairs(x.b, y.b)}; }
    static I widen(I x) { return {Lanes8::widen(x.a), Lanes8::widen(x.b)}; }
    static I q8_weights(I w) { return {Lanes8::q8_weights(w.a), Lanes8::q8_weights(w.b)}; }
    static I q8_acc(I acc, I prepared, I w, I x) {
        return {Lanes8::q8_acc(acc.a, prepared.a, w.a, x.a), Lanes8::q8_acc(acc.b, prepared.b, w.b, x.b)};
    }
    static I q8_total(I acc, int32_t x_sum) { return {Lanes8::q8_total(acc.a, x_sum), Lanes8::q8_total(acc.b, x_sum)}; }
    static I pick(I x, uint32_t bytes) { return {Lanes8::pick(x.a, bytes), Lanes8::pick(x.b, bytes)}; }
    static I madd16(I x, I y) { return {Lanes8::madd16(x.a, y.a), Lanes8::madd16(x.b, y.b)}; }
    static constexpr int SUMS_Q6 = Lanes8::SUMS_Q6;
    static constexpr uint32_t scale_bytes(int k) { return Lanes8::scale_bytes(k); }
    static I scaled(I x, I y) { return {Lanes8::scaled(x.a, y.a), Lanes8::scaled(x.b, y.b)}; }
    static I signed_pair(I x, int k0, int k1) { return {Lanes8::signed_pair(x.a, k0, k1), Lanes8::signed_pair(x.b, k0, k1)}; }
    static I signed_scale(I x, int k) { return {Lanes8::signed_scale(x.a, k), Lanes8::signed_scale(x.b, k)}; }
    static F floats(I x) { return {Lanes8::floats(x.a), Lanes8::floats(x.b)}; }
    static F splat(float v) { return {Lanes8::splat(v), Lanes8::splat(v)}; }
    static F fmul(F x, F y) { return {Lanes8::fmul(x.a, y.a), Lanes8::fmul(x.b, y.b)}; }
    static F fma(F x, F y, F z) { return {Lanes8::fma(x.a, y.a, z.a), Lanes8::fma(x.b, y.b, z.b)}; }
    static F fsub(F x, F y) { return {Lanes8::fsub(x.a, y.a), Lanes8::fsub(x.b, y.b)}; }
    static F fzero() { return {Lanes8::fzero(), Lanes8::fzero()}; }
    static void store(float* out, F v) {
        Lanes8::store(out, v.a);
        Lanes8::store(out + 8, v.b);
    }
};

#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
struct Lanes16 {
    static constexpr int GROUPS = 2;
    using I = __m512i;
    using F = __m512;
    template <typename G>
    static I load(const G* const* w, int64_t b, size_t at) {
        const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const uint8_t*>(w[0] + b) + at));
        const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const uint8_t*>(w[1] + b) + at));
        return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    }
    template <typename G>
    static F halves(const G* const* w, int64_t b, size_t at) {
        const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(reinterpret_cast<const uint8_t*>(w[0] + b) + at));
        const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(reinterpret_cast<const uint8_t*>(w[1] + b) + at));
        return _mm512_cvtph_ps(_mm256_set_m128i(hi, lo));
    }
    static I zero() { return _mm512_setzero_si512(); }
    static I bytes(int v) { return _mm512_set1_epi8(static_cast<char>(v)); }
    static I ints(int v) { return _mm512_set1_epi32(v); }
    static I broadcast(const int8_t* x) {
        int32_t v;
        __builtin_memcpy(&v, x, 4);
        return _mm512_set1_epi32(v);
    }
    static I band(I a, I b) { return _mm512_and_si512(a, b); }
    static I bor(I a, I b) { return _mm512_or_si512(a, b); }
    static I shr16(I a, int n) { return _mm512_srli_epi16(a, n); }
    static I shl16(I a, int n) { return _mm512_slli_epi16(a, n); }
    static I shr32(I a, int n) { return _mm512_srl_epi32(a, _mm_cvtsi32_si128(n)); }
    static I shl32(I a, int n) { return _mm512_sll_epi32(a, _mm_cvtsi32_si128(n)); }
    static I add(I a, I b) { return _mm512_add_epi32(a, b); }
    static I mul(I a, I b) { return _mm512_mullo_epi32(a, b); }
    static I pairs(I u, I s) { return _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, s); }
    static I pairs_acc(I acc, I u, I s) { return _mm512_dpbusd_epi32(acc, u, s); }
    static I add_pairs(I a, I b) { return _mm512_add_epi32(a, b); }
    static I widen(I a) { return a; }
    static I q8_weights(I w) { return _mm512_xor_si512(w, _mm512_set1_epi8(static_cast<char>(0x80))); }
    static I q8_acc(I acc, I prepared, I, I x) { return _mm512_dpbusd_epi32(acc, prepared, x); }
    static I q8_total(I acc, int32_t x_sum) { return _mm512_add_epi32(acc, _mm512_set1_epi32(-128 * x_sum)); }
    static I pick(I a, uint32_t bytes) {
        const I lane_offsets = _mm512_set4_epi32(0x0C0C0C0C, 0x08080808, 0x04040404, 0);
        return _mm512_shuffle_epi8(a, _mm512_add_epi8(_mm512_set1_epi32(static_cast<int>(bytes)), lane_offsets));
    }
    static I madd16(I a, I b) { return _mm512_madd_epi16(a, b); }
    static constexpr int SUMS_Q6 = 4;
    static constexpr uint32_t scale_bytes(int k) { return 0x80808000u | k; }
    static I scaled(I sums, I scale) { return _mm512_mullo_epi32(sums, scale); }
    static I signed_pair(I a, int k0, int k1) { return _mm512_srai_epi16(pick(a, 0x00800080u | k1 << 24 | k0 << 8), 8); }
    static I signed_scale(I a, int k) { return _mm512_srai_epi32(pick(a, 0x00808080u | k << 24), 24); }
    static F floats(I a) { return _mm512_cvtepi32_ps(a); }
    static F splat(float v) { return _mm512_set1_ps(v); }
    static F fmul(F a, F b) { return _mm512_mul_ps(a, b); }
    static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
    static F fsub(F a, F b) { return _mm512_sub_ps(a, b); }
    static F fzero() { return _mm512_setzero_ps(); }
    static void store(float* out, F v) { _mm512_storeu_ps(out, v); }
};
#endif

// Q4_K, rows as lanes, one x row: per super-block the lanes of sum_j scale_j * dot_j and of
// sum_j min_j * (x sums over sub-block j), exact integers as in row_dot, then the same two chains.
// w: V::GROUPS row groups; x_pair_sums: the x block's 8 sub-block sums (ActivationBlock);
// out: the 8 * GROUPS results.
// Bit s of each byte moved to bit 4 (the 16-bit shift's strays are masked off by the caller).
template <typename V>
inline typename V::I bit_to_4(typename V::I v, int s) {
    return s <= 4 ? V::shl16(v, 4 - s) : V::shr16(v, s - 4);
}

template <typename V, int MR, typename G>  // G: BlockQ4_Kx8, or BlockQ5_Kx8 (the same with a fifth bit per value)
inline void q4_k_groups_tile(const G* const* w, const BlockQ8_K* const* x, const int16_t* const* x_pair_sums,
                             int64_t nb, float* const* out) {
    using I = typename V::I;
    using F = typename V::F;
    constexpr bool fifth_bit = std::is_same_v<G, BlockQ5_Kx8>;
    const I low = V::bytes(0x0F), six_bits = V::bytes(0x3F), top_two = V::bytes(0x30), bit4 = V::bytes(0x10);
    F acc[MR], acc_min[MR];
    for (int i = 0; i < MR; ++i) acc[i] = acc_min[i] = V::fzero();
    for (int64_t b = 0; b < nb; ++b) {
        // The 6-bit scales and mins (q4_k_scale_min's bit layout), unpacked as bytes for all lanes
        // at once: bytes 0-3 of a lane hold scales 0-3 and the top bits of scales 4-7, bytes 4-7 the
        // same for the mins, bytes 8-11 the low 4 bits of scales 4-7 (low nibbles) and of mins 4-7
        // (high nibbles). Byte k of each lane of scales_lo is scale k, of scales_hi scale 4 + k.
        const I a = V::load(w, b, offsetof(G, scales));
        const I m = V::load(w, b, offsetof(G, scales) + 32);
        const I c = V::load(w, b, offsetof(G, scales) + 64);
        const I scales_lo = V::band(a, six_bits), mins_lo = V::band(m, six_bits);
        const I scales_hi = V::bor(V::band(c, low), V::band(V::shr16(a, 2), top_two));
        const I mins_hi = V::bor(V::band(V::shr16(c, 4), low), V::band(V::shr16(m, 2), top_two));
        I isum[MR], msum[MR];
        for (int i = 0; i < MR; ++i) isum[i] = msum[i] = V::zero();
        for (int g = 0; g < 4; ++g) {  // 64 values: sub-blocks 2g (low nibbles) and 2g + 1 (high)
            // Each sub-block's 32 products as 8 pair sums (exact as int16 too: V::pairs); per x row
            // four accumulator chains (low/high nibbles, even/odd t) so the multiply-adds' latency
            // overlaps. Each weight vector is unpacked once for the MR rows.
            I dot_lo[MR], dot_hi[MR], dot_lo1[MR], dot_hi1[MR];
            for (int i = 0; i < MR; ++i) dot_lo[i] = dot_hi[i] = dot_lo1[i] = dot_hi1[i] = V::zero();
            for (int t = 0; t < 8; t += 2) {
                const I p0 = V::load(w, b, offsetof(G, qs) + 32 * (8 * g + t));
                const I p1 = V::load(w, b, offsetof(G, qs) + 32 * (8 * g + t + 1));
                I lo0 = V::band(p0, low), lo1 = V::band(p1, low);
                I hi0 = V::band(V::shr16(p0, 4), low), hi1 = V::band(V::shr16(p1, 4), low);
                if constexpr (fifth_bit) {  // bits 2g and 2g + 1 of qh's group t to bit 4 (x16)
                    const I h0 = V::load(w, b, offsetof(G, qh) + 32 * t);
                    const I h1 = V::load(w, b, offsetof(G, qh) + 32 * (t + 1));
                    lo0 = V::bor(lo0, V::band(bit_to_4<V>(h0, 2 * g), bit4));
                    lo1 = V::bor(lo1, V::band(bit_to_4<V>(h1, 2 * g), bit4));
                    hi0 = V::bor(hi0, V::band(bit_to_4<V>(h0, 2 * g + 1), bit4));
                    hi1 = V::bor(hi1, V::band(bit_to_4<V>(h1, 2 * g + 1), bit4));
                }
                for (int i = 0; i < MR; ++i) {
                    const int8_t* xq = x[i][b].qs + 64 * g + 4 * t;
                    dot_lo[i] = V::pairs_acc(dot_lo[i], lo0, V::broadcast(xq));
                    dot_hi[i] = V::pairs_acc(dot_hi[i], hi0, V::broadcast(xq + 32));
                    dot_lo1[i] = V::pairs_acc(dot_lo1[i], lo1, V::broadcast(xq + 4));
                    dot_hi1[i] = V::pairs_acc(dot_hi1[i], hi1, V::broadcast(xq + 36));
                }
            }
            const I& scales = g < 2 ? scales_lo : scales_hi;
            const I& mins = g < 2 ? mins_lo : mins_hi;
            const int k = 2 * g % 4;  // sub-block 2g's byte
            const I scale_lo = V::pick(scales, V::scale_bytes(k)), scale_hi = V::pick(scales, V::scale_bytes(k + 1));
            // min_2g * sum_2g + min_2g+1 * sum_2g+1 in one madd: the mins as int16 pairs (bytes k, k + 1).
            const I min_pair = V::pick(mins, 0x80008000u | (k + 1) << 16 | k);
            for (int i = 0; i < MR; ++i) {
                if (fifth_bit && V::SUMS_Q6 == 2) {  // int16 pair sums of 5-bit values: 4 at most (<= 4 * 2 * 31 * 128)
                    isum[i] = V::add(isum[i], V::add(V::scaled(dot_lo[i], scale_lo), V::scaled(dot_lo1[i], scale_lo)));
                    isum[i] = V::add(isum[i], V::add(V::scaled(dot_hi[i], scale_hi), V::scaled(dot_hi1[i], scale_hi)));
                } else {
                    isum[i] = V::add(isum[i], V::scaled(V::add_pairs(dot_lo[i], dot_lo1[i]), scale_lo));
                    isum[i] = V::add(isum[i], V::scaled(V::add_pairs(dot_hi[i], dot_hi1[i]), scale_hi));
                }
                const int8_t* sums = reinterpret_cast<const int8_t*>(x_pair_sums[i] + 8 * b + 2 * g);
                msum[i] = V::add(msum[i], V::madd16(min_pair, V::broadcast(sums)));
            }
        }
        const F dw = V::halves(w, b, offsetof(G, d)), dmin = V::halves(w, b, offsetof(G, dmin));
        for (int i = 0; i < MR; ++i) {
            const F dx = V::splat(x[i][b].d);
            acc[i] = V::fma(V::fmul(dx, dw), V::floats(isum[i]), acc[i]);
            acc_min[i] = V::fma(V::fmul(dx, dmin), V::floats(msum[i]), acc_min[i]);
        }
    }
    for (int i = 0; i < MR; ++i) V::store(out[i], V::fsub(acc[i], acc_min[i]));
}

// Q6_K, rows as lanes, MR x rows: per block the lanes of sum_s scale_s * dot_s (16 sub-blocks of 16,
// signed scales) and of sum_s scale_s * (x sums over sub-block s), exact integers as in row_dot,
// then its one chain: out = fma(d_x * d_w, float(isum - 32 * msum), out). The 6-bit values enter
// unsigned (q + 32); V::SUMS_Q6 groups' pair sums are added before each scaling (int16 without VNNI).
template <typename V, int MR>
inline void q6_k_groups_tile(const BlockQ6_Kx8* const* w, const BlockQ8_K* const* x, int64_t nb, float* const* out) {
    using I = typename V::I;
    using F = typename V::F;
    const I low = V::bytes(0x0F), top_two = V::bytes(0x30);
    F acc[MR];
    for (int i = 0; i < MR; ++i) acc[i] = V::fzero();
    for (int64_t b = 0; b < nb; ++b) {
        I scales[4];  // lane r, byte j of scales[c]: the row's scale 4c + j
        for (int c = 0; c < 4; ++c) scales[c] = V::load(w, b, offsetof(BlockQ6_Kx8, scales) + 32 * c);
        I isum[MR], msum[MR];
        for (int i = 0; i < MR; ++i) isum[i] = msum[i] = V::zero();
        for (int s = 0; s < 16; s += 2) {
            const I scale_pair = V::signed_pair(scales[s / 4], s % 4, s % 4 + 1);
            for (int i = 0; i < MR; ++i)
                msum[i] = V::add(msum[i], V::madd16(scale_pair, V::broadcast(reinterpret_cast<const int8_t*>(x[i][b].bsums + s))));
        }
        for (int h = 0; h < 2; ++h) {  // 128 values: 4 runs of 32 (k), each two sub-blocks of 16
            for (int half = 0; half < 2; ++half) {  // values 16 half .. 16 half + 15 of each run
                I scale[4], dots[MR][4];
                for (int k = 0; k < 4; ++k) {
                    const int sub = 8 * h + 2 * k + half;  // the 16-value sub-block
                    scale[k] = V::signed_scale(scales[sub / 4], sub % 4);
                }
                for (int u = 0; u < 4; ++u) {
                    const int g = 4 * half + u;  // the 4-byte group: values 4g .. 4g + 3 of each run
                    const I a = V::load(w, b, offsetof(BlockQ6_Kx8, ql) + 32 * (16 * h + g));
                    const I c = V::load(w, b, offsetof(BlockQ6_Kx8, ql) + 32 * (16 * h + 8 + g));
                    const I hi = V::load(w, b, offsetof(BlockQ6_Kx8, qh) + 32 * (8 * h + g));
                    // Run k's two high bits are bits 2k, 2k + 1 of hi, moved to bits 4, 5 (the
                    // 16-bit shifts' strays fall outside top_two).
                    const I values[4] = {
                        V::bor(V::band(a, low), V::band(V::shl16(hi, 4), top_two)),
                        V::bor(V::band(c, low), V::band(V::shl16(hi, 2), top_two)),
                        V::bor(V::band(V::shr16(a, 4), low), V::band(hi, top_two)),
                        V::bor(V::band(V::shr16(c, 4), low), V::band(V::shr16(hi, 2), top_two)),
                    };
                    for (int i = 0; i < MR; ++i)
                        for (int k = 0; k < 4; ++k) {
                            const I p = V::pairs(values[k], V::broadcast(x[i][b].qs + 128 * h + 32 * k + 4 * g));
                            dots[i][k] = u % V::SUMS_Q6 == 0 ? p : V::add_pairs(dots[i][k], p);
                            if (u % V::SUMS_Q6 == V::SUMS_Q6 - 1) isum[i] = V::add(isum[i], V::scaled(dots[i][k], scale[k]));
                        }
                }
            }
        }
        const F dw = V::halves(w, b, offsetof(BlockQ6_Kx8, d));
        for (int i = 0; i < MR; ++i) {
            const F scale = V::fmul(V::splat(x[i][b].d), dw);
            acc[i] = V::fma(scale, V::floats(V::add(isum[i], V::mul(msum[i], V::ints(-32)))), acc[i]);
        }
    }
    for (int i = 0; i < MR; ++i) V::store(out[i], acc[i]);
}

// The exact integer dot products of block b of the 8 * V::GROUPS rows (lanes) with MR x rows.
// Q8_0: V::q8_acc over the block's 8 four-byte groups.
template <typename V, int MR>
inline void block_isums(const BlockQ8_0x8* const* w, int64_t b, const BlockQ8_0* const* x,
                        const int32_t* const* x_sums, typename V::I* isum) {
    using I = typename V::I;
    for (int i = 0; i < MR; ++i) isum[i] = V::zero();
    for (int g = 0; g < 8; ++g) {
        const I values = V::load(w, b, offsetof(BlockQ8_0x8, qs) + 32 * g);
        const I prepared = V::q8_weights(values);
        for (int i = 0; i < MR; ++i) isum[i] = V::q8_acc(isum[i], prepared, values, V::broadcast(x[i][b].qs + 4 * g));
    }
    for (int i = 0; i < MR; ++i) isum[i] = V::q8_total(isum[i], x_sums[i][b]);
}

// Q4_0: unsigned nibbles (0..15) times x, minus 8 * (the x block's sum, x_sums: exact, computed once
// per x row): the same integers as the signed values (q - 8) would give, without the sign trick.
template <typename V, int MR>
inline void block_isums(const BlockQ4_0x8* const* w, int64_t b, const BlockQ8_0* const* x,
                        const int32_t* const* x_sums, typename V::I* isum) {
    using I = typename V::I;
    const I low = V::bytes(0x0F);
    I sums[MR];  // 8 pair sums per x row: exact as int16 too (V::pairs)
    for (int g = 0; g < 4; ++g) {
        const I packed = V::load(w, b, offsetof(BlockQ4_0x8, qs) + 32 * g);
        const I lo = V::band(packed, low), hi = V::band(V::shr16(packed, 4), low);
        for (int i = 0; i < MR; ++i) {
            const I both = V::add_pairs(V::pairs(lo, V::broadcast(x[i][b].qs + 4 * g)),
                                        V::pairs(hi, V::broadcast(x[i][b].qs + 16 + 4 * g)));
            sums[i] = g == 0 ? both : V::add_pairs(sums[i], both);
        }
    }
    for (int i = 0; i < MR; ++i) isum[i] = V::add(V::ints(-8 * x_sums[i][b]), V::widen(sums[i]));
}

// Q8_0 / Q4_0 (G), rows as lanes (V::GROUPS groups of 8), MR x rows: each block's exact integer dot
// product, then out = fma(d_w * d_x, float(isum), out), lane for lane.
template <typename V, int MR, typename G>
inline void q_0_groups_tile(const G* const* w, const BlockQ8_0* const* x, const int32_t* const* x_sums, int64_t nb,
                            float* const* out) {
    using I = typename V::I;
    using F = typename V::F;
    F acc[MR];
    for (int i = 0; i < MR; ++i) acc[i] = V::fzero();
    for (int64_t b = 0; b < nb; ++b) {
        I isum[MR];
        block_isums<V, MR>(w, b, x, x_sums, isum);
        const F dw = V::halves(w, b, offsetof(G, d));
        for (int i = 0; i < MR; ++i)
            acc[i] = V::fma(V::fmul(dw, V::splat(fp16_to_fp32(x[i][b].d))), V::floats(isum[i]), acc[i]);
    }
    for (int i = 0; i < MR; ++i) V::store(out[i], acc[i]);
}

// --- quantizing x, and the chunk ------------------------------------------------------------------

// How x rows are quantized for weights of block type B (ActivationBlock<B>), and the sums of x
// the r8 kernels take with them: Q8_0 blocks and each block's sum (Q4_0: the -8 offset); for the k-quants Q8_K blocks and
// the 8 sums of each block's 32-value sub-blocks (Q4_K's mins), |sum| <= 32 * 128 as int16.
struct Q8_0Activations {
    using type = BlockQ8_0;
    using sum = int32_t;
    static constexpr int64_t size = 32, sums_per_block = 1;
    static void quantize(const float* x, type* y, int64_t K) { quantize_row_q8_0(x, y, K); }
    static void sums(const type& y, sum* out) {
        const __m256i ones = _mm256_set1_epi8(1);
        out[0] = hsum_epi32(dot_lanes_us(ones, load_q8(y.qs)));
    }
};
struct Q8_KActivations {
    using type = BlockQ8_K;
    using sum = int16_t;
    static constexpr int64_t size = 256, sums_per_block = 8;
    static void quantize(const float* x, type* y, int64_t K) { quantize_row_q8_k(x, y, K); }
    static void sums(const type& y, sum* out) {
        for (int j = 0; j < 8; ++j) out[j] = static_cast<int16_t>(y.bsums[2 * j] + y.bsums[2 * j + 1]);
    }
};
template <typename B>
struct ActivationsFor {
    using type = Q8_0Activations;  // Q8_0 / Q4_0, either layout
};
template <>
struct ActivationsFor<BlockQ4_K> {
    using type = Q8_KActivations;
};
template <>
struct ActivationsFor<BlockQ5_K> : ActivationsFor<BlockQ4_K> {};
template <>
struct ActivationsFor<BlockQ6_K> : ActivationsFor<BlockQ4_K> {};
template <>
struct ActivationsFor<BlockQ4_Kx8> : ActivationsFor<BlockQ4_K> {};
template <>
struct ActivationsFor<BlockQ5_Kx8> : ActivationsFor<BlockQ4_K> {};
template <>
struct ActivationsFor<BlockQ6_Kx8> : ActivationsFor<BlockQ4_K> {};
template <typename B>
using ActivationBlock = typename ActivationsFor<B>::type;

template <typename A>
struct QuantizedRows {
    const typename A::type* blocks;  // nb per row
    const typename A::sum* sums;     // A::sums_per_block per block
};

// x rows [0, M) quantized, with their sums, in buffers kept per thread (grown only). A matmul's
// chunks all take the same x (and an expert's w1 and w3 too), so the rows last quantized on this
// thread are kept with a copy of their floats and reused when x is the same floats again, compared
// bit for bit: the same floats quantize to the same blocks, so reuse cannot change a result.
template <typename A>
QuantizedRows<A> quantize_activations(const float* x, int64_t ldx, int64_t M, int64_t K) {
    struct Cache {
        std::vector<typename A::type> blocks;
        std::vector<typename A::sum> sums;
        std::vector<float> source;
        int64_t M = -1, K = -1;
    };
    static thread_local Cache cache;
    const int64_t nb = K / A::size;
    bool same = cache.M == M && cache.K == K;
    for (int64_t m = 0; same && m < M; ++m)
        same = __builtin_memcmp(x + m * ldx, cache.source.data() + m * K, K * sizeof(float)) == 0;
    if (!same) {
        if (cache.blocks.size() < static_cast<size_t>(M * nb)) cache.blocks.resize(M * nb);
        if (cache.sums.size() < static_cast<size_t>(M * nb * A::sums_per_block)) cache.sums.resize(M * nb * A::sums_per_block);
        if (cache.source.size() < static_cast<size_t>(M * K)) cache.source.resize(M * K);
        for (int64_t m = 0; m < M; ++m) {
            __builtin_memcpy(cache.source.data() + m * K, x + m * ldx, K * sizeof(float));
            A::quantize(x + m * ldx, cache.blocks.data() + m * nb, K);
        }
        for (int64_t k = 0; k < M * nb; ++k) A::sums(cache.blocks[k], cache.sums.data() + k * A::sums_per_block);
        cache.M = M;
        cache.K = K;
    }
    return {cache.blocks.data(), cache.sums.data()};
}
template <typename B>
QuantizedRows<ActivationBlock<B>> quantize_rows(const float* x, int64_t ldx, int64_t M, int64_t K) {
    return quantize_activations<ActivationBlock<B>>(x, ldx, M, K);
}

// out[0:M, n0:n1] = x[0:M] @ w[n0:n1].T for GGML-layout rows of K / block elements each (w points
// at row 0).
template <typename B>
inline void quant_linear_chunk(const float* x, int64_t ldx, const B* w, float* out, int64_t ldo, int64_t M,
                               int64_t K, int64_t n0, int64_t n1) {
    const auto* xq = quantize_rows<B>(x, ldx, M, K).blocks;
    const int64_t nb = K / ActivationBlock<B>::size;
    for (int64_t n = n0; n < n1; ++n)
        for (int64_t m = 0; m < M; ++m) out[m * ldo + n] = row_dot(w + n * nb, xq + m * nb, nb);
}

// x rows (X: their Q8_0 or Q8_K blocks) in tiles of MR (then one at a time) against the row groups
// of one vector width.
template <int MR, typename X, typename Tile>
inline void row_tiles(const X* xq, int64_t M, int64_t nb, int lanes, float* out, int64_t ldo, int64_t n, Tile tile) {
    float tmp[MR][16];
    for (int64_t m = 0; m < M; m += MR) {
        const int64_t rows = M - m < MR ? M - m : MR;
        const X* xs[MR];
        float* outs[MR];
        for (int i = 0; i < MR; ++i) {
            xs[i] = xq + (m + (i < rows ? i : 0)) * nb;
            outs[i] = tmp[i];
        }
        tile(xs, outs, rows);
        for (int i = 0; i < rows; ++i)
            for (int r = 0; r < lanes; ++r) out[(m + i) * ldo + n + r] = tmp[i][r];
    }
}

// One tile of MR x rows against V::GROUPS row groups, by format: x_sums are each x row's sums
// (ActivationBlock's), which Q6_K does not need.
template <typename V, int MR, typename G>
inline void groups_tile(const G* const* w, const BlockQ8_0* const* x, const int32_t* const* x_sums, int64_t nb,
                        float* const* out) {
    q_0_groups_tile<V, MR>(w, x, x_sums, nb, out);  // Q8_0, Q4_0
}
template <typename V, int MR, typename G>
inline void groups_tile(const G* const* w, const BlockQ8_K* const* x, const int16_t* const* x_sums, int64_t nb,
                        float* const* out) {
    if constexpr (std::is_same_v<G, BlockQ6_Kx8>)
        q6_k_groups_tile<V, MR>(w, x, nb, out);
    else
        q4_k_groups_tile<V, MR>(w, x, x_sums, nb, out);  // Q4_K, Q5_K
}

// The same for r8 rows (n0, n1 multiples of 8; w points at row 0): 16 rows per pass while they last
// (Lanes16, or AVX2's Lanes8x2 below MR x rows), then 8; x rows MR at a time, each weight vector
// loaded (and unpacked) once for them. The k-quants' tiles hold more registers per x row: 2 rows.
template <typename G>
inline void quant_linear_chunk_r8(const float* x, int64_t ldx, const G* w, float* out, int64_t ldo, int64_t M,
                                  int64_t K, int64_t n0, int64_t n1) {
    using A = ActivationBlock<G>;
    constexpr int MR = std::is_same_v<A, Q8_0Activations> ? 4 : 2;
    const auto [xq, sums] = quantize_rows<G>(x, ldx, M, K);
    const int64_t nb = K / A::size;
    int64_t n = n0;
    const auto groups_of = [&](auto lanes) {
        using V = decltype(lanes);
        constexpr int64_t width = 8 * V::GROUPS;
        for (; n + width <= n1; n += width) {
            const G* groups[V::GROUPS];
            for (int k = 0; k < V::GROUPS; ++k) groups[k] = w + (n / 8 + k) * nb;
            row_tiles<MR>(xq, M, nb, width, out, ldo, n, [&](const typename A::type* const* xs, float* const* outs, int64_t rows) {
                const typename A::sum* xsums[MR];
                for (int i = 0; i < MR; ++i) xsums[i] = sums + A::sums_per_block * (xs[i] - xq);
                if (rows == MR)
                    groups_tile<V, MR>(groups, xs, xsums, nb, outs);
                else
                    for (int64_t i = 0; i < rows; ++i) groups_tile<V, 1>(groups, xs + i, xsums + i, nb, outs + i);
            });
        }
    };
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
    groups_of(Lanes16{});  // two groups of 8 rows per 16-lane vector
#else
    if (M < MR) groups_of(Lanes8x2{});  // one x row at a time: registers to spare for two groups
#endif
    groups_of(Lanes8{});
}

}  // namespace moetron
