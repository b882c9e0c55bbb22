"""``lyco eval``: every algorithm on every concept, trained with lyco's trainer, scored, tabulated.

The LyCORIS paper's evaluation framework (Yeh et al., ICLR 2024) on the tiny world:

1. **Base model and judge**: the pretrained world base (:mod:`lyco.world.base`) and the world
   classifier (:mod:`lyco.world.classifier`); ``weights="random"`` uses randomly initialised ones
   (quick runs and tests: the numbers are then meaningless, the machinery is the same).
2. **Fixed prompts and seeds**: per concept, ``n_prompts`` trigger prompts
   (``"a red zkz on a white background"``, :func:`lyco.world.scene.eval_set`) and ``n_prompts``
   prompts without a trigger, shared by all concepts; each sampled with the same ``seeds``
   (DDIM, fixed steps and guidance). The base model's samples are computed once per run.
3. **Training**: for each (algorithm, concept) the concept dataset (``n_images`` captioned images,
   :func:`lyco.world.scene.write_concept_dataset`) is trained with :class:`lyco.train.loop.Trainer`
   — the trainer behind ``lyco train`` — at the same budget for every algorithm (steps, batch,
   data, schedule, seed), with the per-algorithm rank/learning-rate settings of :data:`ALGORITHMS`.
4. **Sampling from the file**: the saved adapter file is loaded back with
   :func:`lyco.pipeline.load` onto the base pipeline, so what is scored is what a user would load.
5. **Scores** (:mod:`lyco.world.metrics`): fidelity, controllability, diversity (Vendi), base
   preservation, sample quality, plus train/sample seconds, file size and parameter count.
6. **Outputs** (flat in ``out``): ``results.json``, ``results.md`` (the table and the settings
   table), ``tradeoff.png`` (fidelity vs preservation per algorithm, one panel per concept) and
   ``grid_<concept>.png`` (rows: the rendered target, the base, each algorithm; columns: trigger
   prompts and two prompts without the trigger, seed ``seeds[0]``). Every file is written to a
   temporary name and renamed.

Jobs (one per algorithm × concept) run in this process (``jobs=1``) or in worker processes
(``jobs=N``; spawned, each with its own base pipeline and classifier): the tiny model is
launch-bound on a GPU and single-core-bound on a CPU, so several trainings side by side use the
machine better than one.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from . import metrics
from . import scene

log = logging.getLogger("lyco.eval")

# ----------------------------------------------------------------------------------------------
# The algorithms and their settings
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Algo:
    """One row of the comparison: a ``[network]`` table and a learning rate for ``lyco train``."""

    name: str
    label: str
    network: Mapping[str, Any]
    lr: float
    te_lr: float | None = None  # text-encoder learning rate (None: the same as lr)
    note: str = ""

    def layers(self) -> str:
        return str(self.network.get("preset", "attn-mlp"))


# Settings, decided here (the paper tunes each algorithm's learning rate separately and compares at
# one budget; we do the same on this world). Every algorithm trains the UNet *and* the text encoder
# (the trigger word's embedding is untrained in the base, so the concept has to be routed through
# the text encoder's layers), with the same steps, batch, data, schedule and seed. Ranks are chosen
# so the low-rank methods have comparable capacity: LoRA/LoCon/DoRA/GLoRA rank 8; LoHa rank 4
# (its Hadamard product has rank up to 4² = 16 at about the parameters of a rank-8 LoRA); LoKr at
# two Kronecker factors (small factor 4: big second factor; factor -1: balanced). Learning rates
# follow the common practice of each family, scaled for a ~4 M-parameter model: LoRA-like 1e-3;
# LoHa/LoKr 2e-3 (products of two small factors start slower); OFT/BOFT 3e-3 (rotations start at the
# identity); (IA)³ 1e-2 (one scale per channel); Full 2e-4 (every weight moves). These are the rates
# of the committed H100 table (benchmarks/results/eval_h100). Checked afterwards on the pretrained
# base (CPU, 100 steps × batch 8, no warm-up to speak of): BOFT is the most sensitive — at 1.5× (4.5e-3)
# its loss jumped from 0.11 to 0.88 within 3 steps and colours/backgrounds broke, at 1e-3 it starts
# like LoRA; OFT at 4.5e-3 rose to 0.15 early, at 2e-3 not; (IA)³ at 1.5e-2 barely moved its loss in
# 100 steps and is still stable at 3e-2. At the table's 300 steps with a 15-step warm-up all of them
# train (BOFT has the lowest preservation there); `--lr-scale` or editing this table changes them.
ALGORITHMS: dict[str, Algo] = {a.name: a for a in (
    Algo("lora", "LoRA", {"algo": "lora", "rank": 8, "alpha": 8, "preset": "attn-mlp"}, 1e-3,
         note="attention + feed-forward linears (kohya's default)"),
    Algo("locon", "LoCon", {"algo": "lora", "rank": 8, "alpha": 8, "conv_rank": 8, "conv_alpha": 8,
                            "preset": "full"}, 1e-3, note="+ ResNet/sampler convolutions"),
    Algo("loha", "LoHa", {"algo": "loha", "rank": 4, "alpha": 4, "preset": "full"}, 2e-3,
         note="Hadamard product, rank 4 (effective ≤ 16)"),
    Algo("lokr4", "LoKr f=4", {"algo": "lokr", "rank": 8, "alpha": 8, "preset": "full",
                               "options": {"factor": 4}}, 2e-3, note="Kronecker, factor 4"),
    Algo("lokr-1", "LoKr f=-1", {"algo": "lokr", "rank": 8, "alpha": 8, "preset": "full",
                                 "options": {"factor": -1}}, 2e-3, note="Kronecker, balanced factors"),
    Algo("dora", "DoRA", {"algo": "lora", "rank": 8, "alpha": 8, "preset": "attn-mlp", "dora": True}, 1e-3,
         note="LoRA + weight decomposition (magnitude per output channel)"),
    Algo("oft", "OFT", {"algo": "diag-oft", "rank": 8, "preset": "attn-mlp"}, 3e-3,
         note="block-diagonal orthogonal (rank 8: LyCORIS's block setting)"),
    Algo("boft", "BOFT", {"algo": "boft", "rank": 8, "preset": "attn-mlp"}, 3e-3,
         note="butterfly orthogonal (rank 8: LyCORIS's block setting)"),
    Algo("glora", "GLoRA", {"algo": "glora", "rank": 8, "alpha": 8, "preset": "attn-mlp"}, 1e-3,
         note="generalised LoRA (weight and bias terms)"),
    Algo("ia3", "(IA)³", {"algo": "ia3", "preset": "ia3"}, 1e-2,
         note="learned scales on keys, values and FF inputs"),
    Algo("full", "Full", {"algo": "full", "preset": "full"}, 2e-4,
         note="native fine-tuning of the same layers as LoCon (stored as a difference)"),
)}


#: relative cost of a training step (aten ops per step on the world base, counted on the CPU): only
#: used to start the longest jobs first when several run side by side
_COST = {"boft": 5.1, "dora": 2.7, "loha": 2.4, "oft": 1.9, "glora": 1.7, "lokr4": 1.6, "lokr-1": 1.6,
         "locon": 1.3, "lora": 1.0, "full": 0.95, "ia3": 0.6}


def parse_algos(spec: str | Sequence[str] | None) -> list[str]:
    """``"lora,loha"`` / a list / None (= all) → validated algorithm names."""
    if spec is None or spec == "all" or spec == ["all"]:
        return list(ALGORITHMS)
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bad = [n for n in names if n not in ALGORITHMS]
    if bad:
        raise ConfigError(f"unknown algorithm(s) {bad}; expected some of: {', '.join(ALGORITHMS)}")
    if not names:
        raise ConfigError("no algorithm given")
    return names


def parse_concepts(spec: str | Sequence[str] | None) -> list[str]:
    if spec is None or spec == "all":
        return list(scene.CONCEPTS)
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bad = [n for n in names if n not in scene.CONCEPTS]
    if bad:
        raise ConfigError(f"unknown concept(s) {bad}; expected some of: {', '.join(scene.CONCEPTS)}")
    if not names:
        raise ConfigError("no concept given")
    return names


# ----------------------------------------------------------------------------------------------
# Run settings
# ----------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """Everything that fixes a run (recorded in ``results.json``)."""

    steps: int = 300            #: optimizer steps per adapter (the same for every algorithm)
    batch_size: int = 16
    n_images: int = 16          #: images in each concept dataset
    n_prompts: int = 8          #: trigger prompts per concept, and prompts without a trigger
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    sample_steps: int = 25      #: DDIM steps
    guidance: float = 4.0       #: classifier-free guidance scale
    lr_scheduler: str = "cosine"
    warmup: float = 0.05        #: fraction of the steps
    lr_scale: float = 1.0       #: multiplies every algorithm's learning rate
    train_seed: int = 0
    data_seed: int = 0
    prompt_seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"     #: base model dtype during training: fp32 or bf16 (adapters stay fp32)
    save_dtype: str = "fp16"    #: dtype of the adapter files (what users get)
    weights: str = ""           #: base weights file ('' = the shipped one, 'random' = random init)
    classifier_weights: str = ""  #: classifier weights ('' = shipped, 'random' = random init)
    jobs: int = 1
    threads: int = 0            #: torch threads per job (0 = 1 on the CPU or with several jobs, else torch's default)
    quick: bool = False
    cuda_graph: bool = False    #: train with ``[train] cuda_graph`` (GPU only; ~5× faster steps on this launch-bound model)

    @classmethod
    def quick_settings(cls, **kw) -> "Settings":
        """CI sizes: 2 steps, 2 prompts × 1 seed, 1 DDIM step — the machinery, not the numbers."""
        d = dict(steps=2, batch_size=2, n_images=4, n_prompts=2, seeds=(0,), sample_steps=1, quick=True)
        d.update(kw)
        return cls(**d)

    def validate(self) -> "Settings":
        if self.steps < 1 or self.batch_size < 1 or self.n_images < 1 or self.n_prompts < 1:
            raise ConfigError("steps, batch size, images and prompts must all be at least 1")
        if not self.seeds:
            raise ConfigError("at least one seed is needed")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision {self.precision!r}: expected fp32 or bf16")
        if self.save_dtype not in ("fp32", "fp16", "bf16"):
            raise ConfigError(f"save dtype {self.save_dtype!r}: expected fp32, fp16 or bf16")
        if self.jobs < 1:
            raise ConfigError(f"jobs must be at least 1, got {self.jobs}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {self.device}: CUDA is not available on this machine")
        return self

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["seeds"] = list(self.seeds)
        return d


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------


@dataclass
class PromptSet:
    """``prompts`` × ``seeds``, sample ``i`` = prompt ``i // len(seeds)`` with seed ``i % len(seeds)``."""

    prompts: list[str]
    attrs: list[scene.Attrs]
    seeds: list[int]

    def __len__(self) -> int:
        return len(self.prompts) * len(self.seeds)

    def sample_attrs(self) -> list[scene.Attrs]:
        return [a for a in self.attrs for _ in self.seeds]

    def groups(self) -> list[int]:
        return [i for i in range(len(self.prompts)) for _ in self.seeds]

    def attr_lists(self, heads: Iterable[str]) -> dict[str, list[str]]:
        sa = self.sample_attrs()
        return {h: [getattr(a, h) for a in sa] for h in heads}

    def to_json(self) -> dict:
        return {"prompts": list(self.prompts), "seeds": list(self.seeds),
                "attrs": [dataclasses.asdict(a) for a in self.attrs]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "PromptSet":
        return cls(list(d["prompts"]), [scene.Attrs(**a) for a in d["attrs"]], [int(x) for x in d["seeds"]])


def prompt_sets(concepts: Sequence[str], s: Settings) -> tuple[dict[str, PromptSet], PromptSet]:
    """``({concept: trigger prompts}, prompts without a trigger)``; fixed by ``prompt_seed``."""
    seeds = [int(x) for x in s.seeds]
    trig = {}
    for c in concepts:
        pairs = scene.eval_set(c, s.n_prompts, seed=s.prompt_seed)
        trig[c] = PromptSet([p for p, _ in pairs], [a for _, a in pairs], seeds)
    pairs = scene.eval_set(None, s.n_prompts, seed=s.prompt_seed + 1)
    return trig, PromptSet([p for p, _ in pairs], [a for _, a in pairs], seeds)


# ----------------------------------------------------------------------------------------------
# Sampling and classifying
# ----------------------------------------------------------------------------------------------


@dataclass
class Samples:
    """Images of one prompt set (``N×3×H×W`` in ``[-1, 1]``, float32, CPU) and what the classifier
    says about them: ``labels[head]`` (class names), ``probs[head]`` (``N×C``), ``features`` (``N×D``)."""

    images: torch.Tensor
    labels: dict[str, list[str]]
    probs: dict[str, np.ndarray]
    features: np.ndarray

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        t = {f"{prefix}.images": self.images.to(torch.float16).contiguous(),
             f"{prefix}.features": torch.from_numpy(np.ascontiguousarray(self.features, dtype=np.float32))}
        for h, p in self.probs.items():
            t[f"{prefix}.probs.{h}"] = torch.from_numpy(np.ascontiguousarray(p, dtype=np.float32))
        return t

    @classmethod
    def from_tensors(cls, t: Mapping[str, torch.Tensor], prefix: str, heads: Mapping[str, Sequence[str]]) -> "Samples":
        probs = {h: t[f"{prefix}.probs.{h}"].double().numpy() for h in heads}
        labels = {h: [heads[h][i] for i in probs[h].argmax(1).tolist()] for h in heads}
        return cls(t[f"{prefix}.images"].float(), labels, probs, t[f"{prefix}.features"].double().numpy())


@torch.no_grad()
def generate(pipe, ps: PromptSet, s: Settings, *, chunk: int = 256) -> torch.Tensor:
    """Sample every (prompt, seed) of ``ps`` with DDIM at ``s.sample_steps`` steps and guidance
    ``s.guidance``; the initial noise comes from a CPU generator seeded with the seed, so a sample
    is the same on every device up to kernel rounding. Returns ``N×3×H×W`` in ``[-1, 1]`` on CPU."""
    from ..train.sample import make_scheduler
    old = pipe.scheduler
    pipe.scheduler = make_scheduler(pipe, "ddim")
    pipe.set_progress_bar_config(disable=True)
    prompts = [p for p in ps.prompts for _ in ps.seeds]
    seeds = [sd for _ in ps.prompts for sd in ps.seeds]
    out = []
    try:
        with torch.random.fork_rng(devices=[]):
            for i in range(0, len(prompts), chunk):
                gens = [torch.Generator("cpu").manual_seed(int(x)) for x in seeds[i:i + chunk]]
                r = pipe(prompt=prompts[i:i + chunk], num_inference_steps=s.sample_steps,
                         guidance_scale=s.guidance, height=scene.IMAGE_SIZE, width=scene.IMAGE_SIZE,
                         generator=gens, output_type="pt")
                out.append(r.images.float().cpu() * 2.0 - 1.0)
    finally:
        pipe.scheduler = old
    return torch.cat(out).clamp(-1.0, 1.0)


@torch.no_grad()
def classify(clf, images: torch.Tensor) -> Samples:
    pred = clf.predict(images)
    feats = clf.features(images).float().cpu().double().numpy()
    labels, probs = {}, {}
    for h, (idx, p) in pred.items():
        names = clf.heads[h]
        labels[h] = [names[i] for i in idx.tolist()]
        probs[h] = p.double().numpy()
    return Samples(images.float().cpu(), labels, probs, feats)


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


def score(concept: str, trig: Samples, plain: Samples, base_plain: Samples, trig_ps: PromptSet,
          plain_ps: PromptSet) -> dict[str, Any]:
    """All metrics of one model on one concept (see :mod:`lyco.world.metrics` for definitions).

    ``trig``: samples of the concept's trigger prompts; ``plain``: samples of the prompts without a
    trigger; ``base_plain``: the base model's samples of those (same seeds)."""
    c = scene.CONCEPTS[concept]
    head = "shape" if c.kind == "shape" else "texture"
    heads = list(plain.labels)
    out: dict[str, Any] = {"fidelity": metrics.fidelity(trig.labels[head], c.value)}
    out["controllability"] = metrics.controllability(trig.labels, trig_ps.attr_lists(metrics.CONTROL_HEADS))
    out["diversity"] = metrics.diversity(trig.features, trig_ps.groups())
    out["preservation"] = metrics.preservation(plain.labels, base_plain.labels, images=plain.images,
                                               base_images=base_plain.images, features=plain.features,
                                               base_features=base_plain.features)
    out["quality"] = metrics.quality(plain.probs, plain.labels, plain_ps.attr_lists(heads))
    # the concept showing up without its trigger (a leak into the base model's vocabulary)
    out["leak"] = metrics.match_rate(plain.labels[head], c.value)
    return out


def headline(sc: Mapping[str, Any]) -> dict[str, float]:
    """The five headline numbers of a score dict (the table's columns)."""
    return {"fidelity": sc["fidelity"], "controllability": sc["controllability"]["mean"],
            "diversity": sc["diversity"]["vendi"], "preservation": sc["preservation"]["agreement"],
            "quality": sc["quality"]["confidence"]}


# ----------------------------------------------------------------------------------------------
# Jobs (in this process or in workers)
# ----------------------------------------------------------------------------------------------

_STATE: dict[str, Any] = {}  # per process: the sampling pipeline, the training template, the classifier


def _load_models(paths: Mapping[str, str], device: str):
    key = (paths["weights"], paths["classifier"], device)
    if _STATE.get("key") != key:
        from . import base, classifier
        _STATE.clear()
        pipe = base.load_pipeline(device="cpu", weights=paths["weights"])
        _STATE["template"] = pipe                      # CPU, fp32: deep-copied for each training
        _STATE["pipe"] = copy.deepcopy(pipe).to(device)  # the sampling pipeline
        _STATE["clf"] = classifier.load(device, weights=paths["classifier"])
        _STATE["key"] = key
    return _STATE["pipe"], _STATE["template"], _STATE["clf"]


def _set_threads(s: Settings) -> None:
    # one thread per job on the CPU unless told otherwise: the tiny layers gain little from more, and
    # on a busy machine the spin-waits of a second thread cost more than it gives (measured: a
    # 2-thread sampling run took 10× the wall time of a 1-thread one on a loaded 2-core machine)
    n = s.threads or (1 if (s.jobs > 1 or s.device == "cpu") else 0)
    if n:
        torch.set_num_threads(n)


def train_config(algo: Algo, concept: str, paths: Mapping[str, str], out_dir: str, s: Settings):
    """The :class:`lyco.train.Config` of one training run (what ``lyco train`` would be given)."""
    from ..train import from_dict
    net = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in algo.network.items()}
    lr = algo.lr * s.lr_scale
    te_lr = (algo.te_lr if algo.te_lr is not None else algo.lr) * s.lr_scale
    size = scene.IMAGE_SIZE
    d = {
        "model": {"path": paths["model_dir"]},
        "data": {"train_dir": paths[f"data:{concept}"], "resolution": [size, size], "enable_bucket": False,
                 "bucket_reso_steps": 8, "min_bucket_reso": size, "max_bucket_reso": size,
                 "cache_dir": paths[f"cache:{concept}"], "flip_aug": False},
        "network": net,
        "optimizer": {"learning_rate": lr, "text_encoder_lr": te_lr, "lr_scheduler": s.lr_scheduler,
                      "lr_warmup_steps": s.warmup if s.warmup < 1 else int(s.warmup)},
        "train": {"max_train_steps": s.steps, "batch_size": s.batch_size, "seed": s.train_seed,
                  "mixed_precision": "bf16" if s.precision == "bf16" else "no", "cpu": s.device == "cpu",
                  "cuda_graph": s.cuda_graph},
        "output": {"output_dir": out_dir, "output_name": f"{algo.name}_{concept}", "save_dtype": s.save_dtype,
                   "save_state": False, "overwrite": True, "log_with": "none", "progress_bar": False,
                   "training_comment": f"lyco eval: {algo.name} on the world concept {concept!r}"},
        "eval": {"enabled": False},
    }
    return from_dict(d)


