"""Attention in float32 while a CPU trains under bf16 autocast; everything else unchanged.

Why: on CPUs with bf16 matrix units (AMX / AVX-512 BF16), bf16 autocast makes the UNet's
convolutions about 3x faster, but PyTorch's CPU flash-attention *backward* kernel is about 3x
slower in bf16 than in float32 (torch profiler, ``benchmarks/profile_demo.py``): at the demo's
size it was the largest single cost of a bf16 training step, and the step came out no faster than
float32's. Running only the attention blocks in float32 during CPU training made the demo step
1.36x float32's, against 1.03x with bf16 attention (``benchmarks/bench_precision.py``; figures
in ``benchmarks/RESULTS.md``). The forward-only paths (the DDIM loop, validation) keep bf16
attention, whose forward kernel *is* faster, and GPUs keep it everywhere.

MONAI's attention blocks call ``F.scaled_dot_product_attention`` inside their own ``forward`` and
offer no dtype switch that escapes autocast (``upcast_attention`` casts q and k, which autocast
then casts back), so the blocks' classes are swapped for subclasses whose ``forward`` leaves
autocast for the attention alone. A class swap keeps the parameters, their names and the state
dict exactly as MONAI builds them: checkpoints written before or after load unchanged.

Under ``torch.compile`` (``train.compile``, off by default on CPUs) the rule still applies, but
the compiled graph places autocast's casts around the float32 attention differently from eager:
its bf16 gradients differ from eager's by bf16 rounding (~6e-4 on the test model).
"""

from __future__ import annotations

import torch
from monai.networks.blocks.crossattention import CrossAttentionBlock
from monai.networks.blocks.selfattention import SABlock
from torch import nn

__all__ = ["float32_attention_applies", "restore_monai_attention", "use_float32_attention_in_cpu_training"]


def float32_attention_applies(module: nn.Module, x: torch.Tensor) -> bool:
    """True when ``module`` trains on the CPU under autocast: the case the float32 path is for."""
    return module.training and x.device.type == "cpu" and torch.is_autocast_enabled("cpu")


def _forward_float32_when_cpu_training(block: nn.Module, forward, x: torch.Tensor, **tensors):
    """``forward(x, **tensors)`` as MONAI runs it, or with autocast off and every floating-point
    input in float32 when ``block`` trains on the CPU under autocast."""
    if not float32_attention_applies(block, x):
        return forward(x, **tensors)
    with torch.autocast("cpu", enabled=False):
        return forward(x.float(), **{name: value.float() if isinstance(value, torch.Tensor)
                                     and value.is_floating_point() else value
                                     for name, value in tensors.items()})


class Float32TrainingSABlock(SABlock):
    """MONAI's self-attention block; attention in float32 while training on a CPU under autocast."""

    def forward(self, x, attn_mask=None):
        """x: (B, tokens, C) -> (B, tokens, C); float32 in the CPU-training case, else as MONAI."""
        return _forward_float32_when_cpu_training(self, super().forward, x, attn_mask=attn_mask)


class Float32TrainingCrossAttentionBlock(CrossAttentionBlock):
    """MONAI's cross-attention block (self-attention when ``context`` is None), same rule."""

    def forward(self, x, context=None):
        """x: (B, tokens, C), context: (B, tokens', C') or None -> (B, tokens, C)."""
        return _forward_float32_when_cpu_training(self, super().forward, x, context=context)


_SWAPS = {SABlock: Float32TrainingSABlock, CrossAttentionBlock: Float32TrainingCrossAttentionBlock}


def _swap_classes(network: nn.Module, classes: dict[type, type]) -> int:
    """Give every module of ``network`` whose class is a key of ``classes`` its value; how many."""
    swapped = 0
    for module in network.modules():
        replacement = classes.get(type(module))
        if replacement is not None:
            module.__class__ = replacement
            swapped += 1
    return swapped


def use_float32_attention_in_cpu_training(network: nn.Module) -> int:
    """Swap every MONAI attention block in ``network`` for its float32-in-CPU-training subclass.

    Returns:
        How many blocks were swapped (0 for a network without attention).
    """
    return _swap_classes(network, _SWAPS)


def restore_monai_attention(network: nn.Module) -> int:
    """Undo :func:`use_float32_attention_in_cpu_training` (bf16 attention everywhere, as MONAI's).

    For the A/B that measures what the swap buys (``benchmarks/bench_precision.py``).

    Returns:
        How many blocks were restored.
    """
    return _swap_classes(network, {swapped: original for original, swapped in _SWAPS.items()})
