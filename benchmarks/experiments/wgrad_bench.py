"""The bypass op's own weight gradients on SD1.5 b8's linear layers (rank 16, bf16): cuBLAS's three GEMMs
(``lowrank._grad_up`` / ``_grad_down``: ∂U split-K, ∂h, ∂D) against the fused kernel (``wgrad_triton``), each
layer's products captured 20× in one CUDA graph and replayed; µs per layer and the sum over the layers with their
multiplicities (NOTES change 71). Checked against fp32 torch first. Several tile configurations of the kernel.
(Run 99 timed with a copy of `_common.graph_us` that took the median of 5 replays instead of 7.)

    python benchmarks/experiments/wgrad_bench.py OUT_DIR
"""
import json
import sys

import torch

sys.path.insert(0, "src")
sys.path.insert(0, "benchmarks/experiments")
sys.path.insert(0, "benchmarks")
from _common import graph_us  # noqa: E402
import wgrad_triton  # noqa: E402 — the kernel, kept here (it lost: NOTES change 71)
from lyco.algorithms import lowrank  # noqa: E402
from lyco.algorithms.base import LayerSpec  # noqa: E402

# (P, in, out, layers): per transformer block q/k/v/out of both attentions (k/v of the cross-attention on the
# 77-token text at in 768), ff.net.2 (4d → d); blocks per level 5, 5, 5 (64², 32², 16²) and 1 (8²), batch 8
SHAPES = []
for hw, d, blocks in ((64, 320, 5), (32, 640, 5), (16, 1280, 5), (8, 1280, 1)):
    p = 8 * hw * hw
    SHAPES += [(p, d, d, 6 * blocks), (616, 768, d, 2 * blocks), (p, 4 * d, d, blocks)]


def main():
    out_dir = sys.argv[1]
    dev, dt, r, s = torch.device("cuda"), torch.bfloat16, 16, 0.5
    configs = [dict(BM=64, BK=64, BN=64, num_warps=4, num_stages=3, per_sm=2),
               dict(BM=128, BK=64, BN=64, num_warps=4, num_stages=3, per_sm=1),
               dict(BM=128, BK=64, BN=64, num_warps=8, num_stages=3, per_sm=2),
               dict(BM=64, BK=128, BN=128, num_warps=4, num_stages=2, per_sm=2),
               dict(BM=32, BK=64, BN=64, num_warps=2, num_stages=3, per_sm=4)]
    rows, tot = [], {"cublas": 0.0}
    for p, k_in, out, n in SHAPES:
        g = torch.Generator(device=dev).manual_seed(p + k_in)
        gy = torch.randn(p, out, device=dev, dtype=dt, generator=g)
        x = torch.randn(p, k_in, device=dev, dtype=dt, generator=g)
        u = torch.randn(out, r, device=dev, dtype=dt, generator=g) * 0.1
        d = torch.randn(r, k_in, device=dev, dtype=dt, generator=g) * 0.1
        h = x @ d.t()
        spec = LayerSpec("linear", (out, k_in))
        ref_u = s * gy.float().t() @ h.float()
        ref_d = s * (gy.float() @ u.float()).to(dt).float().t() @ x.float()
        row = {"P": p, "in": k_in, "out": out, "layers": n}

        def cublas():
            lowrank._grad_up(spec, s, gy, x, h, None, d, r)
            lowrank._grad_down(spec, s, 1, gy, x, None, d, u, None)
        row["cublas_us"] = graph_us(cublas, 20)
        tot["cublas"] += n * row["cublas_us"]
        for i, c in enumerate(configs):
            wgrad_triton._CFG.update(c)
            wgrad_triton._GRIDS.clear()
            gu, gd = wgrad_triton.lowrank_wgrad(gy, h, x, u, s)
            err = max(((gu - ref_u).abs().max() / ref_u.abs().max()).item(),
                      ((gd - ref_d).abs().max() / ref_d.abs().max()).item())
            row[f"fused{i}_err"] = err
            row[f"fused{i}_us"] = graph_us(lambda: wgrad_triton.lowrank_wgrad(gy, h, x, u, s), 20)
            tot[f"fused{i}"] = tot.get(f"fused{i}", 0.0) + n * row[f"fused{i}_us"]
        rows.append(row)
        print(json.dumps({k: (round(v, 2) if isinstance(v, float) and not k.endswith("err") else v)
                          for k, v in row.items()}), flush=True)
    print("total ms per step (layers × µs):", {k: round(v / 1000, 3) for k, v in tot.items()}, flush=True)
    print("configs:", configs)
    with open(f"{out_dir}/wgrad_bench.json", "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "configs": configs, "rows": rows, "total_us": tot}, f,
                  indent=1)


if __name__ == "__main__":
    main()
