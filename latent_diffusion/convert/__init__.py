"""Weight conversion from PyTorch checkpoints (diffusers, transformers, CompVis, lpips, FID Inception).

The public entry points dispatch on the model's class name; each family lives in its own module.
"""
from __future__ import annotations

from typing import Any, Mapping

_DIFFUSERS = {
    "AutoencoderKL": "autoencoder",
    "VQModel": "autoencoder",
    "UNet2DConditionModel": "unet",
    "UNet2DModel": "unet",
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
    """(module, params) for a diffusers `AutoencoderKL`, `VQModel`, `UNet2DConditionModel` or `UNet2DModel`.

    `model_config` is the model's config.json as diffusers writes it (with `_class_name`);
    `state_dict` maps names to torch tensors or numpy arrays (or is a path to a checkpoint file).
    """
    name = model_config.get("_class_name")
    if name not in _DIFFUSERS:
        raise ValueError(f"from_diffusers: unsupported or missing _class_name {name!r}; "
                         f"expected one of {sorted(_DIFFUSERS)}")
    return _module(_DIFFUSERS[name]).from_diffusers(dict(model_config), state_dict)


def from_transformers(config: Mapping[str, Any], state_dict: Any, tower: str | None = None):
    """(module, params) for one transformers CLIP tower.

    Single-tower configs (`CLIPTextModel`, `CLIPVisionModel` and their `...WithProjection`
    classes, or model_type 'clip_text_model' / 'clip_vision_model') give that tower; `tower` may
    then be left out or must name it. A full `CLIPModel` config (model_type 'clip') holds both
    towers: pass tower='text' or tower='vision' to get that one with its projection into the
    joint space (transformers' text_embeds / image_embeds), e.g. for CLIP score.
    """
    config = dict(config)
    if tower not in (None, "text", "vision"):
        raise ValueError(f"from_transformers: tower must be None, 'text' or 'vision', got {tower!r}")
    names = list(config.get("architectures") or [])
    model_type = config.get("model_type")
    if "CLIPModel" in names or (model_type == "clip" and not any(n in _TRANSFORMERS for n in names)):
        if tower is None:
            raise ValueError("from_transformers: this is a full CLIPModel config with both towers; pass "
                             "tower='text' or tower='vision' to choose one")
        name = "CLIPTextModelWithProjection" if tower == "text" else "CLIPVisionModelWithProjection"
        return _module(_TRANSFORMERS[name]).from_transformers(name, config, state_dict)
    name = next((n for n in names if n in _TRANSFORMERS), None)
    if name is None:
        name = {"clip_text_model": "CLIPTextModel", "clip_vision_model": "CLIPVisionModel"}.get(model_type)
    if name is None:
        raise ValueError("from_transformers: could not tell the model class from the config "
                         f"(architectures={names}, model_type={model_type!r}); "
                         f"expected one of {sorted([*_TRANSFORMERS, 'CLIPModel'])}")
    if tower is not None and not name.startswith("CLIPText" if tower == "text" else "CLIPVision"):
        raise ValueError(f"from_transformers: tower={tower!r} was asked for, but the config is a {name}")
    return _module(_TRANSFORMERS[name]).from_transformers(name, config, state_dict)


def from_compvis(path_or_state_dict: Any, config: Any = None):
    """Params from an original CompVis LDM / Stable Diffusion checkpoint (.ckpt or .safetensors)."""
    return _module("compvis").from_compvis(path_or_state_dict, config)
