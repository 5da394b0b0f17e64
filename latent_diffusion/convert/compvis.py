"""Original CompVis LDM / Stable Diffusion checkpoints -> our modules and params.

A full LDM checkpoint holds several components under their own prefixes; each has a loader in
`_COMPONENTS`: the first stage ('first_stage_model.'), the UNet ('model.diffusion_model.') and the
text encoder or class embedder ('cond_stage_model.'). A first-stage-only checkpoint (as trained by
`ldm/models/autoencoder.py`) has the autoencoder keys at the top level.
"""
from __future__ import annotations

from typing import Any, Mapping

from latent_diffusion.convert.autoencoder import params_from_state_dict, to_state_dict
from latent_diffusion.convert.common import StateDict, state_dict_of
from latent_diffusion.models.autoencoder import AutoencoderKL, VQModel

FIRST_STAGE_PREFIX = "first_stage_model."
# Autoencoder checkpoints carry the LPIPS + discriminator of the training loss, and the
# VQ trainer may keep an EMA copy; neither is part of the model.
_FIRST_STAGE_IGNORE = ("loss.", "model_ema.")

_DDCONFIG_KEYS = {"double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
                  "num_res_blocks", "attn_resolutions", "dropout", "attn_type", "tanh_out",
                  "give_pre_end", "use_linear_attn"}
# Arguments of CompVis' AutoencoderKL / VQModel; only kind, embed_dim, n_embed and remap matter here.
_MODEL_KEYS = {"kind", "target", "embed_dim", "n_embed", "remap", "sane_index_shape", "monitor",
               "ckpt_path", "ignore_keys", "image_key", "colorize_nlabels", "scheduler_config",
               "lr_g_factor", "batch_resize_range", "use_ema"}


def _plain(config: Any) -> dict:
    if config is None:
        return {}
    if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict (CompVis yaml as a dict), got {type(config).__name__}")
    return dict(config)


def first_stage_config(config: Any) -> dict:
    """The flat first-stage config ({'kind', 'embed_dim', ddconfig fields, ...}) from any of:
    a full LDM yaml dict, its `first_stage_config` ({'target', 'params'}), or a flat dict."""
    cfg = _plain(config)
    if "model" in cfg:
        cfg = _plain(cfg["model"])
    if "first_stage_config" in cfg.get("params", {}):
        cfg = _plain(cfg["params"]["first_stage_config"])
    target = cfg.get("target")
    if "params" in cfg:
        cfg = {**_plain(cfg["params"]), **({"target": target} if target else {})}
    flat = {k: v for k, v in cfg.items() if k not in ("ddconfig", "lossconfig")}
    flat.update(_plain(cfg.get("ddconfig")))
    if "kind" not in flat and target:
        name = str(target).rsplit(".", 1)[-1]
        if name == "AutoencoderKL":
            flat["kind"] = "kl"
        elif name.startswith("VQModel"):
            flat["kind"] = "vq"
        else:
            raise ValueError(f"first-stage target {target!r} is not supported; expected "
                             "ldm.models.autoencoder.AutoencoderKL or VQModel(Interface)")
    return flat


