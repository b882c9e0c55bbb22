"""lyco.optim.FlatAdamW: torch AdamW's update on one flat buffer per group, checked against float64 AdamW math and
against torch.optim.AdamW itself (updates, missing gradients, state_dict both ways)."""

import math

import pytest
import torch

from lyco.optim import FlatAdamW, flat_adamw_supports

SHAPES = [(7, 3), (16, 5), (33,), (4, 4, 3, 3), (1000,), (1,)]


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def _grads(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g).to(dtype) for s in SHAPES]


def _run_both(flat, ref, ps, pt, steps, skip=lambda step, i: False):
    """``steps`` updates of both optimizers with the same gradients (None where ``skip``), then the parameters
    compared."""
    for step in range(steps):
        for i, (p, q, g) in enumerate(zip(ps, pt, _grads(step))):
            p.grad = None if skip(step, i) else g.clone()
            q.grad = None if skip(step, i) else g.clone()
        flat.step()
        ref.step()
    for p, q in zip(ps, pt):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def _reference(p0, grads_per_step, lr, betas, eps, wd):
    """AdamW (decoupled weight decay, bias-corrected) in float64, one parameter: the textbook update."""
    p = p0.double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for t, g in enumerate(grads_per_step, 1):
        g = g.double()
        p = p * (1 - lr * wd)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        mh = m / (1 - betas[0] ** t)
        vh = v / (1 - betas[1] ** t)
        p = p - lr * mh / (vh.sqrt() + eps)
    return p


def test_matches_float64_adamw_and_torch():
    groups_cfg = [dict(lr=1e-2, weight_decay=0.0), dict(lr=3e-3, weight_decay=0.1)]
    betas, eps = (0.9, 0.99), 1e-8
    ps, pt = _params(), _params()
    init = [p.detach().clone() for p in ps]
    ids = [id(p) for p in ps]
    flat = FlatAdamW([{"params": ps[:3], **groups_cfg[0]}, {"params": ps[3:], **groups_cfg[1]}], betas=betas, eps=eps)
    ref = torch.optim.AdamW([{"params": pt[:3], **groups_cfg[0]}, {"params": pt[3:], **groups_cfg[1]}],
                            betas=betas, eps=eps, fused=True)
    # the same Parameter objects, still leaves, values unchanged by the move into the flat buffer
    assert [id(p) for p in ps] == ids and all(p.is_leaf and p.requires_grad for p in ps)
    assert all(torch.equal(p, q) for p, q in zip(ps, init))
    assert len({p.untyped_storage().data_ptr() for p in ps[:3]}) == 1  # one buffer per group
    hist = []
    for step in range(5):
        gs = _grads(step)
        hist.append(gs)
        for p, q, g in zip(ps, pt, gs):
            p.grad, q.grad = g.clone(), g.clone()
        flat.step()
        ref.step()
        flat.zero_grad()
        assert all(p.grad is None for p in ps)
    for i, (p, q) in enumerate(zip(ps, pt)):
        cfg = groups_cfg[0] if i < 3 else groups_cfg[1]
        want = _reference(init[i], [h[i] for h in hist], cfg["lr"], betas, eps, cfg["weight_decay"])
        torch.testing.assert_close(p.double(), want, rtol=1e-5, atol=1e-6)
        # torch's own fused AdamW: the same kernel — equal up to its vectorised body vs scalar tail on the CPU
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_gradients_reach_the_parameters_through_a_module():
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3)
    opt = FlatAdamW(lin.parameters(), lr=0.1)
    w0 = lin.weight.detach().clone()
    lin(torch.randn(4, 5)).square().sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.shape == (3, 5)
    opt.step()
    assert not torch.equal(lin.weight.detach(), w0)
    # the module's own state_dict still names and shapes its tensors as before
    assert {k: tuple(v.shape) for k, v in lin.state_dict().items()} == {"weight": (3, 5), "bias": (3,)}


