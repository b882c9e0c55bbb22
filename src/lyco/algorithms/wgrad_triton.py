"""A rank-sized conv's weight gradient in one Triton launch on CUDA (:func:`conv_wgrad`):

``∂D[ρ, c, ty, tx] = Σ_{b,i,j} ∂h[b, ρ, i, j]·x[b, c, i·sy − py + ty·dy, j·sx − px + tx·dx]`` (x zero outside)

for ``h = conv2d(x, D)`` (zero padding, one group) whose output channels r are few — a conv adapter's down (LoCon's,
LoHa's Khatri–Rao down, LoKr's grouped W2 with its in_m channel groups folded into the batch). An implicit GEMM with
rows ρ (r ≤ 64), reading x and ∂h in place (any strides: NCHW, channels-last, a grouped view), in two forms:

* ``taps`` (stride 1): a program per tap and ``BN`` input channels; K runs over x's positions — an image's plane in
  ``BK`` blocks, x read contiguously —, ∂h gathered at the tap's shift with the zero padding as masks;
* ``cols`` (stride > 1): a program per ``BN`` columns ``(c, ty, tx)`` — ∂D's own order —; K runs over the output
  positions, x gathered per column with its stride and dilation. (The first form of run 286, everywhere: x gathered
  nine times over, 1.4× the torch path's time over SD1.5 b1 LoCon's downs; taps 0.6×, run 287.)

What it replaces: :func:`.lowrank._conv_wgrad_nchw`'s pad of ∂h, its shifted copies, a (batched) GEMM, the batch sum
(LoKr's grouped downs at batch 1: ``reduce_kernel`` 55× at SD1.5 b1, 0.26 ms exposed in run 262) and the tap flip
(``aten.flip.out``: two kernels) — up to six launches per layer — and cuDNN's weight gradient where that path does not
apply (stride 2: 11.5–48.7 µs a down in run 288, where the kernel took 8.8–17.5; LoKr's grouped down on the delta
path). Which shapes it takes: :func:`form`.

K is split over programs where the columns alone give too few (a 1×1 grouped down at 64×64: two column tiles, 32768
positions): each program writes its fp32 partial tile, and the last program of a tile to finish — an atomic counter
per tile — sums the partials in split order (deterministic: a captured step is bit-identical to an eager one) and
writes ∂D in its dtype. One launch, no memset: the counters live in one zeroed int32 ring per device, handed out in
turn to each launch (never to two launches in flight at once: the ring holds many steps' worth), and the last
program puts its counter back to zero.

Measured (H200, SD1.5 b1, the step as one CUDA graph; on / off / on, ``benchmarks/run_wgrad40.sh``): run 288 LoKr
25.97 / 26.14 / 25.96 ms, LoCon 23.66 / 23.84 / 23.66, LoHa 25.38 / 25.55 / 25.40; with a batch's 1×1 downs too (run
289) LoKr 25.85 / 26.15 / 25.87 (floor 19.86); with the final rule (run 290, ``run_wgrad41.sh``) LoKr 25.84 / 26.13 /
25.82 (floor 19.85), LoCon — / 23.84 / 23.60, LoHa — / 25.55 / 25.34, SD1.5 b8 LoKr 73.57 against 73.41 without and
LoCon 65.00 against 64.97; SDXL b1 (run 291) LoCon 69.51 / 69.58 / 69.56, LoKr 79.57 / 79.59 / 79.49. The trainer's
graphs equal eager (lokr, locon, loha).

Not kept: loading one or two K blocks ahead of the one being multiplied (session 41, run 293, the patch in
``benchmarks/results/run293_h200_wgrad_prefetch41/``) — SD1.5 b1 LoKr's ∂D calls alone 1004 µs as here, 1053 one
ahead, 1099 two ahead (faster only on the 40-channel 64×64 and 32×32 groups: 24.9 → 22.0, 14.6 → 11.9 µs); the
step 25.76 / 25.79 / 25.77 ms one ahead / none / one ahead.

Numerics: the products of the stored bf16/fp16 values summed in fp32 over every position and image, rounded once
(the torch path rounds each image's GEMM before its batch sum) — tests compare with float64 ``F.conv2d`` gradients.

Selected by :func:`usable`: :func:`.lowrank_triton.enabled` (Triton, CUDA bf16/fp16, ``LYCO_TRITON`` not ``0``, not
under ``torch.compile``), the shape rule (:func:`form`), ``LYCO_WGRAD_KERNEL`` (:mod:`.graph_policy`: captured steps by
default — a launch binds its arguments in Python) and this module's self-test passed on the device and dtype (once per
process). CPU tests run the kernel in Triton's interpreter (fp32 dots there: ``_UPCAST``).
"""

