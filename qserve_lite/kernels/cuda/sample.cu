// Filtered sampling without a sort; kernels/sample.py is the spec (integer masses, so this kernel and the
// numpy function pick the same token).
//
// qs_sample: one block of QS_SMP_THREADS threads per row, grid (rows). Each pass streams the row's logits
// (x = logit / temperature, rounded once, is recomputed on the fly):
//   1. xmax (block max);
//   2. top-k (0 < k < V): radix select of the k-th largest x, 8 bits of its order-preserving key per pass
//      (counts of the keys that match the digits found so far, in a 256-bin shared histogram);
//   3. top-p (p < 1): the total mass T of the top-k set, then a radix select over the mass values weighted
//      by mass: tau, the mass at which the descending running sum reaches p * T;
//   4. the draw: per 1,024-element tile the sum of the kept masses (a warp per tile), the tile whose running
//      sum reaches u * total, and inside it a block-wide inclusive scan for the first such index.
// Every sum is an exact 64-bit integer; comparisons against p * T and u * total are float64, as in the spec.
#include "common.cuh"

#ifndef QS_SMP_THREADS
#define QS_SMP_THREADS 1024
#endif
#ifndef QS_SMP_MAX_TILES
#define QS_SMP_MAX_TILES 256
#endif

namespace {

constexpr int THREADS = QS_SMP_THREADS;
constexpr int WARPS = THREADS / 32;
constexpr int TILE = THREADS;  // vocabulary entries per tile of the draw (one per thread)
constexpr int MAX_TILES = QS_SMP_MAX_TILES;
static_assert(THREADS == 1024, "the draw's tile is one element per thread of a 1,024-thread block");
typedef unsigned long long u64x;

// Order-preserving u32 of an fp32 (-0 and +0 alike).
__device__ __forceinline__ u32 fkey(float v) {
    u32 b = __float_as_uint(v);
    if (v == 0.0f) b = 0u;
    return b ^ ((u32)((int)b >> 31) | 0x80000000u);
}

__device__ __forceinline__ u32 mass_of(float x, float xmax, const u32* tab) {
    const float a = __fsub_rn(xmax, x);
    const float s = __fmul_rn(__fmul_rn(a, 1.4426950408889634f), 256.0f);
    if (!(s < 8192.0f)) return 0u;  // also -inf inputs (s = inf) and NaN
    const int q = (int)floorf(s);
    return tab[q & 255] >> (q >> 8);
}

__device__ __forceinline__ float block_max(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < WARPS ? red[lane] : NEG_INF;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ u64x warp_sum(u64x v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ u64x block_sum(u64x v, u64x* red) {
    v = warp_sum(v);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < WARPS ? red[lane] : 0ull;
    return warp_sum(v);
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS)
qs_sample(const float* __restrict__ logits, long long ld, int V, const float* __restrict__ temps,
          const int* __restrict__ topk, const double* __restrict__ topp, const float* __restrict__ minp_log,
          const double* __restrict__ uniforms, const u32* __restrict__ table, int* __restrict__ out) {
    __shared__ u32 tab[256];
    __shared__ u64x hist[256];
    __shared__ u64x tiles[MAX_TILES];
    __shared__ u64x red[32];
    __shared__ float fred[32];
    __shared__ u32 s_digit;
    __shared__ u64x s_carry;
    __shared__ int s_first;
    const int row = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const float* lg = logits + (long long)row * ld;
    const float temp = temps[row];
    for (int j = tid; j < 256; j += THREADS) tab[j] = table[j];

    // 1. xmax
    float mx = NEG_INF;
    for (int i = tid; i < V; i += THREADS) mx = fmaxf(mx, __fdiv_rn(lg[i], temp));
    const float xmax = block_max(mx, fred);
    if (!(xmax > NEG_INF)) {  // a row of -inf
        if (tid == 0) out[row] = 0;
        return;
    }

    // 2. top-k: the k-th largest key
    const int k = topk[row];
    const bool use_k = k > 0 && k < V;
    u32 kprefix = 0u, kmask = 0u;
    if (use_k) {
        u64x need = (u64x)k;
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int j = tid; j < 256; j += THREADS) hist[j] = 0ull;
            __syncthreads();
            for (int i = tid; i < V; i += THREADS) {
                const u32 key = fkey(__fdiv_rn(lg[i], temp));
                if ((key & kmask) == kprefix) atomicAdd(&hist[(key >> shift) & 255u], 1ull);
            }
            __syncthreads();
            if (tid == 0) {
                u64x acc = 0ull;
                int d = 255;
                for (; d > 0; --d) {
                    if (acc + hist[d] >= need) break;
                    acc += hist[d];
                }
                s_digit = (u32)d;
                s_carry = need - acc;
            }
            __syncthreads();
            kprefix |= s_digit << shift;
            kmask |= 255u << shift;
            need = s_carry;
        }
    }
    // kprefix: the k-th largest key; a token is in the top-k set when its key is at least that

    // 3. top-p: tau over the top-k set's masses
    const double p = topp[row];
    u32 tau = 0u;
    if (p < 1.0) {
        u64x t = 0ull;
        for (int i = tid; i < V; i += THREADS) {
            const float x = __fdiv_rn(lg[i], temp);
            if (!use_k || fkey(x) >= kprefix) t += mass_of(x, xmax, tab);
        }
        const double target = p * (double)block_sum(t, red);
        u32 prefix = 0u, mask = 0u;
        u64x above = 0ull;
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int j = tid; j < 256; j += THREADS) hist[j] = 0ull;
            __syncthreads();
            for (int i = tid; i < V; i += THREADS) {
                const float x = __fdiv_rn(lg[i], temp);
                if (use_k && fkey(x) < kprefix) continue;
                const u32 m = mass_of(x, xmax, tab);
                if (m != 0u && (m & mask) == prefix) atomicAdd(&hist[(m >> shift) & 255u], (u64x)m);
            }
            __syncthreads();
            if (tid == 0) {
                u64x acc = above;
                int d = 255;
                for (; d > 0; --d) {
                    if ((double)(acc + hist[d]) >= target) break;
                    acc += hist[d];
                }
                s_digit = (u32)d;
                s_carry = acc;
            }
            __syncthreads();
            prefix |= s_digit << shift;
            mask |= 255u << shift;
            above = s_carry;
        }
        tau = prefix;
    }
    const float minthr = __fadd_rn(xmax, minp_log[row]);  // minp_log -inf: min-p off

    // 4. the draw: per-tile sums of the kept masses (a warp per tile, in vocabulary order inside it)
    const int ntiles = (V + TILE - 1) / TILE;
    for (int tile = warp; tile < ntiles; tile += WARPS) {
        u64x s = 0ull;
        for (int j = lane; j < TILE; j += 32) {
            const int i = tile * TILE + j;
            if (i >= V) break;
            const float x = __fdiv_rn(lg[i], temp);
            const u32 m = mass_of(x, xmax, tab);
            const bool keep = (!use_k || fkey(x) >= kprefix) && m >= tau && x >= minthr;
            s += keep ? (u64x)m : 0ull;
        }
        s = warp_sum(s);
        if (lane == 0) tiles[tile] = s;
    }
    __syncthreads();
    if (tid == 0) {
        u64x total = 0ull;
        for (int t = 0; t < ntiles; ++t) total += tiles[t];
        const double target = uniforms[row] * (double)total;
        u64x acc = 0ull;
        int t = 0;
        for (; t < ntiles - 1; ++t) {
            if ((double)(acc + tiles[t]) >= target) break;
            acc += tiles[t];
        }
        s_digit = (u32)t;
        s_carry = acc;
        red[0] = __double_as_longlong(target);
        s_first = V;
    }
    __syncthreads();
    const int tile = (int)s_digit;
    const double target = __longlong_as_double((long long)red[0]);
    const u64x base = s_carry;
    __syncthreads();  // red is reused by the scan below
    const int i = tile * TILE + tid;
    u64x v = 0ull;
    if (i < V) {
        const float x = __fdiv_rn(lg[i], temp);
        const u32 m = mass_of(x, xmax, tab);
        v = ((!use_k || fkey(x) >= kprefix) && m >= tau && x >= minthr) ? (u64x)m : 0ull;
    }
    u64x incl = v;  // inclusive scan inside the warp, then across warps
    for (int o = 1; o < 32; o <<= 1) {
        const u64x y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
    }
    if (lane == 31) red[warp] = incl;
    __syncthreads();
    u64x before = 0ull;
    for (int w = 0; w < warp; ++w) before += red[w];
    const u64x c = base + before + incl;
    if (i < V && v != 0ull && (double)c >= target) atomicMin(&s_first, i);
    __syncthreads();
    if (tid == 0) out[row] = s_first < V ? s_first : V - 1;
}
