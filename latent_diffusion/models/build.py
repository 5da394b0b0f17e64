"""Build modules from config sections: the only place where config fields meet module fields."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from latent_diffusion import config_fields

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def module_kwargs(cls, cfg: Any, skip: tuple[str, ...] = ("kind",), where: str = "model") -> dict:
    """Module fields from a ConfigDict section; unknown keys fail with the key's name."""
    fields = {f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")}
    values = {k: v for k, v in (cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)).items() if k not in skip}
    config_fields.check_known(values, fields, where, what=f"the fields of {cls.__name__} are")
    out = {}
    for key, value in values.items():
        if key in ("dtype", "param_dtype"):
            value = dtype_of(value)
        elif isinstance(value, list):
            value = tuple(value)
        out[key] = value
    return out


def autoencoder(cfg: Any):
    """AutoencoderKL or VQModel from config.model (kind 'kl' or 'vq')."""
    from latent_diffusion.models.autoencoder import AutoencoderKL, VQModel
    kinds = {"kl": AutoencoderKL, "vq": VQModel}
    if cfg.kind not in kinds:
        raise ValueError(f"config.model.kind must be 'kl' or 'vq', got {cfg.kind!r}")
    cls = kinds[cfg.kind]
    return cls(**module_kwargs(cls, cfg))


def unet(cfg: Any):
    from latent_diffusion.models.unet import UNet
    return UNet(**module_kwargs(UNet, cfg, skip=(), where="unet"))


def clip_text_encoder(cfg: Any):
    from latent_diffusion.models.text_encoders import CLIPTextTransformer
    return CLIPTextTransformer(**module_kwargs(CLIPTextTransformer, cfg, skip=(),
                                               where="conditioning.text.model"))