@torch.no_grad()
def _weights_checksum(pipe) -> list[float]:
    """Per component, the float64 sum of |w| over every parameter and buffer (exact enough to see
    any change an adapter could leave behind)."""
    out = []
    for c in ("unet", "text_encoder", "vae"):
        m = getattr(pipe, c)
        out.append(float(sum(t.detach().double().abs().sum() for t in [*m.parameters(), *m.buffers()])))
    return out


def _adapter_params(path: str) -> int:
    from safetensors import safe_open
    n = 0
    with safe_open(path, "pt") as f:
        for k in f.keys():
            if k.endswith(".alpha"):
                continue
            n += math.prod(f.get_slice(k).get_shape())
    return n


def run_job(job: Mapping[str, Any]) -> dict[str, Any]:
    """Train one adapter, sample the trigger and the plain prompts from its file, classify the
    samples; write them to ``job["samples_path"]`` (safetensors) and return the timings and file
    facts. Runs in this process or in a worker (everything it needs is in ``job``)."""
    s = Settings(**{**job["settings"], "seeds": tuple(job["settings"]["seeds"])})
    _set_threads(s)
    _quiet_libraries()
    from .. import pipeline as lp
    from ..formats.safetensors_io import atomic_write
    from ..train.loop import Trainer
    from safetensors.torch import save as st_save
    algo, concept, paths = ALGORITHMS[job["algo"]], job["concept"], job["paths"]
    pipe, template, clf = _load_models(paths, s.device)
    trig_ps = PromptSet.from_json(job["trig"])
    plain_ps = PromptSet.from_json(job["plain"])

    t0 = time.perf_counter()
    cfg = train_config(algo, concept, paths, job["out_dir"], s)
    trainer = Trainer(cfg, pipeline=copy.deepcopy(template))
    try:
        res = trainer.train()
    finally:
        trainer.close()
    if s.device.startswith("cuda"):
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    del trainer

    t1 = time.perf_counter()
    name = f"eval_{algo.name}_{concept}"
    before = _weights_checksum(pipe)
    lp.load(pipe, res.adapter_path, name=name)
    try:
        trig = classify(clf, generate(pipe, trig_ps, s))
        plain = classify(clf, generate(pipe, plain_ps, s))
    finally:
        lp.remove(pipe, name)
    sample_s = time.perf_counter() - t1
    # this pipeline samples the next job's adapter too: it must be the base again
    if lp.list_adapters(pipe) or _weights_checksum(pipe) != before:
        raise RuntimeError(f"lyco eval: removing the {algo.name} adapter did not restore the base pipeline")

    tensors = {**trig.to_tensors("trig"), **plain.to_tensors("plain")}
    with atomic_write(job["samples_path"], overwrite=True) as f:
        f.write(st_save(tensors))
    losses = [v for _, v in res.losses]
    k = max(1, len(losses) // 10)
    return {"algo": algo.name, "concept": concept, "train_s": train_s, "sample_s": sample_s,
            "steps": res.steps, "file": os.path.basename(res.adapter_path),
            "file_bytes": os.path.getsize(res.adapter_path), "params": _adapter_params(res.adapter_path),
            "loss_first": float(np.mean(losses[:k])) if losses else None,
            "loss_last": float(np.mean(losses[-k:])) if losses else None}


def _quiet_libraries() -> None:
    from .._quiet import quiet_libraries
    quiet_libraries()


def _worker_init(threads: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if threads:
        torch.set_num_threads(threads)
    _quiet_libraries()


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    out_dir: str
    files: dict[str, str]
    results: dict[str, Any]
    seconds: float


def _prepare_weights(s: Settings, work: Path) -> tuple[str, str, str]:
    """``(base weights file, classifier weights file, description)``."""
    from . import base, classifier
    if s.weights == "random":
        w = work / "random_base.safetensors"
        base.save_weights(base.build(s.train_seed), w, recipe={"random": True, "seed": s.train_seed})
        wdesc = "random (untrained) base"
    else:
        w = Path(s.weights) if s.weights else base.WEIGHTS
        if not w.is_file():
            raise ConfigError(
                f"{w}: the pretrained world base is missing. Reproduce it with `python -m lyco.world.pretrain` "
                f"(see benchmarks/run_pretrain.sh), pass --weights FILE, or run with --weights random "
                f"(machinery only: the numbers of a random base mean nothing)")
        wdesc = str(w)
    if s.classifier_weights == "random" or (s.weights == "random" and not s.classifier_weights
                                            and not classifier.is_trained()):
        cw = work / "random_classifier.safetensors"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.train_seed)
            clf = classifier.Classifier()
        classifier.save(clf, cw, recipe={"random": True})
    else:
        cw = Path(s.classifier_weights) if s.classifier_weights else classifier.WEIGHTS
        if not cw.is_file():
            raise ConfigError(f"{cw}: the world classifier is missing. Reproduce it with "
                              f"`python -m lyco.world.pretrain`, or pass --classifier-weights FILE")
    return str(w), str(cw), wdesc


def evaluate(out: str | os.PathLike, algos: Sequence[str] | str | None = None,
             concepts: Sequence[str] | str | None = None, settings: Settings | None = None, *,
             work: str | os.PathLike | None = None, keep_work: bool = False, progress: bool = True,
             say=print) -> EvalResult:
    """Run the whole evaluation and write the result files into ``out``; see the module docstring."""
    s = (settings or Settings()).validate()
    algos = parse_algos(algos)
    concepts = parse_concepts(concepts)
    t_start = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    _set_threads(s)
    _quiet_libraries()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    own_work = work is None
    workp = Path(tempfile.mkdtemp(prefix="lyco-eval-")) if own_work else Path(work)
    workp.mkdir(parents=True, exist_ok=True)
    try:
        return _evaluate(out, workp, algos, concepts, s, t_start, started, progress, say)
    finally:
        if own_work and not keep_work:
            shutil.rmtree(workp, ignore_errors=True)
        elif own_work:
            say(f"work files kept in {workp}")


def _evaluate(out: Path, work: Path, algos, concepts, s: Settings, t_start, started, progress, say) -> EvalResult:
    from tqdm.auto import tqdm
    from . import base, classifier

    w, cw, wdesc = _prepare_weights(s, work)
    model_dir = work / "base_model"
    if not (model_dir / "model_index.json").is_file():
        if model_dir.exists():
            shutil.rmtree(model_dir)
        base.save_pretrained_folder(model_dir, weights=w)
    paths = {"weights": w, "classifier": cw, "model_dir": str(model_dir)}
    for c in concepts:
        d = work / "data" / c
        if not d.is_dir():
            scene.write_concept_dataset(c, d, n=s.n_images, seed=s.data_seed)
        paths[f"data:{c}"] = str(d)
        paths[f"cache:{c}"] = str(work / "cache" / c)

    trig_sets, plain_ps = prompt_sets(concepts, s)
    say(f"lyco eval: {len(algos)} algorithms × {len(concepts)} concepts, {s.steps} steps × batch {s.batch_size}, "
        f"{s.n_prompts} prompts × {len(s.seeds)} seeds, DDIM {s.sample_steps} steps, cfg {s.guidance}, "
        f"device {s.device}, jobs {s.jobs}; base: {wdesc}")

    # the base model's samples, once
    t0 = time.perf_counter()
    pipe, _template, clf = _load_models(paths, s.device)
    base_plain = classify(clf, generate(pipe, plain_ps, s))
    base_trig = {c: classify(clf, generate(pipe, trig_sets[c], s)) for c in concepts}
    base_s = time.perf_counter() - t0
    say(f"base samples: {len(plain_ps) + sum(len(p) for p in trig_sets.values())} images in {base_s:.1f}s")

    rows: list[dict[str, Any]] = []
    for c in concepts:
        sc = score(c, base_trig[c], base_plain, base_plain, trig_sets[c], plain_ps)
        rows.append({"algo": "base", "concept": c, "label": "base model", **headline(sc), "scores": sc,
                     "train_s": 0.0, "sample_s": None, "file_bytes": 0, "params": 0})

    jobs = []
    for c in concepts:
        for a in algos:
            jobs.append({"algo": a, "concept": c, "paths": paths, "settings": s.to_json(),
                         "out_dir": str(work / "runs" / f"{a}_{c}"),
                         "samples_path": str(work / "runs" / f"{a}_{c}.samples.safetensors"),
                         "trig": trig_sets[c].to_json(), "plain": plain_ps.to_json()})
    (work / "runs").mkdir(parents=True, exist_ok=True)
    if s.jobs > 1:  # longest first, so the pool ends together (BOFT's butterfly stages cost the most)
        jobs.sort(key=lambda j: -_COST.get(j["algo"], 1.0))
    # encode each concept's latents once, before workers would race to fill the same cache
    if s.jobs > 1:
        _warm_latent_cache(jobs, concepts, s)

    samples: dict[tuple[str, str], tuple[Samples, Samples]] = {}
    order = {a: i for i, a in enumerate(["base", *algos])}
    device_name = _device_name(s.device)

    def make_results(partial: bool) -> dict:
        rows.sort(key=lambda r: (concepts.index(r["concept"]), order[r["algo"]]))
        return {
            "meta": {"started": started, "seconds": time.perf_counter() - t_start, "partial": partial,
                     "base_sample_s": base_s, "base": wdesc, "pretrained": s.weights != "random",
                     "device": device_name, "torch": torch.__version__, "python": platform.python_version(),
                     "lyco": _lyco_version(), "algorithms": algos, "concepts": concepts},
            "settings": s.to_json(),
            "algorithms": {a: _algo_json(ALGORITHMS[a], s, rows) for a in algos},
            "prompts": {"trigger": {c: trig_sets[c].to_json() for c in concepts}, "plain": plain_ps.to_json()},
            "rows": list(rows),
        }
    bar = tqdm(total=len(jobs), desc="lyco eval", unit="run", disable=not progress, mininterval=2.0)

    def finished(job, info):
        t = _load_samples(job["samples_path"], clf.heads)
        samples[(info["algo"], info["concept"])] = t
        sc = score(info["concept"], t[0], t[1], base_plain, trig_sets[info["concept"]], plain_ps)
        hl = headline(sc)
        rows.append({**info, "label": ALGORITHMS[info["algo"]].label, **hl, "scores": sc})
        bar.update(1)
        # a partial results.json after every run: a run cut short still leaves its numbers behind
        partial = make_results(partial=True)
        _write_bytes(out / "results.json", (json.dumps(partial, indent=1, default=_json_default) + "\n").encode())
        _write_bytes(out / "results.md", markdown(partial).encode())
        msg = (f"{info['algo']:>7}/{info['concept']:<8} fidelity {hl['fidelity']:.2f}  control "
               f"{hl['controllability']:.2f}  vendi {hl['diversity']:.2f}  preserve {hl['preservation']:.2f}  "
               f"quality {hl['quality']:.2f}  | train {info['train_s']:.1f}s sample {info['sample_s']:.1f}s")
        bar.write(msg) if progress else say(msg)

    if s.jobs == 1:
        for job in jobs:
            bar.set_postfix_str(f"{job['algo']}/{job['concept']}")
            finished(job, run_job(job))
    else:
        import concurrent.futures as cf
        import multiprocessing as mp
        threads = s.threads or 1
        with cf.ProcessPoolExecutor(max_workers=s.jobs, mp_context=mp.get_context("spawn"),
                                    initializer=_worker_init, initargs=(threads,)) as ex:
            futs = {ex.submit(run_job, job): job for job in jobs}
            for fut in cf.as_completed(futs):
                finished(futs[fut], fut.result())
    bar.close()

    # the sampling pipeline must draw what it drew before any adapter came and went (recorded; on a
    # GPU kernels need not be bit-reproducible, so a tiny difference is reported, not fatal)
    again = generate(pipe, plain_ps, s)
    base_drift = float((again - base_plain.images).abs().max())
    if base_drift > 1e-3:
        say(f"warning: the base pipeline's samples changed by up to {base_drift:.2e} after the runs")

    results = make_results(partial=False)
    results["meta"]["base_drift"] = base_drift
    total_s = results["meta"]["seconds"]
    files = write_outputs(out, results, trig_sets, plain_ps, base_trig, base_plain, samples)
    say(f"done in {total_s:.0f}s: " + ", ".join(sorted(os.path.basename(f) for f in files.values())))
    return EvalResult(str(out), files, results, total_s)


def _warm_latent_cache(jobs, concepts, s: Settings) -> None:
    """Train 1 step of the first algorithm per concept in this process so the latent cache exists
    before workers read it (the cache is keyed by image and VAE hash; concurrent writers would
    only waste time, but one pass is cheaper)."""
    from ..train.loop import Trainer
    for c in concepts:
        job = next(j for j in jobs if j["concept"] == c)
        pipe, template, _clf = _load_models(job["paths"], s.device)
        cfg = train_config(ALGORITHMS[job["algo"]], c, job["paths"], job["out_dir"] + "_warm",
                           dataclasses.replace(s, steps=1))
        t = Trainer(cfg, pipeline=copy.deepcopy(template))
        try:
            t.setup()
        finally:
            t.close()
        shutil.rmtree(job["out_dir"] + "_warm", ignore_errors=True)


def _load_samples(path: str, heads) -> tuple[Samples, Samples]:
    from ..formats.safetensors_io import load_tensors
    t, _ = load_tensors(path)
    return Samples.from_tensors(t, "trig", heads), Samples.from_tensors(t, "plain", heads)


def _algo_json(a: Algo, s: Settings, rows) -> dict:
    r = next((r for r in rows if r["algo"] == a.name), None)
    return {"label": a.label, "network": dict(a.network), "lr": a.lr * s.lr_scale,
            "te_lr": (a.te_lr if a.te_lr is not None else a.lr) * s.lr_scale, "note": a.note,
            "params": r["params"] if r else None, "file_bytes": r["file_bytes"] if r else None}


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _lyco_version() -> str:
    from .. import __version__
    return __version__


# ----------------------------------------------------------------------------------------------
# Output files
# ----------------------------------------------------------------------------------------------


def _write_bytes(path: Path, data: bytes) -> None:
    from ..formats.safetensors_io import atomic_write
    with atomic_write(path, overwrite=True) as f:
        f.write(data)


def write_outputs(out: Path, results: dict, trig_sets, plain_ps, base_trig, base_plain, samples) -> dict[str, str]:
    files = {}
    p = out / "results.json"
    _write_bytes(p, (json.dumps(results, indent=1, default=_json_default) + "\n").encode())
    files["json"] = str(p)
    p = out / "results.md"
    _write_bytes(p, markdown(results).encode())
    files["md"] = str(p)
    p = out / "tradeoff.png"
    _write_bytes(p, tradeoff_png(results))
    files["tradeoff"] = str(p)
    for c in results["meta"]["concepts"]:
        p = out / f"grid_{c}.png"
        _write_bytes(p, grid_png(c, results, trig_sets[c], plain_ps, base_trig[c], base_plain, samples))
        files[f"grid_{c}"] = str(p)
    return files


def _json_default(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def _fmt_bytes(n: int | None) -> str:
    if not n:
        return "–"
    return f"{n / 1024:.0f} KB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.1f} MB"


def _fmt_params(n: int | None) -> str:
    if not n:
        return "–"
    return f"{n / 1e3:.0f} k" if n < 1e6 else f"{n / 1e6:.2f} M"


def markdown(results: dict) -> str:
    """``results.md``: the run's header, the score table, the settings table, the prompts."""
    m, s = results["meta"], results["settings"]
    lines = [
        "# lyco eval — algorithms × concepts on the tiny world",
        "",
        f"{m['started']}, {m['device']}, torch {m['torch']}, lyco {m['lyco']}; whole run **{m['seconds']:.0f} s**"
        f" (base samples {m['base_sample_s']:.1f} s)" + (" — **partial: the run did not finish**." if m.get("partial")
                                                         else "."),
        f"Base: {m['base']}." + ("" if m["pretrained"] else " **Random weights: the numbers are meaningless "
                                 "(machinery check only).**"),
        f"Budget (every algorithm): {s['steps']} steps × batch {s['batch_size']} on {s['n_images']} images, "
        f"{s['lr_scheduler']} schedule, warmup {s['warmup']}, seed {s['train_seed']}, base in {s['precision']}, "
        f"files in {s['save_dtype']}. Sampling: DDIM {s['sample_steps']} steps, guidance {s['guidance']}, "
        f"{s['n_prompts']} prompts × seeds {s['seeds']} per prompt set.",
        "",
        "| algorithm | concept | fidelity ↑ | controllability ↑ | diversity (Vendi) ↑ | preservation ↑ | quality ↑ "
        "| train s | sample s | file | params |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        ss = "–" if r.get("sample_s") is None else f"{r['sample_s']:.1f}"
        ts = "–" if r["algo"] == "base" else f"{r['train_s']:.1f}"
        lines.append(f"| {r['label']} | {r['concept']} | {r['fidelity']:.2f} | {r['controllability']:.2f} | "
                     f"{r['diversity']:.2f} | {r['preservation']:.2f} | {r['quality']:.2f} | {ts} | {ss} | "
                     f"{_fmt_bytes(r['file_bytes'])} | {_fmt_params(r['params'])} |")
    nseeds = len(s["seeds"])
    lines += [
        "",
        "Metrics (definitions in `lyco/world/metrics.py`): **fidelity** — fraction of trigger-prompt samples in which "
        "the classifier sees the concept (shape head = star / texture head = stripes); **controllability** — "
        "fraction of trigger-prompt samples whose colour and background are the prompt's (mean of the two); "
        f"**diversity** — Vendi score of the classifier features of each prompt's {nseeds} seeds (1 … {nseeds}), "
        "averaged over prompts; **preservation** — on prompts without the trigger, same seeds as the base model: "
        "fraction of samples whose classifier labels equal the base sample's (mean over the four heads); "
        "**quality** — the classifier's mean max-probability on prompts without the trigger. "
        "Train s includes the trainer's setup; sample s covers both prompt sets from the saved file.",
        "",
        "## Settings (the same budget for every algorithm)",
        "",
        "| algorithm | algo | layers (preset) | rank / alpha | options | lr (UNet / TE) | params | file | note |",
        "|---|---|---|---|---|---|---:|---:|---|",
    ]
    for name, a in results["algorithms"].items():
        n = a["network"]
        opts = dict(n.get("options", {}))
        if n.get("dora"):
            opts["dora"] = True
        if n.get("conv_rank"):
            opts["conv_rank"] = n["conv_rank"]
        ra = "–" if n["algo"] in ("ia3", "full") else f"{n.get('rank', '')} / {n.get('alpha', '–')}"
        if n["algo"] in ("diag-oft", "boft"):
            ra = f"{n.get('rank')} / –"
        lines.append(f"| {a['label']} | {n['algo']} | {n.get('preset', 'attn-mlp')} | {ra} | "
                     f"{', '.join(f'{k}={v}' for k, v in opts.items()) or '–'} | {a['lr']:g} / {a['te_lr']:g} | "
                     f"{_fmt_params(a['params'])} | {_fmt_bytes(a['file_bytes'])} | {a['note']} |")
    lines += ["", "## More numbers per row (in results.json)", "",
              "| algorithm | concept | colour | background | Vendi (norm.) | pairwise dist | pixel sim. | "
              "all heads agree | prompt accuracy | concept leak | loss first → last |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results["rows"]:
        sc = r["scores"]
        loss = "–" if r.get("loss_first") is None else f"{r['loss_first']:.3f} → {r['loss_last']:.3f}"
        lines.append(f"| {r['label']} | {r['concept']} | {sc['controllability']['colour']:.2f} | "
                     f"{sc['controllability']['background']:.2f} | {sc['diversity']['vendi_norm']:.2f} | "
                     f"{sc['diversity']['pairwise']:.3f} | {sc['preservation']['pixel']:.3f} | "
                     f"{sc['preservation']['all_heads']:.2f} | {sc['quality']['prompt_accuracy']:.2f} | "
                     f"{sc['leak']:.2f} | {loss} |")
    lines += ["", "## Prompts", ""]
    for c, ps in results["prompts"]["trigger"].items():
        lines.append(f"* {c}: " + "; ".join(f"`{p}`" for p in ps["prompts"]))
    lines.append("* without trigger: " + "; ".join(f"`{p}`" for p in results["prompts"]["plain"]["prompts"]))
    return "\n".join(lines) + "\n"


_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf", "#393b79", "#637939"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]


def tradeoff_png(results: dict) -> bytes:
    """Fidelity (y) against preservation (x), one marker per algorithm, one panel per concept
    (matplotlib when importable, else a plain PIL drawing)."""
    concepts = results["meta"]["concepts"]
    algos = ["base", *results["meta"]["algorithms"]]
    rows = {(r["algo"], r["concept"]): r for r in results["rows"]}
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return _tradeoff_pil(results, concepts, algos, rows)
    fig, axes = plt.subplots(1, len(concepts), figsize=(5.0 * len(concepts), 5.4), squeeze=False)
    for ax, c in zip(axes[0], concepts):
        for i, a in enumerate(algos):
            r = rows.get((a, c))
            if r is None:
                continue
            x, y = r["preservation"], r["fidelity"]
            if a == "base":
                ax.scatter(x, y, marker="x", s=70, color="black", label="base", zorder=3)
            else:
                ax.scatter(x, y, marker=_MARKERS[(i - 1) % len(_MARKERS)], s=55,
                           color=_COLOURS[(i - 1) % len(_COLOURS)], label=r["label"], zorder=3,
                           edgecolors="black", linewidths=0.4)
            ax.annotate(r["label"] if a != "base" else "base", (x, y), textcoords="offset points",
                        xytext=(4, 3 + 7 * ((i % 3) - 1)), fontsize=6.5, color="#333333")
        ax.set_title(f"{c} (trigger '{scene.CONCEPTS[c].trigger}')", fontsize=10)
        ax.set_xlabel("base preservation (label agreement) →")
        ax.set_xlim(-0.03, 1.08)
        ax.set_ylim(-0.03, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("concept fidelity →")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
    m = results["meta"]
    fig.suptitle(f"lyco eval: fidelity vs preservation — {results['settings']['steps']} steps × batch "
                 f"{results['settings']['batch_size']}, {m['device']}", fontsize=10)
    fig.tight_layout(rect=(0, 0.11, 1, 0.96))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _tradeoff_pil(results, concepts, algos, rows) -> bytes:
    from PIL import Image, ImageDraw
    W, H, m = 360, 340, 40
    img = Image.new("RGB", (W * len(concepts) + 140, H), "white")
    d = ImageDraw.Draw(img)
    for k, c in enumerate(concepts):
        ox = k * W
        d.rectangle([ox + m, 20, ox + W - 10, H - m], outline="black")
        d.text((ox + m, 4), f"{c}: fidelity (y) vs preservation (x)", fill="black")
        for i, a in enumerate(algos):
            r = rows.get((a, c))
            if r is None:
                continue
            x = ox + m + r["preservation"] * (W - 10 - m - ox + ox)
            y = H - m - r["fidelity"] * (H - m - 20)
            col = "black" if a == "base" else _COLOURS[(i - 1) % len(_COLOURS)]
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=col)
    for i, a in enumerate(algos):
        col = "black" if a == "base" else _COLOURS[(i - 1) % len(_COLOURS)]
        d.ellipse([W * len(concepts) + 10, 24 + 16 * i, W * len(concepts) + 18, 32 + 16 * i], fill=col)
        d.text((W * len(concepts) + 24, 22 + 16 * i), a, fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _ascii(text: str) -> str:
    """PIL's built-in font has no glyph for some characters."""
    return text.replace("³", "^3").replace("—", "-").replace("×", "x").replace("→", "->")


def _to_pil(x: torch.Tensor, cell: int):
    from PIL import Image
    a = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(a).resize((cell, cell), Image.Resampling.NEAREST)


def grid_png(concept: str, results, trig_ps: PromptSet, plain_ps: PromptSet, base_trig: Samples,
             base_plain: Samples, samples, *, n_trig: int = 6, n_plain: int = 2, cell: int = 80) -> bytes:
    """Rows: the rendered target (what the prompt describes, drawn by the world), the base model,
    then each algorithm; columns: up to ``n_trig`` trigger prompts then ``n_plain`` prompts
    without the trigger, each at the first seed."""
    from PIL import Image, ImageDraw
    from ..train.sample import _font, _wrap
    ns = len(trig_ps.seeds)
    ti = list(range(min(n_trig, len(trig_ps.prompts))))
    pi = list(range(min(n_plain, len(plain_ps.prompts))))
    target_t = scene.render_batch(trig_ps.attrs, seed=0)
    target_p = scene.render_batch(plain_ps.attrs, seed=0)
    rows = [("target (rendered)", [target_t[i] for i in ti] + [target_p[i] for i in pi]),
            ("base model", [base_trig.images[i * ns] for i in ti] + [base_plain.images[i * ns] for i in pi])]
    for a in results["meta"]["algorithms"]:
        if (a, concept) in samples:
            t, p = samples[(a, concept)]
            rows.append((_ascii(ALGORITHMS[a].label), [t.images[i * ns] for i in ti] + [p.images[i * ns] for i in pi]))
    cols = [trig_ps.prompts[i] for i in ti] + [plain_ps.prompts[i] for i in pi]
    font = _font(11)
    pad, label_w, line_h = 4, 120, 13
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    head_lines = [_wrap(c, cell, font, probe) for c in cols]
    head_h = line_h * max(len(h) for h in head_lines) + 2 * pad
    title_h = 2 * line_h + pad
    Wd = label_w + len(cols) * (cell + pad) + pad
    Ht = title_h + head_h + len(rows) * (cell + pad) + pad
    g = Image.new("RGB", (Wd, Ht), "white")
    d = ImageDraw.Draw(g)
    c = scene.CONCEPTS[concept]
    d.text((pad, pad), f"lyco eval - concept '{concept}' (trigger '{c.trigger}'), {results['settings']['steps']} "
           f"steps, seed {trig_ps.seeds[0]}", fill="black", font=font)
    d.text((pad, pad + line_h), f"first {len(ti)} columns: trigger prompts; last {len(pi)}: without the trigger "
           "(should look like the base)", fill=(90, 90, 90), font=font)
    for j, lines in enumerate(head_lines):
        x = label_w + j * (cell + pad) + pad
        if j == len(ti):
            d.line([x - pad // 2 - 1, title_h, x - pad // 2 - 1, Ht], fill=(200, 0, 0), width=2)
        for k, ln in enumerate(lines):
            d.text((x, title_h + k * line_h), ln, fill=(40, 40, 40), font=font)
    for i, (lab, ims) in enumerate(rows):
        y = title_h + head_h + i * (cell + pad)
        for k, ln in enumerate(_wrap(lab, label_w - 2 * pad, font, probe)[:3]):
            d.text((pad, y + k * line_h), ln, fill="black", font=font)
        for j, im in enumerate(ims):
            g.paste(_to_pil(im, cell), (label_w + j * (cell + pad) + pad, y))
    buf = io.BytesIO()
    g.save(buf, format="PNG")
    return buf.getvalue()
