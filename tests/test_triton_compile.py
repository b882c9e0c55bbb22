"""Every lyco Triton kernel goes through Triton's whole compiler (front end, TTIR → TTGIR → LLVM → PTX → cubin,
with the ptxas Triton ships) for the GPUs the kernels are for — on this CPU-only machine, no GPU needed.

Triton's interpreter (the other kernel tests) runs the Python of a kernel and checks values, but not what
only the compiler checks: run 53 found a kernel whose ``if``/``else`` bound tiles of different shapes to one
name — correct interpreted, refused compiled ("Mismatched type … between then block and else block"), so on
the H100 its self-test turned it off. Here each kernel is compiled in a fresh interpreter without
``TRITON_INTERPRET`` (tests/conftest.py sets it for the suite), with the argument types and constexpr values
the launchers use — bf16 for Hopper (sm_90, the benchmarks' H100), fp16 for Ampere (sm_80) — with the tile
sizes of small and large ranks and each constexpr branch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import triton  # noqa: F401 — the test extra installs it: without it this module fails, never skips

_SCRIPT = textwrap.dedent('''
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from lyco.algorithms import factor_triton, lowrank_triton

    def sig(fn, ptr, f32=(), fptr=(), const=None):
        """Pointers in ``ptr`` of the dtype, ``fptr`` fp32 pointers, ``f32`` fp32 scalars, the rest i32."""
        s = {}
        for n in fn.arg_names:
            s[n] = ("constexpr" if n in const else "*fp32" if n in fptr else "fp32" if n in f32
                    else "*" + DT if n in ptr else "i32")
        return s

    cases = []
    for c in [dict(BM=32, BN=64, R1P=8, R2P=8), dict(BM=2, BN=16, R1P=32, R2P=64)]:
        cases.append(("kr_fwd", factor_triton._kr_fwd_kernel, ("A1", "A2", "B1", "B2", "KA", "KB"), (), (), c))
        cases.append(("kr_bwd", factor_triton._kr_bwd_kernel,
                      ("A1", "A2", "B1", "B2", "GKA", "GKB", "GA1", "GA2", "GB1", "GB2"), (), (), c))
    # kron_bwd: ∂A over all of W1's rows in one tile (OLP 8, SD1.5's geometry), and the row loop (OLP 0)
    for bk, bkw, imp, rp, bka, olp in ((32, 256, 8, 16, 2, 8), (2, 2, 2, 128, 2, 0)):
        cases.append(("kron_fwd", factor_triton._kron_fwd_kernel, ("W1", "A", "U"), (), (),
                      dict(BK=bk, IMP=imp, RP=rp)))
        cases.append(("kron_bwd", factor_triton._kron_bwd_kernel, ("W1", "A", "GU", "GW1", "GA"), (), (),
                      dict(BK=bka, BKW=bkw, IMP=imp, RP=rp, OLP=olp)))
    # the stacked batch's one-read backward: SDXL's 8 × 8 W1 at rank 16 (16384-element tiles) unsplit, ∂W1 in the
    # factors' dtype; a 16 × 16 W1 split, ∂W1's fp32 partials
    for bk, olp, imp, rp, split in ((16, 8, 8, 16, False), (4, 16, 16, 16, True)):
        cases.append(("kron_bwd_stacked", factor_triton._kron_bwd_stacked_kernel,
                      ("W1", "A", "GU", "GA") + (() if split else ("GW1",)), (), ("GW1",) if split else (),
                      dict(BK=bk, OLP=olp, IMP=imp, RP=rp, SPLIT=split)))
    # LoKr's ∂W′ reductions: the loop and block forms (fp32 partials) at SDXL's 1280 × 1280 geometry
    cases.append(("kron_wgrad", factor_triton._kron_wgrad_kernel, ("E", "W1", "W2"), (), ("P1", "P2"),
                  dict(BK=16, BC=128)))
    cases.append(("kron_wgrad_block", factor_triton._kron_wgrad_block_kernel, ("E", "W1", "W2"), (), ("P1", "P2"),
                  dict(BK=32, BC=128, MP=8)))
    # LoKr's merged weight (fp32 factors)
    cases.append(("kron_merge", factor_triton._kron_merge_kernel, ("W", "OUT"), ("s",), ("W1", "W2"),
                  dict(BLOCK=2048)))
    lt = lowrank_triton
    for self_ in (False, True):
        cases.append(("rowdot", lt._rowdot_kernel, ("A", "W", "U", "D"), ("gain",), ("P",),
                      dict(SELF=self_, BM=16, BK=128, BR=16, UPCAST=False)))
    for from_p, plain in ((True, False), (False, False), (False, True)):
        cases.append(("build", lt._build_kernel, ("W", "U", "D", "OUT"), ("gain", "s", "eps"), ("MAG", "P", "VEC"),
                      dict(FROM_P=from_p, PLAIN=plain, BM=16, BK=128, BR=16, UPCAST=False)))
    for detach in (False, True):
        cases.append(("grad", lt._grad_kernel, ("E", "W", "U", "D", "H"), ("gain", "s"), ("VEC", "P", "GUP", "GMAG"),
                      dict(DETACH=detach, BM=16, BK=128, BR=64, UPCAST=False)))
    for has_b, br in ((True, 16), (False, 64)):
        cases.append(("up_add", lt._up_add_kernel, ("Y", "U", "H", "B", "OUT"), ("gain",), (),
                      dict(HAS_B=has_b, BM=64, BP=128, BR=br, UPCAST=False)))
    cases.append(("copy3", lt._copy3_kernel, ("X", "OUT"), (), (), dict(BM=64, BP=64)))
    out = []
    for DT, arch in (("bf16", 90), ("fp16", 80)):  # Hopper (the benchmarks' card) and Ampere
        for name, fn, ptr, f32, fptr, const in cases:
            src = ASTSource(fn, sig(fn, ptr, f32, fptr, const), constexprs=const)
            try:
                k = triton.compile(src, target=GPUTarget("cuda", arch, 32))
                out.append([name, DT, arch, sorted(const.items()), len(k.asm.get("cubin", b"")) > 0, ""])
            except Exception as exc:
                out.append([name, DT, arch, sorted(const.items()), False, f"{type(exc).__name__}: {exc}"[:400]])
    print(json.dumps(out))
''')


def test_every_kernel_compiles_for_hopper_and_ampere():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 2 * 23
    failed = [r for r in results if not r[4]]
    assert not failed, failed
