"""The kernel layer's structure on the CPU: kernels.linear (the one device-linear dispatch) against the numpy
twins of every mode, its CuPy route's arguments, the split-K workspace API for CUDA graphs, and that every
module of qserve_lite/kernels imports without CuPy."""

from __future__ import annotations

import importlib
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from qserve_lite.core.pack import pack_w4, to_qserve_group_params
from qserve_lite.kernels.act_quant import QuantizedActivation, quantize_per_token
from qserve_lite.kernels.cuda import workspace as workspace_module
from qserve_lite.kernels.cuda.jit import CUDA_DIR, source_text
from qserve_lite.kernels.fp16_gemm import fp16_gemm
from qserve_lite.kernels.linear import LINEAR_MODES, linear
from qserve_lite.kernels.w4a8_gemm import (
    group_level1,
    w4a8_group_gemm,
    w4a8_group_gemm_packed,
    w4a8_per_channel_gemm,
    w4a8_per_channel_gemm_packed,
)
from qserve_lite.kernels.w8a8_gemm import w8a8_gemm

# qserve_lite.kernels re-exports the function `linear`, which shadows the submodule's attribute
linear_module = importlib.import_module("qserve_lite.kernels.linear")

M, N, K, K_PAD = 5, 64, 200, 256  # K < K_pad: the activation is zero-padded against the weight


