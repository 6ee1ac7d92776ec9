"""The network's GPU path behind config flags: torch.compile, CUDA graphs, batch by memory, FLOPs.

Each piece is off unless its flag asks for it, and each falls back to the eager network where it
does not apply, so one config runs on a laptop and on a GPU node:

- ``train.compile`` / ``infer.compile``: :func:`compile_in_place` (``nn.Module.compile``). It
  compiles the module's call in place instead of wrapping it in an ``OptimizedModule``, so the
  state-dict keys (no ``_orig_mod.`` prefix), checkpoints, DDP wrapping and ``.module`` stay as
  they are.
- ``infer.cuda_graphs`` (CUDA only): the DDIM loop calls the network with two fixed shapes (B to
  encode, 3B for the guided/unguided decode pair), hundreds of times, which is what CUDA graphs
  are for: one launch per evaluation instead of one per kernel. Without ``infer.compile`` it is
  :class:`CUDAGraphNetwork`, a capture of the eager network with ``torch.cuda.CUDAGraph``; with
  it, ``torch.compile(mode="reduce-overhead")``, whose inductor graphs are captured by torch's
  own CUDA-graph trees (capturing compiled code a second time by hand would fight them). The
  hand capture is the default because it needs no inductor compile (minutes per shape for a UNet
  on a cold actor) and works in eager mode with autocast.
- ``infer.memory_fraction``: :func:`batch_size_for_memory` picks an actor's batch from the free
  GPU memory and the per-slice activation memory measured by :func:`measure_slice_bytes`; on CPU
  (or at 0) it returns the configured batch.
- :func:`flops_per_evaluation`: FLOPs of one network evaluation from
  ``torch.utils.flop_counter.FlopCounterMode`` (benchmarks and ``docs/scaling.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["CUDAGraphNetwork", "accelerate_for_inference", "batch_for_memory", "batch_size_for_memory",
           "compile_in_place", "flops_per_evaluation", "measure_slice_bytes"]

Network = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: capture(fn, static_inputs) -> (replay, static_output): records ``fn(*static_inputs)`` once;
#: ``replay()`` recomputes it from the current contents of the static inputs into static_output.
Capture = Callable[[Network, tuple[torch.Tensor, ...]], tuple[Callable[[], None], torch.Tensor]]


def compile_in_place(model: nn.Module, *, mode: str | None = None, backend: str = "inductor") -> nn.Module:
    """``model.compile(...)``: compiled forward, same module object, same state-dict keys.

    Static shapes (``dynamic=False``): the loops see few batch shapes (B and 3B in the DDIM loop,
    plus a short last batch; one batch size and the epoch's last in training), each compiled once
    with kernels for that size, and static shapes are what CUDA graphs need. Dynamo's default
    would re-trace symbolically at the second shape, which is slower to compile and to run.
    """
    model.compile(mode=mode, backend=backend, dynamic=False)
    return model


def _cuda_capture(fn: Network, inputs: tuple[torch.Tensor, ...]) -> tuple[Callable[[], None], torch.Tensor]:
    """Record ``fn(*inputs)`` in a ``torch.cuda.CUDAGraph`` (torch's recipe: warm up on a side
    stream first, so that cuDNN/cuBLAS autotuning and lazy allocations happen outside capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn(*inputs)
    return graph.replay, output


@dataclass
class _Recorded:
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # static x (B,1,H,W), t (B,), labels (B,)
    replay: Callable[[], None]
    output: torch.Tensor  # static ε (B,1,H,W), overwritten by every replay


class CUDAGraphNetwork:
    """``model(x, t, labels)`` replayed from one recorded graph per input shape and precision.

    The DDIM loop has two shapes (B and 3B) plus, for a short last batch, two more; each is
    recorded on first use. A call copies its inputs into the graph's static buffers, replays,
    and returns a copy of the static output (the next replay overwrites it; the copy is one
    B × H × W tensor, nothing beside the network's cost).

    Autocast: the caller's autocast state (``igconda.precision`` in ``ddim._predict``) is part of
    the key and is re-entered inside the capture with its weight cache off, as CUDA graphs
    require (a cached cast made during capture would be freed on exit and read after).

    Args:
        model: the network in eval mode, on the CUDA device.
        capture: how a call is recorded; :func:`_cuda_capture` by default (tests pass one that
            runs on CPU, so the buffer and key logic is tested without a GPU).
    """

    def __init__(self, model: Network, capture: Capture | None = None) -> None:
        self.model = model
        self._capture = capture or _cuda_capture
        self._graphs: dict[tuple, _Recorded] = {}

    @property
    def recorded_shapes(self) -> list[tuple[int, ...]]:
        return [key[0] for key in self._graphs]

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        amp = torch.is_autocast_enabled(device_type)
        amp_dtype = torch.get_autocast_dtype(device_type) if amp else None
        key = (tuple(x.shape), x.dtype, str(x.device), amp_dtype)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._record(x, timesteps, labels, amp_dtype)
        entry.inputs[0].copy_(x)
        entry.inputs[1].copy_(timesteps)
        entry.inputs[2].copy_(labels)
        entry.replay()
        return entry.output.clone()

    def _record(self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor,
                amp_dtype: torch.dtype | None) -> _Recorded:
        inputs = (x.clone(), timesteps.clone(), labels.clone())
        device_type = x.device.type

        def forward(x_s: torch.Tensor, t_s: torch.Tensor, l_s: torch.Tensor) -> torch.Tensor:
            if amp_dtype is None:
                return self.model(x_s, t_s, l_s)
            with torch.autocast(device_type, dtype=amp_dtype, cache_enabled=False):
                return self.model(x_s, t_s, l_s)

        replay, output = self._capture(forward, inputs)
        return _Recorded(inputs, replay, output)


class _CompiledGraphs:
    """A ``mode="reduce-overhead"`` compiled network called step by step: each call starts a new
    CUDA-graph-tree step (the previous output was consumed by the DDIM update) and returns a copy,
    since the next replay reuses the output's memory."""

    def __init__(self, compiled: Network) -> None:
        self.compiled = compiled

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(x, timesteps, labels).clone()


def accelerate_for_inference(model: nn.Module, device: torch.device | str, *, compile: bool = False,
                             cuda_graphs: bool = False, backend: str = "inductor") -> Network:
    """The callable the DDIM loop should use for ``model`` under the ``infer`` flags.

    Args:
        model: the network in eval mode, on ``device``.
        device: where it runs; ``cuda_graphs`` applies only on CUDA and is ignored elsewhere.
        compile: ``infer.compile``.
        cuda_graphs: ``infer.cuda_graphs``.
        backend: the ``torch.compile`` backend (benchmarks' CPU dry runs use ``aot_eager``).

    Returns:
        ``model`` itself (nothing asked, or CPU without compile), ``model`` compiled in place,
        a :class:`CUDAGraphNetwork`, or a reduce-overhead compiled network.
    """
    on_cuda = torch.device(device).type == "cuda"
    if cuda_graphs and on_cuda:
        if compile:
            return _CompiledGraphs(torch.compile(model, mode="reduce-overhead", backend=backend,
                                                  dynamic=False))
        return CUDAGraphNetwork(model)
    if compile:
        return compile_in_place(model, backend=backend)
    return model


def batch_for_memory(free_bytes: float, per_slice_bytes: float, *, fraction: float,
                     multiple: int = 8, max_batch: int = 4096) -> int:
    """The largest batch whose activations fit in ``fraction`` of ``free_bytes``.

    Rounded down to a multiple of ``multiple`` (tensor cores and cuDNN pick faster kernels for
    such sizes) when at least that large; never below 1 nor above ``max_batch``.
    """
    if per_slice_bytes <= 0 or free_bytes < 0 or not 0 < fraction <= 1:
        raise ValueError(f"need per_slice_bytes > 0, free_bytes >= 0 and fraction in (0, 1], got "
                         f"{per_slice_bytes}, {free_bytes}, {fraction}")
    batch = int(free_bytes * fraction // per_slice_bytes)
    if batch >= multiple:
        batch -= batch % multiple
    return max(1, min(batch, max_batch))


def batch_size_for_memory(configured: int, device: torch.device | str, *, fraction: float,
                          per_slice_bytes: float | None = None, free_bytes: float | None = None,
                          max_batch: int = 4096) -> int:
    """An actor's batch: chosen by GPU memory when ``fraction`` > 0 on CUDA, else ``configured``.

    Args:
        configured: ``infer.batch_size``.
        device: the actor's device.
        fraction: ``infer.memory_fraction`` (0 = off); the rest of the free memory stays for the
            allocator's fragmentation, cuDNN workspaces and the CUDA-graph pools.
        per_slice_bytes: activation bytes per slice of the costliest pass (from
            :func:`measure_slice_bytes`); required on CUDA.
        free_bytes: free device memory; default ``torch.cuda.mem_get_info``.
    """
    device = torch.device(device)
    if fraction <= 0 or device.type != "cuda":
        return configured
    if per_slice_bytes is None:
        raise ValueError("batch_size_for_memory on CUDA needs the measured per_slice_bytes")
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    return batch_for_memory(free_bytes, per_slice_bytes, fraction=fraction, max_batch=max_batch)


@torch.inference_mode()
def measure_slice_bytes(model: Network, size: int, device: torch.device | str, *,
                        evaluations: int = 3, amp_dtype: torch.dtype | None = None,
                        batches: tuple[int, int] = (8, 24)) -> float:
    """Peak CUDA memory per slice of one DDIM step, from two batch sizes (the slope, so the
    weights and the allocator's fixed costs cancel).

    Args:
        model: the network on a CUDA ``device``, in eval mode.
        size: H = W of a slice.
        evaluations: network evaluations per slice in one pass (3: the decode pair's 3B batch).
        amp_dtype: the autocast dtype the loop runs in (None = fp32).
        batches: the two slice counts measured.

    Returns:
        bytes per slice.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError("measure_slice_bytes reads CUDA memory statistics; it needs a CUDA device")
    peaks = []
    for batch in batches:
        n = batch * evaluations
        x = torch.randn(n, 1, size, size, device=device)
        t = torch.zeros(n, dtype=torch.long, device=device)
        labels = torch.zeros(n, dtype=torch.long, device=device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.autocast("cuda", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            model(x, t, labels)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    return max(1.0, (peaks[1] - peaks[0]) / (batches[1] - batches[0]))


def _cpu_attention_formulas() -> dict:
    """FLOP formulas for the CPU kernels of fused attention, which ``FlopCounterMode`` does not
    register (it knows the CUDA flash / efficient / cuDNN ones): without them a model with
    ``use_flash_attention`` counted on the CPU misses its attention (0.87 of 5.45 GFLOP for the
    paper's UNet). The same formulas torch uses for the CUDA kernels."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    formulas = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu] = (
            lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v))
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v))
    return formulas


def flops_per_evaluation(model: Network, size: int, *, batch: int = 4, device: torch.device | str = "cpu",
                         backward: bool = False) -> float:
    """FLOPs of one network evaluation (one slice, one timestep), by ``FlopCounterMode``.

    Counted on a batch and divided by it (the count is exactly linear in the batch). Matmuls,
    convolutions and attention are counted (2 FLOPs per multiply-add; fused attention on the CPU
    too, see :func:`_cpu_attention_formulas`); element-wise ops and norms are not, which is what
    the matrix units' peak rate compares against.

    Args:
        model: ``model(x, t, labels)``.
        size: H = W.
        batch: slices in the counted pass.
        device: where to run it.
        backward: count forward + backward of a training step instead (about 3x the forward).
    """
    from torch.utils.flop_counter import FlopCounterMode

    device = torch.device(device)
    x = torch.randn(batch, 1, size, size, device=device)
    t = torch.full((batch,), 10, dtype=torch.long, device=device)
    labels = torch.ones(batch, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas())
    if backward:
        with counter:
            model(x, t, labels).float().pow(2).mean().backward()
    else:
        with counter, torch.no_grad():
            model(x, t, labels)
    return counter.get_total_flops() / batch
