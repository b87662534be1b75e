// RoPE on q and k, then K and V quantized per token per head and scattered into the paged KV cache.
// The byte layout of a page is documented in qserve_lite/kernels/paged_kv.py; kernels/attention.rope_write_kv is the
// numpy twin (bit for bit).
//
// One block per token, its warps taking the heads in turn (query heads, then kv heads of K, then of V; the
// launcher sizes the block: kernels/cuda/kv_writer.writer_warps); each warp loads its first head's row before
// the block computes cos / sin. Lane l holds the
// channel pairs (i, i + D/2) for i = l*P .. l*P+P-1, P = D/64 (half-split RoPE pairing, HF Llama):
//   cos, sin  = fp32(cos / sin(fp64(position) * inv_freq[i]))      inv_freq: fp64, llama3 scaling included
//   x1' = fp16(x1 * c - x2 * s), x2' = fp16(x2 * c + x1 * s)         each fp32 operation rounded once
// q and k are rotated in place (fp16). With QS_KHAD, q and k rows (not v) are then multiplied per head by the
// normalized Sylvester Hadamard matrix H_D (the K-cache rotation; q k^T is unchanged since H H^T = I): a fast
// Walsh-Hadamard transform in fp32 over the head's channels c = h * D/2 + lane * P + j (h: x1 / x2), stages of
// increasing mask m = 1, 2, ..., D/2, each pairing (c, c | m) with c & m == 0 into (a + b, a - b), one fp32
// add / sub rounded once (m < P: registers; P <= m < D/2: lanes, through shuffles; m = D/2: x1 and x2); then
// fp16(x * fp32(1 / sqrt(D))) stored in place (kernels/attention.head_hadamard is the twin). K (rotated) and V are
// then quantized with kernels/kv_quant.kv_quantize's exact steps (min/max, fp16 scale with its floor, fp16 float
// zero, rint codes) and written at slot_mapping[token] (page * 64 + offset; negative: padding, nothing
// written). kv_bits 16 stores fp16.
//
// Macros: QS_D head_dim (multiple of 64; a power of two with QS_KHAD), QS_BITS 4, 8 or 16, QS_ROPE 1 (apply)
// or 0 (write only), QS_KHAD 1 (Hadamard on q and k after RoPE) or 0, QS_PAIRS 1 (head_dim a multiple of 128,
// 4-byte aligned q / k / v rows: two channels per load and store) or 0.
#include "common.cuh"

#ifndef QS_D
#define QS_D 128
#endif
#ifndef QS_BITS
#define QS_BITS 4
#endif
#ifndef QS_ROPE
#define QS_ROPE 1
#endif
#ifndef QS_KHAD
#define QS_KHAD 0
#endif
#ifndef QS_PAIRS
#define QS_PAIRS 0
#endif

namespace {

constexpr int D = QS_D;
constexpr int HALF = D / 2;
constexpr int P = D / 64;  // channel pairs per lane
constexpr int ROW_BYTES = D * QS_BITS / 8;
static_assert(D % 64 == 0, "head_dim must be a multiple of 64");
static_assert(!QS_PAIRS || P % 2 == 0, "32-bit channel pairs need head_dim a multiple of 128");

#if QS_KHAD
static_assert((D & (D - 1)) == 0, "the q / k Hadamard rotation needs a power-of-two head_dim");
constexpr int log2_int(int n) { return n > 1 ? 1 + log2_int(n >> 1) : 0; }
constexpr int LOG2D = log2_int(D);
// fp32(1 / sqrt(D)), exactly: a power of two, or one times fp32(sqrt(1/2)) = 0x3F3504F3.
constexpr float KHAD_SCALE = (LOG2D % 2 ? 0x1.6a09e6p-1f : 1.0f) / (float)(1 << (LOG2D / 2));

// In place: the unnormalized Walsh-Hadamard transform of the warp's head, x1[j] = channel lane * P + j and
// x2[j] = channel HALF + lane * P + j; stages in increasing mask order (the twin's order).
__device__ __forceinline__ void fwht(float (&x1)[P], float (&x2)[P], int lane) {
#pragma unroll
    for (int m = 1; m < P; m <<= 1) {  // channel bits below P: registers
#pragma unroll
        for (int j = 0; j < P; ++j) {
            if (j & m) continue;
            float a = x1[j], b = x1[j | m];
            x1[j] = fadd_rn(a, b);
            x1[j | m] = fsub_rn(a, b);
            a = x2[j];
            b = x2[j | m];
            x2[j] = fadd_rn(a, b);
            x2[j | m] = fsub_rn(a, b);
        }
    }
#pragma unroll
    for (int lm = 1; lm < 32; lm <<= 1) {  // mask m = lm * P: lanes
        const bool upper = (lane & lm) != 0;  // holds b = x[c | m]; the partner holds a = x[c]
#pragma unroll
        for (int j = 0; j < P; ++j) {
            const float p1 = __shfl_xor_sync(0xffffffffu, x1[j], lm);
            const float p2 = __shfl_xor_sync(0xffffffffu, x2[j], lm);
            x1[j] = upper ? fsub_rn(p1, x1[j]) : fadd_rn(x1[j], p1);
            x2[j] = upper ? fsub_rn(p2, x2[j]) : fadd_rn(x2[j], p2);
        }
    }
#pragma unroll
    for (int j = 0; j < P; ++j) {  // mask HALF: x1 and x2
        const float a = x1[j], b = x2[j];
        x1[j] = fadd_rn(a, b);
        x2[j] = fsub_rn(a, b);
    }
}
#endif

#if QS_BITS != 16
constexpr int QMAX = (1 << QS_BITS) - 1;
#endif

__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }

