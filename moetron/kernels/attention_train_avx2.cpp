// Causal attention for CPU training, forward and backward, on fp32 or bf16 queries, keys and values
// in rows [B, T, heads, d] (MHA, GQA, MQA: head h reads kv head h / (H / G)); fp32 scores, softmax
// and accumulation. torch's CPU flash attention took ~12 ms for a layer's forward+backward at
// 4 x 8 heads x 256 tokens x 64 in bf16 (~80 GFLOP/s, it widens everything to fp32 first) and
// ~11 ms in fp32.
//
// A task is one head's block of ROWS query rows: its scores against the keys up to its last row,
// the softmax, then P @ V. The backward recomputes P from the forward's log-sum-exp, as
// FlashAttention does, and takes dP = dO @ V^T, dS = P * (dP - rowsum(dO * O)), dQ = dS @ K,
// dK += dS^T @ Q and dV += P^T @ dO. In bf16, P and dS are rounded to bf16 before their products
// (as GPU flash attention does) and every product is a pair dot product of bf16 values:
// AVX512-BF16's vdpbf16ps where the build has it, else two fp32 FMAs per pair on the widened values
// (the same layouts). In fp32 every product is an FMA.
//
// Determinism: a task's rows are computed in one fixed order whichever thread takes it; dK and dV
// sum over tasks in a fixed order too (a whole kv head on one thread, or per-thread partial sums
// added in thread order, for a fixed thread count).
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "export.h"
#include "simd_avx2.h"

using namespace moetron;

namespace {

constexpr int64_t ROWS = 32;   // query rows per task
constexpr int64_t LANES = 16;  // keys (or output columns) per vector

inline float bits_to_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

// Sixteen fp32 lanes; Lanes16: sixteen fp32 values of B; Pairs: sixteen bf16 pairs of B.
#ifdef __AVX512F__
constexpr int SCORE_ROWS = 4, SCORE_VECS = 2, OUT_ROWS = 4, OUT_VECS = 4;
struct Vec {
    __m512 v;
};
struct Lanes16 {
    __m512 v;
};
inline Vec zero_vec() { return {_mm512_setzero_ps()}; }
inline Lanes16 load_lanes(const float* p) { return {_mm512_loadu_ps(p)}; }
inline Vec fma_lanes(Vec acc, float a, Lanes16 b) { return {_mm512_fmadd_ps(_mm512_set1_ps(a), b.v, acc.v)}; }
inline void store_vec(float* p, Vec x) { _mm512_storeu_ps(p, x.v); }
inline void add_to(float* p, Vec x) { _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), x.v)); }
#else
constexpr int SCORE_ROWS = 4, SCORE_VECS = 1, OUT_ROWS = 2, OUT_VECS = 2;
struct Vec {
    __m256 lo, hi;
};
struct Lanes16 {
    __m256 lo, hi;
};
inline Vec zero_vec() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline Lanes16 load_lanes(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline Vec fma_lanes(Vec acc, float a, Lanes16 b) {
    const __m256 av = _mm256_set1_ps(a);
    return {_mm256_fmadd_ps(av, b.lo, acc.lo), _mm256_fmadd_ps(av, b.hi, acc.hi)};
}
inline void store_vec(float* p, Vec x) {
    _mm256_storeu_ps(p, x.lo);
    _mm256_storeu_ps(p + 8, x.hi);
}
inline void add_to(float* p, Vec x) {
    _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), x.lo));
    _mm256_storeu_ps(p + 8, _mm256_add_ps(_mm256_loadu_ps(p + 8), x.hi));
}
#endif

