"""The layer host's fused fast paths (``forward_accumulate``) against the plain bypass sum.

The fast paths fold the scale (γ·multiplier) into the last product and fuse the add into it (in
place when the host owns the base output), keep device scalars out of the forward (no ``float()``
of a tensor per call) and cache the active-adapter list. They must compute the same function, with
the same gradients, as ``y + Σ m·Δy`` built from ``delta_output``.
"""

import contextlib
import copy
import math

import pytest
import torch
import torch.nn as nn

import lyco
from lyco import layer as layer_mod


class Net(nn.Module):
    """Every layer kind the fast paths special-case, with and without bias."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.conv1x1 = nn.Conv2d(8, 8, 1, bias=False)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.lin = nn.Linear(8, 16)
        self.lin_nb = nn.Linear(16, 8, bias=False)
        self.lin2d = nn.Linear(8, 8)

    def forward(self, img, tok):
        h = self.conv1x1(torch.relu(self.conv(img)))              # (N, 8, 3, 3)
        n, c = h.shape[:2]
        h = self.conv1d(h.reshape(n, c, -1))                        # (N, 8, 9)
        t = tok + h.mean(-1)[:, None, :]                            # (N, T, 8) 3-D linear input
        t = self.lin_nb(torch.relu(self.lin(t)))
        return t.sum(1) + self.lin2d(t.mean(1))                     # 2-D linear input


CONFIGS = {
    "lora": dict(algo="lora", rank=3, alpha=2.0),
    "lora-scalar": dict(algo="lora", rank=3, alpha=2.0, use_scalar=True),
    "locon-tucker": dict(algo="lora", rank=3, alpha=2.0, use_tucker=True),
    "dora": dict(algo="lora", rank=3, alpha=2.0, dora=True),
    "dora-in": dict(algo="lora", rank=3, alpha=2.0, dora=True, dora_axis="in"),
    "loha": dict(algo="loha", rank=2, alpha=1.0),
    "loha-dora": dict(algo="loha", rank=2, alpha=1.0, dora=True),
    "lokr": dict(algo="lokr", rank=2, alpha=1.0, factor=2),
    "lokr-full": dict(algo="lokr", rank=2, factor=2, full_matrix=True),
    "ia3": dict(algo="ia3"),
    "glora": dict(algo="glora", rank=2, alpha=1.0),
    "full": dict(algo="full"),
    "diag-oft": dict(algo="diag-oft", rank=4),
    "diag-oft-constrained": dict(algo="diag-oft", rank=4, constraint=1e-3),
    "boft": dict(algo="boft", rank=2),
    "boft-constrained": dict(algo="boft", rank=2, constraint=1e-3),
    "boft-rescaled": dict(algo="boft", rank=2, rescaled=True),  # (rebuilt op through autograd)
}


def _inputs(dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 6, 6, generator=g).to(dtype), torch.randn(2, 5, 8, generator=g).to(dtype))


def _make(cfg, dtype=torch.float64, seed=0, model=None):
    torch.manual_seed(seed)
    model = model if model is not None else Net().to(dtype)
    net = lyco.create(model, preset="full", seed=seed, **cfg)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_((0.2 * torch.randn(p.shape, generator=g)).to(p.dtype))
    return model, net


def _reference_accumulate(self, acc, x, weight, bias, base_out, inplace=False):
    """The plain path: acc + m·Δy from delta_output, never fused, never in place."""
    d = self.delta_output(x, weight, bias, base_out)
    return acc if d is None else acc + d.to(acc.dtype)


def _run(model, net, inputs, reference=False, monkeypatch=None, mode=None):
    """One forward + backward. ``reference``: the plain bypass sum (every layer forced to the bypass,
    whatever ``mode = "auto"`` would pick). ``mode``: force this mode on every layer."""
    if reference:
        monkeypatch.setattr(layer_mod.AdapterLayer, "accumulate", _reference_accumulate)
        mode = "bypass"
    modes = {layer: layer.mode for layer in net.layers.values()}
    if mode is not None:
        for layer in modes:
            layer.mode = mode
    img, tok = (t.clone().requires_grad_(True) for t in inputs)
    out = model(img, tok)
    (out.square().sum() + out.sum()).backward()
    grads = [p.grad.clone() for p in net.trainable_parameters()]
    for p in net.trainable_parameters():
        p.grad = None
    if reference:
        monkeypatch.undo()
    for layer, m in modes.items():
        layer.mode = m
    return out.detach(), img.grad, tok.grad, grads


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("multiplier", [1.0, 0.7])
@pytest.mark.parametrize("mode", ["auto", "bypass"])
def test_fast_path_equals_plain_sum(name, multiplier, mode, monkeypatch):
    """What ``mode = "auto"`` runs, and the fused delta path (``"bypass"``: for the algorithms that auto
    rebuilds — Full, DoRA, (IA)³, GLoRA, LoKr, OFT, BOFT — the path auto no longer takes) against the
    plain ``y + Σ m·Δy`` in float64."""
    model, net = _make(CONFIGS[name])
    net.set_multiplier(multiplier)
    inputs = _inputs()
    fast = _run(model, net, inputs, mode=None if mode == "auto" else mode)
    ref = _run(model, net, inputs, reference=True, monkeypatch=monkeypatch)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast[1], ref[1], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(fast[2], ref[2], rtol=1e-9, atol=1e-10)
    assert len(fast[3]) == len(ref[3]) > 0
    for a, b in zip(fast[3], ref[3]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def _stand_in_side_stream(monkeypatch) -> list:
    """A stand-in side stream on the CPU (lowrank.side_stream returns it; lowrank's forks and joins on it run in place)
    with ``LYCO_REBUILD_STREAMS`` on: the rebuilt op's own backward takes its side-stream form. Returns the list
    a rebuilt op's backward appends to each time it takes the stream (rebuild._side)."""
    from lyco.algorithms import lowrank, rebuild
    fake, taken = object(), []
    fork, join, side = lowrank._fork, lowrank._join, rebuild._side
    monkeypatch.setenv("LYCO_REBUILD_STREAMS", "1")
    monkeypatch.setattr(lowrank, "side_stream", lambda t: fake)
    monkeypatch.setattr(lowrank, "_fork", lambda s, *a: fork(None if s is fake else s, *a))
    monkeypatch.setattr(lowrank, "_join", lambda s: join(None if s is fake else s))
    monkeypatch.setattr(rebuild, "_side", lambda gy: (lambda s: taken.append(s) or s)(side(gy)))
    return taken


@pytest.mark.parametrize("raw,want", [("1", True), ("0", False), ("graph", False), (None, False)])
def test_rebuilt_op_side_region_sm_target_switch(raw, want, monkeypatch):
    """``LYCO_REBUILD_SIDE_SMS``: whether the rebuilt op's side region asks for the side streams' SM target
    (``lowrank._fork``'s ``sms``) — ``1`` yes, ``0`` (the default since change 176) no, ``graph`` only inside a graph
    step (none here); every fork of the step gets the same answer and the gradients stay the plain sum's."""
    from lyco.algorithms import lowrank
    if raw is None:
        monkeypatch.delenv("LYCO_REBUILD_SIDE_SMS", raising=False)
    else:
        monkeypatch.setenv("LYCO_REBUILD_SIDE_SMS", raw)
    forks = _stand_in_side_stream(monkeypatch)
    asked, fork = [], lowrank._fork
    monkeypatch.setattr(lowrank, "_fork", lambda s, sms=True: asked.append(sms) or fork(s, sms))
    model, net = _make(CONFIGS["lokr-full"])
    fast = _run(model, net, _inputs(), mode="rebuild")
    assert forks and asked == [want] * len(forks), (forks, asked)
    ref = _run(model, net, _inputs(), reference=True, monkeypatch=monkeypatch)
    for a, b in zip(fast[1:3] + tuple(fast[3]), ref[1:3] + tuple(ref[3])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_rebuilt_op_side_region_defaults_in_a_graph_step(monkeypatch):
    """Unset, inside a graph step: the rebuilt op's side region leaves out the side streams' SM target and forks
    before the rebuild of W′ (change 176, from runs 329–330); outside one, neither switch asks for anything."""
    from lyco.algorithms import graph_policy, rebuild
    for var in ("LYCO_REBUILD_SIDE_SMS", "LYCO_REBUILD_EARLY_FORK"):
        monkeypatch.delenv(var, raising=False)
    assert (rebuild._side_sms(), rebuild._early_fork()) == (False, False)
    with graph_policy.graph_step():
        assert (rebuild._side_sms(), rebuild._early_fork()) == (False, True)


def _forks_in_order(monkeypatch) -> list:
    """A list that gets "fork" each time a side region is forked (``lowrank._fork``, after
    :func:`_stand_in_side_stream`), for the tests to put other calls in order with it."""
    from lyco.algorithms import lowrank
    order, fork = [], lowrank._fork

    @contextlib.contextmanager
    def spy_fork(s, sms=True):
        order.append("fork")
        with fork(s, sms):
            yield

    monkeypatch.setattr(lowrank, "_fork", spy_fork)
    return order


@pytest.mark.parametrize("name", ["lokr", "lokr-full", "dora"])
@pytest.mark.parametrize("early", ["1", "0"])
@pytest.mark.parametrize("direct", [False, True])
def test_rebuilt_op_early_fork(name, early, direct, monkeypatch):
    """``LYCO_REBUILD_EARLY_FORK``: LoKr's side region (its ``vjp`` reads no ``aux``; the direct form neither) forked
    before the rebuild of W′ — the order of the calls says so — with the plain sum's outputs and gradients; a build
    whose ``vjp`` reads ``aux`` (DoRA's, on the side stream here for the test) keeps the rebuild first."""
    from lyco.algorithms import lokr as lokr_mod, rebuild
    monkeypatch.setenv("LYCO_REBUILD_EARLY_FORK", early)
    monkeypatch.setattr(lokr_mod._KronBuild, "DIRECT_ROWS", math.inf if direct else 0.0)
    monkeypatch.setattr(rebuild, "_side_wanted", lambda build: True)
    forks = _stand_in_side_stream(monkeypatch)
    order = _forks_in_order(monkeypatch)
    from lyco.algorithms import dora as dora_mod
    cls = dora_mod._LoraDoraBuild if name == "dora" else lokr_mod._KronBuild
    rec = cls.recompute
    monkeypatch.setattr(cls, "recompute", lambda self, *a: order.append("rebuild") or rec(self, *a))
    model, net = _make(CONFIGS[name])
    fast = _run(model, net, _inputs(), mode="rebuild")
    assert forks and order.count("fork") == len(forks) and order.count("rebuild") == len(forks), order
    first = order[::2]  # each backward: its two calls in a row
    early_wanted = early == "1" and name != "dora"
    assert first == (["fork"] if early_wanted else ["rebuild"]) * len(forks), order
    ref = _run(model, net, _inputs(), reference=True, monkeypatch=monkeypatch)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-10, atol=1e-10)
    for a, b in zip(fast[1:3] + tuple(fast[3]), ref[1:3] + tuple(ref[3])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_rebuilt_op_early_fork_not_on_a_channels_last_weight(monkeypatch):
    """Change 175 leaves a channels-last frozen conv weight's rebuilt op as it was (rebuild, then fork): the frozen W
    would stand in for W′ with its layout. The other layers fork first; the gradients stay the plain sum's."""
    from lyco.algorithms import lokr as lokr_mod
    monkeypatch.setenv("LYCO_REBUILD_EARLY_FORK", "1")
    forks = _stand_in_side_stream(monkeypatch)
    order, rec = _forks_in_order(monkeypatch), lokr_mod._KronBuild.recompute
    monkeypatch.setattr(lokr_mod._KronBuild, "recompute",
                        lambda self, keep, w, *a: order.append("cl" if not w.is_contiguous() else "rebuild")
                        or rec(self, keep, w, *a))
    model = Net().double()
    with torch.no_grad():
        model.conv.weight.data = model.conv.weight.contiguous(memory_format=torch.channels_last)
    model, net = _make(CONFIGS["lokr-full"], model=model)
    fast = _run(model, net, _inputs(), mode="rebuild")
    pairs = [tuple(order[i:i + 2]) for i in range(0, len(order), 2)]
    assert ("cl", "fork") in pairs and ("fork", "rebuild") in pairs, pairs
    assert all(p in (("cl", "fork"), ("fork", "rebuild")) for p in pairs) and len(pairs) == len(forks), pairs
    ref = _run(model, net, _inputs(), reference=True, monkeypatch=monkeypatch)
    for a, b in zip(fast[1:3] + tuple(fast[3]), ref[1:3] + tuple(ref[3])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["lokr-full", "dora"])
@pytest.mark.parametrize("most", [0, 64, 10 ** 9])
@pytest.mark.parametrize("streams", ["off", "default"])
def test_rebuilt_op_keeps_small_w(name, most, streams, monkeypatch):
    """``LYCO_REBUILD_KEEP_W`` (change 185): LoKr's backward takes the forward's W′ on the layers of at most that many
    elements instead of rebuilding it — a spy on the build's ``recompute`` (the backward's rebuild only) sees exactly
    the larger layers —, on the plain and the side-stream (early fork) forms, with the plain sum's outputs and
    gradients; DoRA's build (its ``vjp`` reads the rebuild's ``aux``) never keeps."""
    from lyco.algorithms import dora as dora_mod, lokr as lokr_mod, rebuild
    monkeypatch.setattr(rebuild, "_KEEP_W", most)
    if streams == "default":
        _stand_in_side_stream(monkeypatch)
    cls = dora_mod._LoraDoraBuild if name == "dora" else lokr_mod._KronBuild
    rebuilt, rec = [], cls.recompute
    monkeypatch.setattr(cls, "recompute", lambda self, keep, w, *a: rebuilt.append(w.numel()) or rec(self, keep, w, *a))
    model, net = _make(CONFIGS[name])
    fast = _run(model, net, _inputs(), mode="rebuild")
    sizes = [m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    assert len(sizes) == 6 and sorted(set(sizes)) == [64, 128, 192, 288]
    want = sizes if name == "dora" else [n for n in sizes if n > most]
    assert sorted(rebuilt) == sorted(want), (rebuilt, most)
    ref = _run(model, net, _inputs(), reference=True, monkeypatch=monkeypatch)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-10, atol=1e-10)
    for a, b in zip(fast[1:3] + tuple(fast[3]), ref[1:3] + tuple(ref[3])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", list(CONFIGS) + ["dora-detach"])
@pytest.mark.parametrize("multiplier", [1.0, 0.7])
@pytest.mark.parametrize("streams", ["off", "default", "all"])
def test_rebuilt_op_equals_plain_sum(name, multiplier, streams, monkeypatch):
    """``mode = "rebuild"`` (``lyco.algorithms.rebuild``: x kept, W′ rebuilt in backward; DoRA's own
    build; Full's linear op) gives the plain bypass sum's outputs and gradients on every layer kind
    of ``Net`` (strided/padded conv, 1×1 conv, conv1d, 3-D and 2-D linear inputs). ``streams``: the own
    backwards with ∂W′ and the build's backward in a side-stream region apart from ∂x (``LYCO_REBUILD_STREAMS``,
    a stand-in stream on the CPU) — by default LoKr's only, ``all``: every build with its own backward."""
    from lyco.algorithms import rebuild
    if streams == "all":
        monkeypatch.setattr(rebuild, "_side_wanted", lambda build: True)
    model, net = _make(CONFIGS["dora" if name == "dora-detach" else name])
    if name == "dora-detach":
        for layer in net.layers.values():
            layer.opts["dora_detach_norm"] = True
    net.set_multiplier(multiplier)
    inputs = _inputs()
    forks = _stand_in_side_stream(monkeypatch) if streams != "off" else []
    fast = _run(model, net, inputs, mode="rebuild")
    # the builds with their own backward (vjp): DoRA on the output axis, LoKr, (IA)³, GLoRA, Full, OFT/BOFT
    own = name in ("dora", "dora-detach", "lokr", "lokr-full", "ia3", "glora", "full", "diag-oft",
                   "diag-oft-constrained", "boft", "boft-constrained")
    taken = own if streams == "all" else streams == "default" and name in ("lokr", "lokr-full")
    assert bool(forks) == taken and all(f is not None for f in forks), (name, forks)
    if name == "dora-detach":  # the plain sum has no detached norm: the bypass's detached form is the
        ref = _run(model, net, inputs, mode="bypass")  # reference (itself tested against the definition)
    else:
        ref = _run(model, net, inputs, reference=True, monkeypatch=monkeypatch)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-10, atol=1e-10)
    assert len(fast[3]) == len(ref[3]) > 0
    for a, b in zip(fast[1:3] + tuple(fast[3]), ref[1:3] + tuple(ref[3])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_rebuilt_op_on_grouped_dilated_conv_and_a_trainable_base():
    """The rebuilt op's own conv backward (``convolution_backward``) on a grouped, dilated, strided
    conv1d/conv3d, and with the base weight and bias trainable too: gradients of x, W, b and the
    adapter against autograd through ``op(x, W + m·ΔW)`` (Full and LoKr)."""
    import torch.nn.functional as F
    from lyco.algorithms import rebuild
    from lyco.algorithms.base import LayerSpec, get

    cases = [(nn.Conv1d(6, 4, 3, stride=2, padding=2, dilation=2, groups=2), (2, 6, 11)),
             (nn.Conv3d(4, 6, 3, padding=1, groups=2), (1, 4, 3, 4, 5)),
             (nn.Linear(6, 5), (2, 3, 6))]
    for mod, xshape in cases:
        mod = mod.double()
        spec = LayerSpec.from_module(mod)
        for algo in ("full", "lokr"):
            alg = get(algo)
            opts = alg.validate_options({"factor": 2} if algo == "lokr" else {})
            t = alg.create(spec, opts, weight=mod.weight.detach().float(), generator=torch.Generator().manual_seed(1))
            t = {k: (v.double() + 0.1 * torch.randn(v.shape, dtype=torch.float64)).requires_grad_(True)
                 if v.is_floating_point() and v.dim() > 0 else (float(v) if v.dim() == 0 else v) for k, v in t.items()}
            w = mod.weight.detach().clone().requires_grad_(True)
            b = mod.bias.detach().clone().requires_grad_(True)
            x = torch.randn(xshape, dtype=torch.float64, requires_grad=True)
            y = alg.rebuild_op(x, t, spec, w, b, 0.7)
            assert y is not None
            gy = torch.randn_like(y)
            leaves = [x, w, b] + [v for v in t.values() if isinstance(v, torch.Tensor) and v.requires_grad]
            got = torch.autograd.grad(y, leaves, gy)
            w2, b2 = alg.merged(t, spec, w, b, 0.7)
            ref = rebuild.layer_op(x, spec, w2, b2)
            torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
            for a, r in zip(got, torch.autograd.grad(ref, leaves, gy)):
                torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
    assert F is not None


@pytest.mark.parametrize("algo", ["diag-oft", "boft"])
@pytest.mark.parametrize("kappa", [None, 1e-3])
def test_oft_rebuilt_op_with_a_trainable_base(algo, kappa):
    """With the base weight and bias trainable the rebuilt op takes autograd through the builds'
    differentiable forms (``_DiagOFTBuild``/``_BOFTBuild.__call__``, also what ``torch.compile`` traces):
    output and the gradients of x, W, b and the blocks against autograd through ``op(x, merged(m))``
    (the algorithm's own merge: fp64, the constraint on or off), on a strided conv and a 3-D linear."""
    from lyco.algorithms import rebuild
    from lyco.algorithms.base import LayerSpec, get

    alg = get(algo)
    for mod, xshape in ((nn.Conv2d(3, 8, 3, stride=2, padding=1), (2, 3, 7, 6)), (nn.Linear(6, 8), (2, 3, 6))):
        mod = mod.double()
        spec = LayerSpec.from_module(mod)
        opts = alg.validate_options({"rank": 2, "constraint": kappa or 0.0})
        g = torch.Generator().manual_seed(2)
        t = alg.create(spec, opts, weight=mod.weight.detach().float(), generator=g)
        blocks = (0.3 * torch.randn(t["oft_blocks"].shape, generator=g, dtype=torch.float64)).requires_grad_(True)
        t = {"oft_blocks": blocks, "alpha": float(t["alpha"])}
        assert (alg.kappa(t) is None) == (kappa is None)
        w = mod.weight.detach().clone().requires_grad_(True)
        b = mod.bias.detach().clone().requires_grad_(True)
        x = torch.randn(xshape, dtype=torch.float64, requires_grad=True)
        y = alg.rebuild_op(x, t, spec, w, b, 0.7)
        gy = torch.randn_like(y)
        got = torch.autograd.grad(y, [x, w, b, blocks], gy)
        w2, b2 = alg.merged(t, spec, w, b, 0.7)
        ref = rebuild.layer_op(x, spec, w2, b2)
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        for a, r in zip(got, torch.autograd.grad(ref, [x, w, b, blocks], gy)):
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("name", ["dora", "ia3", "glora", "full", "boft", "diag-oft"])
def test_rebuilt_op_keeps_only_the_input(name, kind):
    """The algorithms that train on the rebuilt op under ``mode = "auto"`` — DoRA, (IA)³, GLoRA, Full,
    BOFT, Diag-OFT — keep x for backward: no weight-sized tensor (W′, W_d, a butterfly stage of W) and no
    output-sized one (f(x) − b, a stage of the activations), which the bypass needs for ∂θ."""
    if kind == "linear":
        model, x = nn.Sequential(nn.Linear(48, 32)).double(), torch.randn(64, 48, dtype=torch.float64)
    else:
        model, x = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1)).double(), torch.randn(2, 8, 8, 8, dtype=torch.float64)
    out = model[0].weight.shape[0]
    net = lyco.create(model, preset="full", seed=0, **CONFIGS[name])
    assert all(layer.prefers_rebuild for layer in net.layers.values())
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_(0.2 * torch.randn_like(p))
    keep = {p.data_ptr() for p in model.parameters()} | {p.data_ptr() for p in net.trainable_parameters()}
    saved = []
    x.requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = model(x)
    # (row vectors — norms, gains — the OFT rotations, the size of their blocks, and GLoRA's rank-2r factors
    # [W·A1 | B1] and [A2 ; B2] may be kept; a weight, an input or an output is ≥ 4× any of them here)
    small = out if name not in ("boft", "diag-oft") else max(out, sum(p.numel() for p in net.trainable_parameters()))
    if name == "glora" and kind == "linear":
        small = max(small, 2 * CONFIGS[name]["rank"] * max(model[0].weight.shape))
    assert small * 4 <= min(model[0].weight.numel(), x.numel())
    big = [tuple(t.shape) for t in saved if t.data_ptr() not in keep | {x.data_ptr()} and t.numel() > small]
    assert big == []
    assert x.data_ptr() in {t.data_ptr() for t in saved}
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.trainable_parameters())


