"""Host cost of LoHa's Khatri–Rao pair and LoKr's kron up, kernels (factor_triton) vs torch forms, forward +
backward on one small layer's factors (run 59): µs per call pair, then a cProfile of the kernel path.
python benchmarks/experiments/prof_factor_host.py"""
import cProfile
import io
import pstats
import sys
import time

import torch

sys.path.insert(0, "src")
from lyco.algorithms import factor_triton as K  # noqa: E402
from lyco.algorithms.loha import khatri_rao_cols, khatri_rao_rows  # noqa: E402

dev, dt = torch.device("cuda"), torch.bfloat16


def leaf(*shape):
    return torch.randn(*shape, device=dev, dtype=dt).requires_grad_()


kr_in = (leaf(320, 4), leaf(320, 4), leaf(4, 2880), leaf(4, 2880))
kr_g = (torch.randn(320, 16, device=dev, dtype=dt), torch.randn(16, 2880, device=dev, dtype=dt))
kron_in = (leaf(4, 4), leaf(80, 4))
kron_g = torch.randn(320, 16, device=dev, dtype=dt)
CASES = {
    "kr-kernel": lambda: torch.autograd.backward(K.khatri_rao(*kr_in), kr_g),
    "kr-torch": lambda: torch.autograd.backward(
        (khatri_rao_rows(kr_in[0], kr_in[1]), khatri_rao_cols(kr_in[2], kr_in[3])), kr_g),
    "kron-kernel": lambda: K.kron_up(*kron_in).backward(kron_g),
    "kron-torch": lambda: torch.mul(kron_in[0].reshape(4, 1, 4, 1), kron_in[1].reshape(1, 80, 1, 4)).reshape(
        320, 16).backward(kron_g),
}
for rnd in range(3):
    for name, fn in CASES.items():
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(500):
            fn()
        host = (time.perf_counter() - t) / 500 * 1e6
        torch.cuda.synchronize()
        print(f"round {rnd} {name:12s} {host:7.1f} us per forward+backward (host)", flush=True)
for name in ("kr-kernel", "kron-kernel"):
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(500):
        CASES[name]()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18)
    print(name, s.getvalue()[:4000])
