// Hopper (sm_90a) W4A8 / W8A8 GEMM: TMA-fed, warp-specialized, persistent, int8 wgmma with the weights as
// the register-sourced A operand. Same integer semantics and epilogues as cuda/gemm.cu (the numpy twins in
// qserve_lite/kernels/w4a8_gemm.py and w8a8_gemm.py are the spec): Y[M tokens, N channels] =
// epilogue(sum_k W[n, k] * X[m, k]), computed as Y^T = W X^T so that the token count is wgmma's N.
//
// Block: one producer warpgroup (one thread issues the bulk tensor copies, registers given back with
// setmaxnreg) and NWG consumer warpgroups, each owning 128 output channels of the block's BN = 128 * NWG
// channels x BM tokens tile. A STAGES-deep ring of shared-memory stages, each one K step of 128 bytes (one g128
// group): the activation tile [BM][128] (TMA, 128-byte swizzle, read by wgmma through a descriptor), the weight
// tile (W4: the packed [BN/32][4][512] bytes of QServe's layout; W8: [BN][128] swizzled, read with ldmatrix)
// and, for g128, the stage's s2 scales and -z bytes. `full` mbarriers carry the copies' byte counts; each
// consumer warp arrives on `empty` once the wgmmas that read a stage have retired.
//
// Consumer main loop, per stage: the two halves (2 k32 steps each) are dequantized into two register sets, so
// the dequantization of one half runs while the wgmmas of the other are in flight (wait_group 1).
// Warp w of a consumer warpgroup holds channels 32w..32w+31 of its 128: the low nibbles of a lane's 16 packed
// bytes are the A fragment of channels 0-15, the high nibbles of 16-31 (two m64 wgmmas per k32 step).
//
// Persistent: the grid is at most one block per SM; work units (tile, K split) are dealt round-robin, tiles
// in groups of GROUP_M token tiles for L2 reuse. Split-K: each unit writes its int32 partials to a
// workspace; the last unit of a tile to arrive (a counter per tile, reset by that unit) sums them and runs the
// epilogue. Integer sums are exact, so the result does not depend on the split or the arrival order.
//
// Macros: QS_MODE 0 W4 per-channel, 1 W4 g128, 2 W8; QS_BM 16, 32, 64 or 128 tokens; QS_NWG 1 or 2 consumer
// warpgroups; QS_STAGES pipeline depth; QS_KWG 2: the two consumer warpgroups share one 128-channel tile and
// take alternate K stages (twice the tiles of 256 channels, no split-K traffic), their sums joined through
// shared memory before the first warpgroup's epilogue; QS_MINB 2: two blocks per SM (one consumer warpgroup
// each, half the shared memory and registers), so two tiles' dequantization and wgmmas interleave on an SM;
// QS_DIAG (timing experiments only, wrong results): 1 no level-1 dequantization, 2 no wgmma, 3 neither;
// QS_EPI_ROWS: token rows per pass of the epilogue through a warpgroup's staging tile (default BM; fewer frees
// shared memory for more pipeline stages, KWG 1 only);
// QS_CLUSTER 2: clusters of two blocks on adjacent channel tiles (same token tile, same K stages in lockstep)
// share the activation tile: each loads half of its rows and multicasts them into both blocks' shared
// memory, so each block pulls 3/4 of the bytes per stage (128 x 256 tiles) from L2; a stage's slot is refilled
// only after the consumers of both blocks released it (they arrive on both blocks' `empty` barriers).
// Epilogues (every step rounded to nearest even, no FMA):
//   W4 per-channel: fp16((fp32(acc) * s1[n]) * sx[m] - szeros[n] * xsum[m])
//   W4 g128, W8:    fp16((fp32(acc) * s[n]) * sx[m])
//   bias (fp16):    fp16(fp32(out16) + fp32(bias[n]))
#include "common.cuh"
#include "w4.cuh"
#include "sm90.cuh"

#ifndef QS_MODE
#define QS_MODE 1
#endif
#ifndef QS_BM
#define QS_BM 128
#endif
#ifndef QS_NWG
#define QS_NWG 2
#endif
#ifndef QS_STAGES
#define QS_STAGES 4
#endif
#ifndef QS_KWG
#define QS_KWG 1
#endif
#ifndef QS_MINB
#define QS_MINB 1
#endif
#ifndef QS_DIAG
#define QS_DIAG 0
#endif
#ifndef QS_EPI_ROWS
#define QS_EPI_ROWS QS_BM
#endif
#ifndef QS_CLUSTER
#define QS_CLUSTER 1
#endif

