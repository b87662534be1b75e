// Per-token (row) kernels of qserve-lite: one block per token, the row held in registers, one pass over
// device memory. Each produces an fp16 row v and optionally its per-token INT8 quantization:
//   QS_ROW_OP 0  v = fp16(x)                                   (x fp16, or fp32 with QS_IN_F32 = 1)
//   QS_ROW_OP 1  r = fp16(fp32(x) + fp32(residual)) (or x), v = fp16((fp32(r) * rstd) * fp32(gamma)),
//                rstd = fp32(1 / sqrt(sum(r^2) / K + eps)) in fp64            (true RMSNorm; r written out)
//   QS_ROW_OP 2  v = fp16(silu(g) * u), silu(g) = g * (1 / (1 + exp(-g))) in fp32, x = [gate | up] of width 2K
// Quantization (kernels/act_quant.py is the spec, bit for bit):
//   scale = fp16(fp32(amax) / 127) (0 -> 1), q = clip(rint(fp32(v) / fp32(scale)), -127, 127),
//   sum = fp32(exact sum of v) (fp64 accumulation: every fp16 is a multiple of 2^-24, so it is exact).
// Every fp32/fp64 step is one IEEE operation rounded to nearest even (inline PTX: no FMA, no flush to
// zero), except in SiLU: CUDA's expf (within 2 ulp) and an approximate reciprocal (1 ulp) instead of an
// IEEE division; SiLU's fp16 product may thus differ from the twin by one fp16 ulp (kernels/act_quant.py).
//   QS_NC     16-byte chunks (8 elements) per thread: the row width is at most 8 * QS_NC * blockDim.x
//   QS_VEC    1: 16-byte aligned rows, K % 8 == 0 (vector loads); 0: element loads with bounds checks
//   QS_PREFETCH  op 1 with QS_VEC: the residual and gamma are loaded before x is used (one memory latency
//                instead of three: x, then the residual, then gamma after the sum of squares)
// ids (or null): row r of the output reads row ids[r] of x (x is then a table, e.g. the embeddings, of
// x_rows rows; ids are clamped to it): a gather fused into the row kernel.
#include "common.cuh"
#include "token_quant.cuh"

#ifndef QS_ROW_OP
#define QS_ROW_OP 1
#endif
#ifndef QS_NC
#define QS_NC 4
#endif
#ifndef QS_VEC
#define QS_VEC 1
#endif
#ifndef QS_IN_F32
#define QS_IN_F32 0
#endif
#ifndef QS_PREFETCH
#define QS_PREFETCH 0
#endif

namespace {

constexpr int NC = QS_NC;

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = dadd_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Block-wide reductions (every thread gets the result). `red` holds 32 slots.
__device__ __forceinline__ float block_max(float v, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : 0.0f;
    return warp_max(v);
}
__device__ __forceinline__ double block_sum(double v, double* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : 0.0;
    return warp_sum(v);
}

#if QS_VEC
__device__ __forceinline__ void unpack8_h(const uint4 q, float (&v)[8]) {
    const u32 w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[2 * i] = h2f((u16)(w[i] & 0xFFFFu));
        v[2 * i + 1] = h2f((u16)(w[i] >> 16));
    }
}
#endif

// Loads 8 consecutive elements [e0, e0 + 8) of a row as fp32 (fp16-exact values); out of range -> 0.
__device__ __forceinline__ void load8_h(const u16* row, int e0, int K, float (&v)[8]) {
#if QS_VEC
    if (e0 < K) {
        unpack8_h(*reinterpret_cast<const uint4*>(row + e0), v);
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = 0.0f;
    }
#else
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = e0 + i < K ? h2f(row[e0 + i]) : 0.0f;
#endif
}
__device__ __forceinline__ void load8_f(const float* row, int e0, int K, float (&v)[8]) {
#if QS_VEC
    if (e0 < K) {
        const float4 a = *reinterpret_cast<const float4*>(row + e0);
        const float4 b = *reinterpret_cast<const float4*>(row + e0 + 4);
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = 0.0f;
    }
#else
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = e0 + i < K ? row[e0 + i] : 0.0f;
#endif
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = h2f(f2h(v[i]));  // the GPU holds activations in fp16
}
__device__ __forceinline__ void store8_h(u16* row, int e0, int K, const float (&v)[8]) {
    if (e0 >= K) return;
#if QS_VEC
    u32 w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = (u32)f2h(v[2 * i]) | ((u32)f2h(v[2 * i + 1]) << 16);
    *reinterpret_cast<uint4*>(row + e0) = make_uint4(w[0], w[1], w[2], w[3]);
#else
#pragma unroll
    for (int i = 0; i < 8; ++i)
        if (e0 + i < K) row[e0 + i] = f2h(v[i]);
#endif
}

}  // namespace

