"""The shipped pretrained world models (``src/lyco/data/world/base.safetensors`` and
``classifier.safetensors``, made by ``python -m lyco.world.pretrain`` on a GPU).

These tests need the shipped files: they fail (FileNotFoundError naming the script) until the
weights are committed. The thresholds come from the GPU run recorded in the files' recipe
(``recipe.json``): the classifier is measured on fresh renders (≥ 95 % per head is the issue's
bar); the base's samples are judged by the classifier against their prompts, on the CPU, with
the pipeline's defaults (25 DDIM steps, guidance 4).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lyco.world import base, classifier, scene

torch.set_num_threads(2)

#: Minimum per-head agreement between the base's samples and their prompts (every base-world
#: description, one seed each). Set from the GPU run's measurement with a margin for seeds and
#: CPU-vs-GPU numerics.
SAMPLE_AGREEMENT = {"shape": 0.9, "colour": 0.9, "background": 0.9}  # GPU pretrain run (H100, seed 0) measured 1.0 on every head over 384 samples (benchmarks/results/pretrain_h100/recipe.json)
#: Largest rate at which the base draws a concept when prompted with its trigger word (it has
#: never seen it: a star is 1 of 5 classifier shapes, stripes 1 of 2 textures).
CONCEPT_RATE_MAX = 0.3


def test_shipped_files_exist_and_fit_the_cap():
    assert base.is_pretrained(), f"{base.WEIGHTS} missing: run python -m lyco.world.pretrain and commit it"
    assert classifier.is_trained(), f"{classifier.WEIGHTS} missing"
    total = base.WEIGHTS.stat().st_size + classifier.WEIGHTS.stat().st_size
    assert total < base.SIZE_CAP_BYTES, total
    _, recipe = base.read_metadata()
    assert recipe.get("completed") == "all" and not recipe.get("smoke"), recipe.get("completed")


def test_classifier_is_at_least_95_percent_accurate_on_held_out_images():
    clf = classifier.load()
    acc = classifier.accuracy(clf, n=1000, seed=20241)
    for h in classifier.HEADS:
        assert acc[h] >= 0.95, acc


def _samples(pipe, prompts, seeds, steps=base.SAMPLE_STEPS, guidance=base.PROMPT_GUIDANCE):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    im = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="pt").images
    return im.float() * 2 - 1


@pytest.mark.slow
def test_base_samples_show_what_their_prompts_say():
    pipe = base.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    clf = classifier.load()
    attrs = list(scene._iter_all("base"))
    prompts = [scene.caption(a) for a in attrs]
    imgs = torch.cat([_samples(pipe, prompts[i:i + 48], list(range(i, i + 48))) for i in range(0, len(prompts), 48)])
    assert imgs.shape == (len(attrs), 3, scene.IMAGE_SIZE, scene.IMAGE_SIZE)
    agree = classifier.agreement(clf, imgs, attrs, heads=list(SAMPLE_AGREEMENT))
    for h, floor in SAMPLE_AGREEMENT.items():
        assert agree[h] >= floor, agree
    # and the prompt matters: the same seeds with shuffled prompts agree far less
    rng = np.random.default_rng(0)
    shuffled = [attrs[i] for i in rng.permutation(len(attrs))]
    assert classifier.agreement(clf, imgs, shuffled, heads=["colour"])["colour"] < 0.5


@pytest.mark.slow
def test_base_does_not_know_the_concepts():
    pipe = base.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    clf = classifier.load()
    for name, c in scene.CONCEPTS.items():
        pairs = scene.eval_set(name, 24, seed=1)
        imgs = _samples(pipe, [p for p, _ in pairs], list(range(len(pairs))))
        head = "shape" if c.kind == "shape" else "texture"
        pred = clf.predict(imgs)[head][0]
        rate = float((pred == classifier.HEADS[head].index(c.value)).float().mean())
        assert rate <= CONCEPT_RATE_MAX, (name, rate)


def test_shipped_base_is_a_training_base(tmp_path):
    from lyco.formats.checkpoint import load_pipeline

    folder = base.save_pretrained_folder(tmp_path / "world_base")
    pipe = load_pipeline(folder)
    ref = base.load_components()
    for c in base.COMPONENTS:
        a, b = ref[c].state_dict(), getattr(pipe, c).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), c
