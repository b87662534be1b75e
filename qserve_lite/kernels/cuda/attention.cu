// Attention over the paged KV cache (page layout: qserve_lite/kernels/paged_kv.py). Numpy twins and the
// stated tolerances: qserve_lite/kernels/attention.py. fp16 tensor cores (mma.sync m16n8k16, fp32 accumulate).
//
// qs_decode_attn: one query token per sequence (flash-decoding). Block = (split of the context, kv head,
//   sequence), QS_WARPS warps taking the split's tiles (16 * QS_DEC_SUB tokens) in turn; the block serves all
//   query heads of its kv head (up to 8; more go to further blocks), so each K/V byte is read once.
//   - S^T = K Q^T on tensor cores: the raw K codes are A (16 tokens x 16 channels, every register useful),
//     Q^T (8 heads) is B. A byte of two 4-bit codes becomes two half2 with one LOP3 each and no subtraction:
//     the low nibble under the 0x6400 magic (1024 + c), the high nibble read in place under 0x5400 (64 + c,
//     ulp 1/16); KV8 bytes become 1024 + c with one PRMT. The channel order inside a thread's slice of the
//     head is permuted, and q is loaded with the same permutation. Offsets, scale and zero are applied per
//     (token, head) after the dot product: S = s * (q.(off + c) - sum(q * off) - z * sum(q)).
//   - O^T = V^T P^T: the V codes of two tokens are interleaved (PRMT) into half2 pairs along the token axis
//     and made exact codes (one LOP3 and one HSUB2 / HFMA2 each), used as A; B = P' = p * s_v in fp16, the
//     S^T accumulators of a thread moved into B-fragment order by movmatrix (a transpose of 8x8 halves); the
//     zero's term sum_t P'_t z_t is subtracted at the end. Online softmax in fp32 (exp2); a row of S^T is a
//     token, so a thread holds 2 * QS_DEC_SUB consecutive tokens (one shared-memory load per scale array).
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
// QS_PF_WARPS prefill warps per block; decode tuning alternatives (optional): QS_DEC_SUB 16-token subtiles
// per decode tile (1, 2, 4), QS_DEC_STAGES cp.async ring stages per warp (2..8), QS_DEC_COMBINE 1 (the
// last-split combine reads the (m, l) partials once and keeps 16 output partials in flight per thread),
// QS_DEC_PERSIST 1 (adds qs_decode_attn_persist, the one-split kernel below); QS_DEC_QUANT 1 (qs_decode_attn
// also writes the o_proj input: the per-token INT8 quantization of its fp16 output, see quantize_token).
#include "common.cuh"
#include "token_quant.cuh"

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