namespace {

constexpr int MODE = QS_MODE;
constexpr bool IS_W4 = MODE == 0 || MODE == 1;
constexpr bool IS_G128 = MODE == 1;
constexpr int BM = QS_BM, NWG = QS_NWG, STAGES = QS_STAGES, KWG = QS_KWG, MINB = QS_MINB, CL = QS_CLUSTER;
constexpr int BN = 128 * NWG / KWG;
constexpr int BK = 128;  // bytes of K per stage
constexpr int NCT = 128 * NWG;  // consumer threads
constexpr int EPI_T = NCT / KWG;  // consumer threads that own a tile's final sums (the epilogue's)
constexpr int NTHREADS = NCT + 128;
constexpr int HALF_ACC = BM / 2;  // accumulators per thread of one m64 x BM wgmma tile
constexpr int ACC = 2 * HALF_ACC;
constexpr int GROUP_M = 8;
static_assert(BM == 16 || BM == 32 || BM == 64 || BM == 128, "BM is 16, 32, 64 or 128 tokens");
static_assert(NWG == 1 || NWG == 2, "one or two consumer warpgroups");
static_assert(KWG == 1 || (KWG == 2 && NWG == 2), "K shared by the warpgroups: two of them");
static_assert(MODE >= 0 && MODE <= 2, "int8 modes only");
static_assert(MINB == 1 || (MINB == 2 && NWG == 1), "two blocks per SM: one consumer warpgroup each");
static_assert(CL == 1 || (CL == 2 && KWG == 1 && MINB == 1), "clusters of two: one tile per block");

constexpr int X_BYTES = BM * BK;
constexpr int X_PART = X_BYTES / CL;  // activation bytes one block of a cluster loads (and multicasts)
static_assert(X_PART % 1024 == 0, "each block's share of the activation tile keeps the 1024-byte swizzle atom");
constexpr int W_BYTES = IS_W4 ? BN * BK / 2 : BN * BK;
constexpr int G_BYTES = IS_G128 ? 2 * BN : 0;
constexpr u32 TX_BYTES = X_BYTES + W_BYTES + G_BYTES;
constexpr int STAGE_BYTES = (X_BYTES + W_BYTES + G_BYTES + 1023) / 1024 * 1024;
constexpr int OUT_PITCH = 128 + 8;  // fp16 elements per staged output row of one warpgroup
constexpr int EPI_ROWS = QS_EPI_ROWS;  // token rows a warpgroup stages at a time (fewer: more pipeline stages)
static_assert(BM % EPI_ROWS == 0 && EPI_ROWS % 8 == 0, "the staging rows: a multiple of 8 that divides BM");
static_assert(EPI_ROWS == BM || KWG == 1, "KWG 2 joins its sums through the whole staging tiles");
constexpr int EPI_BYTES = NWG * EPI_ROWS * OUT_PITCH * 2;
constexpr int BAR_OFFSET = STAGES * STAGE_BYTES + EPI_BYTES;
constexpr int SMEM_BYTES = 1024 + BAR_OFFSET + 2 * STAGES * 8 + 16;
constexpr int PRODUCER_REGS = 40;
// a block's register file share (64K / MINB) less the producer's, over the consumer threads, multiple of 8
constexpr int CONSUMER_REGS = MINB == 2 ? (32768 - 128 * PRODUCER_REGS) / 128 / 8 * 8 : (NWG == 2 ? 232 : 240);

__device__ __forceinline__ u32 lds32(const u8* p) { return *reinterpret_cast<const u32*>(p); }

// A consumer warp frees a stage slot: in every block of the cluster (their producers refill the slot together).
__device__ __forceinline__ void release_slot(u64* bar) {
    if constexpr (CL == 1) {
        mbar_arrive(bar);
    } else {
#pragma unroll
        for (int r = 0; r < CL; ++r) mbar_arrive_cluster(bar, r);
    }
}



// Work unit u -> (token tile, channel tile, split): splits of a tile are adjacent; tiles go in groups of
// GROUP_M token tiles, token tile fastest inside a group.
__device__ __forceinline__ void unit_coords(int u, int m_tiles, int n_tiles, int nsplit, int& mt, int& nt,
                                            int& split, int& tile) {
    split = u % nsplit;
    tile = u / nsplit;
    const int per_group = GROUP_M * n_tiles;
    const int first = tile / per_group * GROUP_M;
    const int gm = min(GROUP_M, m_tiles - first);
    const int local = tile % per_group;
    mt = first + local % gm;
    nt = local / gm;
}

// Loop index v -> the block's work unit: (token tile, channel tile, split, tile index, workspace unit index).
// Clusters take the same (token tile, channel-tile group, split) and each block the group's rank-th tile.
struct Unit {
    int mt, nt, split, tile, wu;
};
__device__ __forceinline__ Unit unit_of(int v, int m_tiles, int n_groups, int nsplit, int rank) {
    Unit w;
    int ng, tg;
    unit_coords(v, m_tiles, n_groups, nsplit, w.mt, ng, w.split, tg);
    w.nt = ng * CL + rank;
    w.tile = tg * CL + rank;
    w.wu = w.tile * nsplit + w.split;
    return w;
}

// A fragments (two m16 tiles: channels 0-15 and 16-31 of the warp's block cb) of k32 step s of a stage.
__device__ __forceinline__ void load_a(const u8* sw, int cb, int s, int lane, const u32 (&mul)[4],
                                       const u32 (&add)[4], u32 (&a)[2][4]) {
    if constexpr (IS_W4) {
        const uint4 q = *reinterpret_cast<const uint4*>(sw + cb * (BK * 16) + s * 512 + lane * 16);
        u32 lo[4], hi[4];
        unpack_w4(q, lo, hi);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            if constexpr (IS_G128 && QS_DIAG != 1 && QS_DIAG != 3) {
                a[0][i] = g128_level1(lo[i], mul[i & 1], add[i & 1]);
                a[1][i] = g128_level1(hi[i], mul[2 + (i & 1)], add[2 + (i & 1)]);
            } else {
                a[0][i] = lo[i];
                a[1][i] = hi[i];
            }
        }
    } else {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int row = cb * 32 + 16 * i + (lane & 15);
            const int chunk = 2 * s + (lane >> 4);
            ldmatrix_x4(a[i][0], a[i][1], a[i][2], a[i][3], smem_addr(sw + row * BK + ((chunk ^ (row & 7)) << 4)));
        }
    }
}

