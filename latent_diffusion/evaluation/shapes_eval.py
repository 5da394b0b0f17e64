"""Prompt following of a shapes text-to-image model: sample held-out prompts, read them with the judge, score.

Used by the end-to-end job (end_to_end.py), by the training loop's evaluation of shapes runs, and by
the experiments in BENCHMARKS.md. Samples are keyed per prompt index (sampling.requests.sample_key),
so a prompt's image does not depend on the batch it was drawn in.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from latent_diffusion.evaluation import shapes_classifier as sc
from latent_diffusion.evaluation import shapes_prompts as sp


@dataclasses.dataclass(frozen=True)
class PromptSuite:
    """The held-out prompts a model is judged on: one- and two-shape prompts absent from the training captions."""
    single: list
    two: list

    @classmethod
    def make(cls, num_single: int, num_two: int, num_train: int = 5000, seed: int = 0) -> "PromptSuite":
        exclude = sp.train_captions(num_train)
        return cls(single=sp.heldout_prompts("single", num_single, exclude, seed),
                   two=sp.heldout_prompts("two", num_two, exclude, seed))

    def sets(self) -> dict:
        return {"single": self.single, "two": self.two}


def sample_captions(generate, captions, *, steps: int, guidance: float, seed: int = 0, batch_size: int = 32):
    """uint8 images (N, H, W, 3) for `captions` from an `LDMGenerator`-like callable (prepare + __call__)."""
    import jax

    from latent_diffusion.sampling.requests import WorkItem, sample_key
    items = [WorkItem(index=i, seed=seed, prompt=c, guidance=float(guidance)) for i, c in enumerate(captions)]
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        keys = jax.vmap(lambda i: sample_key(seed, i))(np.array([it.index for it in chunk]))
        out.append(np.asarray(generate(generate.prepare(chunk), keys, steps=steps)))
    return np.concatenate(out)


def evaluate(judge: sc.ShapesJudge, images_by_set: dict, suite: PromptSuite) -> dict:
    """{'single': score, 'two': score} for images sampled from the suite's prompts, in order."""
    return {name: sp.score(judge.read(images_by_set[name]), prompts) for name, prompts in suite.sets().items()}


def flat_metrics(scores: dict, prefix: str = "") -> dict:
    """{'single/all': ..., 'two/color': ...} for logging."""
    return {f"{prefix}{name}/{k}": float(v) for name, s in scores.items() for k, v in s.items() if k != "num_prompts"}


def caption_grid(images: np.ndarray, captions, *, columns: int = 4, scale: int = 3) -> np.ndarray:
    """A uint8 grid of images, each upscaled `scale` x (nearest) with its caption written under it."""
    from PIL import Image, ImageDraw, ImageFont
    n, h, w, _ = images.shape
    cell_w, text_h = w * scale, 40
    rows = -(-n // columns)
    canvas = Image.new("RGB", (columns * cell_w, rows * (h * scale + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i in range(n):
        r, c = divmod(i, columns)
        x0, y0 = c * cell_w, r * (h * scale + text_h)
        canvas.paste(Image.fromarray(images[i]).resize((cell_w, h * scale), Image.NEAREST), (x0, y0))
        draw.multiline_text((x0 + 3, y0 + h * scale + 2), _wrap(captions[i], cell_w // 6), fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def _wrap(text: str, width: int) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])


class PromptFollowingMonitor:
    """The prompt-following score of a shapes run during training: at each evaluation a fixed suite of
    held-out prompts is sampled (DDIM with guidance) and read by the judge.

    `__call__(model_params)` -> (scalars {'prompts/single/all': ...}, images {'prompts_grid': (1, H, W, 3)}).
    The sampler is compiled once; each call only swaps in the current weights.
    """

    def __init__(self, task, frozen, *, num_prompts: int = 16, steps: int = 20, guidance: float = 3.0,
                 seed: int = 0, judge: sc.ShapesJudge | None = None):
        from latent_diffusion.sampling.pipeline import LDMGenerator
        self.suite = PromptSuite.make(num_prompts, num_prompts, seed=seed)
        self.judge = judge if judge is not None else sc.ShapesJudge.load()
        self.steps, self.guidance, self.seed = int(steps), float(guidance), int(seed)
        # Built with no weights; each call sets the current ones, so the jitted sampler is reused.
        self._gen = LDMGenerator(task, None, frozen, image_size=int(task.config.data.resolution),
                                 guidance=self.guidance)

    def __call__(self, model_params) -> tuple[dict, dict]:
        self._gen.params = model_params
        images = {name: sample_captions(self._gen, [p["caption"] for p in prompts], steps=self.steps,
                                        guidance=self.guidance, seed=self.seed)
                  for name, prompts in self.suite.sets().items()}
        scores = evaluate(self.judge, images, self.suite)
        k = min(8, len(self.suite.single))
        grid = caption_grid(np.concatenate([images["single"][:k], images["two"][:k]]),
                            [p["caption"] for p in self.suite.single[:k] + self.suite.two[:k]])
        return flat_metrics(scores, "prompts/"), {"prompts_grid": grid[None]}
