// Attention over the paged KV cache (page layout: qserve_lite/kernels/paged_kv.py). Numpy twins and the
// stated tolerances: qserve_lite/kernels/attention.py. fp16 tensor cores (mma.sync m16n8k16, fp32 accumulate).
//
// qs_decode_attn: one query token per sequence (flash-decoding). Block = (split of the context, kv head,
//   sequence), QS_WARPS warps taking the split's 16-token tiles in turn; the block serves all query heads
//   of its kv head (up to 8; more go to further blocks), so each K/V byte is read once.
//   - S = Q K^T with Q (heads, padded to 16 rows) as A and the raw K codes as B: a byte of two 4-bit codes
//     becomes a half2 with one `and | or` and one `sub.f16x2` (0x6400 magic), exact. The channel order
//     inside a thread's slice of the head is permuted, and q is loaded with the same permutation. Scale
//     and zero are applied per token after the dot product: S = s * (q.c - z * sum(q)).
//   - O^T = V^T P^T: the V codes of two tokens are interleaved (prmt) into half2 pairs along the token
//     axis and used as A; B = P' = p * s_v in fp16, taken straight from the S accumulators (same thread);
//     the zero's term sum_t P'_t z_t is subtracted at the end. Online softmax in fp32 (exp2).
//   - Page ids of the split are staged in shared memory; each warp streams its tiles through a private
//     ring of cp.async stages (several tiles in flight per warp without spending registers). Warps are
//     merged through shared memory; with one split the block writes fp16 output, otherwise fp32 partials
//     (o, m, l), and the last split of each (sequence, kv head) to finish combines them (one launch).
//   - Sizes come from device buffers (context_lens, block_tables): the grid depends only on host-side
//     bounds, so the pair of launches can be captured in a CUDA graph.
// qs_prefill_attn: causal prefill over packed variable-length sequences (cu_seqlens), FlashAttention-2
//   style: block = QS_PF_WARPS warps x 16 query rows of one head, 64-key tiles double-buffered in shared
//   memory (cp.async, XOR swizzle, ldmatrix; the Q tile passes through the second stage into registers),
//   GQA by head index, the heaviest (last) query tiles of every head scheduled first. Keys at positions < cached (context -
//   new tokens) come from the paged cache (dequantized to fp16 on the way into shared memory), the rest
//   from the fresh fp16 K/V of the chunk.
//
// Macros: QS_D head_dim (64 or 128), QS_BITS page format 4, 8 or 16, QS_WARPS decode warps per block,
// QS_PF_WARPS prefill warps per block, QS_DEC_SUB (optional) 16-token subtiles per decode tile (1, 2, 4).
#include "common.cuh"

#ifndef QS_D
#define QS_D 128
#endif
#ifndef QS_BITS
#define QS_BITS 4
#endif
#ifndef QS_WARPS
#define QS_WARPS 4
#endif
#ifndef QS_PF_WARPS
#define QS_PF_WARPS 4
#endif