__device__ __forceinline__ void issue_half(int (&acc)[2][HALF_ACC], const u32 (&a)[2][2][4], const u8* sx,
                                           int s0) {
    wgmma_fence();
#if QS_DIAG == 2 || QS_DIAG == 3
    for (int s = 0; s < 2; ++s)
        for (int i = 0; i < 2; ++i)
            for (int r = 0; r < 4; ++r) acc[i][r] += (int)a[s][i][r];
    (void)sx;
    (void)s0;
#else
#pragma unroll
    for (int s = 0; s < 2; ++s) {
        const u64 desc = desc_sw128(sx + (s0 + s) * 32);
#pragma unroll
        for (int i = 0; i < 2; ++i) wgmma_s8<BM>(acc[i], a[s][i], desc);
    }
#endif
    wgmma_commit();
}

__device__ __forceinline__ void keep_regs(u32 (&a)[2][2][4]) {
#pragma unroll
    for (int s = 0; s < 2; ++s)
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int r = 0; r < 4; ++r) keep(a[s][i][r]);
}

// fp16 output value of one accumulator (the numpy twins' rounding, step by step).
__device__ __forceinline__ u16 out_value(int acc, float ws, float wsz, float xs, float xsm, float b,
                                         bool has_bias) {
    float v = fmul_rn(fmul_rn(i2f_rn(acc), ws), xs);
    if (MODE == 0) v = fsub_rn(v, fmul_rn(wsz, xsm));
    u16 o = f2h(v);
    if (has_bias) o = f2h(fadd_rn(h2f(o), b));
    return o;
}

}  // namespace