@pytest.mark.parametrize("names", [("lora", "ia3"), ("diag-oft", "lora"), ("dora", "loha"), ("full", "lokr")])
def test_two_adapters_on_one_layer(names, monkeypatch):
    model, net1 = _make(CONFIGS[names[0]], seed=0)
    _, net2 = _make(CONFIGS[names[1]], seed=1, model=model)
    net2.set_multiplier(0.6)
    inputs = _inputs()
    out, gi, gt, _ = _run(model, net1, inputs)
    r_out, r_gi, r_gt, _ = _run(model, net1, inputs, reference=True, monkeypatch=monkeypatch)
    torch.testing.assert_close(out, r_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gi, r_gi, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gt, r_gt, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_fast_path_close_to_fp64_merged(name):
    """bf16 activations, weights and adapter, fast path, against op(x, W + m·ΔW) in fp64 on the same
    (bf16-representable) values: the error must be in the bf16 range."""
    cfg = dict(CONFIGS[name], dtype=torch.bfloat16)
    model16, net16 = _make(cfg, model=Net().to(torch.bfloat16))
    net16.set_multiplier(0.8)
    model64 = Net().double()
    base = {k: v for k, v in model16.state_dict().items()}
    model64.load_state_dict({k: v.double() for k, v in base.items()})
    _, net64 = _make(CONFIGS[name], model=model64)
    net64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in net16.state_dict().items()})
    net64.set_multiplier(0.8)
    img, tok = (t.to(torch.bfloat16) for t in _inputs())
    with torch.no_grad():
        out = model16(img, tok)
        net64.merge()
        ref = model64(img.double(), tok.double())
        net64.unmerge()
        net64.detach()
        ref0 = model64(img.double(), tok.double())
    err = float((out.double() - ref).norm() / ref.norm())
    effect = float((ref - ref0).norm() / ref.norm())
    if "constraint" not in CONFIGS[name]:  # (a tight COFT constraint keeps the rotation small by design)
        assert effect > 0.05, effect  # the adapter matters: the check below would catch a wrong delta
    assert err < 2e-2, err


