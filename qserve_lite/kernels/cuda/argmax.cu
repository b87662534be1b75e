// Row-wise argmax of fp32 logits; kernels/argmax.py is the spec (numpy.argmax: lowest index on ties,
// -0.0 == +0.0, the first NaN wins over every number).
//
// qs_argmax: grid (rows, splits), QS_AM_THREADS threads; block (r, s) scans columns [s * chunk, s * chunk +
// chunk) of row r (chunk a multiple of 4). Each thread keeps its best (value, index) over its columns in
// increasing order (strict >: the first occurrence), then the block takes the largest 64-bit key
//     key(v) << 32 | (0xFFFFFFFF - index),  key: order-preserving map of fp32 to u32, NaN -> 0xFFFFFFFF, -0 -> +0
// so the largest value wins and, among equal values, the lowest index. One split: the index goes to out[r];
// several: the key goes to partial[r * splits + s] and qs_argmax_combine (a warp per row) reduces them.
//   QS_VEC  1: rows 16-byte aligned, n % 4 == 0 (float4 loads); 0: scalar loads
#include "common.cuh"

#ifndef QS_AM_THREADS
#define QS_AM_THREADS 512
#endif
#ifndef QS_VEC
#define QS_VEC 1
#endif

namespace {

constexpr int THREADS = QS_AM_THREADS;
static_assert(THREADS % 32 == 0 && THREADS <= 1024, "threads: a multiple of 32, at most 1024");

__device__ __forceinline__ u64 argmax_key(float v, int idx) {
    u32 bits;
    asm("mov.b32 %0, %1;" : "=r"(bits) : "f"(v));
    u32 key = bits ^ ((u32)((int)bits >> 31) | 0x80000000u);
    if (v != v) key = 0xFFFFFFFFu;
    if (v == 0.0f) key = 0x80000000u;
    return ((u64)key << 32) | (u64)(0xFFFFFFFFu - (u32)idx);
}
__device__ __forceinline__ u64 warp_max_u64(u64 k) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const u64 other = __shfl_xor_sync(0xffffffffu, k, o);
        k = other > k ? other : k;
    }
    return k;
}
// Strictly greater, or the first NaN over a number (nothing replaces a NaN).
__device__ __forceinline__ void take(float v, int i, float& best, int& bi) {
    if (v > best || (v != v && best == best)) {
        best = v;
        bi = i;
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS) qs_argmax(const float* __restrict__ x, long long ldx, int n,
                                                                int chunk, u64* __restrict__ partial,
                                                                int* __restrict__ out) {
    __shared__ u64 red[32];
    const int row = blockIdx.x, tid = threadIdx.x;
    const int begin = blockIdx.y * chunk;
    const int end = min(n, begin + chunk);
    const float* xr = x + (long long)row * ldx;
    float best;
    asm("mov.b32 %0, 0xff800000;" : "=f"(best));  // -inf
    int bi = -1;
#if QS_VEC
    constexpr int STEP = 4 * THREADS;
    const int first = begin + 4 * tid;
    int i = first;
    for (; i + 3 * STEP < end; i += 4 * STEP) {
        float4 a[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) a[u] = *reinterpret_cast<const float4*>(xr + i + u * STEP);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            take(a[u].x, i + u * STEP, best, bi);
            take(a[u].y, i + u * STEP + 1, best, bi);
            take(a[u].z, i + u * STEP + 2, best, bi);
            take(a[u].w, i + u * STEP + 3, best, bi);
        }
    }
    for (; i < end; i += STEP) {
        const float4 a = *reinterpret_cast<const float4*>(xr + i);
        take(a.x, i, best, bi);
        take(a.y, i + 1, best, bi);
        take(a.z, i + 2, best, bi);
        take(a.w, i + 3, best, bi);
    }
#else
    constexpr int STEP = THREADS;
    const int first = begin + tid;
    int i = first;
    for (; i + 3 * STEP < end; i += 4 * STEP) {
        float a[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) a[u] = xr[i + u * STEP];
#pragma unroll
        for (int u = 0; u < 4; ++u) take(a[u], i + u * STEP, best, bi);
    }
    for (; i < end; i += STEP) take(xr[i], i, best, bi);
#endif
    if (bi < 0 && first < end) bi = first;  // every element -inf: the first
    u64 key = bi < 0 ? 0ull : argmax_key(best, bi);
    key = warp_max_u64(key);
    const int lane = tid & 31, warp = tid >> 5;
    if (lane == 0) red[warp] = key;
    __syncthreads();
    if (warp == 0) {
        key = lane < THREADS / 32 ? red[lane] : 0ull;
        key = warp_max_u64(key);
        if (lane == 0) {
            if (gridDim.y == 1) {
                out[row] = (int)(0xFFFFFFFFu - (u32)key);
            } else {
                partial[(long long)row * gridDim.y + blockIdx.y] = key;
            }
        }
    }
}

extern "C" __global__ void qs_argmax_combine(const u64* __restrict__ partial, int splits, int* __restrict__ out,
                                             int rows) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    u64 key = 0;
    for (int s = lane; s < splits; s += 32) {
        const u64 k = partial[(long long)row * splits + s];
        key = k > key ? k : key;
    }
    key = warp_max_u64(key);
    if (lane == 0) out[row] = (int)(0xFFFFFFFFu - (u32)key);
}
