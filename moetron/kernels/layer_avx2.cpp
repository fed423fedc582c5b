// The two halves of a decoder layer as one call each (fp32 activations, AVX2): the serving engine's
// fused path, over weights in any format of weights.h.
//
//   attention block: h += wo(attention(rope(wq, wk, wv (rmsnorm(h)))))  (keys/values into the cache)
//   MoE block:       h += experts(router(rmsnorm(h)))                    (counts per expert added)
//
// A decode step of a small model is otherwise dominated by Python: ~40 kernel and ~300 tensor-op
// calls per step, each costing microseconds of dispatch, against ~10 ms of weight streaming. Here a
// layer is two calls, each one OpenMP region whose phases (norm, projections, rope + cache write,
// attention, output projection) are split by barriers. The arithmetic is that of the separate
// kernels (linear_tiles.h, attention_item.h, moe_experts), so every token's numbers stay independent
// of the rest of the batch; rope and the residual adds are the model's own formulas, op for op.
//
// Legend: T tokens, D width, H query heads, G kv heads, d head_dim, S block size, E experts,
// K experts per token, I expert width.
#include <math.h>
#include <stdint.h>

#include <memory>
#include <type_traits>
#include <vector>

#include "attention_item.h"
#include "export.h"
#include "moe.h"

using namespace moetron;

extern "C" void moetron_linear(const float* x, int64_t ldx, const void* w, int format, int64_t ldw, float* out,
                               int64_t ldo, int64_t M, int64_t K, int64_t N, int num_threads);  // linear_avx2.cpp

namespace {

struct Projection {
    Weight w;
    float* out;
    int64_t ldo, n0, n1;
};

void add_chunks(std::vector<Projection>& items, Weight w, float* out, int64_t num_out, int64_t K) {
    const int64_t rows = chunk_rows(K);
    for (int64_t n0 = 0; n0 < num_out; n0 += rows)
        items.push_back({w, out, num_out, n0, n0 + rows < num_out ? n0 + rows : num_out});
}

// RoPE on `heads` rows of d in place, as the model computes it: x * cos + rotate_half(x) * sin with
// rotate_half(x) = cat(-x[half:], x[:half]) (a product, then a sum, each rounded: no FMA).
void rope_rows(float* x, int64_t heads, int64_t d, const float* cos, const float* sin, float* tmp) {
    const int64_t half = d / 2, upper = d - half;
    for (int64_t h = 0; h < heads; ++h) {
        float* row = x + h * d;
        for (int64_t i = 0; i < d; ++i) tmp[i] = row[i];
        for (int64_t i = 0; i < d; ++i) {
            const float rotated = i < upper ? -tmp[half + i] : tmp[i - upper];
            const float a = tmp[i] * cos[i];
            const float b = rotated * sin[i];
            row[i] = a + b;
        }
    }
}

// h [T, D] is updated in place. wq [H*d, D], wk / wv [G*d, D], wo [D, H*d]; cos / sin [T, d];
// caches [N, S, G, d]; slots [T] (cache row of each token); block_tables [Q, B]; seq_of_row,
// pos_of_row [T]: as moetron_paged_attention_f32.
template <typename C>  // the cache's element type: float, or bf16 (each value rounded as torch rounds it)
void attention_block(float* h, const float* norm_w, float eps, Weight wq, Weight wk, Weight wv, Weight wo,
                     const float* cos, const float* sin, C* k_cache, C* v_cache, const int64_t* slots,
                     const int64_t* block_tables, int64_t max_blocks, const int64_t* seq_of_row,
                     const int64_t* pos_of_row, int64_t T, int64_t D, int64_t H, int64_t G, int64_t d, int64_t S,
                     float scale, int num_threads, float* heads_out = nullptr) {
    const int64_t HD = H * d, GD = G * d, r = H / G;
    std::unique_ptr<float[]> xn(new float[T * D]), q(new float[T * HD]), k(new float[T * GD]),
        v(new float[T * GD]), att_buffer(heads_out ? nullptr : new float[T * HD]), o(new float[T * D]);
    float* const att_rows = heads_out ? heads_out : att_buffer.get();
    std::vector<Projection> qkv, out_proj;
    add_chunks(qkv, wq, q.get(), HD, D);
    add_chunks(qkv, wk, k.get(), GD, D);
    add_chunks(qkv, wv, v.get(), GD, D);
    if (!heads_out) add_chunks(out_proj, wo, o.get(), D, HD);
    const int64_t num_qkv = static_cast<int64_t>(qkv.size()), num_out = static_cast<int64_t>(out_proj.size());
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
    {
        std::vector<float> scratch, tmp(d);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; ++t) rms_norm_row(h + t * D, norm_w, xn.get() + t * D, D, eps);
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < num_qkv; ++c) {
            const Projection& p = qkv[c];
            linear_chunk(xn.get(), D, p.w, D, p.out, p.ldo, T, D, p.n0, p.n1);
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; ++t) {
            rope_rows(q.get() + t * HD, H, d, cos + t * d, sin + t * d, tmp.data());
            rope_rows(k.get() + t * GD, G, d, cos + t * d, sin + t * d, tmp.data());
            C* k_row = k_cache + slots[t] * GD;
            C* v_row = v_cache + slots[t] * GD;
            for (int64_t i = 0; i < GD; ++i) {
                if constexpr (std::is_same_v<C, float>) {
                    k_row[i] = k[t * GD + i];
                    v_row[i] = v[t * GD + i];
                } else {
                    k_row[i] = to_bf16(k[t * GD + i]);
                    v_row[i] = to_bf16(v[t * GD + i]);
                }
            }
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < T * G; ++item) {
            const int64_t t = item / G, g = item % G;
            attend_item(q.get() + t * HD + g * r * d, d, k_cache, v_cache, block_tables + seq_of_row[t] * max_blocks,
                        pos_of_row[t] + 1, g, r, G, d, S, scale, att_rows + t * HD + g * r * d, scratch);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < num_out; ++c) {
            const Projection& p = out_proj[c];
            linear_chunk(att_rows, HD, p.w, HD, p.out, p.ldo, T, HD, p.n0, p.n1);
            for (int64_t t = 0; t < T; ++t)
                for (int64_t n = p.n0; n < p.n1; ++n) h[t * D + n] = h[t * D + n] + o[t * D + n];
        }
    }
}

