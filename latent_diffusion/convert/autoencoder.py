"""diffusers / CompVis first-stage autoencoders (AutoencoderKL, VQModel) <-> our Flax params.

Both PyTorch layouts are renames of our param tree, so the mapping walks the tree the module
expects (from `jax.eval_shape` of its init) and translates every path to a torch key.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion.convert.common import (StateDict, check_tree_shapes, conv_kernel,
                                             flax_conv_kernel, linear_kernel, state_dict_of)
from latent_diffusion.models.autoencoder import AutoencoderKL, VQModel

LAYOUTS = ("diffusers", "compvis")

_DIFFUSERS_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# Checkpoints saved by diffusers < 0.14 use these names for the same layers.
_DIFFUSERS_ATTN_OLD = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def expected_params(module) -> Any:
    """The param tree (ShapeDtypeStructs) `module.init` would create, without computing it."""
    size = 2 ** len(module.ch_mult)
    x = jax.ShapeDtypeStruct((1, size, size, module.in_channels), jnp.float32)
    rngs = {"params": jax.random.key(0), "sample": jax.random.key(1), "dropout": jax.random.key(2)}
    return jax.eval_shape(module.init, rngs, x)["params"]


def _module_name(name: str, layout: str, levels: int, in_attn: bool) -> str:
    """One component of our module path in the torch layout."""
    m = re.fullmatch(r"(down|up)_(\d+)_(block|attn)_(\d+)", name)
    if m:
        side, level, kind, i = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        if layout == "compvis":
            return f"{side}.{level}.{kind}.{i}"
        blocks = "down_blocks" if side == "down" else "up_blocks"
        index = level if side == "down" else levels - 1 - level  # diffusers counts up-blocks from the bottom
        return f"{blocks}.{index}.{'resnets' if kind == 'block' else 'attentions'}.{i}"
    m = re.fullmatch(r"(down|up)_(\d+)_(downsample|upsample)", name)
    if m:
        side, level = m.group(1), int(m.group(2))
        if layout == "compvis":
            return f"{side}.{level}.{m.group(3)}"
        if side == "down":
            return f"down_blocks.{level}.downsamplers.0"
        return f"up_blocks.{levels - 1 - level}.upsamplers.0"
    m = re.fullmatch(r"mid_(block|attn)_(\d)", name)
    if m:
        if layout == "compvis":
            return f"mid.{name[4:]}"
        i = int(m.group(2)) - 1
        return f"mid_block.{'resnets' if m.group(1) == 'block' else 'attentions'}.{i}"
    if layout == "diffusers":
        if in_attn:
            return _DIFFUSERS_ATTN[name]
        if name in ("nin_shortcut", "conv_shortcut"):
            return "conv_shortcut"
        if name == "norm_out":
            return "conv_norm_out"
    return name


def torch_key(path: tuple[str, ...], layout: str, levels: int) -> str:
    """Torch state-dict key of one of our params, e.g. ('encoder', 'mid_attn_1', 'q', 'kernel')."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    *mods, leaf = path
    parts = []
    for i, name in enumerate(mods):
        in_attn = i > 0 and ("_attn_" in mods[i - 1] or mods[i - 1].startswith("mid_attn"))
        parts.append(_module_name(name, layout, levels, in_attn))
    if leaf == "embedding":
        parts.append("embedding.weight")
    else:
        parts.append({"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf])
    return ".".join(parts)


def _paths(tree) -> list[tuple[tuple[str, ...], Any]]:
    return [(tuple(k.key for k in p), v) for p, v in jax.tree_util.tree_leaves_with_path(tree)]


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _take(sd: StateDict, key: str, layout: str):
    """The array for `key` (or its pre-0.14 diffusers alias), None if the checkpoint lacks it."""
    if sd.has(key):
        return sd.take(key)
    if layout == "diffusers":
        for new, old in _DIFFUSERS_ATTN_OLD.items():
            alias = key.replace(f".{new}.", f".{old}.")
            if alias != key and sd.has(alias):
                return sd.take(alias)
    return None


def params_from_state_dict(module, sd: StateDict, layout: str, ignore=()) -> dict:
    """Our params for `module` from a torch state dict view; every key under the view must be used."""
    expected = expected_params(module)
    levels = len(module.ch_mult)
    params: dict = {}
    missing = []
    for path, spec in _paths(expected):
        key = torch_key(path, layout, levels)
        value = _take(sd, key, layout)
        if value is None:
            missing.append(key)
            continue
        if path[-1] == "kernel":
            value = conv_kernel(value) if len(spec.shape) == 4 else linear_kernel(value)
        _set(params, path, value.astype(np.float32))
    if missing:  # report every missing and unexpected key at once: that shows the mismatch
        unexpected = sd.unused(ignore)
        raise ValueError(
            f"{sd.what} does not match {type(module).__name__}(ch={module.ch}, ch_mult="
            f"{tuple(module.ch_mult)}, num_res_blocks={module.num_res_blocks}, attn_resolutions="
            f"{tuple(module.attn_resolutions)}): {len(missing)} missing key(s) {missing[:12]}"
            f"{' ...' if len(missing) > 12 else ''}; {len(unexpected)} unexpected key(s) "
            f"{unexpected[:12]}{' ...' if len(unexpected) > 12 else ''}. Check the config.")
    sd.finish(ignore)
    check_tree_shapes(expected, params, what=f"{sd.what} params")
    return params


def to_state_dict(module, params, layout: str, prefix: str = "") -> dict[str, np.ndarray]:
    """Our params -> a torch-layout state dict of numpy arrays (diffusers or CompVis names)."""
    levels = len(module.ch_mult)
    out = {}
    for path, value in _paths(params):
        value = np.asarray(value, np.float32)
        if path[-1] == "kernel":
            if value.ndim == 4:
                value = flax_conv_kernel(value)
            else:  # attention projections: Linear in diffusers, 1x1 conv in CompVis
                value = value.T if layout == "diffusers" else value.T[:, :, None, None]
        out[prefix + torch_key(path, layout, levels)] = value
    return out


_KNOWN_DIFFUSERS_KEYS = {
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
    "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size",
    "scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast",
    "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention", "num_vq_embeddings",
    "vq_embed_dim", "norm_type", "lookup_from_codebook"}


def module_from_diffusers_config(config: Mapping[str, Any], **overrides):
    """Our AutoencoderKL / VQModel with the architecture of a diffusers config.json."""
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    name = config.get("_class_name") or ("VQModel" if "num_vq_embeddings" in cfg else "AutoencoderKL")
    if name not in ("AutoencoderKL", "VQModel"):
        raise ValueError(f"expected _class_name AutoencoderKL or VQModel, got {name!r}")
    unknown = sorted(set(cfg) - _KNOWN_DIFFUSERS_KEYS)
    if unknown:
        raise ValueError(f"diffusers {name} config: unsupported key(s) {unknown}; this converter "
                         f"handles {sorted(_KNOWN_DIFFUSERS_KEYS)}")
    if cfg.get("act_fn", "silu") not in ("silu", "swish"):
        raise ValueError(f"diffusers {name}: act_fn {cfg['act_fn']!r} is not supported (only silu)")
    if cfg.get("norm_type", "group") != "group":
        raise ValueError(f"diffusers {name}: norm_type {cfg['norm_type']!r} is not supported (only 'group')")
    boc = tuple(cfg.get("block_out_channels", (64,)))
    levels = len(boc)
    ch = boc[0]
    if any(c % ch for c in boc):
        raise ValueError(f"block_out_channels {boc} must all be multiples of the first entry")
    down = tuple(cfg.get("down_block_types", ("DownEncoderBlock2D",)))
    up = tuple(cfg.get("up_block_types", ("UpDecoderBlock2D",)))
    if len(down) != levels or len(up) != levels:
        raise ValueError(f"down_block_types {down} and up_block_types {up} must each have "
                         f"{levels} entries (one per block_out_channels)")
    known = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True,
             "UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}
    for t in down + up:
        if t not in known:
            raise ValueError(f"block type {t!r} is not supported; expected one of {sorted(known)}")
    enc_attn = [known[t] for t in down]
    dec_attn = [known[t] for t in reversed(up)]
    if enc_attn != dec_attn:
        raise ValueError(f"attention must sit at the same levels in encoder {down} and decoder "
                         f"{up} (reversed); our model ties them through attn_resolutions")
    sample = cfg.get("sample_size", 32)
    sample = max(sample) if isinstance(sample, (list, tuple)) else int(sample)
    resolution = max(sample, 2 ** (levels - 1))
    latent = cfg.get("latent_channels", 3 if name == "VQModel" else 4)
    common = dict(ch=ch, ch_mult=tuple(c // ch for c in boc),
                  num_res_blocks=cfg.get("layers_per_block", 1),
                  attn_resolutions=tuple(resolution // 2 ** i for i in range(levels) if enc_attn[i]),
                  z_channels=latent, resolution=resolution,
                  in_channels=cfg.get("in_channels", 3), out_ch=cfg.get("out_channels", 3),
                  num_groups=cfg.get("norm_num_groups", 32),
                  mid_attention=bool(cfg.get("mid_block_add_attention", True)))
    if name == "VQModel":
        embed = cfg.get("vq_embed_dim") or latent
        return VQModel(**common, embed_dim=embed, n_embed=cfg.get("num_vq_embeddings", 256),
                       **overrides)
    return AutoencoderKL(**common, embed_dim=latent,
                         use_quant_conv=bool(cfg.get("use_quant_conv", True)),
                         use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)), **overrides)


def from_diffusers(model_config: dict, state_dict) -> tuple[Any, dict]:
    """(module, params) for a diffusers AutoencoderKL or VQModel (config.json + state dict)."""
    module = module_from_diffusers_config(model_config)
    sd = StateDict(state_dict_of(state_dict), what=f"diffusers {type(module).__name__} checkpoint")
    return module, params_from_state_dict(module, sd, "diffusers")
