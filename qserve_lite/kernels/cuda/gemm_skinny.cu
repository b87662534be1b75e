// Skinny W4A8 GEMM for decode (M <= 16 tokens): Y[M, N] = epilogue(X[M, K] . W4[N, K]^T).
//
// At decode sizes the weights are the whole cost, so this kernel streams them straight from global memory
// into registers (one 16-byte load per lane per packed 32 x 32 tile; no shared-memory staging and no
// barrier in the main loop). The few activation bytes are staged once per block in shared memory, permuted
// so that a lane's B fragments for a 128-byte chunk of K (4 k tiles, one g128 group) are 32 contiguous
// bytes: two conflict-free 16-byte loads instead of eight scattered 4-byte ones.
//
// A block owns CB 32-channel blocks of W and its warps form a CB x KW grid: warp (cb, kw) takes chunks
// kw, kw + KW, ... of its channel block, DEPTH chunks per round, the next round's loads in flight while the
// current round is dequantized and multiplied (mma.sync m16n8k32, weights as A, tokens as B). Warps along K
// are reduced in shared memory; blocks of a split-K (gridDim.y > 1) through a workspace, the last block of
// a tile summing the splits in order (counters reset by that block). Epilogues: as cuda/gemm.cu.
//   QS_MODE      0 W4 per-channel, 1 W4 g128
//   QS_SK_NJ     token tiles of 8 (M <= 8 * QS_SK_NJ)
//   QS_SK_CB     32-channel blocks per block          QS_SK_KW  warps along K per channel block
//   QS_SK_DEPTH  chunks of 4 k tiles per warp and round
//   QS_ALIGNED   1: activation rows 16-byte aligned, K % 16 == 0; 0: byte loads
#include "common.cuh"
#include "w4.cuh"

#ifndef QS_MODE
#define QS_MODE 1
#endif
#ifndef QS_SK_NJ
#define QS_SK_NJ 1
#endif
#ifndef QS_SK_CB
#define QS_SK_CB 1
#endif
#ifndef QS_SK_KW
#define QS_SK_KW 8
#endif
#ifndef QS_SK_DEPTH
#define QS_SK_DEPTH 2
#endif
#ifndef QS_ALIGNED
#define QS_ALIGNED 1
#endif