#ifdef __AVX512BF16__
struct Pairs {
    __m512i v;
};
inline Pairs load_pairs(const bf16* p) { return {_mm512_loadu_si512(p)}; }
inline Vec dot_pair(Vec acc, uint32_t a, Pairs b) {
    return {_mm512_dpbf16_ps(acc.v, (__m512bh)_mm512_set1_epi32(static_cast<int>(a)), (__m512bh)b.v)};
}
#else
struct Pairs {
    __m256 first_lo, second_lo, first_hi, second_hi;
};
inline Pairs load_pairs(const bf16* p) {
    const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16));
    const __m256i upper = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(lo, 16)), _mm256_castsi256_ps(_mm256_and_si256(lo, upper)),
            _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16)), _mm256_castsi256_ps(_mm256_and_si256(hi, upper))};
}
#ifdef __AVX512F__
inline Vec dot_pair(Vec acc, uint32_t a, Pairs b) {
    const __m256 first = _mm256_set1_ps(bits_to_float(a << 16));
    const __m256 second = _mm256_set1_ps(bits_to_float(a & 0xFFFF0000u));
    __m256 lo = _mm512_castps512_ps256(acc.v);
    __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc.v), 1));
    lo = _mm256_fmadd_ps(second, b.second_lo, _mm256_fmadd_ps(first, b.first_lo, lo));
    hi = _mm256_fmadd_ps(second, b.second_hi, _mm256_fmadd_ps(first, b.first_hi, hi));
    return {_mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)), _mm256_castps_pd(hi), 1))};
}
#else
inline Vec dot_pair(Vec acc, uint32_t a, Pairs b) {
    const __m256 first = _mm256_set1_ps(bits_to_float(a << 16));
    const __m256 second = _mm256_set1_ps(bits_to_float(a & 0xFFFF0000u));
    acc.lo = _mm256_fmadd_ps(second, b.second_lo, _mm256_fmadd_ps(first, b.first_lo, acc.lo));
    acc.hi = _mm256_fmadd_ps(second, b.second_hi, _mm256_fmadd_ps(first, b.first_hi, acc.hi));
    return acc;
}
#endif
#endif

// The element types' products: a unit is STEP consecutive values of a row (a bf16 pair, or one
// fp32 value); a packed B vector holds one unit of sixteen rows or columns (64 bytes either way).
template <typename E>
struct Elem;
template <>
struct Elem<bf16> {
    static constexpr int64_t STEP = 2;
    using Packed = Pairs;
    static uint32_t unit(const bf16* row, int64_t u) {
        uint32_t bits;
        memcpy(&bits, row + 2 * u, sizeof bits);
        return bits;
    }
    static Packed load(const bf16* p) { return load_pairs(p); }
    static Vec dot(Vec acc, uint32_t a, Packed b) { return dot_pair(acc, a, b); }
};
template <>
struct Elem<float> {
    static constexpr int64_t STEP = 1;
    using Packed = Lanes16;
    static float unit(const float* row, int64_t u) { return row[u]; }
    static Packed load(const float* p) { return load_lanes(p); }
    static Vec dot(Vec acc, float a, Packed b) { return fma_lanes(acc, a, b); }
};

// The B operand of `scores`: rows [n][d] as [ceil(n / 16)][d / STEP][16][STEP] (zeros past n), so
// one vector holds unit u of sixteen rows.
template <typename E>
void pack_lanes(const E* src, int64_t stride, int64_t n, int64_t d, E* dst) {
    constexpr int64_t S = Elem<E>::STEP;
    const int64_t blocks = (n + LANES - 1) / LANES;
    for (int64_t kb = 0; kb < blocks; ++kb)
        for (int64_t u = 0; u < d / S; ++u)
            for (int64_t i = 0; i < LANES; ++i) {
                const int64_t row = kb * LANES + i;
                E* out = dst + ((kb * (d / S) + u) * LANES + i) * S;
                for (int64_t e = 0; e < S; ++e) out[e] = row < n ? src[row * stride + S * u + e] : E{0};
            }
}

// The B operand of `rows_times`: rows [n][d] as [ceil(n / STEP)][d][STEP] (zeros past n), so one
// vector holds rows STEP * j .. STEP * j + STEP - 1 of sixteen columns.
template <typename E>
void pack_row_units(const E* src, int64_t stride, int64_t n, int64_t d, E* dst) {
    constexpr int64_t S = Elem<E>::STEP;
    for (int64_t j = 0; j < (n + S - 1) / S; ++j)
        for (int64_t c = 0; c < d; ++c)
            for (int64_t e = 0; e < S; ++e) {
                const int64_t row = S * j + e;
                dst[(j * d + c) * S + e] = row < n ? src[row * stride + c] : E{0};
            }
}

