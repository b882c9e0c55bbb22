"""LoRA / LoCon (+ Tucker core ``lora_mid``), rs-LoRA, scalar, and DyLoRA.

File tensors (LyCORIS/kohya):
  linear  ``lora_down.weight (r, in)``, ``lora_up.weight (out, r)``
  conv    ``lora_down.weight (r, in/groups, *k)`` (carries the kernel), ``lora_up.weight (out, r, 1…)``
  Tucker  ``lora_down.weight (r, in/groups, 1…)``, ``lora_mid.weight (r, r, *k)``, ``lora_up.weight (out, r, 1…)``
  ``alpha`` 0-d; γ = alpha / r with r = ``lora_down.weight.shape[0]``.

ΔW = γ · reshape(up₂ᴰ @ down₂ᴰ)   or, Tucker,   ΔW[p,q,…] = γ Σ_ij mid[i,j,…]·up[p,i]·down[j,q].

rs-LoRA: training scale α/√r. The file stores ``alpha = α·√r`` so that every loader's alpha/r
gives back α/√r (LyCORIS does the same).

DyLoRA is trained here as LoRA with rank-nested sampling (see :class:`DyLoRA`) and saved as a
plain LoRA file; a prefix of rank b of a DyLoRA file is a valid LoRA (``lyco resize --rank b``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from . import lowrank, regen
from .base import (
    CONV_KINDS, LINEAR, Algorithm, LayerSpec, Tensors, accumulate_conv1x1, accumulate_linear, alpha_scale,
    alpha_tensor, flat, layer_op, rebuild_tucker, register,
)

_CONV_FN = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}


def _kaiming(shape, generator=None):
    w = torch.empty(shape, dtype=torch.float32)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=√5) reduces to U(-1/√fan_in, 1/√fan_in)
    w.uniform_(-bound, bound, generator=generator)
    return w


def lora_shapes(spec: LayerSpec, rank: int, tucker: bool) -> dict[str, tuple[int, ...]]:
    if spec.kind == LINEAR:
        return {"lora_down.weight": (rank, spec.in_dim), "lora_up.weight": (spec.out_dim, rank)}
    ones = (1,) * len(spec.kernel)
    if tucker and spec.is_kxk_conv:
        return {"lora_down.weight": (rank, spec.in_dim) + ones,
                "lora_mid.weight": (rank, rank) + spec.kernel,
                "lora_up.weight": (spec.out_dim, rank) + ones}
    return {"lora_down.weight": (rank, spec.in_dim) + spec.kernel,
            "lora_up.weight": (spec.out_dim, rank) + ones}


@register
class LoRA(Algorithm):
    name = "lora"
    aliases = ("locon",)
    keys = frozenset({"lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "scalar"})
    detect_keys = ("lora_up.weight", "lora_down.weight")
    options = {"use_tucker": False, "use_scalar": False, "rs_lora": False}
    supports_dora = True
    rank_dropout_on = "rank"

    def create(self, spec, opts, weight=None, generator=None) -> Tensors:
        r = int(opts["rank"])
        alpha = opts.get("alpha")
        alpha = float(r if alpha in (None, 0) else alpha)
        if opts.get("rs_lora"):
            alpha = alpha * math.sqrt(r)  # stored so that alpha/r == α/√r
        shapes = lora_shapes(spec, r, bool(opts.get("use_tucker")))
        t: Tensors = {}
        t["lora_down.weight"] = _kaiming(shapes["lora_down.weight"], generator)
        if "lora_mid.weight" in shapes:
            t["lora_mid.weight"] = _kaiming(shapes["lora_mid.weight"], generator)
        if opts.get("use_scalar"):
            t["lora_up.weight"] = _kaiming(shapes["lora_up.weight"], generator)
            t["scalar"] = torch.zeros((), dtype=torch.float32)
        else:
            t["lora_up.weight"] = torch.zeros(shapes["lora_up.weight"], dtype=torch.float32)
        t["alpha"] = alpha_tensor(alpha)
        return t

    def rank(self, t):
        return int(t["lora_down.weight"].shape[0])

    def infer_weight_shape(self, t):
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        mid = t.get("lora_mid.weight")
        kernel = tuple(mid.shape[2:]) if mid is not None else tuple(down.shape[2:])
        return (up.shape[0], down.shape[1]) + kernel

    def _gain(self, t) -> torch.Tensor | float:
        g = alpha_scale(t, self.rank(t))
        s = t.get("scalar")
        return s * g if s is not None else g

    def delta_weight(self, t, spec, weight=None):
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        mid = t.get("lora_mid.weight")
        if mid is not None:
            dw = rebuild_tucker(mid, flat(up).t(), flat(down))
        else:
            dw = (flat(up) @ flat(down)).reshape(spec.weight_shape)
        return dw * self._gain(t)

    def forward_accumulate(self, acc, x, t, spec, weight, bias, base_out, multiplier, inplace=False):
        """``acc + m·γ·up(down(x))`` with m·γ folded into the up GEMM, which also does the add
        (in place when allowed)."""
        conv_ok = spec.kind in CONV_KINDS and spec.groups == 1 and spec.padding_mode == "zeros"
        if "lora_mid.weight" in t or not (spec.kind == LINEAR or conv_ok) or (
                conv_ok and x.dim() != len(spec.kernel) + 2):
            return super().forward_accumulate(acc, x, t, spec, weight, bias, base_out, multiplier, inplace)
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        if up.dtype != x.dtype:
            up = up.to(x.dtype)
        if down.dtype != x.dtype:
            down = down.to(x.dtype)
        if up.dim() != 2:  # (conv up (out, r, 1, …)); a no-op reshape would still add an autograd node
            up = up.reshape(up.shape[0], up.shape[1])
        gain = self._gain(t)
        if isinstance(gain, torch.Tensor):  # use_scalar: a trained 0-d factor
            up = up * gain.to(up.dtype)
            s = multiplier
        else:
            s = gain * multiplier
        if spec.kind == LINEAR:
            return accumulate_linear(acc, regen.linear(x, down), up, s, inplace)  # x regenerated where it can be
        h = lowrank.conv_down(x, down, spec)  # ∂D by one GEMM where cuDNN's weight gradient is slow (run 212)
        return accumulate_conv1x1(acc, h, up, s)

    def lowrank_factors(self, t, spec, dtype):
        """(down, up, γ) as they are (the low-rank op casts them); a trained ``scalar`` is folded into
        ``up`` (differentiably). Tucker LoCon (a rank-r core between two 1×1 convs) is not a two-factor
        product in conv layout: None."""
        if "lora_mid.weight" in t:
            return None
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        gain = self._gain(t)
        if isinstance(gain, torch.Tensor):
            return down, up * gain.to(up.dtype), 1.0
        return down, up, gain

    def forward_delta(self, x, t, spec, weight, bias, base_out, rank_mask=None):
        up, down = t["lora_up.weight"].to(x.dtype), t["lora_down.weight"].to(x.dtype)
        mid = t.get("lora_mid.weight")
        gain = self._gain(t)
        if spec.kind == LINEAR:
            h = regen.linear(x, down)  # x regenerated in backward where its producer keeps what makes it (.regen)
            if rank_mask is not None:
                h = h * rank_mask.to(h.dtype)
            return F.linear(h, up) * gain
        if spec.kind in CONV_KINDS and spec.groups == 1 and spec.padding_mode == "zeros":
            conv = _CONV_FN[spec.kind]
            if mid is not None:
                h = conv(x, down)
                h = conv(h, mid.to(x.dtype), None, spec.stride, spec.padding, spec.dilation)
            else:
                h = conv(x, down, None, spec.stride, spec.padding, spec.dilation)
            if rank_mask is not None:
                h = h * rank_mask.to(h.dtype).reshape((1, -1) + (1,) * (h.dim() - 2))
            return conv(h, up) * gain
        # grouped convs / padding modes: the materialised path is always right
        dw = self.delta_weight(t, spec)
        if rank_mask is not None:
            # masking rank channels == masking those rank-1 terms; rebuild with masked up
            t2 = dict(t)
            t2["lora_up.weight"] = t["lora_up.weight"] * rank_mask.reshape((1, -1) + (1,) * (up.dim() - 2))
            dw = self.delta_weight(t2, spec)
        return layer_op(x, spec, dw.to(x.dtype))

    def export(self, t):
        out = {k: v for k, v in t.items() if k != "scalar"}
        if "scalar" in t:
            out["lora_up.weight"] = t["lora_up.weight"] * t["scalar"]
        return out


@register
class DyLoRA(LoRA):
    """LoRA trained over many ranks at once (Valipour et al. 2022).

    Each training step samples a prefix rank b ∈ {block, 2·block, …, r}; the adapter then acts as
    ``(α/b)·up[:, :b]·down[:b]`` (the DyLoRA paper's scale, so a prefix truncated to rank b and
    saved with the same alpha gives the same ΔW through any loader's alpha/rank). The blocks below
    the sampled one are detached (only the newest block learns, as in the paper and LyCORIS).
    Outside training the full rank is used. The file is a plain LoRA (nothing DyLoRA-specific
    is written), so it loads everywhere; :func:`truncate` cuts it to any prefix rank.

    Deliberate difference from LyCORIS: LyCORIS scales by α/(block index + 1), i.e. α divided by
    the block *count*, and writes a 2-D ``lora_up`` for convs that it cannot reload itself. We
    use α/b (b = rank) and write the ordinary 4-D conv layout.
    """

    name = "dylora"
    aliases = ()
    detect_keys = ()  # files are plain LoRA
    options = {**LoRA.options, "block_size": 1}

    @staticmethod
    def sample_rank(rank: int, block: int, generator: torch.Generator | None = None) -> int:
        nblocks = max(1, rank // max(1, block))
        i = int(torch.randint(0, nblocks, (1,), generator=generator))
        return min(rank, (i + 1) * block)

    @staticmethod
    def prefix(t: Mapping[str, torch.Tensor], b: int, block: int) -> Tensors:
        """Tensors acting at prefix rank b; blocks before the last one are detached."""
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        lo = max(0, b - block)
        up_b = torch.cat([up[:, :lo].detach(), up[:, lo:b]], dim=1)
        down_b = torch.cat([down[:lo].detach(), down[lo:b]], dim=0)
        out = dict(t)
        out["lora_up.weight"], out["lora_down.weight"] = up_b, down_b
        if "lora_mid.weight" in t:
            mid = t["lora_mid.weight"]
            out["lora_mid.weight"] = mid[:b, :b]
        return out


def truncate(t: Mapping[str, torch.Tensor], b: int) -> Tensors:
    """A LoRA's first ``b`` rank components, alpha kept (the DyLoRA cut)."""
    out = dict(t)
    out["lora_up.weight"] = t["lora_up.weight"][:, :b].contiguous()
    out["lora_down.weight"] = t["lora_down.weight"][:b].contiguous()
    if "lora_mid.weight" in t:
        out["lora_mid.weight"] = t["lora_mid.weight"][:b, :b].contiguous()
    return out