namespace {

constexpr int D = QS_D;
constexpr int BITS = QS_BITS;
constexpr bool QUANT = BITS != 16;
constexpr int RB = D * BITS / 8;  // bytes of one (kv head, token) row in a page
static_assert(D == 64 || D == 128, "head_dim 64 or 128");
static_assert(BITS == 4 || BITS == 8 || BITS == 16, "kv bits 4, 8 or 16");

constexpr u32 MAGIC = 0x64006400u;  // half2(1024, 1024)
struct __align__(8) uint2_t {
    u32 x, y;
};
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ u32 hsub2(u32 a, u32 b) {
    u32 r;
    asm("sub.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}
// half2 (c0, c1) from (x & 0x000F000F) or (x & 0x00FF00FF): integers 0..255 in the low byte of each half.
__device__ __forceinline__ u32 nib2h(u32 x) { return hsub2((x & 0x000F000Fu) | MAGIC, MAGIC); }
__device__ __forceinline__ u32 byte2h(u32 x) { return hsub2((x & 0x00FF00FFu) | MAGIC, MAGIC); }
__device__ __forceinline__ u32 pack_h2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ float lo_h(u32 x) { return h2f((u16)(x & 0xffffu)); }
__device__ __forceinline__ float hi_h(u32 x) { return h2f((u16)(x >> 16)); }
__device__ __forceinline__ float ex2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}
// ---------------------------------------------------------------------------------------------------------
// Decode
// ---------------------------------------------------------------------------------------------------------
namespace dec {
constexpr int W = QS_WARPS;
constexpr int NCH = D / 16;             // k-chunks of Q K^T, and m-tiles (16 channels) of O^T
constexpr int KWORDS = D / 4 * BITS / 32;  // K words a thread loads per token (D/4 channels)
constexpr int VWORDS = D / 8 * BITS / 32;  // V words a thread loads per token (D/8 channels)
// A tile is SUB 16-token subtiles sharing one softmax update (KV4 is instruction-bound: amortize it).
#ifdef QS_DEC_SUB
constexpr int SUB = QS_DEC_SUB;
#else
constexpr int SUB = BITS == 4 ? 2 : 1;
#endif
constexpr int TT = 16 * SUB;            // tokens per tile (divides a 64-token page)
// Per-warp ring of cp.async stages: the bytes in flight per SM come from shared memory, not registers.
constexpr int STAGES = (BITS == 16 || SUB > 2) ? 2 : 3;
constexpr int SC_BYTES = QUANT ? 2 * TT : 0;  // one of: K scales, K zeros, V scales, V zeros
constexpr int TILE_BYTES = 2 * TT * RB + 4 * SC_BYTES;  // K rows, V rows, then the scale / zero arrays
constexpr int RING_BYTES = W * STAGES * TILE_BYTES;
constexpr int MERGE_BYTES = W * (8 * D + 24) * 4;
constexpr int FIXED_SMEM = (RING_BYTES > MERGE_BYTES ? RING_BYTES : MERGE_BYTES) + 16;

struct Sub {
    u32 k[2][KWORDS];  // tokens g and g + 8 of the subtile, channels (D/4) t ..
    u32 v[4][VWORDS];  // tokens 2t, 2t+1, 2t+8, 2t+9, channels (D/8) g ..
    u32 ks[2], kz[2], vs[2], vz[2];  // half2 scale / zero of tokens (2t, 2t+1) and (2t+8, 2t+9)
};

// D = A * B + D (m16n8k16 f16, f32 accumulate); not volatile, so the compiler may interleave it.
__device__ __forceinline__ void mma16816(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One tile of one kv head (rows entry0 .. entry0 + TT - 1 of a page) into a ring stage.
__device__ __forceinline__ void issue_tile(u32 dst, const u8* kpage, const u8* vpage, int entry0,
                                           long long sc_off, long long zr_off, int lane) {
    const u8* ksrc = kpage + (long long)entry0 * RB;
    const u8* vsrc = vpage + (long long)entry0 * RB;
#pragma unroll
    for (int i = lane; i < TT * RB / 16; i += 32) {
        cp_async16(dst + 16 * i, ksrc + 16 * i, 16);
        cp_async16(dst + TT * RB + 16 * i, vsrc + 16 * i, 16);
    }
    if constexpr (QUANT) {
        constexpr int PER = SC_BYTES / 16 > 0 ? SC_BYTES / 16 : 1;  // 16-byte chunks per array
        if (lane < 4 * PER) {
            const int which = lane / PER, part = lane % PER;  // 0 K scales, 1 K zeros, 2 V scales, 3 V zeros
            const u8* src = (which >= 2 ? vpage : kpage) + ((which & 1) ? zr_off : sc_off) + 2 * entry0;
            cp_async16(dst + 2 * TT * RB + SC_BYTES * which + 16 * part, src + 16 * part, 16);
        }
    }
}

template <int N>
__device__ __forceinline__ void lds_words(u32* r, u32 addr) {
    if constexpr (N % 4 == 0) {
#pragma unroll
        for (int i = 0; i < N / 4; ++i)
            asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                         : "=r"(r[4 * i]), "=r"(r[4 * i + 1]), "=r"(r[4 * i + 2]), "=r"(r[4 * i + 3])
                         : "r"(addr + 16 * i));
    } else if constexpr (N == 2) {
        asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
    } else {
        asm volatile("ld.shared.u32 %0, [%1];" : "=r"(r[0]) : "r"(addr));
    }
}

__device__ __forceinline__ void smem_sub(Sub& T, u32 base, int j, int g, int t) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
        lds_words<KWORDS>(T.k[nt], base + (16 * j + 8 * nt + g) * RB + t * (KWORDS * 4));
#pragma unroll
    for (int i = 0; i < 4; ++i)
        lds_words<VWORDS>(T.v[i], base + TT * RB + (16 * j + 8 * (i >> 1) + 2 * t + (i & 1)) * RB +
                                      g * (VWORDS * 4));
    if constexpr (QUANT) {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
            const u32 e = base + 2 * TT * RB + 2 * (16 * j + 8 * nt + 2 * t);
            lds_words<1>(&T.ks[nt], e);
            lds_words<1>(&T.kz[nt], e + SC_BYTES);
            lds_words<1>(&T.vs[nt], e + 2 * SC_BYTES);
            lds_words<1>(&T.vz[nt], e + 3 * SC_BYTES);
        }
    }
}

// Channel of q (within the head) feeding A-fragment element (chunk c, half `second` of the k range, e).
__device__ __forceinline__ int q_channel(int t, int c, int second, int e) {
    const int base = (D / 4) * t;
    if constexpr (BITS == 4) return base + 8 * (c >> 1) + 2 * (c & 1) + second + 4 * e;
    return base + 4 * c + 2 * second + e;
}

// K B-fragments of chunk c. Codes come as 1024 + code (the magic exponent, no subtraction): the 1024 is
// folded into the zero point (S = s * (q.(1024 + c) - (1024 + z) * sum(q))).
__device__ __forceinline__ void k_frag(const u32* kw, int c, u32& b0, u32& b1) {
    if constexpr (BITS == 4) {
        const u32 x = kw[c >> 1] >> (8 * (c & 1));
        b0 = (x & 0x000F000Fu) | MAGIC;
        b1 = ((x >> 4) & 0x000F000Fu) | MAGIC;
    } else if constexpr (BITS == 8) {
        b0 = byte_perm(kw[c], 0x64646464u, 0x5140);
        b1 = byte_perm(kw[c], 0x64646464u, 0x7362);
    } else {
        b0 = kw[2 * c];
        b1 = kw[2 * c + 1];
    }
}

// h[j] = half2(V[a][channel j], V[b][channel j]) for the thread's D/8 channels (j = 0 .. D/8 - 1).
__device__ __forceinline__ void v_pairs(const u32* va, const u32* vb, u32* h) {
    if constexpr (BITS == 4) {
#pragma unroll
        for (int w = 0; w < VWORDS; ++w) {
#pragma unroll
            for (int kk = 0; kk < 2; ++kk) {
                const u32 x = byte_perm(va[w], vb[w], kk ? 0x7632 : 0x5410);
#pragma unroll
                for (int e = 0; e < 4; ++e) h[8 * w + 4 * kk + e] = nib2h(x >> (4 * e));
            }
        }
    } else if constexpr (BITS == 8) {
#pragma unroll
        for (int w = 0; w < VWORDS; ++w) {
#pragma unroll
            for (int kk = 0; kk < 4; ++kk)
                h[4 * w + kk] = byte2h(byte_perm(va[w], vb[w], kk | (kk << 4) | ((4 + kk) << 8) | ((4 + kk) << 12)));
        }
    } else {
#pragma unroll
        for (int w = 0; w < VWORDS; ++w) {
            h[2 * w] = byte_perm(va[w], vb[w], 0x5410);
            h[2 * w + 1] = byte_perm(va[w], vb[w], 0x7632);
        }
    }
}

struct State {
    float m, l, corr;        // running max (log2 units), partial sum, partial zero term (head g)
    float acc[NCH][4];       // O^T: channels (D/8) g + 2i (+1), heads 2t, 2t+1
};

// One tile (SUB subtiles) read from ring stage `base`: scores, one online-softmax update, P V.
__device__ __forceinline__ void compute_tile(u32 base, State& st, const u32 (*qa)[2], float qsum,
                                             int tok0, int ctx, float scale_log2, int lane) {
    const int g = lane >> 2, t = lane & 3;
    Sub T[SUB];
#pragma unroll
    for (int j = 0; j < SUB; ++j) smem_sub(T[j], base, j, g, t);
    float s[SUB][2][4];
#pragma unroll
    for (int j = 0; j < SUB; ++j) {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
            s[j][nt][0] = s[j][nt][1] = s[j][nt][2] = s[j][nt][3] = 0.0f;
#pragma unroll
            for (int c = 0; c < NCH; ++c) {
                u32 b0, b1;
                k_frag(T[j].k[nt], c, b0, b1);
                mma16816(s[j][nt], qa[c][0], 0u, qa[c][1], 0u, b0, b1);
            }
        }
    }
    float tmax = NEG_INF;
#pragma unroll
    for (int j = 0; j < SUB; ++j) {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const bool valid = tok0 + 16 * j + 8 * nt + 2 * t + e < ctx;
                float x = s[j][nt][e];
                if constexpr (QUANT) {
                    const float sc = e ? hi_h(T[j].ks[nt]) : lo_h(T[j].ks[nt]);
                    const float zr = (e ? hi_h(T[j].kz[nt]) : lo_h(T[j].kz[nt])) + 1024.0f;
                    x = sc * (x - zr * qsum);
                }
                x = valid ? x * scale_log2 : NEG_INF;
                s[j][nt][e] = x;
                tmax = fmaxf(tmax, x);
            }
        }
    }
    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
    const float m_new = fmaxf(st.m, tmax);
    const float m_use = m_new == NEG_INF ? 0.0f : m_new;
    const float alpha = ex2(st.m - m_use);
    float psum = 0.0f, zsum = 0.0f;
    u32 pb[SUB][2];
