"""One wrapper for every algorithm: :class:`AdapterLayer`, hooked onto a torch layer by a
:class:`LayerHost`.

* The base model's module tree and state-dict names never change: the host patches the layer
  instance's ``forward`` (and restores it exactly when the last adapter leaves).
* Several adapters may sit on the same layer, each with its own multiplier; each adapter's
  delta is computed against the base weight (never against another adapter's result).
* Bypass: ``y = f(x) + Σ m_i·Δy_i`` using each algorithm's structured forward.
  Rebuild: ``y = op(x, W + Σ m_i·ΔW_i)``; one adapter on a linear/conv layer goes through
  ``algorithms/rebuild.py`` (x kept for backward, W′ rebuilt there). ``mode = "auto"`` (default) takes
  the rebuild where the algorithm prefers it (DoRA, (IA)³, GLoRA, BOFT, Full, LoKr). Both are tested equal.
  In steps captured as CUDA graphs (``algorithms/graph_policy.py``) one low-rank adapter (LoRA/LoCon, LoHa;
  LoKr with a low-rank W2 on linear layers) on a plain ``nn.Linear``/``nn.Conv2d`` runs the bypass through
  ``algorithms/lowrank.py``'s bypass op where the shapes say it pays (same forward, ∂x through the merged
  weight).
* Merge/unmerge are exact: the first merge takes a snapshot of the original weight (its own
  dtype); the merged weight is always recomputed as ``cast(snapshot + Σ m_i ΔW_i)`` in fp32 (fp64
  for fp64 weights), and unmerging the last adapter copies the snapshot back bit for bit —
  no drift however many cycles run.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .algorithms.base import Algorithm, LayerSpec, channel_view, layer_op
from .algorithms import lowrank as _lowrank
from .errors import ConfigError, ShapeMismatch

_HOST_ATTR = "_lyco_host"


def _attr(name: str) -> str:
    return name.replace(".", "__")


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class AdapterLayer(nn.Module):
    """One algorithm on one layer: its tensors (parameters), multiplier and dropout family."""

    def __init__(self, name: str, algorithm: Algorithm, spec: LayerSpec, tensors: Mapping[str, torch.Tensor],
                 opts: Mapping[str, Any] | None = None, multiplier: float = 1.0, trainable: bool = True,
                 mode: str = "auto"):
        super().__init__()
        self.host: LayerHost | None = None
        self._hot: tuple | None = None  # forward-path tensor view, see _hot_tensors
        self.name = name
        self.algorithm = algorithm
        self.spec = spec
        self.opts = dict(opts or {})
        self.multiplier = float(multiplier)
        self.enabled = True
        self.mode = mode  # "auto" (bypass, or rebuild where the algorithm prefers it), "bypass", "rebuild"
        self._names: list[str] = []
        self.params = nn.ParameterDict()
        for k, v in tensors.items():
            self._names.append(k)
            if k in algorithm.frozen_keys or not v.is_floating_point():
                self.register_buffer(_attr(k), v.detach().clone())
            else:
                self.params[_attr(k)] = nn.Parameter(v.detach().clone(), requires_grad=trainable)
        self.merged_multiplier: float | None = None
        self.register_load_state_dict_post_hook(lambda module, incompatible: module._invalidate())

    # -- state the host's cached active list depends on ----------------------------------
    def _state_changed(self) -> None:
        host = self.__dict__.get("host")
        if host is not None:
            host._active = None

    @property
    def multiplier(self) -> float:
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value) -> None:
        self._multiplier = value
        self._state_changed()

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value) -> None:
        self._enabled = value
        self._state_changed()

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value) -> None:
        self._mode = value
        self._state_changed()

    @property
    def merged_multiplier(self) -> float | None:
        return self._merged_multiplier

    @merged_multiplier.setter
    def merged_multiplier(self, value) -> None:
        self._merged_multiplier = value
        self._state_changed()

    # -- tensors ----------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        params, buffers = self.params._parameters, self._buffers
        for k in self._names:
            a = _attr(k)
            v = params.get(a)
            out[k] = v if v is not None else buffers[a]
        return out

    def _invalidate(self) -> None:
        self._hot = None

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda()/.half() replace buffers (and may replace parameters): drop the cached view
        self._hot = None
        return super()._apply(fn, *args, **kwargs)

    def _hot_tensors(self) -> dict:
        """The tensors for the forward path: the same objects as :meth:`tensors`, except 0-d frozen
        scalars (``alpha``, ``on_input``), given as Python floats read once. Reading a device scalar
        (``float(alpha)``) on every call would synchronise the device once per layer per forward.
        Cached; rebuilt after ``.to()``/``load_state_dict`` and when a scalar buffer is written in
        place (its version counter moves)."""
        hot = self._hot
        if hot is not None:
            if torch.compiler.is_compiling():
                return hot[0]
            for buf, version in hot[1]:
                if buf._version != version:
                    hot = None
                    break
            else:
                return hot[0]
        t = self.tensors()
        scalars = []
        for k, v in t.items():
            if v.dim() == 0 and _attr(k) in self._buffers and v.device.type != "meta":
                scalars.append((v, v._version))
                t[k] = float(v)
        self._hot = (t, tuple(scalars))
        return t

    def exported(self) -> dict[str, torch.Tensor]:
        """Tensors as they go to a file (scalar folded, OFT constraint baked…), detached fp32 CPU."""
        with torch.no_grad():
            t = {k: v.detach() for k, v in self.tensors().items()}
            t = self.algorithm.export(t)
            return {k: v.detach().to("cpu").clone() for k, v in t.items()}

    @property
    def is_merged(self) -> bool:
        return self.merged_multiplier is not None

    def extra_repr(self) -> str:
        return f"{self.name}: {self.algorithm!r} on {self.spec.kind}{tuple(self.spec.weight_shape)}, m={self.multiplier}"

    # -- math at this layer -----------------------------------------------------------
    def _training_tensors(self, t: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        t = self.tensors() if t is None else t
        if self.training and getattr(self.algorithm, "name", "") == "dylora":
            from .algorithms.lora import DyLoRA
            block = int(self.opts.get("block_size", 1) or 1)
            r = t["lora_down.weight"].shape[0]
            b = DyLoRA.sample_rank(r, block)
            t = DyLoRA.prefix(t, b, block)
        return t

    def delta_output(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     base_out: torch.Tensor) -> torch.Tensor | None:
        """m·Δy for this input, the dropout family applied in training."""
        o = self.opts
        if self.training and o.get("module_dropout", 0.0) > 0 and float(torch.rand(())) < o["module_dropout"]:
            return None
        t = self._training_tensors(self._hot_tensors())
        kw = {}
        out_mask = None
        p = o.get("rank_dropout", 0.0) if self.training else 0.0
        if p > 0:
            if getattr(self.algorithm, "rank_dropout_on", "output") == "rank":
                r = self.algorithm.rank(t)
                mask = (torch.rand(r, device=x.device) > p).to(x.dtype)
                if o.get("rank_dropout_scale"):
                    mask = mask / mask.mean().clamp_min(1e-6)
                kw["rank_mask"] = mask
            else:
                out_mask = (torch.rand(self.spec.out_dim, device=x.device) > p).to(x.dtype)
                if o.get("rank_dropout_scale"):
                    out_mask = out_mask / out_mask.mean().clamp_min(1e-6)
        linear = getattr(self.algorithm, "linear_in_multiplier", True)
        if not linear:  # BOFT interpolates each stage: the multiplier goes inside
            kw["multiplier"] = self.multiplier
        d = self.algorithm.forward_delta(x, t, self.spec, weight, bias, base_out, **kw)
        if out_mask is not None:
            d = d * channel_view(out_mask, self.spec, d)
        if self.training and o.get("dropout", 0.0) > 0:
            d = F.dropout(d, o["dropout"], training=True)
        return d * self.multiplier if linear else d

    def accumulate(self, acc: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   base_out: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``acc + m·Δy`` for this input: the fused fast path unless a dropout-family option (or
        DyLoRA's rank sampling) is active in training."""
        if self._delta_only():
            d = self.delta_output(x, weight, bias, base_out)
            return acc if d is None else acc + d.to(acc.dtype)
        if self.opts.get("dora_detach_norm") and getattr(self.algorithm, "is_dora", False):
            # DoRA paper §4.3 / PEFT: ‖W′‖ constant in backward (see algorithms/dora.py)
            return self.algorithm.forward_accumulate(acc, x, self._hot_tensors(), self.spec, weight, bias, base_out,
                                                     self._multiplier, inplace, detach_norm=True)
        return self.algorithm.forward_accumulate(acc, x, self._hot_tensors(), self.spec, weight, bias, base_out,
                                                 self._multiplier, inplace)

    @property
    def prefers_rebuild(self) -> bool:
        """``mode = "auto"``: whether this layer takes the rebuild path (the algorithm decides from its
        tensors). Never with a dropout-family option: those act on the delta path."""
        o = self.opts
        if o.get("dropout") or o.get("rank_dropout") or o.get("module_dropout"):
            return False
        return self.algorithm.prefers_rebuild_for(self._hot_tensors(), self.spec)

    def rebuild_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The algorithm's own ``op(x, W′, b′)`` for the rebuild path (a leaner backward), or None."""
        if self.training and self.algorithm.name == "dylora":
            return None
        if self.opts.get("dora_detach_norm") and getattr(self.algorithm, "is_dora", False):
            return self.algorithm.rebuild_op(x, self._hot_tensors(), self.spec, weight, bias, self._multiplier,
                                             detach_norm=True)
        return self.algorithm.rebuild_op(x, self._hot_tensors(), self.spec, weight, bias, self._multiplier)

    def bypass_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """``f(x) + m·Δy`` by the algorithm's bypass op (exact forward, a leaner backward; the host calls it under
        the captured-steps policy, :mod:`.algorithms.lowrank`) — or, under ``mode = "auto"`` where the algorithm
        prefers it there (``prefers_rebuild_in_op``), the rebuild path — or None. Never with a dropout-family
        option or DyLoRA's rank sampling in training: those act on the delta path."""
        if self._delta_only():
            return None
        t = self._hot_tensors()
        if self.mode == "auto" and self.algorithm.prefers_rebuild_in_op(t, self.spec, x):
            y = self.rebuild_op(x, weight, bias)
            if y is not None:
                return y
        return self.algorithm.bypass_op(x, t, self.spec, weight, bias, self._multiplier)

    def bypass_op_over_rebuild(self, x: torch.Tensor, weight: torch.Tensor,
                               bias: torch.Tensor | None) -> torch.Tensor | None:
        """On the rebuild path (``mode = "auto"``), in a step that takes the bypass op: the op instead where the
        algorithm prefers it on this layer and input (``prefers_op_over_rebuild``: LoKr's full W2 on k×k convs with
        few positions per weight, GLoRA on linear layers and 1×1 convs), else None (the host rebuilds)."""
        if self._delta_only():
            return None
        t = self._hot_tensors()
        if not self.algorithm.prefers_op_over_rebuild(t, self.spec, x):
            return None
        return self.algorithm.bypass_op(x, t, self.spec, weight, bias, self._multiplier)

    def shared_rebuild_part(self, x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        """On the rebuild path (``mode = "auto"``/``"rebuild"``): this adapter's part of its group's one op
        (``algorithm.shared_part``, :mod:`.siblings`) for the 2-D rows ``x2``, or None."""
        if self._delta_only() or (self.training and self.algorithm.name == "dylora"):
            return None
        return self.algorithm.shared_part(x2, self._hot_tensors(), self.spec, weight, bias, self._multiplier)

    def bypass_parts(self, dtype: torch.dtype, x: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(D, U, s)`` with this adapter's delta ``s·U·D`` where :meth:`bypass_op` would take the bypass op with one
        group on the input ``x`` — what a group of layers sharing an input runs as one op (:mod:`.siblings`) — else
        None."""
        if self._delta_only():
            return None
        t = self._hot_tensors()
        if self.mode == "auto" and self.algorithm.prefers_rebuild_in_op(t, self.spec, x):
            return None
        f = self.algorithm.bypass_factors(t, self.spec, dtype)
        if f is None or f[3] != 1:
            return None
        return f[0], f[1], f[2] * self._multiplier

    def _delta_only(self) -> bool:
        """In training, a dropout-family option or DyLoRA's rank sampling: only ``delta_output`` applies them."""
        if not self.training:
            return False
        o = self.opts
        return bool(o.get("dropout") or o.get("rank_dropout") or o.get("module_dropout")
                    or self.algorithm.name == "dylora")

    def merged_weight(self, weight: torch.Tensor, bias: torch.Tensor | None, multiplier: float):
        """(W', b') = this adapter applied to (W, b) at ``multiplier`` (differentiable)."""
        t = self._hot_tensors()
        if self.training:
            t = self._training_tensors(t)
        dt = weight.dtype
        t = {k: (v.to(dt) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in t.items()}
        return self.algorithm.merged(t, self.spec, weight, bias, multiplier)


class LayerHost:
    """Lives on a base layer (``layer._lyco_host``); owns the patched forward and the snapshot."""

    def __init__(self, module: nn.Module, spec: LayerSpec):
        self.module = module
        self.spec = spec
        self.adapters: list[AdapterLayer] = []
        self.merged: list[AdapterLayer] = []
        self.snapshot_w: torch.Tensor | None = None
        self.snapshot_b: torch.Tensor | None = None
        self._active: tuple[AdapterLayer, ...] | None = None  # cache, reset on any state change
        self._rebuild = False
        self._prev_forward = module.__dict__.get("forward")
        # a plain nn.Linear (class forward): run the layer on 2-D rows so that adapters can add into
        # its output with in-place 2-D GEMMs (addmm_) rather than batched ones
        self._flat_linear = (spec.kind == "linear" and self._prev_forward is None
                             and type(module).forward is nn.Linear.forward)
        # a plain nn.Linear / nn.Conv2d: the host may run the whole layer itself (the bypass op)
        self._plain = self._flat_linear or (spec.kind == "conv2d" and self._prev_forward is None
                                            and type(module).forward is nn.Conv2d.forward)
        self._orig = self._prev_forward if self._prev_forward is not None else type(module).forward.__get__(module)
        #: the layers reading this one's input, run as one op (:mod:`.siblings`; set by ``Network.attach``)
        self.group = None
        self._forward = self._make_forward()
        object.__setattr__(module, "forward", self._forward)
        object.__setattr__(module, _HOST_ATTR, self)

    @classmethod
    def of(cls, module: nn.Module, create: bool = True) -> "LayerHost | None":
        h = module.__dict__.get(_HOST_ATTR)
        if h is None and create:
            h = cls(module, LayerSpec.from_module(module))
        return h

    def _make_forward(self):
        host = self

        def forward(x, *args, **kwargs):
            return host.run(x, *args, **kwargs)

        return forward

    def _refresh(self) -> tuple:
        active = tuple(a for a in self.adapters if a.enabled and not a.is_merged and a.multiplier != 0.0)
        self._rebuild = any(a.mode == "rebuild" or (a.mode == "auto" and a.prefers_rebuild) for a in active)
        # one adapter on the rebuild path whose algorithm may take the bypass op there instead (op steps only)
        self._op_first = (self._rebuild and len(active) == 1 and active[0].mode == "auto"
                          and active[0].algorithm.op_over_rebuild)
        self._active = active
        return active

    def run(self, x, *args, **kwargs):
        active = self._active
        if active is None:
            active = self._refresh()
        if not active:
            return self._orig(x, *args, **kwargs)
        mod = self.module
        if self._rebuild:
            if len(active) == 1:
                if (self.group is not None and self._flat_linear and not args and not kwargs
                        and active[0].algorithm.shared_rebuild is not None):
                    # the layers reading this input as one op on the rebuild path ((IA)³'s, .siblings)
                    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
                    y = self._grouped(x, x2)
                    if y is not None:
                        return y
                if self._op_first and self._plain and not args and not kwargs and _lowrank.bypass_ready(self.spec):
                    x2 = x.reshape(-1, x.shape[-1]) if self._flat_linear and x.dim() != 2 else x
                    if _lowrank.bypass_supports(self.spec, x2):
                        y = active[0].bypass_op_over_rebuild(x2, mod.weight, mod.bias)
                        if y is not None:
                            return y if x2 is x else y.view(*x.shape[:-1], y.shape[-1])
                y = active[0].rebuild_op(x, mod.weight, mod.bias)
                if y is not None:
                    return y
                w, b = active[0].merged_weight(mod.weight, mod.bias, active[0].multiplier)
            else:
                w, b = mod.weight, mod.bias
                for a in active:
                    w2, b2 = a.merged_weight(mod.weight, mod.bias, a.multiplier)
                    w = w + (w2 - mod.weight)
                    if b2 is not None and mod.bias is not None:
                        b = b + (b2 - mod.bias)
                    elif b2 is not None:
                        b = b2 if b is None else b + b2
            return layer_op(x, self.spec, w.to(x.dtype), b.to(x.dtype) if b is not None else None)
        w, b = mod.weight, mod.bias
        if len(active) == 1 and self._plain and not args and not kwargs and _lowrank.bypass_ready(self.spec):
            x2 = x.reshape(-1, x.shape[-1]) if self._flat_linear and x.dim() != 2 else x
            y = self._grouped(x, x2)
            if y is not None:
                return y
            if _lowrank.bypass_supports(self.spec, x2) and _lowrank.bypass_pays(
                    self.spec, x2, active[0].algorithm.bypass_grouped):
                y = active[0].bypass_op(x2, w, b)
                if y is not None:
                    return y if x2 is x else y.view(*x.shape[:-1], y.shape[-1])
        if self._flat_linear and x.dim() > 2 and not args and not kwargs:
            lead = x.shape[:-1]
            x = x.reshape(-1, x.shape[-1])
            y = F.linear(x, w, b)
            return self._accumulate(active, x, y, w, b).reshape(*lead, y.shape[-1])
        return self._accumulate(active, x, self._orig(x, *args, **kwargs), w, b)

    def _grouped(self, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor | None:
        """This layer's output from its group's one op (:mod:`.siblings`) in x's leading shape, or None (no group, not a
        plain linear layer, or the group does not take this call)."""
        if self.group is None or not self._flat_linear:
            return None
        y = self.group.run(self, x, x2)
        if y is None or x2 is x:
            return y
        return y.view(*x.shape[:-1], y.shape[-1])

    def shared_ready(self, x2: torch.Tensor) -> str | None:
        """Which group op this layer, called now on the 2-D rows ``x2``, would join (:mod:`.siblings`), or None:
        ``"lowrank"`` where it would take the bypass op with one adapter whose down is one matrix (not LoKr's per
        channel group) — checked before any factor is built; on the rebuild path the algorithm's
        ``shared_rebuild`` where its ``shared_part`` holds ((IA)³'s output-keeping op: nothing is built for it)."""
        active = self._active
        if active is None:
            active = self._refresh()
        if len(active) != 1 or not self._flat_linear:
            return None
        a = active[0]
        if self._rebuild:
            kind = a.algorithm.shared_rebuild
            mod = self.module
            if kind is not None and a.shared_rebuild_part(x2, mod.weight, mod.bias) is not None:
                return kind
            return None
        if (not a.algorithm.bypass_grouped and _lowrank.bypass_ready(self.spec)
                and _lowrank.bypass_supports(self.spec, x2) and _lowrank.bypass_pays(self.spec, x2)):
            return "lowrank"
        return None

    def shared_part(self, x2: torch.Tensor, kind: str = "lowrank"):
        """This layer's part of its group's op ``kind`` (:meth:`shared_ready`) — ``(spec, W, b, D, U, s)`` for
        :func:`.algorithms.lowrank_shared.shared_op` (the adapter's factors built here), ``(spec, W, b, …)`` with the
        algorithm's ``shared_part`` on the rebuild path — else None."""
        mod = self.module
        if kind == "lowrank":
            f = self._active[0].bypass_parts(x2.dtype, x2)
        else:
            f = self._active[0].shared_rebuild_part(x2, mod.weight, mod.bias)
        if f is None:
            return None
        return (self.spec, mod.weight, mod.bias) + tuple(f)

    @staticmethod
    def _accumulate(active, x, y, w, b):
        if len(active) == 1:
            # y is this call's fresh output and nothing else reads it: the adapter may add into it
            inplace = (not torch.compiler.is_compiling() and isinstance(y, torch.Tensor) and y is not x
                       and y._base is None)
            return active[0].accumulate(y, x, w, b, y, inplace)
        out = y
        for a in active:  # every adapter's delta is taken against the base output y
            out = a.accumulate(out, x, w, b, y, (out is not y) and not torch.compiler.is_compiling())
        return out

    # -- membership ---------------------------------------------------------------------
    def add(self, adapter: AdapterLayer) -> None:
        if adapter in self.adapters:
            return
        adapter.host = self
        self.adapters.append(adapter)
        self._active = None

    def remove(self, adapter: AdapterLayer) -> None:
        if adapter.is_merged:
            self.unmerge(adapter)
        if adapter in self.adapters:
            self.adapters.remove(adapter)
        adapter.host = None
        self._active = None
        if not self.adapters:
            self.close()

    def close(self) -> None:
        mod = self.module
        if mod.__dict__.get("forward") is self._forward:
            if self._prev_forward is not None:
                object.__setattr__(mod, "forward", self._prev_forward)
            else:
                del mod.__dict__["forward"]
        mod.__dict__.pop(_HOST_ATTR, None)

    # -- exact merge / unmerge ----------------------------------------------------------
    @torch.no_grad()
    def merge(self, adapter: AdapterLayer, multiplier: float) -> None:
        if adapter.is_merged:
            self.unmerge(adapter)
        mod = self.module
        if self.snapshot_w is None:
            self.snapshot_w = mod.weight.detach().clone()
            self.snapshot_b = mod.bias.detach().clone() if mod.bias is not None else None
        adapter.merged_multiplier = float(multiplier)
        self.merged.append(adapter)
        self._recompute()

    @torch.no_grad()
    def unmerge(self, adapter: AdapterLayer) -> None:
        if adapter not in self.merged:
            return
        self.merged.remove(adapter)
        adapter.merged_multiplier = None
        mod = self.module
        if not self.merged:
            mod.weight.data.copy_(self.snapshot_w)
            if self.snapshot_b is not None:
                mod.bias.data.copy_(self.snapshot_b)
            self.snapshot_w = self.snapshot_b = None
        else:
            self._recompute()

    @torch.no_grad()
    def _recompute(self) -> None:
        mod = self.module
        if len(self.merged) == 1 and _merge_one(self.merged[0], mod, self.snapshot_w, self.snapshot_b):
            return
        acc = _accum_dtype(self.snapshot_w.dtype)
        w = self.snapshot_w.to(acc)
        b = self.snapshot_b.to(acc) if self.snapshot_b is not None else None
        w0, b0 = w, b
        dw = torch.zeros_like(w)
        db = torch.zeros_like(b) if b is not None else None
        for a in self.merged:
            was = a.training
            a.training = False
            w2, b2 = a.merged_weight(w0, b0, a.merged_multiplier)
            a.training = was
            dw += w2 - w0
            if b2 is not None and db is not None:
                db += b2 - b0
        mod.weight.data.copy_((w0 + dw).to(self.snapshot_w.dtype))
        if b is not None:
            mod.bias.data.copy_((b0 + db).to(self.snapshot_b.dtype))


@torch.no_grad()
def _merge_one(adapter: AdapterLayer, module: nn.Module, snap_w: torch.Tensor, snap_b: torch.Tensor | None) -> bool:
    """Merge one adapter whose algorithm keeps the default ``merged`` (``W + m·ΔW``) in the fewest
    full-size memory passes: ΔW made once in fp32 (fp64 for fp64 weights), then one fused add that
    reads the snapshot in its own dtype, adds in fp32 and writes the weight rounded once. The value
    is the general path's (:meth:`LayerHost._recompute`) without its extra rounding of
    ``(W + m·ΔW) − W``; that path makes an fp32 copy of W, W + m·ΔW, the difference, a zero
    accumulator and the sum, about three times the memory traffic, which made fusing an fp16 LoRA
    on a CPU several times slower than diffusers. Returns False, writing nothing, when the algorithm
    needs the general path."""
    alg = adapter.algorithm
    if type(alg).merged is not Algorithm.merged:  # BOFT (not linear in m), Full's own fused op
        return False
    acc = _accum_dtype(snap_w.dtype)
    m = adapter.merged_multiplier
    t = {k: (v.to(acc) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
         for k, v in adapter._hot_tensors().items()}
    w0 = None if alg.weight_independent else snap_w.to(acc)
    dw = alg.delta_weight(t, adapter.spec, w0).to(acc)
    if m != 1.0:
        dw = dw * m  # a new tensor: ΔW may be an adapter tensor itself (Norm), never written to
    torch.add(snap_w if w0 is None else w0, dw, out=module.weight.data)  # computed in acc, cast once
    if snap_b is not None:
        b0 = snap_b.to(acc)
        db = alg.delta_bias(t, adapter.spec, b0)
        module.bias.data.copy_(snap_b if db is None else b0 + m * db.to(acc))
    return True


#: layers up to this many weight elements (16 MB in fp32) are checked with real tensors
_REAL_CHECK_NUMEL = 1 << 22


def _implied_shape(algorithm: Algorithm, tensors: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """The weight shape the tensors were made for, when the algorithm can tell (else ``()``), so a
    misfit names both shapes (e.g. ``(320, 1024)`` vs the layer's ``(320, 768)``)."""
    try:
        shape = getattr(algorithm, "inner", algorithm).infer_weight_shape(tensors)
    except Exception:  # noqa: BLE001 — best effort, for the message only
        shape = None
    return tuple(shape) if shape else ()


def check_fits(adapter_name: str, algorithm: Algorithm, tensors: Mapping[str, torch.Tensor], module: nn.Module,
               spec: LayerSpec, file: str | None = None) -> None:
    """Raise :class:`ShapeMismatch` unless the tensors produce a ΔW of the layer's shape."""
    if not algorithm.supports(spec):
        raise ShapeMismatch(adapter_name, spec.weight_shape, spec.weight_shape, file=file,
                            detail=f"algorithm {algorithm.name!r} does not support {spec.kind} layers")
    try:
        with torch.no_grad():
            if math.prod(spec.weight_shape) <= _REAL_CHECK_NUMEL and not any(v.is_meta for v in tensors.values()):
                # small layer: computing the delta for real (on a zero weight) is ~100× cheaper than
                # meta-device shape propagation, whose per-op Python overhead dominates attach time
                # for OFT/BOFT/DoRA (tens of ms per layer)
                t = {k: (v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu())
                     for k, v in tensors.items()}
                w = None if algorithm.weight_independent else torch.zeros(spec.weight_shape)
            else:
                # shape arithmetic only: every tensor but 0-d scalars goes to the meta device
                t = {k: (v.detach().cpu() if v.dim() == 0 else torch.empty(v.shape, device="meta", dtype=torch.float32))
                     for k, v in tensors.items()}
                w = None if algorithm.weight_independent else torch.empty(spec.weight_shape, device="meta")
            found = tuple(algorithm.delta_weight(t, spec, w).shape)
    except ShapeMismatch:
        raise
    except Exception as e:  # noqa: BLE001 — any shape arithmetic failure means "does not fit"
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        raise ShapeMismatch(adapter_name, _implied_shape(algorithm, tensors), spec.weight_shape, file=file,
                            detail=f"{algorithm.name} tensors {shapes} cannot form a delta for this layer: {e}") from None
    if found != tuple(spec.weight_shape):
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        raise ShapeMismatch(adapter_name, found, spec.weight_shape, file=file, detail=f"tensors {shapes}")
    if "diff_b" in tensors and getattr(module, "bias", None) is None:
        raise ShapeMismatch(adapter_name, tuple(tensors["diff_b"].shape), (), file=file,
                            detail="the adapter has a bias delta but the layer has no bias")