__device__ __forceinline__ u32 hsub2(u32 a, u32 b) {
    u32 r;
    asm("sub.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}
__device__ __forceinline__ float lo_h(u32 x) { return h2f((u16)(x & 0xffffu)); }
__device__ __forceinline__ float hi_h(u32 x) { return h2f((u16)(x >> 16)); }
// ---------------------------------------------------------------------------------------------------------
// Decode
// ---------------------------------------------------------------------------------------------------------
namespace dec {
constexpr int W = QS_WARPS;
constexpr int NCH = D / 16;                // k-chunks of S^T = K Q^T, and channel m-tiles of O^T = V^T P^T
constexpr int KW = D / 4 * BITS / 32;      // K words of a thread's D/4-channel slice of one token
constexpr int VW = D / 8 * BITS / 32;      // V words of a thread's D/8-channel slice of one token
// A tile is SUB 16-token subtiles sharing one softmax update.
#ifdef QS_DEC_SUB
constexpr int SUB = QS_DEC_SUB;
#else
constexpr int SUB = BITS == 4 ? 2 : 1;
#endif
static_assert(SUB == 1 || SUB == 2 || SUB == 4, "1, 2 or 4 subtiles per decode tile");
constexpr int TT = 16 * SUB;            // tokens per tile (divides a 64-token page)
// Per-warp ring of cp.async stages: the bytes in flight per SM come from shared memory, not registers.
#ifdef QS_DEC_STAGES
constexpr int STAGES = QS_DEC_STAGES;  // tuning: a deeper ring (fewer resident blocks) or a shallower one
#else
constexpr int STAGES = (BITS == 16 || SUB > 2) ? 2 : 3;
#endif
static_assert(STAGES >= 2 && STAGES <= 8, "2 to 8 ring stages per warp");
constexpr int SC_BYTES = QUANT ? 2 * TT : 0;  // one of: K scales, K zeros, V scales, V zeros
constexpr int TILE_BYTES = 2 * TT * RB + 4 * SC_BYTES;  // K rows, V rows, then the scale / zero arrays
constexpr int RING_BYTES = W * STAGES * TILE_BYTES;
constexpr int MERGE_BYTES = W * (8 * D + 24) * 4;
constexpr int FIXED_SMEM = (RING_BYTES > MERGE_BYTES ? RING_BYTES : MERGE_BYTES) + 16;
constexpr int MAX_SPLITS = W * D;  // the combine's weights [8][splits] reuse the merge buffer [W][8][D]

// D = A * B + D (m16n8k16 f16, f32 accumulate); not volatile, so the compiler may interleave it.
__device__ __forceinline__ void mma16816(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// The 8x8 b16 matrix of the warp (thread g, t holds row g, columns 2t, 2t+1), transposed.
__device__ __forceinline__ u32 movm_trans(u32 a) {
    u32 r;
    asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(a));
    return r;
}
// (a & B) | C in one LOP3 (C expressions with two constants compile to two).
template <u32 B, u32 C>
__device__ __forceinline__ u32 and_or(u32 a) {
    u32 r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "n"(B), "n"(C));
    return r;
}
__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
    u32 r;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

// A lane's share of copying one tile (one kv head's rows entry0 .. entry0 + TT - 1 of a page) into a ring
// stage: 16-byte chunks lane, lane + 32, .. of the K rows and of the V rows (constant offsets from one base,
// folded into the instructions), and for lanes < 4 * SC_CHUNKS one chunk of the scale / zero arrays.
constexpr int CHUNKS = TT * RB / 16;  // of the K (V) rows of a tile
constexpr int SC_CHUNKS = SC_BYTES / 16 > 0 ? SC_BYTES / 16 : 1;  // per scale / zero array
struct ScaleCopy {
    long long src;  // offset within a page (kv head and entry 0 of the tile added per tile)
    u32 dst;        // offset within a stage
    bool live, v;   // this lane copies a chunk; of the V page
};
__device__ __forceinline__ ScaleCopy scale_copy(int lane, long long sc_off, long long zr_off) {
    const int which = lane / SC_CHUNKS, part = lane % SC_CHUNKS;  // 0 K scales, 1 K zeros, 2 V scales, 3 V zeros
    return {((which & 1) ? zr_off : sc_off) + 16 * part, (u32)(2 * TT * RB + SC_BYTES * which + 16 * part),
            QUANT && lane < 4 * SC_CHUNKS, which >= 2};
}
__device__ __forceinline__ void issue_tile(u32 dst, const u8* kpage, const u8* vpage, int entry0,
                                           const ScaleCopy& sc, int lane) {
    const u8* ksrc = kpage + (long long)entry0 * RB + 16 * lane;
    const u8* vsrc = vpage + (long long)entry0 * RB + 16 * lane;
    const u32 d = dst + 16 * lane;
#pragma unroll
    for (int k = 0; k < (CHUNKS + 31) / 32; ++k) {
        if (CHUNKS % 32 == 0 || lane + 32 * k < CHUNKS) {
            cp_async16(d + 512 * k, ksrc + 512 * k, 16);
            cp_async16(d + TT * RB + 512 * k, vsrc + 512 * k, 16);
        }
    }
    if (sc.live) cp_async16(dst + sc.dst, (sc.v ? vpage : kpage) + sc.src + 2 * entry0, 16);
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

// Channel of the head behind k index 2t + e (second 0) or 2t + 8 + e (second 1) of k-chunk c, for the
// thread's slice t of D/4 channels: the order in which k_frag unpacks a K row.
__device__ __forceinline__ int q_channel(int t, int c, int second, int e) {
    const int base = (D / 4) * t;
    if constexpr (BITS == 4) return base + 8 * (c >> 1) + 2 * (c & 1) + second + 4 * e;
    return base + 4 * c + 2 * second + e;
}
// What k_frag adds to the code of a channel (magic-number conversion without the subtraction).
__device__ __forceinline__ float code_offset(int second) {
    if constexpr (BITS == 4) return second ? 64.0f : 1024.0f;
    return BITS == 8 ? 1024.0f : 0.0f;
}

// A-fragment halves of k-chunk c from one token's K words: lo = k 2t, 2t+1, hi = k 2t+8, 2t+9. Codes come
// as offset + code, exact: KV4 even channels (low nibbles, 0x6400 magic) 1024 + c, odd channels (high
// nibbles read in place under the 0x5400 magic, ulp 1/16) 64 + c; KV8 1024 + c. The offsets are folded into
// the score: q.(off + c) - sum(q * off).
__device__ __forceinline__ void k_frag(const u32* kw, int c, u32& lo, u32& hi) {
    if constexpr (BITS == 4) {
        const u32 x = (c & 1) ? kw[c >> 1] >> 8 : kw[c >> 1];
        lo = and_or<0x000F000Fu, 0x64006400u>(x);
        hi = and_or<0x00F000F0u, 0x54005400u>(x);
    } else if constexpr (BITS == 8) {
        lo = byte_perm(kw[c], 0x64646464u, 0x5140);
        hi = byte_perm(kw[c], 0x64646464u, 0x7362);
    } else {
        lo = kw[2 * c];
        hi = kw[2 * c + 1];
    }
}

// h[j] = half2(V[a][channel j], V[b][channel j]) for the thread's D/8 channels (j = 0 .. D/8 - 1): the codes
// exactly (the magic number subtracted: 1024 + c - 1024, or (1024 + 16 c) / 16 - 64 for the nibble read in
// place), or the fp16 values.
__device__ __forceinline__ void v_pairs(const u32* va, const u32* vb, u32* h) {
    constexpr u32 SIXTEENTH = 0x2C002C00u, M64 = 0xD400D400u;  // half2(1/16), half2(-64)
    if constexpr (BITS == 4) {
#pragma unroll
        for (int w = 0; w < VW; ++w) {
#pragma unroll
            for (int kk = 0; kk < 2; ++kk) {
                const u32 x = byte_perm(va[w], vb[w], kk ? 0x7632 : 0x5410);  // channels 8w + 4kk + 0..3
                const u32 y = x >> 8;
                h[8 * w + 4 * kk + 0] = hsub2(and_or<0x000F000Fu, MAGIC>(x), MAGIC);
                h[8 * w + 4 * kk + 1] = hfma2(and_or<0x00F000F0u, MAGIC>(x), SIXTEENTH, M64);
                h[8 * w + 4 * kk + 2] = hsub2(and_or<0x000F000Fu, MAGIC>(y), MAGIC);
                h[8 * w + 4 * kk + 3] = hfma2(and_or<0x00F000F0u, MAGIC>(y), SIXTEENTH, M64);
            }
        }
    } else if constexpr (BITS == 8) {
#pragma unroll
        for (int w = 0; w < VW; ++w) {
#pragma unroll
            for (int kk = 0; kk < 4; ++kk)
                h[4 * w + kk] = hsub2(and_or<0x00FF00FFu, MAGIC>(byte_perm(va[w], vb[w], kk | ((4 + kk) << 8))),
                                      MAGIC);
        }
    } else {
#pragma unroll
        for (int w = 0; w < VW; ++w) {
            h[2 * w] = byte_perm(va[w], vb[w], 0x5410);
            h[2 * w + 1] = byte_perm(va[w], vb[w], 0x7632);
        }
    }
}

struct Qf {
    u32 b[NCH][2];           // B fragments of Q^T: head g, channels q_channel(t, c, second, 0 / 1)
    float qsum[2], qoff[2];  // heads 2t, 2t+1: sum of q, and sum of q times its channel's code offset
};

struct State {
    float m[2];          // heads 2t, 2t+1: running max (log2 units; the same in the 8 lanes of a head)
    float l[2], corr[2]; // partial sum of p and of p * s_v * z_v over this thread's tokens
    float acc[NCH][4];   // O^T: channels (D/8) g + 2i (+1), heads 2t, 2t+1
};

// Q^T fragments (columns = heads h0 + g, those past nh zero) in the K channel order; per head the sum of q
// and of q times the code offsets, then moved to the lanes holding heads 2t, 2t+1 of S^T.
__device__ __forceinline__ Qf load_q(const u16* __restrict__ q, long long ldq, int b, int h0, int nh,
                                     int lane) {
    const int g = lane >> 2, t = lane & 3;
    Qf qf;
    const u16* qrow = q + (long long)b * ldq + (long long)(h0 + g) * D;
    const bool live = g < nh;
    float qs = 0.0f, qo = 0.0f;
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
#pragma unroll
        for (int second = 0; second < 2; ++second) {
            const u16 x0 = live ? qrow[q_channel(t, c, second, 0)] : (u16)0;
            const u16 x1 = live ? qrow[q_channel(t, c, second, 1)] : (u16)0;
            qf.b[c][second] = (u32)x0 | ((u32)x1 << 16);
            const float pair = h2f(x0) + h2f(x1);
            qs += pair;
            qo += pair * code_offset(second);
        }
    }
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
        qs += __shfl_xor_sync(0xffffffffu, qs, o);
        qo += __shfl_xor_sync(0xffffffffu, qo, o);
    }
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        qf.qsum[e] = __shfl_sync(0xffffffffu, qs, 4 * (2 * t + e));
        qf.qoff[e] = __shfl_sync(0xffffffffu, qo, 4 * (2 * t + e));
    }
    return qf;
}

