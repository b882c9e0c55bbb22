"""∂D of the ``ff.net.2`` layers (rank 16, bf16) three ways, each layer's product captured 20× in one CUDA graph and
replayed: cuBLAS on a kept x (change 117 off), the rebuilt x (``a * b``) then cuBLAS (change 117 as run 179–183
measured it), and :mod:`lyco.algorithms.regen_triton`'s one kernel reading a and b (several tile configurations).
µs per layer and the sum over the layers with their multiplicities, at SD1.5 b8 and SDXL b4 (1024 px). Every form is
checked against float64 first; a GEGLU's ``a`` is the strided half of its projection's output, as in the model.

    python benchmarks/experiments/regen_wgrad_bench.py OUT_DIR [--norm]

``--norm``: the layer norms' outputs instead (change 119): cuBLAS on a kept x against the kernel forming x from the
norm's input and stats, at the ranks and layouts a step has (SD1.5's norm1 input permuted, q/k/v's rank 48).
Run 191 (``results/run191_h100_regen_variants/``) timed two variants of the kernel with a ``--variants`` mode of this
script — ∂h read along r, the second launch summing 16 row splits a load; both lost and left the kernel with that mode
(NOTES change 119), uncommitted.
"""
import json
import sys

import torch

sys.path.insert(0, "src")
sys.path.insert(0, "benchmarks")
from _common import graph_us  # noqa: E402
from lyco.algorithms import lowrank, regen_triton  # noqa: E402

# (rows, inner, out, layers): ff.net.2 is inner → out, inner = 4·out
SHAPES = {
    "sd15_b8": [(8 * 64 * 64, 1280, 320, 5), (8 * 32 * 32, 2560, 640, 5), (8 * 16 * 16, 5120, 1280, 5),
                (8 * 8 * 8, 5120, 1280, 1)],
    "sdxl_b4": [(4 * 64 * 64, 2560, 640, 10), (4 * 32 * 32, 5120, 1280, 60)],
}
# run 184 swept BN/BK 64/128, 128/64, 64/64, 64/256, 128/128, 32/128 over 264, 528 and 1056 programs: 64/64 (4 warps,
# 4 stages) at 264 best at every shape; run 185 looks below 264 and around 64/64
CONFIGS = [dict(BN=64, BK=64, num_warps=4, num_stages=4), dict(BN=128, BK=64, num_warps=4, num_stages=4),
           dict(BN=64, BK=64, num_warps=2, num_stages=4), dict(BN=64, BK=64, num_warps=4, num_stages=6),
           dict(BN=32, BK=64, num_warps=2, num_stages=6)]
PROGRAMS = [132, 198, 264, 396]


# --norm: the layer norms' outputs (rows, width, rank, layers, permuted): per transformer block norm1 → q/k/v (one
# group, rank 3 × 16; SD1.5's norm1 reads proj_in's NCHW output permuted: no 2-D view), norm2 → attn2.to_q and
# norm3 → ff.net.0.proj (rank 16 each)
NORM_SHAPES = {
    "sd15_b8": [(8 * hw * hw, d, r, blocks * (1 if r == 48 else 2), r == 48)
                for hw, d, blocks in ((64, 320, 5), (32, 640, 5), (16, 1280, 5), (8, 1280, 1)) for r in (48, 16)],
    "sdxl_b4": [(4 * hw * hw, d, r, blocks * (1 if r == 48 else 2), False)
                for hw, d, blocks in ((64, 640, 10), (32, 1280, 60)) for r in (48, 16)],
}
NORM_CONFIGS = [dict(BN=64, BK=64, num_warps=4, num_stages=6), dict(BN=128, BK=64, num_warps=4, num_stages=4),
                dict(BN=64, BK=32, num_warps=4, num_stages=6), dict(BN=128, BK=32, num_warps=4, num_stages=4),
                dict(BN=256, BK=32, num_warps=8, num_stages=3), dict(BN=64, BK=128, num_warps=4, num_stages=4)]


