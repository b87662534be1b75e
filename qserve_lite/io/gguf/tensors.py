"""The weights of a GGUF file as Hugging Face tensors: GGUF -> HF tensor names, dequantization (through
``gguf.quants``), undoing llama.cpp's q/k row permutation, casting, and streaming them into
``model.safetensors``.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np

from qserve_lite.errors import GGUFImportError
from qserve_lite.io.gguf.reader import gguf_module, tensor_type_name

# GGML tensor types we can dequantize (through gguf.quants.dequantize).
SUPPORTED_TENSOR_TYPES = (
    "F32", "F16", "BF16",
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)

# Output dtypes: name -> (safetensors dtype tag, bytes per element).
_DTYPES = {
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
}
DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "f32": "float32",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}
SUPPORTED_DTYPES = tuple(_DTYPES)

_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_SKIPPED = ("rope_freqs.weight",)  # folded into config.json's rope_scaling
_SKIPPED_LAYER = ("attn_rot_embd",)  # precomputed rotary tables of very old conversions


def tensor_table(reader, path: Path) -> dict:
    """The file's tensors by name, after checking the names are unique and every type can be dequantized."""
    tensors = {t.name: t for t in reader.tensors}
    if len(tensors) != len(reader.tensors):
        raise GGUFImportError(f"GGUF file {path} has duplicate tensor names; the file is corrupt.")
    for name, t in tensors.items():
        tname = tensor_type_name(t)
        if tname not in SUPPORTED_TENSOR_TYPES:
            raise GGUFImportError(
                f"tensor {name!r} in {path} has GGML type {tname}, which cannot be imported "
                f"(supported: {', '.join(SUPPORTED_TENSOR_TYPES)}). Use a GGUF quantized with one of these."
            )
    return tensors


def hf_name(name: str, n_layers: int, path: Path) -> str | None:
    """HF name for GGUF tensor ``name``; None for tensors that are dropped."""
    if name in _GLOBAL_MAP:
        return _GLOBAL_MAP[name]
    if name in _SKIPPED:
        return None
    if name.startswith("blk."):
        parts = name.split(".", 2)
        if len(parts) == 3 and parts[1].isdigit():
            i, rest = int(parts[1]), parts[2]
            if any(rest.startswith(s) for s in _SKIPPED_LAYER):
                return None
            if rest in _LAYER_MAP and i < n_layers:
                return f"model.layers.{i}.{_LAYER_MAP[rest]}"
            if "exps" in rest or rest.startswith("ffn_gate_inp"):
                raise GGUFImportError(
                    f"GGUF file {path} has mixture-of-experts tensor {name!r}; only dense llama models "
                    "can be imported."
                )
    raise GGUFImportError(
        f"GGUF file {path} has tensor {name!r}, which has no place in a dense llama model "
        "(biases, extra projections and multimodal tensors are not supported)."
    )


def write_plan(tensors: dict, n_layers: int, path: Path) -> list[tuple[str, Any, str]]:
    """[(hf_name, gguf_tensor, gguf_name)] of the tensors to write, in HF order: the embeddings, the layers
    (by index, then HF name), the final norm, lm_head. Dropped tensors (rope_freqs) are left out."""
    order = {"token_embd.weight": (0, 0, ""), "output_norm.weight": (2, 0, ""), "output.weight": (3, 0, "")}
    plan = []
    for name, t in tensors.items():
        hf = hf_name(name, n_layers, path)
        if hf is None:
            continue
        if name in order:
            key = order[name]
        else:
            key = (1, int(name.split(".")[1]), hf)
        plan.append((key, hf, t, name))
    plan.sort(key=lambda p: p[0])
    return [(hf, t, name) for _, hf, t, name in plan]


