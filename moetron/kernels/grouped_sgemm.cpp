// Independent groups of fp32 matmuls (a MoE layer's per-expert products in CPU training) spread
// over the threads whole: each group runs on one thread, its products in order (a later one may
// add into an earlier one's output), each product one call of the BLAS sgemm torch itself uses,
// single-threaded there. torch runs the same products one at a time, each split over all threads:
// at an expert's 100-300 rows of 512 x 512 that split costs a fifth of the time (2 cores, AVX2
// EPYC: 16 x [128, 512] x [512, 512] at 104 GFLOP/s as torch.mm calls, 127 this way; 64 x
// [32, 512] x [512, 128] at 56 and 73).
//
// The BLAS is reached through pointers cpu_kernels.py takes from torch's own library (MKL's
// Fortran sgemm_ and MKL_Set_Num_Threads_Local), so there is no BLAS of ours to build or match.
// Which group runs on which thread is the caller's choice (a fixed function of the sizes), and
// every product runs on one thread: its bits are MKL's single-threaded ones whatever the schedule
// or the thread count (MKL's multi-threaded bits can differ at small shapes: 9 x 16 x 24 did).
#include <omp.h>
#include <stdint.h>

#include "export.h"

namespace {

using Sgemm = void (*)(const char* trans_a, const char* trans_b, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);
using SetLocalThreads = int (*)(int);

// A product's BLAS arguments (column-major, as sgemm_ takes them): trans_a, trans_b ('N' or 'T'),
// m, n, k, lda, ldb, ldc, accumulate (beta 1, else 0).
constexpr int64_t FIELDS = 9;

void run(Sgemm sgemm, const int64_t* f, const void* const* p) {
    const char trans_a = static_cast<char>(f[0]), trans_b = static_cast<char>(f[1]);
    // The integers live in 64-bit slots: an LP64 MKL (torch's x86 wheels) reads the low 4 bytes of
    // each, which on x86 (little-endian) hold the value; an ILP64 build would read all 8. So either
    // integer width gets the right values, not garbage upper halves.
    const int64_t m = f[2], n = f[3], k = f[4], lda = f[5], ldb = f[6], ldc = f[7];
    const auto arg = [](const int64_t& x) { return reinterpret_cast<const int*>(&x); };
    const float alpha = 1.0f, beta = f[8] ? 1.0f : 0.0f;
    sgemm(&trans_a, &trans_b, arg(m), arg(n), arg(k), &alpha, static_cast<const float*>(p[0]), arg(lda),
          static_cast<const float*>(p[1]), arg(ldb), &beta, static_cast<float*>(const_cast<void*>(p[2])), arg(ldc));
}

}  // namespace

extern "C" {

// Product i: fields[FIELDS * i ...] and pointers a, b, c at pointers[3 * i ...]. Group g holds
// products group_ends[g - 1] (0 for g = 0) up to group_ends[g] and runs on thread thread_of[g]
// (< num_threads) (thread_of[g] modulo the team's size should OpenMP give fewer threads); a
// thread runs its groups in index order.
void moetron_grouped_sgemm(void* sgemm, void* set_local_threads, const int64_t* fields, const void* const* pointers,
                           const int64_t* group_ends, const int64_t* thread_of, int64_t num_groups, int num_threads) {
    const Sgemm gemm = reinterpret_cast<Sgemm>(sgemm);
    const SetLocalThreads set_local = reinterpret_cast<SetLocalThreads>(set_local_threads);
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
    {
        const int tid = omp_get_thread_num(), team = omp_get_num_threads();
        const int previous = set_local(1);
        for (int64_t g = 0; g < num_groups; ++g) {
            if (thread_of[g] % team != tid) continue;
            for (int64_t i = g ? group_ends[g - 1] : 0; i < group_ends[g]; ++i)
                run(gemm, fields + FIELDS * i, pointers + 3 * i);
        }
        set_local(previous);
    }
}

}  // extern "C"

MOETRON_EXPORT(moetron_grouped_sgemm);
