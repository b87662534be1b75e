"""CPU checks of the Hopper prefill attention's launcher (cuda/attention_sm90.py): the routing switch and the
module configurations. The kernel itself: tests/kernels/test_attention_sm90_gpu.py (pytest -m gpu)."""

from __future__ import annotations

import pytest

from qserve_lite.kernels.cuda import attention_sm90


def test_switch_off_routes_to_mma_sync(monkeypatch):
    """QSERVE_LITE_SM90_ATTN=0 (USE_SM90_ATTN False) and unsupported head sizes never query the device."""
    monkeypatch.setattr(attention_sm90, "wgmma_available", lambda: pytest.fail("device queried"))
    monkeypatch.setattr(attention_sm90, "USE_SM90_ATTN", False)
    assert not attention_sm90.sm90_prefill_enabled(128)
    monkeypatch.setattr(attention_sm90, "USE_SM90_ATTN", True)
    assert not attention_sm90.sm90_prefill_enabled(96)
    monkeypatch.setattr(attention_sm90, "wgmma_available", lambda: True)
    assert attention_sm90.sm90_prefill_enabled(64) and attention_sm90.sm90_prefill_enabled(128)
    monkeypatch.setattr(attention_sm90, "wgmma_available", lambda: False)
    assert not attention_sm90.sm90_prefill_enabled(128)


def test_defines():
    """Default ring depths 3 (head_dim 128) and 4 (64) (the .cu asserts they fit in shared memory, compiled in
    test_cuda_compile); alternatives and debug entries only add macros."""
    for d, stages in ((128, 3), (64, 4)):
        assert attention_sm90.sm90_defines(d, 4) == {"QS_D": d, "QS_BITS": 4, "QS_STAGES": stages}
    defs = attention_sm90.sm90_defines(128, 16, 3, pv_split=True, debug=attention_sm90.DEBUG_PV)
    assert defs == {"QS_D": 128, "QS_BITS": 16, "QS_STAGES": 3, "QS_PV_SPLIT": 1, "QS_DEBUG": 2}
