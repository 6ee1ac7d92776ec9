"""Which precision the network runs in: one rule for training and inference, CPU and GPU.

Autocast pays only where the hardware has fast low-precision matrix units:

- CUDA: bf16 where the GPU supports it (Ampere and later; no gradient scaler needed, bf16 has
  float32's range), else fp16 (V100s; training then needs a ``GradScaler``).
- CPU: bf16 only where the processor has native bf16 matrix instructions (Intel AMX or AVX-512
  BF16, seen in ``/proc/cpuinfo``). On such a CPU bf16 autocast ran the demo UNet's forward pass
  about 1.9x faster than fp32; on a CPU without them (e.g. AVX2-only AMD EPYC) oneDNN emulates
  bf16 and it is slower than fp32, so it stays off there.

``IGCONDA_CPU_BF16=1`` (or ``0``) overrides the CPU detection, for tests and benchmarks.

Only the network runs under autocast: the DDIM coefficients, the trajectory and the loss
reduction stay float32 (their callers cast the network's output back with ``.float()``).
"""

from __future__ import annotations

import functools
import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

__all__ = ["cpu_has_bf16_units", "autocast_dtype", "autocast"]

_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def _cpuinfo_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags known, so no CPU bf16 by default
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_bf16_units() -> bool:
    """True when this CPU has native bf16 matrix instructions (or ``IGCONDA_CPU_BF16=1``)."""
    override = os.environ.get("IGCONDA_CPU_BF16", "").strip()
    if override in ("0", "1"):
        return override == "1"
    return any(flag in _cpuinfo_flags() for flag in _CPU_BF16_FLAGS)


def autocast_dtype(device: torch.device | str, enabled: bool = True) -> torch.dtype | None:
    """The autocast dtype for the network on ``device``, or None for plain float32.

    Args:
        device: where the network runs.
        enabled: the config's ``amp`` flag; False always means float32.

    Returns:
        ``torch.bfloat16`` (CUDA with bf16 support, or a CPU with bf16 units), ``torch.float16``
        (older CUDA GPUs), or None.
    """
    device = torch.device(device)
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_bf16_units():
        return torch.bfloat16
    return None


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> AbstractContextManager:
    """``torch.autocast`` on ``device`` in ``dtype``, or a no-op context when ``dtype`` is None."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