// acc[i][v] = sum over units u < units of a_unit(i, u) . b_units(u, v), NV vectors (a constant,
// so the accumulators stay in registers).
template <typename E, int R, int NV, typename AUnit, typename BUnits>
inline void unit_products(int64_t units, AUnit a_unit, BUnits b_units, Vec (&acc)[R][NV]) {
    for (auto& row : acc)
        for (auto& v : row) v = zero_vec();
    for (int64_t u = 0; u < units; ++u) {
        typename Elem<E>::Packed bv[NV];
        for (int v = 0; v < NV; ++v) bv[v] = Elem<E>::load(b_units(u, v));
        for (int i = 0; i < R; ++i) {
            const auto ai = a_unit(i, u);
            for (int v = 0; v < NV; ++v) acc[i][v] = Elem<E>::dot(acc[i][v], ai, bv[v]);
        }
    }
}

// S[r][k] = a[r] . b[k] for r < rows (a multiple of SCORE_ROWS) and the key blocks each row tile
// needs (blocks_for(last row of the tile)); b packed by pack_lanes.
template <typename E, int NV>
void scores_vecs(const E* a, int64_t r, int64_t kb, int64_t d, const E* b_packed, float* S, int64_t ld) {
    constexpr int64_t U = Elem<E>::STEP;
    Vec acc[SCORE_ROWS][NV];
    unit_products<E, SCORE_ROWS, NV>(
        d / U, [&](int i, int64_t u) { return Elem<E>::unit(a + (r + i) * d, u); },
        [&](int64_t u, int v) { return b_packed + (((kb + v) * (d / U) + u) * LANES) * U; }, acc);
    for (int i = 0; i < SCORE_ROWS; ++i)
        for (int v = 0; v < NV; ++v) store_vec(S + (r + i) * ld + (kb + v) * LANES, acc[i][v]);
}

template <typename E, typename BlocksFor>
void scores(const E* a, int64_t rows, int64_t d, const E* b_packed, BlocksFor blocks_for, float* S, int64_t ld) {
    for (int64_t r = 0; r < rows; r += SCORE_ROWS) {
        const int64_t blocks = blocks_for(r + SCORE_ROWS - 1);
        int64_t kb = 0;
        for (; kb + SCORE_VECS <= blocks; kb += SCORE_VECS) scores_vecs<E, SCORE_VECS>(a, r, kb, d, b_packed, S, ld);
        for (; kb < blocks; ++kb) scores_vecs<E, 1>(a, r, kb, d, b_packed, S, ld);
    }
}

// out[r][c] (=, or += if `accumulate`) = sum over units j < units_for(last row of r's tile) of
// sum_e a[r][STEP j + e] * b[STEP j + e][c], for r < rows (a multiple of OUT_ROWS), c < cols (a
// multiple of 16); a's rows with units along them (stride lda), b packed [units][ldb][STEP]
// (pack_row_units), out fp32 with stride ldo.
template <typename E, int NV>
void rows_times_vecs(const E* a, int64_t lda, int64_t r, int64_t units, const E* b_packed, int64_t ldb, int64_t c,
                     float* out, int64_t ldo, bool accumulate) {
    constexpr int64_t U = Elem<E>::STEP;
    Vec acc[OUT_ROWS][NV];
    unit_products<E, OUT_ROWS, NV>(
        units, [&](int i, int64_t j) { return Elem<E>::unit(a + (r + i) * lda, j); },
        [&](int64_t j, int v) { return b_packed + (j * ldb + c + v * LANES) * U; }, acc);
    for (int i = 0; i < OUT_ROWS; ++i)
        for (int v = 0; v < NV; ++v) {
            float* o = out + (r + i) * ldo + c + v * LANES;
            if (accumulate) {
                add_to(o, acc[i][v]);
            } else {
                store_vec(o, acc[i][v]);
            }
        }
}

