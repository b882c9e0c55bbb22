"""On the GPU: the captured-step path's gradients with adapted linear layers' inputs regenerated in backward
(``LYCO_INPUT_REGEN``, ``lyco.algorithms.regen``) against the same with the inputs kept — bit for bit — on the
real UNet config, and how many layers regenerate per step. Attention runs through SDPA's math path here (flash
attention's backward adds with atomics: two identical steps would differ already), and the step runs eagerly inside
``graph_step`` (the captured-steps paths, no capture: ``check_cuda_graph.py`` covers capture = eager) or, with
``--eager``, outside it (LoRA's delta path). Captured-steps paths also with ``LYCO_REGEN_KERNEL=1`` (∂D read from the
product's two operands by one Triton kernel, ``lyco.algorithms.regen_triton``): not bitwise — its fp32 sums run in
another order than cuBLAS's — so the gradients that differ from the kept input's (the regenerated layers' downs, and
what an algorithm's down is built from: LoHa's two factors, run 187) must be within ``--kernel-tol`` of them, relative
to their largest entry: one bf16 rounding by default, as ∂D comes out of either form in the compute dtype where the
down's own dtype is (LoHa's rank-64 Khatri–Rao down: 1.1e-3 in run 187; fp32 downs 4e-6). With ``LYCO_NORM_REGEN``
(layer norms' outputs rebuilt from their input and stats, by torch and by the kernel): within the same tolerance —
x itself within one rounding. With ``LYCO_GEGLU_FUSE`` too (a GEGLU's backward run by the op after it, with ∂D, in one
kernel: ∂p within one rounding of torch's chain): every gradient within the same tolerance, and the count of fused
layers.

    python benchmarks/regen_check.py --model sd15 --batch 2 --latent 32 --algos lora,locon --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_step as ts  # noqa: E402


def grads_of(unet, inputs, target, params, regen_on: bool, eager: bool = False, kernel: bool = False,
             norm: bool = False, geglu: bool = False):
    from lyco.algorithms import graph_policy, regen
    os.environ["LYCO_INPUT_REGEN"] = "1" if regen_on else "0"
    os.environ["LYCO_REGEN_KERNEL"] = "1" if kernel else "0"
    os.environ["LYCO_NORM_REGEN"] = "1" if norm else "0"
    os.environ["LYCO_NORM_REGEN_MIN"] = "0"  # the check's small latents: every norm output, whatever its size
    os.environ["LYCO_GEGLU_FUSE"] = "1" if geglu else "0"
    calls = {"n": 0, "hit": 0, "norm": 0, "geglu": 0}
    find, find_geglu = regen.find, regen.find_geglu

    def counting_geglu(x):
        r = find_geglu(x)
        calls["geglu"] += r is not None
        return r
    regen.find_geglu = counting_geglu

    def counting(x, norm=False):
        r = find(x, norm)
        calls["n"] += 1
        calls["hit"] += r is not None
        calls["norm"] += r is not None and r[0].kind == "layernorm"
        return r
    regen.find = counting
    try:
        for p in params:
            p.grad = None
        with contextlib.nullcontext() if eager else graph_policy.graph_step():
            out = unet(**inputs, return_dict=False)[0]
            F.mse_loss(out.float(), target.float()).backward()
        if unet.device.type == "cuda":
            torch.cuda.synchronize()
    finally:
        regen.find, regen.find_geglu = find, find_geglu
    return [p.grad.clone() if p.grad is not None else None for p in params], calls


def rel_err(x, ref):
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def fp32_grads(unet, inputs, target, params, dtype):
    """The kept-input step's adapter gradients with the frozen model in fp32 (the adapters are fp32 already; lyco's
    bf16 kernels stand aside), then the model back in ``dtype`` (bf16 → fp32 → bf16 is exact)."""
    ids = {id(p) for p in params}
    base = [p for p in unet.parameters() if id(p) not in ids]
    for p in base:
        p.data = p.data.float()
    try:
        def up(v):
            if isinstance(v, dict):
                return {k: up(w) for k, w in v.items()}
            return v.float() if torch.is_tensor(v) and v.is_floating_point() else v
        f32 = up(inputs)
        out, _ = grads_of(unet, f32, target.float(), params, False)
    finally:
        for p in base:
            p.data = p.data.to(dtype)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="sd15", choices=sorted(ts.MODELS))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--algos", default="lora,locon")
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--smoke", action="store_true", help="the tiny UNet on the CPU (a check of this script)")
    ap.add_argument("--eager", action="store_true", help="outside graph_step: the eager paths (LoRA's delta path)")
    ap.add_argument("--kernel-tol", type=float, default=2.0 ** -8)
    a = ap.parse_args(argv)
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)
    dev, dtype = torch.device("cpu" if a.smoke else "cuda"), torch.bfloat16
    unet = ts.build_unet(a.model, a.smoke, dev, dtype)
    names = ts.layer_sets(unet)
    inputs, target = ts.make_inputs(unet, a.batch, a.latent, dev, dtype)
    rows = []
    for algo in a.algos.split(","):
        h = ts.attach_lyco(unet, algo, names, ts.VARIANTS["lyco"]["mode"], torch.float32)
        params = list(h.params)
        ts.randomise_(params, seed=1, scale=1.0)
        keep1, c1 = grads_of(unet, inputs, target, params, False, a.eager)
        keep2, _ = grads_of(unet, inputs, target, params, False, a.eager)
        reg, c3 = grads_of(unet, inputs, target, params, True, a.eager)
        det = all(torch.equal(x, y) for x, y in zip(keep1, keep2) if x is not None)
        same = all(torch.equal(x, y) for x, y in zip(keep1, reg) if x is not None)
        worst = max(((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30)).item()
                    for x, y in zip(keep1, reg) if x is not None)
        row = {"model": a.model, "batch": a.batch, "eager": a.eager, "latent": a.latent, "algo": algo, "params": len(params),
               "ops_asked": c3["n"], "regenerated": c3["hit"], "ops_asked_off": c1["n"], "regenerated_off": c1["hit"],
               "kept_deterministic": det, "bitwise_equal": same, "max_rel_diff": worst,
               "ok": bool(det and same and c3["hit"] > 0 and c1["hit"] == 0)}
        if not a.eager:
            # layer norms' outputs too (LYCO_NORM_REGEN), x rebuilt by torch: within one rounding of x, not bitwise
            nrm, c4 = grads_of(unet, inputs, target, params, True, False, False, True)
            diff = [((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30)).item()
                    for x, y in zip(nrm, keep1) if x is not None and not torch.equal(x, y)]
            row.update(norms_regenerated=c4["norm"], norm_params_differing=len(diff),
                       norm_max_rel_diff=max(diff, default=0.0))
            # (the CPU's layer norm keeps a bf16 input's mean and 1/σ in bf16: x rebuilt from them differs in more
            # places — the smoke run's tolerance is 2⁻⁶; CUDA keeps them in fp32)
            tol = a.kernel_tol if dev.type == "cuda" else 2.0 ** -6
            row["ok"] = bool(row["ok"] and c4["norm"] > 0 and max(diff, default=0.0) <= tol)
        if not a.eager and dev.type == "cuda":  # the kernel's ∂D: the regenerated layers' downs within tolerance, all else bitwise
            ker, _ = grads_of(unet, inputs, target, params, True, False, True)
            diff = [((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30)).item()
                    for x, y in zip(ker, keep1) if x is not None and not torch.equal(x, y)]
            row.update(kernel_params_differing=len(diff), kernel_max_rel_diff=max(diff, default=0.0))
            row["ok"] = bool(row["ok"] and len(diff) > 0 and max(diff, default=0.0) <= a.kernel_tol)
            # and the kernel forming the norms' outputs from their input and stats
            kn, _ = grads_of(unet, inputs, target, params, True, False, True, True)
            diff = [((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30)).item()
                    for x, y in zip(kn, keep1) if x is not None and not torch.equal(x, y)]
            row.update(kernel_norm_params_differing=len(diff), kernel_norm_max_rel_diff=max(diff, default=0.0))
            row["ok"] = bool(row["ok"] and len(diff) > 0 and max(diff, default=0.0) <= a.kernel_tol)
            # and a GEGLU's backward run by the op after it with ∂D (LYCO_GEGLU_FUSE, change 120): ∂p within one
            # rounding of torch's chain, so every gradient upstream of a GEGLU may differ — within the tolerance
            # — a bf16 backward amplifies such one-ulp changes (run 195: one parameter's gradient moved 3.9 % of its
            # largest entry), so two checks: (1) the op's torch form of the same backward (the kernel standing aside
            # in backward: grad mode is off there) must give every gradient bit for bit — the wiring; (2) the
            # kernel's step against the same step in fp32, parameter by parameter, no less accurate than the unfused
            # step: the mean of the error ratios at most 1 + 2⁻⁴, each error at most 1.25× the unfused one's plus
            # --kernel-tol
            from lyco.algorithms import regen_triton
            usable = regen_triton.geglu_usable
            regen_triton.geglu_usable = lambda p, r: torch.is_grad_enabled() and usable(p, r)
            try:
                tf, c6 = grads_of(unet, inputs, target, params, True, False, False, False, True)
            finally:
                regen_triton.geglu_usable = usable
            torch_form_same = all(torch.equal(x, y) for x, y in zip(tf, keep1) if x is not None)
            fu, c5 = grads_of(unet, inputs, target, params, True, False, True, True, True)
            diff = [((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30)).item()
                    for x, y in zip(fu, keep1) if x is not None and not torch.equal(x, y)]
            ref = fp32_grads(unet, inputs, target, params, dtype)
            e_keep = [rel_err(x, r) for x, r in zip(keep1, ref) if x is not None]
            e_fu = [rel_err(x, r) for x, r in zip(fu, ref) if x is not None]
            ratio = sum(f / max(k, 1e-30) for f, k in zip(e_fu, e_keep)) / len(e_fu)
            worse = sum(f > 1.25 * k + a.kernel_tol for f, k in zip(e_fu, e_keep))
            row.update(geglu_fused=c5["geglu"], geglu_torch_form_fused=c6["geglu"],
                       geglu_torch_form_bitwise=torch_form_same, geglu_params_differing=len(diff),
                       geglu_max_rel_diff=max(diff, default=0.0), fp32_err_kept_worst=max(e_keep),
                       fp32_err_kept_mean=sum(e_keep) / len(e_keep), fp32_err_geglu_worst=max(e_fu),
                       fp32_err_geglu_mean=sum(e_fu) / len(e_fu), fp32_err_ratio_mean=ratio,
                       fp32_err_params_worse=worse)
            row["ok"] = bool(row["ok"] and c5["geglu"] > 0 and c6["geglu"] > 0 and torch_form_same
                             and ratio <= 1 + 2.0 ** -4 and worse == 0)
        print(json.dumps(row), flush=True)
        rows.append(row)
        h.detach()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"regen_check_{a.model}{'_eager' if a.eager else ''}.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke)", "torch": torch.__version__,
         "rows": rows}, indent=1))
    print("regen_check:", "ok" if all(r["ok"] for r in rows) else "FAILED")


if __name__ == "__main__":
    main()
