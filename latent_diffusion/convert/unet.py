"""UNet weights from diffusers `UNet2DConditionModel` / `UNet2DModel` and CompVis `model.diffusion_model.*` keys.

diffusers' `UNet2DModel` is its form of the CompVis UNet with AttentionBlocks
(use_spatial_transformer=False: the unconditional and concat-conditioned LDMs).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion.convert.common import StateDict, check_tree_shapes, state_dict_of
from latent_diffusion.models.unet import UNet

_CROSS_DOWN, _PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
_CROSS_UP, _PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"

# diffusers options whose value must be the one the CompVis UNet hard-wires.
_FIXED = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "num_attention_heads": None,
    "dual_cross_attention": False, "addition_embed_type": None, "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
    "class_embeddings_concat": False, "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None, "mid_block_type": "UNetMidBlock2DCrossAttn",
}
_DEFAULTS = {  # diffusers' defaults for the keys a config may leave out
    "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": (_CROSS_DOWN, _CROSS_DOWN, _CROSS_DOWN, _PLAIN_DOWN),
    "up_block_types": (_PLAIN_UP, _CROSS_UP, _CROSS_UP, _CROSS_UP),
    "cross_attention_dim": 1280, "attention_head_dim": 8, "transformer_layers_per_block": 1,
    "use_linear_projection": False, "class_embed_type": None, "num_class_embeds": None,
    "resnet_time_scale_shift": "default", "dropout": 0.0, "only_cross_attention": False,
    "mid_block_only_cross_attention": None, "projection_class_embeddings_input_dim": None,
}


def _uniform(name: str, value, n: int):
    """A per-level diffusers option as one value; refuse levels that differ."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n or len(set(map(str, values))) != 1:
        raise ValueError(f"UNet2DConditionModel config: {name}={value!r} differs between levels; "
                         "the CompVis UNet uses one value for all levels")
    return values[0]


def _check_fixed(cfg: Mapping[str, Any], fixed: Mapping[str, Any], what: str) -> None:
    for key, want in fixed.items():
        got = cfg.get(key, want)
        if got != want and not (isinstance(want, float) and got is not None and float(got) == want):
            raise ValueError(f"{what} config: {key}={got!r} is not supported (the CompVis UNet needs {want!r})")


def _shift(value, what: str) -> bool:
    if value not in ("default", "scale_shift"):
        raise ValueError(f"{what} config: resnet_time_scale_shift={value!r} is not supported "
                         "('default' or 'scale_shift')")
    return value == "scale_shift"