template <typename E, typename UnitsFor>
void rows_times(const E* a, int64_t lda, int64_t rows, const E* b_packed, int64_t ldb, int64_t cols,
                UnitsFor units_for, float* out, int64_t ldo, bool accumulate) {
    for (int64_t r = 0; r < rows; r += OUT_ROWS) {
        const int64_t units = units_for(r + OUT_ROWS - 1);
        int64_t c = 0;
        for (; c + OUT_VECS * LANES <= cols; c += OUT_VECS * LANES)
            rows_times_vecs<E, OUT_VECS>(a, lda, r, units, b_packed, ldb, c, out, ldo, accumulate);
        for (; c < cols; c += LANES) rows_times_vecs<E, 1>(a, lda, r, units, b_packed, ldb, c, out, ldo, accumulate);
    }
}

inline __m256 lanes_below(int64_t n, int64_t j) { return first_lanes(std::clamp<int64_t>(n - j, 0, 8)); }

// exp(s * scale - shift) for s[0, n), 0 from n on up to `end` (a multiple of 8).
inline void exp_row(float* s, int64_t n, int64_t end, float scale, float shift) {
    const __m256 sc = _mm256_set1_ps(scale), sh = _mm256_set1_ps(shift);
    for (int64_t j = 0; j < end; j += 8) {
        const __m256 x = _mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(s + j), sc), sh);
        _mm256_storeu_ps(s + j, _mm256_and_ps(exp8(x), lanes_below(n, j)));
    }
}

// out = x * scale in E for n (a multiple of 8) values.
template <typename E>
inline void scaled_store(const float* x, int64_t n, float scale, E* out) {
    const __m256 sc = _mm256_set1_ps(scale);
    for (int64_t j = 0; j < n; j += 8) store_w(out + j, _mm256_mul_ps(_mm256_loadu_ps(x + j), sc));
}

// Rows r and r + 1, 8 columns from j, into a [rows / STEP][ld][STEP] buffer (pack_row_units'
// layout): bf16 pairs interleaved, fp32 rows as they are.
inline void store_row_units(bf16* dst, int64_t r, int64_t ld, int64_t j, __m256 row0, __m256 row1) {
    bf16* at = dst + (r / 2 * ld + j) * 2;
    const __m128i a = to_bf16x8(row0), b = to_bf16x8(row1);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(at), _mm_unpacklo_epi16(a, b));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(at + 8), _mm_unpackhi_epi16(a, b));
}
inline void store_row_units(float* dst, int64_t r, int64_t ld, int64_t j, __m256 row0, __m256 row1) {
    _mm256_storeu_ps(dst + r * ld + j, row0);
    _mm256_storeu_ps(dst + (r + 1) * ld + j, row1);
}

template <typename E>
inline float dot_rows(const E* a, const E* b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t c = 0; c < n; c += 8) acc = _mm256_fmadd_ps(load_w(a + c), load_w(b + c), acc);
    return hsum(acc);
}

struct Shape {
    int64_t B, T, H, G, d;
    int64_t blocks() const { return (T + ROWS - 1) / ROWS; }
    int64_t padded() const { return (T + LANES - 1) / LANES * LANES; }
    int64_t row(int64_t b, int64_t t, int64_t heads, int64_t h) const { return ((b * T + t) * heads + h) * d; }
};

// One kv head's keys and values packed for the products a task takes (zeros past T).
template <typename E>
struct PackedKV {
    std::vector<E> k_lanes, v_lanes, k_units, v_units;
    void pack(const Shape& s, const E* k, const E* v, int64_t b, int64_t g, bool backward) {
        const int64_t stride = s.G * s.d, n = s.padded() * s.d;
        const E* k0 = k + s.row(b, 0, s.G, g);
        const E* v0 = v + s.row(b, 0, s.G, g);
        k_lanes.resize(n);
        pack_lanes(k0, stride, s.T, s.d, k_lanes.data());
        if (backward) {
            v_lanes.resize(n);
            k_units.resize(n);
            pack_lanes(v0, stride, s.T, s.d, v_lanes.data());
            pack_row_units(k0, stride, s.T, s.d, k_units.data());
        } else {
            v_units.resize(n);
            pack_row_units(v0, stride, s.T, s.d, v_units.data());
        }
    }
};

