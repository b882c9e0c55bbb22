#!/usr/bin/env python3
"""Aten ops (≈ kernel launches) and bytes written per training step, per library and algorithm,
counted on the CPU with a dispatch mode over one forward+backward of the tiny SD1.5 UNet (same module
structure as the real one, so the per-step op counts are the real ones), and the bytes *saved for
backward* (unique storages reaching autograd's saved-tensor hooks in the forward, parameters and
buffers excluded): the activation-memory proxy (the tiny model's widths, so compare libraries,
not absolute sizes).

    python benchmarks/op_count.py --algos lora,dora --variants lyco,peft,lycoris-eager
    LYCO_SRC=/path/to/other/src python benchmarks/op_count.py   # compare another lyco checkout
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.environ.get("LYCO_SRC", str(Path(__file__).resolve().parent.parent / "src")))
import lyco  # noqa: E402,F401  (bind the package before train_step touches sys.path)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step as T  # noqa: E402

VIEWS = {"view", "reshape", "_unsafe_view", "expand", "t", "transpose", "permute", "unsqueeze", "squeeze",
         "select", "slice", "as_strided", "detach", "alias", "_reshape_alias", "unflatten", "lift_fresh", "split",
         "chunk", "movedim", "unbind", "narrow", "diagonal", "view_as", "expand_as", "promote_types"}


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0
        self.bytes = 0
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            self.n += 1
            self.ops[name] += 1
            for o in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(o, torch.Tensor):
                    self.bytes += o.numel() * o.element_size()
        return out


def measure(variant: str, algo: str | None, batch: int = 1, latent: int = 16) -> Count:
    unet = T.build_unet("sd15", True, "cpu", torch.bfloat16)
    names = T.layer_sets(unet)
    inputs, target = T.make_inputs(unet, batch, latent, "cpu", torch.bfloat16)
    handle = None
    if variant == "floor":
        inputs["sample"].requires_grad_(True)
    else:
        v = T.VARIANTS[variant]
        if v["lib"] == "lyco":
            handle = T.attach_lyco(unet, algo, names, v["mode"], torch.bfloat16, v.get("layer_opts"), v.get("lokr_path"))
        elif v["lib"] == "peft":
            handle = T.attach_peft(unet, algo, names, torch.bfloat16)
        else:
            handle = T.attach_lycoris(unet, algo, names, v["backend"], v["bypass"], torch.bfloat16, True)
        T.randomise_(handle.params, 1, 0.3)

    def step():
        out = unet(**inputs, return_dict=False)[0]
        torch.nn.functional.mse_loss(out.float(), target.float()).backward()

    step()
    c = Count()
    with c:
        step()
    keep = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    keep |= {b.untyped_storage().data_ptr() for b in unet.buffers()}
    if handle is not None:  # adapter parameters (lyco's and LyCORIS's live outside the UNet's modules)
        keep |= {p.untyped_storage().data_ptr() for p in handle.params}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in keep:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = unet(**inputs, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(out.float(), target.float())
    loss.backward()
    c.saved = sum(seen.values())
    return c


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algos", default=",".join(T.ALGOS))
    p.add_argument("--variants", default="lyco,peft,lycoris-eager")
    a = p.parse_args()
    torch.set_num_threads(1)
    T.quiet_libraries()
    for al, ov in T.SMOKE_OVERRIDES.items():  # tiny widths
        for lib, kw in ov.items():
            T.ALGOS[al][lib] = {**T.ALGOS[al][lib], **kw}
    base = measure("floor", None)
    print(f"lyco from {lyco.__file__}")
    print(f"floor: {base.n} ops, {base.bytes / 2**20:.1f} MiB written per step, {base.saved / 2**20:.2f} MiB saved for backward")
    for al in a.algos.split(","):
        for v in a.variants.split(","):
            if T.VARIANTS[v]["lib"] == "peft" and T.ALGOS[al]["peft"] is None:
                continue
            if "only" in T.VARIANTS[v] and al not in T.VARIANTS[v]["only"]:
                continue
            try:
                c = measure(v, al)
                top = ", ".join(f"{k} {n}" for k, n in (c.ops - base.ops).most_common(5))
                print(f"{al:<10} {v:<22} +{c.n - base.n:6d} ops  +{(c.bytes - base.bytes) / 2**20:7.1f} MiB written"
                      f"  +{(c.saved - base.saved) / 2**20:6.2f} MiB saved   {top}")
            except Exception as e:  # noqa: BLE001
                print(f"{al:<10} {v:<22} ERROR {type(e).__name__}: {str(e)[:100]}")


if __name__ == "__main__":
    main()
