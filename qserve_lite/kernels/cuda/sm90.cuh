// Hopper (sm_90a) PTX helpers: warpgroup MMA (wgmma) on int8 and fp16, shared-memory matrix descriptors, mbarriers,
// bulk tensor copies (TMA) and warpgroup register reallocation. Inline PTX only (no CUDA headers), like
// common.cuh, which must be included first.
#pragma once

// ---- wgmma ----
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps a register live (and unmoved) up to this point: wgmma reads its operands asynchronously.
__device__ __forceinline__ void keep(u32& r) { asm volatile("" : "+r"(r)::"memory"); }
__device__ __forceinline__ void keep(int& r) { asm volatile("" : "+r"(r)::"memory"); }
// Shared-memory matrix descriptor: K-major rows of 128 bytes, 128-byte swizzle, 8-row groups 1024 B apart
// (the layout TMA writes with CU_TENSOR_MAP_SWIZZLE_128B into a 1024-byte aligned tile).
__device__ __forceinline__ u64 desc_sw128(const void* p) {
    const u64 addr = smem_addr(p);
    return ((addr & 0x3FFFFull) >> 4) | ((u64)(1024 >> 4) << 32) | (1ull << 62);
}

#define QS_D16(a) "+r"(d[a]), "+r"(d[a + 1]), "+r"(d[a + 2]), "+r"(d[a + 3]), "+r"(d[a + 4]), "+r"(d[a + 5]), \
    "+r"(d[a + 6]), "+r"(d[a + 7]), "+r"(d[a + 8]), "+r"(d[a + 9]), "+r"(d[a + 10]), "+r"(d[a + 11]),       \
    "+r"(d[a + 12]), "+r"(d[a + 13]), "+r"(d[a + 14]), "+r"(d[a + 15])

// D[64 x N] (s32) += A[64 x 32] (s8, registers: this warp's 16 rows as the mma.m16n8k32 A fragment)
//                  * B[32 x N] (s8, shared memory, K-major, descriptor `desc`).
__device__ __forceinline__ void wgmma_s8_n64(int* d, const u32* a, u64 desc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\nwgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, {%32, %33, %34, %35}, %36, p;\n}\n"
        : QS_D16(0), QS_D16(16)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}
__device__ __forceinline__ void wgmma_s8_n128(int* d, const u32* a, u64 desc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\nwgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, {%64, %65, %66, %67}, %68, p;\n}\n"
        : QS_D16(0), QS_D16(16), QS_D16(32), QS_D16(48)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}
