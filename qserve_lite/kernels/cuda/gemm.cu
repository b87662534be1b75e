// Tensor-core GEMMs of qserve-lite: W4A8 (per-channel and progressive g128, QServe packed layout), W8A8 and
// fp16, all computing Y[M tokens, N channels] = epilogue(sum_k W[n, k] * X[m, k]) with mma.sync.
//
// Orientation: the weights are the MMA's A operand (16 output channels per m16 tile) and the activations
// its B operand (8 tokens per n8 tile), i.e. the kernel computes Y^T = W X^T. For W4 this makes QServe's
// packed layout a perfect fit: one 16-byte load per lane holds, after nibble unpacking, the A fragments of
// two m16 tiles (the 32 output channels of the packed tile) x k32, and small M (decode) wastes at most 7 of
// 8 token columns instead of 15 of 16 rows.
//
// One source, configured by macros (the loader compiles one module per configuration):
//   QS_MODE    0 W4 per-channel, 1 W4 g128, 2 W8 per-channel, 3 fp16 x fp16 (fp32 accumulation)
//   QS_BN      output channels per block          QS_BM  tokens per block
//   QS_BK      bytes of K per pipeline stage      QS_STAGES  cp.async pipeline depth
//   QS_WN QS_WM QS_WK  warps along channels / tokens / K (WK > 1: in-block split-K, reduced in smem)
//   QS_ALIGNED 1: every row of X (and of W for W8/fp16) is 16-byte aligned and its byte width a multiple
//              of 16, so cp.async with zero fill is used; 0: byte loads with bounds checks (odd shapes)
//   QS_SPLITK  1: compile the cross-block split-K path (gridDim.z > 1); 0: gridDim.z must be 1
//   QS_WGMMA   1 (sm_90a only, int8 modes): Hopper warpgroup MMA instead of mma.sync. Each warpgroup issues
//              wgmma.m64nBMk32 with A = the dequantized weights in registers (4 warps x 16 channels, exactly
//              the mma.sync A fragments) and B = the activation tile in shared memory, stored with the
//              128-byte swizzle (our XOR of 16-byte chunks by row & 7) so a descriptor can address it.
//              Requires BK = 128, one warp per 32 channels (WM = WK = 1) and BM in {64, 128}.
//   QS_MINB    minimum resident blocks per SM (__launch_bounds__), caps registers
//   QS_OUT_F32 fp16 mode only: write fp32 instead of fp16
// Cross-block split-K (gridDim.z > 1) writes raw partial accumulators to a workspace; the last block of a
// tile to arrive (an atomic counter per tile, reset by that block) sums them in split order and runs the
// epilogue. Integer sums are exact, the fp32 order is fixed, so results never depend on scheduling.
//
// Epilogues (the numpy twins in qserve_lite/ops are the spec; every step rounded to nearest even, no FMA):
//   W4 per-channel: fp16((fp32(acc) * s1[n]) * sx[m] - szeros[n] * xsum[m])
//   W4 g128, W8:    fp16((fp32(acc) * s[n]) * sx[m])
//   fp16:           fp16(acc)   (or fp32(acc))
//   bias (fp16):    fp16(fp32(out16) + fp32(bias[n]))          (fp32 output: acc + bias)
#include "common.cuh"
#include "w4.cuh"
// sm90.cuh: the wgmma helpers of the QS_WGMMA path (unused functions are not emitted elsewhere)
#include "sm90.cuh"

#ifndef QS_MODE
#define QS_MODE 1
#endif
#ifndef QS_BN
#define QS_BN 128
#endif
#ifndef QS_BM
#define QS_BM 64
#endif
#ifndef QS_BK
#define QS_BK 128
#endif
#ifndef QS_WN
#define QS_WN 2
#endif
#ifndef QS_WM
#define QS_WM 2
#endif
#ifndef QS_WK
#define QS_WK 1
#endif
#ifndef QS_STAGES
#define QS_STAGES 3
#endif
#ifndef QS_ALIGNED
#define QS_ALIGNED 1
#endif
#ifndef QS_SPLITK
#define QS_SPLITK 1
#endif
#ifndef QS_WGMMA
#define QS_WGMMA 0
#endif
#ifndef QS_MINB
#define QS_MINB 1
#endif
#ifndef QS_OUT_F32
#define QS_OUT_F32 0
#endif

