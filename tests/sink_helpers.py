"""What the gradient-sink tests share: a dispatch mode telling autograd's accumulation from the ops' own adds."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lyco.algorithms import lowrank


class AutogradAdds(TorchDispatchMode):
    """In-place adds outside :func:`lowrank._sink_add` (autograd's accumulation) and inside it (the ops' own)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.outside = self.inside = 0
        self._in = False
        real = lowrank._sink_add

        def sink_add(g, into):
            self._in = True
            try:
                return real(g, into)
            finally:
                self._in = False
        monkeypatch.setattr(lowrank, "_sink_add", sink_add)
        import lyco.algorithms.lowrank_shared as shared
        monkeypatch.setattr(shared, "_sink_add", sink_add)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.add_.Tensor:
            if self._in:
                self.inside += 1
            else:
                self.outside += 1
        return func(*args, **(kwargs or {}))