def norm_main(out_dir):
    dev, dt, s = torch.device("cuda"), torch.bfloat16, 0.5
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "sizes": {}, "configs": NORM_CONFIGS}
    for size, shapes in NORM_SHAPES.items():
        rows, tot = [], {}
        for n, k, r, layers, perm in shapes:
            g = torch.Generator(device=dev).manual_seed(n + k + r)
            u = torch.randn(n, k, device=dev, dtype=dt, generator=g) * 2 + 1
            if perm:  # (batch, h·w, C) of an NCHW tensor
                u = u.view(8, n // 8, k).transpose(1, 2).contiguous().transpose(1, 2)
            w, b = torch.randn(k, device=dev, dtype=dt, generator=g), torch.randn(k, device=dev, dtype=dt, generator=g)
            y = torch.nn.functional.layer_norm(u.requires_grad_(), (k,), w, b)
            ops = regen_triton.operands("layernorm", (True, True),
                                        (u.detach(), y.grad_fn._saved_result1, y.grad_fn._saved_result2, w, b), dt)
            x = y.detach().reshape(n, k)
            gh = torch.randn(n, r, device=dev, dtype=dt, generator=g)
            into = torch.zeros(r, k, device=dev, dtype=torch.float32)
            ref = s * gh.double().t() @ x.double()
            row = {"rows": n, "in": k, "rank": r, "layers": layers, "permuted": perm}

            def err(got):
                return ((got.double() - ref).abs().max() / ref.abs().max()).item()
            into.zero_()
            lowrank._mm(gh.t(), x, s, None, into)
            row["kept_err"] = err(into)
            row["kept_us"] = graph_us(lambda: lowrank._mm(gh.t(), x, s, None, into), 20)
            tot["kept"] = tot.get("kept", 0.0) + layers * row["kept_us"]
            for i, c in enumerate(NORM_CONFIGS):
                for p in (132, 264):
                    regen_triton._CFG["layernorm"].update(c)
                    regen_triton._PROGRAMS = p
                    key = f"triton{i}_p{p}"
                    into.zero_()
                    regen_triton.weight_grad(gh, ops, s, into=into)
                    row[key + "_err"] = err(into)
                    row[key + "_us"] = graph_us(lambda: regen_triton.weight_grad(gh, ops, s, into=into), 20)
                    tot[key] = tot.get(key, 0.0) + layers * row[key + "_us"]
            rows.append(row)
            best = min((v, k_) for k_, v in row.items() if k_.startswith("triton") and k_.endswith("_us"))
            print(size, n, k, r, "perm" if perm else "", "kept %.1f" % row["kept_us"], "best %.1f %s" % best,
                  "worst err %.1e" % max(v for k_, v in row.items() if k_.endswith("_err")), flush=True)
        best = min((v, k_) for k_, v in tot.items() if k_.startswith("triton"))
        print(size, "sum µs: kept %.1f best triton %.1f (%s)" % (tot["kept"], *best), flush=True)
        print(size, "per config:", {k_: round(v, 1) for k_, v in tot.items()}, flush=True)
        res["sizes"][size] = {"rows": rows, "sum_us": tot}
    with open(f"{out_dir}/regen_wgrad_norm.json", "w") as f:
        json.dump(res, f, indent=1)


def main():
    out_dir = sys.argv[1]
    if "--norm" in sys.argv:
        return norm_main(out_dir)
    dev, dt, r, s = torch.device("cuda"), torch.bfloat16, 16, 0.5
    e = torch.empty(1, 1, device=dev, dtype=dt)
    assert regen_triton.usable(regen_triton.Operands("mul", (e, e)), r)
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "sizes": {}}
    for size, shapes in SHAPES.items():
        rows, tot = [], {}
        for n, k, o, layers in shapes:
            g = torch.Generator(device=dev).manual_seed(n + k)
            proj = torch.randn(n, 2 * k, device=dev, dtype=dt, generator=g)
            a, b = proj[:, :k], torch.nn.functional.gelu(proj[:, k:])
            x = a * b
            gh = torch.randn(n, r, device=dev, dtype=dt, generator=g)
            into = torch.zeros(r, k, device=dev, dtype=torch.float32)
            ref = s * gh.double().t() @ x.double()
            row = {"rows": n, "in": k, "out": o, "layers": layers}

            def err(got):
                return ((got.double() - ref).abs().max() / ref.abs().max()).item()
            forms = {
                "kept": lambda: lowrank._mm(gh.t(), x, s, None, into),
                "regen": lambda: lowrank._mm(gh.t(), a * b, s, None, into),
            }
            for name, fn in forms.items():
                into.zero_()
                fn()
                row[name + "_err"] = err(into)
                row[name + "_us"] = graph_us(fn, 20)
                tot[name] = tot.get(name, 0.0) + layers * row[name + "_us"]
            for i, c in enumerate(CONFIGS):
                for p in PROGRAMS:
                    regen_triton._CFG["mul"].update(c)
                    regen_triton._PROGRAMS = p
                    key = f"triton{i}_p{p}"
                    into.zero_()
                    regen_triton.product_grad(gh, a, b, s, into=into)
                    row[key + "_err"] = err(into)
                    row[key + "_us"] = graph_us(lambda: regen_triton.product_grad(gh, a, b, s, into=into), 20)
                    tot[key] = tot.get(key, 0.0) + layers * row[key + "_us"]
            rows.append(row)
            print(size, {k_: (round(v, 2) if isinstance(v, float) and k_.endswith("_us") else v)
                         for k_, v in row.items() if not k_.endswith("_err")}, flush=True)
            print("  worst error", max(v for k_, v in row.items() if k_.endswith("_err")), flush=True)
        best = min((v, k_) for k_, v in tot.items() if k_.startswith("triton"))
        print(size, "sum µs: kept %.1f regen %.1f best triton %.1f (%s)" % (tot["kept"], tot["regen"], *best),
              flush=True)
        res["sizes"][size] = {"rows": rows, "sum_us": tot}
    res["configs"] = CONFIGS
    with open(f"{out_dir}/regen_wgrad.json", "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
