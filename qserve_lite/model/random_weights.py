"""Random-weight models built directly on the device, for throughput benchmarks of real model shapes.

`build_random_weights(cfg, precision, group_size, xp=cupy)` returns DeviceWeights (model/gpu_model.py)
in exactly the layouts GPUModelRunner's kernels take, drawn layer by layer in bounded chunks on the device
(nothing of model size ever exists on the host; a 70B W4 model's 35 GB of codes are drawn 256 MiB of
temporaries at a time). With xp=numpy the same code builds a tiny model for the runner's numpy twin.

The bit layout of packed codes does not matter for random data (random bytes are random codes, and the
32-block permutation of the g128 parameters only reorders i.i.d. values), but the value ranges do:

- W4 g128 (QoQ progressive): s2 in [8, 15] and z = floor(7.5 s2), so codes * s2 <= 225 fits a byte and the
  level-1 weight codes * s2 - z lies in [-112, 113] (int8; core/formats.W4Group, kernels/w4a8_gemm). Stored
  as
  QServe does (quant/pack.to_qserve_group_params): s2_scales = s2, s2_zeros = -z (int8 [k / 128, n]).
  z = 7.5 s2 (rather than benchmarks/gpu_engine_tok_s.py's 8 s2) centres the weights, so the residual
  stream does not drift over 80 layers.
- W4 per-channel: W = codes * s1 - szeros with szeros = 7.5 s1 (centred codes).
- W8A8: int8 codes in [-127, 127], fp16 per-channel scales. W16A16: fp16 N(0, 1 / k) weights.

Scales: every linear's s1 (or scale) is (a uniform factor in [0.75, 1.25]) / (rms of its integer weights x
sqrt(k)), so a unit-RMS input gives outputs of RMS about 1; embeddings are N(0, 1), lm_head N(0, 1 / hidden),
norms 1, q/k/v biases (Qwen2) N(0, 0.01). Activations stay O(1) and finite in fp16 through every layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from qserve_lite.core.formats import W4Group, W4PerChannel, W8PerChannel
from qserve_lite.core.model_config import ModelConfig
from qserve_lite.core.pack import from_qserve_group_params, unpack_w4
from qserve_lite.core.precision import Precision
from qserve_lite.errors import DeviceError, QServeLiteError
from qserve_lite.model.gpu_model import DeviceLayer, DeviceLinear, DeviceWeights, check_head_dim
from qserve_lite.model.linear import Linear
from qserve_lite.model.quant_linear import W4A8Linear, W8A8Linear
from qserve_lite.model.weights import LayerWeights, LlamaWeights

CHUNK_ELEMENTS = 1 << 26  # random draws per chunk: 256 MiB of float32 temporaries
BUILD_TEMPORARY_BYTES = 3 * 4 * CHUNK_ELEMENTS  # a chunk's float32 draws and their conversions, at most
S2_LOW, S2_HIGH = 8, 15  # g128 integer group scales (inclusive)
CODE_RMS = math.sqrt((16**2 - 1) / 12)  # rms of (code - 7.5), codes uniform in 0..15
G128_RMS = CODE_RMS * math.sqrt(np.mean(np.arange(S2_LOW, S2_HIGH + 1) ** 2))  # rms of codes * s2 - z
W8_RMS = math.sqrt((255**2 - 1) / 12)  # codes uniform in -127..127
MODES = ("w4_g128", "w4_per_channel", "w8", "f16")


CPU_MAX_PARAMETERS = 200_000_000  # random weights on the CPU (the numpy twin) are for tiny configs

class DeviceRandom:
    """Seeded float32 draws made on the array module's device (cupy's cuRAND, or numpy's generator)."""

    def __init__(self, xp, seed: int = 0):
        self.xp = xp
        self.on_host = xp is np
        self._gen = np.random.default_rng(seed) if self.on_host else xp.random.RandomState(seed)

    def uniform(self, shape, low: float = 0.0, high: float = 1.0):
        if self.on_host:
            u = self._gen.random(shape, dtype=np.float32)
        else:
            u = self._gen.random_sample(shape, dtype=self.xp.float32)
        if (low, high) != (0.0, 1.0):
            u *= high - low
            u += low
        return u

    def normal(self, shape, std: float = 1.0):
        x = self._gen.standard_normal(shape, dtype=self.xp.float32)
        if std != 1.0:
            x *= std
        return x

    def integers(self, low: int, high: int, shape, dtype):
        """Uniform integers in [low, high) as dtype (high - low <= 2**16: exact through float32)."""
        u = self.uniform(shape)
        u *= high - low
        self.xp.floor(u, out=u)
        self.xp.minimum(u, high - low - 1, out=u)
        u += low
        return u.astype(dtype)


