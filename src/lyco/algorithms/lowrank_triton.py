"""Fused Triton kernels for weights of the form ``W′ = W + γ·U·D`` (U, D rank-sized), on CUDA:
GLoRA's rebuilt op and the bypass op's merged weights (:func:`add_lowrank`: ``W + k·[W·A1 │ B1]·[A2 ; B2]`` in one
read of W and one write, where ``addmm`` first copies W into its output: 4 weight-sized passes → 2; ``[W′ │ U]`` from
the same launch where the op's ∂x GEMM yields ∂h too) and DoRA over LoRA's
(magnitude on the output axis; :func:`build`, :func:`backward`); the bypass op's (:mod:`.lowrank`) conv epilogue
``Y + γ·U·H + b`` over a batch (:func:`up_add`) and the tiled NCHW → channels-last copy of its input
(:func:`channels_last`).

DoRA: the torch path of :class:`lyco.algorithms.dora._LoraDoraBuild` makes ≈ 24 weight-sized passes per
layer and step (``addmm`` first copies W into its output, the row norm, the ``addcmul``, the same again
in the backward's rebuild, then the gradient's ``rowdot``, scale, ``addcmul`` and two GEMMs reading it;
these kernels ≈ 11, by the same count) and 16 kernels more per layer and step than these (run 38: 6840 →
3750 per step over 192 layers; 4320 once the columns were split, run 40). Here each kernel works on a block
of 16 rows × a range of columns and keeps ``W′ = W + γ·U·D`` in registers (recomputed from W and the rank-sized U, D — never stored); a row's
columns are split over programs until a launch has ≈ 4 programs per SM (few rows otherwise leave most
SMs idle), and what needs a whole row (the norm, ``⟨E_j, W′_j⟩``) is summed from per-split partials
(fixed order: deterministic, so the trainer's CUDA graphs stay bit-identical to eager):

* :func:`build` — ``W_eff = (1 − s)·W + s·g ⊙ W′`` with ``g = mag / (‖W′‖_row + ε)``. Forward: the
  squared norms' partials, then the build, which sums them and stores ``(g, n, ‖W′‖)`` in fp32 for the
  backward; the backward's rebuild reads ``g`` (one launch).
* :func:`backward` — from ``E = ∂L/∂W_eff``: the partials of ``dgr_j = ⟨E_j, W′_j⟩``, then one launch
  writing ``∂mag = s·dgr/n`` and ``H = ∂(U·D) = γ·s·g ⊙ E − γ·s·(dgr·g/(n·‖W′‖)) ⊙ W′`` (the norm term
  dropped with a detached norm) and each split's part of ``∂U = H·Dᵀ``; ``∂D = Uᵀ·H`` stays one cuBLAS
  GEMM (a sum over rows: in-kernel it would need atomics, non-deterministic).

Measured (H100, SD1.5's 192 DoRA layers, bf16, rank 16; ``benchmarks/dora_kernel_bench.py``, runs 39–40):
whole rows per program 7.7 ms per step for the three, split columns 5.4 ms (bytes at copy bandwidth:
1.6 ms); the training step as one CUDA graph 87.8 ms on the torch path → 81.6 (whole rows, run 38) → 79.4
(split, run 40), LyCORIS 104.9.

Numerics: W′ is formed in fp32 (the torch path rounds it to the weight's dtype first), W_eff is rounded
once. Same function, at least as accurate; tests compare both to a float64 reference.

Selected automatically (:func:`usable`): CUDA tensors, bf16/fp16 weights, inner rank ≤ 64, Triton
importable, not under ``torch.compile`` (which takes the differentiable build), ``LYCO_TRITON`` not ``0``,
and the kernels' self-test passed on that device and dtype (once per process; a failure turns them off with
one warning). Everything else takes the torch path. CPU tests run these kernels in Triton's interpreter
(``TRITON_INTERPRET=1``), where a bf16 ``tl.dot`` is wrong (triton 3.6): ``UPCAST`` makes the
interpreted kernels multiply in fp32 (the GPU keeps bf16/fp16 tensor-core dots, accumulated in fp32).
"""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: the torch path is the fallback everywhere
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the install
    triton = None

_EPS = torch.finfo(torch.float32).eps
#: launch configuration: BM rows per program (tl.dot needs ≥ 16), BK columns per sweep step, and the number
#: of programs a launch aims at (None: 4 per SM): a layer's columns are split over programs until its
#: (row blocks × column splits) reach it. GPU run 39 (H100, SD1.5's 192 DoRA layers): whole rows per program
#: (few programs on the small layers) ran at 4.2–4.9× the bytes-at-copy-bandwidth time whatever the tile;
#: split to 4 per SM, 3.3× with BK = 128 (run 40; 2 or 8 per SM, 2–4 stages: within 2 %; BK 256–512: slower).
_CFG = {"BM": 16, "BK": 128, "num_warps": 4, "num_stages": 3, "programs": None}
#: :func:`add_lowrank`'s (the bypass op's merges, GLoRA's rebuild), same keys: 32-row blocks. Run 169
#: (``benchmarks/merge_kernel_bench.py``, H100, every merge of a LoRA step as one graph, twelve tiles): SDXL's 582
#: ``lin`` merges (7122 MiB moved) 4.16 ms at DoRA's 16-row tile, 3.83 at this one (1.95 TB/s), 2 programs per SM
#: or 64–128-row blocks 4.15–5.10, one pipeline stage 5.31; beside a chain of ∂x-sized GEMMs on another stream it
#: added 2.54 ms to them against 2.79;
#: SD1.5's 160: 0.739 → 0.716 ms. In the step within noise (SDXL b1 LoRA 77.28 ms against 77.36 / 77.70)
_MERGE_CFG = dict(_CFG, BM=32)


