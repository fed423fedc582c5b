// RMSNorm rows (fp32, AVX2): out = weight * (x / sqrt(mean(x^2) + eps)), one row at a time with
// a fixed-order sum of squares, so a row's bits never depend on the other rows. PyTorch's CPU
// rms_norm is a chain of small ops (pow, mean, add, rsqrt, mul): 150+ us for 32 rows of 1024.
//
// Legend: M rows, D width.
#include <math.h>
#include <stdint.h>

#include "simd_avx2.h"

using namespace moetron;

extern "C" {

void moetron_rms_norm_f32(const float* x, int64_t ldx, const float* weight, float* out, int64_t M, int64_t D,
                          float eps) {
    const int64_t D8 = D & ~int64_t(7);
    for (int64_t m = 0; m < M; ++m) {
        const float* row = x + m * ldx;
        const float scale = 1.0f / sqrtf(dot(row, row, D) / static_cast<float>(D) + eps);
        const __m256 s = _mm256_set1_ps(scale);
        float* o = out + m * D;
        for (int64_t i = 0; i < D8; i += 8)
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_loadu_ps(weight + i), _mm256_mul_ps(_mm256_loadu_ps(row + i), s)));
        for (int64_t i = D8; i < D; ++i) o[i] = weight[i] * (row[i] * scale);
    }
}

}  // extern "C"