def _case(mode: str, seed: int = 0):
    """(act, weight, k_w, params, reference) of one small random linear in `mode`'s device layout."""
    r = np.random.default_rng(seed)
    x = (r.standard_normal((M, K)) * 2).astype(np.float16)
    bias = r.standard_normal(N).astype(np.float16)
    if mode == "f16":
        w = (r.standard_normal((N, K)) / 16).astype(np.float16)
        return x, w, K, dict(bias=bias), fp16_gemm(x, w, bias)
    act = quantize_per_token(x)
    s1 = r.uniform(1e-3, 1e-2, N).astype(np.float16)
    if mode == "w8":
        w = r.integers(-127, 128, (N, K)).astype(np.int8)
        return act, w, K, dict(scales=s1, bias=bias), w8a8_gemm(act.q, act.scales, w, s1, bias)
    codes = r.integers(0, 16, (N, K_PAD)).astype(np.uint8)
    qw = pack_w4(codes)
    if mode == "w4_per_channel":
        sz = (s1 * r.uniform(0, 15, N)).astype(np.float16)
        ref = w4a8_per_channel_gemm(act.q, act.scales, act.sums, codes, s1, sz, bias)
        packed = w4a8_per_channel_gemm_packed(act.q, act.scales, act.sums, qw, s1, sz, bias)
        assert np.array_equal(ref, packed)
        return act, qw, K_PAD, dict(scales=s1, szeros=sz, bias=bias), ref
    s2 = r.integers(1, 17, (N, K_PAD // 128)).astype(np.uint8)
    zeros = np.clip(15 * s2.astype(np.int16) - 127 + r.integers(0, 50, s2.shape), -128, 127).astype(np.int16)
    s2s, s2z = to_qserve_group_params(s2, zeros)
    ref = w4a8_group_gemm(act.q, act.scales, group_level1(codes, s2, zeros), s1, bias)
    assert np.array_equal(ref, w4a8_group_gemm_packed(act.q, act.scales, qw, s1, s2s, s2z, bias))
    return act, qw, K_PAD, dict(scales=s1, s2_scales=s2s, s2_zeros=s2z, bias=bias), ref


@pytest.mark.parametrize("mode", LINEAR_MODES)
def test_linear_equals_the_twins(mode):
    act, w, k_w, params, ref = _case(mode)
    got = linear(mode, act, w, N, k_w, **params)
    assert got.dtype == np.float16 and got.shape == (M, N)
    assert np.array_equal(got, ref)
    out = np.full((M, N), np.nan, dtype=np.float16)
    assert linear(mode, act, w, N, k_w, out=out, **params) is out
    assert np.array_equal(out, ref)
    if mode != "f16":  # the bias is optional
        no_bias = dict(params, bias=None)
        want = linear(mode, act, w, N, k_w, **no_bias)
        assert want.shape == (M, N) and not np.array_equal(want, ref)


def test_linear_rejects_an_unknown_mode():
    act, w, k_w, params, _ = _case("w8")
    with pytest.raises(ValueError, match="mode"):
        linear("w3", act, w, N, k_w, **params)


class _DeviceWeight:
    """Stands in for a CuPy weight: anything but a numpy array takes the launcher route."""


@pytest.mark.parametrize("mode", LINEAR_MODES)
def test_linear_device_route_arguments(mode, monkeypatch):
    calls = []
    monkeypatch.setattr(linear_module.cuda_gemm, "gemm", lambda *a, **kw: calls.append((a, kw)) or "y")
    w, out = _DeviceWeight(), object()
    p = {name: object() for name in ("scales", "szeros", "s2_scales", "s2_zeros", "bias")}
    if mode == "f16":
        x = object()
        assert linear(mode, x, w, 96, 128, bias=p["bias"], out=out) == "y"
        assert calls == [(("f16", x, w, 96, 128), dict(bias=p["bias"], out=out))]
        return
    act = QuantizedActivation(object(), object(), object())
    assert linear(mode, act, w, 96, 128, out=out, **p) == "y"
    assert calls == [((mode, act.q, w, 96, 128), dict(
        x_scales=act.scales, x_sums=act.sums, w_scales=p["scales"], w_szeros=p["szeros"],
        s2_scales=p["s2_scales"], s2_zeros=p["s2_zeros"], bias=p["bias"], out=out))]


def test_pin_and_release_workspaces(monkeypatch):
    fake = SimpleNamespace(cuda=SimpleNamespace(Device=lambda: SimpleNamespace(id=3)))
    monkeypatch.setattr(workspace_module, "import_cupy", lambda: fake)
    gemm_ws, attn_ws = workspace_module.gemm_workspace, workspace_module.attention_workspace
    assert workspace_module.WORKSPACES == (gemm_ws, attn_ws)
    stream, other = SimpleNamespace(ptr=77), SimpleNamespace(ptr=78)
    bufs_g, bufs_a, bufs_o = ("part", "counters"), ("o_ml", "counters"), ("other", "stream")
    monkeypatch.setattr(gemm_ws, "bufs", {(3, 77): bufs_g, (3, 78): bufs_o})
    monkeypatch.setattr(attn_ws, "bufs", {(3, 77): bufs_a})
    assert workspace_module.pin_workspaces(stream) == [bufs_g, bufs_a]
    assert workspace_module.pin_workspaces(other) == [bufs_o, None]
    workspace_module.release_workspaces(stream)
    assert gemm_ws.bufs == {(3, 78): bufs_o} and attn_ws.bufs == {}
    assert workspace_module.pin_workspaces(stream) == [None, None]
    workspace_module.release_workspaces(stream)  # nothing left: a no-op


def test_cublas_source_is_found():
    text = source_text("cublas.cu")
    assert (CUDA_DIR / "cublas.cu").is_file()
    assert "qs_w4_to_int8" in text and "qs_epilogue_i32" in text and "g128_level1" in text
    assert "qs_w4_to_int8" not in source_text("gemm.cu")


def test_every_kernel_module_imports_without_cupy():
    modules = ["qserve_lite.kernels"] + [
        f"qserve_lite.kernels.cuda.{p.stem}" for p in sorted(CUDA_DIR.glob("*.py")) if p.stem != "__init__"
    ]
    code = (
        "import sys\n"
        "sys.modules['cupy'] = None  # any import of cupy now raises ImportError\n"
        f"import importlib\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
        "import qserve_lite.kernels as k\n"
        "assert all(hasattr(k, name) for name in k.__all__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