// Read by the loader to check its own copy of the launch geometry.
extern "C" __device__ const int qs_gemm_sm90_smem_bytes = SMEM_BYTES;
extern "C" __device__ const int qs_gemm_sm90_threads = NTHREADS;

extern "C" __global__ void __launch_bounds__(NTHREADS, MINB)
qs_gemm_sm90(const __grid_constant__ TmaDesc tx,   // activations [M][KX] int8, box [BM][128], 128 B swizzle
             const __grid_constant__ TmaDesc tw,   // W4: [N/32][KW/32 * 64] u64, box [BN/32][256]; W8: [N][KW]
             const __grid_constant__ TmaDesc ts,   // g128 s2 scales [KW/128][N] u8, box [1][BN]
             const __grid_constant__ TmaDesc tz,   // g128 -z bytes, same
             const u16* __restrict__ wscale,       // s1 (W4) / per-channel scale (W8), fp16 [N]
             const u16* __restrict__ wszero,       // s1 * z (W4 per-channel), fp16 [N]
             const u16* __restrict__ xscale,       // per-token scale, fp16 [M]
             const float* __restrict__ xsum,       // per-token sum (W4 per-channel), fp32 [M]
             const u16* __restrict__ bias,         // fp16 [N] or null
             u16* __restrict__ Y, long long ldy,   // output [M][N] fp16, row stride in elements
             int M, int N, int total_stages, int stages_per_split, int m_tiles, int n_tiles, int nsplit,
             int* __restrict__ ws, int* __restrict__ counters) {
    extern __shared__ __align__(1024) u8 smem_raw[];
    u8* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
    u64* full = reinterpret_cast<u64*>(smem + BAR_OFFSET);
    u64* empty = full + STAGES;
    int* last_flag = reinterpret_cast<int*>(empty + STAGES);
    const int wg = threadIdx.x >> 7, tid = threadIdx.x & 127, warp = tid >> 5, lane = tid & 31;
    const int rank = CL > 1 ? (int)cluster_ctarank() : 0;
    const int first = CL > 1 ? (int)cluster_id_x() : (int)blockIdx.x;
    const int stride = CL > 1 ? (int)cluster_count_x() : (int)gridDim.x;
    const int n_groups = n_tiles / CL;  // the host pads n_tiles to a multiple of CL
    const int units = m_tiles * n_groups * nsplit;

    if (threadIdx.x == 0) {
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(&full[s], 1);
            mbar_init(&empty[s], NWG / KWG * 4 * CL);  // the warps that read a stage, in every block of the cluster
        }
        mbar_init_fence();
    }
    __syncthreads();
    if constexpr (CL > 1) cluster_sync();  // the peer's barriers are initialised before anyone signals them

    if (wg == 0) {
        // ---- producer: one thread issues every copy ----
        regs_dealloc<PRODUCER_REGS>();
        if (tid != 0) return;
        tma_prefetch_desc(&tx);
        tma_prefetch_desc(&tw);
        if (IS_G128) {
            tma_prefetch_desc(&ts);
            tma_prefetch_desc(&tz);
        }
        int slot = 0;
        u32 phase = 0;
        for (int v = first; v < units; v += stride) {
            const Unit w = unit_of(v, m_tiles, n_groups, nsplit, rank);
            const int mt = w.mt, nt = w.nt;
            const int st0 = w.split * stages_per_split;
            const int nst = min(total_stages, st0 + stages_per_split) - st0;
            for (int st = 0; st < nst; ++st) {
                mbar_wait(&empty[slot], phase ^ 1);
                u8* base = smem + slot * STAGE_BYTES;
                const int kst = st0 + st;
                mbar_arrive_expect_tx(&full[slot], TX_BYTES);
                if constexpr (CL == 1) {
                    tma_load_2d(base, &tx, kst * BK, mt * BM, &full[slot]);
                } else {  // this block's rows of the activation tile, into every block of the cluster
                    tma_load_2d_multicast(base + rank * X_PART, &tx, kst * BK, mt * BM + rank * (BM / CL),
                                          &full[slot], (unsigned short)((1 << CL) - 1));
                }
                if (IS_W4) {
                    tma_load_2d(base + X_BYTES, &tw, kst * (BK / 32) * 64, nt * (BN / 32), &full[slot]);
                } else {
                    tma_load_2d(base + X_BYTES, &tw, kst * BK, nt * BN, &full[slot]);
                }
                if (IS_G128) {
                    tma_load_2d(base + X_BYTES + W_BYTES, &ts, nt * BN, kst, &full[slot]);
                    tma_load_2d(base + X_BYTES + W_BYTES + BN, &tz, nt * BN, kst, &full[slot]);
                }
                if (++slot == STAGES) {
                    slot = 0;
                    phase ^= 1;
                }
            }
        }
        if constexpr (CL > 1) cluster_sync();  // the peer is done with this block's barriers and memory
        return;
    }

    // ---- consumers ----
    regs_alloc<CONSUMER_REGS>();
    const int cwg = wg - 1;
    const int cb = (KWG == 1 ? cwg * 4 : 0) + warp;  // the warp's 32-channel block inside the tile
    const int ctid = threadIdx.x - 128;
    const int g = lane >> 2, t = lane & 3;
    u16* staged = reinterpret_cast<u16*>(smem + STAGES * STAGE_BYTES) + cwg * EPI_ROWS * OUT_PITCH;
    const bool vec_ok = (ldy % 8 == 0) && ((reinterpret_cast<u64>(Y) & 15) == 0);
    int q0 = 0;  // stages of this block's earlier units: stage st of a unit is the (q0 + st)-th of the ring
    u32 a1[2][2][4];