def dequantize(t, name: str) -> np.ndarray:
    """Dequantize GGUF tensor ``t`` to float32 with numpy (HF) axis order."""
    gguf = gguf_module()
    tname = tensor_type_name(t)
    if tname not in SUPPORTED_TENSOR_TYPES:
        raise GGUFImportError(
            f"tensor {name!r} has GGML type {tname}, which cannot be imported (supported: "
            f"{', '.join(SUPPORTED_TENSOR_TYPES)}). Use a GGUF quantized with one of these types."
        )
    try:
        arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    except Exception as e:
        raise GGUFImportError(
            f"cannot dequantize tensor {name!r} ({tname}): {type(e).__name__}: {e}"
        ) from e
    shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
    arr = np.asarray(arr, dtype=np.float32)
    if arr.size != math.prod(shape):
        raise GGUFImportError(
            f"tensor {name!r} ({tname}) dequantized to {arr.size} values, expected {math.prod(shape)} "
            f"for shape {list(shape)}; the file is corrupt."
        )
    return arr.reshape(shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (rotary halves -> interleaved pairs) on ``w`` [rows, cols]."""
    rows = w.shape[0]
    rest = w.shape[1:]
    if rows % (2 * n_head):
        raise GGUFImportError(
            f"cannot undo the q/k permutation: {rows} rows are not divisible by 2 * {n_head} heads."
        )
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (the inverse of :func:`unpermute_qk`); used by tests."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even, NaN kept as NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16))
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = np.uint16(0x7FC0)
    return out


def _cast(arr: np.ndarray, dtype: str, name: str) -> np.ndarray:
    if dtype == "float32":
        return np.ascontiguousarray(arr, dtype=np.float32)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            out = np.ascontiguousarray(arr, dtype=np.float16)
        if not np.all(np.isfinite(out)) and np.all(np.isfinite(arr)):
            raise GGUFImportError(
                f"tensor {name!r} has values beyond the float16 range (max |x| = "
                f"{float(np.abs(arr).max()):.4g}); import with dtype='float32' or 'bfloat16'."
            )
        return out
    return _to_bf16_bits(arr)


def write_safetensors(dest: Path, plan: list[tuple[str, Any, str]], cfg: dict, dtype: str,
                      progress: bool, path: Path) -> None:
    """Stream the tensors of ``plan`` ([(hf_name, gguf_tensor, gguf_name)]) into ``dest``.

    The header is written first (all shapes are known from the GGUF tensor infos), then one tensor
    at a time, so peak memory is about one dequantized tensor rather than the whole model.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    tag, itemsize = _DTYPES[dtype]
    header: dict[str, Any] = {
        "__metadata__": {"format": "pt", "source": "qserve-lite import-gguf", "gguf_file": path.name},
    }
    offset = 0
    for hf, t, _ in plan:
        shape = [int(d) for d in reversed([int(x) for x in t.shape])]
        nbytes = math.prod(shape) * itemsize
        header[hf] = {"dtype": tag, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * (-len(hjson) % 8)

    heads = cfg["num_attention_heads"]
    kv_heads = cfg["num_key_value_heads"]
    with open(dest, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        bar = tqdm(plan, desc="import-gguf", unit="tensor", disable=not progress, leave=False)
        try:
            for hf, t, gname in bar:
                arr = dequantize(t, gname)
                if hf.endswith("self_attn.q_proj.weight"):
                    arr = unpermute_qk(arr, heads)
                elif hf.endswith("self_attn.k_proj.weight"):
                    arr = unpermute_qk(arr, kv_heads)
                out = _cast(arr, dtype, gname)
                f.write(memoryview(out.reshape(-1)).cast("B"))
        finally:
            bar.close()
        if f.tell() != 8 + len(hjson) + offset:
            raise GGUFImportError(f"internal error: wrote {f.tell()} bytes to {dest}, expected more")


def check_shapes(tensors: dict, cfg: dict, path: Path) -> None:
    """Every tensor a llama model with config ``cfg`` needs is in ``tensors``, with the shape it implies."""
    H, inter, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd, nh, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    V = cfg["vocab_size"]
    want = {
        "token_embd.weight": (V, H),
        "output_norm.weight": (H,),
    }
    if "output.weight" in tensors:
        want["output.weight"] = (V, H)
    for i in range(L):
        want.update({
            f"blk.{i}.attn_norm.weight": (H,),
            f"blk.{i}.attn_q.weight": (nh * hd, H),
            f"blk.{i}.attn_k.weight": (nkv * hd, H),
            f"blk.{i}.attn_v.weight": (nkv * hd, H),
            f"blk.{i}.attn_output.weight": (H, nh * hd),
            f"blk.{i}.ffn_norm.weight": (H,),
            f"blk.{i}.ffn_gate.weight": (inter, H),
            f"blk.{i}.ffn_up.weight": (inter, H),
            f"blk.{i}.ffn_down.weight": (H, inter),
        })
    missing = [n for n in want if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise GGUFImportError(
            f"GGUF file {path} lacks tensor(s) {', '.join(missing[:5])}{more} needed by a "
            f"{L}-layer llama model; the file is incomplete or not a llama model."
        )
    for n, shape in want.items():
        got = tuple(int(d) for d in reversed([int(x) for x in tensors[n].shape]))
        if got != shape:
            raise GGUFImportError(
                f"tensor {n!r} in {path} has shape {list(got)} (HF order), expected {list(shape)} from the "
                "GGUF metadata; the file is inconsistent."
            )
