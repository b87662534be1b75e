"""QServe's on-disk layouts of quantized weights, and their inverses (all exact integer permutations).

W4 ``qweight`` (both per-channel and g128): int8 [n, k // 2] whose bytes are really a tensor
[n / 32][k / 32][32 lanes][16 bytes] (the "compute-aware" order of the W4A8 GEMM: one 128-bit load per
lane yields its mma B-fragments). Inside a 32 (out) x 32 (in) tile write

    out index  o = 16 a + 8 b + r      (a, b in {0, 1}, r in 0..7)
    in index   k = 16 c + 4 t + e      (c in {0, 1}, t in 0..3, e in 0..3)

then lane = 4 r + t, the byte's position inside the lane's 16 bytes is 8 c + 4 b + e (c major, then b,
then e), and the byte holds the a = 0 channel's code in its low nibble and the a = 1 channel's (o + 16)
in its high nibble. Every 32-row block of the [n, k // 2] view holds exactly the bytes of its own 32 output
channels, which is why q/k/v (and gate/up) can be concatenated along rows after packing.

g128 group parameters: ``s2_scales`` / ``s2_zeros`` are int8 [k / 128, n] (group-major), with the output
channels of every 32-block permuted so that channel c goes to position 4 (c mod 8) + c div 8 (order
0, 8, 16, 24, 1, 9, ...). ``s2_scales`` holds the unsigned integer scale byte; ``s2_zeros`` holds -z
modulo 256 (the kernel adds it to codes * s2 with byte-wise wrap-around arithmetic).

Per-channel W4 (``s1_scales``, ``s1_szeros`` fp16 [n]) and W8A8 (``weight`` int8 [n, k] row-major,
``dequant_scale`` fp16 [n]) are stored as they are; see io/checkpoint.py.
"""

from __future__ import annotations

import numpy as np

TILE = 32  # output and input channels per packed tile


def _check_tileable(n: int, k: int, what: str) -> None:
    if n % TILE or k % TILE:
        raise ValueError(
            f"{what}: QServe's packed W4 layout needs n and k multiples of {TILE}, got n={n}, k={k}"
        )


def pack_w4(codes: np.ndarray) -> np.ndarray:
    """uint8 codes [n, k] (values 0..15) -> QServe ``qweight`` int8 [n, k // 2]."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"pack_w4: codes must be 2-D [n, k], got shape {codes.shape}")
    n, k = codes.shape
    _check_tileable(n, k, "pack_w4")
    if codes.size and (codes.min() < 0 or codes.max() > 15):
        raise ValueError("pack_w4: codes must lie in 0..15")
    c8 = codes.astype(np.uint8)
    # axes: n-block, a, b, r, k-block, c, t, e
    t = c8.reshape(n // TILE, 2, 2, 8, k // TILE, 2, 4, 4)
    # -> a, n-block, k-block, r, t, c, b, e   (lane = 4r + t; byte-in-lane = 8c + 4b + e)
    t = t.transpose(1, 0, 4, 3, 6, 5, 2, 7)
    packed = t[0] | (t[1] << 4)
    return np.ascontiguousarray(packed).reshape(n, k // 2).view(np.int8)


def unpack_w4(qweight: np.ndarray) -> np.ndarray:
    """QServe ``qweight`` int8 (or uint8) [n, k // 2] -> uint8 codes [n, k]. Exact inverse of pack_w4."""
    qweight = np.asarray(qweight)
    if qweight.ndim != 2 or qweight.dtype.itemsize != 1 or qweight.dtype.kind not in "iu":
        raise ValueError(f"unpack_w4: expected a 2-D int8 array, got {qweight.dtype} {qweight.shape}")
    n, half = qweight.shape
    k = 2 * half
    _check_tileable(n, k, "unpack_w4")
    b = np.ascontiguousarray(qweight).view(np.uint8)
    # bytes: n-block, k-block, r, t, c, b, e
    b = b.reshape(n // TILE, k // TILE, 8, 4, 2, 2, 4)
    planes = np.stack([b & 0x0F, b >> 4])  # a, n-block, k-block, r, t, c, b, e
    # back to n-block, a, b, r, k-block, c, t, e
    codes = planes.transpose(1, 0, 6, 3, 2, 5, 4, 7)
    return np.ascontiguousarray(codes).reshape(n, k)


def _perm_positions(n: int) -> np.ndarray:
    """pos[c] = stored position of output channel c (within each 32-block: 4 (c mod 8) + c div 8)."""
    c = np.arange(n)
    blk, j = np.divmod(c, TILE)
    return blk * TILE + 4 * (j % 8) + j // 8


def to_qserve_group_params(s2: np.ndarray, zeros: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W4Group s2 uint8 [n, G], zeros int16 [n, G] -> QServe (s2_scales int8 [G, n], s2_zeros int8 [G, n])."""
    s2 = np.asarray(s2)
    zeros = np.asarray(zeros)
    if s2.ndim != 2 or s2.shape != zeros.shape:
        raise ValueError(
            f"to_qserve_group_params: s2 {s2.shape} and zeros {zeros.shape} must be equal 2-D shapes"
        )
    n = s2.shape[0]
    if n % TILE:
        raise ValueError(f"to_qserve_group_params: n must be a multiple of {TILE}, got {n}")
    if s2.size and (s2.min() < 0 or s2.max() > 255):
        raise ValueError("to_qserve_group_params: s2 must lie in 0..255")
    if zeros.size and (zeros.min() < -128 or zeros.max() > 127):
        raise ValueError("to_qserve_group_params: zeros must lie in -128..127")
    pos = _perm_positions(n)
    s2_out = np.empty((s2.shape[1], n), np.uint8)
    z_out = np.empty((s2.shape[1], n), np.uint8)
    s2_out[:, pos] = s2.astype(np.uint8).T
    z_out[:, pos] = np.mod(-zeros.astype(np.int16), 256).astype(np.uint8).T
    return s2_out.view(np.int8), z_out.view(np.int8)


def from_qserve_group_params(s2_scales: np.ndarray, s2_zeros: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """QServe s2_scales / s2_zeros int8 [G, n] -> (s2 uint8 [n, G], zeros int16 [n, G] in -128..127)."""
    s2_scales = np.asarray(s2_scales)
    s2_zeros = np.asarray(s2_zeros)
    if s2_scales.ndim != 2 or s2_scales.shape != s2_zeros.shape:
        raise ValueError(
            f"from_qserve_group_params: s2_scales {s2_scales.shape} and s2_zeros {s2_zeros.shape} "
            "must be equal 2-D shapes"
        )
    n = s2_scales.shape[1]
    if n % TILE:
        raise ValueError(f"from_qserve_group_params: n must be a multiple of {TILE}, got {n}")
    pos = _perm_positions(n)
    s2 = np.ascontiguousarray(s2_scales).view(np.uint8)[:, pos].T
    neg_z = np.ascontiguousarray(s2_zeros).view(np.uint8)[:, pos].T.astype(np.int16)  # (-z) mod 256
    zeros = np.mod(256 - neg_z + 128, 256) - 128  # z in -128..127
    return np.ascontiguousarray(s2), np.ascontiguousarray(zeros.astype(np.int16))