__device__ __forceinline__ void init_state(State& st) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        st.m[e] = NEG_INF;
        st.l[e] = 0.0f;
        st.corr[e] = 0.0f;
    }
#pragma unroll
    for (int i = 0; i < NCH; ++i) st.acc[i][0] = st.acc[i][1] = st.acc[i][2] = st.acc[i][3] = 0.0f;
}

// l and corr of heads 2t, 2t+1 summed over the 8 lanes (token rows g) that hold parts of them.
__device__ __forceinline__ void sum_lanes_of_head(State& st) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
#pragma unroll
        for (int o = 4; o < 32; o <<= 1) {
            st.l[e] += __shfl_xor_sync(0xffffffffu, st.l[e], o);
            st.corr[e] += __shfl_xor_sync(0xffffffffu, st.corr[e], o);
        }
    }
}

__device__ __forceinline__ float half_of(u32 w, int h) { return h ? hi_h(w) : lo_h(w); }

// One tile (SUB subtiles) read from ring stage `base`: scores, one online-softmax update, P V.
// S^T = K Q^T: A = K (16 tokens x 16 channels), B = Q^T (16 channels x 8 heads); row g (g + 8) of subtile j
// is token 2 SUB g + 2j (+ 1), so a thread's tokens are 2 SUB consecutive ones (one load per scale array).
// O^T = V^T P^T: A = V^T (16 channels x 16 tokens), B = P^T from S^T's accumulators by movmatrix.
template <bool TAIL>
__device__ __forceinline__ void compute_tile(u32 base, State& st, const Qf& qf, int tok0, int ctx,
                                             float scale_log2, int lane) {
    const int g = lane >> 2, t = lane & 3;
    u32 kw[SUB][2][KW];
#pragma unroll
    for (int j = 0; j < SUB; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h)
            lds_words<KW>(kw[j][h], base + (2 * SUB * g + 2 * j + h) * RB + t * (KW * 4));
    }
    u32 ks[SUB], kz[SUB], vs[SUB], vz[SUB];  // half2 of tokens 2 SUB g + 2j, + 2j + 1
    if constexpr (QUANT) {
        const u32 e = base + 2 * TT * RB + 4 * SUB * g;
        lds_words<SUB>(ks, e);
        lds_words<SUB>(kz, e + SC_BYTES);
        lds_words<SUB>(vs, e + 2 * SC_BYTES);
        lds_words<SUB>(vz, e + 3 * SC_BYTES);
    }
    u32 vw[4 * SUB][VW];  // tokens 4 SUB t + i
#pragma unroll
    for (int i = 0; i < 4 * SUB; ++i)
        lds_words<VW>(vw[i], base + TT * RB + (4 * SUB * t + i) * RB + g * (VW * 4));

    float x[SUB][4];  // S^T: (token row g, heads 2t, 2t+1), (token row g + 8, heads 2t, 2t+1)
#pragma unroll
    for (int j = 0; j < SUB; ++j) {
        x[j][0] = x[j][1] = x[j][2] = x[j][3] = 0.0f;
#pragma unroll
        for (int c = 0; c < NCH; ++c) {
            u32 a0, a1, a2, a3;
            k_frag(kw[j][0], c, a0, a2);
            k_frag(kw[j][1], c, a1, a3);
            mma16816(x[j], a0, a1, a2, a3, qf.b[c][0], qf.b[c][1]);
        }
    }
    float tmax[2] = {NEG_INF, NEG_INF};