__device__ __forceinline__ void wgmma_s8_n16(int* d, const u32* a, u64 desc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\nwgmma.mma_async.sync.aligned.m64n16k32.s32.s8.s8 {"
        "%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, %12, p;\n}\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}
__device__ __forceinline__ void wgmma_s8_n32(int* d, const u32* a, u64 desc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\nwgmma.mma_async.sync.aligned.m64n32k32.s32.s8.s8 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, {%16, %17, %18, %19}, %20, p;\n}\n"
        : QS_D16(0)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}
template <int N>
__device__ __forceinline__ void wgmma_s8(int* d, const u32* a, u64 desc) {
    static_assert(N == 16 || N == 32 || N == 64 || N == 128, "wgmma_s8: N is 16, 32, 64 or 128");
    if constexpr (N == 16) {
        wgmma_s8_n16(d, a, desc);
    } else if constexpr (N == 32) {
        wgmma_s8_n32(d, a, desc);
    } else if constexpr (N == 64) {
        wgmma_s8_n64(d, a, desc);
    } else {
        wgmma_s8_n128(d, a, desc);
    }
}
#undef QS_D16


// ---- wgmma on fp16 (fp32 accumulators) ----
// Accumulator D of m64nNk16 (f32): warp w of the warpgroup holds rows 16w + g and 16w + g + 8 (g = lane / 4,
// t = lane % 4); d[4j + 0, 1] = row g, columns 8j + 2t, 8j + 2t + 1; d[4j + 2, 3] = row g + 8, same columns.
// A fragment (registers, f16): a[0] = row g, k 2t..2t+1; a[1] = row g + 8, k 2t..2t+1; a[2] = row g,
// k 2t+8..2t+9; a[3] = row g + 8, k 2t+8..2t+9 (the mma.m16n8k16 A layout per warp). So the f32 accumulators of
// a 16-column slice, packed in pairs (d[2i], d[2i+1]) -> a[i], are the A fragment of the next product's k16 step.
#define QS_F16(a) "+f"(d[a]), "+f"(d[a + 1]), "+f"(d[a + 2]), "+f"(d[a + 3]), "+f"(d[a + 4]), "+f"(d[a + 5]), \
    "+f"(d[a + 6]), "+f"(d[a + 7]), "+f"(d[a + 8]), "+f"(d[a + 9]), "+f"(d[a + 10]), "+f"(d[a + 11]),       \
    "+f"(d[a + 12]), "+f"(d[a + 13]), "+f"(d[a + 14]), "+f"(d[a + 15])

// D[64 x 64] (+)= A[64 x 16] (f16, shared memory, K-major, `adesc`) * B[16 x 64] (f16, shared memory,
// K-major: B^T rows of 16 k, `bdesc`); accumulate = 0 overwrites D.
__device__ __forceinline__ void wgmma_f16_ss_n64(float* d, u64 adesc, u64 bdesc, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : QS_F16(0), QS_F16(16)
        : "l"(adesc), "l"(bdesc), "r"(accumulate));
}
// D[64 x 64] += A[64 x 16] (f16, registers, the fragment above) * B[16 x 64] (f16, shared memory, N-major:
// rows of k with N contiguous, `bdesc`, transposed on the fly: imm-trans-b = 1).
__device__ __forceinline__ void wgmma_f16_rs_tn_n64(float* d, const u32* a, u64 bdesc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : QS_F16(0), QS_F16(16)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(bdesc));
}
// D[64 x 128] (+)= A[64 x 16] (f16, shared memory, K-major, `adesc`) * B[16 x 128] (f16, shared memory,
// K-major: B^T rows of 16 k, `bdesc`); accumulate = 0 overwrites D.
__device__ __forceinline__ void wgmma_f16_ss_n128(float* d, u64 adesc, u64 bdesc, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : QS_F16(0), QS_F16(16), QS_F16(32), QS_F16(48)
        : "l"(adesc), "l"(bdesc), "r"(accumulate));
}
// D[64 x 128] += A[64 x 16] (f16, registers, the fragment above) * B[16 x 128] (f16, shared memory, N-major:
// rows of k with N contiguous, `bdesc`, transposed on the fly: imm-trans-b = 1).
__device__ __forceinline__ void wgmma_f16_rs_tn_n128(float* d, const u32* a, u64 bdesc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : QS_F16(0), QS_F16(16), QS_F16(32), QS_F16(48)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(bdesc));
}
template <int N>
__device__ __forceinline__ void wgmma_f16_ss(float* d, u64 adesc, u64 bdesc, int accumulate) {
    static_assert(N == 64 || N == 128, "wgmma_f16_ss: N is 64 or 128");
    if constexpr (N == 64) {
        wgmma_f16_ss_n64(d, adesc, bdesc, accumulate);
    } else {
        wgmma_f16_ss_n128(d, adesc, bdesc, accumulate);
    }
}
template <int N>
__device__ __forceinline__ void wgmma_f16_rs_tn(float* d, const u32* a, u64 bdesc) {
    static_assert(N == 64 || N == 128, "wgmma_f16_rs_tn: N is 64 or 128");
    if constexpr (N == 64) {
        wgmma_f16_rs_tn_n64(d, a, bdesc);
    } else {
        wgmma_f16_rs_tn_n128(d, a, bdesc);
    }
}
#undef QS_F16
__device__ __forceinline__ void keep(float& r) { asm volatile("" : "+f"(r)::"memory"); }
// Shared-memory descriptor of an N-major (MN-major) operand with 128-byte swizzle: rows of k, each 64 fp16 of N
// (128 bytes) per swizzle atom, 8-row groups 1024 B apart (stride byte offset), further 64-wide N blocks
// `lbo` bytes apart (leading byte offset). The layout TMA (SWIZZLE_128B) writes for a [k][64] fp16 box.
__device__ __forceinline__ u64 desc_sw128_mn(const void* p, u32 lbo) {
    const u64 addr = smem_addr(p);
    return ((addr & 0x3FFFFull) >> 4) | ((u64)((lbo & 0x3FFFFu) >> 4) << 16) | ((u64)(1024 >> 4) << 32) |
           (1ull << 62);
}

