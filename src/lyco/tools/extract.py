"""``lyco extract``: an adapter from the difference of two checkpoints, ΔW = W_tuned − W_base.

Per Linear/Conv layer (module trees on the meta device, weights read one at a time):

* **LoRA / LoCon**: SVD of ΔW flattened to ``(out, in·∏k)``; ``up = U·S``, ``down = Vh``, ``alpha =
  rank`` (scale 1). The SVD is randomised by default (a Gaussian sketch of ``rank + 10`` columns and
  four power iterations, on the GPU when there is one), exact with ``exact_svd`` or whenever the
  layer is small enough for the exact one to cost nothing. With ``tucker`` a k×k conv gets a Tucker
  core (truncated HOSVD: ``lora_down`` = leading input-mode vectors, ``lora_up`` = output-mode ones,
  ``lora_mid`` = ΔW projected on both).
* **LoKr**: the nearest Kronecker product (Van Loan & Pitsianis): with LyCORIS's factorisation
  ``out = out_l·out_k``, ``in = in_m·in_n``, ΔW is rearranged into ``R[(i,j),(k,n,…)] =
  ΔW[i·out_k + k, j·in_n + n, …]`` whose best rank-1 approximation ``σ·u·vᵀ`` gives
  ``W1 = √σ·u`` (``lokr_w1``, out_l×in_m) and ``W2 = √σ·v`` (out_k×in_n×k…); W2 is then stored
  low-rank (``lokr_w2_a/b``) when the chosen rank is below half its size, as LyCORIS does.

Rank rules (one per call; ``conv_rank`` fixes the rank of k×k convs):
  ``rank N`` fixed; ``ratio R``: σ > R·σ_max; ``threshold T``: σ > T; ``quantile Q``: the count of
  leading σ whose running sum stays below Q·Σσ (LyCORIS's rule); ``energy E``: the smallest r with
  Σ_{i≤r} σ_i² ≥ E·Σσ² (keeps at least E of the layer's energy). Every rank is clamped to
  ``[1, min(out, in·∏k)]`` (and ``max_rank``). A layer whose chosen rank reaches ``full_ratio`` of
  its full rank is stored exactly as ``diff`` (LyCORIS "full") — no error, about the same size.

Layers: ``algo="lora"`` takes Linear layers and 1×1 convs (k×k convs only with ``conv_rank``),
``"locon"`` and ``"lokr"`` every Linear/Conv layer (``conv_rank=0`` leaves k×k convs out). A text
encoder whose largest |ΔW| is ≤ ``min_diff`` is treated as unchanged and left out (kohya's rule);
layers with ΔW exactly zero are left out everywhere. Biases, norm layers and embeddings are not
extracted (kohya does not either).

Each layer's relative Frobenius error ‖ΔW − ΔŴ‖/‖ΔW‖, measured on the factors as stored (after the
cast to ``dtype``), is printed and stored in the file's metadata (``lyco.errors``, JSON).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import torch

from ..adapter import TEXT_COMPONENTS, Adapter, ModuleAdapter, split_name
from ..algorithms.factorize import factorization
from ..errors import ConfigError, FamilyMismatch, ShapeMismatch, UnknownKeys
from ._common import (
    Base, check_output, dense_svd, errors_json, lowrank_error_report, parse_dtype, progress as _progress,
    rel_error, release_memory, residual_norm2, save_result, say,
)

MODES = ("rank", "ratio", "threshold", "quantile", "energy")
ALGOS = ("lora", "locon", "lokr")


# --------------------------------------------------------------------------------------
# Rank rules
# --------------------------------------------------------------------------------------


def select_rank(S: torch.Tensor, mode: str, value: float, *, total2: float | None = None) -> int:
    """The rank a rule keeps for singular values ``S`` (descending), before any clamping.

    ``total2`` is ‖ΔW‖_F² (= Σσ² over the whole spectrum) when ``S`` is only its leading part.
    """
    s = S.double().flatten()
    if mode == "rank":
        return int(value)
    if s.numel() == 0:
        return 0
    if mode == "ratio":
        return int((s > float(value) * float(s[0])).sum())
    if mode == "threshold":
        return int((s > float(value)).sum())
    if mode == "quantile":
        cs = torch.cumsum(s, 0)
        return int((cs < float(value) * float(s.sum())).sum())
    if mode == "energy":
        e = torch.cumsum(s * s, 0)
        tot = float(e[-1]) if total2 is None else float(total2)
        return int((e < float(value) * tot).sum()) + 1
    raise ConfigError(f"unknown rank rule {mode!r}; use one of {', '.join(MODES)}")


def _decided(S: torch.Tensor, k: int, mode: str, value: float, total2: float) -> tuple[bool, int]:
    """Whether the rule's rank is settled by the leading ``k`` singular values, and that rank."""
    head = S[:k]
    r = select_rank(head, mode, value, total2=total2)
    if mode in ("ratio", "threshold"):
        return r < k, r
    if mode == "energy":
        return r <= k, r
    return True, r