#pragma unroll
    for (int j = 0; j < SUB; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const bool valid = !TAIL || tok0 + 2 * SUB * g + 2 * j + h < ctx;
            float sk = scale_log2, zk = 0.0f;
            if constexpr (QUANT) {
                sk *= half_of(ks[j], h);
                zk = half_of(kz[j], h);
            }
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                float v = x[j][2 * h + e];
                v = QUANT ? sk * (v - (zk * qf.qsum[e] + qf.qoff[e])) : v * sk;
                v = valid ? v : NEG_INF;
                x[j][2 * h + e] = v;
                tmax[e] = fmaxf(tmax[e], v);
            }
        }
    }
    float m_use[2], alpha[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
#pragma unroll
        for (int o = 4; o < 32; o <<= 1) tmax[e] = fmaxf(tmax[e], __shfl_xor_sync(0xffffffffu, tmax[e], o));
        const float m_new = fmaxf(st.m[e], tmax[e]);
        m_use[e] = m_new == NEG_INF ? 0.0f : m_new;
        alpha[e] = ex2(st.m[e] - m_use[e]);
        st.m[e] = m_new;
    }
    float psum[2] = {0.0f, 0.0f}, zsum[2] = {0.0f, 0.0f};
    u32 pb[SUB][2];  // B fragments of P^T (times the V scale): tokens (k) 2t, 2t+1 / 2t+8, 2t+9, head g
#pragma unroll
    for (int j = 0; j < SUB; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float p0 = ex2(x[j][2 * h] - m_use[0]), p1 = ex2(x[j][2 * h + 1] - m_use[1]);
            psum[0] += p0;
            psum[1] += p1;
            u32 r;
            if constexpr (QUANT) {
                const bool valid = !TAIL || tok0 + 2 * SUB * g + 2 * j + h < ctx;  // unwritten: NaN scales
                const float sv = valid ? half_of(vs[j], h) : 0.0f, zv = valid ? half_of(vz[j], h) : 0.0f;
                r = pack_h2(p0 * sv, p1 * sv);
                zsum[0] += lo_h(r) * zv;
                zsum[1] += hi_h(r) * zv;
            } else {
                r = pack_h2(p0, p1);
            }
            pb[j][h] = movm_trans(r);
        }
    }
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        st.l[e] = st.l[e] * alpha[e] + psum[e];
        st.corr[e] = st.corr[e] * alpha[e] + zsum[e];
    }
    if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {  // only when some max moved
#pragma unroll
        for (int i = 0; i < NCH; ++i) {
            st.acc[i][0] *= alpha[0];
            st.acc[i][1] *= alpha[1];
            st.acc[i][2] *= alpha[0];
            st.acc[i][3] *= alpha[1];
        }
    }
    if constexpr (TAIL && !QUANT) {  // unwritten slots past the context may hold NaN: zero those tokens
#pragma unroll
        for (int i = 0; i < 4 * SUB; ++i) {
            if (tok0 + 4 * SUB * t + i >= ctx) {
#pragma unroll
                for (int w = 0; w < VW; ++w) vw[i][w] = 0u;
            }
        }
    }
#pragma unroll
    for (int j = 0; j < SUB; ++j) {
        // k 2t, 2t+1 are S^T rows 2t, 2t+1 of subtile j: tokens 4 SUB t + 2j and 4 SUB t + 2 SUB + 2j (+ 1 for
        // k 2t + 8, 2t + 9)
        u32 ha[D / 8], hb[D / 8];
        v_pairs(vw[2 * j], vw[2 * SUB + 2 * j], ha);
        v_pairs(vw[2 * j + 1], vw[2 * SUB + 2 * j + 1], hb);
#pragma unroll
        for (int i = 0; i < NCH; ++i)
            mma16816(st.acc[i], ha[2 * i], ha[2 * i + 1], hb[2 * i], hb[2 * i + 1], pb[j][0], pb[j][1]);
    }
}

}  // namespace dec

}  // namespace

#ifdef QS_DEC_COMBINE
namespace {
namespace dec {
__device__ __forceinline__ void ld_cg_v2(const float* p, float& a, float& b) {
    asm volatile("ld.global.cg.v2.f32 {%0, %1}, [%2];" : "=f"(a), "=f"(b) : "l"(p));
}
__device__ __forceinline__ void ld_cg_v4(const float* p, float* v) {
    asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(v[0]), "=f"(v[1]), "=f"(v[2]), "=f"(v[3])
                 : "l"(p));
}
// The last split's combine with fewer round trips: a warp per head reads every split's (m, l) once into
// registers (one load per 32 splits, all in flight), then each thread sums 4 channels over the splits 16
// partial rows at a time (16 loads in flight). Same weights and order of summation as the default.
constexpr int ML_REGS = (MAX_SPLITS + 31) / 32;
constexpr int DEPTH = 16;
__device__ __forceinline__ void combine_fast(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                             float* sm_w, u16* __restrict__ out, long long ldo, int b,
                                             int num_heads, int h0, int nh, int num_splits, int n_valid,
                                             int warp, int lane) {
    for (int hl = warp; hl < nh; hl += W) {
        const float* ml = part_ml + 2 * ((long long)b * num_heads + h0 + hl) * num_splits;
        float ms[ML_REGS], ls[ML_REGS];
#pragma unroll
        for (int r = 0; r < ML_REGS; ++r) {
            ms[r] = NEG_INF;
            ls[r] = 0.0f;
            if (lane + 32 * r < n_valid) ld_cg_v2(ml + 2 * (lane + 32 * r), ms[r], ls[r]);
        }
        float mx = NEG_INF;
#pragma unroll
        for (int r = 0; r < ML_REGS; ++r) mx = fmaxf(mx, ms[r]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        float l = 0.0f;
#pragma unroll
        for (int r = 0; r < ML_REGS; ++r)
            if (ms[r] != NEG_INF) l += ex2(ms[r] - mx) * ls[r];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
        const float rl = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
        for (int r = 0; r < ML_REGS; ++r)
            if (lane + 32 * r < n_valid)
                sm_w[hl * num_splits + lane + 32 * r] = ms[r] == NEG_INF ? 0.0f : ex2(ms[r] - mx) * rl;
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < nh * (D / 4); idx += blockDim.x) {
        const int hl = idx / (D / 4), d4 = idx - hl * (D / 4);
        const long long row0 = ((long long)b * num_heads + h0 + hl) * num_splits;
        const float* wt = sm_w + hl * num_splits;
        float o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int sp0 = 0; sp0 < n_valid; sp0 += DEPTH) {
            float v[DEPTH][4];
#pragma unroll
            for (int j = 0; j < DEPTH; ++j)
                if (sp0 + j < n_valid) ld_cg_v4(part_o + (row0 + sp0 + j) * D + 4 * d4, v[j]);
#pragma unroll
            for (int j = 0; j < DEPTH; ++j) {
                if (sp0 + j < n_valid) {
                    const float f = wt[sp0 + j];
#pragma unroll
                    for (int c = 0; c < 4; ++c) o[c] += f * v[j][c];
                }
            }
        }
        u16* dst = out + (long long)b * ldo + (long long)(h0 + hl) * D + 4 * d4;
        *reinterpret_cast<uint2_t*>(dst) = uint2_t{pack_h2(o[0], o[1]), pack_h2(o[2], o[3])};
    }
}
}  // namespace dec
}  // namespace
#endif

