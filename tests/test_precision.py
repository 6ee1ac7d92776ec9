"""The one precision rule (igconda.precision): autocast only where the hardware pays for it."""

import pytest
import torch

from igconda import precision


@pytest.mark.parametrize("override, expected", [("1", torch.bfloat16), ("0", None)])
def test_cpu_override(monkeypatch, override, expected):
    monkeypatch.setenv("IGCONDA_CPU_BF16", override)
    assert precision.autocast_dtype("cpu") == expected
    assert precision.autocast_dtype("cpu", enabled=False) is None


def test_cpu_detection_reads_the_flags(monkeypatch):
    monkeypatch.delenv("IGCONDA_CPU_BF16", raising=False)
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert precision.cpu_has_bf16_units()
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: frozenset({"avx2", "fma"}))
    assert not precision.cpu_has_bf16_units()


def test_autocast_context_runs_matmul_in_bf16():
    a = torch.randn(8, 8)
    with precision.autocast("cpu", torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
    with precision.autocast("cpu", None):
        assert (a @ a).dtype == torch.float32