#pragma unroll
    for (int s = 0; s < 2; ++s)
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int r = 0; r < 4; ++r) a1[s][i][r] = 0;

    for (int v = first; v < units; v += stride) {
        const Unit w = unit_of(v, m_tiles, n_groups, nsplit, rank);
        const int mt = w.mt, nt = w.nt, tile = w.tile;
        const int st0 = w.split * stages_per_split;
        const int nst = min(total_stages, st0 + stages_per_split) - st0;
        int acc[2][HALF_ACC];
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int e = 0; e < HALF_ACC; ++e) acc[i][e] = 0;

        int prev_slot = -1;
        // KWG == 2: warpgroup c takes the unit's stages c, c + 2, ... (both hold the same 128 channels)
        for (int st = KWG == 1 ? 0 : cwg; st < nst; st += KWG) {
            const int slot = (q0 + st) % STAGES;
            const u32 phase = ((q0 + st) / STAGES) & 1;
            mbar_wait(&full[slot], phase);
            const u8* base = smem + slot * STAGE_BYTES;
            const u8* sw = base + X_BYTES;
            u32 mul[4] = {0, 0, 0, 0}, add[4] = {0, 0, 0, 0};
            if (IS_G128) {
                const int off = cb * 32 + 4 * g;
                g128_params(lds32(sw + W_BYTES + off), lds32(sw + W_BYTES + BN + off), mul, add);
            }
            u32 a0[2][2][4];
            load_a(sw, cb, 0, lane, mul, add, a0[0]);
            load_a(sw, cb, 1, lane, mul, add, a0[1]);
            issue_half(acc, a0, base, 0);
            wgmma_wait<1>();  // the previous stage's second half has retired: its slot and a1 are free
            keep_regs(a1);
            if (prev_slot >= 0 && lane == 0) release_slot(&empty[prev_slot]);
            load_a(sw, cb, 2, lane, mul, add, a1[0]);
            load_a(sw, cb, 3, lane, mul, add, a1[1]);
            issue_half(acc, a1, base, 2);
            wgmma_wait<1>();  // this stage's first half has retired: a0 is free
            keep_regs(a0);
            prev_slot = slot;
        }
        q0 += nst;
        wgmma_wait<0>();
        keep_regs(a1);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int e = 0; e < HALF_ACC; ++e) keep(acc[i][e]);
        if (prev_slot >= 0 && lane == 0) release_slot(&empty[prev_slot]);

        // ---- KWG == 2: the second warpgroup's sums join the first's through shared memory ----
        if (KWG == 2) {
            int* red = reinterpret_cast<int*>(smem + STAGES * STAGE_BYTES);  // [ACC][128], over the staging tiles
            named_bar(1, NCT);  // the first warpgroup's previous epilogue has left the staging tiles
            if (cwg == 1) {
#pragma unroll
                for (int i = 0; i < 2; ++i)
#pragma unroll
                    for (int e = 0; e < HALF_ACC; ++e) red[(i * HALF_ACC + e) * 128 + tid] = acc[i][e];
            }
            named_bar(1, NCT);
            if (cwg == 1) continue;
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int e = 0; e < HALF_ACC; ++e) acc[i][e] += red[(i * HALF_ACC + e) * 128 + tid];
            named_bar(2, 128);  // every sum read before the staging tile is written
        }

        // ---- split-K: partials out; the tile's last unit sums them ----
        if (nsplit > 1) {
            int* mine = ws + (long long)w.wu * ACC * EPI_T + ctid;
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int e = 0; e < HALF_ACC; ++e) mine[(i * HALF_ACC + e) * EPI_T] = acc[i][e];
            __threadfence();
            named_bar(4, EPI_T);
            if (ctid == 0) {
                const int prev = atomicAdd(counters + tile, 1);
                const int last = prev == nsplit - 1;
                if (last) counters[tile] = 0;  // every other unit of the tile has arrived: reset for reuse
                *last_flag = last;
            }
            named_bar(4, EPI_T);
            if (!*reinterpret_cast<volatile int*>(last_flag)) continue;
            __threadfence();
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int e = 0; e < HALF_ACC; ++e) acc[i][e] = 0;
            const int* parts = ws + (long long)tile * nsplit * ACC * EPI_T + ctid;
            for (int sp = 0; sp < nsplit; ++sp) {
                const int* p = parts + (long long)sp * ACC * EPI_T;
#pragma unroll
                for (int i = 0; i < 2; ++i)
#pragma unroll
                    for (int e = 0; e < HALF_ACC; ++e) acc[i][e] += ld_cg(p + (i * HALF_ACC + e) * EPI_T);
            }
        }

        // ---- epilogue: scales (+ bias) into this warpgroup's [BM][128] staging tile, then 16-byte stores ----
        const int n_wg = nt * BN + cwg * 128;
        const int m0 = mt * BM;
        named_bar(2 + cwg, 128);  // the warpgroup's previous tile has left the staging tile
        float wsv[2][2], wszv[2][2], bv[2][2];
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int n = min(n_wg + warp * 32 + 16 * i + g + 8 * h, N - 1);
                wsv[i][h] = h2f(wscale[n]);
                wszv[i][h] = MODE == 0 ? h2f(wszero[n]) : 0.f;
                bv[i][h] = bias ? h2f(bias[n]) : 0.f;
            }
