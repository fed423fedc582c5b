// RMSNorm for CPU training, forward and backward, on fp32 or bf16 rows with a weight of the same
// dtype: y = weight * x * rstd, rstd = 1 / sqrt(mean(x^2) + eps), all in fp32, rounded once. The
// module's torch ops (a cast to fp32, rms_norm, a cast back, the product with the weight, and the
// backward of each) took ~1.2 ms for a forward+backward of 1,024 x 512 bf16 rows on 2 cores.
//
// Rows are independent (a row's bits never depend on the others); the weight's gradient sums each
// thread's rows in order, then the threads' sums in thread order.
//
// Legend: N rows, D width.
#include <math.h>
#include <omp.h>
#include <stdint.h>

#include <vector>

#include "export.h"
#include "simd_avx2.h"

using namespace moetron;

namespace {

template <typename X>
inline float sum_squares(const X* x, int64_t D) {
    __m256 acc = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
        const __m256 v = load_w(x + d);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    float s = hsum(acc);
    for (; d < D; ++d) s += w_at(x + d) * w_at(x + d);
    return s;
}

template <typename X>
void forward(const X* x, const X* weight, int64_t N, int64_t D, float eps, X* y, float* rstd, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const X* row = x + n * D;
        const float r = 1.0f / sqrtf(sum_squares(row, D) / static_cast<float>(D) + eps);
        rstd[n] = r;
        const __m256 rv = _mm256_set1_ps(r);
        int64_t d = 0;
        for (; d + 8 <= D; d += 8)
            store_w(y + n * D + d, _mm256_mul_ps(load_w(weight + d), _mm256_mul_ps(load_w(row + d), rv)));
        for (; d < D; ++d) store_w(y + n * D + d, w_at(weight + d) * (w_at(row + d) * r));
    }
}

// dx = rstd * (g - xhat * mean(g * xhat)) with g = dy * weight, xhat = x * rstd;
// dweight = sum over rows of dy * xhat (fp32).
template <typename X>
void backward(const X* x, const X* weight, const X* dy, const float* rstd, int64_t N, int64_t D, X* dx,
              float* dweight, int num_threads) {
    const int threads = num_threads > 1 ? num_threads : 1;
    std::vector<float> partial(static_cast<size_t>(threads) * D, 0.0f);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float* dw = partial.data() + omp_get_thread_num() * D;
        std::vector<float> g(D), xhat(D);
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; ++n) {
            const X* xr = x + n * D;
            const X* dyr = dy + n * D;
            const float r = rstd[n];
            const __m256 rv = _mm256_set1_ps(r);
            __m256 dot8 = _mm256_setzero_ps();
            int64_t d = 0;
            for (; d + 8 <= D; d += 8) {
                const __m256 dyv = load_w(dyr + d), xh = _mm256_mul_ps(load_w(xr + d), rv);
                const __m256 gv = _mm256_mul_ps(dyv, load_w(weight + d));
                _mm256_storeu_ps(xhat.data() + d, xh);
                _mm256_storeu_ps(g.data() + d, gv);
                _mm256_storeu_ps(dw + d, _mm256_add_ps(_mm256_loadu_ps(dw + d), _mm256_mul_ps(dyv, xh)));
                dot8 = _mm256_add_ps(dot8, _mm256_mul_ps(gv, xh));
            }
            float dot = hsum(dot8);
            for (; d < D; ++d) {
                const float dyd = w_at(dyr + d);
                xhat[d] = w_at(xr + d) * r;
                g[d] = dyd * w_at(weight + d);
                dw[d] += dyd * xhat[d];
                dot += g[d] * xhat[d];
            }
            const float mean = dot / static_cast<float>(D);
            const __m256 mv = _mm256_set1_ps(mean);
            for (d = 0; d + 8 <= D; d += 8) {
                const __m256 v = _mm256_sub_ps(_mm256_loadu_ps(g.data() + d),
                                               _mm256_mul_ps(_mm256_loadu_ps(xhat.data() + d), mv));
                store_w(dx + n * D + d, _mm256_mul_ps(rv, v));
            }
            for (; d < D; ++d) store_w(dx + n * D + d, r * (g[d] - xhat[d] * mean));
        }
    }
    for (int64_t d = 0; d < D; ++d) {
        float s = partial[d];
        for (int t = 1; t < threads; ++t) s += partial[static_cast<size_t>(t) * D + d];
        dweight[d] = s;
    }
}

}  // namespace

extern "C" {

// y (x's dtype: fp32, or bf16 if `bf16`) and each row's rstd (fp32 [N]).
void moetron_rms_norm_train_forward(const void* x, const void* weight, int bf16_rows, int64_t N, int64_t D, float eps,
                                    void* y, float* rstd, int num_threads) {
    if (bf16_rows) {
        forward(static_cast<const bf16*>(x), static_cast<const bf16*>(weight), N, D, eps, static_cast<bf16*>(y), rstd,
                num_threads);
    } else {
        forward(static_cast<const float*>(x), static_cast<const float*>(weight), N, D, eps, static_cast<float*>(y),
                rstd, num_threads);
    }
}

// dx (x's dtype) and dweight (fp32 [D]) from dy (x's dtype) and the forward's rstd.
void moetron_rms_norm_train_backward(const void* x, const void* weight, const void* dy, const float* rstd,
                                     int bf16_rows, int64_t N, int64_t D, void* dx, float* dweight, int num_threads) {
    if (bf16_rows) {
        backward(static_cast<const bf16*>(x), static_cast<const bf16*>(weight), static_cast<const bf16*>(dy), rstd, N,
                 D, static_cast<bf16*>(dx), dweight, num_threads);
    } else {
        backward(static_cast<const float*>(x), static_cast<const float*>(weight), static_cast<const float*>(dy), rstd,
                 N, D, static_cast<float*>(dx), dweight, num_threads);
    }
}

}  // extern "C"

MOETRON_EXPORT(moetron_rms_norm_train_forward);
MOETRON_EXPORT(moetron_rms_norm_train_backward);