namespace {

constexpr int MODE = QS_MODE;
constexpr bool IS_W4 = MODE == 0 || MODE == 1;
constexpr bool IS_G128 = MODE == 1;
constexpr bool IS_F16 = MODE == 3;
constexpr bool OUT_F32 = IS_F16 && QS_OUT_F32;
constexpr int BN = QS_BN, BM = QS_BM, BK = QS_BK, STAGES = QS_STAGES;
constexpr int WN = QS_WN, WM = QS_WM, WK = QS_WK;
constexpr int NWARPS = WN * WM * WK;
constexpr int NTHREADS = 32 * NWARPS;
constexpr int TN = BN / WN;   // channels per warp
constexpr int TM = BM / WM;   // tokens per warp
constexpr int MI = TN / 16;   // m16 tiles per warp
constexpr int NJ = TM / 8;    // n8 tiles per warp
constexpr int KSTEPS = BK / 32;  // 32-byte k steps per stage
constexpr int CH = BK / 16;      // 16-byte chunks per smem row

constexpr bool WG = QS_WGMMA;
static_assert(BK % 64 == 0, "BK must be a multiple of 64 bytes");
static_assert(!WG || (BK == 128 && WM == 1 && WK == 1 && TN == 32 && WN % 4 == 0 && (BM == 64 || BM == 128) &&
                      !IS_F16), "wgmma tiles: BK 128, 32 channels per warp, whole warpgroups, BM 64 or 128");
static_assert(KSTEPS % WK == 0, "K steps per stage must split evenly over the K warps");
static_assert(TN % (IS_W4 ? 32 : 16) == 0, "channels per warp: multiple of 32 (W4) or 16");
static_assert(TM % 8 == 0 && (NJ == 1 || NJ % 2 == 0), "tokens per warp: 8 or a multiple of 16");
static_assert(!IS_G128 || BK <= 128 || BK % 128 == 0, "g128: BK divides or is a multiple of 128");

template <bool C, class T, class F>
struct pick { typedef T type; };
template <class T, class F>
struct pick<false, T, F> { typedef F type; };
typedef typename pick<IS_F16, float, int>::type AccT;

constexpr int X_STAGE = BM * BK;
constexpr int W_STAGE = IS_W4 ? BN * BK / 2 : BN * BK;
constexpr int NG = IS_G128 ? (BK >= 128 ? BK / 128 : 1) : 0;  // weight groups per stage
constexpr int G_STAGE = 2 * NG * BN;                           // s2 bytes then zero bytes
constexpr int STAGE_ALIGN = WG ? 1024 : 16;  // the 128-byte swizzle pattern repeats every 1024 bytes
constexpr int STAGE_BYTES = (X_STAGE + W_STAGE + G_STAGE + STAGE_ALIGN - 1) / STAGE_ALIGN * STAGE_ALIGN;
constexpr int PIPE_BYTES = STAGES * STAGE_BYTES;
constexpr int RED_BYTES = (WK - 1) * BN * BM * 4;
constexpr int OUT_ELEM = OUT_F32 ? 4 : 2;
constexpr int OUT_PITCH = BN + 16 / OUT_ELEM;  // elements; +16 bytes against bank conflicts
constexpr int STAGE_OUT_BYTES = BM * OUT_PITCH * OUT_ELEM;
constexpr int cmax(int a, int b) { return a > b ? a : b; }
constexpr int SMEM_BYTES = cmax(PIPE_BYTES, cmax(RED_BYTES, STAGE_OUT_BYTES)) + (WG ? 1024 : 0);

// XOR swizzle of 16-byte chunks inside a row of BK bytes, so that ldmatrix's 8 row addresses hit 8
// distinct bank groups.
__device__ __forceinline__ int swz(int row, int chunk) {
    if (CH >= 8) return chunk ^ (row & 7);
    return chunk ^ ((row >> 1) & 3);  // CH == 4
}

// ---- global -> shared loads of one pipeline stage ----

// Rows [r0, r0 + ROWS) x bytes [kb0, kb0 + BK) of a row-major byte matrix with `rows` rows of `kbytes`
// valid bytes (row stride ld bytes); out-of-range chunks are zero-filled.
template <int ROWS>
__device__ __forceinline__ void load_rows(u8* s, const u8* g, long long ld, int r0, int rows, int kb0,
                                          int kbytes) {
    constexpr int CHUNKS = ROWS * CH;
#pragma unroll
    for (int it = 0; it < (CHUNKS + NTHREADS - 1) / NTHREADS; ++it) {
        const int c = it * NTHREADS + threadIdx.x;
        if (CHUNKS % NTHREADS == 0 || c < CHUNKS) {
            const int row = c / CH, col = c % CH;
            const int r = r0 + row, kb = kb0 + col * 16;
            u8* dst = s + row * BK + swz(row, col) * 16;
#if QS_ALIGNED
            const bool ok = r < rows && kb < kbytes;
            cp_async16(smem_addr(dst), ok ? g + r * ld + kb : g, ok ? 16 : 0);
#else
            u32 w[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                u32 v = 0;
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                    const int k = kb + 4 * i + b;
                    const u32 byte = (r < rows && k < kbytes) ? (u32)g[r * ld + k] : 0u;
                    v |= byte << (8 * b);
                }
                w[i] = v;
            }
            *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
#endif
        }
    }
}