#pragma unroll
    for (int j = 0; j < SUB; ++j) {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
            float pp[2];
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float pe = ex2(s[j][nt][e] - m_use);
                psum += pe;
                pp[e] = pe;
                if constexpr (QUANT) {
                    const bool valid = tok0 + 16 * j + 8 * nt + 2 * t + e < ctx;
                    const float sv = valid ? (e ? hi_h(T[j].vs[nt]) : lo_h(T[j].vs[nt])) : 0.0f;
                    const float zv = valid ? (e ? hi_h(T[j].vz[nt]) : lo_h(T[j].vz[nt])) : 0.0f;
                    pp[e] = h2f(f2h(pe * sv));
                    zsum += pp[e] * zv;
                }
            }
            pb[j][nt] = pack_h2(pp[0], pp[1]);
        }
    }
    st.l = st.l * alpha + psum;
    st.corr = st.corr * alpha + zsum;
    st.m = m_new;
    if (__any_sync(0xffffffffu, alpha != 1.0f)) {  // rescale only when some head's max moved
        const float a_lo = __shfl_sync(0xffffffffu, alpha, 8 * t);
        const float a_hi = __shfl_sync(0xffffffffu, alpha, 8 * t + 4);
#pragma unroll
        for (int i = 0; i < NCH; ++i) {
            st.acc[i][0] *= a_lo;
            st.acc[i][1] *= a_hi;
            st.acc[i][2] *= a_lo;
            st.acc[i][3] *= a_hi;
        }
    }