#: (device, dtype) → whether the kernels passed their self-test there (:func:`_self_test`, once per process)
_CHECKED: dict = {}


#: the largest inner rank (U's columns) the kernels take: U·D tiles of up to 64 × BK stay in registers; the
#: self-test compiles the 16- and 64-wide variants (larger ranks take the torch path)
MAX_RANK = 64


def usable(w: torch.Tensor, rank: int) -> bool:
    """Whether the fused kernels take this layer (see the module doc): :func:`eligible`, and the kernels
    passed their self-test on this device and dtype (:func:`_checked`)."""
    return eligible(w, rank) and _checked(w.device, w.dtype)


def eligible(w, rank: int) -> bool:
    """:func:`enabled` for ``w`` and an inner rank ≤ :data:`MAX_RANK`."""
    return enabled(w) and rank <= MAX_RANK


def enabled(t, dtype: torch.dtype | None = None) -> bool:
    """What every lyco Triton kernel needs (this module's and :mod:`.factor_triton`'s): Triton importable, a
    CUDA tensor in bf16/fp16 (or ``dtype`` in its place: the dtype an op computes in, autocast's for an fp32 input),
    ``LYCO_TRITON`` not ``0``, and not under ``torch.compile`` (which takes the differentiable torch path)."""
    return (triton is not None and t.is_cuda and (dtype or t.dtype) in (torch.bfloat16, torch.float16)
            and os.environ.get("LYCO_TRITON", "1") != "0" and not torch.compiler.is_compiling())


def gate(cache: dict, device, dtype, test) -> bool:
    """The first time for a device and dtype a kernel family is compiled and checked against torch math
    (``test(device, dtype)``, remembered in ``cache``); where that fails (an older GPU, a Triton that cannot
    compile them) the family is off for the process. Not decided while a CUDA graph is being captured (the
    check synchronises): the torch path then, and the check at the next call outside a capture."""
    key = (device, dtype)
    ok = cache.get(key)
    if ok is None:
        if torch.cuda.is_current_stream_capturing():
            return False
        ok = cache[key] = test(device, dtype)
    return ok


def self_test(device, dtype, compare, what: str) -> bool:
    """Run ``compare(device, dtype)`` (None, or why the kernels disagree with torch) without autograd or
    autocast; False and one warning naming ``what`` and the reason on a disagreement, an exception (a compile
    or launch failure) or a GPU below what the kernels need."""
    import warnings
    reason = None
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < ((8, 0) if dtype == torch.bfloat16
                                                                              else (7, 0)):
        reason = f"compute capability {torch.cuda.get_device_capability(device)} is below what the kernels need"
    else:
        # the check reads its errors back to the host: allowed even inside a step run with torch's sync
        # debugging set to raise (the warm-up before a CUDA graph capture does that, lyco.train.graphs)
        sync_mode = torch.cuda.get_sync_debug_mode() if device.type == "cuda" else 0
        try:
            if sync_mode:
                torch.cuda.set_sync_debug_mode(0)
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                reason = compare(device, dtype)
        except Exception as exc:  # a compile or launch failure: keep training on the torch path
            reason = f"{type(exc).__name__}: {exc}"
        finally:
            if sync_mode:
                torch.cuda.set_sync_debug_mode(sync_mode)
    if reason is not None:
        warnings.warn(f"lyco: {what} are off on {device} for {dtype} ({reason}); "
                      "using the torch path (LYCO_TRITON=0 silences this)", RuntimeWarning, stacklevel=4)
        return False
    return True


def _checked(device, dtype) -> bool:
    """:func:`gate` for these kernels (:func:`_self_test`)."""
    return gate(_CHECKED, device, dtype, _self_test)


def _self_test(device, dtype) -> bool:
    """Every kernel variant on a 48 × 300 weight of rank 8 and of rank :data:`MAX_RANK` (forward build,
    rebuild, both backwards, the plain build) against the same math in fp32 torch; False (and a warning
    naming the reason) on an exception or a relative error above 2 % (one bf16 ulp is 0.4 % relative)."""
    return self_test(device, dtype, lambda dev, dt: _compare(dev, dt, 8) or _compare(dev, dt, MAX_RANK),
                     "the fused Triton kernels")