from __future__ import annotations

import torch

from . import graph_policy
from .lowrank_triton import _UPCAST, _br, _cdiv, enabled, gate, self_test, sm_count, triton

if triton is not None:
    import triton.language as tl

#: columns and positions per tile, warps, the programs a launch aims at per multiprocessor, the fewest K tiles a split
#: takes and the most splits (the last program of a tile sums the partials: more splits than this cost more to sum
#: than to form — run 287's first geometry let a 1×1 grouped down at 64×64 split 128 ways: 111 µs against the torch
#: path's 10). Run 287 (H200, SD1.5 b1's LoCon and LoKr ∂D calls as one graph each): BN 32 and BK 128 the best
#: of six geometries for LoKr's 40–320-channel groups (1155 against 1501 µs on the torch path), within 1 % of the
#: best for LoCon's (627 against 621 and 1037).
_CFG = dict(BN=32, BK=128, num_warps=4, per_sm=2, min_k_tiles=2, max_splits=16)
MAX_RANK = 64
#: counters in the ring (int32): a launch takes one per column tile
_RING = 1 << 16

_CHECKED: dict = {}
_RINGS: dict = {}   # device → [counters tensor, next free index]


def wanted() -> bool:
    """``LYCO_WGRAD_KERNEL`` (``graph`` when unset; :mod:`.graph_policy`)."""
    return graph_policy.wanted("LYCO_WGRAD_KERNEL")


def max_work() -> float:
    """The most ``channels × output positions × taps`` (the batch's) the kernel takes, ``LYCO_WGRAD_MAX_WORK``
    (:func:`form`)."""
    c = graph_policy.env_factor("LYCO_WGRAD_MAX_WORK", "the largest ∂D the conv weight-gradient kernel takes")
    return 2.0e7 if c is None else c


#: the most positions one program of a launch sums (the batch's positions over the splits :func:`_geometry` gives):
#: just above the most the kernel won with in run 288 (LoKr's 40-channel groups at 64×64: 3×3 2304, 24.6 against 35.6
#: µs; 1×1 2048, 8.9 against 10.4). Run 289 (SD1.5 b8, before this bound) measured LoKr's step at 74.00 ms with the
#: kernel against 73.34 without. Its b8 calls were not recorded; by inference from the b1 shapes with 8× the batch
#: they sum up to 4480 positions per program (the 32×32 level's 1×1 and 40-channel 3×3 downs of 64 images × groups:
#: 4096, 4480; the 16×16 level's 3×3: 2816), which this bound leaves to the torch path. With it (run 290): LoKr
#: 73.57 against 73.41 (+0.16 ms, from +0.66), LoCon 65.00 against 64.97.
MAX_POSITIONS = 2560