#pragma unroll
    for (int j = 0; j < SUB; ++j) {
        if constexpr (!QUANT) {  // unwritten slots past the context may hold NaN: zero those tokens
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                if (tok0 + 16 * j + 8 * (i >> 1) + 2 * t + (i & 1) >= ctx) {
#pragma unroll
                    for (int w = 0; w < VWORDS; ++w) T[j].v[i][w] = 0u;
                }
            }
        }
        u32 h0[D / 8], h1[D / 8];
        v_pairs(T[j].v[0], T[j].v[1], h0);
        v_pairs(T[j].v[2], T[j].v[3], h1);
#pragma unroll
        for (int i = 0; i < NCH; ++i)
            mma16816(st.acc[i], h0[2 * i], h0[2 * i + 1], h1[2 * i], h1[2 * i + 1], pb[j][0], pb[j][1]);
    }
}

}  // namespace dec

}  // namespace

extern "C" __device__ const int qs_decode_smem_fixed = dec::FIXED_SMEM;

// Grid (num_splits, num_kv_heads * head_chunks, batch); block 32 * QS_WARPS; dynamic shared memory
// qs_decode_smem_fixed + (tokens_per_split / 64) * 4 bytes. With several splits, every block writes fp32
// partials (o, m, l) and the last block of a (sequence, kv head) to finish (a counter per pair, reset by that
// block) combines them: one launch, no host synchronisation.
extern "C" __global__ void __launch_bounds__(32 * QS_WARPS) qs_decode_attn(
    const u16* __restrict__ q, long long ldq, const u8* __restrict__ k_pool, const u8* __restrict__ v_pool,
    long long page_bytes, const int* __restrict__ block_tables, int bt_stride,
    const int* __restrict__ context_lens, int num_heads, int num_kv_heads, float scale_log2,
    int tokens_per_split, int num_splits, u16* __restrict__ out, long long ldo, float* __restrict__ part_o,
    float* __restrict__ part_ml, int* __restrict__ counters) {
    using namespace dec;
    extern __shared__ __align__(128) unsigned char smem[];
    float* sm_o = reinterpret_cast<float*>(smem);             // [W][8][D] (after the loop, over the ring)
    float* sm_stat = sm_o + W * 8 * D;                         // [W][3][8]: m, l, corr
    int* sm_flag = reinterpret_cast<int*>(smem + FIXED_SMEM - 16);
    int* sm_pages = reinterpret_cast<int*>(smem + FIXED_SMEM);  // [tokens_per_split / 64]

    const int split = blockIdx.x, b = blockIdx.z;
    const int group = num_heads / num_kv_heads;
    const int chunks = (group + 7) >> 3;
    const int kvh = blockIdx.y / chunks;
    const int h0 = kvh * group + (blockIdx.y % chunks) * 8;
    const int nh = min(8, kvh * group + group - h0);
    const int ctx = context_lens[b];
    const int start = split * tokens_per_split;
    if (start >= ctx && num_splits > 1) {  // splits past the context take no part
        if (ctx <= 0 && split == 0)
            for (int idx = threadIdx.x; idx < nh * D; idx += blockDim.x)
                out[(long long)b * ldo + (long long)(h0 + idx / D) * D + idx % D] = 0;
        return;
    }
    const int end = min(ctx, start + tokens_per_split);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;

    const int npages = end > start ? (end - start + 63) >> 6 : 0;
    for (int i = threadIdx.x; i < npages; i += blockDim.x)
        sm_pages[i] = block_tables[(long long)b * bt_stride + (start >> 6) + i];

    // Q fragments (rows = heads h0 + g, rows 8..15 zero) in the K channel permutation; sum of q per head.
    u32 qa[NCH][2];
    float qsum = 0.0f;
    {
        const u16* qrow = q + (long long)b * ldq + (long long)(h0 + g) * D;
        const bool live = g < nh;
#pragma unroll
        for (int c = 0; c < NCH; ++c) {
#pragma unroll
            for (int second = 0; second < 2; ++second) {
                const u16 x0 = live ? qrow[q_channel(t, c, second, 0)] : (u16)0;
                const u16 x1 = live ? qrow[q_channel(t, c, second, 1)] : (u16)0;
                qa[c][second] = (u32)x0 | ((u32)x1 << 16);
                qsum += h2f(x0) + h2f(x1);
            }
        }
        qsum += __shfl_xor_sync(0xffffffffu, qsum, 1);
        qsum += __shfl_xor_sync(0xffffffffu, qsum, 2);
    }
    __syncthreads();

    State st;
    st.m = NEG_INF;
    st.l = 0.0f;
    st.corr = 0.0f;
#pragma unroll
    for (int i = 0; i < NCH; ++i) st.acc[i][0] = st.acc[i][1] = st.acc[i][2] = st.acc[i][3] = 0.0f;

    const long long sc_off = (long long)num_kv_heads * 64 * RB;
    const long long zr_off = sc_off + (long long)num_kv_heads * 128;
    const int ntiles = end > start ? (end - start + TT - 1) / TT : 0;
    const int mine = ntiles > warp ? (ntiles - warp + W - 1) / W : 0;  // tiles warp, warp + W, ...
    const u32 ring = smem_addr(smem) + warp * (STAGES * TILE_BYTES);
    auto issue = [&](int k) {
        const int it = warp + W * k;
        const long long page = sm_pages[it / (64 / TT)];
        issue_tile(ring + (k % STAGES) * TILE_BYTES, k_pool + page * page_bytes, v_pool + page * page_bytes,
                   kvh * 64 + TT * (it % (64 / TT)), sc_off, zr_off, lane);
    };
#pragma unroll
    for (int k = 0; k < STAGES - 1; ++k) {
        if (k < mine) issue(k);
        cp_async_commit();
    }
    for (int k = 0; k < mine; ++k) {
        cp_async_wait<STAGES - 2>();
        __syncwarp();
        compute_tile(ring + (k % STAGES) * TILE_BYTES, st, qa, qsum, start + TT * (warp + W * k), ctx,
                     scale_log2, lane);
        __syncwarp();
        if (k + STAGES - 1 < mine) issue(k + STAGES - 1);
        cp_async_commit();
    }
    cp_async_wait<0>();

    // merge the warps (shared memory of the rings is reused)
    st.l += __shfl_xor_sync(0xffffffffu, st.l, 1);
    st.l += __shfl_xor_sync(0xffffffffu, st.l, 2);
    st.corr += __shfl_xor_sync(0xffffffffu, st.corr, 1);
    st.corr += __shfl_xor_sync(0xffffffffu, st.corr, 2);
    __syncthreads();
    if (t == 0) {
        sm_stat[warp * 24 + g] = st.m;
        sm_stat[warp * 24 + 8 + g] = st.l;
        sm_stat[warp * 24 + 16 + g] = st.corr;
    }
    float* my_o = sm_o + warp * 8 * D;
#pragma unroll
    for (int i = 0; i < NCH; ++i) {
        const int ch = (D / 8) * g + 2 * i;
        my_o[(2 * t) * D + ch] = st.acc[i][0];
        my_o[(2 * t + 1) * D + ch] = st.acc[i][1];
        my_o[(2 * t) * D + ch + 1] = st.acc[i][2];
        my_o[(2 * t + 1) * D + ch + 1] = st.acc[i][3];
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < nh * D; idx += blockDim.x) {
        const int hl = idx / D, d = idx - hl * D;
        float mx = NEG_INF;
#pragma unroll
        for (int w = 0; w < W; ++w) mx = fmaxf(mx, sm_stat[w * 24 + hl]);
        float o = 0.0f, l = 0.0f;
#pragma unroll
        for (int w = 0; w < W; ++w) {
            const float mw = sm_stat[w * 24 + hl];
            const float f = mw == NEG_INF ? 0.0f : ex2(mw - mx);
            o += f * (sm_o[(w * 8 + hl) * D + d] - sm_stat[w * 24 + 16 + hl]);
            l += f * sm_stat[w * 24 + 8 + hl];
        }
        const int h = h0 + hl;
        if (num_splits == 1) {
            out[(long long)b * ldo + (long long)h * D + d] = f2h(l > 0.0f ? o / l : 0.0f);
        } else {
            const long long row = ((long long)b * num_heads + h) * num_splits + split;
            part_o[row * D + d] = o;
            if (d == 0) {
                part_ml[2 * row] = mx;
                part_ml[2 * row + 1] = l;
            }
        }
    }
    if (num_splits == 1) return;

    // the last split of this (sequence, kv head block) to finish combines the partials
    __threadfence();
    __syncthreads();
    const int n_valid = min(num_splits, (ctx + tokens_per_split - 1) / tokens_per_split);
    if (threadIdx.x == 0) {
        int* counter = counters + (long long)b * gridDim.y + blockIdx.y;
        const int last = atomicAdd(counter, 1) == n_valid - 1;
        if (last) *counter = 0;  // every split has arrived: ready for the next call
        *sm_flag = last;
    }
    __syncthreads();
    if (!*sm_flag) return;
    __threadfence();
    float* sm_ml = sm_stat;  // [8][2]: the combined max and sum of each head
    for (int hl = warp; hl < nh; hl += W) {
        const float* ml = part_ml + 2 * ((long long)b * num_heads + h0 + hl) * num_splits;
        float mx = NEG_INF;
        for (int sp = lane; sp < n_valid; sp += 32) mx = fmaxf(mx, ld_cg(ml + 2 * sp));
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        float l = 0.0f;
        for (int sp = lane; sp < n_valid; sp += 32) {
            const float ms = ld_cg(ml + 2 * sp);
            if (ms != NEG_INF) l += ex2(ms - mx) * ld_cg(ml + 2 * sp + 1);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
        if (lane == 0) {
            sm_ml[2 * hl] = mx;
            sm_ml[2 * hl + 1] = l;
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < nh * (D / 4); idx += blockDim.x) {
        const int hl = idx / (D / 4), d4 = idx - hl * (D / 4);
        const long long row0 = ((long long)b * num_heads + h0 + hl) * num_splits;
        const float mx = sm_ml[2 * hl], l = sm_ml[2 * hl + 1];
        float o0 = 0.0f, o1 = 0.0f, o2 = 0.0f, o3 = 0.0f;
#pragma unroll 4
        for (int sp = 0; sp < n_valid; ++sp) {
            const float ms = ld_cg(part_ml + 2 * (row0 + sp));
            const float f = ms == NEG_INF ? 0.0f : ex2(ms - mx);
            float v0, v1, v2, v3;
            asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];"
                         : "=f"(v0), "=f"(v1), "=f"(v2), "=f"(v3)
                         : "l"(part_o + (row0 + sp) * D + 4 * d4));
            o0 += f * v0;
            o1 += f * v1;
            o2 += f * v2;
            o3 += f * v3;
        }
        const float r = l > 0.0f ? 1.0f / l : 0.0f;
        u16* dst = out + (long long)b * ldo + (long long)(h0 + hl) * D + 4 * d4;
        *reinterpret_cast<uint2_t*>(dst) = uint2_t{pack_h2(o0 * r, o1 * r), pack_h2(o2 * r, o3 * r)};
    }
}

