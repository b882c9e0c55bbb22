"""The frozen base model's memory layout for training: k×k conv weights kept channels-last where that pays.

cuDNN runs bf16/fp16 convolutions in NHWC on current GPUs. Given an NCHW weight it converts the weight to NHWC on
every call: in the forward, and again in the backward's input gradient. At small batches the weight is the larger
operand, so that conversion is the cost. Run 260 (H100, SD1.5 b1 as one CUDA graph) shows the frozen step spending
6.21 of its 19.71 ms busy in ``nchwToNhwcKernel``. Most of it goes to the 16×16 and 8×8 levels' 1280-wide 3×3
weights (14.7 M elements each, against 82 K–330 K in the input).

With a channels-last weight, torch runs the call channels-last (``cudnn_conv_suggest_memory_format``). The input,
the smaller operand there, is converted instead, and the weight never is. Run 267 (H100, SD1.5 b1, CUDA graph;
``benchmarks/results/run267_h100_b1_cl37``) measured the frozen step at 20.39 → **15.49 ms** with this module's
rule. With every k×k weight channels-last it was 16.03 ms. With the whole model channels-last (what diffusers
suggests), 17.04 ms: at 64×64 the activations outsize the weights.

The rule: a frozen k×k ``Conv2d``'s weight becomes channels-last where it has at least as many elements as the
input of the first forward that reaches it. The decision needs the input's size, so it is made by a one-shot
forward pre-hook in that forward: the trainer's first step, which with CUDA graphs is an eager warm-up call before
any capture. A hook that fires during a capture removes itself without converting. Replacing a weight there would
leave the graph reading freed memory.

Only the weight's strides change, never its values. Every lyco algorithm trains and merges the same on such a
weight (``tests/test_channels_last.py``). LoKr's rebuilt op copies it to NCHW for its merge
(:meth:`.algorithms.lokr._KronBuild._as4`).

A frozen weight the rule keeps NCHW is marked (:data:`.algorithms.lowrank.KEPT_NCHW`): the adapter ops then keep
its merged weight NCHW in their input gradient too, where their own shape rule would make it channels-last — its
input outsizes it, so its neighbours run NCHW (``lowrank._dgrad_cl``; runs 276–277: LoCon at SD1.5 b1 0.10–0.12 ms
faster)."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..algorithms.lowrank import KEPT_NCHW

log = logging.getLogger(__name__)

HALF = (torch.bfloat16, torch.float16)


def pays(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether a conv whose input is ``x`` runs faster with ``weight`` channels-last: a 2-D kernel larger than
    1×1, and at least as many elements in the weight as in the input (the operand cuDNN would convert instead).
    A 1×1 weight is channels-last and contiguous at once, so there is nothing to change."""
    return _kxk(weight) and weight.numel() >= x.numel()


def _kxk(weight: torch.Tensor) -> bool:
    """A 2-D conv weight with a kernel larger than 1×1."""
    return weight.dim() == 4 and weight.shape[2] * weight.shape[3] > 1


def _capturing(w: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream of ``w``'s device."""
    return w.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def wanted(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Where ``[train] conv_weights_channels_last = "auto"`` applies the rule: a CUDA device and a half-precision model. Those
    are the convolutions cuDNN runs NHWC; fp32 and CPU convolutions were not measured."""
    return torch.device(device).type == "cuda" and dtype in HALF


class FrozenConvLayout:
    """The one-shot hooks of :func:`frozen_conv_weights_channels_last`. ``converted`` holds the module names whose
    weights became channels-last, ``kept`` those the rule left as they were. ``pending`` counts the convs not
    reached yet. :meth:`remove` drops the hooks left (the converted weights stay converted)."""

    def __init__(self):
        self.converted: list[str] = []
        self.kept: list[str] = []
        self.skipped_in_capture: list[str] = []
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}

    @property
    def pending(self) -> int:
        return len(self._hooks)

    def remove(self) -> None:
        for h in self._hooks.values():
            h.remove()
        self._hooks.clear()

    def _decide(self, name: str, module: nn.Conv2d, x: torch.Tensor) -> None:
        self._hooks.pop(name).remove()
        w = module.weight
        if _capturing(w):
            self.skipped_in_capture.append(name)  # a captured graph would read the old weight after it is freed
            return
        if w.requires_grad or not pays(w, x):
            self.kept.append(name)
            if not w.requires_grad:  # the adapter ops leave its merged weight NCHW too (lowrank._dgrad_cl)
                setattr(w, KEPT_NCHW, True)
            return
        with torch.no_grad():
            old = w.data
            w.data = old.contiguous(memory_format=torch.channels_last)
            if old.is_cuda:  # the copy may run on a stream other than the one the old weight's memory returns to
                # (the trainer's graph warm-up runs on its capture stream): no reuse before the copy has read it
                old.record_stream(torch.cuda.current_stream(old.device))
        self.converted.append(name)
        if not self._hooks:
            log.info("frozen conv weights channels-last: %d of %d k×k convs (weight ≥ input at the first step)",
                     len(self.converted), len(self.converted) + len(self.kept) + len(self.skipped_in_capture))

    def summary(self) -> str:
        return (f"{len(self.converted)} converted, {len(self.kept)} kept, {self.pending} not reached"
                + (f", {len(self.skipped_in_capture)} reached during a capture" if self.skipped_in_capture else ""))


def frozen_conv_weights_channels_last(model: nn.Module) -> FrozenConvLayout:
    """Hook every frozen k×k ``Conv2d`` of ``model``. On its first forward, each makes its weight channels-last
    where :func:`pays` holds, then removes itself (module doc). A weight that takes a gradient is left alone:
    its optimizer state and any fused buffers were made in its layout. Returns the handle; the decisions fill
    it as the first forward runs."""
    layout = FrozenConvLayout()
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.weight is not None and not m.weight.requires_grad and _kxk(m.weight):
            def hook(module, args, _name=name):
                if args and torch.is_tensor(args[0]):
                    layout._decide(_name, module, args[0])
            layout._hooks[name] = m.register_forward_pre_hook(hook)
    return layout
