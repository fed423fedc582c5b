// A weight matrix of any format the kernels take (fp32, bf16, GGML's Q8_0 / Q4_0 / Q4_K / Q5_K / Q6_K), and the
// matmul over a chunk of its rows, dispatched on the format. The layer kernels (layer_avx2.cpp,
// moe_avx2.cpp) are written once against this; the format is a run-time code per tensor, so a
// GGUF file's mix of formats (llama.cpp keeps the router in F32) needs no entry point per combination.
//
// Legend: M rows of x, K input width, N output width (rows of w).
#pragma once
#include <stdint.h>

#include "linear_tiles.h"
#include "quant_blocks.h"
#include "quant_tiles.h"

namespace moetron {

struct Weight {
    const void* data;
    int format;  // a Format code

    // Elements per block and bytes per block of the format.
    static int64_t block_elements(int format) {
        switch (format) {
            case Q4_K: case Q5_K: case Q6_K: case Q4_K_R8: case Q5_K_R8: case Q6_K_R8: return 256;
            case Q8_0: case Q4_0: case Q8_0_R8: case Q4_0_R8: return 32;
            default: return 1;
        }
    }
    static int64_t block_bytes(int format) {
        switch (format) {
            case F32: return 4;
            case BF16: return 2;
            case Q8_0: case Q8_0_R8: return sizeof(BlockQ8_0);
            case Q4_0: case Q4_0_R8: return sizeof(BlockQ4_0);
            case Q5_K: case Q5_K_R8: return sizeof(BlockQ5_K);
            case Q6_K: case Q6_K_R8: return sizeof(BlockQ6_K);
            default: return sizeof(BlockQ4_K);
        }
    }
    // The weight `elements` further on in row-major order (a whole number of blocks: row offsets).
    Weight operator+(int64_t elements) const {
        const int64_t bytes = elements / block_elements(format) * block_bytes(format);
        return {static_cast<const char*>(data) + bytes, format};
    }
};

// out[0:M, n0:n1] = x[0:M] @ w[n0:n1].T. ldw is w's row stride in elements; quantized weights
// have contiguous rows (ldw == K), and r8 ones chunks that start and end on multiples of 8 rows
// (chunk_rows gives multiples of 24; a matrix's row count is a multiple of 8 in that layout).
inline void linear_chunk(const float* x, int64_t ldx, Weight w, int64_t ldw, float* out, int64_t ldo, int64_t M,
                         int64_t K, int64_t n0, int64_t n1) {
    switch (w.format) {
        case F32: return linear_chunk(x, ldx, static_cast<const float*>(w.data), ldw, out, ldo, M, K, n0, n1);
        case BF16: return linear_chunk(x, ldx, static_cast<const bf16*>(w.data), ldw, out, ldo, M, K, n0, n1);
        case Q8_0: return quant_linear_chunk(x, ldx, static_cast<const BlockQ8_0*>(w.data), out, ldo, M, K, n0, n1);
        case Q4_0: return quant_linear_chunk(x, ldx, static_cast<const BlockQ4_0*>(w.data), out, ldo, M, K, n0, n1);
        case Q4_K: return quant_linear_chunk(x, ldx, static_cast<const BlockQ4_K*>(w.data), out, ldo, M, K, n0, n1);
        case Q5_K: return quant_linear_chunk(x, ldx, static_cast<const BlockQ5_K*>(w.data), out, ldo, M, K, n0, n1);
        case Q6_K: return quant_linear_chunk(x, ldx, static_cast<const BlockQ6_K*>(w.data), out, ldo, M, K, n0, n1);
        case Q8_0_R8:
            return quant_linear_chunk_r8(x, ldx, static_cast<const BlockQ8_0x8*>(w.data), out, ldo, M, K, n0, n1);
        case Q4_0_R8:
            return quant_linear_chunk_r8(x, ldx, static_cast<const BlockQ4_0x8*>(w.data), out, ldo, M, K, n0, n1);
        case Q4_K_R8:
            return quant_linear_chunk_r8(x, ldx, static_cast<const BlockQ4_Kx8*>(w.data), out, ldo, M, K, n0, n1);
        case Q5_K_R8:
            return quant_linear_chunk_r8(x, ldx, static_cast<const BlockQ5_Kx8*>(w.data), out, ldo, M, K, n0, n1);
        case Q6_K_R8:
            return quant_linear_chunk_r8(x, ldx, static_cast<const BlockQ6_Kx8*>(w.data), out, ldo, M, K, n0, n1);
    }
}

}  // namespace moetron