// ---------------------------------------------------------------------------------------------------------
// Prefill
// ---------------------------------------------------------------------------------------------------------
namespace {
namespace pf {
constexpr int W = QS_PF_WARPS;
constexpr int BM = 16 * W;  // query rows per block
constexpr int BN = 64;      // keys per tile (one page)
constexpr int CH = D / 8;   // 16-byte chunks per fp16 row
constexpr int ROW = D * 2;  // bytes per fp16 row in shared memory
constexpr int THREADS = 32 * W;

__device__ __forceinline__ u32 swz(int row, int chunk) { return row * ROW + ((chunk ^ (row & 7)) << 4); }

__device__ __forceinline__ void ldmatrix_x4_trans(u32& r0, u32& r1, u32& r2, u32& r3, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}
__device__ __forceinline__ void st_shared_v4(u32 addr, u32 a, u32 b, u32 c, u32 d) {
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(a), "r"(b), "r"(c), "r"(d));
}

// 8 channels (chunk c) of a cached token: (code - zero) * scale in fp32, rounded to fp16.
__device__ __forceinline__ void dequant_chunk(const u8* page, int entry, int c, long long sc_off,
                                              long long zr_off, u32 dst) {
    const float s = h2f(*reinterpret_cast<const u16*>(page + sc_off + 2 * entry));
    const float z = h2f(*reinterpret_cast<const u16*>(page + zr_off + 2 * entry));
    if constexpr (BITS == 4) {
        const u32 w = *reinterpret_cast<const u32*>(page + (long long)entry * RB + 4 * c);
        // channels 0..7: bytes 0..3 -> (lo, hi) pairs
        u32 h[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const u32 byte = (w >> (8 * j)) & 0xffu;
            h[j] = pack_h2(fmul_rn(fsub_rn((float)(byte & 15u), z), s),
                           fmul_rn(fsub_rn((float)(byte >> 4), z), s));
        }
        st_shared_v4(dst, h[0], h[1], h[2], h[3]);
    } else {
        const u32* src = reinterpret_cast<const u32*>(page + (long long)entry * RB + 8 * c);
        const u32 w0 = src[0], w1 = src[1];
        u32 h[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const u32 word = j < 2 ? w0 : w1;
            const u32 b0 = (word >> (16 * (j & 1))) & 0xffu, b1 = (word >> (16 * (j & 1) + 8)) & 0xffu;
            h[j] = pack_h2(fmul_rn(fsub_rn((float)b0, z), s), fmul_rn(fsub_rn((float)b1, z), s));
        }
        st_shared_v4(dst, h[0], h[1], h[2], h[3]);
    }
}
}  // namespace pf
}  // namespace