def _spectrum(a: torch.Tensor, mode: str, value: float, cap: int, exact: bool):
    """An SVD of ``a`` deep enough to apply the rule, and the rule's rank (unclamped)."""
    mn = min(a.shape)
    if exact or mode == "quantile":
        svd = dense_svd(a, None, exact=True)
        return svd, select_rank(svd.S, mode, value, total2=svd.total2)
    if mode == "rank":
        k = min(mn, max(1, min(int(value), cap)))
        svd = dense_svd(a, k)
        return svd, int(value)
    k = min(mn, max(16, cap if cap < mn else 16))
    while True:
        svd = dense_svd(a, k)
        if svd.complete:
            return svd, select_rank(svd.S, mode, value, total2=svd.total2)
        ok, r = _decided(svd.S, k, mode, value, svd.total2)
        if ok or r >= cap:
            return svd, r
        k = min(mn, k * 4)


# --------------------------------------------------------------------------------------
# Per-layer extraction
# --------------------------------------------------------------------------------------


@dataclass
class LayerResult:
    kind: str            # "lora", "locon-tucker", "lokr", "full"
    rank: int | None
    error: float
    tensors: dict[str, torch.Tensor]


def _cast(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    return t.to(dt).to(torch.float32)


def _full(dw: torch.Tensor, dt) -> LayerResult:
    d = dw.to(dt)
    return LayerResult("full", None, rel_error(dw, d.float()), {"diff": d.cpu()})


def _is_kxk(shape) -> bool:
    return len(shape) > 2 and any(k != 1 for k in shape[2:])


def _lora_layer(dw, shape, mode, value, cap, exact, full_ratio, tucker, dt) -> LayerResult:
    a = dw.reshape(shape[0], -1)
    if tucker and _is_kxk(shape):
        return _tucker_layer(dw, shape, mode, value, cap, exact, full_ratio, dt)
    mn = min(a.shape)
    svd, r = _spectrum(a, mode, value, min(cap, mn), exact)
    r = max(1, min(r, cap, mn))
    if r >= full_ratio * mn:
        return _full(dw, dt)
    up = svd.U[:, :r] * svd.S[:r][None, :]
    down = svd.Vh[:r]
    up_s, down_s = _cast(up, dt), _cast(down, dt)
    err = math.sqrt(residual_norm2(a, up_s, down_s) / svd.total2) if svd.total2 else 0.0
    ones = (1,) * (len(shape) - 2)
    t = {"lora_down.weight": down_s.reshape((r,) + tuple(shape[1:])).to(dt).cpu(),
         "lora_up.weight": up_s.reshape((shape[0], r) + ones).to(dt).cpu(),
         "alpha": torch.tensor(float(r))}
    return LayerResult("lora", r, err, t)


def _tucker_layer(dw, shape, mode, value, cap, exact, full_ratio, dt) -> LayerResult:
    """Truncated HOSVD over the output and input modes; the kernel modes stay in the core. The
    rank is the rule's rank on the output-mode spectrum or the input-mode one, whichever is larger
    (the core is square)."""
    out_, in_ = shape[0], shape[1]
    mn = min(out_, in_)
    cap = min(cap, mn)
    a_out = dw.reshape(out_, -1)
    a_in = dw.transpose(0, 1).reshape(in_, -1)
    svd_out, r_out = _spectrum(a_out, mode, value, cap, exact)
    svd_in, r_in = _spectrum(a_in, mode, value, cap, exact)
    r = max(1, min(max(r_out, r_in), cap))
    if r >= full_ratio * mn:
        return _full(dw, dt)
    if svd_out.U.shape[1] < r:
        svd_out = dense_svd(a_out, r, exact=exact)
    if svd_in.U.shape[1] < r:
        svd_in = dense_svd(a_in, r, exact=exact)
    u_out, u_in = svd_out.U[:, :r], svd_in.U[:, :r]
    core = torch.einsum("oi...,or,is->rs...", dw, u_out, u_in)
    ones = (1,) * (len(shape) - 2)
    up = _cast(u_out, dt)
    down = _cast(u_in.t(), dt)
    mid = _cast(core, dt)
    approx = torch.einsum("rs...,or,is->oi...", mid, up, down.t())
    t = {"lora_down.weight": down.reshape((r, in_) + ones).to(dt).cpu(),
         "lora_mid.weight": mid.to(dt).cpu(),
         "lora_up.weight": up.reshape((out_, r) + ones).to(dt).cpu(),
         "alpha": torch.tensor(float(r))}
    return LayerResult("locon-tucker", r, rel_error(dw, approx), t)


def nearest_kronecker(dw: torch.Tensor, out_split: tuple[int, int], in_split: tuple[int, int]):
    """The Kronecker pair (W1, W2) minimising ‖ΔW − kron(W1, W2)‖_F (Van Loan rearrangement).

    ``W1`` is ``(out_l, in_m)``; ``W2`` is ``(out_k, in_n, *kernel)``. Also returns ‖R‖² − σ₁², the
    squared error of the best Kronecker product."""
    out_l, out_k = out_split
    in_m, in_n = in_split
    k = tuple(dw.shape[2:])
    a = dw.reshape((out_l, out_k, in_m, in_n) + k)
    perm = (0, 2, 1, 3) + tuple(range(4, 4 + len(k)))
    r = a.permute(perm).reshape(out_l * in_m, -1)
    svd = dense_svd(r, 1)
    s = float(svd.S[0])
    root = math.sqrt(max(s, 0.0))
    w1 = (svd.U[:, 0] * root).reshape(out_l, in_m)
    w2 = (svd.Vh[0] * root).reshape((out_k, in_n) + k)
    return w1, w2, max(0.0, svd.total2 - s * s)


def _lokr_layer(dw, shape, mode, value, cap, exact, factor, dt) -> LayerResult:
    out_split = factorization(shape[0], factor)
    in_split = factorization(shape[1], factor)
    w1, w2, _ = nearest_kronecker(dw, out_split, in_split)
    out_k, in_n = out_split[1], in_split[1]
    w2f = w2.reshape(out_k, -1)
    mn = min(w2f.shape)
    svd, r = _spectrum(w2f, mode, value, min(cap, mn), exact)
    r = max(1, min(r, cap, mn))
    w1s = _cast(w1, dt)
    if r < max(out_k, in_n) / 2:
        a = _cast(svd.U[:, :r] * svd.S[:r][None, :], dt)
        b = _cast(svd.Vh[:r], dt)
        w2_hat = a @ b
        t = {"lokr_w1": w1s.to(dt).cpu(), "lokr_w2_a": a.to(dt).cpu(), "lokr_w2_b": b.to(dt).cpu(),
             "alpha": torch.tensor(float(r))}
        rank = r
    else:
        w2_hat = _cast(w2f, dt)
        t = {"lokr_w1": w1s.to(dt).cpu(), "lokr_w2": w2_hat.reshape(w2.shape).to(dt).cpu(),
             "alpha": torch.tensor(float(min(w2f.shape)))}
        rank = None
    approx = torch.kron(w1s, w2_hat).reshape(dw.shape)
    return LayerResult("lokr", rank, rel_error(dw, approx), t)


# --------------------------------------------------------------------------------------
# The verb
# --------------------------------------------------------------------------------------


@dataclass
class ExtractResult:
    adapter: Adapter
    errors: dict[str, float] = field(default_factory=dict)
    ranks: dict[str, int | None] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    output: str | None = None

    def total_error(self) -> float:
        return max(self.errors.values(), default=0.0)


def _rule(rank, ratio, quantile, threshold, energy) -> tuple[str, float]:
    given = [(m, v) for m, v in (("rank", rank), ("ratio", ratio), ("quantile", quantile),
                                 ("threshold", threshold), ("energy", energy)) if v is not None]
    if len(given) != 1:
        raise ConfigError("give exactly one rank rule: --rank N, --ratio R, --quantile Q, --threshold T "
                          f"or --energy E (got {', '.join(m for m, _ in given) or 'none'})")
    mode, value = given[0]
    if mode == "rank" and (int(value) != value or value < 1):
        raise ConfigError(f"--rank must be a positive integer, got {value}")
    if mode in ("ratio", "quantile", "energy") and not 0 < value <= 1:
        raise ConfigError(f"--{mode} must be in (0, 1], got {value}")
    if mode == "threshold" and value < 0:
        raise ConfigError(f"--threshold must be ≥ 0, got {value}")
    return mode, float(value)


def extract(base, tuned, out=None, *, algo: str = "lora", rank: int | None = None, ratio: float | None = None,
            quantile: float | None = None, threshold: float | None = None, energy: float | None = None,
            max_rank: int | None = None, conv_rank: int | None = None, tucker: bool = False,
            exact_svd: bool = False, device: str | None = None, min_diff: float = 0.01,
            full_ratio: float = 0.5, factor: int = -1, dtype="fp16", overwrite: bool = False,
            progress: bool = True, verbose: bool = True) -> ExtractResult:
    """Extract an adapter from ``tuned − base`` (diffusers folders or single files of one family).

    Returns an :class:`ExtractResult` (the :class:`~lyco.adapter.Adapter`, per-module errors, ranks
    and storage kinds); writes ``out`` when given. See the module documentation for the rules.
    """
    t0 = time.time()
    algo = algo.lower()
    if algo not in ALGOS:
        raise ConfigError(f"--algo must be one of {', '.join(ALGOS)}, got {algo!r}")
    mode, value = _rule(rank, ratio, quantile, threshold, energy)
    if conv_rank is not None and conv_rank < 0:
        raise ConfigError(f"--conv-rank must be ≥ 0, got {conv_rank}")
    if tucker and algo == "lokr":
        raise ConfigError("--tucker applies to lora/locon extraction")
    dt = parse_dtype(dtype) or torch.float32
    if out is not None:
        out = check_output(out, [base, tuned], overwrite=overwrite)
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cap_all = int(max_rank) if max_rank else 1 << 30
    res = ExtractResult(Adapter())
    with Base(base) as b, Base(tuned) as tb:
        if b.family != tb.family:
            raise FamilyMismatch(tb.family, b.family, file=str(tuned))
        layers = list(b.layers())
        todo = []
        for name, spec in layers:
            kxk = spec.is_kxk_conv
            if kxk and (conv_rank == 0 or (algo == "lora" and conv_rank is None)):
                continue
            todo.append((name, spec))
        missing = [n for n, _ in todo if not tb.has(n + ".weight")]
        if missing:
            raise UnknownKeys(missing, file=str(tuned), what="layers of the base model missing from the tuned one")
        te_max: dict[str, float] = {}
        results: dict[str, LayerResult] = {}
        with _progress(todo, desc="extract", unit="layer", enabled=progress) as bar:
            for name, spec in bar:
                wname = name + ".weight"
                shape = tuple(spec.weight_shape)
                w0 = b.read(wname)
                w1 = tb.read(wname)
                if tuple(w0.shape) != shape or tuple(w1.shape) != shape:
                    raise ShapeMismatch(name, w1.shape, w0.shape, file=str(tuned), key=wname)
                dw = w1.to(dev, torch.float32, copy=True)
                dw.sub_(w0.to(dev))
                del w0, w1
                if dw.numel():
                    lo, hi = torch.aminmax(dw)
                    mx = max(float(hi), -float(lo))
                else:
                    mx = 0.0
                comp = split_name(name)[0]
                if comp in TEXT_COMPONENTS:
                    te_max[comp] = max(te_max.get(comp, 0.0), mx)
                if mx == 0.0:
                    res.skipped[name] = "unchanged"
                    continue
                if spec.is_kxk_conv and conv_rank:
                    lmode, lval, cap = "rank", float(conv_rank), min(cap_all, int(conv_rank))
                else:
                    lmode, lval, cap = mode, value, cap_all
                    if lmode == "rank":
                        cap = min(cap, int(lval))
                if algo == "lokr":
                    r = _lokr_layer(dw, shape, lmode, lval, cap, exact_svd, factor, dt)
                else:
                    r = _lora_layer(dw, shape, lmode, lval, cap, exact_svd, full_ratio, tucker, dt)
                results[name] = r
                del dw
                release_memory()
        for comp, mx in te_max.items():
            if mx <= min_diff:
                for n in [n for n in results if split_name(n)[0] == comp]:
                    del results[n]
                    res.skipped[n] = f"text encoder unchanged (max |ΔW| {mx:.3g} ≤ {min_diff})"
                say(f"{comp}: unchanged (max |ΔW| {mx:.3g} ≤ --min-diff {min_diff}); left out", verbose)
        family = b.family
    mods = {}
    for name, r in results.items():
        algo_name = "full" if r.kind == "full" else ("lokr" if r.kind == "lokr" else "lora")
        mods[name] = ModuleAdapter(algo_name, r.tensors)
        res.errors[name] = r.error
        res.ranks[name] = r.rank
        res.kinds[name] = r.kind
    if not mods:
        raise ConfigError(f"{tuned} and {base} have no difference on the selected layers; nothing to extract")
    meta = {
        "ss_training_comment": f"extracted by lyco from {os.path.basename(str(tuned))} − "
                               f"{os.path.basename(str(base))}",
        "lyco.tool": json.dumps({"verb": "extract", "base": os.path.basename(str(base)),
                                 "tuned": os.path.basename(str(tuned)), "algo": algo, "rule": mode,
                                 "value": value, "conv_rank": conv_rank, "tucker": tucker,
                                 "exact_svd": exact_svd, "full_ratio": full_ratio, "factor": factor,
                                 "dtype": str(dt).replace("torch.", "")}),
        "lyco.errors": errors_json(res.errors),
    }
    if mode != "rank":
        meta["ss_network_dim"] = meta["ss_network_alpha"] = "Dynamic"
    res.adapter = Adapter(mods, meta, family, None)
    res.seconds = round(time.time() - t0, 3)
    if verbose:
        w = min(90, max(len(n) for n in mods))
        for n in mods:
            rk = "-" if res.ranks[n] is None else str(res.ranks[n])
            say(f"  {n:<{w}}  {res.kinds[n]:<12} rank {rk:>5}  rel.err {res.errors[n]:.3e}")
        kinds = {}
        for k in res.kinds.values():
            kinds[k] = kinds.get(k, 0) + 1
        say(f"extracted {len(mods)} module(s) ({', '.join(f'{k} ×{v}' for k, v in sorted(kinds.items()))}); "
            f"{lowrank_error_report(res.errors)}; {res.seconds:.1f} s")
    return save_result(res, out, dt, overwrite, verbose)
