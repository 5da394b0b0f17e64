"""Held-out prompts for the shapes text-to-image model, and how well images follow them.

A prompt is built from a list of objects (kind, colour, size, grid cell) with the renderer's own
caption grammar, so its ground truth is known exactly. Held-out prompts are those whose text is
absent from the training split's captions. `score` compares what the judge
(`shapes_classifier.ShapesJudge`) reads in each generated image with the prompt's objects:

- one-shape prompts are judged on the shape the judge is most sure of: position is right when that
  shape is in the prompt's cell, and kind / colour / size are read from it (so a right shape in the
  wrong place still counts for its attributes, and clutter elsewhere cannot make a position right);
- two-shape prompts: position is right when the prompt's cell holds a shape, and kind / colour / size
  are read in that cell;
- count: exactly as many shapes as the prompt names;
- all: every object right in all four attributes and the count right.
"""
from __future__ import annotations

import itertools

import numpy as np

from latent_diffusion.data import shapes
from latent_diffusion.evaluation import shapes_classifier as sc

KINDS = ("single", "two")
ATTRIBUTES = ("position",) + sc.ATTRIBUTES


def train_captions(num_train: int) -> set[str]:
    """The captions of the first `num_train` examples of the shapes train split (scenes only, no rendering)."""
    return {shapes.caption_of(shapes.sample_scene(np.random.default_rng(shapes.example_seed("train", i)))["objects"])
            for i in range(num_train)}


def _object(kind, color, size, cell) -> dict:
    row, col = divmod(int(cell), sc.GRID)
    return dict(kind=kind, color=color, size=size, row=row, col=col)


def heldout_prompts(kind: str, n: int, exclude: set[str], seed: int = 0) -> list[dict]:
    """`n` prompts {'caption', 'objects'} of one or two shapes whose captions are not in `exclude`."""
    rng = np.random.default_rng([3, KINDS.index(kind), seed])
    out = []
    if kind == "single":
        combos = list(itertools.product(shapes.KINDS, shapes.COLOR_NAMES, shapes.SIZE_NAMES, range(9)))
        for i in rng.permutation(len(combos)):
            objects = [_object(*combos[i])]
            caption = shapes.caption_of(objects)
            if caption not in exclude:
                out.append(dict(caption=caption, objects=objects))
            if len(out) == n:
                break
        if len(out) < n:
            raise ValueError(f"only {len(out)} one-shape prompts are absent from the training captions; asked for {n}")
        return out
    if kind != "two":
        raise ValueError(f"prompt kind must be one of {KINDS}, got {kind!r}")
    seen = set()
    for _ in range(100 * n):
        cells = rng.choice(9, size=2, replace=False)
        objects = [_object(shapes.KINDS[rng.integers(5)], shapes.COLOR_NAMES[rng.integers(6)],
                           shapes.SIZE_NAMES[rng.integers(3)], c) for c in cells]
        caption = shapes.caption_of(objects)
        if caption not in exclude and caption not in seen:
            seen.add(caption)
            out.append(dict(caption=caption, objects=objects))
        if len(out) == n:
            return out
    raise ValueError(f"could not find {n} held-out two-shape prompts")


def score(reading: "sc.Reading", prompts: list[dict]) -> dict:
    """Accuracies in [0, 1]: per attribute (over the prompts' objects), count, and all right (per prompt)."""
    if len(prompts) != len(reading.presence):
        raise ValueError(f"{len(prompts)} prompts but {len(reading.presence)} images")
    hits = {a: [] for a in ATTRIBUTES}
    count_ok, all_ok = [], []
    for i, prompt in enumerate(prompts):
        present = reading.presence[i]
        prompt_ok = True
        for o in prompt["objects"]:
            cell = o["row"] * sc.GRID + o["col"]
            at = cell
            if len(prompt["objects"]) == 1 and present.any():
                at = int(np.argmax(np.where(present, reading.presence_logit[i], -np.inf)))
            seen = bool(present[at])
            ok = {"position": seen and at == cell}
            for a in sc.ATTRIBUTES:
                values = {"kind": shapes.KINDS, "color": shapes.COLOR_NAMES, "size": shapes.SIZE_NAMES}[a]
                ok[a] = seen and values[int(getattr(reading, a)[i, at])] == o[a]
            for a in ATTRIBUTES:
                hits[a].append(ok[a])
            prompt_ok &= all(ok.values())
        n_ok = int(present.sum()) == len(prompt["objects"])
        count_ok.append(n_ok)
        all_ok.append(prompt_ok and n_ok)
    out = {a: float(np.mean(v)) for a, v in hits.items()}
    out.update(count=float(np.mean(count_ok)), all=float(np.mean(all_ok)), num_prompts=len(prompts))
    return out


def shapes_fid(real_features: np.ndarray, sample_features: np.ndarray) -> float:
    """Frechet distance between the judge's features of real and generated images."""
    from latent_diffusion.evaluation import metrics
    mu1, s1 = metrics.gaussian_stats(real_features)
    mu2, s2 = metrics.gaussian_stats(sample_features)
    return metrics.frechet_distance(mu1, s1, mu2, s2)
