"""QServe's packed W4 layout and g128 group-parameter layout (core/pack.py)."""

from __future__ import annotations

import numpy as np
import pytest

from qserve_lite.core.pack import from_qserve_group_params, pack_w4, to_qserve_group_params, unpack_w4


def reference_pack(codes: np.ndarray) -> np.ndarray:
    """Byte-by-byte from the layout description: [n/32][k/32][32 lanes][16 bytes]; o = 16a + 8b + r,
    k = 16c + 4t + e; lane = 4r + t; byte-in-lane = 8c + 4b + e; low nibble a=0, high nibble a=1."""
    n, k = codes.shape
    out = np.zeros(n * k // 2, np.uint8)
    pos = 0
    for nb in range(n // 32):
        for kb in range(k // 32):
            for lane in range(32):
                r, t = lane // 4, lane % 4
                for byte in range(16):
                    c, b, e = byte // 8, (byte // 4) % 2, byte % 4
                    o0 = nb * 32 + 8 * b + r
                    kk = kb * 32 + 16 * c + 4 * t + e
                    out[pos] = codes[o0, kk] | (codes[o0 + 16, kk] << 4)
                    pos += 1
    return out.reshape(n, k // 2).view(np.int8)


@pytest.mark.parametrize("n,k", [(32, 32), (64, 96), (96, 64), (128, 160)])
def test_pack_roundtrip_and_reference(n, k):
    rng = np.random.default_rng(n * 1000 + k)
    codes = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
    packed = pack_w4(codes)
    assert packed.dtype == np.int8 and packed.shape == (n, k // 2)
    np.testing.assert_array_equal(packed, reference_pack(codes))
    np.testing.assert_array_equal(unpack_w4(packed), codes)
    np.testing.assert_array_equal(unpack_w4(packed.view(np.uint8)), codes)


def test_pack_hand_computed_bytes():
    codes = np.zeros((32, 32), np.uint8)
    # out 9 = 16*0 + 8*1 + 1 (a=0, b=1, r=1); in 22 = 16*1 + 4*1 + 2 (c=1, t=1, e=2)
    # -> lane 4*1 + 1 = 5, byte-in-lane 8*1 + 4*1 + 2 = 14, low nibble; flat byte 5*16 + 14 = 94
    codes[9, 22] = 0x7
    # out 25 = 16 + 9 (a=1, same b, r): high nibble of the same byte
    codes[25, 22] = 0xC
    # out 0, in 0: lane 0, byte 0, low nibble; out 16, in 3 (e=3): lane 0, byte 3, high nibble
    codes[0, 0] = 0x1
    codes[16, 3] = 0xF
    # out 7 (r=7), in 31 = 16 + 12 + 3 (c=1, t=3, e=3): lane 31, byte 8 + 3 = 11, flat 31*16 + 11 = 507
    codes[7, 31] = 0x5
    flat = pack_w4(codes).view(np.uint8).reshape(-1)
    expected = np.zeros(512, np.uint8)
    expected[94] = 0xC7
    expected[0] = 0x01
    expected[3] = 0xF0
    expected[507] = 0x05
    np.testing.assert_array_equal(flat, expected)
    # rows of the [n, k/2] view: byte 94 lies in row 94 // 16 = 5, column 14
    assert pack_w4(codes).view(np.uint8)[5, 14] == 0xC7


def test_pack_second_tile_and_block_locality():
    # tile (n-block 1, k-block 2) of a 64 x 96 matrix starts at byte (1 * 3 + 2) * 512
    codes = np.zeros((64, 96), np.uint8)
    codes[32 + 16 + 8 + 3, 64 + 4 * 2 + 1] = 0xA  # a=1, b=1, r=3; c=0, t=2, e=1
    flat = pack_w4(codes).view(np.uint8).reshape(-1)
    idx = (1 * 3 + 2) * 512 + (4 * 3 + 2) * 16 + (8 * 0 + 4 * 1 + 1)
    assert flat[idx] == 0xA0 and np.count_nonzero(flat) == 1
    # each 32-row block of the packed view depends only on its own 32 output channels
    rng = np.random.default_rng(1)
    a = rng.integers(0, 16, (32, 96), dtype=np.uint8)
    b = rng.integers(0, 16, (64, 96), dtype=np.uint8)
    np.testing.assert_array_equal(pack_w4(np.concatenate([a, b])), np.concatenate([pack_w4(a), pack_w4(b)]))


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="multiples of 32"):
        pack_w4(np.zeros((24, 32), np.uint8))
    with pytest.raises(ValueError, match="multiples of 32"):
        pack_w4(np.zeros((32, 48), np.uint8))
    with pytest.raises(ValueError, match="0..15"):
        pack_w4(np.full((32, 32), 16, np.uint8))
    with pytest.raises(ValueError):
        unpack_w4(np.zeros((32, 16), np.float16))


def test_group_params_permutation_hand_checked():
    n, g = 64, 2
    s2 = np.zeros((n, g), np.uint8)
    zeros = np.zeros((n, g), np.int16)
    s2[1, 0] = 11  # channel 1 -> position 4*(1 % 8) + 1 // 8 = 4
    s2[8, 1] = 22  # channel 8 -> position 4*0 + 1 = 1
    s2[32 + 31, 0] = 33  # channel 31 of the 2nd block -> 32 + 4*7 + 3 = 63
    s2[32 + 16, 1] = 44  # channel 16 of the 2nd block -> 32 + 2 = 34
    zeros[1, 0] = 5
    out_s, out_z = to_qserve_group_params(s2, zeros)
    assert out_s.shape == (g, n) and out_s.dtype == np.int8 and out_z.dtype == np.int8
    expected = np.zeros((g, n), np.uint8)
    expected[0, 4], expected[1, 1], expected[0, 63], expected[1, 34] = 11, 22, 33, 44
    np.testing.assert_array_equal(out_s.view(np.uint8), expected)
    assert out_z[0, 4] == -5 and np.count_nonzero(out_z) == 1
    # the full order of the first block: positions hold channels 0, 8, 16, 24, 1, 9, ...
    s2 = np.repeat(np.arange(32, dtype=np.uint8)[:, None], 1, axis=1)
    out_s, _ = to_qserve_group_params(s2, np.zeros((32, 1), np.int16))
    assert list(out_s[0, :8]) == [0, 8, 16, 24, 1, 9, 17, 25]


def test_group_params_roundtrip():
    rng = np.random.default_rng(3)
    n, g = 96, 5
    s2 = rng.integers(1, 256, (n, g)).astype(np.uint8)  # up to 255: int8 storage reinterpreted
    zeros = rng.integers(-128, 128, (n, g)).astype(np.int16)
    out_s, out_z = to_qserve_group_params(s2, zeros)
    s2_back, z_back = from_qserve_group_params(out_s, out_z)
    assert s2_back.dtype == np.uint8 and z_back.dtype == np.int16
    np.testing.assert_array_equal(s2_back, s2)
    np.testing.assert_array_equal(z_back, zeros)
    # s2 bytes: uint8 reinterpreted as int8
    s2_big = np.full((32, 1), 200, np.uint8)
    assert to_qserve_group_params(s2_big, np.zeros((32, 1), np.int16))[0][0, 0] == 200 - 256


def test_s2_zeros_byte_for_every_zero():
    z = np.arange(-128, 128, dtype=np.int16)  # 256 values = 8 blocks of 32 channels
    zeros = z[:, None]
    out_s, out_z = to_qserve_group_params(np.ones_like(zeros, dtype=np.uint8), zeros)
    _, z_back = from_qserve_group_params(out_s, out_z)
    np.testing.assert_array_equal(z_back[:, 0], z)
    for c in range(256):
        blk, j = divmod(c, 32)
        pos = blk * 32 + 4 * (j % 8) + j // 8  # undo the permutation by hand
        byte = int(out_z[0, pos].view(np.uint8))
        assert byte == (-int(z[c])) % 256
        # the kernel adds the byte to q*s2 with 8-bit wrap-around, which subtracts z
        q_s2 = 100
        assert (q_s2 + byte) % 256 == (q_s2 - int(z[c])) % 256
    assert int(out_z[0, 0].view(np.uint8)) == 0x80  # position 0 holds channel 0: z = -128
    assert int(out_z[0, 4].view(np.uint8)) == 0x7F  # position 4 holds channel 1: z = -127


def test_group_params_reject_bad_input():
    with pytest.raises(ValueError, match="multiple of 32"):
        to_qserve_group_params(np.ones((24, 1), np.uint8), np.zeros((24, 1), np.int16))
    with pytest.raises(ValueError, match="-128..127"):
        to_qserve_group_params(np.ones((32, 1), np.uint8), np.full((32, 1), 128, np.int16))