namespace {

constexpr int NJ = QS_SK_NJ;
constexpr int MPAD = 8 * NJ;
constexpr int CB = QS_SK_CB, KW = QS_SK_KW, DEPTH = QS_SK_DEPTH;
constexpr int WARPS = CB * KW;
constexpr int THREADS = 32 * WARPS;
constexpr int FRAG = 2 * NJ * 4;  // accumulator registers per lane
constexpr int TILE_ELEMS = CB * FRAG * 32;  // accumulators of a block
constexpr bool G128 = QS_MODE == 1;

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {  // read-once weights: keep them out of L1
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// Shared-memory activation layout: chunk ch (128 bytes of K), row r, then per lane column t a 32-byte slot
// holding words (i, c) = k tile i of the chunk, bytes 16c + 4t .. + 3 of it; odd rows swap the two 16-byte
// halves of each slot so that the 8 lanes of a load phase (rows g, g + 1) hit distinct bank groups.
__device__ __forceinline__ int xs_offset(int ch, int row, int t, int half) {
    return (ch * MPAD + row) * 128 + t * 32 + ((half ^ (row & 1)) << 4);
}

struct Chunk {
    uint4 q[4];
    u32 s2, z;
};

// Chunk `ch` (relative to the split) of a warp's channel block: 4 packed tiles and their g128 words.
__device__ __forceinline__ void load_chunk(Chunk& c, int ch, int nch, int ntiles, const uint4* wrow, const u8* s2s,
                                           const u8* s2z, long long goff, int N) {
    const bool valid = ch < nch;
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // per-channel K_pad may end inside a chunk
        const bool ok = valid && 4 * ch + i < ntiles;
        c.q[i] = ok ? ld_stream(wrow + (long long)(4 * ch + i) * 32) : make_uint4(0, 0, 0, 0);
    }
    if (G128) {
        const long long off = goff + (long long)ch * N;
        c.s2 = valid ? __ldg(reinterpret_cast<const unsigned int*>(s2s + off)) : 0u;
        c.z = valid ? __ldg(reinterpret_cast<const unsigned int*>(s2z + off)) : 0u;
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS)
qs_gemm_skinny(const u8* __restrict__ X, long long lda, const uint4* __restrict__ W,
               const u8* __restrict__ s2s, const u8* __restrict__ s2z, const u16* __restrict__ wscale,
               const u16* __restrict__ wszero, const u16* __restrict__ xscale, const float* __restrict__ xsum,
               const u16* __restrict__ bias, u16* __restrict__ Y, long long ldy, int M, int N, int KX, int KW_,
               int* __restrict__ ws, int* __restrict__ counters, int chunks_per_split) {
    extern __shared__ __align__(16) u8 xs[];  // [chunks_per_split][MPAD][128] activations, then reductions
    __shared__ int s_last;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int cb = warp % CB, kw = warp / CB;
    const int nblk = blockIdx.x * CB + cb;  // this warp's 32-channel block
    const int split = blockIdx.y, nsplit = gridDim.y;
    const int tiles = KW_ / 32;
    const int chunks_total = (tiles + 3) / 4;
    const int c0 = split * chunks_per_split;
    const int nch = max(0, min(chunks_total, c0 + chunks_per_split) - c0);
    const int g = lane >> 2, t = lane & 3;
    const bool chan_ok = nblk * 32 < N;

    int acc[2][NJ][4];
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int j = 0; j < NJ; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[h][j][r] = 0;

    // Epilogue parameters of the block's channels and tokens, staged now so that their latency hides under
    // the main loop (the barrier after the activation staging publishes them).
    __shared__ float p_ws[CB * 32], p_zs[CB * 32], p_bias[CB * 32], p_xs[MPAD], p_sum[MPAD];
    for (int i = threadIdx.x; i < CB * 32; i += THREADS) {
        const int n = blockIdx.x * CB * 32 + i;
        const bool ok = n < N;
        p_ws[i] = ok ? h2f(wscale[n]) : 0.0f;
        p_zs[i] = ok && !G128 ? h2f(wszero[n]) : 0.0f;
        p_bias[i] = ok && bias ? h2f(bias[n]) : 0.0f;
    }
    for (int i = threadIdx.x; i < MPAD; i += THREADS) {
        p_xs[i] = i < M ? h2f(xscale[i]) : 0.0f;
        p_sum[i] = i < M && !G128 ? xsum[i] : 0.0f;
    }

    // The first round of weight loads goes out before the activations are staged: both are in flight at once.
    const int ntiles = tiles - 4 * c0;  // k tiles from this split's start to the end of W
    const uint4* wrow = W + ((long long)nblk * tiles + 4 * c0) * 32 + lane;
    const long long goff = (long long)c0 * N + nblk * 32 + 4 * g;  // g128 words of chunk c0
    Chunk cur[DEPTH], nxt[DEPTH];
#pragma unroll
    for (int d = 0; d < DEPTH; ++d)
        load_chunk(cur[d], kw + d * KW, chan_ok ? nch : 0, ntiles, wrow, s2s, s2z, goff, N);

    // ---- stage the activations of this split's M rows, permuted (zero past K; rows past M are never read:
    // the main loop takes zeros for them from registers) ----
    const int kb0 = c0 * 128;
    const int mrows = min(M, MPAD);
    for (int idx = threadIdx.x; idx < nch * mrows * 8; idx += THREADS) {
        const int q16 = idx & 7, row = (idx >> 3) % mrows, ch = idx / (8 * mrows);
        const int k = kb0 + ch * 128 + 16 * q16;
        u32 w[4] = {0, 0, 0, 0};
        if (k < KX) {
#if QS_ALIGNED
            const uint4 v = *reinterpret_cast<const uint4*>(X + row * lda + k);
            w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
#else
            for (int b = 0; b < 16; ++b)
                if (k + b < KX) w[b >> 2] |= (u32)X[row * lda + k + b] << (8 * (b & 3));
#endif
        }
        // 16 bytes = k tile i = q16 / 2, half c = q16 % 2, lane columns t = 0..3
        const int i = q16 >> 1, c = q16 & 1;
#pragma unroll
        for (int tt = 0; tt < 4; ++tt)
            *reinterpret_cast<u32*>(xs + xs_offset(ch, row, tt, i >> 1) + ((i & 1) * 2 + c) * 4) = w[tt];
    }
    __syncthreads();

    if (chan_ok) {
        for (int base = kw; base < nch; base += DEPTH * KW) {
#pragma unroll
            for (int d = 0; d < DEPTH; ++d) load_chunk(nxt[d], base + (DEPTH + d) * KW, nch, ntiles, wrow, s2s, s2z, goff,
                                                         N);
#pragma unroll
            for (int d = 0; d < DEPTH; ++d) {
                const int ch = base + d * KW;
                if (ch >= nch) break;
                u32 mul[4], add[4];
                if (G128) g128_params(cur[d].s2, cur[d].z, mul, add);
                // B fragments of the chunk's 4 k tiles: words (i, c) of this lane's slot
                u32 bx[NJ][8];
#pragma unroll
                for (int j = 0; j < NJ; ++j) {
                    const int row = 8 * j + g;
                    uint4 lo = make_uint4(0, 0, 0, 0), hi = lo;
                    if (row < M) {
                        lo = *reinterpret_cast<const uint4*>(xs + xs_offset(ch, row, t, 0));
                        hi = *reinterpret_cast<const uint4*>(xs + xs_offset(ch, row, t, 1));
                    }
                    bx[j][0] = lo.x; bx[j][1] = lo.y; bx[j][2] = lo.z; bx[j][3] = lo.w;
                    bx[j][4] = hi.x; bx[j][5] = hi.y; bx[j][6] = hi.z; bx[j][7] = hi.w;
                }
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    u32 lo4[4], hi4[4];
                    unpack_w4(cur[d].q[i], lo4, hi4);
                    u32 a[2][4];
#pragma unroll
                    for (int r = 0; r < 4; ++r) {
                        if (G128) {
                            a[0][r] = g128_level1(lo4[r], mul[r & 1], add[r & 1]);
                            a[1][r] = g128_level1(hi4[r], mul[2 + (r & 1)], add[2 + (r & 1)]);
                        } else {
                            a[0][r] = lo4[r];
                            a[1][r] = hi4[r];
                        }
                    }
#pragma unroll
                    for (int h = 0; h < 2; ++h)
#pragma unroll
                        for (int j = 0; j < NJ; ++j) mma_s8(acc[h][j], a[h], bx[j][2 * i], bx[j][2 * i + 1]);
                }
            }
#pragma unroll
            for (int d = 0; d < DEPTH; ++d) cur[d] = nxt[d];
        }
    }

    // ---- reduce the K warps of each channel block (then the splits) ----
    __syncthreads();  // the activation tile is no longer needed: reuse it
    int* red = reinterpret_cast<int*>(xs);  // [KW][CB][FRAG][32]
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int j = 0; j < NJ; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) red[((kw * CB + cb) * FRAG + (h * NJ + j) * 4 + r) * 32 + lane] = acc[h][j][r];
    __syncthreads();
    constexpr int PER_THREAD = (TILE_ELEMS + THREADS - 1) / THREADS;
    int tot[PER_THREAD];
#pragma unroll
    for (int p = 0; p < PER_THREAD; ++p) {
        const int e = p * THREADS + threadIdx.x;  // e = (cb * FRAG + register) * 32 + lane
        tot[p] = 0;
        if (e < TILE_ELEMS)
#pragma unroll
            for (int w = 0; w < KW; ++w) tot[p] += red[w * TILE_ELEMS + e];
    }
    if (nsplit > 1) {
        const int tile = blockIdx.x;
        int* mine = ws + ((long long)tile * nsplit + split) * TILE_ELEMS;
#pragma unroll
        for (int p = 0; p < PER_THREAD; ++p) {
            const int e = p * THREADS + threadIdx.x;
            if (e < TILE_ELEMS) mine[e] = tot[p];
        }
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) {
            const int prev = atomicAdd(counters + tile, 1);
            s_last = prev == nsplit - 1;
            if (s_last) counters[tile] = 0;
        }
        __syncthreads();
        if (!s_last) return;
        __threadfence();
#pragma unroll
        for (int p = 0; p < PER_THREAD; ++p) {
            const int e = p * THREADS + threadIdx.x;
            tot[p] = 0;
            if (e < TILE_ELEMS)
                for (int sp = 0; sp < nsplit; ++sp) tot[p] += ld_cg(ws + ((long long)tile * nsplit + sp) * TILE_ELEMS + e);
        }
    }

    // ---- epilogue: element e -> (channel block, fragment register, lane) of the m16n8 fragments ----
#pragma unroll
    for (int p = 0; p < PER_THREAD; ++p) {
        const int e = p * THREADS + threadIdx.x;
        if (e >= TILE_ELEMS) continue;
        const int l = e % 32, ri = (e / 32) % FRAG, cbi = e / (32 * FRAG);
        const int h = ri / (NJ * 4), j = (ri / 4) % NJ, r = ri % 4;
        const int nl = cbi * 32 + 16 * h + (l >> 2) + 8 * (r >> 1);
        const int n = blockIdx.x * CB * 32 + nl;
        const int m = 8 * j + 2 * (l & 3) + (r & 1);
        if (m >= M || n >= N) continue;
        float v = fmul_rn(fmul_rn(i2f_rn(tot[p]), p_ws[nl]), p_xs[m]);
        if (!G128) v = fsub_rn(v, fmul_rn(p_zs[nl], p_sum[m]));
        u16 o = f2h(v);
        if (bias) o = f2h(fadd_rn(h2f(o), p_bias[nl]));
        Y[m * ldy + n] = o;
    }
}
