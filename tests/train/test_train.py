"""The trainer end to end on the tiny models: learning, exact resume, atomic checkpoints, NaN stop,
files that load back and reproduce the training-time forward, metadata, caches, CLI."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import lyco
from lyco.formats import safetensors_io
from lyco.formats.safetensors_io import load_tensors, read_metadata
from lyco.train.loop import Trainer, TrainingError, find_state, lr_lambda

from _train_helpers import make_cfg


def _run(cfg, **kw):
    tr = Trainer(cfg, **kw)
    res = tr.train()
    return tr, res


def _tensors(path):
    return load_tensors(path)[0]


def _assert_same_tensors(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- learning

ALGOS = {
    "lora": ({"algo": "lora", "rank": 4}, "lora_down.weight"),
    "locon": ({"algo": "lora", "rank": 4, "preset": "full", "conv_rank": 4}, "lora_down.weight"),
    "loha": ({"algo": "loha", "rank": 4}, "hada_w1_a"),
    "lokr": ({"algo": "lokr", "rank": 4, "options": {"factor": 4}}, "lokr_w1"),
    "dora-lora": ({"algo": "lora", "rank": 4, "dora": True}, "dora_scale"),
    "diag-oft": ({"algo": "diag-oft", "rank": 4}, "oft_blocks"),
    "full": ({"algo": "full"}, "diff"),
}


@pytest.mark.parametrize("name", list(ALGOS))
def test_fixed_batch_loss_decreases(tmp_path, shapes_dir, name):
    net, key = ALGOS[name]
    cfg = make_cfg(tmp_path, shapes_dir, network={"options": {}, **net}, optimizer={"learning_rate": 8e-3},
                   train={"max_train_steps": 6}, output={"save_state": False}, eval={"enabled": True})
    tr, res = _run(cfg)
    (s0, first), (s1, last) = res.eval_losses[0], res.eval_losses[-1]
    assert (s0, s1) == (0, 6)
    assert math.isfinite(first) and last < 0.975 * first, res.eval_losses
    sd = _tensors(res.adapter_path)
    assert any(k.endswith("." + key) for k in sd)
    if name == "locon":  # k×k convolutions are adapted with 4-D (r, in, 3, 3) downs
        assert any(v.dim() == 4 and v.shape[-1] == 3 for k, v in sd.items() if k.endswith("lora_down.weight"))
    if name == "dora-lora":
        assert read_metadata(res.adapter_path).get("lyco_dora_axis") in ("output", None)


# ----------------------------------------------------------------------------- resume

def _resume_cfg(out, shapes_dir, reg_dir):
    return make_cfg(
        out, shapes_dir,
        data={"reg_dir": str(reg_dir), "flip_aug": True, "shuffle_caption": True, "keep_tokens": 1,
              "caption_dropout_rate": 0.2, "caption_tag_dropout_rate": 0.1},
        network={"algo": "lokr", "rank": 4, "options": {"factor": 4, "rank_dropout": 0.1, "dropout": 0.05}},
        optimizer={"learning_rate": 2e-3, "lr_scheduler": "cosine", "lr_warmup_steps": 1},
        train={"max_train_steps": 6, "batch_size": 2, "gradient_accumulation_steps": 2, "noise_offset": 0.05,
               "min_snr_gamma": 5.0, "cpu": True},  # the promise is for the CPU (GPU kernels may vary)
        output={"save_every_n_steps": 3},
        sample={"prompts": ["lycoshape, red circle"], "seeds": [0], "steps": 2},
        eval={"enabled": True, "every_n_steps": 3})


class _Stop(Exception):
    pass


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, shapes_dir, reg_dir):
    _, full = _run(_resume_cfg(tmp_path / "a", shapes_dir, reg_dir))
    assert full.steps == 6 and full.epochs == 1  # 4 steps an epoch: 8 train + 8 reg samples, batch 2, accum 2

    def stop_at_5(trainer, event, **info):
        if event == "step" and info["step"] == 5:
            raise _Stop()

    b = tmp_path / "b"
    with pytest.raises(_Stop):
        _run(_resume_cfg(b, shapes_dir, reg_dir), callbacks=[stop_at_5])
    assert not (b / "adapter.safetensors").exists()
    st = find_state(str(b))
    assert st.endswith("adapter-step00000003-state")
    assert json.loads(Path(st, "state.json").read_text())["batch_in_epoch"] == 6  # mid-epoch: 6 of its 8 batches done

    tr, resumed = _run(_resume_cfg(b, shapes_dir, reg_dir), resume=str(b))
    assert resumed.steps == 6
    _assert_same_tensors(_tensors(full.adapter_path), _tensors(resumed.adapter_path))
    fa = {k: v for k, v in _tensors(os.path.join(full.states[-1], "state.safetensors")).items()
          if not k.startswith("rng.")}
    fb = {k: v for k, v in _tensors(os.path.join(resumed.states[-1], "state.safetensors")).items()
          if not k.startswith("rng.")}
    _assert_same_tensors(fa, fb)  # fp32 adapter and optimizer moments too
    assert resumed.losses == full.losses
    assert [s for s, _ in resumed.eval_losses] == [s for s, _ in full.eval_losses]
    # the comparison is not vacuous: the adapter changed after the resume point
    mid = _tensors(str(b / "adapter-step00000003.safetensors"))
    assert any(not torch.equal(mid[k], v) for k, v in _tensors(resumed.adapter_path).items())


def test_resume_refuses_a_state_of_another_network(tmp_path, shapes_dir):
    cfg = make_cfg(tmp_path, shapes_dir, train={"max_train_steps": 1})
    _run(cfg)
    other = cfg.replace(network={"algo": "lora", "options": {}}, output={"overwrite": True})
    with pytest.raises(TrainingError, match="does not match"):
        Trainer(other, resume=str(tmp_path)).setup()
    with pytest.raises(lyco.ConfigError, match="no training state"):
        Trainer(other, resume=str(tmp_path / "cache")).setup()


# ----------------------------------------------------------------------------- atomic checkpoints

def _failing_atomic_write(monkeypatch, predicate):
    """Make atomic writes whose path matches ``predicate`` die half-way through writing."""
    real = safetensors_io.atomic_write
    hits = []

    @contextlib.contextmanager
    def atomic_write(path, **kw):
        with real(path, **kw) as f:
            if predicate(str(path)):
                hits.append(str(path))

                class Half:
                    def write(self, b):
                        f.write(bytes(b)[: len(b) // 2])
                        raise OSError("simulated: disk full")
                yield Half()
            else:
                yield f
    monkeypatch.setattr(safetensors_io, "atomic_write", atomic_write)
    return hits


def _no_temp_files(folder):
    return [p for p in Path(folder).rglob("*") if p.name.endswith(".tmp") or ".old-" in p.name]


def test_adapter_write_interrupted_keeps_the_previous_file(tmp_path, shapes_dir, monkeypatch):
    cfg = make_cfg(tmp_path, shapes_dir, train={"max_train_steps": 2}, output={"save_state": False})
    _, first = _run(cfg)
    before = Path(first.adapter_path).read_bytes()
    hits = _failing_atomic_write(monkeypatch, lambda p: p.endswith(os.sep + "adapter.safetensors"))
    with pytest.raises(OSError, match="simulated"):
        _run(cfg.replace(optimizer={"learning_rate": 1e-2}, output={"overwrite": True}))
    assert hits, "the adapter was not written through atomic_write"
    assert Path(first.adapter_path).read_bytes() == before
    assert lyco.load(first.adapter_path).num_params() > 0
    assert _no_temp_files(tmp_path) == []


def test_state_write_interrupted_keeps_the_previous_state(tmp_path, shapes_dir, monkeypatch):
    cfg = make_cfg(tmp_path, shapes_dir, train={"max_train_steps": 5}, output={"save_every_n_steps": 2})
    hits = _failing_atomic_write(monkeypatch, lambda p: "step00000004-state" in p and p.endswith("state.json"))
    with pytest.raises(OSError, match="simulated"):
        _run(cfg)
    assert hits
    assert find_state(str(tmp_path)).endswith("adapter-step00000002-state")
    assert not (tmp_path / "adapter-step00000004-state").exists()
    assert _no_temp_files(tmp_path) == []
    monkeypatch.undo()
    (tmp_path / ".adapter-step00000006-state.k1ll3d.tmp").mkdir()  # what a SIGKILL mid-write leaves
    (tmp_path / ".adapter.safetensors.k1ll3d.tmp").write_bytes(b"partial")
    tr, res = _run(cfg, resume=str(tmp_path))
    assert _no_temp_files(tmp_path) == []  # cleaned up by the next run
    assert res.steps == 5 and tr.losses[0][0] == 1  # history continued from the state


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, shapes_dir, monkeypatch):
    real = Trainer.compute_loss

    def poisoned(self, *a, **kw):
        loss = real(self, *a, **kw)
        return loss * float("nan") if self.model.training and self.global_step == 2 else loss
    monkeypatch.setattr(Trainer, "compute_loss", poisoned)
    cfg = make_cfg(tmp_path, shapes_dir, train={"max_train_steps": 5}, output={"save_every_n_steps": 2})
    with pytest.raises(TrainingError, match=r"NaN at step 3.*adapter-step00000002\.safetensors"):
        _run(cfg)
    assert lyco.load(str(tmp_path / "adapter-step00000002.safetensors")).num_params() > 0
    assert find_state(str(tmp_path)).endswith("adapter-step00000002-state")
    assert not (tmp_path / "adapter.safetensors").exists()
    assert not list(tmp_path.glob("adapter-step00000004*"))
    assert not (tmp_path / "logs").exists()  # log_with = "none"


# ----------------------------------------------------------------------------- files load back

def _forward(pipe, seed=0):
    dev = pipe.unet.device
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g).to(dev)
    t = torch.tensor([100, 700], device=dev)
    ids = pipe.tokenizer(["lycoshape, red circle", "a blue star"], padding="max_length", max_length=77,
                         truncation=True, return_tensors="pt").input_ids.to(dev)
    with torch.no_grad():
        return pipe.unet(x, t, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample


@pytest.mark.parametrize("net", [
    {"algo": "lokr", "rank": 4, "options": {"factor": 4}},
    {"algo": "lora", "rank": 4, "dora": True, "options": {}},
    {"algo": "diag-oft", "rank": 4, "options": {}},
    {"algo": "loha", "rank": 4, "preset": "full", "conv_rank": 2, "options": {}},
], ids=["lokr", "dora", "oft", "loha-conv"])
def test_saved_adapter_reproduces_the_training_forward(tmp_path, shapes_dir, net):
    cfg = make_cfg(tmp_path, shapes_dir, network=net, optimizer={"learning_rate": 5e-3},
                   train={"max_train_steps": 2}, output={"save_state": False})
    tr, res = _run(cfg)
    pipe = tr.pipe
    tr.network.eval()
    trained = _forward(pipe)
    tr.close()
    base = _forward(pipe)
    assert (trained - base).abs().max() > 1e-4  # training changed the model
    adapter = lyco.load(res.adapter_path)
    assert adapter.family == "sd1"
    handle = adapter.attach(pipe)
    try:
        loaded = _forward(pipe)
    finally:
        handle.detach()
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- metadata and files

def test_checkpoint_files_and_metadata(tmp_path, shapes_dir):
    cfg = make_cfg(tmp_path, shapes_dir, train={"max_train_steps": 4}, data={"shuffle_caption": True},
                   output={"save_every_n_steps": 2, "output_name": "shapes_lokr", "metadata_author": "me",
                           "save_dtype": "fp16", "log_with": "tensorboard"},
                   sample={"prompts": ["lycoshape, red circle", "blue star"], "seeds": [3], "steps": 2,
                           "compare_base": True}, eval={"enabled": True})
    tr, res = _run(cfg)
    out = Path(tmp_path)
    assert [Path(p).name for p in res.checkpoints] == ["shapes_lokr-step00000002.safetensors",
                                                       "shapes_lokr.safetensors"]
    md_mid = read_metadata(out / "shapes_lokr-step00000002.safetensors")
    md = read_metadata(out / "shapes_lokr.safetensors")
    for k in kohya_minimum_keys():
        assert k in md
    assert md["ss_output_name"] == "shapes_lokr" and md["ss_steps"] == "4" and md_mid["ss_steps"] == "2"
    assert md["ss_session_id"] == md_mid["ss_session_id"]
    assert float(md["ss_training_started_at"]) <= float(md["ss_training_finished_at"])
    assert md["ss_network_module"] == "lycoris.kohya"
    assert json.loads(md["ss_network_args"])["algo"] == "lokr"
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_v2"] == "False"
    assert json.loads(md["ss_dataset_dirs"]) == {"2_lycoshape": {"n_repeats": 2, "img_count": 4}}
    freq = json.loads(md["ss_tag_frequency"])["2_lycoshape"]
    assert sum(freq.values()) == 16  # 4 captions × 4 tags
    assert md["ss_num_train_images"] == "8" and md["ss_max_train_steps"] == "4"
    assert md["ss_resolution"] == "(32, 32)" and md["ss_shuffle_caption"] == "True"
    assert md["ss_sd_model_name"] == "tiny:sd1" and "ss_sd_model_hash" in md
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["modelspec.trigger_phrase"] == "lycoshape" and md["modelspec.author"] == "me"
    assert len(md["sshs_model_hash"]) == 64
    assert json.loads(md["lyco_train_config"])["network"]["algo"] == "lokr"
    assert all(v.dtype == torch.float16 for k, v in _tensors(out / "shapes_lokr.safetensors").items()
               if not k.endswith(".alpha"))
    for stem in ("shapes_lokr-step00000002", "shapes_lokr"):
        img = Image.open(out / f"{stem}-samples.png")
        assert img.size[0] > 2 * 128 and img.size[1] > 2 * 128  # (base, adapter) × 2 prompts
    assert Image.open(out / "shapes_lokr-loss.png").size[0] > 100
    log = json.loads((out / "shapes_lokr-loss.json").read_text())
    assert [s for s, _ in log["train"]] == [1, 2, 3, 4]
    assert (out / "shapes_lokr-state" / "state.json").is_file()
    events = list((out / "logs").rglob("events.out.tfevents*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()
    assert {"loss/train", "grad_norm", "loss/eval"} <= set(tags["scalars"])
    assert any(t.startswith("lr/") for t in tags["scalars"]) and "samples" in tags["images"]


def kohya_minimum_keys():
    return ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
            "ss_network_args")


def test_latent_and_text_encoder_caches(tmp_path, shapes_dir, monkeypatch):
    cache = tmp_path / "shared-cache"
    cfg = make_cfg(tmp_path / "one", shapes_dir, data={"cache_dir": str(cache)},
                   optimizer={"text_encoder_lr": 0.0}, train={"max_train_steps": 2})
    tr1, _ = _run(cfg)
    assert tr1.cache.encoded == 4 and tr1.cache.hits == 0
    assert not tr1.train_te and len(tr1.text.cache) > 0  # frozen TE: outputs remembered per caption
    assert not any(layer.name.startswith("text_encoder") for layer in tr1.network.layers.values())

    from lyco.models import tiny
    pipe = tiny.tiny_sd1_pipeline()
    calls = []
    real = pipe.vae.encode
    monkeypatch.setattr(pipe.vae, "encode", lambda x: calls.append(1) or real(x))
    tr2 = Trainer(cfg.replace(output={"output_dir": str(tmp_path / "two")}), pipeline=pipe)
    tr2.setup()
    assert tr2.cache.hits == 4 and tr2.cache.encoded == 0 and calls == []


# ----------------------------------------------------------------------------- optimisation details

def test_param_groups_learning_rates_and_loraplus(tmp_path, shapes_dir):
    cfg = make_cfg(tmp_path, shapes_dir, network={"algo": "lora", "options": {}},
                   optimizer={"learning_rate": 1e-3, "unet_lr": 2e-3, "text_encoder_lr": 5e-4,
                              "loraplus_ratio": 4.0})
    tr = Trainer(cfg).setup()
    lrs = {g["name"]: g["lr"] for g in tr.optimizer.param_groups}
    assert lrs == {"unet": 2e-3, "unet+": 8e-3, "text_encoder": 5e-4, "text_encoder+": 2e-3}
    ups = {id(p) for g in tr.optimizer.param_groups if g["name"].endswith("+") for p in g["params"]}
    for layer in tr.network.layers.values():
        assert (id(layer.params["lora_up__weight"]) in ups) and id(layer.params["lora_down__weight"]) not in ups


def test_setup_errors(tmp_path, shapes_dir, monkeypatch):
    import sys
    from lyco.train.loop import make_optimizer
    with pytest.raises(lyco.ConfigError, match="not multiples of 32"):
        Trainer(make_cfg(tmp_path, shapes_dir, data={"resolution": [48, 48], "bucket_reso_steps": 16,
                                                     "min_bucket_reso": 16})).setup()
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))]}]
    for name, module in (("prodigy", "prodigyopt"), ("adamw8bit", "bitsandbytes")):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
        with pytest.raises(lyco.ConfigError, match=f"needs {module}: pip install {module}"):
            make_optimizer(make_cfg(tmp_path, shapes_dir, optimizer={"type": name}), groups)
    with pytest.raises(lyco.ConfigError, match="bad arguments"):
        make_optimizer(make_cfg(tmp_path, shapes_dir, optimizer={"args": {"nesterov": True}}), groups)
    with pytest.raises(lyco.ConfigError, match="unknown option 'factr'"):
        Trainer(make_cfg(tmp_path, shapes_dir, network={"options": {"factr": 4}})).setup()


def test_adamw_class_follows_the_flat_key(tmp_path, shapes_dir):
    """[optimizer] flat picks lyco.optim.FlatAdamW (the default) or torch's AdamW; args only torch's class takes, and
    FSDP's local shards, get torch's."""
    from lyco.optim import FlatAdamW
    from lyco.train.loop import make_optimizer

    def cls(flat_ok=True, **opt):
        groups = [{"params": [torch.nn.Parameter(torch.zeros(2))]}]
        return type(make_optimizer(make_cfg(tmp_path, shapes_dir, optimizer=opt), groups, flat_ok=flat_ok))

    assert cls() is FlatAdamW
    assert cls(args={"fused": False}) is FlatAdamW
    assert cls(flat=False) is torch.optim.AdamW
    assert cls(args={"amsgrad": True}) is torch.optim.AdamW
    assert cls(flat_ok=False) is torch.optim.AdamW
    # the trainer itself steps FlatAdamW, and its file names the recipe: torch's AdamW
    tr = Trainer(make_cfg(tmp_path, shapes_dir)).setup()
    try:
        assert isinstance(tr._inner_optimizer(), FlatAdamW)
        assert tr.metadata()["ss_optimizer"].startswith("torch.optim.adamw.AdamW(")
    finally:
        tr.close()
    with pytest.raises(lyco.ConfigError, match="tiny:sd3"):
        Trainer(make_cfg(tmp_path, shapes_dir, model="tiny:sd3")).setup()
    with pytest.raises(lyco.ConfigError, match="does not exist"):
        Trainer(make_cfg(tmp_path, shapes_dir, model=str(tmp_path / "nope"))).setup()


def test_lr_schedules():
    f = lr_lambda("cosine", 2, 10)
    assert f(0) == pytest.approx(1 / 3) and f(1) == pytest.approx(2 / 3) and f(2) == pytest.approx(1.0)
    assert f(10) == pytest.approx(0.0) and f(6) == pytest.approx(0.5)
    g = lr_lambda("linear", 0, 10)
    assert g(0) == 1.0 and g(5) == pytest.approx(0.5) and g(10) == 0.0
    assert lr_lambda("constant", 0, 10)(7) == 1.0
    h = lr_lambda("cosine_with_restarts", 0, 10, cycles=2)
    assert h(0) == pytest.approx(1.0) and h(5) == pytest.approx(1.0) and h(4) < 0.2


def test_gradient_checkpointing_gives_the_same_gradients():
    from lyco.models.tiny import tiny_sd1_pipeline
    from lyco.train import from_dict
    from lyco.train.loop import build_network
    pipe = tiny_sd1_pipeline()
    net, _ = build_network(pipe, from_dict({"network": {"algo": "lora", "rank": 2}}), "sd1")
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_up" in name:
                p.normal_(0, 0.1)  # a non-zero adapter, so every factor gets a gradient
    g = torch.Generator().manual_seed(0)
    x, h = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 500])

    def grads():
        net.zero_grad(set_to_none=True)
        pipe.unet(x, t, encoder_hidden_states=h).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    plain = grads()
    pipe.unet.enable_gradient_checkpointing()
    pipe.unet.train()
    ckpt = grads()
    assert set(plain) == set(ckpt) and len(plain) == 2 * sum(1 for k in net.layers if k.startswith("unet"))
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-7)
    net.detach()


def test_epoch_checkpoints_and_per_pattern_overrides(tmp_path, shapes_dir):
    cfg = make_cfg(tmp_path, shapes_dir, train={"max_train_steps": 0, "max_train_epochs": 3, "batch_size": 4},
                   output={"save_every_n_epochs": 1, "keep_last_n_checkpoints": 1},
                   network={"options": {}, "overrides": [{"pattern": "*.attn2.*", "algo": "lora", "rank": 2},
                                          {"pattern": "*", "component": "text_encoder",
                                           "algo": "loha"}]})
    tr, res = _run(cfg)
    assert res.steps == 6 and res.epochs == 3  # 8 samples / batch 4 = 2 steps an epoch
    # epoch 1's checkpoint was pruned (keep_last_n_checkpoints = 1), with its state
    assert [Path(p).name for p in res.checkpoints] == ["adapter-000002.safetensors", "adapter.safetensors"]
    assert sorted(p.name for p in tmp_path.glob("adapter-0*")) == ["adapter-000002-state",
                                                                     "adapter-000002.safetensors"]
    assert read_metadata(res.checkpoints[0])["ss_epoch"] == "2"
    assert read_metadata(res.checkpoints[1])["ss_epoch"] == "3"
    sd = _tensors(res.adapter_path)
    q2 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"
    q1 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert sd[f"{q2}.lora_down.weight"].shape[0] == 2 and f"{q1}.lokr_w1" in sd
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w1_a" in sd


def test_bf16_mixed_precision_without_latent_cache(tmp_path, shapes_dir):
    cfg = make_cfg(tmp_path, shapes_dir, train={"max_train_steps": 2, "mixed_precision": "bf16"},
                   output={"save_state": False}, data={"cache_latents": False, "flip_aug": True})
    tr, res = _run(cfg)
    assert tr.cache is None and not (tmp_path / "cache").exists()  # images encoded at every step
    assert tr.pipe.unet.dtype == torch.bfloat16
    assert all(math.isfinite(v) for _, v in res.losses)
    assert all(p.dtype == torch.float32 for p in tr.network.parameters())


@pytest.mark.parametrize("network", [{"algo": "lora", "rank": 4, "dora": True}, {"algo": "ia3"},
                                     {"algo": "boft", "rank": 4}], ids=["dora", "ia3", "boft"])
def test_bf16_mixed_precision_on_the_rebuilt_op(network, tmp_path, shapes_dir):
    """The algorithms that train on the rebuilt op (bf16 base weights, fp32 adapter, bf16 autocast):
    finite losses, fp32 parameters with finite gradients, and the adapter moves."""
    cfg = make_cfg(tmp_path, shapes_dir, network={**network, "options": {}},
                   train={"max_train_steps": 2, "mixed_precision": "bf16"}, output={"save_state": False})
    tr = Trainer(cfg)
    tr.setup()
    assert all(layer.prefers_rebuild for layer in tr.network.layers.values())
    before = {k: v.detach().clone() for k, v in tr.network.state_dict().items()}
    res = tr.train()
    assert all(math.isfinite(v) for _, v in res.losses)
    params = dict(tr.network.named_parameters())
    assert all(p.dtype == torch.float32 for p in params.values())
    moved = [k for k, v in tr.network.state_dict().items() if k in params and not torch.equal(v, before[k])]
    assert moved, "no adapter tensor changed"


# ----------------------------------------------------------------------------- other families

def test_sdxl_time_ids_and_two_text_encoders(tmp_path, shapes_dir):
    cfg = make_cfg(tmp_path, shapes_dir, model="tiny:sdxl", train={"max_train_steps": 2},
                   output={"save_state": False}, data={"bucket_reso_steps": 16})
    seen = []
    tr = Trainer(cfg)
    tr.setup()
    tr.pipe.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("added_cond_kwargs")),
                                           with_kwargs=True)
    res = tr.train()
    cond = seen[0]
    assert cond["time_ids"].shape == (2, 6) and cond["time_ids"][0].tolist() == [32, 32, 0, 0, 32, 32]
    assert cond["text_embeds"].shape == (2, 32)
    keys = {k.split(".")[0] for k in _tensors(res.adapter_path)}
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    assert any(k.startswith("lora_unet_input_blocks_4_1_") for k in keys)
    assert read_metadata(res.adapter_path)["ss_base_model_version"] == "sdxl_base_v1-0"
    assert all(math.isfinite(v) for _, v in res.losses)


def test_v_prediction_min_snr_and_zero_terminal_snr(tmp_path, shapes_dir):
    cfg = make_cfg(tmp_path, shapes_dir, model="tiny:sd2",
                   train={"max_train_steps": 2, "min_snr_gamma": 5.0, "zero_terminal_snr": True},
                   output={"save_state": False})
    tr, res = _run(cfg)
    assert tr.prediction_type == "v_prediction"
    ac = tr.alphas_cumprod
    assert float(ac[-1]) < 1e-6  # zero terminal SNR
    x, n = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 999])
    a = ac[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - ac[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(tr._target(x, n, t), a * n - s * x)  # v = √ᾱ·ε − √(1−ᾱ)·x₀
    snr = ac[t] / (1 - ac[t])
    torch.testing.assert_close(tr._weights(t, None), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
    md = read_metadata(res.adapter_path)
    assert md["ss_base_model_version"] == "sd_v2_v" and md["modelspec.prediction_type"] == "v"
    assert all(math.isfinite(v) for _, v in res.losses)


# ----------------------------------------------------------------------------- command line

def test_cli_trains_from_a_diffusers_folder(tmp_path, shapes_dir, capsys):
    from lyco.cli import main
    from lyco.models.tiny import save_tiny, tiny_sd1_pipeline
    save_tiny(tiny_sd1_pipeline(), tmp_path / "model")
    toml = tmp_path / "run.toml"
    toml.write_text(f'''
[model]
path = "model"
[data]
train_dir = "{shapes_dir}"
resolution = 32
bucket_reso_steps = 32
min_bucket_reso = 32
[network]
algo = "loha"
rank = 2
[train]
max_train_steps = 2
batch_size = 2
[output]
output_dir = "out"
output_name = "cli"
progress_bar = false
log_with = "none"
''', encoding="utf-8")
    assert main(["train", str(toml), "--lr", "1e-3", "--eval-num-images", "1"]) == 0
    out = capsys.readouterr().out
    adapter = tmp_path / "out" / "cli.safetensors"
    assert adapter.is_file() and str(adapter) in out and "fixed-batch eval loss" in out
    md = read_metadata(adapter)
    assert md["ss_sd_model_name"] == "model" and len(md["ss_new_sd_model_hash"]) == 64
    assert md["ss_learning_rate"] == "0.001"
    assert main(["inspect", str(adapter), "--no-modules"]) == 0
    assert main(["train", str(toml)]) == 2  # the output exists: refused without --overwrite
    assert "already exists" in capsys.readouterr().err
    # the run wrote its effective config; with it, --resume continues the finished run for one more step
    written = tmp_path / "out" / "cli-config.toml"
    assert main(["train", str(written), "--resume", str(tmp_path / "out"), "--max-train-steps", "3"]) == 0
    md = read_metadata(adapter)
    assert md["ss_steps"] == "3" and json.loads(md["ss_network_args"])["algo"] == "loha"


@pytest.mark.parametrize("mode", ["auto", "bypass", "rebuild"])
def test_network_mode_reaches_every_layer(mode, tmp_path):
    """``[network] mode`` (``--network-mode``) sets each adapter layer's training path; under ``auto`` a
    DoRA network takes the rebuilt op (only x kept) and a LoRA one the delta path."""
    from lyco.train import from_dict
    from lyco.models.tiny import tiny_sd1_pipeline
    from lyco.train.loop import build_network
    pipe = tiny_sd1_pipeline()
    for algo, dora in (("lora", False), ("lora", True)):
        cfg = from_dict({"model": {"path": "tiny:sd1"}, "network": {"algo": algo, "rank": 4, "dora": dora,
                                                                     "mode": mode}})
        net, _ = build_network(pipe, cfg, "sd1")
        try:
            layers = list(net.layers.values())
            assert layers and all(layer.mode == mode for layer in layers)
            # the path each layer's host takes (decided from the modes when it refreshes its active list)
            taken = {layer.host._refresh() and layer.host._rebuild for layer in layers}
            assert taken == {dora if mode == "auto" else mode == "rebuild"}
        finally:
            net.detach()


def test_bf16_without_autocast(tmp_path, shapes_dir):
    """[train] autocast = false: the accelerator runs without mixed precision while the model is cast to bf16 and the
    fp32 adapter trains on it; fp16 refuses it (loss scaling needs autocast)."""
    for mp in ("fp16", "no"):  # an option that would do nothing (or the wrong thing) is refused
        with pytest.raises(lyco.ConfigError, match="autocast = false needs mixed_precision = 'bf16'"):
            Trainer(make_cfg(tmp_path / "h", shapes_dir, train={"mixed_precision": mp, "autocast": False}))
    runs = {}
    for ac in (True, False):
        cfg = make_cfg(tmp_path / str(ac), shapes_dir,
                       train={"mixed_precision": "bf16", "autocast": ac, "cpu": True, "max_train_steps": 2})
        tr = Trainer(cfg)
        try:
            res = tr.train()
            runs[ac] = (tr.accelerator.mixed_precision, tr.weight_dtype, tr.pipe.unet.dtype,
                        {p.dtype for p in tr.network.parameters()}, [l for _, l in res.losses])
        finally:
            tr.close()
    assert runs[True][:4] == ("bf16", torch.bfloat16, torch.bfloat16, {torch.float32})
    assert runs[False][:4] == ("no", torch.bfloat16, torch.bfloat16, {torch.float32})
    assert len(runs[False][4]) == 2 and all(math.isfinite(x) for x in runs[False][4])


def test_a_non_finite_adapter_is_not_saved(tmp_path, shapes_dir, monkeypatch):
    """A NaN that enters with the last optimizer step never reaches a loss: the checkpoint itself refuses to write
    such an adapter, names the tensor and the last good file, and leaves that file as it was."""
    real = Trainer.save_checkpoint
    first = tmp_path / "adapter-step00000002.safetensors"
    seen = []

    def poison_then_save(self, stem, **kw):
        if self.global_step == 4:
            seen.append(first.read_bytes())  # the good checkpoint as it was before the bad save
            with torch.no_grad():
                next(iter(self.network.parameters())).view(-1)[0] = float("nan")
        return real(self, stem, **kw)
    monkeypatch.setattr(Trainer, "save_checkpoint", poison_then_save)
    cfg = make_cfg(tmp_path, shapes_dir, train={"max_train_steps": 4}, output={"save_every_n_steps": 2})
    with pytest.raises(TrainingError, match=r"adapter's \S+ is not finite .* at step 4: .*adapter.* is not written; "
                                            r"the last good checkpoint is .*adapter-step00000002\.safetensors"):
        _run(cfg)
    assert seen and first.read_bytes() == seen[0] and lyco.load(str(first)).num_params() > 0
    assert not (tmp_path / "adapter.safetensors").exists()
    assert not list(tmp_path.glob("adapter-step00000004*"))