#ifdef QS_DEC_QUANT
namespace {
namespace dec {
__device__ __forceinline__ void ld_cg_h4(const u16* p, u32& a, u32& b) {
    asm volatile("ld.global.cg.v2.u32 {%0, %1}, [%2];" : "=r"(a), "=r"(b) : "l"(p));
}
// 4 consecutive fp16 values (two words) folded into the token's max |v| and exact fp64 sum.
__device__ __forceinline__ void quant_stats(u32 w0, u32 w1, float& amax, double& sum, bool with_sum) {
    const float v[4] = {lo_h(w0), hi_h(w0), lo_h(w1), hi_h(w1)};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        amax = fmaxf(amax, fabsf(v[e]));
        if (with_sum) sum = dadd_rn(sum, (double)v[e]);
    }
}
__device__ __forceinline__ u32 quant_codes4(u32 w0, u32 w1, float s, float rs) {
    const float v[4] = {lo_h(w0), hi_h(w0), lo_h(w1), hi_h(w1)};
    u32 packed = 0;
#pragma unroll
    for (int e = 0; e < 4; ++e)
        packed |= ((u32)max(-127, min(127, quant_code(v[e], s, rs))) & 0xFFu) << (8 * e);
    return packed;
}
constexpr int QKEEP = 8;  // 4-value chunks per thread kept in registers between the two passes over a row

// The o_proj input of token b, fused: called by every block once it has written its final fp16 output
// (heads h0 .. h0 + nh - 1 of token b); the last of the token's gridDim.y such blocks to arrive (a counter
// per token, reset by that block, like the split combine's) reads the token's whole fp16 row back from out
// (L2) and quantizes it as kernels/act_quant.quantize_per_token (cuda/rows.cu) does, bit for bit: amax over
// the row, scale = fp16(amax / 127) (0 -> 1), codes rint(v / scale) clipped to +-127, the exact sum (fp64)
// rounded once to fp32 when qsums is given. `red` is shared scratch of 3 * W words (the merge buffer).
__device__ void quantize_token(const u16* __restrict__ out, long long ldo, int b, int K, int* tok_counter,
                               int* sm_flag, float* red, s8* __restrict__ qcodes, u16* __restrict__ qscales,
                               float* __restrict__ qsums) {
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        const int last = atomicAdd(tok_counter, 1) == (int)gridDim.y - 1;
        if (last) *tok_counter = 0;  // every head block of the token has arrived: ready for the next call
        *sm_flag = last;
    }
    __syncthreads();
    if (!*sm_flag) return;
    __threadfence();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const bool with_sum = qsums != nullptr;
    const u16* row = out + (long long)b * ldo;
    const int n4 = K >> 2;
    float amax = 0.0f;
    double sum = 0.0;
    u32 keep[QKEEP][2];
#pragma unroll
    for (int j = 0; j < QKEEP; ++j) {
        const int i = threadIdx.x + j * (32 * W);
        keep[j][0] = keep[j][1] = 0u;
        if (i < n4) ld_cg_h4(row + 4 * i, keep[j][0], keep[j][1]);
    }
#pragma unroll
    for (int j = 0; j < QKEEP; ++j)
        if (threadIdx.x + j * (32 * W) < n4) quant_stats(keep[j][0], keep[j][1], amax, sum, with_sum);
    for (int i = threadIdx.x + QKEEP * (32 * W); i < n4; i += (32 * W)) {
        u32 w0, w1;
        ld_cg_h4(row + 4 * i, w0, w1);
        quant_stats(w0, w1, amax, sum, with_sum);
    }
    // block reductions (max exact in any order; the fp64 sum of fp16 values is exact, so order-free too)
    double* red_d = reinterpret_cast<double*>(red);
    float* red_f = red + 2 * W;
    amax = warp_max(amax);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum = dadd_rn(sum, __shfl_xor_sync(0xffffffffu, sum, o));
    if (lane == 0) {
        red_f[warp] = amax;
        red_d[warp] = sum;
    }
    __syncthreads();
    amax = red_f[0];
    sum = red_d[0];
#pragma unroll
    for (int w = 1; w < W; ++w) {
        amax = fmaxf(amax, red_f[w]);
        sum = dadd_rn(sum, red_d[w]);
    }
    const u16 scale_h = token_scale(amax);
    const float scale = h2f(scale_h), rscale = rcp_approx(scale);
    if (threadIdx.x == 0) {
        qscales[b] = scale_h;
        if (with_sum) qsums[b] = (float)sum;
    }
    u32* qrow = reinterpret_cast<u32*>(qcodes + (long long)b * K);
#pragma unroll
    for (int j = 0; j < QKEEP; ++j) {
        const int i = threadIdx.x + j * (32 * W);
        if (i < n4) qrow[i] = quant_codes4(keep[j][0], keep[j][1], scale, rscale);
    }
    for (int i = threadIdx.x + QKEEP * (32 * W); i < n4; i += (32 * W)) {
        u32 w0, w1;
        ld_cg_h4(row + 4 * i, w0, w1);
        qrow[i] = quant_codes4(w0, w1, scale, rscale);
    }
}
}  // namespace dec
}  // namespace
#define QS_QUANTIZE_TOKEN() \
    quantize_token(out, ldo, b, num_heads * D, counters + (long long)gridDim.z * gridDim.y + b, sm_flag, \
                   sm_o, qcodes, qscales, qsums)