// The lane's channels of a head row: x1[j] = channel lane * P + j, x2[j] = channel HALF + lane * P + j
// (QS_PAIRS: two channels per 32-bit access).
__device__ __forceinline__ void load_row(const u16* row, float (&x1)[P], float (&x2)[P]) {
#if QS_PAIRS
#pragma unroll
    for (int j = 0; j < P; j += 2) {
        const u32 a = *reinterpret_cast<const u32*>(row + lane_id() * P + j);
        const u32 b = *reinterpret_cast<const u32*>(row + lane_id() * P + j + HALF);
        x1[j] = h2f((u16)(a & 0xFFFFu));
        x1[j + 1] = h2f((u16)(a >> 16));
        x2[j] = h2f((u16)(b & 0xFFFFu));
        x2[j + 1] = h2f((u16)(b >> 16));
    }
#else
#pragma unroll
    for (int j = 0; j < P; ++j) {
        x1[j] = h2f(row[lane_id() * P + j]);
        x2[j] = h2f(row[lane_id() * P + j + HALF]);
    }
#endif
}
__device__ __forceinline__ void store_row(u16* row, const u16 (&a)[P], const u16 (&b)[P]) {
#if QS_PAIRS
#pragma unroll
    for (int j = 0; j < P; j += 2) {
        *reinterpret_cast<u32*>(row + lane_id() * P + j) = (u32)a[j] | ((u32)a[j + 1] << 16);
        *reinterpret_cast<u32*>(row + lane_id() * P + j + HALF) = (u32)b[j] | ((u32)b[j + 1] << 16);
    }
#else
#pragma unroll
    for (int j = 0; j < P; ++j) {
        row[lane_id() * P + j] = a[j];
        row[lane_id() * P + j + HALF] = b[j];
    }
#endif
}

}  // namespace

