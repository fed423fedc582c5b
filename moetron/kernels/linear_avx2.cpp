// Batch-invariant linear (out = x @ w.T, fp32 x and out) for AVX2+FMA CPUs: moetron's serving matmul.
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

#include "export.h"
#include "weights.h"

extern "C" {

// w in any format of weights.h (`format` a Format code); fp32 x and out. bf16 weights give the bits
// of their fp32 copy from half the bytes; quantized ones quantize each x row first (quant_tiles.h).
void moetron_linear(const float* x, int64_t ldx, const void* w, int format, int64_t ldw, float* out, int64_t ldo,
                    int64_t M, int64_t K, int64_t N, int num_threads) {
    using namespace moetron;
    const Weight weight{w, format};
    const int64_t rows = chunk_rows(K), num_chunks = (N + rows - 1) / rows;
    // The caller passes torch's thread count: omp_set_num_threads is per calling thread, and the
    // serving engine steps the model from its own thread.
    if (num_threads > num_chunks) num_threads = static_cast<int>(num_chunks);
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)
    for (int64_t c = 0; c < num_chunks; ++c) {
        const int64_t n0 = c * rows, n1 = n0 + rows < N ? n0 + rows : N;
        linear_chunk(x, ldx, weight, ldw, out, ldo, M, K, n0, n1);
    }
}

}  // extern "C"

MOETRON_EXPORT(moetron_linear);