// ---- mbarriers (CTA scope) ----
__device__ __forceinline__ void mbar_init(u64* bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
// Makes the barrier initialisations visible to the async proxy (TMA) before anyone uses them.
__device__ __forceinline__ void mbar_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\nfence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(u64* bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbar_arrive(u64* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
// Blocks until the phase of parity `parity` of the barrier has completed.
__device__ __forceinline__ void mbar_wait(u64* bar, u32 parity) {
    asm volatile(
        "{\n.reg .pred done;\n"
        "QS_MBAR_WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra QS_MBAR_WAIT;\n}\n" ::"r"(smem_addr(bar)),
        "r"(parity)
        : "memory");
}

// ---- bulk tensor copies (TMA) ----
// The driver's CUtensorMap: 128 opaque bytes, 128-byte aligned (passed as a __grid_constant__ parameter).
struct __align__(128) TmaDesc {
    u64 opaque[16];
};
__device__ __forceinline__ void tma_prefetch_desc(const TmaDesc* desc) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<u64>(desc)) : "memory");
}
// 2-D tile at element coordinates (c0 innermost, c1) into shared memory; completes `bytes` on `bar`.
__device__ __forceinline__ void tma_load_2d(void* dst, const TmaDesc* desc, int c0, int c1, u64* bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
        "[%4];\n" ::"r"(smem_addr(dst)),
        "l"(reinterpret_cast<u64>(desc)), "r"(c0), "r"(c1), "r"(smem_addr(bar))
        : "memory");
}

// The same tile multicast to the CTAs of `cta_mask` in this cluster: the bytes land at dst's offset in each of
// their shared memories and complete on the mbarrier at bar's offset in each.
__device__ __forceinline__ void tma_load_2d_multicast(void* dst, const TmaDesc* desc, int c0, int c1, u64* bar,
                                                      unsigned short cta_mask) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster "
        "[%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(smem_addr(dst)),
        "l"(reinterpret_cast<u64>(desc)), "r"(c0), "r"(c1), "r"(smem_addr(bar)), "h"(cta_mask)
        : "memory");
}

// ---- thread block clusters ----
__device__ __forceinline__ u32 cluster_ctarank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}
__device__ __forceinline__ u32 cluster_id_x() {
    u32 r;
    asm volatile("mov.u32 %0, %%clusterid.x;\n" : "=r"(r));
    return r;
}
__device__ __forceinline__ u32 cluster_count_x() {
    u32 r;
    asm volatile("mov.u32 %0, %%nclusterid.x;\n" : "=r"(r));
    return r;
}
// Every (non-exited) thread of the cluster arrives, then waits for all: orders shared-memory state (barrier
// initialisation, the last remote arrivals) across the cluster's CTAs.
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}
// Arrives on the mbarrier at bar's offset in the shared memory of CTA `rank` of this cluster, with the default
// (.release.cta) semantics: it only tells the peer's producer that this warp's reads of a slot are done, as in
// CUTLASS's cluster barrier. A .release.cluster arrival made each stage about 0.6 us slower (measured on an
// H200, 2026-12-02: 128 x 256 clusters at 4,096 tokens 259 -> 171 us, 64 x 128 795 -> 333 us).
__device__ __forceinline__ void mbar_arrive_cluster(u64* bar, u32 rank) {
    u32 remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(smem_addr(bar)), "r"(rank));
    asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(remote) : "memory");
}

// ---- warpgroup register reallocation and named barriers ----
template <int REGS>
__device__ __forceinline__ void regs_dealloc() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS));
}
template <int REGS>
__device__ __forceinline__ void regs_alloc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS));
}
__device__ __forceinline__ void named_bar(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// Counts this thread's arrival at named barrier `id` (of `threads`) without waiting.
__device__ __forceinline__ void named_bar_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// Orders this thread's generic-proxy shared-memory writes before later async-proxy reads (wgmma, TMA).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
