// Hopper (sm_90a) causal prefill attention over packed sequences, FlashAttention-3 style: TMA-fed K/V tiles,
// fp16 wgmma for S = Q K^T and O += P V, two consumer warpgroups ping-ponging their tensor-core turns.
// Same semantics as qs_prefill_attn in cuda/attention.cu (numpy twin and tolerance: kernels/attention.py):
// sequence s owns the packed rows cu_seqlens[s] .. cu_seqlens[s + 1] - 1 of q / k / v / out; its keys are
// the `cached` = context_lens[s] - new positions of its pages (the paged pool, kernels/paged_kv.py) followed
// by its fresh K/V rows, and query row i (position cached + i) sees the keys at positions <= cached + i.
//
// Block (head, query tile of 128 rows, sequence), 384 threads, the heaviest query tiles first:
// - warpgroup 0, the producer (registers given back with setmaxnreg): thread 0 brings the Q tile and every
//   fresh K/V tile with bulk tensor copies (TMA, 128-byte swizzle, 64-channel boxes); cached tiles (keys
//   from the pages, a minority of the work) are dequantized by all 128 producer threads with ordinary loads
//   into the same swizzled layout ((code - zero) * scale in fp32, rounded to fp16, as the mma.sync kernel;
//   positions past the cached length are written as zeros), then published with a proxy fence.
//   A STAGES-deep ring of (K tile, V tile) stages of 128 keys, `full` / `empty` mbarriers.
// - warpgroups 1 and 2, the consumers, own query rows 0-63 and 64-127 of the tile. Per key tile n, in the
//   warpgroup's turn (named barriers 1 and 2 alternate the turns): S_n = Q K_n^T (A and B from shared
//   memory, K-major) and O += P_{n-1} V_{n-1} (P from registers: the fp32 S accumulators of the previous
//   tile packed to fp16 are exactly wgmma's A fragment; V N-major, transposed by wgmma). Out of turn: the
//   online softmax of S_n (exp2 with the log2(e)-folded scale, running max and sum in registers) while the
//   other warpgroup's products run. Causal masking only on the diagonal tile, the cached prefix's last tile
//   masked past the cached length.
// Key tiles: ceil(cached / 128) cached tiles (positions 0 ..), then the fresh tiles 0 .. qt (fresh key j
// of tile j is at fresh row j * 128 + column); the diagonal tile is the last one.
// Fresh K/V rows past the sequence are other sequences' rows (or zeros past the tensor): only masked keys
// read them, so they must be finite (they are: real K/V); output rows past the sequence are not written.
//
// Macros: QS_D head_dim (64 or 128), QS_BITS page format 4, 8 or 16, QS_STAGES ring depth, QS_PV_SPLIT 1 to
// issue O += P V as 64-channel halves (no leading byte offset in the V descriptor), QS_DEBUG 1 / 2: debug
// entry (one key tile; writes the raw S tile, or O = fp16(S) V of that tile, fp32, to `dbg`).
#include "common.cuh"
#include "sm90.cuh"

#ifndef QS_D
#define QS_D 128
#endif
#ifndef QS_BITS
#define QS_BITS 16
#endif
#ifndef QS_STAGES
#define QS_STAGES 2
#endif
#ifndef QS_PV_SPLIT
#define QS_PV_SPLIT 0
#endif
#ifndef QS_DEBUG
#define QS_DEBUG 0
#endif

