// GPTQ's column loop over one block of columns, every output channel at once; kernels/gptq.py is the spec
// (gptq_block_reference: the same float64 operations in the same order, so the results are bit-identical).
//
// qs_gptq_block: one thread per output channel r (row of the weight), QS_GPTQ_THREADS per block, 1-D grid,
// nb <= QS_GPTQ_MAX_NB (each thread keeps its errors in shared memory). For the block's columns
// j = 0 .. nb-1 in order, with e_i the scaled error of column i:
//     v   = w[j][r] - hb[0][j] * e_0 - hb[1][j] * e_1 - ... - hb[j-1][j] * e_{j-1}   (left to right)
//     q   = quantize_j(v)                      (the column's fixed parameters, below)
//     e_j = (v - q) / hb[j][j]
// writing q to qt[j][r] and e_j to err[j][r]. Every step is one IEEE operation rounded to nearest (no FMA
// contraction): this is the sequential GPTQ update (each column's error fed to all later columns in turn).
// hb: the block's rows of the upper Cholesky factor of H^-1 (row stride ldh); w, qt, err: [nb][n] float64
// with row stride n. Quantizers (QS_GPTQ_KIND), rint rounding half to even:
//   0 W4 per-channel: clip(rint((v + z[r]) / s[r]), 0, 15) * s[r] - z[r]                 (p0 = s, p1 = z)
//   1 W4 progressive: u = clip(v / s1[r], -protect, protect);
//                     q = clip(rint((u + z[r][g]) / s2[r][g]), 0, 15); (q * s2[r][g] - z[r][g]) * s1[r]
//                     g = gidx[j], s2 and z [n][groups]                          (p0 = s1, p1 = s2, p2 = z)
//   2 W8 per-channel: clip(rint(v / s[r]), -127, 127) * s[r]                                 (p0 = s)
#ifndef QS_GPTQ_KIND
#define QS_GPTQ_KIND 1
#endif
#ifndef QS_GPTQ_THREADS
#define QS_GPTQ_THREADS 32
#endif
#ifndef QS_GPTQ_MAX_NB
#define QS_GPTQ_MAX_NB 128
#endif

namespace {

__device__ __forceinline__ double clampd(double x, double lo, double hi) { return fmin(fmax(x, lo), hi); }

__device__ __forceinline__ double quantize(double v, int r, int g, const double* __restrict__ p0,
                                           const double* __restrict__ p1, const double* __restrict__ p2,
                                           int groups, double protect) {
#if QS_GPTQ_KIND == 0
    const double s = p0[r], z = p1[r];
    const double q = clampd(rint(__ddiv_rn(__dadd_rn(v, z), s)), 0.0, 15.0);
    return __dsub_rn(__dmul_rn(q, s), z);
#elif QS_GPTQ_KIND == 1
    const double s1 = p0[r];
    const long long rg = (long long)r * groups + g;
    const double s2 = p1[rg], z = p2[rg];
    const double u = clampd(__ddiv_rn(v, s1), -protect, protect);
    const double q = clampd(rint(__ddiv_rn(__dadd_rn(u, z), s2)), 0.0, 15.0);
    return __dmul_rn(__dsub_rn(__dmul_rn(q, s2), z), s1);
#else
    const double s = p0[r];
    return __dmul_rn(clampd(rint(__ddiv_rn(v, s)), -127.0, 127.0), s);
#endif
}

}  // namespace

extern "C" __global__ void __launch_bounds__(QS_GPTQ_THREADS)
qs_gptq_block(const double* __restrict__ w, const double* __restrict__ hb, long long ldh, int nb, int n,
              double* __restrict__ qt, double* __restrict__ err, const double* __restrict__ p0,
              const double* __restrict__ p1, const double* __restrict__ p2, const int* __restrict__ gidx,
              int groups, double protect) {
    __shared__ double e[QS_GPTQ_MAX_NB][QS_GPTQ_THREADS];  // this block's channels' errors, column by column
    const int t = threadIdx.x;
    const int r = blockIdx.x * QS_GPTQ_THREADS + t;
    if (r >= n) return;  // no block-wide synchronisation below: each thread reads only its own errors
    for (int j = 0; j < nb; ++j) {
        double v = w[(long long)j * n + r];
        for (int i = 0; i < j; ++i)  // hb: one address per warp (a broadcast)
            v = __dsub_rn(v, __dmul_rn(hb[(long long)i * ldh + j], e[i][t]));
        const double q = quantize(v, r, QS_GPTQ_KIND == 1 ? gidx[j] : 0, p0, p1, p2, groups, protect);
        const double ej = __ddiv_rn(__dsub_rn(v, q), hb[(long long)j * ldh + j]);
        e[j][t] = ej;
        qt[(long long)j * n + r] = q;
        err[(long long)j * n + r] = ej;
    }
}