// The router of the MoE block: xn = rmsnorm(h) [T, D], and each token's K experts (ids [T, K]) and
// weights [T, K]; counts [E] int64 is added to (the layer's tokens_per_expert). gate [E, D]; bias [E]
// fp32 (the router's selection bias). As the model's router: fp32 softmax over E, top-K by
// probability + bias (lower expert first on ties), weighted by the unbiased probabilities,
// renormalised over the K when `normalize`. A zero bias chooses exactly as the probabilities alone
// (p + 0.0f == p).
void route(const float* h, const float* norm_w, float eps, Weight gate, const float* bias, int64_t K,
           int normalize, float* xn, int64_t* ids, float* weights, int64_t* counts, int64_t T, int64_t D,
           int64_t E, int num_threads) {
    std::unique_ptr<float[]> logits(new float[T * E]);
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
    {
        std::vector<float> probs(E), scores(E);
        std::vector<char> taken(E);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; ++t) {
            rms_norm_row(h + t * D, norm_w, xn + t * D, D, eps);
            linear_chunk(xn + t * D, D, gate, D, logits.get() + t * E, E, 1, D, 0, E);
            const float* l = logits.get() + t * E;
            float top = l[0];
            for (int64_t e = 1; e < E; ++e) top = l[e] > top ? l[e] : top;
            float sum = 0.0f;
            for (int64_t e = 0; e < E; ++e) sum += (probs[e] = expf(l[e] - top));
            for (int64_t e = 0; e < E; ++e) probs[e] /= sum;
            for (int64_t e = 0; e < E; ++e) scores[e] = probs[e] + bias[e];
            for (int64_t e = 0; e < E; ++e) taken[e] = 0;
            float chosen = 0.0f;
            for (int64_t j = 0; j < K; ++j) {
                int64_t best = -1;
                for (int64_t e = 0; e < E; ++e)
                    if (!taken[e] && (best < 0 || scores[e] > scores[best])) best = e;
                taken[best] = 1;
                ids[t * K + j] = best;
                weights[t * K + j] = probs[best];
                chosen += probs[best];
            }
            if (normalize)
                for (int64_t j = 0; j < K; ++j) weights[t * K + j] /= chosen;
        }
    }
    for (int64_t p = 0; p < T * K; ++p) ++counts[ids[p]];
}

