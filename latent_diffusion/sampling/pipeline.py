"""A trained latent diffusion model as a `Generator` for batch jobs (see jobs.py)."""
from __future__ import annotations

import functools
import json
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from latent_diffusion.sampling.requests import WorkItem
from latent_diffusion.training import checkpointing, partitioning

log = logging.getLogger(__name__)


def load_ldm(workdir: str, mesh, *, use_ema: bool = True, step: int | None = None):
    """(task, model params, frozen params, meta) of an LDM training workdir."""
    from latent_diffusion.training.ldm_task import LDMTask
    try:
        meta = checkpointing.read_meta(workdir, step)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}. sample.py needs a workdir with a finished LDM checkpoint "
                                "(python train.py --config=configs/ldm_f8_laion.py:tiny --workdir=...)") from e
    if meta.get("stage") != "ldm":
        raise ValueError(f"{workdir} holds a {meta.get('stage')!r} run; sample.py needs a latent diffusion "
                         "(stage 2) workdir")
    config = ml_collections.ConfigDict(json.loads(meta["config"]))
    task = LDMTask(config, mesh, workdir)
    repl = lambda tree: jax.tree.map(lambda _: partitioning.replicated(mesh), tree)
    state, meta = checkpointing.restore_state_tree(workdir, repl, step)
    ema = state.get("ema_params")
    params = ema if (use_ema and ema is not None) else state["params"]["model"]
    log.info("loaded %s weights of step %s from %s", "EMA" if params is ema else "raw", meta.get("step"),
                 workdir)
    return task, params, task.frozen(), meta


class LDMGenerator:
    """Text-, class- or un-conditional sampling with classifier-free guidance.

    Per-sample noise (x_T and DDIM's eta noise) comes from each sample's own key, so an image
    does not depend on the batch it is sampled in.
    """

    def __init__(self, task, params, frozen, *, image_size: int, sampler: str = "ddim", guidance: float = 5.0,
                 eta: float = 0.0, negative_prompt: str = ""):
        self.task, self.params, self.frozen = task, params, frozen
        self.sampler, self.guidance, self.eta = sampler, float(guidance), float(eta)
        self.negative_prompt = negative_prompt
        c = task.config.conditioning
        self.mode = ("text" if c.crossattn == "text" else "class" if c.class_label else
                     "unconditional" if c.crossattn == "none" and c.concat == "none" else None)
        if self.mode is None:
            raise ValueError(f"sample.py samples text-, class- and un-conditional models; this model is conditioned "
                             f"on crossattn={c.crossattn!r}, concat={c.concat!r}, which needs input images or "
                             "layouts (use LDMTask.sample with a batch of them)")
        f = task.first_stage.downsample
        if image_size % f:
            raise ValueError(f"image_size {image_size} must be a multiple of the first stage's factor {f}")
        self.latent_shape = (image_size // f, image_size // f, task.first_stage.latent_channels)
        self._fn = jax.jit(self._generate, static_argnames=("steps",))

    def prepare(self, items: Sequence[WorkItem]) -> dict:
        out = {"guidance": np.array([self.guidance if it.guidance is None else it.guidance for it in items],
                                    np.float32)}
        if self.mode == "text":
            if any(it.prompt is None for it in items):
                raise ValueError("this is a text-to-image model: every request needs a prompt")
            tok = self.task.tokenizer
            out["tokens"] = tok([it.prompt for it in items])
            out["neg_tokens"] = tok([it.negative_prompt if it.negative_prompt is not None else self.negative_prompt
                                     for it in items])
        elif self.mode == "class":
            if any(it.label is None for it in items):
                raise ValueError("this is a class-conditional model: every request needs a class label")
            out["label"] = np.array([it.label for it in items], np.int32)
        return out

    def _generate(self, params, frozen, arrays, keys, steps):
        task = self.task
        x_T = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), self.latent_shape))(keys)
        noise = None
        if self.sampler == "ddim" and self.eta > 0:
            noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), (steps,) + self.latent_shape))(keys)
            noise = jnp.swapaxes(noise, 0, 1)
        if self.mode == "text":
            raw, raw_u = {"tokens": arrays["tokens"]}, {"tokens": arrays["neg_tokens"]}
        elif self.mode == "class":
            raw = {"y": arrays["label"]}
            raw_u = task.null_conditions(raw)
        else:
            raw, raw_u = {}, {}
        model_fn = task.guided_model_fn(params, frozen, raw, raw_u, self.latent_shape[:2], arrays["guidance"])
        z = task.run_sampler(model_fn, x_T, sampler=self.sampler, steps=steps, eta=self.eta, ddim_noise=noise)
        images = task.first_stage.decode(frozen["first_stage"], z)
        return jnp.round((jnp.clip(images, -1, 1) + 1) * 127.5).astype(jnp.uint8)

    def __call__(self, arrays, keys, *, steps):
        return self._fn(self.params, self.frozen, arrays, keys, steps=int(steps))