extern "C" __global__ void qs_rows(const void* __restrict__ x, long long ldx,      // input rows (elements)
                                   const int* __restrict__ ids, int x_rows,         // gathered rows or null
                                   const u16* __restrict__ residual, long long ldr, // op 1: residual or null
                                   u16* __restrict__ residual_out, long long ldro,  // op 1: new residual or null
                                   const u16* __restrict__ gamma, double eps,       // op 1
                                   u16* __restrict__ y, long long ldy,              // fp16 v or null
                                   s8* __restrict__ q, long long ldq,               // int8 codes or null
                                   u16* __restrict__ qscale, float* __restrict__ qsum,  // [M] or null
                                   int K) {
    __shared__ float red_f[32];
    __shared__ double red_d[32];
    const long long row = blockIdx.x;
    const long long xrow = ids ? (long long)min(max(ids[row], 0), x_rows - 1) : row;
    float v[NC][8];
#if QS_ROW_OP == 1 && QS_PREFETCH && QS_VEC
    uint4 gamma_raw[NC], res_raw[NC];  // loaded with x, unpacked where they are used
#pragma unroll
    for (int c = 0; c < NC; ++c) {
        const int e0 = 8 * (threadIdx.x + c * blockDim.x);
        const bool in = e0 < K;
        gamma_raw[c] = in ? *reinterpret_cast<const uint4*>(gamma + e0) : make_uint4(0u, 0u, 0u, 0u);
        res_raw[c] = in && residual ? *reinterpret_cast<const uint4*>(residual + row * ldr + e0)
                                    : make_uint4(0u, 0u, 0u, 0u);
    }
#endif

    // ---- v: the fp16 row this kernel quantizes ----
#pragma unroll
    for (int c = 0; c < NC; ++c) {
        const int e0 = 8 * (threadIdx.x + c * blockDim.x);
        if (QS_ROW_OP == 0 && QS_IN_F32) {
            load8_f(reinterpret_cast<const float*>(x) + xrow * ldx, e0, K, v[c]);
        } else if (QS_ROW_OP == 2) {
            float up[8];
            const u16* xr = reinterpret_cast<const u16*>(x) + xrow * ldx;
            load8_h(xr, e0, K, v[c]);
            load8_h(xr + K, e0, K, up);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const float g = v[c][i];
                const float silu = fmul_rn(g, rcp_approx(fadd_rn(1.0f, expf(-g))));
                v[c][i] = h2f(f2h(fmul_rn(silu, up[i])));
            }
        } else {
            load8_h(reinterpret_cast<const u16*>(x) + xrow * ldx, e0, K, v[c]);
        }
    }

    if (QS_ROW_OP == 1) {
        if (residual) {
#pragma unroll
            for (int c = 0; c < NC; ++c) {
                const int e0 = 8 * (threadIdx.x + c * blockDim.x);
                float r[8];
#if QS_PREFETCH && QS_VEC
                (void)e0;
                unpack8_h(res_raw[c], r);
#else
                load8_h(residual + row * ldr, e0, K, r);
#endif
#pragma unroll
                for (int i = 0; i < 8; ++i) v[c][i] = h2f(f2h(fadd_rn(v[c][i], r[i])));
            }
        }
        if (residual_out) {
#pragma unroll
            for (int c = 0; c < NC; ++c) store8_h(residual_out + row * ldro, 8 * (threadIdx.x + c * blockDim.x), K, v[c]);
        }
        double ss = 0.0;
#pragma unroll
        for (int c = 0; c < NC; ++c)
#pragma unroll
            for (int i = 0; i < 8; ++i) ss = dadd_rn(ss, dmul_rn((double)v[c][i], (double)v[c][i]));
        ss = block_sum(ss, red_d);
        const float rstd = (float)ddiv_rn(1.0, dsqrt_rn(dadd_rn(ddiv_rn(ss, (double)K), eps)));
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            float gm[8];
#if QS_PREFETCH && QS_VEC
            unpack8_h(gamma_raw[c], gm);
#else
            load8_h(gamma, 8 * (threadIdx.x + c * blockDim.x), K, gm);
#endif
#pragma unroll
            for (int i = 0; i < 8; ++i) v[c][i] = h2f(f2h(fmul_rn(fmul_rn(v[c][i], rstd), gm[i])));
        }
    }

    if (y) {
#pragma unroll
        for (int c = 0; c < NC; ++c) store8_h(y + row * ldy, 8 * (threadIdx.x + c * blockDim.x), K, v[c]);
    }
    if (!q) return;

    // ---- per-token INT8 quantization of v ----
    float amax = 0.0f;
    double sum = 0.0;
#pragma unroll
    for (int c = 0; c < NC; ++c)
#pragma unroll
        for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[c][i]));
    if (qsum) {
#pragma unroll
        for (int c = 0; c < NC; ++c)
#pragma unroll
            for (int i = 0; i < 8; ++i) sum = dadd_rn(sum, (double)v[c][i]);
    }
    amax = block_max(amax, red_f);
    const u16 scale_h = token_scale(amax);
    const float scale = h2f(scale_h);
    const float rscale = rcp_approx(scale);
    if (qsum) sum = block_sum(sum, red_d);
    if (threadIdx.x == 0) {
        if (qscale) qscale[row] = scale_h;
        if (qsum) qsum[row] = (float)sum;
    }
#pragma unroll
    for (int c = 0; c < NC; ++c) {
        const int e0 = 8 * (threadIdx.x + c * blockDim.x);
        if (e0 >= K) continue;
        u32 packed[2] = {0, 0};
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int qi = max(-127, min(127, quant_code(v[c][i], scale, rscale)));
            packed[i >> 2] |= ((u32)qi & 0xFFu) << (8 * (i & 3));
        }
        s8* qr = q + row * ldq;
#if QS_VEC
        *reinterpret_cast<uint2*>(qr + e0) = make_uint2(packed[0], packed[1]);
#else
        for (int i = 0; i < 8 && e0 + i < K; ++i) qr[e0 + i] = (s8)((packed[i >> 2] >> (8 * (i & 3))) & 0xFFu);
#endif
    }
}
