"""A GEGLU's backward and its consumer's ∂D (``ff.net.2``, rank 16, bf16) as a step runs them, each layer's captured
20× in one CUDA graph and replayed (change 120):

* ``torch``: what the unfused captured step runs — torch's backward of ``a ⊙ gelu(g)`` (the mul's two products,
  GELU's backward, the split's concatenation) and change 118's ∂D kernel reading a and gelu(g) (kept by the mul);
* ``torch_geglu``: torch's three nodes alone — what the frozen model (the floor) runs for the same GEGLU;
* ``fused``: :func:`lyco.algorithms.regen_triton.geglu_backward` — ∂p and ∂D in one pass (several tile settings).

µs per layer and the sum over the layers with their multiplicities, at SD1.5 b8 and SDXL b4 (1024 px). Each setting's
∂p is compared with torch's element for element (the count that differ and the largest difference relative to the
largest entry) and its ∂D with float64.

    python benchmarks/experiments/geglu_bwd_bench.py OUT_DIR [--quick]

``--quick``: the kernel's own setting (``regen_triton._GEGLU_CFG``) only.
"""
import json
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, "src")
sys.path.insert(0, "benchmarks")
from _common import graph_us  # noqa: E402
from lyco.algorithms import regen_triton  # noqa: E402

# (rows, inner, layers): ff.net.2's input width (4 × the block's), its rows at the block's resolution
SHAPES = {
    "sd15_b8": [(8 * 64 * 64, 1280, 5), (8 * 32 * 32, 2560, 5), (8 * 16 * 16, 5120, 5), (8 * 8 * 8, 5120, 1)],
    "sdxl_b4": [(4 * 64 * 64, 2560, 10), (4 * 32 * 32, 5120, 60)],
}
# run 195 (results/run195_h100_geglu_fuse/bench): BN/BK 64/64, 32/64, 64/128, 128/64 (8 warps), 32/128, 64/64 (8
# warps) over 132–1056 programs — 32/64, 4 warps, 3 stages best (SD1.5 b8 1.79 ms at 528 programs, SDXL b4 8.13 at
# 1056, against torch's 4.83 and 21.72); run 196 sweeps around it
CONFIGS = [dict(BN=bn, BK=bk, num_warps=w, num_stages=st) for bn in (16, 32) for bk in (64, 128) for w in (2, 4)
           for st in (2, 3)]
PROGRAMS = [528, 1056, 2112]


def main():
    global CONFIGS, PROGRAMS
    out_dir = sys.argv[1]
    if "--quick" in sys.argv:  # the kernel's own setting only
        c = dict(regen_triton._GEGLU_CFG)
        PROGRAMS = [c.pop("programs")]
        CONFIGS = [c]
    dev, dt, r, s = torch.device("cuda"), torch.bfloat16, 16, 0.5
    e = torch.empty(4, 64, device=dev, dtype=dt)
    assert regen_triton.geglu_usable(e, r), "the fused kernel's self-test failed here"
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "configs": CONFIGS, "sizes": {}}
    for size, shapes in SHAPES.items():
        rows, tot = [], {}
        for n, k, layers in shapes:
            g = torch.Generator(device=dev).manual_seed(n + k)
            p = torch.randn(n, 2 * k, device=dev, dtype=dt, generator=g) * 2
            a, gate = p[:, :k], p[:, k:]
            b = F.gelu(gate)  # kept by the mul in the unfused step
            gx = torch.randn(n, k, device=dev, dtype=dt, generator=g)
            gh = torch.randn(n, r, device=dev, dtype=dt, generator=g)
            into = torch.zeros(r, k, device=dev, dtype=torch.float32)
            ref_p, x = regen_triton.geglu_torch(gx, p)
            ref_d = s * gh.double().t() @ x.double()
            scale_p = ref_p.double().abs().max()
            row = {"rows": n, "in": k, "layers": layers}

            def torch_geglu():
                return torch.cat([gx * b, torch.ops.aten.gelu_backward(gx * a, gate)], -1)

            def torch_full():
                torch_geglu()
                regen_triton.product_grad(gh, a, b, s, into=into)

            for name, fn in (("torch", torch_full), ("torch_geglu", torch_geglu)):
                row[name + "_us"] = graph_us(fn, 20)
                tot[name] = tot.get(name, 0.0) + layers * row[name + "_us"]
            for i, c in enumerate(CONFIGS):
                for progs in PROGRAMS:
                    regen_triton._GEGLU_CFG.update(c, programs=progs)
                    key = f"fused{i}_p{progs}"
                    into.zero_()
                    gp, _ = regen_triton.geglu_backward(gx, p, gh, s, into=into)
                    diff = gp != ref_p
                    row[key + "_p_differ"] = int(diff.sum().item())
                    row[key + "_p_err"] = ((gp.double() - ref_p.double()).abs().max() / scale_p).item()
                    row[key + "_d_err"] = ((into.double() - ref_d).abs().max() / ref_d.abs().max()).item()
                    row[key + "_us"] = graph_us(lambda: regen_triton.geglu_backward(gx, p, gh, s, into=into), 20)
                    tot[key] = tot.get(key, 0.0) + layers * row[key + "_us"]
            rows.append(row)
            best = min((v, k_) for k_, v in row.items() if k_.startswith("fused") and k_.endswith("_us"))
            print(size, n, k, "torch %.1f torch_geglu %.1f best fused %.1f %s" % (
                row["torch_us"], row["torch_geglu_us"], *best),
                "| ∂p elements differing %d of %d, worst %.1e | ∂D worst %.1e" % (
                    max(v for k_, v in row.items() if k_.endswith("_p_differ")), n * 2 * k,
                    max(v for k_, v in row.items() if k_.endswith("_p_err")),
                    max(v for k_, v in row.items() if k_.endswith("_d_err"))), flush=True)
        best = min((v, k_) for k_, v in tot.items() if k_.startswith("fused"))
        print(size, "sum µs: torch %.1f torch_geglu %.1f best fused %.1f (%s)" % (
            tot["torch"], tot["torch_geglu"], *best), flush=True)
        print(size, "per setting:", {k_: round(v, 1) for k_, v in tot.items()}, flush=True)
        res["sizes"][size] = {"rows": rows, "sum_us": tot}
    with open(f"{out_dir}/geglu_bwd.json", "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
