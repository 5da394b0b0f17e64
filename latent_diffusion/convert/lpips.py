"""LPIPS-VGG weights from PyTorch: torchvision's VGG16 trunk plus the lpips linear heads.

Accepted trunk layouts: torchvision `vgg16().state_dict()` (`features.{i}.*`, the classifier is
ignored), `vgg16().features.state_dict()` (`{i}.*`), and an lpips / taming LPIPS state dict
(`net.slice{k}.{i}.*`, possibly under a prefix such as `loss.perceptual_loss.`). The heads are
lpips' `lin{k}.model.1.weight` (`model.0` when built without dropout). Nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Mapping

import numpy as np

from latent_diffusion.convert.common import (
    StateDict, check_tree_shapes, linear_kernel, load_state_dict, state_dict_of)
from latent_diffusion.models.lpips import LPIPS_CHANNELS, SCALE, SHIFT, VGG16_STAGES, lpips_shapes

LIN_HELP = (
    "LPIPS needs its linear-head weights: the lpips package's `lpips/weights/v0.1/vgg.pth` "
    "(`pip install lpips` puts it on disk, or take it from github.com/richzhang/PerceptualSimilarity; "
    "taming-transformers' `vgg.pth` for its LPIPS is the same file). Pass its path as lin_path.")


def _vgg_conv_indices() -> dict[str, tuple[int, int]]:
    """Our conv name -> (stage, index in torchvision's `vgg16().features`)."""
    out, idx = {}, 0
    for stage, _, n_convs in VGG16_STAGES:
        if stage > 1:
            idx += 1  # the max pool that opens the stage
        for i in range(1, n_convs + 1):
            out[f"conv{stage}_{i}"] = (stage, idx)
            idx += 2  # conv, relu
    return out


def _find_prefix(keys, suffix: str, exact_only: bool = False) -> str | None:
    for k in keys:
        if k == suffix or (not exact_only and k.endswith("." + suffix)):
            return k[: len(k) - len(suffix)]
    return None


def _vgg_params(sd: Mapping[str, Any]) -> dict:
    keys = list(sd)
    prefix = _find_prefix(keys, "slice1.0.weight")
    if prefix is not None:
        view, name = StateDict(sd, prefix, "LPIPS VGG trunk"), "slice{stage}.{idx}"
    elif (prefix := _find_prefix(keys, "features.0.weight")) is not None:
        view, name = StateDict(sd, prefix + "features.", "torchvision vgg16"), "{idx}"
    elif _find_prefix(keys, "0.weight", exact_only=True) is not None:
        view, name = StateDict(sd, "", "torchvision vgg16 features"), "{idx}"
    else:
        raise ValueError(
            "could not find VGG16 trunk weights: expected torchvision's `features.0.weight` ... "
            "(vgg16-397923af.pth), `0.weight` ... (vgg16().features) or lpips' `net.slice1.0.weight` ...; "
            f"got keys like {keys[:6]}")
    params = {}
    for conv, (stage, idx) in _vgg_conv_indices().items():
        params[conv] = view.conv(name.format(stage=stage, idx=idx))
    view.finish()
    return params


def _lin_params(sd: Mapping[str, Any]) -> dict | None:
    keys = list(sd)
    for layer in (1, 0):  # model.1 behind a Dropout (the default), model.0 without one
        prefix = _find_prefix(keys, f"lin0.model.{layer}.weight")
        if prefix is not None:
            break
    else:
        return None
    view = StateDict(sd, prefix, "LPIPS linear heads")
    if view.has("lin5.model.0.weight") or view.has("lin5.model.1.weight"):
        raise ValueError("these LPIPS linear heads have 7 layers (SqueezeNet); the VGG heads are needed")
    for name, value in (("shift", SHIFT), ("scale", SCALE)):
        key = f"scaling_layer.{name}"
        if view.has(key) and not np.allclose(view.take(key).reshape(-1), value):
            raise ValueError(f"{key} differs from lpips v0.1's constants {value}; unsupported LPIPS variant")
    return {f"lin{k}": {"kernel": linear_kernel(view.take(f"lin{k}.model.{layer}.weight"))}
            for k in range(len(LPIPS_CHANNELS))}


def lpips_params_from_torch(vgg_state_dict: Any, lin_state_dict: Any = None) -> dict:
    """LPIPS params from a VGG16 state dict and lpips' head weights (paths, dicts or torch modules).

    With `lin_state_dict=None` the heads are looked for in `vgg_state_dict` (a full LPIPS state dict).
    """
    vgg_sd = state_dict_of(vgg_state_dict)
    lin_sd = vgg_sd if lin_state_dict is None else state_dict_of(lin_state_dict)
    lins = _lin_params(lin_sd)
    if lins is None:
        raise ValueError(f"no LPIPS linear heads (`lin0.model.1.weight` ...) in the state dict. {LIN_HELP}")
    params = {"net": _vgg_params(vgg_sd), **lins}
    try:
        check_tree_shapes(lpips_shapes(), params, "LPIPS-VGG weights")
    except ValueError as e:
        raise ValueError(f"{e}. Expected VGG16 with lpips' VGG heads (channels {LPIPS_CHANNELS}); "
                         "AlexNet / SqueezeNet LPIPS weights are not supported.") from None
    return params


def bundled_lin_path(version: str = "0.1") -> str | None:
    """Path of the VGG head weights shipped inside an installed `lpips` package, if any."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "weights", f"v{version}", "vgg.pth")
        if os.path.isfile(path):
            return path
    return None


def load_lpips_params(vgg_path: str | os.PathLike, lin_path: str | os.PathLike | None = None) -> dict:
    """LPIPS params from files: a VGG16 checkpoint (or a full LPIPS state dict) and the head weights.

    Without `lin_path`, heads inside the first file are used, else the ones an installed `lpips`
    package ships; with neither, raises FileNotFoundError naming the file to get.
    """
    vgg_sd = load_state_dict(vgg_path)
    if lin_path is not None:
        lin_sd = load_state_dict(lin_path)
    elif _lin_params(vgg_sd) is not None:
        lin_sd = vgg_sd
    else:
        bundled = bundled_lin_path()
        if bundled is None:
            raise FileNotFoundError(f"{os.fspath(vgg_path)} holds no LPIPS linear heads and no `lpips` "
                                    f"package is installed. {LIN_HELP}")
        lin_sd = load_state_dict(bundled)
    return lpips_params_from_torch(vgg_sd, lin_sd)