def unet_config_from_diffusers(config: Mapping[str, Any]) -> dict:
    """Our UNet fields for a diffusers `UNet2DConditionModel` (or, by `_class_name`, `UNet2DModel`) config.

    Refuses what the CompVis UNet cannot express.
    """
    if config.get("_class_name") == "UNet2DModel":
        return unet2d_config_from_diffusers(config)
    cfg = {**_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    _check_fixed(cfg, _FIXED, "UNet2DConditionModel")
    if cfg["only_cross_attention"] not in (False, None) or cfg["mid_block_only_cross_attention"]:
        raise ValueError("UNet2DConditionModel config: only_cross_attention is not supported")
    chans = list(cfg["block_out_channels"])
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    n = len(chans)
    if len(down) != n or len(up) != n:
        raise ValueError(f"UNet2DConditionModel config: {n} block_out_channels but {len(down)} down and "
                         f"{len(up)} up blocks")
    model_channels = chans[0]
    if any(c % model_channels for c in chans):
        raise ValueError(f"UNet2DConditionModel config: block_out_channels {chans} are not multiples of "
                         f"the first ({model_channels}); cannot express them as channel_mult")
    with_attn = []
    for i, kind in enumerate(down):
        if kind not in (_CROSS_DOWN, _PLAIN_DOWN):
            raise ValueError(f"UNet2DConditionModel config: down block {kind!r} is not supported "
                             f"(expected {_CROSS_DOWN} or {_PLAIN_DOWN})")
        if up[n - 1 - i] not in (_CROSS_UP, _PLAIN_UP):
            raise ValueError(f"UNet2DConditionModel config: up block {up[n - 1 - i]!r} is not supported "
                             f"(expected {_CROSS_UP} or {_PLAIN_UP})")
        if (kind == _CROSS_DOWN) != (up[n - 1 - i] == _CROSS_UP):
            raise ValueError(f"UNet2DConditionModel config: level {i} has {kind} but its up block is "
                             f"{up[n - 1 - i]}; the CompVis UNet attends at the same levels on both paths")
        with_attn.append(kind == _CROSS_DOWN)
    attention_resolutions = tuple(2 ** i for i in range(n) if with_attn[i])

    # diffusers' `attention_head_dim` is the number of heads per level (its documented naming quirk);
    # the width of a head is channels // heads. The mid block uses the last level's count.
    heads = cfg["attention_head_dim"]
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * n
    levels = [i for i in range(n) if with_attn[i]] + [n - 1]
    pairs = {(chans[i] // heads[i], heads[i]) for i in levels}
    if any(chans[i] % heads[i] for i in levels):
        raise ValueError(f"UNet2DConditionModel config: channels {chans} are not divisible by the head "
                         f"counts attention_head_dim={cfg['attention_head_dim']}")
    if len({h for _, h in pairs}) == 1:
        head_kw = dict(num_heads=heads[n - 1], num_head_channels=-1)
    elif len({d for d, _ in pairs}) == 1:
        head_kw = dict(num_heads=-1, num_head_channels=chans[n - 1] // heads[n - 1])
    else:
        raise ValueError(f"UNet2DConditionModel config: attention_head_dim={cfg['attention_head_dim']} gives "
                         "neither one head count nor one head width for all attention levels")

    cross = cfg["cross_attention_dim"]
    cross = _uniform("cross_attention_dim", cross, n)
    if cross is None:
        raise ValueError("UNet2DConditionModel config: cross_attention_dim=None (no cross-attention) is "
                         "not supported; the CompVis UNet always has a second attention")
    kw: dict[str, Any] = dict(
        in_channels=cfg["in_channels"], model_channels=model_channels, out_channels=cfg["out_channels"],
        num_res_blocks=_uniform("layers_per_block", cfg["layers_per_block"], n),
        attention_resolutions=attention_resolutions,
        channel_mult=tuple(c // model_channels for c in chans), dropout=float(cfg["dropout"]),
        use_scale_shift_norm=_shift(cfg["resnet_time_scale_shift"], "UNet2DConditionModel"),
        transformer_depth=_uniform("transformer_layers_per_block", cfg["transformer_layers_per_block"], n),
        context_dim=cross, use_linear_in_transformer=bool(cfg["use_linear_projection"]), **head_kw)
    kind = cfg["class_embed_type"]
    if kind is None and cfg["num_class_embeds"] is not None:
        # The last embedding row becomes our null label (index num_classes).
        kw["num_classes"] = int(cfg["num_class_embeds"]) - 1
    elif kind == "projection":
        kw["adm_in_channels"] = int(cfg["projection_class_embeddings_input_dim"])
    elif kind is not None:
        raise ValueError(f"UNet2DConditionModel config: class_embed_type={kind!r} is not supported "
                         "(None with num_class_embeds, or 'projection')")
    return kw


# diffusers UNet2DModel: options the CompVis UNet hard-wires, defaults, and its block types as
# (attends, resampling: 'conv' / 'resnet', or None for the model's downsample_type / upsample_type).
_FIXED_2D = {
    "center_input_sample": False, "time_embedding_type": "positional", "time_embedding_dim": None,
    "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_type": "UNetMidBlock2D", "mid_block_scale_factor": 1,
    "downsample_padding": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "add_attention": True,
    "class_embed_type": None,
}
_DEFAULTS_2D = {
    "in_channels": 3, "out_channels": 3, "block_out_channels": (224, 448, 672, 896), "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "attention_head_dim": 8,
    "attn_norm_num_groups": None, "resnet_time_scale_shift": "default", "num_class_embeds": None,
}
_DOWN_2D = {"DownBlock2D": (False, "conv"), "ResnetDownsampleBlock2D": (False, "resnet"),
            "AttnDownBlock2D": (True, None)}
_UP_2D = {"UpBlock2D": (False, "conv"), "ResnetUpsampleBlock2D": (False, "resnet"), "AttnUpBlock2D": (True, None)}


def unet2d_config_from_diffusers(config: Mapping[str, Any]) -> dict:
    """Our UNet fields (use_spatial_transformer=False) for a diffusers `UNet2DModel` config."""
    what = "UNet2DModel"
    cfg = {**_DEFAULTS_2D, **{k: v for k, v in config.items() if not k.startswith("_")}}
    _check_fixed(cfg, _FIXED_2D, what)
    chans = list(cfg["block_out_channels"])
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    n, model_channels = len(chans), chans[0]
    if len(down) != n or len(up) != n:
        raise ValueError(f"{what} config: {n} block_out_channels but {len(down)} down and {len(up)} up blocks")
    if any(c % model_channels for c in chans):
        raise ValueError(f"{what} config: block_out_channels {chans} are not multiples of the first "
                         f"({model_channels}); cannot express them as channel_mult")
    with_attn, resampling = [], set()
    for i in range(n):
        attends_both = []
        for name, table, option, resamples in ((down[i], _DOWN_2D, "downsample_type", i != n - 1),
                                               (up[n - 1 - i], _UP_2D, "upsample_type", i != 0)):
            if name not in table:
                raise ValueError(f"{what} config: block {name!r} is not supported (expected one of {sorted(table)})")
            attends, kind = table[name]
            attends_both.append(attends)
            if resamples:
                resampling.add((kind or cfg[option] or "conv", name))
        if attends_both[0] != attends_both[1]:
            raise ValueError(f"{what} config: level {i} has {down[i]} but its up block is {up[n - 1 - i]}; the "
                             "CompVis UNet attends at the same levels on both paths")
        with_attn.append(attends_both[0])
    kinds = {k for k, _ in resampling}
    if not kinds <= {"conv", "resnet"} or len(kinds) > 1:
        raise ValueError(f"{what} config: the blocks resample with {sorted(resampling)}; the CompVis UNet uses "
                         "convs ('conv', DownBlock2D/UpBlock2D) or ResBlocks ('resnet', ResnetDownsampleBlock2D/"
                         "ResnetUpsampleBlock2D) at every level")
    head = cfg["attention_head_dim"]  # in UNet2DModel this is the width of a head
    levels = [i for i in range(n) if with_attn[i]] + [n - 1]
    if head is not None and (not isinstance(head, int) or any(chans[i] % head for i in levels)):
        raise ValueError(f"{what} config: attention_head_dim={head!r} must be one int dividing the channels "
                         f"{[chans[i] for i in levels]} of the attention levels")
    scale_shift = _shift(cfg["resnet_time_scale_shift"], what)
    mid_groups = cfg["attn_norm_num_groups"]
    if mid_groups is None:  # diffusers then gives the middle attention no GroupNorm under scale_shift
        mid_groups = None if scale_shift else 32
    if mid_groups != 32:
        raise ValueError(f"{what} config: the middle attention's GroupNorm has {mid_groups} groups "
                         f"(attn_norm_num_groups={cfg['attn_norm_num_groups']!r}); the CompVis AttentionBlock "
                         "normalises with 32: set attn_norm_num_groups=32")
    kw: dict[str, Any] = dict(
        in_channels=cfg["in_channels"], model_channels=model_channels, out_channels=cfg["out_channels"],
        num_res_blocks=int(cfg["layers_per_block"]),
        attention_resolutions=tuple(2 ** i for i in range(n) if with_attn[i]),
        channel_mult=tuple(c // model_channels for c in chans), dropout=float(cfg["dropout"]),
        use_scale_shift_norm=scale_shift, resblock_updown=kinds == {"resnet"}, use_spatial_transformer=False,
        num_heads=1 if head is None else -1, num_head_channels=-1 if head is None else head)
    if cfg["num_class_embeds"] is not None:
        kw["num_classes"] = int(cfg["num_class_embeds"]) - 1  # the last row becomes our null label
    return kw


# ---- weight mapping -----------------------------------------------------------------------------

def _res(sd: StateDict, names: dict) -> dict:
    p = {"in_norm": sd.norm(names["in_norm"]), "in_conv": sd.conv(names["in_conv"]),
         "emb_proj": sd.linear(names["emb_proj"]), "out_norm": sd.norm(names["out_norm"]),
         "out_conv": sd.conv(names["out_conv"])}
    if sd.has(names["skip"] + ".weight"):
        p["skip"] = sd.conv(names["skip"])
    return p


_DIFFUSERS_RES = dict(in_norm="norm1", in_conv="conv1", emb_proj="time_emb_proj", out_norm="norm2",
                      out_conv="conv2", skip="conv_shortcut")
_COMPVIS_RES = dict(in_norm="in_layers.0", in_conv="in_layers.2", emb_proj="emb_layers.1",
                    out_norm="out_layers.0", out_conv="out_layers.3", skip="skip_connection")


def _transformer(sd: StateDict, depth: int) -> dict:
    """SpatialTransformer params; diffusers and CompVis share these names."""
    p = {"norm": sd.norm("norm"), "proj_in": sd.linear("proj_in"), "proj_out": sd.linear("proj_out")}
    for k in range(depth):
        b = sd.sub(f"transformer_blocks.{k}.")
        blk = {f"norm{j}": b.norm(f"norm{j}") for j in (1, 2, 3)}
        for a in ("attn1", "attn2"):
            blk[a] = {q: b.linear(f"{a}.{q}") for q in ("to_q", "to_k", "to_v")}
            blk[a]["to_out"] = b.linear(f"{a}.to_out.0")
        blk["ff"] = {"geglu": b.linear("ff.net.0.proj"), "out": b.linear("ff.net.2")}
        p[f"blocks_{k}"] = blk
    return p


def _attention_block_diffusers(sd: StateDict) -> dict:
    """AttentionBlock params from diffusers' Attention (or its pre-0.14 query/key/value/proj_attn names)."""
    old = sd.has("query.weight")
    names = ("query", "key", "value", "proj_attn") if old else ("to_q", "to_k", "to_v", "to_out.0")
    p = {"norm": sd.norm("group_norm")}
    p.update({ours: sd.linear(theirs) for ours, theirs in zip(("to_q", "to_k", "to_v", "to_out"), names)})
    return p


def _attention_block_compvis(sd: StateDict, heads: int, new_order: bool) -> dict:
    """AttentionBlock params from the reference's fused 1x1 conv1d `qkv` and `proj_out`.

    The fused output channels are ordered (head, q/k/v, width) by the legacy attention and
    (q/k/v, head, width) with use_new_attention_order.
    """
    w, b, proj = sd.take("qkv.weight"), sd.take("qkv.bias"), sd.take("proj_out.weight")
    ch = w.shape[1]
    if w.shape[0] != 3 * ch or w.size != 3 * ch * ch or proj.size != ch * ch or ch % heads:
        raise ValueError(f"{sd.what}: {sd._prefix}qkv.weight has shape {w.shape}; expected ({3 * ch}, {ch}, 1) "
                         f"for {heads} heads. Does the config's num_heads / num_head_channels match?")
    order = (3, heads, ch // heads) if new_order else (heads, 3, ch // heads)
    w, b = w.reshape(order + (ch,)), b.reshape(order)
    if not new_order:
        w, b = np.swapaxes(w, 0, 1), np.swapaxes(b, 0, 1)
    p = {"norm": sd.norm("norm")}
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        p[name] = {"kernel": w[i].reshape(ch, ch).T, "bias": b[i].reshape(ch)}
    p["to_out"] = {"kernel": proj.reshape(ch, ch).T, "bias": sd.take("proj_out.bias")}
    return p


def _embeddings(sd: StateDict, kw: dict, time: tuple, label: str, adm: tuple) -> dict:
    p = {"time_embed_0": sd.linear(time[0]), "time_embed_1": sd.linear(time[1])}
    if kw.get("num_classes") is not None:
        p["label_emb"] = {"embedding": sd.take(label)}
    if kw.get("adm_in_channels") is not None:
        p["adm_0"], p["adm_1"] = sd.linear(adm[0]), sd.linear(adm[1])
    return p


def _finish(module: UNet, params: dict, sd: StateDict) -> dict:
    sd.finish()
    check_tree_shapes(abstract_params(module), params, what="converted UNet params")
    return jax.tree_util.tree_map(jnp.asarray, params)


def abstract_params(module: UNet):
    """The module's param shapes via jax.eval_shape (nothing is allocated)."""
    size = 2 ** (len(module.channel_mult) - 1)
    x = jnp.zeros((1, size, size, module.in_channels))
    ctx = None if module.context_dim is None else jnp.zeros((1, 1, module.context_dim))
    y = None
    if module.num_classes is not None:
        y = jnp.zeros((1,), jnp.int32)
    elif module.adm_in_channels is not None:
        y = jnp.zeros((1, module.adm_in_channels))
    init = lambda: module.init(jax.random.PRNGKey(0), x, jnp.zeros((1,)), ctx, y)
    return jax.eval_shape(init)["params"]


def _diffusers_params(module: UNet, kw: dict, sd: StateDict, attention: Callable[[StateDict], dict]) -> dict:
    """Params from the diffusers block layout, shared by UNet2DConditionModel and UNet2DModel."""
    params = _embeddings(sd, kw, ("time_embedding.linear_1", "time_embedding.linear_2"),
                         "class_embedding.weight", ("class_embedding.linear_1", "class_embedding.linear_2"))
    params["conv_in"] = sd.conv("conv_in")
    n, nrb = len(module.channel_mult), module.num_res_blocks
    attn_at = lambda level: 2 ** level in module.attention_resolutions

    def resampler(blk):
        return _res(blk, _DIFFUSERS_RES) if module.resblock_updown else blk.conv("conv")

    for level in range(n):
        blk = sd.sub(f"down_blocks.{level}.")
        for i in range(nrb):
            params[f"down_{level}_res_{i}"] = _res(blk.sub(f"resnets.{i}."), _DIFFUSERS_RES)
            if attn_at(level):
                params[f"down_{level}_attn_{i}"] = attention(blk.sub(f"attentions.{i}."))
        if level != n - 1:
            params[f"down_{level}_downsample"] = resampler(blk.sub("downsamplers.0."))
    params["mid_res_0"] = _res(sd.sub("mid_block.resnets.0."), _DIFFUSERS_RES)
    params["mid_attn"] = attention(sd.sub("mid_block.attentions.0."))
    params["mid_res_1"] = _res(sd.sub("mid_block.resnets.1."), _DIFFUSERS_RES)
    for j in range(n):
        level, blk = n - 1 - j, sd.sub(f"up_blocks.{j}.")
        for i in range(nrb + 1):
            params[f"up_{level}_res_{i}"] = _res(blk.sub(f"resnets.{i}."), _DIFFUSERS_RES)
            if attn_at(level):
                params[f"up_{level}_attn_{i}"] = attention(blk.sub(f"attentions.{i}."))
        if level:
            params[f"up_{level}_upsample"] = resampler(blk.sub("upsamplers.0."))
    params["out_norm"] = sd.norm("conv_norm_out")
    params["conv_out"] = sd.conv("conv_out")
    return params


def from_diffusers(model_config: dict, state_dict: Any):
    """(UNet, params) from a diffusers `UNet2DConditionModel` or `UNet2DModel` config.json and state dict."""
    name = model_config.get("_class_name") or "UNet2DConditionModel"
    if name not in ("UNet2DConditionModel", "UNet2DModel"):
        raise ValueError(f"UNet from_diffusers: _class_name {name!r} is not UNet2DConditionModel or UNet2DModel")
    kw = unet_config_from_diffusers({**model_config, "_class_name": name})
    module = UNet(**kw)
    sd = StateDict(state_dict_of(state_dict), what=f"{name} checkpoint")
    if module.use_spatial_transformer:
        attention = lambda blk: _transformer(blk, module.transformer_depth)
    else:
        attention = _attention_block_diffusers
    return module, _finish(module, _diffusers_params(module, kw, sd, attention), sd)


def unet_from_compvis_state_dict(state_dict: Any, unet_kwargs: Mapping[str, Any], *,
                                 new_attention_order: bool = False):
    """(UNet, params) from CompVis `model.diffusion_model.*` keys (the prefix may be absent).

    `unet_kwargs` are our UNet fields (the checkpoint's `unet_config.params`, with
    num_classes = label rows - 1: see UNet's docstring). `new_attention_order` is the
    reference's use_new_attention_order (the AttentionBlocks' q/k/v channel order). Other keys
    of a full LDM checkpoint (first stage, conditioner, EMA copies) are left alone.
    """
    module = UNet(**dict(unet_kwargs))
    raw = state_dict_of(state_dict)
    prefix = "model.diffusion_model." if any(k.startswith("model.diffusion_model.") for k in raw) else ""
    sd = StateDict(raw, prefix=prefix, what="CompVis UNet checkpoint")
    kw = dict(unet_kwargs)
    label = "label_emb.weight"
    params = _embeddings(sd, kw, ("time_embed.0", "time_embed.2"), label, ("label_emb.0.0", "label_emb.0.2"))
    params["conv_in"] = sd.conv("input_blocks.0.0")
    mults, nrb = list(module.channel_mult), module.num_res_blocks

    def attention(blk, mult):
        if module.use_spatial_transformer:
            return _transformer(blk, module.transformer_depth)
        heads = module.heads_for(module.model_channels * mult)[0]
        return _attention_block_compvis(blk, heads, new_attention_order)

    n, idx, ds = len(mults), 1, 1
    for level in range(n):
        for i in range(nrb):
            blk = sd.sub(f"input_blocks.{idx}.")
            params[f"down_{level}_res_{i}"] = _res(blk.sub("0."), _COMPVIS_RES)
            if ds in module.attention_resolutions:
                params[f"down_{level}_attn_{i}"] = attention(blk.sub("1."), mults[level])
            idx += 1
        if level != n - 1:
            blk = sd.sub(f"input_blocks.{idx}.0.")
            params[f"down_{level}_downsample"] = (_res(blk, _COMPVIS_RES) if module.resblock_updown
                                                  else blk.conv("op"))
            idx, ds = idx + 1, ds * 2
    params["mid_res_0"] = _res(sd.sub("middle_block.0."), _COMPVIS_RES)
    params["mid_attn"] = attention(sd.sub("middle_block.1."), mults[-1])
    params["mid_res_1"] = _res(sd.sub("middle_block.2."), _COMPVIS_RES)
    idx = 0
    for level in reversed(range(n)):
        for i in range(nrb + 1):
            blk, sub = sd.sub(f"output_blocks.{idx}."), 1
            params[f"up_{level}_res_{i}"] = _res(blk.sub("0."), _COMPVIS_RES)
            if ds in module.attention_resolutions:
                params[f"up_{level}_attn_{i}"] = attention(blk.sub("1."), mults[level])
                sub = 2
            if level and i == nrb:
                params[f"up_{level}_upsample"] = (_res(blk.sub(f"{sub}."), _COMPVIS_RES) if module.resblock_updown
                                                  else blk.conv(f"{sub}.conv"))
            idx += 1
        ds //= 2 if level else 1
    params["out_norm"] = sd.norm("out.0")
    params["conv_out"] = sd.conv("out.2")
    return module, _finish(module, params, sd)