def test_bf16_parameters():
    ps, pt = _params(torch.bfloat16), _params(torch.bfloat16)
    flat = FlatAdamW(ps, lr=1e-2, weight_decay=0.05)
    ref = torch.optim.AdamW(pt, lr=1e-2, weight_decay=0.05, fused=True)
    for step in range(3):
        for p, q, g in zip(ps, pt, _grads(step, torch.bfloat16)):
            p.grad, q.grad = g.clone(), g.clone()
        flat.step()
        ref.step()
    for p, q in zip(ps, pt):
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_missing_gradient_matches_torch():
    """A parameter without a gradient is skipped (no decay, no moment update) and keeps its own step count, as in
    torch; the group then runs torch's per-parameter update on the same state."""
    ps, pt = _params(), _params()
    flat = FlatAdamW(ps, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(pt, lr=1e-2, weight_decay=0.1, fused=True)
    _run_both(flat, ref, ps, pt, 5, skip=lambda step, i: step in (2, 3) and i in (1, 4))
    sd = flat.state_dict()
    assert float(sd["state"][1]["step"]) == 3.0 and float(sd["state"][0]["step"]) == 5.0


@pytest.mark.parametrize("direction", ["flat_to_torch", "torch_to_flat"])
def test_state_dict_moves_between_flat_and_torch(direction):
    ps, pt = _params(), _params()
    mk_flat = lambda params: FlatAdamW(params, lr=5e-3, betas=(0.8, 0.95), weight_decay=0.02)
    mk_torch = lambda params: torch.optim.AdamW(params, lr=5e-3, betas=(0.8, 0.95), weight_decay=0.02, fused=True)
    first, second = (mk_flat, mk_torch) if direction == "flat_to_torch" else (mk_torch, mk_flat)
    a = first(ps)
    for step in range(3):
        for p, g in zip(ps, _grads(step)):
            p.grad = g.clone()
        a.step()
    sd = a.state_dict()
    if direction == "flat_to_torch":  # copies, not views of the flat state (a checkpoint writer needs own memory)
        ptrs = [sd["state"][i]["exp_avg"].untyped_storage().data_ptr() for i in range(len(ps))]
        assert len(set(ptrs)) == len(ps)
    # continue from the state in the other class, and in the first one: same parameters either way
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    b = second(qs)
    b.load_state_dict(sd)
    for step in range(3, 6):
        gs = _grads(step)
        for p, q, g in zip(ps, qs, gs):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # and the reloaded optimizer's own state_dict keeps torch's per-parameter form
    sd2 = b.state_dict()
    assert sorted(sd2["state"]) == list(range(len(ps)))
    assert all(sd2["state"][i]["exp_avg"].shape == ps[i].shape for i in range(len(ps)))
    assert math.isclose(float(sd2["state"][0]["step"]), 6.0)


def test_lr_scheduler_drives_the_flat_update():
    ps, pt = _params(), _params()
    flat = FlatAdamW(ps, lr=1e-2)
    ref = torch.optim.AdamW(pt, lr=1e-2, fused=True)
    sa = torch.optim.lr_scheduler.LambdaLR(flat, lambda s: 1.0 / (1 + s))
    sb = torch.optim.lr_scheduler.LambdaLR(ref, lambda s: 1.0 / (1 + s))
    for step in range(4):
        for p, q, g in zip(ps, pt, _grads(step)):
            p.grad, q.grad = g.clone(), g.clone()
        flat.step()
        ref.step()
        sa.step()
        sb.step()
    for p, q in zip(ps, pt):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_errors():
    with pytest.raises(TypeError, match="amsgrad"):
        FlatAdamW(_params(), amsgrad=True)
    with pytest.raises(TypeError, match="maximize"):
        FlatAdamW([{"params": _params(), "maximize": True}])
    opt = FlatAdamW(_params())
    with pytest.raises(ValueError, match="parameter groups"):
        opt.load_state_dict({"state": {}, "param_groups": [{"params": [0, 1]}]})
    assert flat_adamw_supports({"lr": 1, "betas": (0.9, 0.9)}) and not flat_adamw_supports({"foreach": True})
    # a saved state whose tensors do not fit this optimizer's parameters (the total alike) names the parameter
    ps = _params()
    src = FlatAdamW(ps)
    for p, g in zip(ps, _grads(0)):
        p.grad = g.clone()
    src.step()
    sd = src.state_dict()
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].reshape(-1)[:20]   # (7, 3) → 20 elements
    sd["state"][1]["exp_avg"] = torch.cat([sd["state"][1]["exp_avg"].reshape(-1), torch.zeros(1)])
    with pytest.raises(ValueError, match=r"parameter 0's saved exp_avg has shape \(20,\); expected \(7, 3\)"):
        FlatAdamW(_params()).load_state_dict(sd)