// W4 packed weights: for each 32-channel block, BK/32 consecutive 512-byte tiles (contiguous in memory).
__device__ __forceinline__ void load_w4(u8* s, const u8* w, int n0, int N, int kb0, int KW) {
    constexpr int PER_BLOCK = BK / 32 * 32;  // 16-byte chunks per channel block and stage
    constexpr int CHUNKS = BN / 32 * PER_BLOCK;
    const long long tiles_k = KW / 32;
#pragma unroll
    for (int it = 0; it < (CHUNKS + NTHREADS - 1) / NTHREADS; ++it) {
        const int c = it * NTHREADS + threadIdx.x;
        if (CHUNKS % NTHREADS == 0 || c < CHUNKS) {
            const int blk = c / PER_BLOCK, rem = c % PER_BLOCK;
            const int nb = n0 / 32 + blk, kt = kb0 / 32 + rem / 32;
            const bool ok = nb * 32 < N && kt < tiles_k;
            const u8* src = w + ((long long)nb * tiles_k + kt) * 512 + (rem % 32) * 16;
            cp_async16(smem_addr(s + c * 16), ok ? src : w, ok ? 16 : 0);
        }
    }
}

// g128 parameters of the stage's groups: s2_scales then s2_zeros, [NG][BN] bytes each.
__device__ __forceinline__ void load_groups(u8* s, const u8* s2s, const u8* s2z, int n0, int N, int kb0,
                                            int KW) {
    constexpr int PER_ROW = BN / 16;
    constexpr int NGX = NG > 0 ? NG : 1;
    constexpr int CHUNKS = 2 * NGX * PER_ROW;
    const int groups = KW / 128;
    for (int c = threadIdx.x; c < CHUNKS; c += NTHREADS) {
        const int which = c / (NGX * PER_ROW), rem = c % (NGX * PER_ROW);
        const int gi = rem / PER_ROW, col = rem % PER_ROW;
        const int g = kb0 / 128 + gi, n = n0 + col * 16;
        const bool ok = g < groups && n < N;
        const u8* base = which ? s2z : s2s;
        cp_async16(smem_addr(s + c * 16), ok ? base + (long long)g * N + n : base, ok ? 16 : 0);
    }
}

// ---- per-stage compute ----

// A fragments (weights) of k step s for the warp's MI m16 tiles.
__device__ __forceinline__ void load_a(const u8* sw, const u8* sg, int s, int wn, int lane, u32 (&a)[MI][4]) {
    if (IS_W4) {
#pragma unroll
        for (int j = 0; j < TN / 32; ++j) {
            const int blk = wn * (TN / 32) + j;
            const uint4 q = *reinterpret_cast<const uint4*>(sw + blk * (BK * 16) + s * 512 + lane * 16);
            u32 lo[4], hi[4];
            unpack_w4(q, lo, hi);
            if (IS_G128) {
                const int gi = NG > 1 ? (s * 32) / 128 : 0;
                const int off = gi * BN + blk * 32 + 4 * (lane >> 2);
                u32 mul[4], add[4];
                g128_params(*reinterpret_cast<const u32*>(sg + off), *reinterpret_cast<const u32*>(sg + NG * BN + off),
                            mul, add);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    a[2 * j][i] = g128_level1(lo[i], mul[i & 1], add[i & 1]);
                    a[2 * j + 1][i] = g128_level1(hi[i], mul[2 + (i & 1)], add[2 + (i & 1)]);
                }
            } else {
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    a[2 * j][i] = lo[i];
                    a[2 * j + 1][i] = hi[i];
                }
            }
        }
    } else {
#pragma unroll
        for (int i = 0; i < MI; ++i) {
            const int row = wn * TN + 16 * i + (lane & 15);
            const int chunk = 2 * s + (lane >> 4);
            ldmatrix_x4(a[i][0], a[i][1], a[i][2], a[i][3], smem_addr(sw + row * BK + swz(row, chunk) * 16));
        }
    }
}