#endif

extern "C" __device__ const int qs_decode_smem_fixed = dec::FIXED_SMEM;
extern "C" __device__ const int qs_decode_max_splits = dec::MAX_SPLITS;

// Grid (num_splits, num_kv_heads * head_chunks, batch); block 32 * QS_WARPS; dynamic shared memory
// qs_decode_smem_fixed + (tokens_per_split / 64) * 4 bytes; num_splits <= qs_decode_max_splits. With several
// splits, every block writes fp32 partials (o, m, l) and the last block of a (sequence, kv head) to finish (a
// counter per pair, reset by that block) combines them: one launch, no host synchronisation. counters: one
// per (sequence, head block), [batch][gridDim.y], then with QS_DEC_QUANT one per sequence (quantize_token),
// all zero between calls; with QS_DEC_QUANT, qcodes [batch][num_heads * D] (contiguous rows), qscales [batch]
// and qsums [batch] (or null) receive the quantized output, and counters are needed with one split too.
extern "C" __global__ void __launch_bounds__(32 * QS_WARPS, 16 / QS_WARPS) qs_decode_attn(
    const u16* __restrict__ q, long long ldq, const u8* __restrict__ k_pool, const u8* __restrict__ v_pool,
    long long page_bytes, const int* __restrict__ block_tables, int bt_stride,
    const int* __restrict__ context_lens, int num_heads, int num_kv_heads, float scale_log2,
    int tokens_per_split, int num_splits, u16* __restrict__ out, long long ldo, float* __restrict__ part_o,
    float* __restrict__ part_ml, int* __restrict__ counters
#ifdef QS_DEC_QUANT
    , s8* __restrict__ qcodes, u16* __restrict__ qscales, float* __restrict__ qsums
#endif
    ) {
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
        if (ctx <= 0 && split == 0) {
            for (int idx = threadIdx.x; idx < nh * D; idx += blockDim.x)
                out[(long long)b * ldo + (long long)(h0 + idx / D) * D + idx % D] = 0;
#ifdef QS_DEC_QUANT
            QS_QUANTIZE_TOKEN();
#endif
        }
        return;
    }
    const int end = min(ctx, start + tokens_per_split);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;

    const int npages = end > start ? (end - start + 63) >> 6 : 0;
    for (int i = threadIdx.x; i < npages; i += blockDim.x)
        sm_pages[i] = block_tables[(long long)b * bt_stride + (start >> 6) + i];

    const Qf qf = load_q(q, ldq, b, h0, nh, lane);
    __syncthreads();

    State st;
    init_state(st);

    const long long sc_off = (long long)num_kv_heads * 64 * RB;
    const long long zr_off = sc_off + (long long)num_kv_heads * 128;
    const int ntiles = end > start ? (end - start + TT - 1) / TT : 0;
    const int mine = ntiles > warp ? (ntiles - warp + W - 1) / W : 0;  // tiles warp, warp + W, ...
    const u32 ring = smem_addr(smem) + warp * (STAGES * TILE_BYTES);
    const ScaleCopy sc = scale_copy(lane, sc_off, zr_off);
    auto issue = [&](int k) {
        const int it = warp + W * k;
        const long long page = sm_pages[it / (64 / TT)];
        issue_tile(ring + (k % STAGES) * TILE_BYTES, k_pool + page * page_bytes, v_pool + page * page_bytes,
                   kvh * 64 + TT * (it % (64 / TT)), sc, lane);
    };
#pragma unroll
    for (int k = 0; k < STAGES - 1; ++k) {
        if (k < mine) issue(k);
        cp_async_commit();
    }
    for (int k = 0; k < mine; ++k) {
        cp_async_wait<STAGES - 2>();
        __syncwarp();
        const u32 stage = ring + (k % STAGES) * TILE_BYTES;
        const int tok0 = start + TT * (warp + W * k);
        if (tok0 + TT <= ctx)
            compute_tile<false>(stage, st, qf, tok0, ctx, scale_log2, lane);
        else
            compute_tile<true>(stage, st, qf, tok0, ctx, scale_log2, lane);
        __syncwarp();
        if (k + STAGES - 1 < mine) issue(k + STAGES - 1);
        cp_async_commit();
    }
    cp_async_wait<0>();

    // merge the warps (shared memory of the rings is reused)
    sum_lanes_of_head(st);
    __syncthreads();
    if (g == 0) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            sm_stat[warp * 24 + 2 * t + e] = st.m[e];
            sm_stat[warp * 24 + 8 + 2 * t + e] = st.l[e];
            sm_stat[warp * 24 + 16 + 2 * t + e] = st.corr[e];
        }
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
    if (num_splits == 1) {
#ifdef QS_DEC_QUANT
        QS_QUANTIZE_TOKEN();
#endif
        return;
    }

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
#ifdef QS_DEC_COMBINE
    combine_fast(part_o, part_ml, sm_o, out, ldo, b, num_heads, h0, nh, num_splits, n_valid, warp, lane);