def test_device_scalars_read_once(monkeypatch):
    """alpha (and IA3's on_input) are read to Python once, not on every forward call."""
    for cfg in (CONFIGS["lora"], CONFIGS["ia3"], CONFIGS["diag-oft-constrained"], CONFIGS["lokr"]):
        model, net = _make(cfg)
        inputs = _inputs()
        with torch.no_grad():
            model(*inputs)
        calls = []
        orig_float, orig_item = torch.Tensor.__float__, torch.Tensor.item
        monkeypatch.setattr(torch.Tensor, "__float__", lambda s: calls.append(s.shape) or orig_float(s))
        monkeypatch.setattr(torch.Tensor, "item", lambda s: calls.append(s.shape) or orig_item(s))
        with torch.no_grad():
            model(*inputs)
        monkeypatch.undo()
        assert calls == [], (cfg, calls)


def test_scalar_cache_follows_alpha_changes():
    model, net = _make(CONFIGS["lora"])
    inputs = _inputs()
    with torch.no_grad():
        base = model(*inputs)
        layer = next(iter(net.layers.values()))
        layer.alpha.mul_(2.0)                    # in place: version counter moves
        changed = model(*inputs)
        assert not torch.allclose(base, changed)
        layer.alpha.div_(2.0)
        torch.testing.assert_close(model(*inputs), base, rtol=0, atol=0)
        sd = {k: v.clone() for k, v in net.state_dict().items()}
        key = next(k for k in sd if k.endswith("alpha"))
        sd[key] = sd[key] * 3
        net.load_state_dict(sd)                  # load_state_dict: cache dropped
        assert not torch.allclose(model(*inputs), base)
        sd[key] = sd[key] / 3
        net.load_state_dict(sd)
        torch.testing.assert_close(model(*inputs), base, rtol=0, atol=0)
        net.to(torch.float32)                    # buffers replaced: cache dropped
        model.to(torch.float32)
        torch.testing.assert_close(model(*(t.float() for t in inputs)).double(), base, rtol=1e-5, atol=1e-5)