namespace {

constexpr int D = QS_D;
constexpr int BITS = QS_BITS;
constexpr int STAGES = QS_STAGES;
constexpr int BM = 128;                    // query rows per block (64 per consumer warpgroup)
constexpr int BN = 128;                    // keys per tile
constexpr int NSUB = D / 64;               // 64-channel (128-byte) column blocks of a row
constexpr int SUB_BYTES = BN * 128;        // one column block of a K or V tile (= of the Q tile: BM == BN)
constexpr int KV_BYTES = NSUB * SUB_BYTES; // one K (or V) tile
constexpr int STAGE_BYTES = 2 * KV_BYTES;
constexpr int Q_BYTES = NSUB * BM * 128;
constexpr int BAR_OFFSET = Q_BYTES + STAGES * STAGE_BYTES;
constexpr int SMEM_BYTES = 1024 + BAR_OFFSET + (2 * STAGES + 1) * 8;
constexpr int NTHREADS = 384;
constexpr int CONSUMER_REGS = 232;
constexpr int PRODUCER_REGS = 40;
constexpr int RB = D * BITS / 8;           // bytes of one (kv head, token) row in a page
constexpr int CH = D / 8;                  // 16-byte chunks of an fp16 row
static_assert(D == 64 || D == 128, "head_dim 64 or 128");
static_assert(BITS == 4 || BITS == 8 || BITS == 16, "kv bits 4, 8 or 16");
static_assert(BM == BN, "the Q tile and the K/V tiles share one TMA box shape");
static_assert(STAGES >= 2, "at least two stages");
static_assert(SMEM_BYTES <= 227 * 1024, "shared memory");


// Byte offset of 16-byte chunk c (of CH) of row r in a tile of 64-channel blocks, TMA's 128-byte swizzle.
__device__ __forceinline__ u32 swz(int r, int c) {
    return (c >> 3) * SUB_BYTES + r * 128 + (((c & 7) ^ (r & 7)) << 4);
}
__device__ __forceinline__ void st_shared_v4(u32 addr, u32 a, u32 b, u32 c, u32 d) {
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(a), "r"(b), "r"(c), "r"(d)
                 : "memory");
}

// 8 channels (chunk c) of a cached (kv head, token) entry of a page, as fp16: (code - zero) * scale in fp32.
__device__ __forceinline__ uint4 dequant8(const u8* page, int entry, int c, long long sc_off, long long zr_off) {
    const u8* row = page + (long long)entry * RB;
    if constexpr (BITS == 16) {
        return *reinterpret_cast<const uint4*>(row + 16 * c);
    } else {
        const float s = h2f(*reinterpret_cast<const u16*>(page + sc_off + 2 * entry));
        const float z = h2f(*reinterpret_cast<const u16*>(page + zr_off + 2 * entry));
        u32 h[4];
        if constexpr (BITS == 4) {
            const u32 w = *reinterpret_cast<const u32*>(row + 4 * c);  // channel 2i low nibble of byte i
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const u32 b = (w >> (8 * j)) & 0xffu;
                h[j] = pack_h2(fmul_rn(fsub_rn((float)(b & 15u), z), s), fmul_rn(fsub_rn((float)(b >> 4), z), s));
            }
        } else {
            const uint2 w = *reinterpret_cast<const uint2*>(row + 8 * c);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const u32 word = j < 2 ? w.x : w.y;
                const u32 b0 = (word >> (16 * (j & 1))) & 0xffu, b1 = (word >> (16 * (j & 1) + 8)) & 0xffu;
                h[j] = pack_h2(fmul_rn(fsub_rn((float)b0, z), s), fmul_rn(fsub_rn((float)b1, z), s));
            }
        }
        return make_uint4(h[0], h[1], h[2], h[3]);
    }
}

// Cached key tile n (positions n * BN ..) of kv head kvh into a stage, by the 128 producer threads.
__device__ __forceinline__ void fill_cached(u32 sk, const u8* __restrict__ k_pool, const u8* __restrict__ v_pool,
                                            long long page_bytes, const int* __restrict__ bt, int n, int cached,
                                            int kvh, int num_kv_heads, int tid) {
    const long long sc_off = (long long)num_kv_heads * 64 * RB;
    const long long zr_off = sc_off + (long long)num_kv_heads * 128;
    const u32 sv = sk + KV_BYTES;
#pragma unroll 1
    for (int idx = tid; idx < BN * CH; idx += 128) {
        const int r = idx / CH, c = idx - r * CH;
        const int pos = n * BN + r;
        uint4 kx = make_uint4(0, 0, 0, 0), vx = kx;
        if (pos < cached) {
            const long long page = bt[pos >> 6];
            const int entry = kvh * 64 + (pos & 63);
            kx = dequant8(k_pool + page * page_bytes, entry, c, sc_off, zr_off);
            vx = dequant8(v_pool + page * page_bytes, entry, c, sc_off, zr_off);
        }
        st_shared_v4(sk + swz(r, c), kx.x, kx.y, kx.z, kx.w);
        st_shared_v4(sv + swz(r, c), vx.x, vx.y, vx.z, vx.w);
    }
}