def infer_first_stage_config(state_dict: Mapping[str, Any], prefix: str = "") -> dict:
    """Architecture fields read off the weights (CompVis always uses 32 norm groups)."""
    def has(key):
        return prefix + key in state_dict

    def shape(key):
        return tuple(state_dict[prefix + key].shape)

    if not has("encoder.conv_in.weight"):
        raise ValueError(f"no '{prefix}encoder.conv_in.weight' in the checkpoint; "
                         "not a CompVis first stage")
    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = 0
    while has(f"encoder.down.{levels}.block.0.conv1.weight"):
        levels += 1
    blocks = 0
    while has(f"encoder.down.0.block.{blocks}.conv1.weight"):
        blocks += 1
    resolution = 256
    kind = "vq" if has("quantize.embedding.weight") else "kl"
    cfg = dict(kind=kind, ch=int(ch), in_channels=int(in_channels), num_res_blocks=blocks,
               resolution=resolution,
               ch_mult=[int(shape(f"encoder.down.{i}.block.0.conv1.weight")[0]) // ch for i in range(levels)],
               attn_resolutions=[resolution // 2 ** i for i in range(levels)
                                 if has(f"encoder.down.{i}.attn.0.q.weight")],
               z_channels=int(shape("decoder.conv_in.weight")[1]),
               out_ch=int(shape("decoder.conv_out.weight")[0]),
               embed_dim=int(shape("post_quant_conv.weight")[1]),
               attn_type="vanilla" if has("encoder.mid.attn_1.q.weight") else "none")
    if kind == "vq":
        cfg["n_embed"] = int(shape("quantize.embedding.weight")[0])
    return cfg


def first_stage_module(cfg: Mapping[str, Any]):
    """Our AutoencoderKL / VQModel for a flat CompVis first-stage config."""
    kind = cfg.get("kind")
    if kind not in ("kl", "vq"):
        raise ValueError(f"first-stage config needs 'kind' ('kl' or 'vq') or a 'target'; got {kind!r}")
    if cfg.get("remap"):
        raise ValueError("VQModel with a codebook 'remap' is not supported")
    for key in ("tanh_out", "give_pre_end", "use_linear_attn"):
        if cfg.get(key):
            raise ValueError(f"first-stage ddconfig {key}=True is not supported")
    unknown = sorted(set(cfg) - _DDCONFIG_KEYS - _MODEL_KEYS)
    if unknown:
        raise ValueError(f"unknown first-stage config key(s) {unknown}; expected ddconfig keys "
                         f"{sorted(_DDCONFIG_KEYS)} and model keys {sorted(_MODEL_KEYS)}")
    attn_type = cfg.get("attn_type", "vanilla")
    if attn_type not in ("vanilla", "vanilla-xformers", "none"):
        raise ValueError(f"attn_type {attn_type!r} is not supported (vanilla, vanilla-xformers, none)")
    missing = [k for k in ("ch", "ch_mult", "num_res_blocks", "z_channels", "embed_dim") if k not in cfg]
    if missing:
        raise ValueError(f"first-stage config lacks {missing}; pass the CompVis ddconfig and embed_dim, "
                         "or config=None to read the architecture off the checkpoint")
    common = dict(ch=int(cfg["ch"]), ch_mult=tuple(cfg["ch_mult"]),
                  num_res_blocks=int(cfg["num_res_blocks"]),
                  attn_resolutions=() if attn_type == "none" else tuple(cfg.get("attn_resolutions", ())),
                  mid_attention=attn_type != "none",
                  z_channels=int(cfg["z_channels"]), embed_dim=int(cfg["embed_dim"]),
                  resolution=int(cfg.get("resolution", 256)), in_channels=int(cfg.get("in_channels", 3)),
                  out_ch=int(cfg.get("out_ch", 3)), dropout=float(cfg.get("dropout", 0.0)))
    if kind == "vq":
        if "n_embed" not in cfg:
            raise ValueError("VQ first-stage config lacks n_embed")
        return VQModel(**common, n_embed=int(cfg["n_embed"]))
    return AutoencoderKL(**common, double_z=bool(cfg.get("double_z", True)))


def first_stage_from_compvis(state_dict: Any, config: Any = None, prefix: str | None = None):
    """(module, params) of a CompVis first stage; `prefix` defaults to what the checkpoint uses."""
    sd_all = state_dict_of(state_dict)
    if prefix is None:
        prefix = FIRST_STAGE_PREFIX if any(k.startswith(FIRST_STAGE_PREFIX) for k in sd_all) else ""
    sd = StateDict(sd_all, prefix=prefix, what="CompVis first-stage checkpoint")
    cfg = first_stage_config(config)
    has_arch = any(k in cfg for k in ("ch", "ch_mult", "z_channels"))
    if not has_arch:  # only kind/target (or nothing) given: read the architecture off the weights
        inferred = infer_first_stage_config(sd_all, prefix)
        if cfg.get("kind", inferred["kind"]) != inferred["kind"]:
            raise ValueError(f"config says kind={cfg['kind']!r} but the checkpoint holds a "
                             f"{inferred['kind']!r} first stage")
        cfg = {**inferred, **{k: v for k, v in cfg.items() if k != "kind"}}
    elif "kind" not in cfg:
        cfg["kind"] = "vq" if sd.has("quantize.embedding.weight") else "kl"
    module = first_stage_module(cfg)
    return module, params_from_state_dict(module, sd, "compvis", ignore=_FIRST_STAGE_IGNORE)


def first_stage_to_compvis(module, params, prefix: str = "") -> dict:
    """Our first-stage params as a CompVis state dict (numpy, torch layout)."""
    return to_state_dict(module, params, "compvis", prefix=prefix)


def _has_first_stage(sd: Mapping[str, Any]) -> bool:
    return "encoder.conv_in.weight" in sd or FIRST_STAGE_PREFIX + "encoder.conv_in.weight" in sd


UNET_PREFIX = "model.diffusion_model."
COND_PREFIX = "cond_stage_model."
# Buffers of CompVis' DDPM (the schedule is rebuilt from the config) and EMA bookkeeping.
_LDM_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "scale_factor", "lvlb_weights")
# CompVis UNetModel arguments that are not fields of ours (they change nothing we compute, or are checked).
_UNET_DROP = ("image_size", "use_checkpoint", "use_fp16", "num_heads_upsample", "use_new_attention_order",
              "n_embed", "disable_self_attentions", "num_attention_blocks", "disable_middle_self_attn",
              "spatial_transformer_attn_type", "adm_in_channels")