def test_moved_parameters_are_refused_then_readopted():
    """A parameter given new storage after the optimizer was made (accelerate's model.to(device) on a CPU run of
    several processes copies it) would train nothing: step refuses, readopt moves it back with its current value."""
    lin = torch.nn.Linear(3, 2)
    opt = FlatAdamW(lin.parameters(), lr=0.1)
    moved = lin.weight.detach().clone() + 1.0
    lin.weight.data = moved  # new storage, a new value
    lin(torch.randn(4, 3)).sum().backward()
    with pytest.raises(RuntimeError, match="new storage"):
        opt.step()
    assert opt.readopt() == 1
    torch.testing.assert_close(lin.weight.detach(), moved, rtol=0, atol=0)
    before = lin.weight.detach().clone()
    opt.step()
    assert not torch.equal(lin.weight.detach(), before)  # the update reaches the module's parameter again
    lin.weight.data = lin.weight.detach().double()
    with pytest.raises(RuntimeError, match="float64"):
        opt.readopt()


def test_found_inf_skips_the_update_on_the_device():
    """found_inf = 1: parameters, moments and step counts stay as they were (the NaN guard of lyco train); the run
    then goes on exactly as one where that step never happened."""
    ps, pt = _params(), _params()
    a, b = FlatAdamW(ps, lr=1e-2, weight_decay=0.1), FlatAdamW(pt, lr=1e-2, weight_decay=0.1)
    assert a.skips_on_found_inf
    for step in range(4):
        gs = _grads(step)
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        if step == 2:  # a skipped step with garbage gradients
            for p in ps:
                p.grad.fill_(float("nan"))
            before = [p.detach().clone() for p in ps]
            a.found_inf = torch.ones(())
            a.step()
            a.found_inf = None
            assert all(torch.equal(p, q) for p, q in zip(ps, before))
            assert float(a.state_dict()["state"][0]["step"]) == 2.0
            continue
        a.step()
        for q, g in zip(pt, gs):
            q.grad = g.clone()
        b.found_inf = torch.zeros(())
        b.step()
    for p, q in zip(ps, pt):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    nf = FlatAdamW(_params(), fused=False)
    nf.found_inf = torch.ones(())
    for p in nf.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="fused"):
        nf.step()


def test_zero_grad_in_place_keeps_the_gradient_tensors():
    """set_to_none=False (lyco train's captured steps: the graph accumulates into the same tensors) zeroes each
    gradient in place; set_to_none=True drops them."""
    ps = _params()
    opt = FlatAdamW(ps)
    for p, g in zip(ps, _grads(0)):
        p.grad = g.clone()
    ids = [id(p.grad) for p in ps]
    opt.zero_grad(set_to_none=False)
    assert [id(p.grad) for p in ps] == ids and all(not p.grad.any() for p in ps)
    opt.zero_grad()
    assert all(p.grad is None for p in ps)


def test_large_tensors_are_updated_as_they_are(monkeypatch):
    """Tensors of LARGE elements or more stay out of the flat buffer (their own storage, torch's update over them);
    the results and the state_dict are the same as for the all-flat optimizer and torch's."""
    monkeypatch.setattr(FlatAdamW, "LARGE", 100)  # (1000,) and (4, 4, 3, 3) count as large here
    ps, pt = _params(), _params()
    storages = [p.untyped_storage().data_ptr() for p in ps]
    flat = FlatAdamW(ps, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(pt, lr=1e-2, weight_decay=0.1, fused=True)
    big = [i for i, s in enumerate(SHAPES) if math.prod(s) >= 100]
    assert big == [3, 4]
    assert all(ps[i].untyped_storage().data_ptr() == storages[i] for i in big)  # not moved
    small = [i for i in range(len(SHAPES)) if i not in big]
    assert len({ps[i].untyped_storage().data_ptr() for i in small}) == 1  # one buffer for the rest
    # a large one without a gradient at step 2: skipped, as torch does
    _run_both(flat, ref, ps, pt, 4, skip=lambda step, i: step == 2 and i == 4)
    sd, sr = flat.state_dict(), ref.state_dict()
    assert sorted(sd["state"]) == sorted(sr["state"])
    for i in sd["state"]:
        assert float(sd["state"][i]["step"]) == float(sr["state"][i]["step"])
        torch.testing.assert_close(sd["state"][i]["exp_avg_sq"], sr["state"][i]["exp_avg_sq"], rtol=1e-6, atol=1e-9)
    again = FlatAdamW([torch.nn.Parameter(p.detach().clone()) for p in ps], lr=1e-2, weight_decay=0.1)
    again.load_state_dict(sd)
    assert float(again.state_dict()["state"][4]["step"]) == 3.0
