// The "dequantize once + cuBLAS INT8" route (qserve_lite/kernels/cuda/cublas.py): unpack a QServe packed W4
// weight to row-major int8 once, let cuBLAS gemmEx multiply it (int32 accumulators), then apply the W4 / W8
// epilogues of gemm.cu to those accumulators. No configuration macros.
#include "common.cuh"
#include "w4.cuh"

// QServe packed W4 [N/32][K/32][32 lanes][16 bytes] -> row-major int8 [N][K]: per-channel codes (0..15) or,
// with s2s/s2z (g128), the level-1 weights codes * s2 - z. One thread per lane of a packed tile.
extern "C" __global__ void qs_w4_to_int8(const uint4* __restrict__ W, const u8* __restrict__ s2s,
                                         const u8* __restrict__ s2z, s8* __restrict__ out, int N, int K) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long tiles_k = K / 32;
    if (idx >= (long long)(N / 32) * tiles_k * 32) return;
    const int lane = idx & 31;
    const long long tile = idx >> 5;
    const int nb = tile / tiles_k, kt = tile % tiles_k;
    const uint4 q = W[idx];
    u32 lo[4], hi[4];
    unpack_w4(q, lo, hi);
    const int r = lane >> 2, tq = lane & 3;
    u32 mul[4] = {1, 1, 1, 1}, add[4] = {0, 0, 0, 0};
    if (s2s) {
        const long long off = (long long)(kt * 32 / 128) * N + nb * 32 + 4 * r;
        g128_params(*reinterpret_cast<const u32*>(s2s + off), *reinterpret_cast<const u32*>(s2z + off), mul, add);
    }
    for (int i = 0; i < 4; ++i) {  // word i = 2c + b: channels 8b + r (low) and 16 + 8b + r (high)
        const int b = i & 1, c = i >> 1;
        const int k = kt * 32 + 16 * c + 4 * tq;
        u32 v0 = lo[i], v1 = hi[i];
        if (s2s) {
            v0 = g128_level1(v0, mul[b], add[b]);
            v1 = g128_level1(v1, mul[2 + b], add[2 + b]);
        }
        const long long n_lo = nb * 32 + 8 * b + r, n_hi = n_lo + 16;
        *reinterpret_cast<u32*>(out + n_lo * K + k) = v0;
        *reinterpret_cast<u32*>(out + n_hi * K + k) = v1;
    }
}

// int32 accumulators [M][N] (from cuBLAS) -> fp16 with the W4/W8 epilogues of gemm.cu. mode: 0 per-channel
// (wszero, xsum used), otherwise (fp32(acc) * wscale[n]) * xscale[m]. Grid (ceil(N / 2048), M), 256 threads,
// 8 consecutive channels per thread.
extern "C" __global__ void qs_epilogue_i32(const int* __restrict__ acc, const u16* __restrict__ wscale,
                                           const u16* __restrict__ wszero, const u16* __restrict__ xscale,
                                           const float* __restrict__ xsum, const u16* __restrict__ bias,
                                           u16* __restrict__ Y, int M, int N, int mode) {
    const int m = blockIdx.y;
    const int n0 = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (n0 >= N) return;
    const long long row = (long long)m * N;
    const float sx = h2f(xscale[m]);
    const float xs = mode == 0 ? xsum[m] : 0.0f;
    int a[8];
    const bool vec = (N % 8 == 0);
    if (vec) {
        const int4 v0 = *reinterpret_cast<const int4*>(acc + row + n0);
        const int4 v1 = *reinterpret_cast<const int4*>(acc + row + n0 + 4);
        a[0] = v0.x; a[1] = v0.y; a[2] = v0.z; a[3] = v0.w; a[4] = v1.x; a[5] = v1.y; a[6] = v1.z; a[7] = v1.w;
    } else {
        for (int e = 0; e < 8; ++e) a[e] = n0 + e < N ? acc[row + n0 + e] : 0;
    }
    u16 o[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        const int n = min(n0 + e, N - 1);
        float v = fmul_rn(fmul_rn(i2f_rn(a[e]), h2f(wscale[n])), sx);
        if (mode == 0) v = fsub_rn(v, fmul_rn(h2f(wszero[n]), xs));
        o[e] = f2h(v);
        if (bias) o[e] = f2h(fadd_rn(h2f(o[e]), h2f(bias[n])));
    }
    if (vec) {
        *reinterpret_cast<uint4*>(Y + row + n0) =
            make_uint4(o[0] | ((u32)o[1] << 16), o[2] | ((u32)o[3] << 16), o[4] | ((u32)o[5] << 16),
                       o[6] | ((u32)o[7] << 16));
    } else {
        for (int e = 0; e < 8 && n0 + e < N; ++e) Y[row + n0 + e] = o[e];
    }
}