__device__ __forceinline__ void compute_stage(const u8* sx, const u8* sw, const u8* sg, AccT (&acc)[MI][NJ][4],
                                              int wn, int wm, int wk, int lane, u32 (&a_prev)[MI][4]) {
#if QS_WGMMA
    // One warpgroup-wide wgmma per m16 tile pair and k step. wgmma reads its A registers asynchronously:
    // a step's registers stay live (keep) until the next step's wait<1> has retired that step. The wgmma of
    // the stage's last step is left in flight; the caller's pipeline refills a slot only two stages later.
#pragma unroll
    for (int s = 0; s < KSTEPS; ++s) {
        u32 a[MI][4];
        load_a(sw, sg, s, wn, lane, a);
        wgmma_fence();
        const u64 desc = desc_sw128(sx + s * 32);
#pragma unroll
        for (int i = 0; i < MI; ++i) wgmma_s8<BM>(&acc[i][0][0], a[i], desc);
        wgmma_commit();
        wgmma_wait<1>();  // the previous step (possibly of the previous stage) has finished
#pragma unroll
        for (int i = 0; i < MI; ++i)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                keep(a_prev[i][r]);
                a_prev[i][r] = a[i][r];
            }
    }
#else
#pragma unroll
    for (int ks = 0; ks < KSTEPS / WK; ++ks) {
        const int s = ks * WK + wk;  // 32-byte k step inside the stage
        // B fragments (activations): b[j][0] = k bytes 0-15 of the step, b[j][1] = bytes 16-31.
        u32 b[NJ][2];
        if (NJ == 1) {
            const int row = wm * TM + (lane & 7);
            const int chunk = 2 * s + ((lane >> 3) & 1);
            ldmatrix_x2(b[0][0], b[0][1], smem_addr(sx + row * BK + swz(row, chunk) * 16));
        } else {
#pragma unroll
            for (int jj = 0; jj < NJ / 2; ++jj) {
                const int row = wm * TM + 16 * jj + (lane & 7) + ((lane >> 4) << 3);
                const int chunk = 2 * s + ((lane >> 3) & 1);
                ldmatrix_x4(b[2 * jj][0], b[2 * jj][1], b[2 * jj + 1][0], b[2 * jj + 1][1],
                            smem_addr(sx + row * BK + swz(row, chunk) * 16));
            }
        }
        u32 a[MI][4];
        load_a(sw, sg, s, wn, lane, a);
#pragma unroll
        for (int i = 0; i < MI; ++i) {
#pragma unroll
            for (int j = 0; j < NJ; ++j) mma(acc[i][j], a[i], b[j][0], b[j][1]);
        }
    }
#endif
}

__device__ __forceinline__ float epilogue_value(AccT accv, int n, int m, const u16* wscale, const u16* wszero,
                                                const u16* xscale, const float* xsum) {
    if constexpr (IS_F16) {
        return accv;
    } else {
        float v = fmul_rn(fmul_rn(i2f_rn(accv), h2f(wscale[n])), h2f(xscale[m]));
        if (MODE == 0) v = fsub_rn(v, fmul_rn(h2f(wszero[n]), xsum[m]));
        return v;
    }
}

}  // namespace

// Read by the loader to check its own copy of the launch geometry.
extern "C" __device__ const int qs_gemm_smem_bytes = SMEM_BYTES;
extern "C" __device__ const int qs_gemm_threads = NTHREADS;

