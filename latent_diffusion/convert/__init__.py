"""Weight conversion from PyTorch checkpoints (diffusers, transformers, CompVis, lpips, FID Inception).

The public entry points dispatch on the model's class name; each family lives in its own module.
"""
from __future__ import annotations

from typing import Any, Mapping

_DIFFUSERS = {
    "AutoencoderKL": "autoencoder",
    "VQModel": "autoencoder",
    "UNet2DConditionModel": "unet",
}
_TRANSFORMERS = {
    "CLIPTextModel": "clip",
    "CLIPTextModelWithProjection": "clip",
    "CLIPVisionModel": "clip",
    "CLIPVisionModelWithProjection": "clip",
}


def _module(name: str):
    import importlib
    return importlib.import_module(f"latent_diffusion.convert.{name}")


def from_diffusers(model_config: Mapping[str, Any], state_dict: Any):
    """(module, params) for a diffusers `AutoencoderKL`, `VQModel` or `UNet2DConditionModel`.

    `model_config` is the model's config.json as diffusers writes it (with `_class_name`);
    `state_dict` maps names to torch tensors or numpy arrays (or is a path to a checkpoint file).
    """
    name = model_config.get("_class_name")
    if name not in _DIFFUSERS:
        raise ValueError(f"from_diffusers: unsupported or missing _class_name {name!r}; "
                         f"expected one of {sorted(_DIFFUSERS)}")
    return _module(_DIFFUSERS[name]).from_diffusers(dict(model_config), state_dict)


def from_transformers(config: Mapping[str, Any], state_dict: Any):
    """(module, params) for a transformers `CLIPTextModel` or `CLIPVisionModel`."""
    config = dict(config)
    names = list(config.get("architectures") or [])
    name = next((n for n in names if n in _TRANSFORMERS), None)
    if name is None:
        model_type = config.get("model_type")
        name = {"clip_text_model": "CLIPTextModel", "clip_vision_model": "CLIPVisionModel"}.get(model_type)
    if name is None:
        raise ValueError("from_transformers: could not tell the model class from the config "
                         f"(architectures={names}, model_type={config.get('model_type')!r}); "
                         f"expected one of {sorted(_TRANSFORMERS)}")
    return _module(_TRANSFORMERS[name]).from_transformers(name, config, state_dict)


def from_compvis(path_or_state_dict: Any, config: Any = None):
    """Params from an original CompVis LDM / Stable Diffusion checkpoint (.ckpt or .safetensors)."""
    return _module("compvis").from_compvis(path_or_state_dict, config)