// A task's block of query rows and the keys they attend to.
struct Block {
    int64_t t0, rows, key_blocks, padded_keys;
    Block(const Shape& s, int64_t qb)
        : t0(qb * ROWS),
          rows(std::min(ROWS, s.T - qb * ROWS)),
          key_blocks((t0 + rows + LANES - 1) / LANES),
          padded_keys(key_blocks * LANES) {}
    int64_t last(int64_t r) const { return t0 + std::min(r, rows - 1); }  // row r's position, clamped
    int64_t blocks_for(int64_t r) const { return last(r) / LANES + 1; }   // key blocks rows <= r need
    template <typename E>
    int64_t units_for(int64_t r) const {  // key units rows <= r need
        return (last(r) + Elem<E>::STEP) / Elem<E>::STEP;
    }
    int64_t keys(int64_t r) const { return r < rows ? t0 + r + 1 : 0; }  // causal: keys 0..t
};

// The block's rows [ROWS][d] (zeros past the sequence).
template <typename E>
void copy_rows(const E* src, const Shape& s, int64_t b, int64_t h, const Block& blk, E* dst) {
    for (int64_t r = 0; r < ROWS; ++r) {
        if (r < blk.rows) {
            memcpy(dst + r * s.d, src + s.row(b, blk.t0 + r, s.H, h), s.d * sizeof(E));
        } else {
            memset(dst + r * s.d, 0, s.d * sizeof(E));
        }
    }
}

// dst[c][r] = src[r][c] for a [ROWS][d] block.
template <typename E>
void transpose_rows(const E* src, int64_t d, E* dst) {
    for (int64_t r = 0; r < ROWS; ++r)
        for (int64_t c = 0; c < d; ++c) dst[c * ROWS + r] = src[r * d + c];
}

template <typename E>
struct ForwardScratch {
    std::vector<E> q, p;
    std::vector<float> s, o;
    explicit ForwardScratch(const Shape& sh)
        : q(ROWS * sh.d), p(ROWS * sh.padded()), s(ROWS * sh.padded()), o(ROWS * sh.d) {}
};

template <typename E>
void forward_task(const Shape& s, const PackedKV<E>& kv, const E* q, int64_t b, int64_t h, int64_t qb, float scale,
                  ForwardScratch<E>& w, E* out, float* lse) {
    const Block blk(s, qb);
    const int64_t ld = s.padded();
    copy_rows(q, s, b, h, blk, w.q.data());
    scores(w.q.data(), ROWS, s.d, kv.k_lanes.data(), [&](int64_t r) { return blk.blocks_for(r); }, w.s.data(), ld);
    for (int64_t r = 0; r < ROWS; ++r) {
        float* srow = w.s.data() + r * ld;
        E* prow = w.p.data() + r * ld;
        const int64_t n = blk.keys(r);
        if (n == 0) {
            memset(prow, 0, blk.padded_keys * sizeof(E));
            continue;
        }
        __m256 mx = _mm256_set1_ps(-INFINITY);
        for (int64_t j = 0; j < n; j += 8)
            mx = _mm256_max_ps(
                mx, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_loadu_ps(srow + j), lanes_below(n, j)));
        const float m = hmax(mx) * scale;
        exp_row(srow, n, blk.padded_keys, scale, m);
        __m256 acc = _mm256_setzero_ps();
        for (int64_t j = 0; j < blk.padded_keys; j += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(srow + j));
        const float sum = hsum(acc);
        scaled_store(srow, blk.padded_keys, 1.0f / sum, prow);
        lse[(b * s.T + blk.t0 + r) * s.H + h] = m + logf(sum);
    }
    rows_times(w.p.data(), ld, ROWS, kv.v_units.data(), s.d, s.d,
               [&](int64_t r) { return blk.template units_for<E>(r); }, w.o.data(), s.d, false);
    for (int64_t r = 0; r < blk.rows; ++r)
        scaled_store(w.o.data() + r * s.d, s.d, 1.0f, out + s.row(b, blk.t0 + r, s.H, h));
}