extern "C" __global__ void __launch_bounds__(NTHREADS, QS_MINB)
qs_gemm(const u8* __restrict__ X, long long lda,        // activations [M][K], row stride in bytes
        const u8* __restrict__ W, long long ldw,        // W4 packed [N/32][KW/32][512] / row-major [N][KW]
        const u8* __restrict__ s2s, const u8* __restrict__ s2z,  // g128 [KW/128][N] (QServe layout)
        const u16* __restrict__ wscale,                  // s1 (W4) / per-channel scale (W8), fp16 [N]
        const u16* __restrict__ wszero,                  // s1 * z (W4 per-channel), fp16 [N]
        const u16* __restrict__ xscale,                  // per-token scale, fp16 [M]
        const float* __restrict__ xsum,                  // per-token sum (W4 per-channel), fp32 [M]
        const u16* __restrict__ bias,                    // fp16 [N] or null
        void* __restrict__ Y, long long ldy,             // output [M][N], row stride in elements
        int M, int N, int KX, int KW,                    // KX, KW: bytes of K of X and of W (KX <= KW)
        AccT* __restrict__ ws, int* __restrict__ counters, int stages_per_split) {
    extern __shared__ __align__(128) u8 smem_raw[];
    // wgmma's swizzled tiles need 1024-byte aligned stages (SMEM_BYTES has the slack)
    u8* smem = smem_raw + (WG ? (1024 - (smem_addr(smem_raw) & 1023)) & 1023 : 0);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wn = warp % WN, wm = (warp / WN) % WM, wk = warp / (WN * WM);
    const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM;
    const int nsplit = gridDim.z, split = blockIdx.z;
    const int total_stages = (KW + BK - 1) / BK;
    const int st0 = split * stages_per_split;
    const int nst = max(0, min(total_stages, st0 + stages_per_split) - st0);

    AccT acc[MI][NJ][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NJ; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

    auto load_stage = [&](int slot, int st) {
        u8* base = smem + slot * STAGE_BYTES;
        const int kb0 = (st0 + st) * BK;
        load_rows<BM>(base, X, lda, m0, M, kb0, KX);
        if (IS_W4) {
            load_w4(base + X_STAGE, W, n0, N, kb0, KW);
        } else {
            load_rows<BN>(base + X_STAGE, W, ldw, n0, N, kb0, KW);
        }
        if (IS_G128) load_groups(base + X_STAGE + W_STAGE, s2s, s2z, n0, N, kb0, KW);
    };

    // ---- main loop: cp.async pipeline, LOOKAHEAD stages in flight ----
    // mma.sync: STAGES - 1 ahead. wgmma: STAGES - 2 ahead, since the previous stage's last wgmma may still be
    // reading its slot when the next prefetch is issued.
    constexpr int LOOKAHEAD = WG ? STAGES - 2 : STAGES - 1;
    static_assert(LOOKAHEAD >= 1, "too few stages");
    u32 a_prev[MI][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int r = 0; r < 4; ++r) a_prev[i][r] = 0;
#pragma unroll
    for (int st = 0; st < LOOKAHEAD; ++st) {
        if (st < nst) load_stage(st, st);
        cp_async_commit();
    }
    for (int st = 0; st < nst; ++st) {
        cp_async_wait<LOOKAHEAD - 1>();
        if (WG) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // cp.async data -> wgmma
        __syncthreads();
        const int next = st + LOOKAHEAD;
        if (next < nst) load_stage(next % STAGES, next);
        cp_async_commit();
        const u8* base = smem + (st % STAGES) * STAGE_BYTES;
        compute_stage(base, base + X_STAGE, base + X_STAGE + W_STAGE, acc, wn, wm, wk, lane, a_prev);
    }
#if QS_WGMMA
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < MI; ++i) {
#pragma unroll
        for (int r = 0; r < 4; ++r) keep(a_prev[i][r]);
#pragma unroll
        for (int j = 0; j < NJ; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) keep(acc[i][j][r]);
    }
#endif
    cp_async_wait<0>();
    __syncthreads();

    // ---- in-block split-K: warps wk > 0 hand their sums to warp wk = 0 ----
    if (WK > 1) {
        AccT* red = reinterpret_cast<AccT*>(smem);
        const int wslot = wm * WN + wn;
        if (wk > 0) {
#pragma unroll
            for (int i = 0; i < MI; ++i)
#pragma unroll
                for (int j = 0; j < NJ; ++j)
#pragma unroll
                    for (int r = 0; r < 4; ++r)
                        red[((((wk - 1) * WN * WM + wslot) * MI + i) * NJ + j) * 128 + r * 32 + lane] =
                            acc[i][j][r];
        }
        __syncthreads();
        if (wk == 0) {
#pragma unroll
            for (int w2 = 1; w2 < WK; ++w2)
#pragma unroll
                for (int i = 0; i < MI; ++i)
#pragma unroll
                    for (int j = 0; j < NJ; ++j)
#pragma unroll
                        for (int r = 0; r < 4; ++r)
                            acc[i][j][r] += red[((((w2 - 1) * WN * WM + wslot) * MI + i) * NJ + j) * 128 + r * 32 + lane];
        }
        __syncthreads();
    }

    // ---- cross-block split-K: the last block of the tile sums the partials in split order ----
    if (QS_SPLITK && nsplit > 1) {
        __shared__ int s_last;
        const int tile = blockIdx.y * gridDim.x + blockIdx.x;
        const long long tile_elems = (long long)BN * BM;
        const int wslot = wm * WN + wn;
        if (wk == 0) {
            AccT* mine = ws + ((long long)tile * nsplit + split) * tile_elems;
#pragma unroll
            for (int i = 0; i < MI; ++i)
#pragma unroll
                for (int j = 0; j < NJ; ++j)
#pragma unroll
                    for (int r = 0; r < 4; ++r)
                        mine[(((wslot * MI + i) * NJ + j) * 4 + r) * 32 + lane] = acc[i][j][r];
        }
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) {
            const int prev = atomicAdd(counters + tile, 1);
            s_last = prev == nsplit - 1;
            if (s_last) counters[tile] = 0;  // every other block of the tile has arrived: reset for reuse
        }
        __syncthreads();
        if (!s_last) return;
        __threadfence();
        if (wk == 0) {
            // Every split (this one included) wrote its partials; sum them in split order, loading a whole
            // split's fragment before using it so that the loads overlap.
#pragma unroll
            for (int i = 0; i < MI; ++i)
#pragma unroll
                for (int j = 0; j < NJ; ++j)
#pragma unroll
                    for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;
            for (int sp = 0; sp < nsplit; ++sp) {
                const AccT* part = ws + ((long long)tile * nsplit + sp) * tile_elems + wslot * (MI * NJ * 128) + lane;
                AccT v[MI][NJ][4];
#pragma unroll
                for (int i = 0; i < MI; ++i)
#pragma unroll
                    for (int j = 0; j < NJ; ++j)
#pragma unroll
                        for (int r = 0; r < 4; ++r) v[i][j][r] = ld_cg(part + ((i * NJ + j) * 4 + r) * 32);
#pragma unroll
                for (int i = 0; i < MI; ++i)
#pragma unroll
                    for (int j = 0; j < NJ; ++j)
#pragma unroll
                        for (int r = 0; r < 4; ++r) acc[i][j][r] += v[i][j][r];
            }
        }
    }

    // ---- epilogue: scales (+ bias) per fragment element into a [BM][BN] smem tile, then 16-byte stores ----
    const int g = lane >> 2, t = lane & 3;
    if (wk == 0) {
#pragma unroll
        for (int i = 0; i < MI; ++i) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int nl = wn * TN + 16 * i + g + 8 * half;
                const int n = n0 + nl;
                if (n >= N) continue;
#pragma unroll
                for (int j = 0; j < NJ; ++j) {
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        const int ml = wm * TM + 8 * j + 2 * t + c;
                        const int m = m0 + ml;
                        if (m >= M) continue;
                        const float v = epilogue_value(acc[i][j][2 * half + c], n, m, wscale, wszero, xscale, xsum);
                        if constexpr (OUT_F32) {
                            float o = v;
                            if (bias) o = fadd_rn(o, h2f(bias[n]));
                            reinterpret_cast<float*>(smem)[ml * OUT_PITCH + nl] = o;
                        } else {
                            u16 o = f2h(v);
                            if (bias) o = f2h(fadd_rn(h2f(o), h2f(bias[n])));
                            reinterpret_cast<u16*>(smem)[ml * OUT_PITCH + nl] = o;
                        }
                    }
                }
            }
        }
    }
    __syncthreads();
    constexpr int VEC = 16 / OUT_ELEM;  // elements per 16-byte store
    constexpr int ROW_CHUNKS = BN / VEC;
    const bool vec_ok = (N % VEC == 0) && (ldy % VEC == 0) && ((reinterpret_cast<u64>(Y) & 15) == 0);
    for (int c = threadIdx.x; c < BM * ROW_CHUNKS; c += NTHREADS) {
        const int ml = c / ROW_CHUNKS, nl = (c % ROW_CHUNKS) * VEC;
        const int m = m0 + ml, n = n0 + nl;
        if (m >= M || n >= N) continue;
        u8* dst = reinterpret_cast<u8*>(Y) + ((long long)m * ldy + n) * OUT_ELEM;
        const u8* src = smem + (ml * OUT_PITCH + nl) * OUT_ELEM;
        if (vec_ok) {
            *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
        } else {
            for (int e = 0; e < VEC && n + e < N; ++e) {
                if (OUT_F32) {
                    reinterpret_cast<float*>(dst)[e] = reinterpret_cast<const float*>(src)[e];
                } else {
                    reinterpret_cast<u16*>(dst)[e] = reinterpret_cast<const u16*>(src)[e];
                }
            }
        }
    }
}
