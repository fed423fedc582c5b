// RMSNorm rows (fp32, AVX2): out = weight * (x / sqrt(mean(x^2) + eps)), one row at a time with
// a fixed-order sum of squares, so a row's bits never depend on the other rows. PyTorch's CPU
// rms_norm is a chain of small ops (pow, mean, add, rsqrt, mul): 150+ us for 32 rows of 1024.
//
// Legend: M rows, D width.
#include <stdint.h>

#include "export.h"
#include "simd_avx2.h"

using namespace moetron;

extern "C" {

void moetron_rms_norm_f32(const float* x, int64_t ldx, const float* weight, float* out, int64_t M, int64_t D,
                          float eps) {
    for (int64_t m = 0; m < M; ++m) rms_norm_row(x + m * ldx, weight, out + m * D, D, eps);
}

}  // extern "C"

MOETRON_EXPORT(moetron_rms_norm_f32);