#pragma unroll
        for (int r0 = 0; r0 < BM; r0 += EPI_ROWS) {  // EPI_ROWS token rows at a time through the staging tile
            if (r0 > 0) named_bar(2 + cwg, 128);  // the previous rows' stores have read the staging tile
#pragma unroll
            for (int j = r0 / 8; j < (r0 + EPI_ROWS) / 8; ++j) {
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int ml = 8 * j + 2 * t + c;
                    const int m = min(m0 + ml, M - 1);
                    const float xs = h2f(xscale[m]);
                    const float xsm = MODE == 0 ? xsum[m] : 0.f;
#pragma unroll
                    for (int i = 0; i < 2; ++i)
#pragma unroll
                        for (int h = 0; h < 2; ++h)
                            staged[(ml - r0) * OUT_PITCH + warp * 32 + 16 * i + g + 8 * h] =
                                out_value(acc[i][4 * j + 2 * h + c], wsv[i][h], wszv[i][h], xs, xsm, bv[i][h],
                                          bias != nullptr);
                }
            }
            named_bar(2 + cwg, 128);
#pragma unroll 4
            for (int c = tid; c < EPI_ROWS * 16; c += 128) {
                const int ml = r0 + (c >> 4), nl = (c & 15) * 8;
                const int m = m0 + ml, n = n_wg + nl;
                if (m >= M || n >= N) continue;
                u16* dst = Y + (long long)m * ldy + n;
                const u16* src = staged + (ml - r0) * OUT_PITCH + nl;
                if (vec_ok) {
                    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
                } else {
                    for (int e = 0; e < 8 && n + e < N; ++e) dst[e] = src[e];
                }
            }
        }
    }
    if constexpr (CL > 1) cluster_sync();  // no block leaves while its peer may still signal or fill it
}