def _unet_yaml(config: Any) -> dict:
    cfg = _plain(config)
    if "model" in cfg:
        cfg = _plain(cfg["model"])
    unet_cfg = _plain(_plain(cfg.get("params", {})).get("unet_config", {})).get("params")
    if unet_cfg is None:
        raise ValueError("from_compvis: a checkpoint with a UNet needs its yaml config (as a dict) with "
                         "model.params.unet_config.params; pass config=yaml.safe_load(open('v1-inference.yaml'))")
    return _plain(unet_cfg)


def _unet_kwargs(config: Any, sd: Mapping[str, Any]) -> dict:
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in _unet_yaml(config).items()}
    # The reference's default is the AttentionBlock; the yaml names the transformer where it is used.
    kw["use_spatial_transformer"] = bool(kw.get("use_spatial_transformer", False))
    if (not kw["use_spatial_transformer"] and kw.get("num_head_channels", -1) == -1
            and kw.get("num_heads_upsample", -1) not in (-1, kw.get("num_heads", -1))):
        raise ValueError(f"from_compvis: num_heads_upsample={kw['num_heads_upsample']} differs from num_heads="
                         f"{kw.get('num_heads')}; decoder AttentionBlocks with their own head count are not supported")
    if kw.get("use_checkpoint"):
        kw["remat"] = True
    for key in _UNET_DROP:
        kw.pop(key, None)
    rows = sd.get(UNET_PREFIX + "label_emb.weight")
    if kw.get("num_classes") is not None and rows is not None:
        kw["num_classes"] = int(rows.shape[0]) - 1  # our table has a null row at index num_classes
    return kw


def unet_from_compvis(state_dict: Mapping[str, Any], config: Any = None):
    from latent_diffusion.convert.unet import unet_from_compvis_state_dict
    return unet_from_compvis_state_dict(state_dict, _unet_kwargs(config, state_dict),
                                        new_attention_order=bool(_unet_yaml(config).get("use_new_attention_order")))