// h [T, D] is updated in place: h += experts(route(h)). w1 / w3 [E, I, D], w2 [E, D, I]; the rest as
// route's.
void moe_block(float* h, const float* norm_w, float eps, Weight gate, const float* bias, int64_t K,
               int normalize, Weight w1, Weight w3, Weight w2, int64_t* counts, int64_t T, int64_t D,
               int64_t I, int64_t E, int num_threads) {
    std::unique_ptr<float[]> xn(new float[T * D]), weights(new float[T * K]), out(new float[T * D]);
    std::unique_ptr<int64_t[]> ids(new int64_t[T * K]);
    route(h, norm_w, eps, gate, bias, K, normalize, xn.get(), ids.get(), weights.get(), counts, T, D, E,
          num_threads);
    moe_experts(xn.get(), ids.get(), weights.get(), w1, w3, w2, out.get(), T, K, D, I, E, num_threads);
    for (int64_t i = 0; i < T * D; ++i) h[i] = h[i] + out[i];
}

}  // namespace

extern "C" {

// The entry points: each weight matrix in the format its code names (weights.h); norm weights,
// the router's bias, activations and caches fp32.

// The caches are fp32 (cache_format 0) or bf16 (30).
void moetron_attention_block(float* h, const float* norm_w, float eps, const void* wq, int wq_format,
                             const void* wk, int wk_format, const void* wv, int wv_format, const void* wo,
                             int wo_format, const float* cos, const float* sin, void* k_cache, void* v_cache,
                             int cache_format, const int64_t* slots, const int64_t* block_tables, int64_t max_blocks,
                             const int64_t* seq_of_row, const int64_t* pos_of_row, int64_t T, int64_t D, int64_t H,
                             int64_t G, int64_t d, int64_t S, float scale, int num_threads) {
    if (cache_format == BF16)
        attention_block(h, norm_w, eps, {wq, wq_format}, {wk, wk_format}, {wv, wv_format}, {wo, wo_format}, cos,
                        sin, static_cast<bf16*>(k_cache), static_cast<bf16*>(v_cache), slots, block_tables, max_blocks,
                        seq_of_row, pos_of_row, T, D, H, G, d, S, scale, num_threads);
    else
        attention_block(h, norm_w, eps, {wq, wq_format}, {wk, wk_format}, {wv, wv_format}, {wo, wo_format}, cos,
                        sin, static_cast<float*>(k_cache), static_cast<float*>(v_cache), slots, block_tables,
                        max_blocks, seq_of_row, pos_of_row, T, D, H, G, d, S, scale, num_threads);
}

void moetron_moe_block(float* h, const float* norm_w, float eps, const void* gate, int gate_format,
                       const float* bias, int64_t K, int normalize, const void* w1, int w1_format, const void* w3,
                       int w3_format, const void* w2, int w2_format, int64_t* counts, int64_t T, int64_t D,
                       int64_t I, int64_t E, int num_threads) {
    moe_block(h, norm_w, eps, {gate, gate_format}, bias, K, normalize, {w1, w1_format}, {w3, w3_format},
              {w2, w2_format}, counts, T, D, I, E, num_threads);
}

// The attention block of a tensor-parallel rank, in two calls with an all-gather of the heads
// between them. First its H query / G kv heads (wq [H*d, D], wk / wv [G*d, D]: its rows of the
// model's), keys and values into its cache: writes heads [T, H*d] and leaves h alone.
void moetron_attention_heads(const float* h, const float* norm_w, float eps, const void* wq, int wq_format,
                             const void* wk, int wk_format, const void* wv, int wv_format, const float* cos,
                             const float* sin, void* k_cache, void* v_cache, int cache_format, const int64_t* slots,
                             const int64_t* block_tables, int64_t max_blocks, const int64_t* seq_of_row,
                             const int64_t* pos_of_row, float* heads, int64_t T, int64_t D, int64_t H, int64_t G,
                             int64_t d, int64_t S, float scale, int num_threads) {
    float* hh = const_cast<float*>(h);  // read only: with heads given, attention_block writes them, not h
    const Weight none{nullptr, 0};
    if (cache_format == BF16)
        attention_block(hh, norm_w, eps, {wq, wq_format}, {wk, wk_format}, {wv, wv_format}, none, cos, sin,
                        static_cast<bf16*>(k_cache), static_cast<bf16*>(v_cache), slots, block_tables,
                        max_blocks, seq_of_row, pos_of_row, T, D, H, G, d, S, scale, num_threads, heads);
    else
        attention_block(hh, norm_w, eps, {wq, wq_format}, {wk, wk_format}, {wv, wv_format}, none, cos, sin,
                        static_cast<float*>(k_cache), static_cast<float*>(v_cache), slots, block_tables, max_blocks,
                        seq_of_row, pos_of_row, T, D, H, G, d, S, scale, num_threads, heads);
}

// Then h += wo(heads) (wo [D, HD], heads [T, HD]: every rank's, in head order), the attention
// block's last phase op for op.
void moetron_attention_output(float* h, const float* heads, const void* wo, int wo_format, int64_t T, int64_t D,
                              int64_t HD, int num_threads) {
    std::unique_ptr<float[]> o(new float[T * D]);
    std::vector<Projection> out_proj;
    add_chunks(out_proj, {wo, wo_format}, o.get(), D, HD);
    const int64_t num_out = static_cast<int64_t>(out_proj.size());
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1) if (num_threads > 1)
    for (int64_t c = 0; c < num_out; ++c) {
        const Projection& p = out_proj[c];
        linear_chunk(heads, HD, p.w, HD, p.out, p.ldo, T, HD, p.n0, p.n1);
        for (int64_t t = 0; t < T; ++t)
            for (int64_t n = p.n0; n < p.n1; ++n) h[t * D + n] = h[t * D + n] + o[t * D + n];
    }
}