def _compare(device, dtype, r: int) -> str | None:
    """The self-test's comparisons at rank ``r`` (see :func:`_self_test`): None, or why the kernels disagree."""
    g = torch.Generator().manual_seed(r)
    w, u, d, e = (torch.randn(*sh, generator=g).to(device, dtype)
                  for sh in ((48, 300), (48, r), (r, 300), (48, 300)))
    d = d * (8 / r) ** 0.5  # U·D of the same size at every rank
    mag = torch.rand(48, generator=g).to(device) + 0.5
    wc = w.float() + 0.5 * u.float() @ d.float()
    n = wc.norm(dim=1) + _EPS
    out, vec = build(w, u, d, 0.5, 0.7, mag=mag)
    again, _ = build(w, u, d, 0.5, 0.7, vec=vec)
    ref = 0.3 * w.float() + 0.7 * wc * (mag / n)[:, None]
    dgr = (e.float() * wc).sum(1)
    h_ref = 0.35 * (mag / n)[:, None] * e.float()
    errs = [(out, ref), (again, ref), (add_lowrank(w, u, d, 0.5), wc)]
    for detach in (False, True):
        h, gu, gmag = backward(e, w, u, d, vec, 0.5, 0.7, detach, True, torch.float32)
        hr = h_ref if detach else h_ref - (0.35 * dgr * mag / (n * n * (n - _EPS)))[:, None] * wc
        errs += [(h, hr), (gu, hr @ d.float().t()), (gmag, 0.7 * dgr / n)]
    # up_add: a channels-last source into a new NCHW result with a bias, and in place on an NCHW one without
    y4 = torch.randn(2, 48, 5, 7, generator=g).to(device, dtype)
    h4 = torch.randn(2, r, 5, 7, generator=g).to(device, dtype)
    b4 = torch.randn(48, generator=g).to(device, dtype)
    uh = torch.einsum("or,nrp->nop", u.float(), h4.float().flatten(2))
    y_ref = y4.float().flatten(2) + 0.5 * uh
    ycl, hcl = y4.contiguous(memory_format=torch.channels_last), h4.contiguous(memory_format=torch.channels_last)
    errs.append((up_add(ycl.flatten(2), u, hcl.flatten(2), 0.5, b4), y_ref + b4.float()[:, None]))
    y_in = y4.clone().flatten(2)
    errs.append((up_add(y_in, u, h4.flatten(2), 0.5, out=y_in), y_ref))
    cl = channels_last(y4)
    errs.append((cl, y4.float()))
    # tap_sum: a 3×3 conv with padding 1 of a channels-last (2, 48, 5, 7) input as one GEMM and the sum
    dk = torch.randn(r, 48, 3, 3, generator=g).to(device, dtype)
    zt = (ycl.permute(0, 2, 3, 1).reshape(-1, 48).float() @ dk.permute(2, 3, 0, 1).reshape(9 * r, 48).float().t())
    errs.append((tap_sum(zt, 2, 5, 7, r, (3, 3), (1, 1), dtype),
                 torch.nn.functional.conv2d(y4.float(), dk.float(), padding=1)))
    # add_lowrank_taps: a channels-last 3×3 (6, 48, 3, 3) weight of 4 channel groups, U (6, 4·r)
    wt = torch.randn(6, 48, 3, 3, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    ut = torch.randn(6, 4 * r, generator=g).to(device, dtype)
    dt4 = (torch.randn(r, 12, 3, 3, generator=g) * (8 / r) ** 0.5).to(device, dtype)
    wt_ref = wt.float() + 0.5 * torch.einsum("omr,rctu->omctu", ut.float().view(6, 4, r), dt4.float()).reshape(wt.shape)
    taps = add_lowrank_taps(wt, ut.view(24, r), dt4.permute(0, 2, 3, 1).reshape(r, -1).contiguous(), 0.5, 4)
    errs.append((taps, wt_ref))
    if not cl.is_contiguous(memory_format=torch.channels_last) or taps.stride() != wt.stride():
        return "channels_last's or add_lowrank_taps' result is not channels-last"
    worst = max(((a.float() - b).abs().max() / b.abs().max()).item() for a, b in errs)
    return None if worst <= 2e-2 else f"their self-test's relative error at rank {r} is {worst:.2e}"


# decided when the kernels are defined, as Triton decides whether @triton.jit interprets them
_UPCAST = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if triton is not None:

    @triton.jit
    def _w_prime(w_ptrs, d_ptrs, u, rmask, dmask, cols, K, gain, UPCAST: tl.constexpr):
        """W′ = W + γ·U·D on one (rows × columns) tile, in fp32."""
        cmask = cols < K
        w = tl.load(w_ptrs, mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        d = tl.load(d_ptrs, mask=dmask[:, None] & cmask[None, :], other=0.0)
        if UPCAST:
            ud = tl.dot(u.to(tl.float32), d.to(tl.float32))
        else:
            ud = tl.dot(u, d)
        return w + gain * ud, cmask

    @triton.jit
    def _rowdot_kernel(A, W, U, D, P, M, K, R, sam, sak, swm, swk, sum_, sur, sdr, sdk, gain, KS,
                       SELF: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
                       UPCAST: tl.constexpr):
        """P[split, row] = Σ over this program's columns of A·W′ (SELF: W′·W′, the squared norm's part)."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        rmask = rows < M
        rr = tl.arange(0, BR)
        u = tl.load(U + rows[:, None] * sum_ + rr[None, :] * sur, mask=rmask[:, None] & (rr[None, :] < R),
                    other=0.0)
        kk = tl.arange(0, BK)
        acc = tl.zeros((BM,), dtype=tl.float32)
        k_lo = tl.program_id(1) * KS
        for k0 in range(k_lo, tl.minimum(k_lo + KS, K), BK):
            cols = k0 + kk
            wc, cmask = _w_prime(W + rows[:, None] * swm + cols[None, :] * swk,
                                 D + rr[:, None] * sdr + cols[None, :] * sdk, u, rmask, rr < R, cols, K, gain, UPCAST)
            if SELF:
                acc += tl.sum(wc * wc, axis=1)
            else:
                a = tl.load(A + rows[:, None] * sam + cols[None, :] * sak, mask=rmask[:, None] & cmask[None, :],
                            other=0.0).to(tl.float32)
                acc += tl.sum(a * wc, axis=1)
        tl.store(P + tl.program_id(1) * M + rows, acc, mask=rmask)

    @triton.jit
    def _build_kernel(W, U, D, MAG, P, NP, OUT, VEC, M, K, R, swm, swk, sum_, sur, sdr, sdk, som, sok,
                      gain, s, eps, KS,
                      FROM_P: tl.constexpr, PLAIN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                      BR: tl.constexpr, UPCAST: tl.constexpr, CAT_U: tl.constexpr = False):
        """W_eff = (1 − s)·W + s·g ⊙ W′ on this program's columns; FROM_P: g from the norms' partial sums
        (and (g, n, ‖W′‖) stored by the first column split), else g read from VEC; PLAIN: W′ itself. CAT_U: U
        stored too, by the first column split, in OUT's columns K … K + R − 1 (``[W′ | U]``)."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        rmask = rows < M
        rr = tl.arange(0, BR)
        umask = rmask[:, None] & (rr[None, :] < R)
        u = tl.load(U + rows[:, None] * sum_ + rr[None, :] * sur, mask=umask, other=0.0)
        if CAT_U:
            if tl.program_id(1) == 0:  # a branch, not a mask: see the FROM_P branch below
                tl.store(OUT + rows[:, None] * som + (K + rr)[None, :] * sok, u.to(OUT.dtype.element_ty),
                         mask=umask)
        if PLAIN:
            g = tl.zeros((BM,), dtype=tl.float32)  # unused
        elif FROM_P:
            acc = tl.zeros((BM,), dtype=tl.float32)
            for j in range(0, NP):
                acc += tl.load(P + j * M + rows, mask=rmask, other=0.0)
            norm = tl.sqrt(acc)
            n = norm + eps
            g = tl.load(MAG + rows, mask=rmask, other=0.0).to(tl.float32) / n
            # A branch on the split rather than ``rmask & (program_id == 0)`` as a mask: Triton 3.9's
            # interpreter makes that mask int32 and refuses it (compiled by Triton 3.6 on the H100, either
            # form works: runs 45-50).
            if tl.program_id(1) == 0:
                tl.store(VEC + rows, g, mask=rmask)
                tl.store(VEC + M + rows, n, mask=rmask)
                tl.store(VEC + 2 * M + rows, norm, mask=rmask)
        else:
            g = tl.load(VEC + rows, mask=rmask, other=0.0)
        a = s * g
        kk = tl.arange(0, BK)
        k_lo = tl.program_id(1) * KS
        for k0 in range(k_lo, tl.minimum(k_lo + KS, K), BK):
            cols = k0 + kk
            wp = W + rows[:, None] * swm + cols[None, :] * swk
            wc, cmask = _w_prime(wp, D + rr[:, None] * sdr + cols[None, :] * sdk, u, rmask, rr < R, cols, K,
                                 gain, UPCAST)
            if PLAIN:
                weff = wc
            else:
                weff = a[:, None] * wc
                if s != 1.0:
                    weff += (1.0 - s) * tl.load(wp, mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            tl.store(OUT + rows[:, None] * som + cols[None, :] * sok, weff.to(OUT.dtype.element_ty),
                     mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _taps_build_kernel(W, U, D, OUT, M, K, R, G, CG, s_o, s_c, s_t, sum_, sur, sdr, sdk, gain, KS,
                           BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, UPCAST: tl.constexpr):
        """W′ = W + γ·U·kron(I_G, D) on this program's tile of a channels-last conv weight, OUT in W's strides: row
        ρ = (o, m) (out channel o, channel group m: U's row ρ) at o·s_o + m·CG·s_c, column j = (t, c) (tap t,
        channel c of the group: D's column j) at t·s_t + c·s_c — neither a single stride, hence the divisions."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        rmask = rows < M
        roff = (rows // G) * s_o + (rows % G) * (CG * s_c)
        rr = tl.arange(0, BR)
        u = tl.load(U + rows[:, None] * sum_ + rr[None, :] * sur, mask=rmask[:, None] & (rr[None, :] < R),
                    other=0.0)
        kk = tl.arange(0, BK)
        k_lo = tl.program_id(1) * KS
        for k0 in range(k_lo, tl.minimum(k_lo + KS, K), BK):
            cols = k0 + kk
            off = roff[:, None] + ((cols // CG) * s_t + (cols % CG) * s_c)[None, :]
            wc, cmask = _w_prime(W + off, D + rr[:, None] * sdr + cols[None, :] * sdk, u, rmask, rr < R, cols, K,
                                 gain, UPCAST)
            tl.store(OUT + off, wc.to(OUT.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _grad_kernel(E, W, U, D, VEC, P, NP, H, GUP, GMAG, M, K, R, sem, sek, swm, swk, sum_, sur, sdr, sdk,
                     shm, shk, gain, s, KS,
                     DETACH: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
                     UPCAST: tl.constexpr):
        """dgr = Σ of the partial ⟨E, W′⟩; the first column split stores ∂mag = s·dgr/n; every split writes
        H = γ·s·g ⊙ E − γ·s·(dgr·g/(n·‖W′‖)) ⊙ W′ on its columns and its part of ∂U = H·Dᵀ to GUP[split]."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        rmask = rows < M
        rr = tl.arange(0, BR)
        umask = rmask[:, None] & (rr[None, :] < R)
        u = tl.load(U + rows[:, None] * sum_ + rr[None, :] * sur, mask=umask, other=0.0)
        dgr = tl.zeros((BM,), dtype=tl.float32)
        for j in range(0, NP):
            dgr += tl.load(P + j * M + rows, mask=rmask, other=0.0)
        g = tl.load(VEC + rows, mask=rmask, other=0.0)
        n = tl.load(VEC + M + rows, mask=rmask, other=1.0)
        if tl.program_id(1) == 0:  # a branch, not a mask: see _build_kernel
            tl.store(GMAG + rows, (s * dgr / n).to(GMAG.dtype.element_ty), mask=rmask)
        alpha = gain * s * g
        if DETACH:
            c = tl.zeros((BM,), dtype=tl.float32)
        else:
            norm = tl.maximum(tl.load(VEC + 2 * M + rows, mask=rmask, other=1.0), 1.1754943508222875e-38)
            c = -gain * s * dgr * g / (n * norm)
        gu = tl.zeros((BM, BR), dtype=tl.float32)
        kk = tl.arange(0, BK)
        k_lo = tl.program_id(1) * KS
        for k0 in range(k_lo, tl.minimum(k_lo + KS, K), BK):
            cols = k0 + kk
            dp = D + rr[:, None] * sdr + cols[None, :] * sdk
            wc, cmask = _w_prime(W + rows[:, None] * swm + cols[None, :] * swk, dp, u, rmask, rr < R, cols, K, gain,
                                 UPCAST)
            m2 = rmask[:, None] & cmask[None, :]
            e = tl.load(E + rows[:, None] * sem + cols[None, :] * sek, mask=m2, other=0.0).to(tl.float32)
            h = (alpha[:, None] * e + c[:, None] * wc).to(H.dtype.element_ty)
            tl.store(H + rows[:, None] * shm + cols[None, :] * shk, h, mask=m2)
            d = tl.load(dp, mask=(rr[:, None] < R) & cmask[None, :], other=0.0)
            if UPCAST:
                gu += tl.dot(h.to(tl.float32), tl.trans(d.to(tl.float32)))
            else:
                gu += tl.dot(h, tl.trans(d))
        tl.store(GUP + tl.program_id(1) * M * R + rows[:, None] * R + rr[None, :], gu, mask=umask)


    @triton.jit
    def _up_add_kernel(Y, U, H, B, OUT, M, P, R, syn, sym, syp, sum_, sur, shn, shr, shp, son, som, sop, gain,
                       HAS_B: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr, BR: tl.constexpr,
                       UPCAST: tl.constexpr):
        """OUT[n] = Y[n] + γ·U·H[n] (+ b down the rows) on one (rows × positions) tile of batch member n, in fp32,
        rounded once. Y, H and OUT take any strides: a stride of 1 is specialised by Triton, so a channels-last Y
        read along its rows and an NCHW OUT written along its positions are both coalesced (the compiler moves
        the tile between the two layouts through shared memory)."""
        n = tl.program_id(2)
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BP + tl.arange(0, BP)
        rmask = rows < M
        cmask = cols < P
        m2 = rmask[:, None] & cmask[None, :]
        y = tl.load(Y + n * syn + rows[:, None] * sym + cols[None, :] * syp, mask=m2, other=0.0).to(tl.float32)
        uh = tl.zeros((BM, BP), dtype=tl.float32)
        for r0 in range(0, R, BR):  # one step up to rank BR (≤ 64), more for wider h (LoKr's grouped: 128)
            rr = r0 + tl.arange(0, BR)
            u = tl.load(U + rows[:, None] * sum_ + rr[None, :] * sur, mask=rmask[:, None] & (rr[None, :] < R),
                        other=0.0)
            h = tl.load(H + n * shn + rr[:, None] * shr + cols[None, :] * shp,
                        mask=(rr[:, None] < R) & cmask[None, :], other=0.0)
            if UPCAST:
                uh += tl.dot(u.to(tl.float32), h.to(tl.float32))
            else:
                uh += tl.dot(u, h)
        y += gain * uh
        if HAS_B:
            y += tl.load(B + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
        tl.store(OUT + n * son + rows[:, None] * som + cols[None, :] * sop, y.to(OUT.dtype.element_ty), mask=m2)

    @triton.jit
    def _tap_sum_kernel(Z, H, R, HH, WW, G, szr, shn, shr, shp, PH: tl.constexpr, PW: tl.constexpr,
                        KH: tl.constexpr, KW: tl.constexpr, BP: tl.constexpr, BR: tl.constexpr):
        """H[n, g·R + ρ, p] = Σ_taps Z[((n, p + tap offset), g), tap·R + ρ] (zero outside the image) for one block
        of BP positions of image n and channel group g: the tap sum of a conv whose per-tap products Z were one GEMM
        over the positions (× groups). Z ``(N·HH·WW·G, KH·KW·R)`` rows of stride ``szr``, fp32; the sum in fp32,
        rounded once into H."""
        n = tl.program_id(1)
        g = tl.program_id(2)
        p = tl.program_id(0) * BP + tl.arange(0, BP)
        pmask = p < HH * WW
        py = p // WW
        px = p - py * WW
        rr = tl.arange(0, BR)
        rmask = rr < R
        acc = tl.zeros((BP, BR), dtype=tl.float32)
        for t in tl.static_range(KH * KW):
            sy = py + (t // KW - PH)
            sx = px + (t % KW - PW)
            ok = pmask & (sy >= 0) & (sy < HH) & (sx >= 0) & (sx < WW)
            row = (n * HH * WW + sy * WW + sx) * G + g
            acc += tl.load(Z + row[:, None] * szr + t * R + rr[None, :], mask=ok[:, None] & rmask[None, :],
                           other=0.0).to(tl.float32)
        tl.store(H + n * shn + (g * R + rr[None, :]) * shr + p[:, None] * shp, acc.to(H.dtype.element_ty),
                 mask=pmask[:, None] & rmask[None, :])

    @triton.jit
    def _copy3_kernel(X, OUT, M, P, sxn, sxm, sxp, son, som, sop, BM: tl.constexpr, BP: tl.constexpr):
        """OUT[n] = X[n] on one (rows × positions) tile, both in any strides: a layout change (NCHW ↔ channels-last)
        read and written coalesced (a stride of 1 is specialised; the tile crosses layouts in shared memory)."""
        n = tl.program_id(2)
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BP + tl.arange(0, BP)
        m2 = (rows < M)[:, None] & (cols < P)[None, :]
        v = tl.load(X + n * sxn + rows[:, None] * sxm + cols[None, :] * sxp, mask=m2)
        tl.store(OUT + n * son + rows[:, None] * som + cols[None, :] * sop, v, mask=m2)

# Host-side helpers in plain integer math: triton.cdiv / next_power_of_2 are constexpr functions that cost a
# few µs per call from Python (13 calls per DoRA backward; cProfile on the H100 host), and eager training is
# host-bound. The launch geometry and keyword arguments are cached per shape and configuration.
_GRIDS: dict = {}
_KWARGS: dict = {}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _br(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())


_SMS: dict = {}


def sm_count(device, cpu: int = 4) -> int:
    """The multiprocessors of a CUDA ``device`` (cached per device), ``cpu`` for any other: what the kernels' launch
    geometries aim their program counts at."""
    device = torch.device(device)
    if device.type != "cuda":
        return cpu
    got = _SMS.get(device)
    if got is None:
        got = _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return got


def _grid(w2: torch.Tensor, c: dict | None = None, shape: tuple | None = None):
    """(row blocks, column splits, columns per split) for a ``(out, K)`` weight (``shape`` where w2 is not one: the
    grouped weight's rows and columns, :func:`add_lowrank_taps`) under launch configuration ``c`` (``_CFG`` by
    default)."""
    c = _CFG if c is None else c
    m, k = w2.shape if shape is None else shape
    key = (m, k, w2.device, c["BM"], c["BK"], c["programs"])
    got = _GRIDS.get(key)
    if got is not None:
        return got
    target = c["programs"]
    if target is None:
        target = 4 * sm_count(w2.device, cpu=0) or 1
    rb, nk = _cdiv(m, c["BM"]), _cdiv(k, c["BK"])
    ns = min(nk, max(1, _cdiv(target, rb)))
    ks = _cdiv(nk, ns) * c["BK"]
    got = _GRIDS[key] = (rb, _cdiv(k, ks), ks)
    return got


def _common(r: int, c: dict | None = None):
    """The launches' compile-time arguments for inner rank ``r`` under ``c`` (``_CFG`` by default; cached)."""
    c = _CFG if c is None else c
    key = (r, c["BM"], c["BK"], c["num_warps"], c["num_stages"])
    got = _KWARGS.get(key)
    if got is None:
        got = _KWARGS[key] = dict(BM=c["BM"], BK=c["BK"], BR=_br(r), UPCAST=_UPCAST,
                                  num_warps=c["num_warps"], num_stages=c["num_stages"])
    return got


def _rowdot(a, w2, up2, down2, gain, grid):
    """The partial row sums of ``a ⊙ W′`` (``a`` None: ``W′ ⊙ W′``), fp32 ``(splits, out)``."""
    rb, ns, ks = grid
    m, k = w2.shape
    p = torch.empty((ns, m), device=w2.device, dtype=torch.float32)
    src = w2 if a is None else a
    _rowdot_kernel[(rb, ns)](
        src, w2, up2, down2, p, m, k, up2.shape[1], src.stride(0), src.stride(1), w2.stride(0), w2.stride(1),
        up2.stride(0), up2.stride(1), down2.stride(0), down2.stride(1), float(gain), ks,
        SELF=a is None, **_common(up2.shape[1]))
    return p


def build(w2: torch.Tensor, up2: torch.Tensor, down2: torch.Tensor, gain: float, s: float,
          mag: torch.Tensor | None = None, vec: torch.Tensor | None = None):
    """``W_eff`` (w2's shape and dtype) of DoRA over LoRA at multiplier ``s``. With ``mag`` (the forward):
    the norms too (a first launch of partial row sums), returned as ``vec`` = fp32 ``(3, out)``: ``g``,
    ``n = ‖W′‖ + ε``, ``‖W′‖``. With ``vec`` (the backward's rebuild): ``g`` read from it, one launch.
    ``up2`` ``(out, r)`` and ``down2`` ``(r, K)`` in w2's dtype."""
    m, k = w2.shape
    grid = _grid(w2)
    out = torch.empty_like(w2)
    from_p = vec is None
    if from_p:
        p = _rowdot(None, w2, up2, down2, gain, grid)
        vec = torch.empty((3, m), device=w2.device, dtype=torch.float32)
        src = mag.reshape(-1)
    else:
        p = src = vec
    rb, ns, ks = grid
    _build_kernel[(rb, ns)](
        w2, up2, down2, src, p, p.shape[0], out, vec, m, k, up2.shape[1],
        w2.stride(0), w2.stride(1), up2.stride(0), up2.stride(1), down2.stride(0), down2.stride(1),
        out.stride(0), out.stride(1), float(gain), float(s), _EPS, ks,
        FROM_P=from_p, PLAIN=False, **_common(up2.shape[1]))
    return out, vec


def add_lowrank(w2: torch.Tensor, up2: torch.Tensor, down2: torch.Tensor, gain: float,
                with_up: bool = False) -> torch.Tensor:
    """``W + γ·U·D`` (w2's shape and dtype, accumulated in fp32 and rounded once, as ``addmm``), reading W
    once: ``up2`` ``(out, r)`` and ``down2`` ``(r, K)`` in w2's dtype. ``with_up``: ``[W + γ·U·D | U]``, a
    contiguous ``(out, K + r)`` written by the same launch — the bypass op's backward weight of a wide linear
    layer (:func:`.lowrank._w_in`), which ``torch.cat`` would copy whole once more after the merge (change 111:
    run 165's timeline has that copy at 18.8 µs per SDXL GEGLU projection)."""
    m, k = w2.shape
    r = up2.shape[1]
    rb, ns, ks = _grid(w2, _MERGE_CFG)
    out = torch.empty((m, k + r) if with_up else (m, k), device=w2.device, dtype=w2.dtype)
    _build_kernel[(rb, ns)](
        w2, up2, down2, w2, w2, 1, out, w2, m, k, r,
        w2.stride(0), w2.stride(1), up2.stride(0), up2.stride(1), down2.stride(0), down2.stride(1),
        out.stride(0), out.stride(1), float(gain), 1.0, _EPS, ks,
        FROM_P=False, PLAIN=True, CAT_U=with_up, **_common(r, _MERGE_CFG))
    return out


def add_lowrank_taps(w4: torch.Tensor, up2: torch.Tensor, dtaps: torch.Tensor, gain: float,
                     groups: int) -> torch.Tensor:
    """``W + γ·U·kron(I_groups, D)`` for a channels-last conv weight ``w4`` ``(out, in, kh, kw)`` (memory ``(out, kh,
    kw, in)``), the result channels-last too, in one pass (W read once, W′ written once, U·D accumulated in fp32 and
    rounded once, as :func:`add_lowrank`): ``up2`` ``(out·groups, r)`` (row ``o·groups + m``: U's r columns for
    channel group m), ``dtaps`` ``(r, kh·kw·in/groups)`` with its columns in (tap, channel) order — the channels-last
    memory's. LoKr's grouped down (``D = kron(I, B)``, :func:`.lowrank._merged`) on a frozen weight kept
    channels-last (:mod:`lyco.models.layout`): the NCHW form's rows ``(o, m)`` are W's own memory only in NCHW, so
    without this the weight was copied to NCHW, merged by ``addmm`` (a copy and a GEMM) and converted back by cuDNN
    inside the dgrad."""
    o, i, kh, kw = w4.shape
    cg, r = i // groups, up2.shape[1]
    if w4.stride(2) != kw * w4.stride(3) or w4.stride(1) != 1:
        raise ValueError(f"add_lowrank_taps: a channels-last (out, in, kh, kw) weight expected, strides {w4.stride()}")
    out = torch.empty_like(w4)  # preserve_format: channels-last, W's strides
    if out.stride() != w4.stride():
        raise ValueError(f"add_lowrank_taps: a dense weight expected, strides {w4.stride()}")
    m, k = o * groups, kh * kw * cg
    rb, ns, ks = _grid(w4, _MERGE_CFG, (m, k))
    _taps_build_kernel[(rb, ns)](
        w4, up2, dtaps, out, m, k, r, groups, cg, w4.stride(0), w4.stride(1), w4.stride(3),
        up2.stride(0), up2.stride(1), dtaps.stride(0), dtaps.stride(1), float(gain), ks, **_common(r, _MERGE_CFG))
    return out


#: :func:`up_add`'s tile: BM output channels × BP positions per program (``num_warps``, ``num_stages`` as Triton's)
_UP_CFG = {"BM": 64, "BP": 128, "num_warps": 4, "num_stages": 1}


def up_add(y3: torch.Tensor, up2: torch.Tensor, h3: torch.Tensor, gain: float, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """``Y[n] + γ·U·H[n] (+ b)`` for every batch member n, accumulated in fp32 and rounded once: a conv adapter's
    up (``U`` ``(out, r)``, ``H`` = h ``(N, r, P)``) added to the frozen conv's output ``Y`` ``(N, out, P)`` with the
    layer's bias in the same pass. Y and H in any strides (a channels-last conv output viewed as ``(N, out, P)``
    included); the result in ``out`` (which may be Y itself: every element is read before it is written, by the
    same program) or a new contiguous ``(N, out, P)``. All in one dtype; offsets in int32 (the caller keeps
    tensors below 2³¹ elements, :func:`up_add_ok`)."""
    n, m, p = y3.shape
    r = up2.shape[1]
    if out is None:
        out = torch.empty((n, m, p), device=y3.device, dtype=y3.dtype)
    c = _UP_CFG
    grid = (_cdiv(m, c["BM"]), _cdiv(p, c["BP"]), n)
    b = bias if bias is not None else y3
    _up_add_kernel[grid](
        y3, up2, h3, b, out, m, p, r, y3.stride(0), y3.stride(1), y3.stride(2), up2.stride(0), up2.stride(1),
        h3.stride(0), h3.stride(1), h3.stride(2), out.stride(0), out.stride(1), out.stride(2), float(gain),
        HAS_B=bias is not None, BM=c["BM"], BP=c["BP"], BR=min(_br(r), MAX_RANK), UPCAST=_UPCAST,
        num_warps=c["num_warps"], num_stages=c["num_stages"])
    return out


def up_add_ok(x: torch.Tensor, numel: int) -> bool:
    """Whether :func:`up_add` (any rank: it steps over h's channels 64 at a time) and :func:`channels_last` take a
    conv of input ``x`` and an output of at most ``numel`` elements: :func:`enabled`, the family's self-test passed
    (:func:`_checked`), and both below 2³¹ elements (the kernels' int32 offsets)."""
    return max(numel, x.numel()) < 2 ** 31 and enabled(x) and _checked(x.device, x.dtype)


#: :func:`channels_last`'s tile (rows = channels × positions)
_COPY_CFG = {"BM": 64, "BP": 64, "num_warps": 4}


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x.contiguous(memory_format=torch.channels_last)`` for an NCHW ``(N, C, H, W)`` tensor as one tiled copy
    — torch's strided copy reads one layout coalesced and scatters the other (runs 106–107: a 64×64 conv slower
    channels-last than with cuDNN's own conversions through torch's copy, faster through this one)."""
    n, c = x.shape[0], x.shape[1]
    out = torch.empty_like(x, memory_format=torch.channels_last)
    x3, o3 = x.flatten(2), out.flatten(2)
    p = x3.shape[2]
    cfg = _COPY_CFG
    bm, bp = cfg["BM"], cfg["BP"]
    if p < bp:  # a conv weight (out, in, k, k): k² positions — a tile as deep as them, as many elements as the square one
        bp = max(16, 1 << (p - 1).bit_length())
        bm = cfg["BM"] * cfg["BP"] // bp
    _copy3_kernel[(_cdiv(c, bm), _cdiv(p, bp), n)](
        x3, o3, c, p, x3.stride(0), x3.stride(1), x3.stride(2), o3.stride(0), o3.stride(1), o3.stride(2),
        BM=bm, BP=bp, num_warps=cfg["num_warps"])
    return out


#: :func:`tap_sum`'s positions per program
_TAP_BP = 128


def tap_sum(z: torch.Tensor, n: int, hh: int, ww: int, r: int, kernel: tuple, pads: tuple,
            dtype: torch.dtype, groups: int = 1) -> torch.Tensor:
    """``h`` ``(n, groups·r, hh, ww)`` (NCHW, ``dtype``) of a stride-1 conv with r outputs per channel group from its
    per-tap products ``z`` ``(n·hh·ww·groups, kh·kw·r)`` (row = (position, group), columns tap-major:
    ``z[(p, g), t·r + ρ] = Σ_c x[p, g-th channel group][c]·D[ρ, c, t]``): ``h[n, g·r + ρ, p] = Σ_t z[(p + offset_t,
    g), t·r + ρ]``, zero outside the image, summed in fp32 and rounded once (channels group-major)."""
    kh, kw = kernel
    h = torch.empty((n, groups * r, hh, ww), device=z.device, dtype=dtype)
    _tap_sum_kernel[(_cdiv(hh * ww, _TAP_BP), n, groups)](
        z, h, r, hh, ww, groups, z.stride(0), h.stride(0), h.stride(1), h.stride(3), PH=int(pads[0]), PW=int(pads[1]),
        KH=kh, KW=kw, BP=_TAP_BP, BR=max(2, 1 << (r - 1).bit_length()), num_warps=4)
    return h


def backward(e: torch.Tensor, w2: torch.Tensor, up2: torch.Tensor, down2: torch.Tensor, vec: torch.Tensor,
             gain: float, s: float, detach: bool, need_h: bool, mag_dtype: torch.dtype):
    """``(H, ∂U, ∂mag)`` from ``E = ∂L/∂W_eff`` (``(out, K)``): ``H = ∂(U·D)`` in w2's dtype (None unless
    ``need_h``), ``∂U = H·Dᵀ`` in fp32 (None unless ``need_h``), ``∂mag`` ``(out,)`` in ``mag_dtype``."""
    m, k = w2.shape
    r = up2.shape[1]
    grid = _grid(w2)
    p = _rowdot(e, w2, up2, down2, gain, grid)
    if not need_h:
        return None, None, (p.sum(0) * s / vec[1]).to(mag_dtype)
    rb, ns, ks = grid
    gmag = torch.empty(m, device=w2.device, dtype=mag_dtype)
    h = torch.empty_like(w2)
    gup = torch.empty((ns, m, r), device=w2.device, dtype=torch.float32)
    _grad_kernel[(rb, ns)](
        e, w2, up2, down2, vec, p, ns, h, gup, gmag, m, k, r,
        e.stride(0), e.stride(1), w2.stride(0), w2.stride(1), up2.stride(0), up2.stride(1),
        down2.stride(0), down2.stride(1), h.stride(0), h.stride(1), float(gain), float(s), ks,
        DETACH=detach, **_common(up2.shape[1]))
    return h, (gup[0] if ns == 1 else gup.sum(0)), gmag