template <typename E>
struct BackwardScratch {
    std::vector<E> q, dout, q_t, dout_t, ds, ds_units, p_units;
    std::vector<float> s, dp, dq;
    explicit BackwardScratch(const Shape& sh)
        : q(ROWS * sh.d), dout(ROWS * sh.d), q_t(ROWS * sh.d), dout_t(ROWS * sh.d), ds(ROWS * sh.padded()),
          ds_units(ROWS * sh.padded()), p_units(ROWS * sh.padded()), s(ROWS * sh.padded()), dp(ROWS * sh.padded()),
          dq(ROWS * sh.d) {}
};

// One task's dQ rows (written) and its dK, dV terms, added to dk_acc and dv_acc: fp32 [d][padded T]
// (transposed: these products run along the keys).
template <typename E>
void backward_task(const Shape& s, const PackedKV<E>& kv, const E* q, const E* out, const E* dout, const float* lse,
                   int64_t b, int64_t h, int64_t qb, float scale, BackwardScratch<E>& w, E* dq, float* dk_acc,
                   float* dv_acc) {
    const Block blk(s, qb);
    const int64_t ld = s.padded(), d = s.d;
    copy_rows(q, s, b, h, blk, w.q.data());
    copy_rows(dout, s, b, h, blk, w.dout.data());
    const auto blocks_for = [&](int64_t r) { return blk.blocks_for(r); };
    scores(w.q.data(), ROWS, d, kv.k_lanes.data(), blocks_for, w.s.data(), ld);
    scores(w.dout.data(), ROWS, d, kv.v_lanes.data(), blocks_for, w.dp.data(), ld);
    // P = exp(S * scale - lse), dS = P * (dP - rowsum(dO * O)), two rows at a time: dS by rows (for
    // dQ), P and dS in row units (for dV and dK).
    const __m256 sc = _mm256_set1_ps(scale);
    for (int64_t r = 0; r < ROWS; r += 2) {
        __m256 shift[2], delta[2];
        int64_t n[2];
        for (int64_t i = 0; i < 2; ++i) {
            n[i] = blk.keys(r + i);
            const bool live = n[i] > 0;
            shift[i] = _mm256_set1_ps(live ? lse[(b * s.T + blk.t0 + r + i) * s.H + h] : 0.0f);
            delta[i] = _mm256_set1_ps(
                live ? dot_rows(w.dout.data() + (r + i) * d, out + s.row(b, blk.t0 + r + i, s.H, h), d) : 0.0f);
        }
        for (int64_t j = 0; j < blk.padded_keys; j += 8) {
            __m256 p[2], ds[2];
            for (int64_t i = 0; i < 2; ++i) {
                const int64_t at = (r + i) * ld + j;
                const __m256 keep = lanes_below(n[i], j);
                const __m256 x = _mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(w.s.data() + at), sc), shift[i]);
                p[i] = _mm256_and_ps(exp8(x), keep);
                const __m256 dp = _mm256_sub_ps(_mm256_loadu_ps(w.dp.data() + at), delta[i]);
                ds[i] = _mm256_and_ps(_mm256_mul_ps(p[i], dp), keep);
                store_w(w.ds.data() + at, ds[i]);
            }
            store_row_units(w.p_units.data(), r, ld, j, p[0], p[1]);
            store_row_units(w.ds_units.data(), r, ld, j, ds[0], ds[1]);
        }
    }
    rows_times(w.ds.data(), ld, ROWS, kv.k_units.data(), d, d, [&](int64_t r) { return blk.template units_for<E>(r); },
               w.dq.data(), d, false);
    for (int64_t r = 0; r < blk.rows; ++r) scaled_store(w.dq.data() + r * d, d, scale, dq + s.row(b, blk.t0 + r, s.H, h));
    // dK^T[c][j] += sum_r Q[r][c] dS[r][j]; dV^T[c][j] += sum_r dO[r][c] P[r][j].
    transpose_rows(w.q.data(), d, w.q_t.data());
    transpose_rows(w.dout.data(), d, w.dout_t.data());
    const auto all_rows = [](int64_t) { return ROWS / Elem<E>::STEP; };
    rows_times(w.q_t.data(), ROWS, d, w.ds_units.data(), ld, blk.padded_keys, all_rows, dk_acc, ld, true);
    rows_times(w.dout_t.data(), ROWS, d, w.p_units.data(), ld, blk.padded_keys, all_rows, dv_acc, ld, true);
}