// The MoE block's router alone (expert parallelism runs the experts and the combine apart):
// writes xn [T, D], ids [T, K], weights [T, K]; adds to counts [E].
void moetron_moe_route(const float* h, const float* norm_w, float eps, const void* gate, int gate_format,
                       const float* bias, int64_t K, int normalize, float* xn, int64_t* ids, float* weights,
                       int64_t* counts, int64_t T, int64_t D, int64_t E, int num_threads) {
    route(h, norm_w, eps, {gate, gate_format}, bias, K, normalize, xn, ids, weights, counts, T, D, E, num_threads);
}

}  // extern "C"

// A whole decoder stack in one call: for each layer, its attention block then its MoE block, as the
// two calls above make them (so the same bits), without returning to Python between layers, whose
// per-call cost is a tenth of a small model's decode step. Layer l's weights, caches and constants
// are row l of `fields` (int64: addresses, format codes, sizes) and of `scalars` (float), in the
// orders MOETRON_LAYER_FIELDS / MOETRON_LAYER_SCALARS give: cpu_kernels.py reads those names from
// the library (moetron_layer_fields), so the order is written only here. The step's rows, slots,
// block tables and positions are shared by every layer; RoPE's cos / sin come as the model's
// tables by position [P, d] (fused_layers.py's TabledRotaryEmbedding), indexed here.
#define MOETRON_LAYER_FIELDS(X)                                                                             \
    X(attention_norm) X(wq) X(wq_format) X(wk) X(wk_format) X(wv) X(wv_format) X(wo) X(wo_format)          \
    X(k_cache) X(v_cache) X(cache_format) X(num_heads) X(num_kv_heads) X(head_dim) X(ffn_norm) X(gate)      \
    X(gate_format) X(bias) X(top_k) X(normalize) X(w1) X(w1_format) X(w3) X(w3_format) X(w2) X(w2_format) \
    X(counts) X(hidden) X(num_experts)