// Grid (num_heads, query tiles of the longest sequence, num_seqs), block 32 * QS_PF_WARPS, dynamic shared
// memory 4 * 64 * D * 2 bytes. q / out rows are the packed tokens (cu_seqlens); k, v hold the fresh
// (RoPE'd) keys and values of the same tokens; context_lens[s] = cached + new tokens of sequence s.
extern "C" __global__ void __launch_bounds__(32 * QS_PF_WARPS, QS_PF_WARPS == 4 ? 3 : 1) qs_prefill_attn(
    const u16* __restrict__ q, long long ldq, const u16* __restrict__ k, long long ldk,
    const u16* __restrict__ v, long long ldv, const int* __restrict__ cu_seqlens,
    const int* __restrict__ context_lens, const u8* __restrict__ k_pool, const u8* __restrict__ v_pool,
    long long page_bytes, const int* __restrict__ block_tables, int bt_stride, int num_heads,
    int num_kv_heads, float scale_log2, u16* __restrict__ out, long long ldo) {
    using namespace pf;
    extern __shared__ __align__(128) unsigned char smem[];
    const int seq = blockIdx.z, h = blockIdx.x;
    const int qt = gridDim.y - 1 - blockIdx.y;  // longest (diagonal-heavy) tiles first
    const int q0 = cu_seqlens[seq];
    const int nq = cu_seqlens[seq + 1] - q0;
    const int m_begin = qt * BM;
    if (m_begin >= nq) return;
    const int ctx = context_lens[seq];
    const int cached = ctx - nq;
    const int kvh = h / (num_heads / num_kv_heads);
    const int kend = cached + min(m_begin + BM, nq);
    const int nkt = (kend + BN - 1) / BN;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;

    // stage s: K rows at s * 2 * BN * ROW, V rows BN * ROW after; the Q tile first lands in stage 1
    static_assert(BM <= 2 * BN, "the Q tile must fit in one stage");
    const u32 sk0 = smem_addr(smem);
    const u32 sv0 = sk0 + BN * ROW;
    const u32 sq = sk0 + 2 * BN * ROW;
    const long long sc_off = (long long)num_kv_heads * 64 * RB;
    const long long zr_off = sc_off + (long long)num_kv_heads * 128;

    // Q tile
    for (int idx = tid; idx < BM * CH; idx += THREADS) {
        const int r = idx / CH, c = idx - r * CH;
        const bool live = m_begin + r < nq;
        const u16* src = live ? q + (long long)(q0 + m_begin + r) * ldq + (long long)h * D + 8 * c : q;
        cp_async16(sq + swz(r, c), src, live ? 16 : 0);
    }
    auto load_kv = [&](int kt, int stage) {
        const u32 sk = sk0 + stage * 2 * BN * ROW, sv = sv0 + stage * 2 * BN * ROW;
        for (int idx = tid; idx < BN * CH; idx += THREADS) {
            const int r = idx / CH, c = idx - r * CH;
            const int pos = kt * BN + r;
            if (pos < cached) {
                const long long page = block_tables[(long long)seq * bt_stride + kt];
                const u8* kp = k_pool + page * page_bytes;
                const u8* vp = v_pool + page * page_bytes;
                const int entry = kvh * 64 + r;
                if constexpr (BITS == 16) {
                    cp_async16(sk + swz(r, c), kp + (long long)entry * RB + 16 * c, 16);
                    cp_async16(sv + swz(r, c), vp + (long long)entry * RB + 16 * c, 16);
                } else {
                    dequant_chunk(kp, entry, c, sc_off, zr_off, sk + swz(r, c));
                    dequant_chunk(vp, entry, c, sc_off, zr_off, sv + swz(r, c));
                }
            } else {
                const bool live = pos < kend;
                const long long fr = q0 + (pos - cached);
                const u16* ks = live ? k + fr * ldk + (long long)kvh * D + 8 * c : k;
                const u16* vs = live ? v + fr * ldv + (long long)kvh * D + 8 * c : v;
                cp_async16(sk + swz(r, c), ks, live ? 16 : 0);
                cp_async16(sv + swz(r, c), vs, live ? 16 : 0);
            }
        }
    };
    load_kv(0, 0);
    cp_async_commit();

    u32 qf[D / 16][4];
    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.0f, l1 = 0.0f;
    const int row0 = m_begin + warp * 16 + g;  // this thread's rows: row0 and row0 + 8
    const int qpos0 = cached + row0, qpos1 = qpos0 + 8;

    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int c = 0; c < D / 16; ++c) {
        const int r = warp * 16 + (lane & 7) + 8 * ((lane >> 3) & 1);
        ldmatrix_x4(qf[c][0], qf[c][1], qf[c][2], qf[c][3], sq + swz(r, 2 * c + (lane >> 4)));
    }
    __syncthreads();  // stage 1 is free for keys now

    for (int kt = 0; kt < nkt; ++kt) {
        if (kt + 1 < nkt) {
            load_kv(kt + 1, (kt + 1) & 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const u32 sk = sk0 + (kt & 1) * 2 * BN * ROW, sv = sv0 + (kt & 1) * 2 * BN * ROW;
        float s[BN / 8][4];
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
        for (int c = 0; c < D / 16; ++c) {
#pragma unroll
            for (int jp = 0; jp < BN / 16; ++jp) {
                u32 b0, b1, b2, b3;
                const int r = 16 * jp + (lane & 7) + 8 * (lane >> 4);
                ldmatrix_x4(b0, b1, b2, b3, sk + swz(r, 2 * c + ((lane >> 3) & 1)));
                mma_f16(s[2 * jp], qf[c], b0, b1);
                mma_f16(s[2 * jp + 1], qf[c], b2, b3);
            }
        }
        const bool need_mask = kt * BN + BN - 1 > cached + m_begin;
        float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float x = s[j][e] * scale_log2;
                if (need_mask) {
                    const int key = kt * BN + 8 * j + 2 * t + (e & 1);
                    if (key > (e < 2 ? qpos0 : qpos1)) x = NEG_INF;
                }
                s[j][e] = x;
            }
            mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
            mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
        const float u0 = n0 == NEG_INF ? 0.0f : n0, u1 = n1 == NEG_INF ? 0.0f : n1;
        const float a0 = ex2(m0 - u0), a1 = ex2(m1 - u1);
        m0 = n0;
        m1 = n1;
        float ps0 = 0.0f, ps1 = 0.0f;
        u32 pa[BN / 16][4];
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            const float p0 = ex2(s[j][0] - u0), p1 = ex2(s[j][1] - u0);
            const float p2 = ex2(s[j][2] - u1), p3 = ex2(s[j][3] - u1);
            ps0 += p0 + p1;
            ps1 += p2 + p3;
            pa[j >> 1][(j & 1) * 2] = pack_h2(p0, p1);
            pa[j >> 1][(j & 1) * 2 + 1] = pack_h2(p2, p3);
        }
        l0 = l0 * a0 + ps0;
        l1 = l1 * a1 + ps1;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            o[n][0] *= a0;
            o[n][1] *= a0;
            o[n][2] *= a1;
            o[n][3] *= a1;
        }
#pragma unroll
        for (int kc = 0; kc < BN / 16; ++kc) {
#pragma unroll
            for (int np = 0; np < D / 16; ++np) {
                u32 b0, b1, b2, b3;
                const int r = 16 * kc + (lane & 7) + 8 * ((lane >> 3) & 1);
                ldmatrix_x4_trans(b0, b1, b2, b3, sv + swz(r, 2 * np + (lane >> 4)));
                mma_f16(o[2 * np], pa[kc], b0, b1);
                mma_f16(o[2 * np + 1], pa[kc], b2, b3);
            }
        }
        __syncthreads();
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float r0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, r1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        if (row0 < nq)
            *reinterpret_cast<u32*>(out + (long long)(q0 + row0) * ldo + (long long)h * D + 8 * n + 2 * t) =
                pack_h2(o[n][0] * r0, o[n][1] * r0);
        if (row0 + 8 < nq)
            *reinterpret_cast<u32*>(out + (long long)(q0 + row0 + 8) * ldo + (long long)h * D + 8 * n + 2 * t) =
                pack_h2(o[n][2] * r1, o[n][3] * r1);
    }
}