// dk, dv rows of kv head (b, g) from the fp32 sums ([d][padded T]).
template <typename E>
void write_kv_grads(const Shape& s, int64_t b, int64_t g, const float* dk_acc, const float* dv_acc, float scale, E* dk,
                    E* dv) {
    const int64_t ld = s.padded();
    for (int64_t t = 0; t < s.T; ++t) {
        E* k_row = dk + s.row(b, t, s.G, g);
        E* v_row = dv + s.row(b, t, s.G, g);
        for (int64_t c = 0; c < s.d; ++c) {
            store_w(k_row + c, dk_acc[c * ld + t] * scale);
            store_w(v_row + c, dv_acc[c * ld + t]);
        }
    }
}

template <typename E>
void forward(const E* q, const E* k, const E* v, const Shape& s, float scale, E* out, float* lse, int num_threads) {
    std::vector<PackedKV<E>> packed(s.B * s.G);
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1) schedule(static)
    for (int64_t u = 0; u < s.B * s.G; ++u) packed[u].pack(s, k, v, u / s.G, u % s.G, false);
    const int64_t blocks = s.blocks(), tasks = s.B * s.H * blocks;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
    {
        ForwardScratch<E> w(s);
        // The longest tasks (last blocks) first; each writes only its own rows, so the schedule
        // cannot change a bit.
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < tasks; ++i) {
            const int64_t qb = blocks - 1 - i / (s.B * s.H), bh = i % (s.B * s.H), b = bh / s.H, h = bh % s.H;
            forward_task(s, packed[b * s.G + h / (s.H / s.G)], q, b, h, qb, scale, w, out, lse);
        }
    }
}

template <typename E>
void backward(const E* q, const E* k, const E* v, const E* out, const E* dout, const float* lse, const Shape& s,
              float scale, E* dq, E* dk, E* dv, int num_threads) {
    const int64_t units = s.B * s.G, heads = s.H / s.G, blocks = s.blocks(), acc_size = s.padded() * s.d;
    const int threads = num_threads > 1 ? num_threads : 1;
    if (units % threads == 0 || units >= 4 * threads) {
        // Each kv head on one thread: its tasks in order, its dK, dV sums in one buffer.
#pragma omp parallel num_threads(threads) if (threads > 1)
        {
            BackwardScratch<E> w(s);
            PackedKV<E> kv;
            std::vector<float> dk_acc(acc_size), dv_acc(acc_size);
#pragma omp for schedule(dynamic, 1)
            for (int64_t u = 0; u < units; ++u) {
                const int64_t b = u / s.G, g = u % s.G;
                kv.pack(s, k, v, b, g, true);
                std::fill(dk_acc.begin(), dk_acc.end(), 0.0f);
                std::fill(dv_acc.begin(), dv_acc.end(), 0.0f);
                for (int64_t i = 0; i < heads * blocks; ++i)
                    backward_task(s, kv, q, out, dout, lse, b, g * heads + i / blocks, i % blocks, scale, w, dq,
                                  dk_acc.data(), dv_acc.data());
                write_kv_grads(s, b, g, dk_acc.data(), dv_acc.data(), scale, dk, dv);
            }
        }
        return;
    }
    // Fewer kv heads than threads can share evenly: each kv head's tasks dealt round-robin, every
    // thread summing into its own buffer, the buffers added in thread order.
    std::vector<float> dk_parts(threads * acc_size), dv_parts(threads * acc_size);
    PackedKV<E> kv;
    for (int64_t u = 0; u < units; ++u) {
        const int64_t b = u / s.G, g = u % s.G;
        kv.pack(s, k, v, b, g, true);
#pragma omp parallel num_threads(threads)
        {
            const int tid = omp_get_thread_num();
            BackwardScratch<E> w(s);
            float* dk_acc = dk_parts.data() + tid * acc_size;
            float* dv_acc = dv_parts.data() + tid * acc_size;
            std::fill(dk_acc, dk_acc + acc_size, 0.0f);
            std::fill(dv_acc, dv_acc + acc_size, 0.0f);
#pragma omp for schedule(static, 1)
            for (int64_t i = 0; i < heads * blocks; ++i)
                backward_task(s, kv, q, out, dout, lse, b, g * heads + i / blocks, blocks - 1 - i % blocks, scale, w,
                              dq, dk_acc, dv_acc);
#pragma omp for schedule(static)
            for (int64_t i = 0; i < acc_size; ++i) {
                float dk_sum = dk_parts[i], dv_sum = dv_parts[i];
                for (int t = 1; t < threads; ++t) {
                    dk_sum += dk_parts[t * acc_size + i];
                    dv_sum += dv_parts[t * acc_size + i];
                }
                dk_parts[i] = dk_sum;
                dv_parts[i] = dv_sum;
            }
        }
        write_kv_grads(s, b, g, dk_parts.data(), dv_parts.data(), scale, dk, dv);
    }
}

}  // namespace