def test_active_list_follows_state_changes():
    model, net = _make(CONFIGS["lora"])
    inputs = _inputs()
    with torch.no_grad():
        out1 = model(*inputs)
        net.set_multiplier(0.0)
        base = model(*inputs)
        net.set_multiplier(1.0)
        torch.testing.assert_close(model(*inputs), out1, rtol=0, atol=0)
        net.disable()
        torch.testing.assert_close(model(*inputs), base, rtol=0, atol=0)
        net.enable()
        net.merge()
        torch.testing.assert_close(model(*inputs), out1, rtol=1e-10, atol=1e-10)
        net.unmerge()
        torch.testing.assert_close(model(*inputs), out1, rtol=0, atol=0)
        for layer in net.layers.values():
            layer.mode = "rebuild"
        torch.testing.assert_close(model(*inputs), out1, rtol=1e-10, atol=1e-10)
        for layer in net.layers.values():
            layer.mode = "auto"
        net.detach()
        torch.testing.assert_close(model(*inputs), base, rtol=0, atol=0)


def test_full_prefers_rebuild_in_auto_mode_and_bypass_agrees():
    model, net = _make(CONFIGS["full"])
    inputs = _inputs()
    host = next(iter(net.layers.values())).host
    with torch.no_grad():
        auto = model(*inputs)
        assert host._rebuild
        for layer in net.layers.values():
            layer.mode = "bypass"
        bypass = model(*inputs)
        assert not host._rebuild
    torch.testing.assert_close(auto, bypass, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["lora", "dora", "diag-oft", "boft", "ia3", "lokr"])