// Block: one token; warp w handles heads w, w + warps, ... (launcher: kernels/cuda/kv_writer.writer_warps).
extern "C" __global__ void __launch_bounds__(1024) qs_rope_write_kv(
    u16* __restrict__ q, long long ldq, u16* __restrict__ k, long long ldk, const u16* __restrict__ v,
    long long ldv, const int* __restrict__ positions, const double* __restrict__ inv_freq,
    u8* __restrict__ k_pool, u8* __restrict__ v_pool, long long page_bytes,
    const int* __restrict__ slot_mapping, int num_heads, int num_kv_heads) {
    __shared__ float cos_s[HALF], sin_s[HALF];
    const int t = blockIdx.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const int total = num_heads + 2 * num_kv_heads;
    auto head_row = [&](int hh) -> u16* {  // query heads, then K's, then V's
        if (hh < num_heads) return q + t * ldq + (long long)hh * D;
        if (hh < num_heads + num_kv_heads) return k + t * ldk + (long long)(hh - num_heads) * D;
        return const_cast<u16*>(v) + t * ldv + (long long)(hh - num_heads - num_kv_heads) * D;
    };
    float x1[P], x2[P];
    if (warp < total) load_row(head_row(warp), x1, x2);  // in flight while cos / sin are computed
#if QS_ROPE
    const double pos = (double)positions[t];
    for (int i = threadIdx.x; i < HALF; i += blockDim.x) {
        const double angle = dmul_rn(pos, inv_freq[i]);
        cos_s[i] = (float)cos(angle);
        sin_s[i] = (float)sin(angle);
    }
    __syncthreads();
#endif
    const int slot = slot_mapping[t];
    for (int hh = warp; hh < total; hh += nwarps) {
        u16* row = head_row(hh);
        if (hh != warp) load_row(row, x1, x2);
        const bool rotate = QS_ROPE && hh < num_heads + num_kv_heads;
        if (rotate) {
            u16 a[P], b[P];
#pragma unroll
            for (int j = 0; j < P; ++j) {
                const float c = cos_s[lane * P + j], s = sin_s[lane * P + j];
                a[j] = f2h(fsub_rn(fmul_rn(x1[j], c), fmul_rn(x2[j], s)));
                b[j] = f2h(fadd_rn(fmul_rn(x2[j], c), fmul_rn(x1[j], s)));
                x1[j] = h2f(a[j]);
                x2[j] = h2f(b[j]);
            }
            if (!QS_KHAD) store_row(row, a, b);  // else the Hadamard below stores the row
        }
#if QS_KHAD
        if (hh < num_heads + num_kv_heads) {  // q and k rows (warp-uniform)
            fwht(x1, x2, lane);
            u16 a[P], b[P];
#pragma unroll
            for (int j = 0; j < P; ++j) {
                a[j] = f2h(fmul_rn(x1[j], KHAD_SCALE));
                b[j] = f2h(fmul_rn(x2[j], KHAD_SCALE));
                x1[j] = h2f(a[j]);
                x2[j] = h2f(b[j]);
            }
            store_row(row, a, b);
        }
#endif
        if (hh < num_heads || slot < 0) continue;
        const bool is_v = hh >= num_heads + num_kv_heads;
        const int g = is_v ? hh - num_heads - num_kv_heads : hh - num_heads;
        u8* page = (is_v ? v_pool : k_pool) + (long long)(slot >> 6) * page_bytes;
        const int entry = g * 64 + (slot & 63);
        u8* dst = page + (long long)entry * ROW_BYTES;
#if QS_BITS == 16
#pragma unroll
        for (int j = 0; j < P; ++j) {
            reinterpret_cast<u16*>(dst)[lane * P + j] = f2h(x1[j]);
            reinterpret_cast<u16*>(dst)[lane * P + j + HALF] = f2h(x2[j]);
        }
#else
        const long long data_bytes = (long long)num_kv_heads * 64 * ROW_BYTES;
        float mn = x1[0], mx = x1[0];
#pragma unroll
        for (int j = 0; j < P; ++j) {
            mn = fminf(mn, fminf(x1[j], x2[j]));
            mx = fmaxf(mx, fmaxf(x1[j], x2[j]));
        }
        mn = warp_min(mn);
        mx = warp_max(mx);
        u16 scale_h = f2h(fdiv_rn(fsub_rn(mx, mn), (float)QMAX));
        const u16 floor_h = f2h(fmul_rn(fabsf(mn), 3.0517578125e-05f));  // |mn| * 2^-15
        if (h2f(scale_h) == 0.0f) {
            scale_h = 0x3C00;  // 1.0
        } else if (h2f(floor_h) > h2f(scale_h)) {
            scale_h = floor_h;
        }
        const float s32 = h2f(scale_h);
        const u16 zero_h = f2h(fminf(fmaxf(fdiv_rn(-mn, s32), -65504.0f), 65504.0f));
        const float z32 = h2f(zero_h);
        int c1[P], c2[P];
#pragma unroll
        for (int j = 0; j < P; ++j) {
            c1[j] = min(max(f2i_rni(fadd_rn(fdiv_rn(x1[j], s32), z32)), 0), QMAX);
            c2[j] = min(max(f2i_rni(fadd_rn(fdiv_rn(x2[j], s32), z32)), 0), QMAX);
        }
#if QS_BITS == 8
#pragma unroll
        for (int j = 0; j < P; ++j) {
            dst[lane * P + j] = (u8)c1[j];
            dst[lane * P + j + HALF] = (u8)c2[j];
        }
#else
        if constexpr (P % 2 == 0) {
#pragma unroll
            for (int j = 0; j < P; j += 2) {
                dst[(lane * P + j) / 2] = (u8)(c1[j] | (c1[j + 1] << 4));
                dst[(lane * P + j + HALF) / 2] = (u8)(c2[j] | (c2[j + 1] << 4));
            }
        } else {  // P == 1: the odd channel's code comes from the next lane
            const int n1 = __shfl_xor_sync(0xffffffffu, c1[0], 1);
            const int n2 = __shfl_xor_sync(0xffffffffu, c2[0], 1);
            if ((lane & 1) == 0) {
                dst[lane / 2] = (u8)(c1[0] | (n1 << 4));
                dst[(lane + HALF) / 2] = (u8)(c2[0] | (n2 << 4));
            }
        }
#endif
        if (lane == 0) {
            reinterpret_cast<u16*>(page + data_bytes)[entry] = scale_h;
            reinterpret_cast<u16*>(page + data_bytes + (long long)num_kv_heads * 128)[entry] = zero_h;
        }
#endif
    }
}
