"""Quantized weight containers, in the integer form QServe's kernels consume (unpacked here; see pack.py
for the bit layout on disk). All shapes are HF layout: [out_features (n), in_features (k)].

- W4PerChannel:  W_hat[r, j] = codes[r, j] * scales[r] - szeros[r]    (uint4 codes, fp16 s, fp16 s*z)
- W4Group (QoQ progressive, g128): level-1 int8  u8[r, j] = codes[r, j] * s2[r, g] - zeros[r, g],
                 W_hat[r, j] = s1[r] * u8[r, j],  g = j // group_size            (u8 always in [-128, 127])
- W8PerChannel:  W_hat[r, j] = codes[r, j] * scales[r]                          (int8 codes, fp16 scales)

`in_features` is the model's true K. Codes may be wider (K zero-padded to a multiple of the group size);
padded columns meet zero activations, so they never change a result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class W4PerChannel:
    codes: np.ndarray  # uint8 [n, k_pad], values 0..15
    scales: np.ndarray  # float16 [n]            (QServe: s1_scales)
    szeros: np.ndarray  # float16 [n], zero*scale (QServe: s1_szeros)
    in_features: int

    kind = "w4_per_channel"

    def dequantize(self) -> np.ndarray:
        """float64 [n, in_features]."""
        w = self.codes.astype(np.float64) * self.scales.astype(np.float64)[:, None]
        return (w - self.szeros.astype(np.float64)[:, None])[:, : self.in_features]


@dataclass
class W4Group:
    codes: np.ndarray  # uint8 [n, k_pad], values 0..15
    s1: np.ndarray  # float16 [n]               (QServe: s1_scales)
    s2: np.ndarray  # uint8 [n, k_pad // group_size], integer group scales (QServe: s2_scales, transposed)
    zeros: np.ndarray  # int16 [n, k_pad // group_size], integer scaled zeros z; QServe stores -z as int8
    group_size: int
    in_features: int

    kind = "w4_group"

    def level1(self) -> np.ndarray:
        """The int8 weights the GEMM multiplies: codes * s2 - z (int16 array, values in [-128, 127])."""
        s2 = np.repeat(self.s2.astype(np.int16), self.group_size, axis=1)
        z = np.repeat(self.zeros.astype(np.int16), self.group_size, axis=1)
        return self.codes.astype(np.int16) * s2 - z

    def dequantize(self) -> np.ndarray:
        w = self.level1().astype(np.float64) * self.s1.astype(np.float64)[:, None]
        return w[:, : self.in_features]


@dataclass
class W8PerChannel:
    codes: np.ndarray  # int8 [n, k]
    scales: np.ndarray  # float16 [n]  (QServe W8A8: dequant_scale)
    in_features: int

    kind = "w8_per_channel"

    def dequantize(self) -> np.ndarray:
        w = self.codes.astype(np.float64) * self.scales.astype(np.float64)[:, None]
        return w[:, : self.in_features]


QuantizedWeight = W4PerChannel | W4Group | W8PerChannel
