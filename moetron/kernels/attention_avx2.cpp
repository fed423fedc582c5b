// Causal attention of packed query rows over the paged KV cache (fp32 queries; an fp32 or bf16
// cache, AVX2): moetron's serving attention for prefill chunks and decodes alike.
//
// Each (query token, kv head) item reads its sequence's keys 0..pos straight from the cache blocks
// (no gather copy, no key padding) and computes, for each query head sharing that kv head, scores
// in key order, an exact-max softmax with exp8, and the value sum accumulated in key order. The
// work of an item depends only on its query and the cached keys, never on which other rows share
// the step or how a prompt was chunked: batch-invariant by construction. Items are spread over
// threads whole, so the thread count does not change any bits either.
//
// Legend: T query rows, H query heads, G kv heads, r = H / G, d head_dim, S block size,
// N cache blocks, B blocks in a sequence's table, P keys attended (pos + 1).
#include <stdint.h>

#include <vector>

#include "attention_item.h"
#include "export.h"
#include "quant_blocks.h"

using namespace moetron;

namespace {

template <typename C>
void paged_attention(const float* q, int64_t ldq_t, int64_t ldq_h, const C* k_cache, const C* v_cache,
                     const int64_t* block_tables, int64_t max_blocks, const int64_t* seq_of_row,
                     const int64_t* pos_of_row, float* out, int64_t T, int64_t H, int64_t G, int64_t d, int64_t S,
                     float scale, int num_threads) {
    const int64_t r = H / G;
    const int64_t items = T * G;
    if (num_threads > items) num_threads = static_cast<int>(items);
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
    {
        std::vector<float> scratch;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; ++item) {
            const int64_t t = item / G, g = item % G;
            attend_item(q + t * ldq_t + g * r * ldq_h, ldq_h, k_cache, v_cache,
                        block_tables + seq_of_row[t] * max_blocks, pos_of_row[t] + 1, g, r, G, d, S,
                        scale, out + (t * H + g * r) * d, scratch);
        }
    }
}

}  // namespace

extern "C" {

// q: [T, H, d] with row stride ldq_t and head stride ldq_h (d contiguous); caches [N, S, G, d]
// contiguous, fp32 (cache_format 0) or bf16 (30); block_tables [num_seqs, B]; seq_of_row /
// pos_of_row [T]; out [T, H, d] contiguous.
void moetron_paged_attention(const float* q, int64_t ldq_t, int64_t ldq_h, const void* k_cache, const void* v_cache,
                             int cache_format, const int64_t* block_tables, int64_t max_blocks,
                             const int64_t* seq_of_row, const int64_t* pos_of_row, float* out, int64_t T, int64_t H,
                             int64_t G, int64_t d, int64_t S, float scale, int num_threads) {
    if (cache_format == BF16)
        paged_attention(q, ldq_t, ldq_h, static_cast<const bf16*>(k_cache), static_cast<const bf16*>(v_cache),
                        block_tables, max_blocks, seq_of_row, pos_of_row, out, T, H, G, d, S, scale, num_threads);
    else
        paged_attention(q, ldq_t, ldq_h, static_cast<const float*>(k_cache), static_cast<const float*>(v_cache),
                        block_tables, max_blocks, seq_of_row, pos_of_row, out, T, H, G, d, S, scale, num_threads);
}

}  // extern "C"

MOETRON_EXPORT(moetron_paged_attention);