def test_no_graph_breaks_under_dynamo(name):
    dynamo = pytest.importorskip("torch._dynamo")
    model, net = _make(CONFIGS[name], dtype=torch.float32)
    inputs = _inputs(torch.float32)
    model(*inputs)  # eager call first (reads the scalars once)
    try:
        ex = dynamo.explain(model)(*inputs)
    finally:
        dynamo.reset()
    assert ex.graph_break_count == 0, [str(b.reason) for b in ex.break_reasons]


@pytest.mark.parametrize("path", ["dense", "structured"])
@pytest.mark.parametrize("name", ["lokr", "lokr-full"])
def test_lokr_forced_paths_equal_plain_sum(name, path, monkeypatch):
    """LoKr's two training paths (ΔW formed in the activation dtype + one GEMM; structured
    vec(W1·X·W2ᵀ) / kron-conv) give the plain bypass sum's outputs and gradients, whichever the
    shape rule would pick."""
    from lyco.algorithms import lokr as lokr_mod
    model, net = _make(CONFIGS[name])
    net.set_multiplier(0.7)
    inputs = _inputs()
    monkeypatch.setattr(lokr_mod, "FORCE_PATH", path)
    fast = _run(model, net, inputs, mode="bypass")  # (mode = "auto" trains LoKr on the rebuilt op)
    ref = _run(model, net, inputs, reference=True, monkeypatch=monkeypatch)
    for a, b in zip(fast[:3] + tuple(fast[3]), ref[:3] + tuple(ref[3])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def _dora_detached_reference(layer_w, layer_b, up, down, mag, gamma, m, x):
    """DoRA with ‖W′‖ constant in backward, written from the definition in float64:
    y = f(x) + m·(g ⊙ (x W′ᵀ) − x Wᵀ), W′ = W + γ·U·D, g = mag / (stop_grad(‖W′‖_row) + ε)."""
    wc = layer_w + gamma * up @ down
    n = wc.norm(dim=1).detach() + torch.finfo(torch.float32).eps  # (+ fp32 eps, as LyCORIS and lyco)
    g = mag.reshape(-1) / n
    base = x @ layer_w.T + (layer_b if layer_b is not None else 0)
    return base + m * (g * (x @ wc.T) - x @ layer_w.T)


@pytest.mark.parametrize("multiplier", [1.0, 0.6])
@pytest.mark.parametrize("bias", [True, False])
def test_dora_detached_norm_equals_definition(multiplier, bias):
    """``dora_detach_norm``: same output as DoRA, gradients of the paper's §4.3 form (norm constant),
    against an independent float64 computation; and the option really changes the directional
    gradient (while the magnitude's gradient is the same)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10, bias=bias)).double()
    lin = model[0]
    net = lyco.create(model, preset="full", algo="lora", rank=3, alpha=2.0, dora=True, seed=0)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
    net.set_multiplier(multiplier)
    layer = next(iter(net.layers.values()))
    t = layer.tensors()
    up, down, mag = t["lora_up.weight"], t["lora_down.weight"], t["dora_scale"]
    gamma = float(t["alpha"]) / 3
    x = torch.randn(4, 5, 12, dtype=torch.float64)

    def grads(detach):
        layer.opts["dora_detach_norm"] = detach
        xx = x.clone().requires_grad_(True)
        out = lin(xx)
        (out.square().sum() + out.sum()).backward()
        gs = [up.grad.clone(), down.grad.clone(), mag.grad.clone(), xx.grad.clone()]
        for p in (up, down, mag):
            p.grad = None
        return out.detach(), gs

    out, g_fast = grads(True)
    out_full, g_full = grads(False)
    params = [p.detach().clone().requires_grad_(True) for p in (up, down, mag)]
    xx = x.clone().requires_grad_(True)
    ref = _dora_detached_reference(lin.weight.detach(), lin.bias.detach() if bias else None,
                                   params[0], params[1], params[2], gamma, multiplier, xx)
    (ref.square().sum() + ref.sum()).backward()
    torch.testing.assert_close(out, ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out_full, ref.detach(), rtol=1e-10, atol=1e-10)  # same forward
    for a, b in zip(g_fast, [p.grad for p in params] + [xx.grad]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(g_full[2], g_fast[2], rtol=1e-9, atol=1e-10)   # magnitude: same gradient
    assert not torch.allclose(g_full[0], g_fast[0])                          # direction: the norm's term


@pytest.mark.parametrize("name", ["full", "dora-detach"])
def test_no_weight_sized_tensor_kept_for_backward(name):
    """Full and DoRA with a detached norm keep nothing weight-sized alive for backward besides the
    parameters themselves (the merged weight is rebuilt in backward)."""
    model = nn.Sequential(nn.Linear(48, 40)).double()
    cfg = CONFIGS["full"] if name == "full" else CONFIGS["dora"]
    net = lyco.create(model, preset="full", seed=0, **cfg)
    if name == "dora-detach":
        for layer in net.layers.values():
            layer.opts["dora_detach_norm"] = True
    keep = {p.data_ptr() for p in model.parameters()} | {p.data_ptr() for p in net.trainable_parameters()}
    saved = []
    x = torch.randn(3, 48, dtype=torch.float64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = model(x)
    fresh = [t for t in saved if t.data_ptr() not in keep and t.numel() >= 40 * 48]
    assert fresh == [], [tuple(t.shape) for t in fresh]
    y.sum().backward()  # and the backward still runs
    assert all(p.grad is not None for p in net.trainable_parameters())


def test_diag_oft_keeps_the_output_not_the_base_output():
    """Diag-OFT on the delta path (``mode = "bypass"``; one adapter, m = 1) saves its *output* for
    backward (which downstream ops keep anyway) instead of f(x) − b; the gradients are the plain sum's
    (checked in test_fast_path_equals_plain_sum) — here: no other activation-sized tensor is saved."""
    model = nn.Sequential(nn.Linear(48, 40)).double()
    net = lyco.create(model, preset="full", seed=0, mode="bypass", **CONFIGS["diag-oft"])
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_(0.2 * torch.randn_like(p))
    saved = []
    x = torch.randn(64, 48, dtype=torch.float64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = model(x)
    acts = [t for t in saved if t.numel() >= 64 * 40 and t.data_ptr() != x.data_ptr()]
    assert [t.data_ptr() for t in acts] == [y.data_ptr()], [tuple(t.shape) for t in acts]


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_full_rebuild_under_autocast_matches_dense(in_dtype):
    """Full's recompute-in-backward linear under bf16 autocast with an fp32 (or bf16) input — what
    the trainer does (fp32 adapter, bf16 autocast). Found on the GPU: the backward GEMM mixed the
    bf16 gradient with the fp32 saved input. Reference: plain ``F.linear`` with the merged weight
    ``W + diff`` (diff as leaf tensors) under the same autocast, autograd throughout."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 16), nn.GELU(), nn.Linear(16, 8))
    for p in base.parameters():
        p.requires_grad_(False)
    model = copy.deepcopy(base)
    net = lyco.create(model, algo="full")
    layers = [next(l for l in net.layers.values() if l.host.module is m) for m in (model[0], model[2])]
    with torch.no_grad():
        for layer in layers:
            for p in layer.params.values():
                p.normal_(0, 0.05)
    x = torch.randn(5, 24, dtype=in_dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().square().sum().backward()
    assert x.grad.dtype == in_dtype

    x2 = x.detach().clone().requires_grad_(True)
    leaves = [{k: p.detach().clone().requires_grad_(True) for k, p in layer.params.items()} for layer in layers]
    (d0, b0), (d2, b2) = [tuple(lv[k] for k in sorted(lv)) for lv in leaves]  # sorted: diff, diff_b
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = F.gelu(F.linear(x2, base[0].weight + d0, base[0].bias + b0))
        y2 = F.linear(h, base[2].weight + d2, base[2].bias + b2)
    y2.float().square().sum().backward()
    torch.testing.assert_close(y.float(), y2.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad.float(), x2.grad.float(), rtol=3e-2, atol=3e-2)
    for layer, lv in zip(layers, leaves):
        for k, p in layer.params.items():
            torch.testing.assert_close(p.grad.float(), lv[k].grad.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("name", ["dora", "ia3", "glora", "lokr", "lora", "loha", "diag-oft-constrained"])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_rebuilt_op_under_autocast_matches_the_bypass(name, in_dtype):
    """The rebuilt op (own backwards: DoRA, (IA)³, GLoRA, LoKr, Diag-OFT; the low-rank op: LoRA, LoHa) on linear
    and conv layers with fp32 adapter tensors and bf16 autocast, fp32 or bf16 input — what the trainer
    runs — against the bypass under the same autocast: outputs and every gradient within bf16
    rounding, in each input's dtype."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 16), nn.GELU(), nn.Linear(16, 16), nn.Flatten(0, 1),
                         nn.Unflatten(-1, (4, 2, 2)), nn.Conv2d(4, 6, 3, padding=1))
    for p in base.parameters():
        p.requires_grad_(False)
    results = []
    for mode in ("rebuild", "bypass"):
        model = copy.deepcopy(base)
        net = lyco.create(model, preset="full", seed=0, **CONFIGS[name])
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in net.trainable_parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        for layer in net.layers.values():
            layer.mode = mode
        x = torch.randn(5, 3, 24, generator=torch.Generator().manual_seed(4)).to(in_dtype).requires_grad_(True)
        assert len(net.layers) == 3
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().square().sum().backward()
        assert x.grad.dtype == in_dtype
        grads = [p.grad for p in net.trainable_parameters()]
        assert all(gr is not None and gr.dtype == p.dtype for gr, p in zip(grads, net.trainable_parameters()))
        results.append((y.float(), x.grad.float(), [gr.float() for gr in grads]))
    (y1, gx1, g1), (y2, gx2, g2) = results
    torch.testing.assert_close(y1, y2, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx1, gx2, rtol=3e-2, atol=3e-2)
    for a, b in zip(g1, g2):
        assert float((a - b).norm() / b.norm().clamp_min(1e-12)) < 3e-2


class _KronNet(nn.Module):
    """Layers wide enough for every LoKr factor layout at rank 1, factor 4: W1 (4×4) decomposed with
    ``decompose_both``, W2 decomposed everywhere and Tucker on the strided 3×3 conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.lin = nn.Linear(32, 48)
        self.lin_nb = nn.Linear(48, 32, bias=False)

    def forward(self, img, tok):
        h = self.conv(img).mean((2, 3))                              # (N, 16)
        t = self.lin_nb(torch.relu(self.lin(tok))).sum(1)            # (N, 32) from a 3-D input
        return t[:, :16] + h


# variant → a key that must appear in some layer (the layout the variant is about), and one that must not
_LOKR_LAYOUTS = {
    "decompose-both": (dict(decompose_both=True), "lokr_w1_a", "lokr_t2"),
    "tucker": (dict(use_tucker=True), "lokr_t2", "lokr_w1_a"),
    "scalar": (dict(use_scalar=True), "scalar", "lokr_t2"),
    "unbalanced": (dict(unbalanced_factorization=True), "lokr_w2_a", "lokr_t2"),
    "full-matrix": (dict(full_matrix=True), "lokr_w2", "lokr_w2_a"),
}


@pytest.mark.parametrize("variant", list(_LOKR_LAYOUTS))
@pytest.mark.parametrize("multiplier", [1.0, 0.6])
def test_lokr_rebuilt_op_variants_equal_plain_sum(variant, multiplier, monkeypatch):
    """LoKr's own rebuild backward (``_KronBuild``: ∂W1, ∂W2 as batched products over ∂W′) for every
    factor layout — both factors decomposed, a Tucker W2 on the k×k conv, a trained scalar (folded into
    W1), unbalanced split, full matrices — against the plain bypass sum, outputs and every gradient."""
    opts, present, absent = _LOKR_LAYOUTS[variant]
    model, net = _make(dict(algo="lokr", rank=1, alpha=1.5, factor=4, **opts), model=_KronNet().double())
    keys = [set(layer.params.keys()) for layer in net.layers.values()]
    assert any(present in k for k in keys) and not any(absent in k for k in keys), keys
    net.set_multiplier(multiplier)
    g = torch.Generator().manual_seed(2)
    inputs = (torch.randn(2, 8, 6, 6, generator=g, dtype=torch.float64),
              torch.randn(2, 5, 32, generator=g, dtype=torch.float64))
    fast = _run(model, net, inputs, mode="rebuild")
    ref = _run(model, net, inputs, reference=True, monkeypatch=monkeypatch)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-10, atol=1e-10)
    assert len(fast[3]) == len(ref[3]) > 0
    for a, b in zip(fast[1:3] + tuple(fast[3]), ref[1:3] + tuple(ref[3])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