#define MOETRON_LAYER_SCALARS(X) X(attention_eps) X(ffn_eps) X(scale)
#define MOETRON_ENUM(name) name,
#define MOETRON_NAME(name) #name " "

namespace field {
enum : int { MOETRON_LAYER_FIELDS(MOETRON_ENUM) count };
}
namespace scalar {
enum : int { MOETRON_LAYER_SCALARS(MOETRON_ENUM) count };
}

extern "C" {

const char* moetron_layer_fields() { return MOETRON_LAYER_FIELDS(MOETRON_NAME); }
const char* moetron_layer_scalars() { return MOETRON_LAYER_SCALARS(MOETRON_NAME); }

void moetron_decoder_layers(float* h, const int64_t* fields, const float* scalars, int64_t num_layers,
                            const float* cos_table, const float* sin_table, int64_t d, const int64_t* slots,
                            const int64_t* block_tables, int64_t max_blocks, const int64_t* seq_of_row,
                            const int64_t* pos_of_row, int64_t T, int64_t D, int64_t S, int num_threads) {
    // Each row's RoPE cos / sin [T, d]: its position's row of the model's tables [P, d].
    std::unique_ptr<float[]> cos(new float[T * d]), sin(new float[T * d]);
    for (int64_t t = 0; t < T; ++t)
        for (int64_t i = 0; i < d; ++i) {
            cos[t * d + i] = cos_table[pos_of_row[t] * d + i];
            sin[t * d + i] = sin_table[pos_of_row[t] * d + i];
        }
    for (int64_t l = 0; l < num_layers; ++l) {
        const int64_t* f = fields + l * field::count;
        const float* s = scalars + l * scalar::count;
        const auto address = [f](int i) { return reinterpret_cast<void*>(f[i]); };
        const auto code = [f](int i) { return static_cast<int>(f[i]); };
        moetron_attention_block(h, static_cast<const float*>(address(field::attention_norm)), s[scalar::attention_eps],
                                address(field::wq), code(field::wq_format), address(field::wk), code(field::wk_format),
                                address(field::wv), code(field::wv_format), address(field::wo), code(field::wo_format),
                                cos.get(), sin.get(), address(field::k_cache), address(field::v_cache), code(field::cache_format),
                                slots, block_tables, max_blocks, seq_of_row, pos_of_row, T, D, f[field::num_heads],
                                f[field::num_kv_heads], f[field::head_dim], S, s[scalar::scale], num_threads);
        moetron_moe_block(h, static_cast<const float*>(address(field::ffn_norm)), s[scalar::ffn_eps],
                          address(field::gate), code(field::gate_format), static_cast<const float*>(address(field::bias)),
                          f[field::top_k], code(field::normalize), address(field::w1), code(field::w1_format),
                          address(field::w3), code(field::w3_format), address(field::w2), code(field::w2_format),
                          static_cast<int64_t*>(address(field::counts)), T, D, f[field::hidden], f[field::num_experts],
                          num_threads);
    }
}

// The head: out [M, V] = w(rmsnorm(h)) for M rows of h (row stride ldh), as the final norm and the
// output projection compute them one call apart (rms_norm_row, then moetron_linear's chunks).
void moetron_logits(const float* h, int64_t ldh, const float* norm_w, float eps, const void* w, int format,
                    float* out, int64_t M, int64_t D, int64_t V, int num_threads) {
    std::unique_ptr<float[]> xn(new float[M * D]);
    for (int64_t m = 0; m < M; ++m) rms_norm_row(h + m * ldh, norm_w, xn.get() + m * D, D, eps);
    moetron_linear(xn.get(), D, w, format, D, out, V, M, D, V, num_threads);
}

}  // extern "C"

MOETRON_EXPORT(moetron_logits);
MOETRON_EXPORT(moetron_attention_block);
MOETRON_EXPORT(moetron_decoder_layers);
MOETRON_EXPORT(moetron_moe_block);
MOETRON_EXPORT(moetron_moe_route);
MOETRON_EXPORT(moetron_attention_heads);
MOETRON_EXPORT(moetron_attention_output);
