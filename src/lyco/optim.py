"""AdamW over one flat buffer per parameter group: one fused update for all of an adapter's tensors.

An adapter has many small tensors (an SD1.5 LoRA on attention and feed-forward: 384, 5–40 k elements each;
LoHa twice as many). torch's fused AdamW updates a list of tensors in launches of at most a few dozen tensors
each, every tensor at least one thread block however small: on an H100 the 384 tensors of that LoRA took 11
launches and 0.36 ms per step (``benchmarks/NOTES.md``, run 109's profile) for ≈ 190 MB of traffic (counted: 6.78 M
parameters × 28 bytes read and written) — ≈ 0.5 TB/s.
:class:`FlatAdamW` keeps each group's parameters as views of one contiguous buffer (the parameters stay the same
``nn.Parameter`` objects, leaves of autograd, with their names, shapes and hooks; only their storage moves), gathers
their gradients into one flat gradient with one ``torch.cat`` and runs torch's own AdamW on the flat tensor: one
update launch per group. Tensors of :attr:`FlatAdamW.LARGE` elements or more stay as they are (torch's update over
them is already bandwidth-bound; gathering them would only copy their gradients).

Semantics are torch's ``AdamW`` (decoupled weight decay, bias correction per step) element for element — the flat
update runs the same kernel on the same values (tested against ``torch.optim.AdamW(fused=True)`` on the CPU:
bit-identical in bf16, within one rounding in fp32, where torch's CPU kernel treats a tensor's vectorised body and
its scalar tail apart, and against float64 AdamW math).
One difference of bookkeeping, not of math: torch skips a parameter whose ``.grad`` is None and keeps a step count
per parameter. The flat update needs one count per group, so the first step where a group has a parameter without
a gradient switches that group, for good, to torch's per-parameter update on views of the same state (each
parameter's count starting from the group's) — exactly torch's behaviour from then on, at its speed.

``state_dict()`` is torch AdamW's per-parameter form (parameters numbered in group order; ``exp_avg``,
``exp_avg_sq``, ``step`` each), so checkpoints move freely between this class and ``torch.optim.AdamW``, and
``load_state_dict`` takes either's. :attr:`FlatAdamW.found_inf` skips an update on the device (``lyco train``'s NaN
guard, which then never waits for the device).

Supported options: ``lr``, ``betas``, ``eps``, ``weight_decay``, ``fused`` (default: where torch has a fused
kernel for the device), ``capturable`` (the step inside a CUDA graph). Anything else (``amsgrad``, ``maximize``,
``foreach``, ``differentiable``) is refused with a ``TypeError`` naming it — use ``torch.optim.AdamW``.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

_FUSED_DEVICES = ("cuda", "cpu", "xpu", "mps")
#: torch AdamW's per-group flags and the one value of each this class implements (other keys — a group's "name",
#: LambdaLR's "initial_lr" — are carried along untouched)
_TORCH_FLAGS = {"amsgrad": False, "maximize": False, "foreach": None, "differentiable": False,
                "decoupled_weight_decay": True, "capturable": None, "fused": None}


def _fused_ok(t: torch.Tensor) -> bool:
    return t.device.type in _FUSED_DEVICES and t.is_floating_point()


class _Bucket:
    """The parameters of one group on one device and dtype, as views of ``flat``."""

    def __init__(self, params: list[torch.nn.Parameter], fused: bool | None, capturable: bool, flatten: bool = True):
        p0 = params[0]
        self.params = params
        self.numels = [p.numel() for p in params]
        self.capturable = capturable
        self.fused = _fused_ok(p0) if fused is None else fused
        if not flatten:
            # large tensors: torch's update over them as they are (a gather would copy their gradients for nothing)
            self.flat = self.inner = None
            self.ptrs = []
            self.split = torch.optim.AdamW(params, fused=self.fused or None, capturable=capturable)
            return
        total = sum(self.numels)
        buf = torch.empty(total, dtype=p0.dtype, device=p0.device)
        o = 0
        with torch.no_grad():
            for p, n in zip(params, self.numels):
                buf[o:o + n].copy_(p.detach().reshape(-1))
                o += n
        # the parameters' storage becomes the buffer's: same Parameter objects (leaves, names, hooks kept)
        o = 0
        for p, n in zip(params, self.numels):
            p.data = buf[o:o + n].view(p.shape)
            o += n
        self.ptrs = [p.data_ptr() for p in params]
        self.flat = torch.nn.Parameter(buf, requires_grad=False)
        self.inner = torch.optim.AdamW([self.flat], fused=self.fused or None, capturable=capturable)
        self.split: torch.optim.AdamW | None = None  # per-parameter mode (a step with a missing gradient)

    # -- the flat state, as views per parameter --------------------------------------------------
    def state_views(self) -> list[dict[str, torch.Tensor]] | None:
        """Per parameter ``{step, exp_avg, exp_avg_sq}`` (views of the flat state), or None before the first step."""
        if self.split is not None:
            return [self.split.state[p] if p in self.split.state else None for p in self.params]
        st = self.inner.state.get(self.flat)
        if not st:
            return None
        out, o = [], 0
        for p, n in zip(self.params, self.numels):
            out.append({"step": st["step"], "exp_avg": st["exp_avg"][o:o + n].view(p.shape),
                        "exp_avg_sq": st["exp_avg_sq"][o:o + n].view(p.shape)})
            o += n
        return out

    def _go_split(self, hyper: dict) -> None:
        """Per-parameter updates from now on (torch's semantics for a missing gradient), on the same state memory."""
        views = self.state_views()
        self.split = torch.optim.AdamW(self.params, fused=self.fused or None, capturable=self.capturable, **hyper)
        for p, v in zip(self.params, views or ()):
            if v is not None:
                self.split.state[p] = {"step": v["step"].clone(), "exp_avg": v["exp_avg"],
                                       "exp_avg_sq": v["exp_avg_sq"]}

    def check(self) -> None:
        """The parameters must still live in the buffer: code that gives a parameter new storage (``p.data = …``,
        ``module.to()`` onto another device or dtype) after the optimizer was made would have it train nothing."""
        for p, ptr in zip(self.params, self.ptrs):
            if p.data_ptr() != ptr:
                raise RuntimeError(f"FlatAdamW: a parameter of shape {tuple(p.shape)} was given new storage after "
                                   "the optimizer was made (p.data = …, or module.to() to another device/dtype); "
                                   "make the optimizer after moving the model")

    @torch.no_grad()
    def readopt(self) -> int:
        """Move parameters that were given new storage back into the buffer (their current values kept)."""
        if self.flat is None:
            return 0
        n, o = 0, 0
        for i, (p, k) in enumerate(zip(self.params, self.numels)):
            if p.data_ptr() != self.ptrs[i]:
                if p.device != self.flat.device or p.dtype != self.flat.dtype or p.numel() != k:
                    raise RuntimeError(f"FlatAdamW: a parameter of shape {tuple(p.shape)} moved to {p.device}/"
                                       f"{p.dtype}; the optimizer's buffer is on {self.flat.device}/"
                                       f"{self.flat.dtype}: make the optimizer after moving the model")
                view = self.flat.data[o:o + k].view(p.shape)
                view.copy_(p.data)
                p.data = view
                n += 1
            o += k
        return n

    def step(self, hyper: dict, found_inf: torch.Tensor | None = None) -> None:
        self.check()
        if self.split is None and any(p.grad is None for p in self.params):
            self._go_split(hyper)
        opt = self.split if self.split is not None else self.inner
        opt.param_groups[0].update(hyper)
        opt.found_inf = found_inf  # torch's Adam passes it to its fused kernel (None: always update)
        try:
            if opt is self.split:
                opt.step()
                return
            # the flat gradient lives only for the update: a buffer kept between steps would sit on the peak of the
            # forward/backward (run 112: +0.01–0.02 GiB), a copy made here comes after the activations are freed
            self.flat.grad = torch.cat([p.grad.reshape(-1) for p in self.params])
            opt.step()
            self.flat.grad = None
        finally:
            opt.found_inf = None


class FlatAdamW(torch.optim.Optimizer):
    """AdamW whose update runs on one flat buffer per parameter group (module doc)."""

    _HYPER = ("lr", "betas", "eps", "weight_decay")
    #: tensors of at least this many elements are updated as they are, not gathered into the flat buffer: torch's
    #: update is already bandwidth-bound on them, and the gather would copy their gradients each step (Full's 267 M
    #: parameters, mostly in such tensors: 78.6 ms per step all gathered in run 118, 77.8 with torch's AdamW in run 79)
    LARGE = 1 << 20

    #: None, or a float tensor of one element on the parameters' device: where it is nonzero, :meth:`step` leaves
    #: parameters, moments and step counts as they are — decided on the device, no host sync (torch's fused AdamW
    #: kernels take it; AMP's GradScaler uses the same argument). ``lyco train`` sets it to "the loss was not
    #: finite" so that it never has to wait for the device before the update (:attr:`skips_on_found_inf`).
    found_inf: torch.Tensor | None = None

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, fused: bool | None = None,
                 capturable: bool = False, **unsupported: Any):
        if unsupported:
            raise TypeError(f"FlatAdamW: unsupported option(s) {sorted(unsupported)}; use torch.optim.AdamW")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self._fused, self._capturable = fused, capturable
        self._buckets: list[list[_Bucket]] = []
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        for k, v in g.items():
            if k in _TORCH_FLAGS and v not in (None, False, _TORCH_FLAGS[k]):
                raise TypeError(f"FlatAdamW: unsupported group option {k}={v!r}; use torch.optim.AdamW")
        by_kind: dict[tuple, list] = {}
        for p in g["params"]:
            if not p.is_floating_point():
                raise TypeError(f"FlatAdamW: parameter of dtype {p.dtype}; expected a floating-point one")
            if p.is_sparse:
                raise TypeError("FlatAdamW: sparse parameters are not supported")
            by_kind.setdefault((p.device, p.dtype, p.numel() >= self.LARGE), []).append(p)
        self._buckets.append([_Bucket(ps, self._fused, self._capturable, flatten=not large)
                              for (_, _, large), ps in by_kind.items()])

    def readopt(self) -> int:
        """Give the buffers back to parameters that were given new storage with the same device and dtype since
        this optimizer was made, keeping their current values; returns how many. For code that moves a model
        after its optimizer exists: accelerate's ``prepare`` runs ``model.to(device)``, and torch 2.13's
        ``.to("cpu:0")`` of a CPU tensor copies it (CPU-only multi-process runs). Call it before anything
        captures the parameters' addresses (a CUDA graph). :meth:`step` refuses to run on moved parameters."""
        return sum(b.readopt() for bs in self._buckets for b in bs)

    def _hyper(self, g: dict) -> dict:
        return {k: g[k] for k in self._HYPER}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.found_inf is not None and not self.skips_on_found_inf:
            raise RuntimeError("FlatAdamW.found_inf needs torch's fused kernels (fused=True on CUDA or the CPU)")
        for g, buckets in zip(self.param_groups, self._buckets):
            hyper = self._hyper(g)
            for b in buckets:
                if any(p.grad is not None for p in b.params):
                    b.step(hyper, self.found_inf)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's semantics; zeroing in place is one ``_foreach_zero_`` per device and dtype — the base class loops
        over the parameters here (its ``foreach`` default is off for an optimizer without that option): one kernel
        and one Python call per tensor, 397 per step in run 114's CUDA-graph training."""
        if set_to_none:
            super().zero_grad(set_to_none=True)
            return
        by_kind: dict[tuple, list[torch.Tensor]] = {}
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    by_kind.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        for grads in by_kind.values():
            torch._foreach_zero_(grads)

    @property
    def skips_on_found_inf(self) -> bool:
        """Whether :attr:`found_inf` works here: every group's update runs torch's fused kernel."""
        return all(b.fused for bs in self._buckets for b in bs)

    # -- torch AdamW's per-parameter state_dict ----------------------------------------------------
    def _ordered(self) -> list[tuple[torch.Tensor, dict | None]]:
        """(parameter, its state views or None) in group order — torch's numbering."""
        views: dict[int, dict | None] = {}
        for buckets in self._buckets:
            for b in buckets:
                vs = b.state_views()
                for i, p in enumerate(b.params):
                    views[id(p)] = None if vs is None else vs[i]
        return [(p, views.get(id(p))) for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        state, groups, i = {}, [], 0
        ordered = self._ordered()
        for g in self.param_groups:
            ids = list(range(i, i + len(g["params"])))
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ids,
                           "amsgrad": False, "maximize": False, "foreach": None,
                           "capturable": self._capturable, "differentiable": False, "fused": self._fused,
                           "decoupled_weight_decay": True})
            i += len(ids)
        for pid, (p, v) in enumerate(ordered):
            if v is not None:
                # copies: the flat state's views would share memory with each other (and with later updates)
                state[pid] = {"step": v["step"].clone(), "exp_avg": v["exp_avg"].clone(),
                              "exp_avg_sq": v["exp_avg_sq"].clone()}
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(groups, self.param_groups)):
            raise ValueError("FlatAdamW.load_state_dict: the saved parameter groups "
                             f"({[len(g['params']) for g in groups]} parameters) do not match this optimizer's "
                             f"({[len(g['params']) for g in self.param_groups]})")
        saved = state_dict["state"]
        for gs, g in zip(groups, self.param_groups):  # the saved hyperparameters, as torch restores them
            for k, v in gs.items():
                if k != "params" and k not in _TORCH_FLAGS:
                    g[k] = tuple(v) if k == "betas" else v
        pid_of = {}
        for gs, g in zip(groups, self.param_groups):
            for sid, p in zip(gs["params"], g["params"]):
                pid_of[id(p)] = sid
        for g, buckets in zip(self.param_groups, self._buckets):
            hyper = self._hyper(g)
            for b in buckets:
                # a step saved as a number (a checkpoint's scalars) becomes a tensor, as torch keeps it
                sts = [None if s is None else {**s, "step": torch.as_tensor(s["step"], dtype=torch.float32)}
                       for s in (saved.get(pid_of[id(p)]) for p in b.params)]
                if all(s is None for s in sts):
                    continue
                steps = {float(s["step"]) for s in sts if s is not None}
                if len(steps) == 1 and all(s is not None for s in sts) and b.flat is not None:
                    self._load_flat(b, sts, [pid_of[id(p)] for p in b.params])
                else:  # counts differ (a saved per-parameter history): torch's per-parameter update from here
                    b._go_split(hyper)
                    for p, s in zip(b.params, sts):
                        if s is not None:
                            b.split.state[p] = {
                                "step": s["step"].detach().clone().to(
                                    device=p.device if self._capturable or b.fused else "cpu",
                                    dtype=torch.float32),
                                "exp_avg": s["exp_avg"].detach().to(p.device, p.dtype).clone().view(p.shape),
                                "exp_avg_sq": s["exp_avg_sq"].detach().to(p.device, p.dtype).clone().view(p.shape)}

    @staticmethod
    def _load_flat(b: _Bucket, sts: list[dict], pids: list[int]) -> None:
        dev, dt = b.flat.device, b.flat.dtype
        for p, s, pid in zip(b.params, sts, pids):
            for k in ("exp_avg", "exp_avg_sq"):
                if s[k].numel() != p.numel():
                    raise ValueError(f"FlatAdamW.load_state_dict: parameter {pid}'s saved {k} has shape "
                                     f"{tuple(s[k].shape)}; expected {tuple(p.shape)}")
        m = torch.cat([s["exp_avg"].detach().reshape(-1).to(dev, dt) for s in sts])
        v = torch.cat([s["exp_avg_sq"].detach().reshape(-1).to(dev, dt) for s in sts])
        step = sts[0]["step"].detach().clone().to(torch.float32)
        if b.fused or b.capturable:
            step = step.to(dev)
        b.split = None
        b.inner.state[b.flat] = {"step": step, "exp_avg": m, "exp_avg_sq": v}


def flat_adamw_supports(options: dict) -> bool:
    """Whether :class:`FlatAdamW` takes these ``torch.optim.AdamW`` keyword arguments."""
    return set(options) <= set(FlatAdamW._HYPER) | {"fused", "capturable"}
