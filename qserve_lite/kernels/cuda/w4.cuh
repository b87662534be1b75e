// QServe packed W4 weights: nibble unpacking and the progressive (g128) level-1 dequantization.
//
// A lane's 16 bytes of a packed 32 (out) x 32 (in) tile are 4 words, word i = 2c + b; byte e of word i holds
// k = 16c + 4t + e (t = lane % 4) of channel 8b + r (low nibble) and 16 + 8b + r (high nibble), r = lane / 4.
// The low nibbles of words 0..3 are therefore the mma A fragment (rows g / g + 8, k 4t.. / 16 + 4t..) of the
// m16 tile of channels 0-15, the high nibbles that of channels 16-31.
#pragma once

__device__ __forceinline__ void unpack_w4(const uint4& q, u32 (&lo)[4], u32 (&hi)[4]) {
    lo[0] = q.x & 0x0F0F0F0Fu; hi[0] = (q.x >> 4) & 0x0F0F0F0Fu;
    lo[1] = q.y & 0x0F0F0F0Fu; hi[1] = (q.y >> 4) & 0x0F0F0F0Fu;
    lo[2] = q.z & 0x0F0F0F0Fu; hi[2] = (q.z >> 4) & 0x0F0F0F0Fu;
    lo[3] = q.w & 0x0F0F0F0Fu; hi[3] = (q.w >> 4) & 0x0F0F0F0Fu;
}

// g128 parameters of the 4 channels r, r+8, r+16, r+24 a lane touches: QServe's 0,8,16,24 permutation puts
// their s2 bytes (and their -z mod 256 bytes) in one word each. mul[j] = s2, add[j] = (128 - z) in all 4 bytes.
__device__ __forceinline__ void g128_params(u32 s2_word, u32 negz_word, u32 (&mul)[4], u32 (&add)[4]) {
    const u32 z128 = negz_word ^ 0x80808080u;  // (-z mod 256) + 128 = 128 - z per byte
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        mul[j] = (s2_word >> (8 * j)) & 0xFFu;
        add[j] = byte_perm(z128, 0, 0x1111u * j);
    }
}

// u8 = codes * s2 - z for 4 codes in the bytes of `nib`, as (codes * s2 + (128 - z)) ^ 0x80 per byte: the
// true value lies in [-128, 127], so each byte of the multiply-add stays in 0..255 and no carry crosses bytes.
__device__ __forceinline__ u32 g128_level1(u32 nib, u32 mul, u32 add) { return (nib * mul + add) ^ 0x80808080u; }
