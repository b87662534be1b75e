"""Precision: the weight / activation / KV-cache bit widths a model runs at, named like QServe's
configurations ("w4a8kv4" = 4-bit weights, 8-bit activations, 4-bit KV cache). 16 means fp16/float;
a 16-bit KV cache is left out of the name ("w16a16" is the float model, "w4a8" a W4A8 model with an fp16
KV cache)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from qserve_lite.errors import QServeLiteError

_WA_PAIRS = ((4, 8), (8, 8), (16, 16))  # weights and activations go together: W4A8, W8A8, W16A16
_KV_BITS = (4, 8, 16)
_NAME = re.compile(r"^w(\d+)a(\d+)(?:kv(\d+))?$")


@dataclass(frozen=True)
class Precision:
    w_bits: int = 16
    a_bits: int = 16
    kv_bits: int = 16

    def __post_init__(self):
        if (self.w_bits, self.a_bits) not in _WA_PAIRS or self.kv_bits not in _KV_BITS:
            raise QServeLiteError(
                f"unsupported precision w{self.w_bits}a{self.a_bits}kv{self.kv_bits}; "
                f"valid: {', '.join(PRECISION_NAMES)}"
            )

    @property
    def name(self) -> str:
        kv = "" if self.kv_bits == 16 else f"kv{self.kv_bits}"
        return f"w{self.w_bits}a{self.a_bits}{kv}"

    @property
    def is_float(self) -> bool:
        """fp16/float weights and activations (the KV cache may still be quantized)."""
        return self.w_bits == 16

    @classmethod
    def parse(cls, name: str) -> Precision:
        """'w4a8kv4', 'w8a8kv8', 'w16a16', ... (case-insensitive; a 'kv16' suffix is accepted)."""
        m = _NAME.match(str(name).strip().lower())
        if m is not None:
            w, a, kv = int(m[1]), int(m[2]), int(m[3] or 16)
            if (w, a) in _WA_PAIRS and kv in _KV_BITS:
                return cls(w, a, kv)
        raise QServeLiteError(f"unknown precision '{name}'; valid: {', '.join(PRECISION_NAMES)}")

    def __str__(self) -> str:
        return self.name


PRECISION_NAMES = tuple(Precision(w, a, kv).name for w, a in _WA_PAIRS for kv in _KV_BITS)