def form(x_shape, r: int, kernel, stride=1, padding=0, dilation=1, device=None) -> str | None:
    """Which of the kernel's two forms pays for ∂D of a down on an input of ``x_shape`` with ``r`` output channels,
    or None where the torch path is as fast (``device``: its multiprocessors set the launch's splits). Run 288 (H200,
    SD1.5 b1, every LoCon and LoKr ∂D shape alone as graphs, kernel against torch path, µs):

    * a 1×1 down of one image: None — the torch path is one GEMM (3.4–6.4 against 3.7–7.4: a tie); of a batch
      (LoKr's groups at batch 1) the torch path is a batched GEMM and its batch sum — the ``reduce_kernel`` launches
      run 262 found exposed — where the kernel is one launch (5.8–8.9 against 5.9–10.4), up to a quarter of
      ``max_work()``: its few column tiles leave the positions to the splits;
    * a k×k down past ``max_work()`` (2.0·10⁷ by default, set after run 289): None — at 64×64 the kernel loses at 960
      and 640 channels (28.5 / 19.3, 20.3 / 18.5: 3.5 and 2.4·10⁷); it wins at 320 (15.5 / 18.4: 1.2·10⁷), at 1920 on
      32×32 (14.0 / 15.5: 1.8·10⁷) and on LoKr's 40-channel groups × 8 at 64×64 (24.6 / 35.6: 1.2·10⁷);
    * a program of the launch summing more than ``MAX_POSITIONS`` positions: None;
    * stride > 1: ``"cols"`` — the torch path is cuDNN's weight gradient there (LoCon's 10.1 / 24.1 and 8.8 / 30.9,
      LoKr's 10.8 / 48.7; the 64×64 level's 17.2 / 15.9 the one loss);
    * else ``"taps"``: LoCon's 32×32 and smaller levels 4.7–14.0 against 13.8–15.6."""
    kh, kw = _pair(kernel)
    if r > MAX_RANK or isinstance(padding, str):
        return None
    (sy, sx), (py, px), (dy, dx) = _pair(stride), _pair(padding), _pair(dilation)
    n, c, hh, ww = x_shape
    ho = (hh + 2 * py - dy * (kh - 1) - 1) // sy + 1
    wo = (ww + 2 * px - dx * (kw - 1) - 1) // sx + 1
    work = c * n * ho * wo * kh * kw
    if kh * kw == 1 and (n == 1 or 4 * work > max_work()):
        return None
    if work > max_work():
        return None
    taps = (sy, sx) == (1, 1)
    if _geometry(taps, n, c, hh * ww, ho * wo, kh * kw, device, _CFG)[2] > MAX_POSITIONS:
        return None
    return "taps" if taps else "cols"


def supports(x: torch.Tensor, gh: torch.Tensor, kernel: tuple, padding) -> bool:
    """Shapes the kernel takes: 4-D x and ∂h of one dtype (any strides: NCHW, channels-last, a view), at most
    ``MAX_RANK`` output channels, a 2-D kernel, numeric padding."""
    return (x.dim() == 4 and gh.dim() == 4 and len(kernel) == 2 and not isinstance(padding, str)
            and x.shape[0] == gh.shape[0] and 1 <= gh.shape[1] <= MAX_RANK and x.dtype == gh.dtype)


def usable(x: torch.Tensor, gh: torch.Tensor, kernel: tuple, stride, padding, dilation) -> str | None:
    """The form :func:`conv_wgrad` takes here (:func:`form`), or None where it does not run (module doc)."""
    if not (supports(x, gh, kernel, padding) and enabled(x) and wanted()):
        return None
    f = form(x.shape, gh.shape[1], kernel, stride, padding, dilation, x.device)
    return f if f is not None and gate(_CHECKED, x.device, x.dtype, _self_test) else None


def likely(x: torch.Tensor, r: int, kernel: tuple, stride, padding, dilation, dtype: torch.dtype) -> bool:
    """Whether :func:`usable` will hold in the backward of a down on ``x`` with ``r`` output channels computed in
    ``dtype`` (what the forward knows: not ∂h's strides, which the kernel takes as they come)."""
    return (x.dim() == 4 and len(kernel) == 2
            and form(x.shape, r, kernel, stride, padding, dilation, x.device) is not None
            and enabled(x, dtype) and wanted() and gate(_CHECKED, x.device, dtype, _self_test))


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _counters(device, n: int) -> torch.Tensor:
    """``n`` zeroed counters from the device's ring (module doc)."""
    ring = _RINGS.get(device)
    if ring is None:
        ring = _RINGS[device] = [torch.zeros(_RING, dtype=torch.int32, device=device), 0]
    if ring[1] + n > _RING:
        ring[1] = 0
    start = ring[1]
    ring[1] += n
    return ring[0][start:start + n]


def _scratch(splits: int, r: int, cols: int, tiles: int, device, out: torch.Tensor):
    """The fp32 partials and the tiles' counters of a launch split ``splits`` ways (``out`` for both where it is not
    split: never read)."""
    if splits == 1:
        return out, out
    return torch.empty((splits, r, cols), dtype=torch.float32, device=device), _counters(device, tiles)


