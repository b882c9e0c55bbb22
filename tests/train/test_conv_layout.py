"""``[train] conv_weights_channels_last``: the frozen U-Net's k×k conv weights made channels-last where they outsize
their input at the first step (:mod:`lyco.models.layout`). Only the strides change, so the trainer's loss and every
adapter gradient equal those of the same step without it (CPU fp32 here, where ``true`` forces the rule: the convs
sum in another order, hence a tolerance); ``auto`` leaves a CPU run alone."""

from __future__ import annotations

import os

import pytest
import torch

from lyco.train.loop import Trainer

from _train_helpers import make_cfg

NETS = {
    "locon": {"algo": "lora", "rank": 4, "preset": "full", "conv_rank": 4, "options": {}},
    "lokr": {"algo": "lokr", "rank": 4, "preset": "full", "options": {"factor": 4}},
}


def _trainer(tmp_path, shapes_dir, net, flag, **train):
    cfg = make_cfg(tmp_path, shapes_dir, network=net, output={"save_state": False},
                   train={"conv_weights_channels_last": flag, **train})
    return Trainer(cfg)


def _loss_and_grads(tr):
    """The loss of one fixed batch and the adapter's gradients (the first forward: where the layout is decided)."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    noise = torch.randn(2, 4, 16, 16, generator=g)
    with torch.no_grad():  # the adapter away from its zero-initialised up, so that every gradient is alive
        for p in tr.network.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    loss = tr.compute_loss(tr.model, latents, ["a lycoshape", "lycoshape"], None, g,
                           timesteps=torch.tensor([100, 700]), noise=noise)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in tr.network.parameters()]


@pytest.mark.parametrize("name", list(NETS))
def test_channels_last_conv_weights_give_the_same_gradients(tmp_path, shapes_dir, name):
    on = _trainer(tmp_path / "on", shapes_dir, NETS[name], True).setup()
    off = _trainer(tmp_path / "off", shapes_dir, NETS[name], False).setup()
    assert off.conv_layout is None
    lay = on.conv_layout
    assert lay.pending > 0 and not lay.converted  # nothing decided before the first forward
    loss_on, grads_on = _loss_and_grads(on)
    loss_off, grads_off = _loss_and_grads(off)
    assert lay.converted and lay.kept and lay.pending == 0, lay.summary()
    convs = dict(on.pipe.unet.named_modules())
    for n in lay.converted:
        w = convs[n].weight
        assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous(), n
    for n in lay.kept:
        assert convs[n].weight.is_contiguous(), n
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-5, atol=0)
    assert len(grads_on) == len(grads_off) > 0
    for a, b in zip(grads_on, grads_off):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())
    on.close()
    off.close()


def test_a_run_with_it_trains_and_saves(tmp_path, shapes_dir):
    tr = _trainer(tmp_path, shapes_dir, NETS["lokr"], True, max_train_steps=2)
    res = tr.train()
    assert tr.conv_layout.converted and tr.conv_layout.pending == 0
    assert res.adapter_path is not None and os.path.exists(res.adapter_path)
    tr.close()


def test_auto_leaves_a_cpu_run_alone(tmp_path, shapes_dir):
    tr = _trainer(tmp_path, shapes_dir, {"algo": "lora", "rank": 4, "options": {}}, "auto", max_train_steps=1)
    tr.train()
    assert tr.conv_layout is None
    assert all(m.weight.is_contiguous() for m in tr.pipe.unet.modules() if isinstance(m, torch.nn.Conv2d))
    tr.close()