extern "C" {

// out = softmax(q k^T * scale, causal) v per head, and each row's log-sum-exp of the scaled scores
// (lse: fp32 [B, T, H]) for the backward. q, out: [B, T, H, d]; k, v: [B, T, G, d]; all fp32, or bf16
// if `bf16_rows`; H a multiple of G, d a multiple of 16.
void moetron_attention_train_forward(const void* q, const void* k, const void* v, int bf16_rows, int64_t B, int64_t T,
                                     int64_t H, int64_t G, int64_t d, float scale, void* out, float* lse,
                                     int num_threads) {
    const Shape s{B, T, H, G, d};
    if (bf16_rows) {
        forward(static_cast<const bf16*>(q), static_cast<const bf16*>(k), static_cast<const bf16*>(v), s, scale,
                static_cast<bf16*>(out), lse, num_threads);
    } else {
        forward(static_cast<const float*>(q), static_cast<const float*>(k), static_cast<const float*>(v), s, scale,
                static_cast<float*>(out), lse, num_threads);
    }
}

// The gradients of moetron_attention_train_forward: dq [B, T, H, d], dk and dv [B, T, G, d], in the
// inputs' dtype, from its inputs, its out and lse, and dout.
void moetron_attention_train_backward(const void* q, const void* k, const void* v, const void* out, const void* dout,
                                      const float* lse, int bf16_rows, int64_t B, int64_t T, int64_t H, int64_t G,
                                      int64_t d, float scale, void* dq, void* dk, void* dv, int num_threads) {
    const Shape s{B, T, H, G, d};
    if (bf16_rows) {
        backward(static_cast<const bf16*>(q), static_cast<const bf16*>(k), static_cast<const bf16*>(v),
                 static_cast<const bf16*>(out), static_cast<const bf16*>(dout), lse, s, scale, static_cast<bf16*>(dq),
                 static_cast<bf16*>(dk), static_cast<bf16*>(dv), num_threads);
    } else {
        backward(static_cast<const float*>(q), static_cast<const float*>(k), static_cast<const float*>(v),
                 static_cast<const float*>(out), static_cast<const float*>(dout), lse, s, scale,
                 static_cast<float*>(dq), static_cast<float*>(dk), static_cast<float*>(dv), num_threads);
    }
}

}  // extern "C"

MOETRON_EXPORT(moetron_attention_train_forward);
MOETRON_EXPORT(moetron_attention_train_backward);
