"""What the regenerated-input tests (tests/test_input_regen.py, tests/test_norm_regen.py) share: the storages an
autograd graph keeps, and the tiny SDXL's inputs for one step of all three of its models; and the tensors a forward
saves (the output-keeping ops' tests, tests/test_ia3_keep_output.py and tests/test_oft_keep_output.py)."""

import torch


def saved_storages(y):
    """The storages of every tensor any node of y's autograd graph keeps for backward."""
    seen, todo, out = set(), [y.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        kept = list(getattr(fn, "saved_tensors", ()) or ())
        for name in dir(fn):
            if name.startswith("_saved_"):
                try:
                    kept.append(getattr(fn, name))
                except RuntimeError:
                    pass
        out.update(t.untyped_storage().data_ptr() for t in kept if isinstance(t, torch.Tensor))
        todo.extend(f for f, _ in fn.next_functions)
    return out


def kept_by_forward(run, min_numel: int):
    """``run()``'s result and the tensors of at least ``min_numel`` elements autograd saved while it ran."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = run()
    return y, [t for t in saved if t.numel() >= min_numel]


def tiny_sdxl_step_inputs(comps, g):
    """``(token ids, UNet inputs)`` for the tiny SDXL of :func:`lyco.models.tiny.tiny_components` in float64."""
    ids = torch.randint(0, comps["text_encoder"].config.vocab_size, (2, 8), generator=g)
    unet = dict(sample=torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), timestep=torch.tensor([10, 500]),
                encoder_hidden_states=torch.randn(2, 77, 64, generator=g, dtype=torch.float64),
                added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=g, dtype=torch.float64),
                                   "time_ids": torch.rand(2, 6, generator=g, dtype=torch.float64) * 512})
    return ids, unet


def tiny_sdxl_loss(comps, ids, unet_inputs):
    """One loss over all three of the tiny SDXL's models (UNet, both text encoders)."""
    return (comps["unet"](**unet_inputs).sample.square().mean()
            + comps["text_encoder"](ids).last_hidden_state.square().mean()
            + comps["text_encoder_2"](ids).text_embeds.square().mean())


def record_regen_hits(monkeypatch, kind=None) -> set:
    """The set that ``regen.find`` (patched through monkeypatch) fills with the id of every input it finds
    regenerable (the view's base for a layer host's 2-D rows), of ``kind`` only if given."""
    from lyco.algorithms import regen
    hits, real = set(), regen.find

    def counting(x, norm=False):
        r = real(x, norm)
        if r is not None and (kind is None or r[0].kind == kind):
            hits.add(id(x if x._base is None else x._base))
        return r
    monkeypatch.setattr(regen, "find", counting)
    return hits


def tiny_sdxl_lora():
    """``(components, params, generator)``: the tiny SDXL in float64, LoRA (rank 2) on every layer of its three models,
    the adapters moved off their zero init so that every gradient is nonzero; the generator's state follows that."""
    import lyco
    from lyco.models.tiny import tiny_components
    comps = tiny_components("sdxl", dtype=torch.float64)
    net = lyco.create(comps, algo="lora", rank=2, alpha=1.0, preset="full", seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return comps, list(net.trainable_parameters()), g


def adapted(model, seed=0, **kw):
    """``lyco.create(model, preset="full", seed=seed, …)`` — LoRA rank 3, alpha 2 unless ``kw`` says otherwise — with
    every trainable parameter moved off its init by 0.3·N(0, 1) (generator ``seed + 3``): every gradient nonzero."""
    import lyco
    kw = {"algo": "lora", **kw}
    if kw["algo"] == "lora":
        kw = {"rank": 3, "alpha": 2.0, **kw}
    net = lyco.create(model, preset="full", seed=seed, **kw)
    g = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net