#else
    float* sm_w = sm_o;  // [8][num_splits]: each split's weight exp2(m_s - m) / l (the merge buffer is free)
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
        const float r = l > 0.0f ? 1.0f / l : 0.0f;
        for (int sp = lane; sp < n_valid; sp += 32) {
            const float ms = ld_cg(ml + 2 * sp);
            sm_w[hl * num_splits + sp] = ms == NEG_INF ? 0.0f : ex2(ms - mx) * r;
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < nh * (D / 4); idx += blockDim.x) {
        const int hl = idx / (D / 4), d4 = idx - hl * (D / 4);
        const long long row0 = ((long long)b * num_heads + h0 + hl) * num_splits;
        const float* wt = sm_w + hl * num_splits;
        float o0 = 0.0f, o1 = 0.0f, o2 = 0.0f, o3 = 0.0f;
#pragma unroll 8
        for (int sp = 0; sp < n_valid; ++sp) {
            const float f = wt[sp];
            float v0, v1, v2, v3;
            asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];"
                         : "=f"(v0), "=f"(v1), "=f"(v2), "=f"(v3)
                         : "l"(part_o + (row0 + sp) * D + 4 * d4));
            o0 += f * v0;
            o1 += f * v1;
            o2 += f * v2;
            o3 += f * v3;
        }
        u16* dst = out + (long long)b * ldo + (long long)(h0 + hl) * D + 4 * d4;
        *reinterpret_cast<uint2_t*>(dst) = uint2_t{pack_h2(o0, o1), pack_h2(o2, o3)};
    }
#endif
#ifdef QS_DEC_QUANT
    QS_QUANTIZE_TOKEN();
#endif
}

#ifdef QS_DEC_PERSIST
// ---------------------------------------------------------------------------------------------------------
// Decode, one split, persistent blocks (tuning alternative for large batches)
// ---------------------------------------------------------------------------------------------------------
// qs_decode_attn_persist: the same per-warp tile loop as qs_decode_attn without split-K, but each block
// loops over (sequence, kv head block) items blockIdx.x, + gridDim.x, ... and every warp's cp.async ring runs
// on across item boundaries: the first tiles of the next item are in flight while the warp finishes the
// current one, merges it and loads the next q. The warps of an item are merged in a fixed order (warp 0,
// 1, .., W-1: deterministic) through a [8][D/2] fp32 buffer outside the ring, one half of the channels at a
// time, handed on by named barriers (warp w waits on barrier w; the last warp writes the fp16 output and
// frees the buffer on barrier W), so no warp waits for the whole block.
namespace {
namespace dec {
static_assert(W >= 2 && W <= 8, "the persistent decode chains 2 to 8 warps");
constexpr int HALF = D / 2;
constexpr int PERSIST_SMEM = W * STAGES * TILE_BYTES + (8 * HALF + 2 * 16) * 4;
// Named barriers 1 .. W of two warps (64 threads); the id is dispatched to immediates so that the kernel
// declares W + 1 barriers rather than all 16.
#define QS_BAR_CASES(op)                                                               \
    switch (id) {                                                                      \
    case 1: asm volatile(op " 1, 64;" ::: "memory"); break;                            \
    case 2: asm volatile(op " 2, 64;" ::: "memory"); break;                            \
    case 3: asm volatile(op " 3, 64;" ::: "memory"); break;                            \
    case 4: asm volatile(op " 4, 64;" ::: "memory"); break;                            \
    case 5: if (W >= 5) asm volatile(op " 5, 64;" ::: "memory"); break;                \
    case 6: if (W >= 6) asm volatile(op " 6, 64;" ::: "memory"); break;                \
    case 7: if (W >= 7) asm volatile(op " 7, 64;" ::: "memory"); break;                \
    default: if (W >= 8) asm volatile(op " 8, 64;" ::: "memory"); break;               \
    }
__device__ __forceinline__ void bar_sync64(int id) { QS_BAR_CASES("bar.sync") }
__device__ __forceinline__ void bar_arrive64(int id) { QS_BAR_CASES("bar.arrive") }
#undef QS_BAR_CASES
// Tiles warp, warp + W, .. of a context of ctx tokens that this warp computes.
__device__ __forceinline__ int warp_tiles(int ctx, int warp) {
    const int nt = ctx > 0 ? (ctx + TT - 1) / TT : 0;
    return nt > warp ? (nt - warp + W - 1) / W : 0;
}
// Warp `warp`'s share of one item merged into the chain for channel half r (lanes g in [4r, 4r + 4) hold
// those channels); the last warp writes out[.., heads h0 .. h0 + nh - 1, half r].
__device__ __forceinline__ void chain_round(const State& st, int r, float* buf, float* ml, u16* orow, int nh,
                                            int warp, int lane) {
    const int g = lane >> 2, t = lane & 3;
    const bool live = (g >> 2) == r;
    const int c0 = (D / 8) * g - r * HALF;  // this lane's first channel within the half
    if (warp == 0) {
        if (live) {
#pragma unroll
            for (int i = 0; i < NCH; ++i) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    buf[(2 * t + e) * HALF + c0 + 2 * i] = st.acc[i][e] - st.corr[e];
                    buf[(2 * t + e) * HALF + c0 + 2 * i + 1] = st.acc[i][2 + e] - st.corr[e];
                }
            }
        }
        if (g == 4 * r) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                ml[2 * (2 * t + e)] = st.m[e];
                ml[2 * (2 * t + e) + 1] = st.l[e];
            }
        }
        bar_arrive64(1);
        return;
    }
    bar_sync64(warp);
    float fb[2], fw[2], mn[2], ln[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const float mb = ml[2 * (2 * t + e)], lb = ml[2 * (2 * t + e) + 1];
        mn[e] = fmaxf(mb, st.m[e]);
        fb[e] = mb == NEG_INF ? 0.0f : ex2(mb - mn[e]);
        fw[e] = st.m[e] == NEG_INF ? 0.0f : ex2(st.m[e] - mn[e]);
        ln[e] = lb * fb[e] + st.l[e] * fw[e];
    }
    if (warp < W - 1) {
        if (live) {
#pragma unroll
            for (int i = 0; i < NCH; ++i) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float* p = buf + (2 * t + e) * HALF + c0 + 2 * i;
                    p[0] = p[0] * fb[e] + (st.acc[i][e] - st.corr[e]) * fw[e];
                    p[1] = p[1] * fb[e] + (st.acc[i][2 + e] - st.corr[e]) * fw[e];
                }
            }
        }
        __syncwarp();  // every lane has read the running (m, l) before it is replaced
        if (g == 4 * r) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                ml[2 * (2 * t + e)] = mn[e];
                ml[2 * (2 * t + e) + 1] = ln[e];
            }
        }
        bar_arrive64(warp + 1);
        return;
    }
    if (live) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            if (2 * t + e >= nh) continue;
