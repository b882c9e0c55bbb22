"""cProfile of DoRA's fused backward on a small layer (host cost per call; run 46). python benchmarks/experiments/prof_launch.py"""
import cProfile, pstats, io, os, sys, torch
sys.path.insert(0, "src")
from lyco.algorithms import lowrank_triton as K
from lyco.algorithms.dora import _LoraDoraBuild
dev, dt = torch.device("cuda"), torch.bfloat16
m = k = 320
w = torch.randn(m, k, device=dev, dtype=dt); u = torch.randn(m, 16, device=dev, dtype=dt)
d = torch.randn(16, k, device=dev, dtype=dt); mag = torch.rand(m, device=dev) + 0.5
e = torch.randn(m, k, device=dev, dtype=dt)
kb = _LoraDoraBuild(0.5, 1.0, False)
keep = kb.forward_aux(w, None, u, d, mag)[2]
def k_bwd():
    _, aux = kb.recompute(keep, w, None, u, d, mag)
    kb.vjp(aux, (u, d, mag), e, None, (True, True, True))
for _ in range(50): k_bwd()
torch.cuda.synchronize()
pr = cProfile.Profile(); pr.enable()
for _ in range(500): k_bwd()
pr.disable(); torch.cuda.synchronize()
s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25); print(s.getvalue()[:6000])
