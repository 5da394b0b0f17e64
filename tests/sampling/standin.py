"""A small stand-in generator for the job tests: a random tiny conv denoiser run through the real
DDIM sampler with classifier-free guidance on 8x8x3 latents. Also a script, so a test can kill a
job from outside: `python -m tests.sampling.standin OUTDIR [--hang_after N]`."""
from __future__ import annotations

import argparse
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion.diffusion.guidance import cfg_model_fn
from latent_diffusion.diffusion.samplers import ddim_sample
from latent_diffusion.diffusion.schedules import make_schedule
from latent_diffusion.sampling.requests import WorkItem

NUM_CLASSES = 4
SIZE = 8


class TinyDenoiser(nn.Module):
    """eps ~ x plus a small learned-looking correction, so samples stay in a useful range."""
    num_classes: int
    features: int = 16

    @nn.compact
    def __call__(self, x, t, label):
        emb = nn.Embed(self.num_classes + 1, self.features)(label)  # the last id is the null class
        temb = jnp.sin(t[:, None].astype(jnp.float32) / 100.0 * jnp.arange(1, self.features + 1))
        h = nn.Conv(self.features, (3, 3))(x) + (emb + temb)[:, None, None, :]
        h = nn.Conv(x.shape[-1], (3, 3))(nn.silu(h))
        return 0.95 * x + 0.2 * h


MODEL = TinyDenoiser(NUM_CLASSES)
SCHEDULE = make_schedule("scaled_linear", 1000)


@functools.partial(jax.jit, static_argnames="steps")
def _sample(params, arrays, keys, steps):
    # Module level, so every generator instance (and test) shares one compilation cache.
    x_T = jax.vmap(lambda k: jax.random.normal(k, (SIZE, SIZE, 3)))(keys)
    apply = lambda x, t, c: MODEL.apply({"params": params}, x, t, c)  # noqa: E731
    null = jnp.full_like(arrays["label"], NUM_CLASSES)
    model_fn = cfg_model_fn(apply, arrays["label"], null, arrays["scale"])
    x0 = ddim_sample(model_fn, SCHEDULE, x_T, steps)
    return jnp.clip(jnp.round((jnp.tanh(x0) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


class StandInGenerator:
    """Follows the sampling.jobs.Generator protocol.

    `fail_after=n` raises on call n + 1; `hang_after=n` sleeps for good on call n + 1 (to be killed).
    """

    def __init__(self, default_scale: float = 3.0, fail_after: int | None = None, hang_after: int | None = None):
        x = jnp.zeros((1, SIZE, SIZE, 3))
        self.params = MODEL.init(jax.random.key(0), x, jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))
        self.default_scale, self.fail_after, self.hang_after = default_scale, fail_after, hang_after
        self.calls = 0

    def prepare(self, items):
        return {
            "label": np.array([NUM_CLASSES if it.label is None else it.label for it in items], np.int32),
            "scale": np.array([self.default_scale if it.guidance is None else it.guidance for it in items],
                              np.float32)}

    def __call__(self, arrays, keys, *, steps):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError(f"stand-in failure on call {self.calls}")
        while self.hang_after is not None and self.calls > self.hang_after:
            time.sleep(1.0)
        return _sample(self.params["params"], arrays, keys, steps=steps)


JOB_SPEC = {"model": "standin", "sampler": "ddim", "steps": 5, "guidance": 3.0, "seed": 7, "image_size": SIZE}


def standard_items(n: int = 11) -> list[WorkItem]:
    """Class-conditional items with some per-item seeds, scales and step counts."""
    items = []
    for i in range(n):
        items.append(WorkItem(index=i, seed=100 + i if i % 5 == 0 else JOB_SPEC["seed"], label=i % NUM_CLASSES,
                              guidance=1.0 + i % 3 if i % 4 == 1 else None, steps=3 if i % 7 == 3 else None))
    return items


def main():
    from latent_diffusion.sampling.jobs import run_job
    parser = argparse.ArgumentParser()
    parser.add_argument("outdir")
    parser.add_argument("--num_items", type=int, default=11)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hang_after", type=int, default=None)
    args = parser.parse_args()
    run_job(StandInGenerator(hang_after=args.hang_after), standard_items(args.num_items), args.outdir,
            global_batch_size=args.batch, job_spec=JOB_SPEC, write_npz=True, progress=False)


if __name__ == "__main__":
    main()