def _splits(tiles: int, k: int, device, cfg: dict) -> tuple[int, int]:
    """(splits, positions per split) for ``tiles`` column tiles over K = ``k`` positions."""
    sms = 132 if device is None else sm_count(device)  # no device (a rule asked about a shape): an H100's or H200's
    nk = _cdiv(k, cfg["BK"])
    want = max(1, _cdiv(cfg["per_sm"] * sms, tiles))
    splits = max(1, min(want, nk // cfg["min_k_tiles"], cfg["max_splits"]))
    per = _cdiv(nk, splits) * cfg["BK"]
    return _cdiv(k, per), per


def _geometry(taps: bool, n: int, c: int, plane: int, out_plane: int, kk: int, device, cfg: dict):
    """(column tiles, splits, positions per split) of a launch: the taps form — a program per tap and ``BN`` channels, K
    the batch's input positions in ``BK`` blocks per image (a block never spans two) —, else the cols form — a program per
    ``BN`` (channel, tap) columns, K the batch's output positions."""
    if taps:
        tiles, k = _cdiv(c, cfg["BN"]) * kk, n * _cdiv(plane, cfg["BK"]) * cfg["BK"]
    else:
        tiles, k = _cdiv(c * kk, cfg["BN"]), n * out_plane
    splits, per = _splits(tiles, k, device, cfg)
    return tiles, splits, per


def conv_wgrad(x: torch.Tensor, gh: torch.Tensor, kernel, stride=1, padding=0, dilation=1,
               dtype: torch.dtype | None = None, scale: float = 1.0, cfg: dict | None = None,
               form: str | None = None) -> torch.Tensor:
    """``scale``·∂D ``(r, c, kh, kw)`` of ``h = conv2d(x, D, stride, padding, dilation)`` for ``∂h`` (module doc),
    written in ``dtype`` (∂h's when None). ``x`` ``(n, c, H, W)``, ``gh`` ``(n, r, Ho, Wo)``, any strides. ``form``:
    ``"taps"`` or ``"cols"`` (:func:`form`; where None, ``cfg``'s, else the rule's, else taps for stride 1)."""
    cfg = _CFG if cfg is None else cfg
    n, c, hh, ww = x.shape
    r, ho, wo = gh.shape[1], gh.shape[2], gh.shape[3]
    (kh, kw), (sy, sx), (py, px), (dy, dx) = _pair(kernel), _pair(stride), _pair(padding), _pair(dilation)
    cols, k = c * kh * kw, n * ho * wo
    out = torch.empty((r, c, kh, kw), dtype=dtype or gh.dtype, device=gh.device)
    bn, bk = cfg["BN"], cfg["BK"]
    form = form or cfg.get("form") or ("taps" if _pair(stride) == (1, 1) else "cols")
    tiles, splits, per = _geometry(form == "taps", n, c, hh * ww, ho * wo, kh * kw, x.device, cfg)
    part, cnt = _scratch(splits, r, cols, tiles, gh.device, out)
    if form == "taps":
        kk = kh * kw
        qb = _cdiv(hh * ww, bk)
        nb = n * qb
        per //= bk
        flat_x = x.stride(2) == ww and x.stride(3) == 1
        flat_g = (kk == 1 and (sy, sx, py, px) == (1, 1, 0, 0) and (ho, wo) == (hh, ww)
                  and gh.stride(2) == wo and gh.stride(3) == 1)
        _wgrad_tap_kernel[(tiles, splits)](
            x, gh, out, part, cnt, r, c, hh, ww, ho, wo, qb, nb, per, float(scale), *x.stride(), *gh.stride(),
            splits, KH=kh, KW=kw, SY=sy, SX=sx, PY=py, PX=px, DY=dy, DX=dx, FLAT_X=flat_x, FLAT_G=flat_g,
            SPLIT=splits > 1, BM=_br(r), BN=bn, BK=bk, UPCAST=_UPCAST, num_warps=cfg["num_warps"])
        return out
    _wgrad_kernel[(tiles, splits)](
        x, gh, out, part, cnt, r, hh, ww, ho * wo, wo, cols, k, per, float(scale), *x.stride(), *gh.stride(),
        KH=kh, KW=kw, SY=sy, SX=sx, PY=py, PX=px, DY=dy, DX=dx, SPLITS=splits, SPLIT=splits > 1,
        BM=_br(r), BN=bn, BK=bk, UPCAST=_UPCAST, num_warps=cfg["num_warps"])
    return out


def conv_wgrad_torch(x: torch.Tensor, gh: torch.Tensor, kernel, stride=1, padding=0, dilation=1,
                     dtype: torch.dtype | None = None, scale: float = 1.0) -> torch.Tensor:
    """The same gradient by torch (autograd's conv weight gradient in x's dtype): the self-test's reference."""
    kh, kw = _pair(kernel)
    w = torch.zeros((gh.shape[1], x.shape[1], kh, kw), dtype=x.dtype, device=x.device)
    g = torch.ops.aten.convolution_backward(gh, x, w, None, _pair(stride), _pair(padding), _pair(dilation),
                                            False, [0, 0], 1, [False, True, False])[1]
    return (g.float() * scale).to(dtype or gh.dtype)


def _self_test(device, dtype) -> bool:
    return self_test(device, dtype, _compare, "the conv weight-gradient Triton kernel")


def _compare(device, dtype) -> str | None:
    """A 3×3 down (padding 1, K split over programs and tiles), a stride-2 one and a 1×1 grouped-batch one, against
    torch's in fp32."""
    g = torch.Generator(device="cpu").manual_seed(0)
    cases = (((2, 24, 37, 29), 8, 3, 1, 1, 1), ((3, 16, 20, 18), 16, 3, 2, 1, 1), ((16, 40, 64, 64), 16, 1, 1, 0, 1),
             ((1, 20, 13, 11), 4, 3, 1, 2, 2))
    for shape, r, k, s, p, d in cases:
        x = torch.randn(shape, generator=g).to(device, dtype)
        ho = (shape[2] + 2 * p - d * (k - 1) - 1) // s + 1
        wo = (shape[3] + 2 * p - d * (k - 1) - 1) // s + 1
        gh = torch.randn((shape[0], r, ho, wo), generator=g).to(device, dtype)
        got = conv_wgrad(x, gh, k, s, p, d, torch.float32)
        want = conv_wgrad_torch(x.float(), gh.float(), k, s, p, d, torch.float32)
        err = ((got - want).abs().max() / want.abs().max()).item()
        if not err <= 1e-2:
            return f"its relative error is {err:.2e} for x {tuple(shape)}, r {r}, k {k}, stride {s}"
    return None


if triton is not None:

    @triton.jit
    def _finish(acc, OUT, PART, CNT, split, SPLITS, PSTRIDE, offs, omask, scale, SPLIT: tl.constexpr):
        """``acc`` (this program's K range) into ∂D: stored, scaled, where K is not split; else stored as this split's
        fp32 partial, and the last split of the tile to arrive (its counter ``CNT``) sums every partial in split
        order — four loads in flight at a time — writes ∂D and puts the counter back to zero."""
        if not SPLIT:
            tl.store(OUT + offs, (acc * scale).to(OUT.dtype.element_ty), mask=omask)
        else:
            tl.store(PART + split * PSTRIDE + offs, acc, mask=omask)
            tl.debug_barrier()   # every thread's partial stored before the counter's release
            done = tl.atomic_add(CNT, 1, sem="acq_rel", scope="gpu")
            if done == SPLITS - 1:
                tot = tl.zeros(acc.shape, dtype=tl.float32)
                zero = offs * 0   # the splits' bounds as tensors of the tile's shape (masks must be tensors)
                for s in range(0, SPLITS, 4):
                    p0 = tl.load(PART + s * PSTRIDE + offs, mask=omask, other=0.0, cache_modifier=".cg")
                    p1 = tl.load(PART + (s + 1) * PSTRIDE + offs, mask=omask & (zero + s + 1 < SPLITS), other=0.0,
                                 cache_modifier=".cg")
                    p2 = tl.load(PART + (s + 2) * PSTRIDE + offs, mask=omask & (zero + s + 2 < SPLITS), other=0.0,
                                 cache_modifier=".cg")
                    p3 = tl.load(PART + (s + 3) * PSTRIDE + offs, mask=omask & (zero + s + 3 < SPLITS), other=0.0,
                                 cache_modifier=".cg")
                    tot += (p0 + p1) + (p2 + p3)
                tl.store(OUT + offs, (tot * scale).to(OUT.dtype.element_ty), mask=omask)
                tl.atomic_xchg(CNT, 0, sem="relaxed", scope="gpu")

    @triton.jit
    def _wgrad_kernel(X, G, OUT, PART, CNT, R, H, W, P, WO, NCOL, K, PER, scale, sxb, sxc, sxh, sxw,
                      sgb, sgc, sgh, sgw,
                      KH: tl.constexpr, KW: tl.constexpr, SY: tl.constexpr, SX: tl.constexpr, PY: tl.constexpr,
                      PX: tl.constexpr, DY: tl.constexpr, DX: tl.constexpr, SPLITS, SPLIT: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr):
        tile = tl.program_id(0)
        split = tl.program_id(1)
        rows = tl.arange(0, BM)
        rmask = rows < R
        cols = tile * BN + tl.arange(0, BN)
        nmask = cols < NCOL
        # a column is (c, ty, tx): its channel's plane offset and its tap's shift, once per program
        ch = cols // (KH * KW)
        tap = cols % (KH * KW)
        oy = (tap // KW) * DY - PY
        ox = (tap % KW) * DX - PX
        xcol = ch * sxc
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        k_lo = split * PER
        k_hi = tl.minimum(k_lo + PER, K)
        for k0 in range(k_lo, k_hi, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < k_hi
            b = ks // P
            q = ks % P
            i = q // WO
            j = q % WO
            gv = tl.load(G + (b * sgb + i * sgh + j * sgw)[None, :] + (rows * sgc)[:, None],
                         mask=rmask[:, None] & kmask[None, :], other=0.0)
            y = (i * SY)[:, None] + oy[None, :]
            xx = (j * SX)[:, None] + ox[None, :]
            inside = (y >= 0) & (y < H) & (xx >= 0) & (xx < W) & kmask[:, None] & nmask[None, :]
            xv = tl.load(X + (b * sxb)[:, None] + xcol[None, :] + y * sxh + xx * sxw, mask=inside, other=0.0)
            if UPCAST:
                acc += tl.dot(gv.to(tl.float32), xv.to(tl.float32))
            else:
                acc += tl.dot(gv, xv)
        _finish(acc, OUT, PART, CNT + tile, split, SPLITS, R * NCOL, rows[:, None] * NCOL + cols[None, :],
                 rmask[:, None] & nmask[None, :], scale, SPLIT)

    @triton.jit
    def _wgrad_tap_kernel(X, G, OUT, PART, CNT, R, C, H, W, HO, WO, QB, NB, PER, scale, sxb, sxc, sxh, sxw,
                          sgb, sgc, sgh, sgw, SPLITS, KH: tl.constexpr, KW: tl.constexpr, SY: tl.constexpr,
                          SX: tl.constexpr, PY: tl.constexpr, PX: tl.constexpr, DY: tl.constexpr, DX: tl.constexpr,
                          FLAT_X: tl.constexpr, FLAT_G: tl.constexpr, SPLIT: tl.constexpr, BM: tl.constexpr,
                          BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr):
        """One tap and BN channels per program: K runs over x's positions (an image's plane in BK blocks, x read in
        place, contiguous along K where FLAT_X), ∂h gathered at the tap's shift."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        tap = pid % (KH * KW)
        ty = tap // KW
        tx = tap % KW
        rows = tl.arange(0, BM)
        rmask = rows < R
        ch = (pid // (KH * KW)) * BN + tl.arange(0, BN)
        cmask = ch < C
        kk = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        lo = split * PER
        hi = tl.minimum(lo + PER, NB)
        for blk in range(lo, hi):
            b = blk // QB
            q = (blk % QB) * BK + kk
            qmask = q < H * W
            y = q // W
            xx = q % W
            if FLAT_X:
                xoff = b * sxb + q
            else:
                xoff = b * sxb + y * sxh + xx * sxw
            xv = tl.load(X + xoff[:, None] + (ch * sxc)[None, :], mask=qmask[:, None] & cmask[None, :], other=0.0)
            if FLAT_G:
                goff = b * sgb + q
                ok = qmask
            else:
                iy = y + PY - ty * DY
                ix = xx + PX - tx * DX
                i = iy // SY
                j = ix // SX
                ok = qmask & (iy >= 0) & (ix >= 0) & (i < HO) & (j < WO)
                if SY > 1:
                    ok = ok & (iy % SY == 0)
                if SX > 1:
                    ok = ok & (ix % SX == 0)
                goff = b * sgb + i * sgh + j * sgw
            gv = tl.load(G + goff[None, :] + (rows * sgc)[:, None], mask=rmask[:, None] & ok[None, :], other=0.0)
            if UPCAST:
                acc += tl.dot(gv.to(tl.float32), xv.to(tl.float32))
            else:
                acc += tl.dot(gv, xv)
        _finish(acc, OUT, PART, CNT + pid, split, SPLITS, R * C * KH * KW,
                rows[:, None] * (C * KH * KW) + (ch * (KH * KW) + tap)[None, :], rmask[:, None] & cmask[None, :],
                scale, SPLIT)