#pragma unroll
            for (int i = 0; i < NCH; ++i) {
                const float* p = buf + (2 * t + e) * HALF + c0 + 2 * i;
                const float o0 = p[0] * fb[e] + (st.acc[i][e] - st.corr[e]) * fw[e];
                const float o1 = p[1] * fb[e] + (st.acc[i][2 + e] - st.corr[e]) * fw[e];
                *reinterpret_cast<u32*>(orow + (2 * t + e) * D + c0 + r * HALF + 2 * i) =
                    ln[e] > 0.0f ? pack_h2(o0 / ln[e], o1 / ln[e]) : 0u;
            }
        }
    }
    bar_arrive64(W);  // the buffer is free for the next round
}
}  // namespace dec
}  // namespace

extern "C" __device__ const int qs_decode_persist_smem = dec::PERSIST_SMEM;

// Grid (blocks: any count, e.g. one wave of resident blocks), block 32 * QS_WARPS, dynamic shared memory
// qs_decode_persist_smem. Arguments as qs_decode_attn without the split-K ones, plus the batch size.
extern "C" __global__ void __launch_bounds__(32 * QS_WARPS, 16 / QS_WARPS) qs_decode_attn_persist(
    const u16* __restrict__ q, long long ldq, const u8* __restrict__ k_pool, const u8* __restrict__ v_pool,
    long long page_bytes, const int* __restrict__ block_tables, int bt_stride,
    const int* __restrict__ context_lens, int num_heads, int num_kv_heads, float scale_log2, int batch,
    u16* __restrict__ out, long long ldo) {
    using namespace dec;
    extern __shared__ __align__(128) unsigned char smem[];
    float* sm_buf = reinterpret_cast<float*>(smem + W * STAGES * TILE_BYTES);  // [8][D/2]
    float* sm_ml = sm_buf + 8 * HALF;                                            // [2 halves][8][m, l]
    const int group = num_heads / num_kv_heads;
    const int chunks = (group + 7) >> 3;
    const int per_seq = num_kv_heads * chunks;
    const int n_items = batch * per_seq;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long sc_off = (long long)num_kv_heads * 64 * RB;
    const long long zr_off = sc_off + (long long)num_kv_heads * 128;
    const u32 ring = smem_addr(smem) + warp * (STAGES * TILE_BYTES);
    const ScaleCopy sc = scale_copy(lane, sc_off, zr_off);

    // issue side: (item, k) of the next tile to fetch, skipping items where this warp has no tiles
    int ic_item = blockIdx.x - gridDim.x, ic_k = 0, ic_mine = 0, ic_b = 0, ic_kvh = 0, ic_stage = 0;
    auto issue_next = [&]() {
        while (ic_k >= ic_mine) {
            ic_item += gridDim.x;
            if (ic_item >= n_items) return;
            ic_b = ic_item / per_seq;
            ic_kvh = (ic_item - ic_b * per_seq) / chunks;
            ic_mine = warp_tiles(__ldg(context_lens + ic_b), warp);
            ic_k = 0;
        }
        const int it = warp + W * ic_k;
        const long long page = __ldg(block_tables + (long long)ic_b * bt_stride + it / (64 / TT));
        issue_tile(ring + ic_stage * TILE_BYTES, k_pool + page * page_bytes, v_pool + page * page_bytes,
                   ic_kvh * 64 + TT * (it % (64 / TT)), sc, lane);
        ++ic_k;
        ic_stage = ic_stage + 1 == STAGES ? 0 : ic_stage + 1;
    };
#pragma unroll
    for (int k = 0; k < STAGES - 1; ++k) {
        issue_next();
        cp_async_commit();
    }
    int cs = 0;  // ring stage of the next tile to compute (tiles are computed in the order they are issued)
    for (int item = blockIdx.x; item < n_items; item += gridDim.x) {
        const int b = item / per_seq, y = item - b * per_seq;
        const int kvh = y / chunks;
        const int h0 = kvh * group + (y - kvh * chunks) * 8;
        const int nh = min(8, kvh * group + group - h0);
        const int ctx = __ldg(context_lens + b);
        const Qf qf = load_q(q, ldq, b, h0, nh, lane);
        State st;
        init_state(st);
        const int mine = warp_tiles(ctx, warp);
        for (int k = 0; k < mine; ++k) {
            cp_async_wait<STAGES - 2>();
            __syncwarp();
            const u32 stage = ring + cs * TILE_BYTES;
            const int tok0 = TT * (warp + W * k);
            if (tok0 + TT <= ctx)
                compute_tile<false>(stage, st, qf, tok0, ctx, scale_log2, lane);
            else
                compute_tile<true>(stage, st, qf, tok0, ctx, scale_log2, lane);
            __syncwarp();
            issue_next();
            cp_async_commit();
            cs = cs + 1 == STAGES ? 0 : cs + 1;
        }
        sum_lanes_of_head(st);
        u16* orow = out + (long long)b * ldo + (long long)h0 * D;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            if (warp == 0 && (item != blockIdx.x || r > 0)) bar_sync64(W);  // the last warp freed the buffer
            chain_round(st, r, sm_buf, sm_ml + 16 * r, orow, nh, warp, lane);
        }
    }
    cp_async_wait<0>();
    if (warp == 0 && blockIdx.x < n_items) bar_sync64(W);  // pairs the last round's arrival
}
#endif

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
