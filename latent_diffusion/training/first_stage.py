"""The frozen first stage of a latent diffusion model, with its latent scale factor.

Sources, in order of preference:
  first_stage.workdir     a stage-1 training workdir: its (EMA) params, model config and the
                          scale factor stored with its checkpoint;
  first_stage.checkpoint  a converted checkpoint: a diffusers model folder (config.json +
                          weights) or a CompVis first-stage / full LDM .ckpt/.safetensors
                          (then first_stage.model gives the CompVis ddconfig);
  first_stage.random_init explicitly random weights, for tests and smoke runs only.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from latent_diffusion.models import build
from latent_diffusion.training import checkpointing, partitioning

log = logging.getLogger(__name__)


def encode_latents(module, kind: str, params, x, rng):
    """Unscaled latents of images: a posterior sample (KL, drawn with `rng`) or pre-quantisation h (VQ)."""
    out = module.apply({"params": params}, x, method="encode")
    return out.sample(rng) if kind == "kl" else out


@dataclasses.dataclass
class FirstStage:
    module: Any
    params: Any
    kind: str             # 'kl' or 'vq'
    scale_factor: float
    downsample: int       # f: image size / latent size
    latent_channels: int

    def encode(self, params, x, rng):
        """Scaled latents the diffusion model works in."""
        return encode_latents(self.module, self.kind, params, x, rng) * self.scale_factor

    def decode(self, params, z):
        return self.module.apply({"params": params}, z / self.scale_factor, method="decode")


def _describe(module, kind, params, scale) -> FirstStage:
    f = 2 ** (len(module.ch_mult) - 1)
    return FirstStage(module=module, params=params, kind=kind, scale_factor=float(scale), downsample=f,
                      latent_channels=int(module.embed_dim))


def load(cfg, mesh, abstract: bool = False) -> FirstStage:
    """The frozen first stage described by config.first_stage, params replicated on the mesh.

    `abstract`: shapes only (from config.first_stage.model), nothing read or allocated; for
    describing a model with jax.eval_shape.
    """
    repl = lambda tree: jax.tree.map(lambda _: partitioning.replicated(mesh), tree)
    if abstract:
        module = build.autoencoder(cfg.model)
        res = 8 * 2 ** (len(module.ch_mult) - 1)
        params = jax.eval_shape(lambda r: module.init({"params": r, "sample": r}, jnp.zeros((1, res, res, 3))),
                                jax.random.key(0))["params"]
        return _describe(module, cfg.model.kind, params, cfg.scale_factor or 1.0)
    if cfg.workdir:
        state, meta = checkpointing.restore_state_tree(cfg.workdir, repl)
        if meta.get("stage") != "autoencoder":
            raise ValueError(f"first_stage.workdir {cfg.workdir} holds a {meta.get('stage')!r} run, "
                             "not an autoencoder: point it at a stage-1 workdir")
        model_cfg = ml_collections.ConfigDict(meta["model"])
        module = build.autoencoder(model_cfg)
        use_ema = cfg.use_ema and state.get("ema_params") is not None
        params = state["ema_params"] if use_ema else state["params"]["model"]
        scale = cfg.scale_factor or meta.get("scale_factor")
        if not scale:
            raise ValueError(f"no scale factor stored with {cfg.workdir}; set first_stage.scale_factor")
        log.info("first stage from %s (step %s, %s params), scale factor %.5f", cfg.workdir,
                     meta.get("step"), "EMA" if use_ema else "raw", scale)
        return _describe(module, meta["kind"], params, scale)
    if cfg.checkpoint:
        module, params = _from_checkpoint(cfg)
        if not cfg.scale_factor:
            raise ValueError("first_stage.scale_factor must be set for a converted checkpoint "
                             "(0.18215 for the Stable Diffusion / LDM KL-f8 autoencoder)")
        params = jax.device_put(params, repl(params))
        return _describe(module, cfg.model.kind, params, cfg.scale_factor)
    if cfg.random_init:
        log.warning("first stage has RANDOM weights (first_stage.random_init): for tests only")
        module = build.autoencoder(cfg.model)
        res = 8 * 2 ** (len(module.ch_mult) - 1)
        params = jax.jit(lambda r: module.init({"params": r, "sample": r},
                                               jnp.zeros((1, res, res, 3)))["params"],
                         out_shardings=None)(jax.random.key(1))
        params = jax.device_put(params, repl(params))
        return _describe(module, cfg.model.kind, params, cfg.scale_factor or 1.0)
    raise ValueError("config.first_stage needs a source: --config.first_stage.workdir=<stage-1 workdir> "
                     "(train one with configs/autoencoder_kl.py), or --config.first_stage.checkpoint=<file "
                     "or diffusers folder>")


def _from_checkpoint(cfg):
    from latent_diffusion import convert
    from latent_diffusion.convert.common import DIFFUSERS_WEIGHTS, read_pretrained_folder
    path = cfg.checkpoint
    if os.path.isdir(path):
        model_config, weights = read_pretrained_folder(path, DIFFUSERS_WEIGHTS, "first_stage.checkpoint")
        return convert.from_diffusers(model_config, weights)
    from latent_diffusion.convert import compvis
    ddconfig = dict(cfg.model.to_dict())
    return compvis.first_stage_from_compvis(path, ddconfig)