// S[64 x BN] = Q[64 rows of this warpgroup] K^T: D / 16 k-steps of 32 bytes inside 128-byte swizzled rows.
__device__ __forceinline__ void issue_s(float (&s)[BN / 2], const u8* sq, const u8* sk) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const int off = (kk >> 2) * SUB_BYTES + (kk & 3) * 32;
        wgmma_f16_ss<BN>(s, desc_sw128(sq + (kk >> 2) * (BM * 128) + (kk & 3) * 32), desc_sw128(sk + off),
                         kk > 0);
    }
}

// O[64 x D] += P[64 x BN] V[BN x D]: BN / 16 k-steps of 16 keys (2048 bytes of the N-major V tile).
__device__ __forceinline__ void issue_pv(float (&o)[D / 2], const u32 (&p)[BN / 4], const u8* sv) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
        if constexpr (QS_PV_SPLIT || D == 64) {
#pragma unroll
            for (int h = 0; h < NSUB; ++h)
                wgmma_f16_rs_tn<64>(o + 32 * h, p + 4 * kk, desc_sw128_mn(sv + h * SUB_BYTES + kk * 2048, 0));
        } else {
            wgmma_f16_rs_tn<D>(o, p + 4 * kk, desc_sw128_mn(sv + kk * 2048, SUB_BYTES));
        }
    }
}

struct Softmax {
    float m0, m1, l0, l1;  // running max (log2 units) and this thread's partial sums, rows g and g + 8
};

// Masks columns >= lim0 / lim1 (rows g / g + 8), updates the running max, turns s into exp2(s * scale - m)
// and returns the rescale factors of the previous accumulators.
__device__ __forceinline__ void softmax_step(float (&s)[BN / 2], Softmax& st, int lim0, int lim1,
                                             float scale_log2, int t, float& a0, float& a1) {
    if (lim0 < BN || lim1 < BN) {
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int col = 8 * j + 2 * t + e;
                if (col >= lim0) s[4 * j + e] = NEG_INF;
                if (col >= lim1) s[4 * j + 2 + e] = NEG_INF;
            }
        }
    }
    float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
        mx0 = fmaxf(mx0, fmaxf(s[4 * j], s[4 * j + 1]));
        mx1 = fmaxf(mx1, fmaxf(s[4 * j + 2], s[4 * j + 3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    const float n0 = fmaxf(st.m0, mx0 * scale_log2), n1 = fmaxf(st.m1, mx1 * scale_log2);
    const float u0 = n0 == NEG_INF ? 0.0f : n0, u1 = n1 == NEG_INF ? 0.0f : n1;
    a0 = ex2(st.m0 - u0);
    a1 = ex2(st.m1 - u1);
    st.m0 = n0;
    st.m1 = n1;
    float ps0 = 0.0f, ps1 = 0.0f;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
        s[4 * j] = ex2(s[4 * j] * scale_log2 - u0);
        s[4 * j + 1] = ex2(s[4 * j + 1] * scale_log2 - u0);
        s[4 * j + 2] = ex2(s[4 * j + 2] * scale_log2 - u1);
        s[4 * j + 3] = ex2(s[4 * j + 3] * scale_log2 - u1);
        ps0 += s[4 * j] + s[4 * j + 1];
        ps1 += s[4 * j + 2] + s[4 * j + 3];
    }
    st.l0 = st.l0 * a0 + ps0;
    st.l1 = st.l1 * a1 + ps1;
}

__device__ __forceinline__ void to_p(const float (&s)[BN / 2], u32 (&p)[BN / 4]) {
#pragma unroll
    for (int i = 0; i < BN / 4; ++i) p[i] = pack_h2(s[2 * i], s[2 * i + 1]);
}

template <int N>
__device__ __forceinline__ void keep_all(float (&x)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) keep(x[i]);
}
template <int N>
__device__ __forceinline__ void keep_all(u32 (&x)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) keep(x[i]);
}

// Valid key columns of tile n for a row of the block (row_local 0..127): cached tiles all columns below the
// cached length, fresh tiles all but the diagonal one (columns <= row_local).
__device__ __forceinline__ int key_limit(int n, int nct, int cached, int qt, int row_local) {
    if (n < nct) return min(BN, cached - n * BN);
    return n - nct == qt ? row_local + 1 : BN;
}

