"""Adapted layers that read the same input, run as one op (:mod:`.algorithms.lowrank_shared` for low-rank adapters
on the bypass op, :func:`.algorithms.ia3.shared_keep_output` for (IA)³'s output-keeping op): the layer hosts of a
group hand each other that op's outputs.

Which layers (:func:`link`, by the model's structure, the names in :data:`.naming.SHARED_INPUT_CHILDREN` — known before the first forward, so an eager step and a
captured one group alike from the first step on, and a checkpointed region recomputes what it first computed):

* diffusers' ``Attention``: ``to_q``, ``to_k``, ``to_v`` in self-attention (all three read the hidden states);
  ``to_k``, ``to_v`` in cross-attention (``is_cross_attention``: both read the text states);
* ``q_proj``, ``k_proj``, ``v_proj`` under one parent (CLIP's text encoders and other transformers' self-attention).

How (:class:`Group`): the first member called with an input — the *leader* of that round — runs the op for every
member that would take the same kind of op on that input as it would (:meth:`.layer.LayerHost.shared_ready`,
:meth:`.layer.LayerHost.shared_part`), returns its own output
and keeps the others'; a member called with the **same tensor object**, unmodified since (its version counter), and
in the same adapter state, gets its output (a member called again, or with no output waiting, leads a new round).
A member called with another input while an output waits for it — the
structure said the inputs are shared and they were not — computes its own, and the group stops grouping (one
op's extra outputs were computed for nothing, once; a debug log says so). Outputs left waiting when the next
round starts (a region whose recomputation stopped early) are dropped.

Only where the members' own op runs (captured steps by default: :func:`.algorithms.lowrank.bypass_ready`,
(IA)³'s ``LYCO_IA3_KEEP_OUTPUT``) and under ``LYCO_SHARED_INPUT`` (:mod:`.algorithms.graph_policy`; ``0`` turns it
off).
"""

from __future__ import annotations

import logging
import weakref

import torch
from torch import nn

from .algorithms import graph_policy
from .algorithms.lowrank import _compute_dtype
from .algorithms.ia3 import shared_keep_output
from .algorithms.lowrank_shared import shared_op
from .naming import SHARED_INPUT_CHILDREN

log = logging.getLogger(__name__)

def wanted() -> bool:
    return graph_policy.wanted("LYCO_SHARED_INPUT")


#: a group op's name (:meth:`.layer.LayerHost.shared_ready`) → the op: ``(x2, parts) → outputs or None``
OPS = {
    "lowrank": lambda x2, parts: shared_op(x2, parts, _compute_dtype(x2)),
    "ia3": shared_keep_output,
}


class Group:
    """The hosts of layers that read one input (module doc)."""

    def __init__(self, hosts):
        self.hosts = tuple(hosts)
        self.broken = False
        self._x = None      # weak reference to the round's input
        self._ver = -1
        self._outs: dict = {}

    def run(self, host, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor | None:
        """``host``'s output for input ``x`` (``x2``: its 2-D rows) from the group's op, or None (the host computes
        its own)."""
        if self.broken or not wanted():
            return None
        ref = self._x
        if host in self._outs and ref is not None and ref() is x and self._ver == x._version:
            out = self._outs.pop(host)
            if not self._outs:
                self._x = None
            if out[1] is host._active:
                return out[0]
            return None  # its adapter changed since the round began (a multiplier set between the calls)
        if host in self._outs:
            # an output waited for this host and it reads another input: the structure was wrong for this model
            log.debug("lyco: %s read another input than its group's; the group computes its own from now on",
                      type(host.module).__name__)
            self.broken = True
            self._outs, self._x = {}, None
            return None
        self._outs, self._x = {}, None
        # which members take the op, before any factor is built (a factor built and not used would be built again by
        # the layer's own op — LoHa's and LoKr's per-pass factor batches would count it as that layer's use)
        kind = host.shared_ready(x2)
        if kind is None:
            return None
        ready = [host] + [h for h in self.hosts if h is not host and h.shared_ready(x2) == kind]
        if len(ready) < 2:
            return None
        members, parts = [], []
        for h in ready:
            p = h.shared_part(x2, kind)
            if p is None:
                if h is host:
                    return None
                continue
            members.append(h)
            parts.append(p)
        if len(members) < 2:
            return None  # the leader's factors were built for nothing: a follower's adapter has no such product
        ys = OPS[kind](x2, parts)
        if ys is None:
            return None
        self._x, self._ver = weakref.ref(x), x._version
        self._outs = {h: (y, h._active) for h, y in zip(members[1:], ys[1:])}
        return ys[0]


def _groups_under(root: nn.Module, host_of):
    for parent in root.modules():
        for names, when in SHARED_INPUT_CHILDREN:
            kids = [getattr(parent, n, None) for n in names]
            if not all(isinstance(k, nn.Module) for k in kids):
                continue
            cross = bool(getattr(parent, "is_cross_attention", False))
            if (when == "self" and cross) or (when == "cross" and not cross):
                continue
            hosts = [host_of(k) for k in kids]
            hosts = [h for h in hosts if h is not None]
            if len(hosts) >= 2:
                yield hosts
            break


def link(roots) -> int:
    """Set the groups of every layer host under ``roots`` (modules) from their structure (module doc); a host in
    no group gets none. Returns the number of groups."""
    from .layer import LayerHost

    def host_of(m):
        return LayerHost.of(m, create=False)

    seen = set()
    n = 0
    for root in roots:
        for m in root.modules():
            h = host_of(m)
            if h is not None and id(h) not in seen:
                h.group = None
        for hosts in _groups_under(root, host_of):
            if any(id(h) in seen for h in hosts):
                continue
            g = Group(hosts)
            for h in hosts:
                h.group = g
                seen.add(id(h))
            n += 1
    return n
