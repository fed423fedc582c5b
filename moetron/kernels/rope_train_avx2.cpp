// Rotary position embedding for CPU training (model/rope.py's apply_rope, half-split rotation):
// out = x * cos + rotate_half(x) * sin, and its gradient (the inverse rotation), one pass over
// rows [B, T, heads, d] in fp32 with one rounding, in x's dtype. torch's ops (a cat for
// rotate_half, two products, a sum; their backward) took ~0.8 ms for a forward+backward of
// 4 x 256 tokens x 8 heads x 64 in bf16 on 2 cores, and under autocast returned fp32 queries that
// attention then cast back to bf16.
//
// Legend: B batch, T tokens, H heads, d head_dim (even), h = d / 2.
#include <stdint.h>

#include <vector>

#include "export.h"
#include "simd_avx2.h"

using namespace moetron;

namespace {

template <typename X, typename C>
void rope_rows(const X* x, const C* cos_BTd, const C* sin_BTd, int64_t rows, int64_t H, int64_t d, bool inverse,
               X* out, int num_threads) {
    const int64_t h = d / 2;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
    {
        std::vector<float> c(d), s(d);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) {  // r = b * T + t
            for (int64_t i = 0; i < d; ++i) {
                c[i] = w_at(cos_BTd + r * d + i);
                s[i] = w_at(sin_BTd + r * d + i);
            }
            for (int64_t head = 0; head < H; ++head) {
                const X* xr = x + (r * H + head) * d;
                X* o = out + (r * H + head) * d;
                int64_t i = 0;
                // forward: o1 = x1 c1 - x2 s1, o2 = x2 c2 + x1 s2;
                // inverse (the gradient): o1 = x1 c1 + x2 s2, o2 = x2 c2 - x1 s1.
                for (; i + 8 <= h; i += 8) {
                    const __m256 x1 = load_w(xr + i), x2 = load_w(xr + h + i);
                    const __m256 c1 = _mm256_loadu_ps(c.data() + i), c2 = _mm256_loadu_ps(c.data() + h + i);
                    const __m256 s1 = _mm256_loadu_ps(s.data() + i), s2 = _mm256_loadu_ps(s.data() + h + i);
                    if (inverse) {
                        store_w(o + i, _mm256_add_ps(_mm256_mul_ps(x1, c1), _mm256_mul_ps(x2, s2)));
                        store_w(o + h + i, _mm256_sub_ps(_mm256_mul_ps(x2, c2), _mm256_mul_ps(x1, s1)));
                    } else {
                        store_w(o + i, _mm256_sub_ps(_mm256_mul_ps(x1, c1), _mm256_mul_ps(x2, s1)));
                        store_w(o + h + i, _mm256_add_ps(_mm256_mul_ps(x2, c2), _mm256_mul_ps(x1, s2)));
                    }
                }
                for (; i < h; ++i) {
                    const float x1 = w_at(xr + i), x2 = w_at(xr + h + i);
                    if (inverse) {
                        store_w(o + i, x1 * c[i] + x2 * s[h + i]);
                        store_w(o + h + i, x2 * c[h + i] - x1 * s[i]);
                    } else {
                        store_w(o + i, x1 * c[i] - x2 * s[i]);
                        store_w(o + h + i, x2 * c[h + i] + x1 * s[h + i]);
                    }
                }
            }
        }
    }
}

template <typename X>
void rope_rows_of(const X* x, const void* cos_BTd, const void* sin_BTd, int bf16_angles, int64_t rows, int64_t H,
                  int64_t d, int inverse, X* out, int num_threads) {
    if (bf16_angles) {
        rope_rows(x, static_cast<const bf16*>(cos_BTd), static_cast<const bf16*>(sin_BTd), rows, H, d, inverse, out,
                  num_threads);
    } else {
        rope_rows(x, static_cast<const float*>(cos_BTd), static_cast<const float*>(sin_BTd), rows, H, d, inverse, out,
                  num_threads);
    }
}

}  // namespace

extern "C" {

// out [B*T, H, d] (x's dtype: fp32, or bf16 if `bf16_rows`) = x rotated by cos, sin [B*T, d] (fp32,
// or bf16 if `bf16_angles`); `inverse`: rotated back (the gradient of the forward).
void moetron_rope_rows(const void* x, int bf16_rows, const void* cos_BTd, const void* sin_BTd, int bf16_angles,
                       int64_t rows, int64_t H, int64_t d, int inverse, void* out, int num_threads) {
    if (bf16_rows) {
        rope_rows_of(static_cast<const bf16*>(x), cos_BTd, sin_BTd, bf16_angles, rows, H, d, inverse,
                     static_cast<bf16*>(out), num_threads);
    } else {
        rope_rows_of(static_cast<const float*>(x), cos_BTd, sin_BTd, bf16_angles, rows, H, d, inverse,
                     static_cast<float*>(out), num_threads);
    }
}

}  // extern "C"

MOETRON_EXPORT(moetron_rope_rows);