// Debug entries: this thread's accumulators of a 64 x N tile into row-major fp32 [128][N] (rows of the block).
template <int HALF>
__device__ __forceinline__ void dump(const float (&acc)[HALF], float* dbg, int row_local, int t) {
    constexpr int N = 2 * HALF;
    float* d = dbg + (long long)row_local * N;
#pragma unroll
    for (int j = 0; j < N / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) d[(e >> 1) * 8 * N + 8 * j + 2 * t + (e & 1)] = acc[4 * j + e];
    }
}

// The consumers' turns: named barrier 1 + w is warpgroup w's turn to issue wgmmas.
__device__ __forceinline__ void turn_wait(int cwg) { named_bar(1 + cwg, 256); }
__device__ __forceinline__ void turn_pass(int cwg) { named_bar_arrive(2 - cwg, 256); }

}  // namespace

// Read by the loader to check its own copy of the launch geometry.
extern "C" __device__ const int qs_prefill_sm90_smem_bytes = SMEM_BYTES;
extern "C" __device__ const int qs_prefill_sm90_threads = NTHREADS;

// Grid (num_heads, query tiles of the longest sequence, num_seqs), 384 threads. tq / tk / tv: byte-typed
// 2-D maps over q [T][H * D], k and v [T][KVH * D] (fp16 as bytes), box 128 bytes x 128 rows, 128-byte swizzle.
extern "C" __global__ void __launch_bounds__(NTHREADS, 1)
qs_prefill_sm90(const __grid_constant__ TmaDesc tq, const __grid_constant__ TmaDesc tk,
                const __grid_constant__ TmaDesc tv, const int* __restrict__ cu_seqlens,
                const int* __restrict__ context_lens, const u8* __restrict__ k_pool,
                const u8* __restrict__ v_pool, long long page_bytes, const int* __restrict__ block_tables,
                int bt_stride, int num_heads, int num_kv_heads, float scale_log2, u16* __restrict__ out,
                long long ldo, float* __restrict__ dbg) {
    extern __shared__ __align__(1024) u8 smem_raw[];
    u8* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
    const int seq = blockIdx.z, h = blockIdx.x;
    const int qt = gridDim.y - 1 - blockIdx.y;  // longest (diagonal-heavy) tiles first
    const int q0 = cu_seqlens[seq];
    const int nq = cu_seqlens[seq + 1] - q0;
    const int m0 = qt * BM;
    if (m0 >= nq) return;  // uniform over the block, before any barrier
    const int cached = context_lens[seq] - nq;
    const int nct = cached > 0 ? (cached + BN - 1) / BN : 0;
    const int nt = QS_DEBUG ? 1 : nct + qt + 1;
    const int kvh = h / (num_heads / num_kv_heads);
    u8* sq = smem;
    u8* stages = smem + Q_BYTES;
    u64* full = reinterpret_cast<u64*>(smem + BAR_OFFSET);
    u64* empty = full + STAGES;
    u64* qbar = empty + STAGES;
    const int wg = threadIdx.x >> 7, tid = threadIdx.x & 127, warp = tid >> 5, lane = tid & 31;

    if (threadIdx.x == 0) {
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(&full[s], 1);
            mbar_init(&empty[s], 8);  // one arrival per consumer warp
        }
        mbar_init(qbar, 1);
        mbar_init_fence();
    }
    __syncthreads();

    if (wg == 0) {
        // ---- producer ----
        regs_dealloc<PRODUCER_REGS>();
        if (tid == 0) {
            tma_prefetch_desc(&tq);
            tma_prefetch_desc(&tk);
            tma_prefetch_desc(&tv);
            mbar_arrive_expect_tx(qbar, Q_BYTES);
#pragma unroll
            for (int c = 0; c < NSUB; ++c) tma_load_2d(sq + c * (BM * 128), &tq, (h * D + 64 * c) * 2, q0 + m0, qbar);
        }
        const int* bt = block_tables + (long long)seq * bt_stride;
#pragma unroll 1
        for (int n = 0; n < nt; ++n) {
            const int slot = n % STAGES;
            const u32 phase = (n / STAGES) & 1;
            u8* sk = stages + slot * STAGE_BYTES;
            if (n < nct) {
                mbar_wait(&empty[slot], phase ^ 1);
                fill_cached(smem_addr(sk), k_pool, v_pool, page_bytes, bt, n, cached, kvh, num_kv_heads, tid);
                fence_proxy_async();
                named_bar(3, 128);
                if (tid == 0) mbar_arrive(&full[slot]);
            } else if (tid == 0) {
                mbar_wait(&empty[slot], phase ^ 1);
                const int row = q0 + (n - nct) * BN;
                mbar_arrive_expect_tx(&full[slot], STAGE_BYTES);
#pragma unroll
                for (int c = 0; c < NSUB; ++c) {
                    tma_load_2d(sk + c * SUB_BYTES, &tk, (kvh * D + 64 * c) * 2, row, &full[slot]);
                    tma_load_2d(sk + KV_BYTES + c * SUB_BYTES, &tv, (kvh * D + 64 * c) * 2, row, &full[slot]);
                }
            }
        }
        return;
    }

    // ---- consumers ----
    regs_alloc<CONSUMER_REGS>();
    const int cwg = wg - 1;
    const int g = lane >> 2, t = lane & 3;
    const int row_local = cwg * 64 + warp * 16 + g;  // this thread's rows: row_local and row_local + 8
    const u8* sq_wg = sq + cwg * 64 * 128;
    float s[BN / 2], o[D / 2];
    u32 p[BN / 4];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
    Softmax st{NEG_INF, NEG_INF, 0.0f, 0.0f};
    float a0, a1;
    if (cwg == 1) turn_pass(cwg);  // warpgroup 0 goes first
    mbar_wait(qbar, 0);

    // tile 0: S only
    mbar_wait(&full[0], 0);
    turn_wait(cwg);
    wgmma_fence();
    issue_s(s, sq_wg, stages);
    wgmma_commit();
    turn_pass(cwg);
    wgmma_wait<0>();
    keep_all(s);
    if constexpr (QS_DEBUG == 1) {
        dump(s, dbg, row_local, t);
        return;
    }
    if constexpr (QS_DEBUG != 2) {
        softmax_step(s, st, key_limit(0, nct, cached, qt, row_local), key_limit(0, nct, cached, qt, row_local + 8),
                     scale_log2, t, a0, a1);
    }
    to_p(s, p);

    for (int n = 1; n < nt; ++n) {
        const int slot = n % STAGES, prev = (n - 1) % STAGES;
        mbar_wait(&full[slot], (n / STAGES) & 1);
        turn_wait(cwg);
        wgmma_fence();
        issue_s(s, sq_wg, stages + slot * STAGE_BYTES);
        wgmma_commit();
        issue_pv(o, p, stages + prev * STAGE_BYTES + KV_BYTES);
        wgmma_commit();
        turn_pass(cwg);
        wgmma_wait<1>();  // S_n is complete; O += P_{n-1} V_{n-1} may still run
        keep_all(s);
        softmax_step(s, st, key_limit(n, nct, cached, qt, row_local), key_limit(n, nct, cached, qt, row_local + 8),
                     scale_log2, t, a0, a1);
        wgmma_wait<0>();
        keep_all(o);
        keep_all(p);
        if (lane == 0) mbar_arrive(&empty[prev]);
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            o[4 * j] *= a0;
            o[4 * j + 1] *= a0;
            o[4 * j + 2] *= a1;
            o[4 * j + 3] *= a1;
        }
        to_p(s, p);
    }
    const int last = (nt - 1) % STAGES;
    turn_wait(cwg);
    wgmma_fence();
    issue_pv(o, p, stages + last * STAGE_BYTES + KV_BYTES);
    wgmma_commit();
    if (cwg == 0) turn_pass(cwg);  // warpgroup 1's last turn is not passed on (the counts balance)
    wgmma_wait<0>();
    keep_all(o);
    keep_all(p);
    if (lane == 0) mbar_arrive(&empty[last]);

    if constexpr (QS_DEBUG == 2) {
        dump(o, dbg, row_local, t);
        return;
    }
    // ---- epilogue: O / l in fp16, rows of this sequence only ----
    float l0 = st.l0, l1 = st.l1;
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float r0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, r1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    const int row0 = m0 + row_local;
    u16* o0 = out + (long long)(q0 + row0) * ldo + (long long)h * D + 2 * t;
    u16* o1 = o0 + 8 * ldo;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
        if (row0 < nq) *reinterpret_cast<u32*>(o0 + 8 * j) = pack_h2(o[4 * j] * r0, o[4 * j + 1] * r0);
        if (row0 + 8 < nq) *reinterpret_cast<u32*>(o1 + 8 * j) = pack_h2(o[4 * j + 2] * r1, o[4 * j + 3] * r1);
    }
}
