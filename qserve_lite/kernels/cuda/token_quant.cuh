// Per-token symmetric INT8 quantization steps (kernels/act_quant.py is the spec, bit for bit), shared by the
// row kernels (rows.cu) and the decode attention's fused o_proj input (attention.cu, QS_DEC_QUANT).
// Include after common.cuh (the loader inlines headers textually, so this one does not include it again).

namespace {

// The token's scale from its largest |v| (an fp16 value): fp16(fp32(amax) / 127) with IEEE division, 0 -> 1.
__device__ __forceinline__ u16 token_scale(float amax) {
    const u16 s = f2h(fdiv_rn(amax, 127.0f));
    return s == 0 ? (u16)0x3C00 : s;  // 1.0
}

// rint(fp32(v / s)) without a division per element: y = v * (1/s) is within a few fp32 ulps of v / s, so
// its rint can only differ from that of the correctly rounded quotient when y lies next to a half-integer;
// those rare elements take the IEEE division. The caller clips to [-127, 127].
__device__ __forceinline__ int quant_code(float v, float s, float rs) {
    const float y = fmul_rn(v, rs);
    float yr;
    asm("cvt.rni.f32.f32 %0, %1;" : "=f"(yr) : "f"(y));
    if (fabsf(fabsf(fsub_rn(y, yr)) - 0.5f) < 0.000244140625f) return f2i_rni(fdiv_rn(v, s));  // 2^-12
    return (int)yr;
}

}  // namespace