def fill_rows(out, draw: Callable):
    """out[r0:r1] = draw(shape of the chunk), over row chunks of at most CHUNK_ELEMENTS elements."""
    n = out.shape[0]
    row = max(1, out.size // max(n, 1))
    step = max(1, CHUNK_ELEMENTS // row)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        out[r0:r1] = draw((r1 - r0,) + out.shape[1:])
    return out


def linear_mode(precision: Precision, group_size: int) -> str:
    """The GEMM mode (DeviceLinear.mode) of a precision; W4 needs group size 128 or -1 (per-channel)."""
    if precision.w_bits == 4:
        if group_size not in (128, -1):
            raise QServeLiteError(f"W4A8 runs with group size 128 or -1 (per-channel), got {group_size}")
        return "w4_g128" if group_size == 128 else "w4_per_channel"
    return "w8" if precision.w_bits == 8 else "f16"


def _row_scales(rnd: DeviceRandom, n: int, weight_rms: float, k: int):
    """fp32 [n]: per-output-channel scales giving outputs of RMS ~1 for unit-RMS inputs."""
    return rnd.uniform((n,), 0.75, 1.25) / np.float32(weight_rms * math.sqrt(k))


def random_linear(rnd: DeviceRandom, mode: str, n: int, k: int, bias: bool = False) -> DeviceLinear:
    """One random linear [n out, k in] in `mode`'s device layout (kernels/linear.py)."""
    xp, f16 = rnd.xp, rnd.xp.float16
    b = rnd.normal((n,), 0.1).astype(f16) if bias else None
    if mode in ("w4_g128", "w4_per_channel"):
        if n % 32:
            raise QServeLiteError(f"the W4 GEMM needs output channels in multiples of 32, got {n}")
        k_pad = -(-k // 128) * 128 if mode == "w4_g128" else -(-k // 32) * 32
        qweight = fill_rows(xp.empty((n, k_pad // 2), xp.int8), lambda s: rnd.integers(-128, 128, s, xp.int8))
        if mode == "w4_per_channel":
            s1 = _row_scales(rnd, n, CODE_RMS, k)
            szeros = (s1.astype(f16).astype(xp.float32) * np.float32(7.5)).astype(f16)
            return DeviceLinear(mode, qweight, n, k_pad, scales=s1.astype(f16), szeros=szeros, bias=b)
        s2 = rnd.integers(S2_LOW, S2_HIGH + 1, (k_pad // 128, n), xp.int16)
        s2_zeros = (-((15 * s2) // 2)).astype(xp.int8)  # -z, z = floor(7.5 s2)
        s1 = _row_scales(rnd, n, G128_RMS, k).astype(f16)
        return DeviceLinear(
            mode, qweight, n, k_pad, scales=s1, s2_scales=s2.astype(xp.int8), s2_zeros=s2_zeros, bias=b
        )
    if mode == "w8":
        codes = fill_rows(xp.empty((n, k), xp.int8), lambda s: rnd.integers(-127, 128, s, xp.int8))
        return DeviceLinear(mode, codes, n, k, scales=_row_scales(rnd, n, W8_RMS, k).astype(f16), bias=b)
    if mode == "f16":
        std = 1.0 / math.sqrt(k)
        weight = fill_rows(xp.empty((n, k), f16), lambda s: rnd.normal(s, std).astype(f16))
        return DeviceLinear(mode, weight, n, k, bias=b)
    raise QServeLiteError(f"unknown linear mode {mode!r}; expected one of {MODES}")


def random_layer(rnd: DeviceRandom, cfg: ModelConfig, mode: str) -> DeviceLayer:
    xp, h = rnd.xp, cfg.hidden_size
    return DeviceLayer(
        input_norm=xp.ones(h, xp.float16),
        post_attn_norm=xp.ones(h, xp.float16),
        qkv=random_linear(rnd, mode, cfg.q_size + 2 * cfg.kv_size, h, bias=cfg.qkv_bias),
        o_proj=random_linear(rnd, mode, h, cfg.q_size),
        gate_up=random_linear(rnd, mode, 2 * cfg.intermediate_size, h),
        down=random_linear(rnd, mode, h, cfg.intermediate_size),
    )


def linear_bytes(mode: str, n: int, k: int, bias: bool = False) -> int:
    """Device bytes of random_linear(mode, n, k, bias), without building it."""
    extra = 2 * n if bias else 0
    if mode == "w4_g128":
        k_pad = -(-k // 128) * 128
        return n * k_pad // 2 + 2 * (k_pad // 128) * n + 2 * n + extra  # codes, s2 scales + zeros, s1
    if mode == "w4_per_channel":
        k_pad = -(-k // 32) * 32
        return n * k_pad // 2 + 4 * n + extra  # codes, s1 scales + szeros
    if mode == "w8":
        return n * k + 2 * n + extra
    if mode == "f16":
        return 2 * n * k + extra
    raise QServeLiteError(f"unknown linear mode {mode!r}; expected one of {MODES}")


def weight_bytes(cfg: ModelConfig, precision: Precision | str = "w4a8kv4", group_size: int = 128) -> int:
    """Device bytes build_random_weights(cfg, precision, group_size) holds (DeviceWeights.nbytes()), from
    the config alone: checked against free GPU memory before anything is drawn."""
    if isinstance(precision, str):
        precision = Precision.parse(precision)
    mode = linear_mode(precision, group_size)
    h, inter = cfg.hidden_size, cfg.intermediate_size
    layer = (
        2 * 2 * h  # the two norms
        + linear_bytes(mode, cfg.q_size + 2 * cfg.kv_size, h, cfg.qkv_bias)
        + linear_bytes(mode, h, cfg.q_size)
        + linear_bytes(mode, 2 * inter, h)
        + linear_bytes(mode, h, inter)
    )
    embeddings = 2 * cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    return cfg.num_layers * layer + embeddings + 2 * h


def free_device_memory(xp) -> tuple[int, int] | None:
    """(free, total) bytes of the current CUDA device after cupy's pool gave back its cached blocks, or None
    for numpy (host memory is not checked)."""
    if xp is np:
        return None
    xp.get_default_memory_pool().free_all_blocks()
    free, total = xp.cuda.runtime.memGetInfo()
    return int(free), int(total)


def check_weights_fit(
    cfg: ModelConfig, precision: Precision | str, group_size: int, xp, name: str = "the model"
) -> int:
    """Before anything is drawn: the weights' bytes (weight_bytes), or a DeviceError saying that they alone
    (with the build's temporaries) do not fit in the device's free memory (`name` opens the message)."""
    if isinstance(precision, str):
        precision = Precision.parse(precision)
    need = weight_bytes(cfg, precision, group_size)
    memory = free_device_memory(xp)
    if memory is not None and need + BUILD_TEMPORARY_BYTES > memory[0]:
        free, total = memory
        raise DeviceError(
            f"{name}: the weights alone do not fit: {cfg.num_parameters() / 1e9:.1f}B parameters at "
            f"{precision.name} take {need / 2**30:.2f} GiB (+ {BUILD_TEMPORARY_BYTES / 2**30:.2f} GiB of "
            f"temporaries while they are drawn), but only {free / 2**30:.2f} GiB of the GPU's "
            f"{total / 2**30:.2f} GiB are free. Use fewer weight bits (e.g. --precision w4a8kv4), free the "
            "GPU, or use a larger one"
        )
    return need


def build_random_weights(
    cfg: ModelConfig,
    precision: Precision | str = "w4a8kv4",
    group_size: int = 128,
    *,
    xp=None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> DeviceWeights:
    """Random weights of cfg's shape at `precision` (group_size: W4 only), drawn on xp's device (default
    cupy). progress(layers_done, num_layers) is called after each layer."""
    if xp is None:
        import cupy as xp
    if isinstance(precision, str):
        precision = Precision.parse(precision)
    check_head_dim(cfg)
    mode = linear_mode(precision, group_size)
    rnd = DeviceRandom(xp, seed)
    f16, h, vocab = xp.float16, cfg.hidden_size, cfg.vocab_size
    layers = []
    for i in range(cfg.num_layers):
        layers.append(random_layer(rnd, cfg, mode))
        if progress is not None:
            progress(i + 1, cfg.num_layers)
    embed = fill_rows(xp.empty((vocab, h), f16), lambda s: rnd.normal(s).astype(f16))
    if cfg.tie_word_embeddings:
        lm_head = embed
    else:
        lm_head = fill_rows(xp.empty((vocab, h), f16), lambda s: rnd.normal(s, 1 / math.sqrt(h)).astype(f16))
    return DeviceWeights(
        config=cfg,
        precision=precision,
        layers=layers,
        embed=embed,
        lm_head=lm_head,
        lm_head_bias=None,
        final_norm=xp.ones(h, f16),
    )


# ---- the same random model as host weights (the loader's form), for tensor-parallel checks ----

def _host_linear(dl: DeviceLinear, rows: slice, k: int):
    """Output channels `rows` of a numpy DeviceLinear as a host linear (W4A8Linear, W8A8Linear, Linear)."""
    bias = None if dl.bias is None else np.asarray(dl.bias, np.float32)[rows]
    if dl.mode == "f16":
        return Linear(np.asarray(dl.weight, np.float32)[rows, :k], bias)
    if dl.mode == "w8":
        return W8A8Linear(W8PerChannel(np.asarray(dl.weight)[rows], dl.scales[rows], k), bias)
    codes = unpack_w4(dl.weight)[rows]
    if dl.mode == "w4_per_channel":
        return W4A8Linear(W4PerChannel(codes, dl.scales[rows], dl.szeros[rows], k), bias)
    s2, zeros = from_qserve_group_params(dl.s2_scales, dl.s2_zeros)
    return W4A8Linear(W4Group(codes, dl.scales[rows], s2[rows], zeros[rows], 128, k), bias)


def _unfuse(dl: DeviceLinear, widths: list[int], k: int) -> list:
    starts = np.cumsum([0, *widths])
    return [_host_linear(dl, slice(int(a), int(b)), k) for a, b in zip(starts[:-1], starts[1:], strict=True)]


def random_host_weights(cfg: ModelConfig, precision: Precision | str = "w4a8kv4", group_size: int = 128,
                        seed: int = 0) -> LlamaWeights:
    """build_random_weights(xp=numpy) as host LlamaWeights (q/k/v and gate/up unfused, W4 unpacked): a
    random model in the form io/loader.load_model gives, deterministic in seed. Host memory: the model at
    its precision plus one layer's draws, so for configs of a few billion parameters at most."""
    dw = build_random_weights(cfg, precision, group_size, xp=np, seed=seed)
    h, inter = cfg.hidden_size, cfg.intermediate_size
    layers = []
    for dl in dw.layers:
        q, k, v = _unfuse(dl.qkv, [cfg.q_size, cfg.kv_size, cfg.kv_size], h)
        gate, up = _unfuse(dl.gate_up, [inter, inter], h)
        layers.append(LayerWeights(
            input_norm=np.asarray(dl.input_norm, np.float32), q_proj=q, k_proj=k, v_proj=v,
            o_proj=_unfuse(dl.o_proj, [h], cfg.q_size)[0],
            post_attn_norm=np.asarray(dl.post_attn_norm, np.float32),
            gate_proj=gate, up_proj=up, down_proj=_unfuse(dl.down, [h], inter)[0],
        ))
    embed = np.asarray(dw.embed, np.float32)
    lm_head = embed if dw.lm_head is dw.embed else np.asarray(dw.lm_head, np.float32)
    return LlamaWeights(embed, layers, np.asarray(dw.final_norm, np.float32), Linear(lm_head))