def text_encoder_from_compvis(state_dict: Mapping[str, Any], config: Any = None):
    """SD v1 CLIP (transformers keys), SD v2 OpenCLIP, or the LDM paper's BERTEmbedder, by key layout."""
    from latent_diffusion.convert import clip
    if any(k.startswith(COND_PREFIX + "model.") for k in state_dict):
        return clip.openclip_text_from_compvis(state_dict)
    if any(k.startswith(COND_PREFIX + "transformer.attn_layers.") for k in state_dict):
        return clip.bert_embedder_from_compvis(state_dict)
    return clip.clip_text_from_compvis(state_dict)


CLASS_EMBED_KEY = COND_PREFIX + "embedding.weight"


def class_embedder_from_compvis(state_dict: Mapping[str, Any], config: Any = None):
    """CompVis `ClassEmbedder` (cin256-v2: a (1001, 512) table whose last row is the null class).

    Its params go to `params['model']['cond']['class_embedder']` of a crossattn='class' LDM.
    """
    from latent_diffusion.models.conditioning import ClassEmbedder
    table = StateDict(state_dict, COND_PREFIX, what="CompVis ClassEmbedder").take("embedding.weight")
    return ClassEmbedder(num_classes=table.shape[0] - 1, features=table.shape[1]), {"embedding": table}


def _has_class_embedder(sd: Mapping[str, Any]) -> bool:
    return CLASS_EMBED_KEY in sd


def _has_unet(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith(UNET_PREFIX) for k in sd)


def _has_text_encoder(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith(COND_PREFIX + p) for k in sd for p in ("transformer.", "model."))


_COMPONENTS = (
    ("first_stage", _has_first_stage, first_stage_from_compvis),
    ("unet", _has_unet, unet_from_compvis),
    ("text_encoder", _has_text_encoder, text_encoder_from_compvis),
    ("class_embedder", _has_class_embedder, class_embedder_from_compvis),
)


def _unknown_keys(sd: Mapping[str, Any]) -> list[str]:
    known = (FIRST_STAGE_PREFIX, UNET_PREFIX, COND_PREFIX, "model_ema.") + _FIRST_STAGE_IGNORE
    top_level_ae = _has_first_stage(sd) and not any(k.startswith(FIRST_STAGE_PREFIX) for k in sd)
    return sorted(k for k in sd if not k.startswith(known) and k not in _LDM_BUFFERS
                  and not (top_level_ae and k.split(".", 1)[0] in ("encoder", "decoder", "quant_conv",
                                                                    "post_quant_conv", "quantize")))


def from_compvis(path_or_state_dict: Any, config: Any = None) -> dict[str, tuple[Any, dict]]:
    """{component: (module, params)} for every component of a CompVis checkpoint.

    Components: 'first_stage' (autoencoder), 'unet' (needs the yaml config as a dict),
    'text_encoder' (SD v1 CLIP, SD v2 OpenCLIP or the LDM BERTEmbedder) and 'class_embedder'
    (the ImageNet model's class table). `config` is the CompVis
    yaml as a dict (full LDM or first-stage), a flat first-stage dict with 'kind' ('kl'/'vq') plus
    ddconfig fields and embed_dim (n_embed for VQ), or None for a first-stage-only checkpoint
    (its architecture is read off the weights). Keys that belong to no component raise, by name;
    each component's loader raises on its own missing or unexpected keys.
    """
    sd = state_dict_of(path_or_state_dict)
    unknown = _unknown_keys(sd)
    if unknown:
        raise ValueError(f"from_compvis: {len(unknown)} key(s) belong to no known component: {unknown[:20]}"
                         f"{' ...' if len(unknown) > 20 else ''}")
    found = {name: load(sd, config) for name, present, load in _COMPONENTS if present(sd)}
    if not found:
        heads = sorted({k.split(".", 1)[0] for k in sd})[:20]
        raise ValueError("from_compvis: no known component in the checkpoint; expected "
                         f"'encoder.*'/'decoder.*', '{FIRST_STAGE_PREFIX}*', '{UNET_PREFIX}*' or "
                         f"'{COND_PREFIX}*' keys, found top-level names {heads}")
    return found
