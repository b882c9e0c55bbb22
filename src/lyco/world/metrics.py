"""The evaluation metrics of the LyCORIS paper's framework, as pure functions on classifier outputs.

Everything here takes plain arrays (numpy or torch; torch tensors are converted) and label lists,
and returns floats or small dicts of floats: no model, no sampling, no files. The runner
(:mod:`lyco.world.evaluate`) samples images, runs the world's classifier on them and feeds its
outputs in. Each function's docstring is the metric's definition; the README's "Evaluation"
section repeats them in words.

The five axes (Yeh et al., "Navigating Text-To-Image Customization", ICLR 2024, section 4):

* **fidelity** — does the concept appear when the trigger is in the prompt?
* **controllability** — are the prompt's other attributes (colour, background) still honoured
  together with the trigger?
* **diversity** — how different are the samples of one prompt across seeds (Vendi score)?
* **preservation** — without the trigger, does the adapted model still draw what the base drew?
* **quality** — without the trigger, how confident is the classifier about what it sees?

Labels are compared as strings. Probabilities are ``N×C`` arrays (rows sum to 1); features are
``N×D``; images are ``N×3×H×W`` (or ``N×H×W×3``) in ``[-1, 1]``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

#: attributes a trigger prompt still names besides the concept (controllability checks these)
CONTROL_HEADS = ("colour", "background")


def _np(x) -> np.ndarray:
    """A float64 numpy copy of a numpy array, a torch tensor (any device/dtype) or a nested list."""
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").float().numpy()
    return np.asarray(x, dtype=np.float64)


def _labels(x, what: str) -> list[str]:
    if isinstance(x, str):
        raise TypeError(f"{what}: expected a sequence of labels, got the single string {x!r}")
    return [str(v) for v in x]


def _check_len(a: Sequence, b: Sequence, what: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{what}: {len(a)} predictions but {len(b)} references")
    if len(a) == 0:
        raise ValueError(f"{what}: no samples")


def match_rate(predicted: Sequence[str], expected: Sequence[str] | str) -> float:
    """Fraction of positions where ``predicted[i] == expected[i]`` (``expected`` may be one label
    for all)."""
    p = _labels(predicted, "predicted")
    e = [expected] * len(p) if isinstance(expected, str) else _labels(expected, "expected")
    _check_len(p, e, "match_rate")
    return float(np.mean([a == b for a, b in zip(p, e)]))


# ----------------------------------------------------------------------------------------------
# fidelity, controllability
# ----------------------------------------------------------------------------------------------


def fidelity(predicted: Sequence[str], concept_value: str) -> float:
    """**Fidelity**: the fraction of trigger-prompt samples in which the classifier finds the concept.

    ``predicted`` are the labels of the classifier head that carries the concept — the *shape* head
    for a shape concept (e.g. ``star``), the *texture* head for a texture concept (e.g.
    ``stripes``) — one per sample of a prompt that contains the trigger word; ``concept_value`` is
    the concept's label on that head. 1.0: the concept is drawn every time; the base model, which
    has never seen it, scores about the classifier's false-positive rate.
    """
    return match_rate(predicted, concept_value)


def controllability(predicted: Mapping[str, Sequence[str]], prompted: Mapping[str, Sequence[str]],
                    heads: Sequence[str] = CONTROL_HEADS) -> dict[str, float]:
    """**Controllability**: on trigger prompts, the fraction of samples whose other attributes are
    the prompt's.

    For every head in ``heads`` (default colour and background) the fraction of samples where the
    classifier's label equals the attribute written in the prompt; ``mean`` is their average, the
    headline number. An adapter that draws the concept but forgets "red" or "on a blue background"
    when the trigger is present (the paper's "overfitting" failure) scores low here even when its
    fidelity is high.
    """
    if not heads:
        raise ValueError("controllability: no heads to compare")
    out: dict[str, float] = {}
    for h in heads:
        if h not in predicted:
            raise KeyError(f"controllability: the classifier output has no head {h!r} (has {sorted(predicted)})")
        if h not in prompted:
            raise KeyError(f"controllability: the prompts carry no attribute {h!r} (have {sorted(prompted)})")
        out[h] = match_rate(predicted[h], prompted[h])
    out["mean"] = float(np.mean([out[h] for h in heads]))
    return out


# ----------------------------------------------------------------------------------------------
# diversity
# ----------------------------------------------------------------------------------------------


def _unit_rows(x: np.ndarray) -> np.ndarray:
    if x.ndim != 2:
        raise ValueError(f"features must be N×D, got shape {tuple(x.shape)}")
    n = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(n == 0):
        raise ValueError("features: a sample has an all-zero feature vector (cosine similarity undefined)")
    return x / n


def vendi_score(features) -> float:
    """**Vendi score** of one set of samples (Friedman & Dieng, 2023) with the cosine kernel.

    ``K[i, j] = cos(f_i, f_j)`` (so ``K[i, i] = 1``); ``λ`` are the eigenvalues of ``K / n`` (they
    are ≥ 0 and sum to 1); the score is ``exp(−Σ λ log λ)`` with ``0 log 0 = 0`` — the exponential of
    the eigenvalue entropy, i.e. the *effective number of distinct samples*: 1 when all samples are
    identical (up to scale), ``n`` when their features are mutually orthogonal.
    """
    x = _unit_rows(_np(features))
    n = x.shape[0]
    if n == 0:
        raise ValueError("vendi_score: no samples")
    lam = np.linalg.eigvalsh((x @ x.T) / n)
    lam = np.clip(lam, 0.0, None)
    lam = lam / lam.sum()
    nz = lam[lam > 1e-15]
    return float(np.exp(-(nz * np.log(nz)).sum()))


def mean_pairwise_distance(features) -> float:
    """Mean cosine distance ``1 − cos(f_i, f_j)`` over the unordered pairs ``i < j`` (0 for one
    sample). 0 when all samples coincide, 1 for mutually orthogonal features."""
    x = _unit_rows(_np(features))
    n = x.shape[0]
    if n < 2:
        return 0.0
    d = 1.0 - x @ x.T
    iu = np.triu_indices(n, k=1)
    return float(d[iu].mean())


def diversity(features, groups: Sequence | None = None) -> dict[str, float]:
    """**Diversity**: the Vendi score of the samples of each prompt (its seeds), averaged over prompts.

    ``groups[i]`` says which prompt sample ``i`` belongs to (``None``: one group). Returns ``vendi``
    (mean Vendi score per prompt, from 1 = every seed gives the same picture up to the number of
    seeds), ``vendi_norm`` (``(vendi − 1) / (seeds − 1)``, 0..1, comparable across seed counts) and
    ``pairwise`` (mean cosine distance between seeds of a prompt, averaged over prompts). Computed
    per prompt, not over all samples: different prompts *should* differ, diversity is about seeds.
    """
    x = _np(features)
    if x.ndim != 2:
        raise ValueError(f"diversity: features must be N×D, got shape {tuple(x.shape)}")
    groups = [0] * len(x) if groups is None else list(groups)
    if len(groups) != len(x):
        raise ValueError(f"diversity: {len(x)} feature rows but {len(groups)} group labels")
    ids = {k: i for i, k in enumerate(dict.fromkeys(groups))}
    g = np.array([ids[v] for v in groups], dtype=np.int64)
    vs, ds, norm = [], [], []
    for key in range(len(ids)):
        sel = x[g == key]
        v = vendi_score(sel)
        vs.append(v)
        ds.append(mean_pairwise_distance(sel))
        norm.append((v - 1.0) / (len(sel) - 1) if len(sel) > 1 else 0.0)
    return {"vendi": float(np.mean(vs)), "vendi_norm": float(np.mean(norm)), "pairwise": float(np.mean(ds))}


# ----------------------------------------------------------------------------------------------
# preservation, quality
# ----------------------------------------------------------------------------------------------


def pixel_similarity(images, base_images) -> float:
    """``1 − mean|x − x_base| / 2`` over all pixels and channels, images in ``[-1, 1]``: 1 for
    identical images, 0 when every value sits at the opposite end of the range. A plain,
    model-free similarity (no LPIPS network in this tiny world)."""
    a, b = _np(images), _np(base_images)
    if a.shape != b.shape:
        raise ValueError(f"pixel_similarity: image shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.size == 0:
        raise ValueError("pixel_similarity: no images")
    return float(1.0 - np.abs(a - b).mean() / 2.0)


def feature_similarity(features, base_features) -> float:
    """Mean cosine similarity of the classifier features of paired samples (same prompt and seed)."""
    a, b = _unit_rows(_np(features)), _unit_rows(_np(base_features))
    if a.shape != b.shape:
        raise ValueError(f"feature_similarity: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a * b).sum(axis=1).mean())


def preservation(predicted: Mapping[str, Sequence[str]], base_predicted: Mapping[str, Sequence[str]], *,
                 images=None, base_images=None, features=None, base_features=None) -> dict[str, float]:
    """**Preservation** of the base model on prompts *without* the trigger, sample by sample.

    Both models sample the same non-trigger prompts with the same seeds (same initial noise), so a
    perfectly preserved model reproduces the base's pictures. For every classifier head present in
    both outputs, the fraction of samples whose label equals the base sample's label; ``agreement``
    (the headline) is the mean over heads, ``all_heads`` the fraction of samples where every head
    agrees. With images, ``pixel`` is :func:`pixel_similarity`; with features, ``feature`` is
    :func:`feature_similarity`. All are 1.0 for an adapter that changes nothing.
    """
    heads = [h for h in predicted if h in base_predicted]
    if not heads:
        raise ValueError(f"preservation: no classifier head in common ({sorted(predicted)} vs {sorted(base_predicted)})")
    out: dict[str, float] = {}
    same = None
    for h in heads:
        p, b = _labels(predicted[h], h), _labels(base_predicted[h], h)
        _check_len(p, b, f"preservation[{h}]")
        eq = np.array([x == y for x, y in zip(p, b)])
        out[h] = float(eq.mean())
        same = eq if same is None else (same & eq)
    out["agreement"] = float(np.mean([out[h] for h in heads]))
    out["all_heads"] = float(same.mean())
    if images is not None or base_images is not None:
        if images is None or base_images is None:
            raise ValueError("preservation: give both images and base_images, or neither")
        out["pixel"] = pixel_similarity(images, base_images)
    if features is not None or base_features is not None:
        if features is None or base_features is None:
            raise ValueError("preservation: give both features and base_features, or neither")
        out["feature"] = feature_similarity(features, base_features)
    return out


def quality(probs: Mapping[str, object], predicted: Mapping[str, Sequence[str]] | None = None,
            prompted: Mapping[str, Sequence[str]] | None = None) -> dict[str, float]:
    """**Sample quality** on prompts without the trigger.

    ``confidence`` (the headline): the classifier's mean max-probability, averaged over samples and
    heads — a clean, unambiguous picture of the world gets confident predictions on every head, a
    smeared or broken one does not (the role FID/"image quality" plays in the paper, in a world
    whose only judge is the classifier). With ``predicted`` and ``prompted``, ``prompt_accuracy``
    is the fraction of samples whose labels match the prompt on every head the prompt names (the
    heads in ``prompted``), and ``per_head`` accuracy ``acc_<head>``.
    """
    if not probs:
        raise ValueError("quality: no classifier heads")
    conf = []
    for h, p in probs.items():
        a = _np(p)
        if a.ndim != 2 or a.shape[0] == 0:
            raise ValueError(f"quality: probabilities of head {h!r} must be N×C with N > 0, got {tuple(a.shape)}")
        if np.any(a < -1e-6) or not np.allclose(a.sum(axis=1), 1.0, atol=1e-3):
            raise ValueError(f"quality: head {h!r} does not hold probabilities (rows must be ≥ 0 and sum to 1)")
        conf.append(a.max(axis=1).mean())
    out = {"confidence": float(np.mean(conf))}
    if predicted is not None or prompted is not None:
        if predicted is None or prompted is None:
            raise ValueError("quality: give both predicted and prompted labels, or neither")
        ok = None
        for h in prompted:
            if h not in predicted:
                raise KeyError(f"quality: the classifier output has no head {h!r} (has {sorted(predicted)})")
            p, e = _labels(predicted[h], h), _labels(prompted[h], h)
            _check_len(p, e, f"quality[{h}]")
            eq = np.array([x == y for x, y in zip(p, e)])
            out[f"acc_{h}"] = float(eq.mean())
            ok = eq if ok is None else (ok & eq)
        out["prompt_accuracy"] = float(ok.mean()) if ok is not None else float("nan")
    return out
