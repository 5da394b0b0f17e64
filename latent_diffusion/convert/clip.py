"""Text encoders and the CLIP vision tower from PyTorch weights.

- transformers `CLIPTextModel`, `CLIPTextModelWithProjection`, `CLIPVisionModel`,
  `CLIPVisionModelWithProjection` (`from_transformers`), also out of a full `CLIPModel` checkpoint;
- CompVis checkpoints: SD v1's embedded transformers CLIP text model (`clip_text_from_compvis`),
  SD v2's OpenCLIP text tower (`openclip_text_from_compvis`), and the LDM paper's BERT-style
  encoder (`bert_embedder_from_compvis`).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion.convert.common import (StateDict, check_tree_shapes, conv_kernel, linear_kernel,
                                           state_dict_of)
from latent_diffusion.models.clip_vision import CLIPVisionTransformer
from latent_diffusion.models.text_encoders import BERTEmbedder, CLIPTextTransformer

# transformers' config defaults, for config.json files that leave a value out.
_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, projection_dim=512,
                      num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                      hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=49407)
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, projection_dim=512, num_hidden_layers=12,
                        num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                        hidden_act="quick_gelu", layer_norm_eps=1e-5)
_IGNORE = ("position_ids", "attn_mask")  # buffers, not weights


def _check_params(module, params, example, what):
    expected = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), example))["params"]
    check_tree_shapes(expected, params, what)


def _block(sd: StateDict) -> dict:
    """One transformers `CLIPEncoderLayer` (under `encoder.layers.{i}.`)."""
    return {
        "layer_norm1": sd.norm("layer_norm1"),
        "self_attn": {n: sd.linear(f"self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj", "out_proj")},
        "layer_norm2": sd.norm("layer_norm2"),
        "mlp": {"fc1": sd.linear("mlp.fc1"), "fc2": sd.linear("mlp.fc2")},
    }


def _sub_config(config: Mapping[str, Any], key: str, defaults: dict) -> dict:
    """The tower's config (a CLIPModel config nests it under text_config / vision_config), with defaults."""
    sub = dict(config.get(key) or config)
    out = {k: sub.get(k, v) for k, v in defaults.items()}
    if key in config and "projection_dim" in config:  # CLIPModel keeps the joint width at the top
        out["projection_dim"] = config["projection_dim"]
    return out


def _tower(sd: StateDict, tower: str, own: tuple[str, ...]) -> tuple[StateDict, tuple[str, ...]]:
    """View under `text_model.` / `vision_model.` when the checkpoint nests it (files, transformers < 5).

    A nested checkpoint may be a full CLIPModel's; the other tower's keys are then ignored.
    """
    keys = [k for k in sd._sd]  # noqa: SLF001 - a read-only look at the names
    if any(k.startswith(tower + ".") for k in keys):
        others = tuple(p for p in ("text_model.", "vision_model.", "text_projection.", "visual_projection.",
                                   "logit_scale") if not p.startswith(own))
        return sd.sub(tower + "."), others
    return sd, ()


def text_params(sd: StateDict, layers: int) -> dict:
    """Params of `CLIPTextTransformer` from a transformers CLIPTextModel view (no projection)."""
    params = {
        "token_embedding": {"embedding": sd.take("embeddings.token_embedding.weight")},
        "position_embedding": {"embedding": sd.take("embeddings.position_embedding.weight")},
        "final_layer_norm": sd.norm("final_layer_norm"),
    }
    for i in range(layers):
        params[f"layers_{i}"] = _block(sd.sub(f"encoder.layers.{i}."))
    return params


def vision_params(sd: StateDict, layers: int) -> dict:
    """Params of `CLIPVisionTransformer` from a transformers CLIPVisionModel view (no projection)."""
    params = {
        "patch_embedding": {"kernel": conv_kernel(sd.take("embeddings.patch_embedding.weight"))},
        "class_embedding": sd.take("embeddings.class_embedding"),
        "position_embedding": {"embedding": sd.take("embeddings.position_embedding.weight")},
        "pre_layrnorm": sd.norm("pre_layrnorm"),
        "post_layernorm": sd.norm("post_layernorm"),
    }
    for i in range(layers):
        params[f"layers_{i}"] = _block(sd.sub(f"encoder.layers.{i}."))
    return params


def from_transformers(name: str, config: Mapping[str, Any], state_dict: Any):
    """(module, params) for a transformers CLIP text or vision model.

    `config` is the model's config.json dict (a full CLIPModel config works too: the matching
    sub-config is used); `state_dict` is a mapping, a path or a torch module. The text module
    returns SD v1-style outputs; use `module.clone(output_layer=-2)` for SD v2 / SDXL-style ones.
    """
    if name not in ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPVisionModel",
                    "CLIPVisionModelWithProjection"):
        raise ValueError(f"convert.clip: unsupported model class {name!r}")
    root = StateDict(state_dict_of(state_dict), what=f"transformers {name} checkpoint")
    project = name.endswith("WithProjection")
    if name.startswith("CLIPText"):
        cfg = _sub_config(config, "text_config", _TEXT_DEFAULTS)
        sd, ignore = _tower(root, "text_model", ("text",))
        eos = cfg["eos_token_id"]
        module = CLIPTextTransformer(
            vocab_size=cfg["vocab_size"], max_length=cfg["max_position_embeddings"], width=cfg["hidden_size"],
            layers=cfg["num_hidden_layers"], heads=cfg["num_attention_heads"], mlp_dim=cfg["intermediate_size"],
            hidden_act=cfg["hidden_act"], layer_norm_eps=cfg["layer_norm_eps"],
            eos_token_id=int(eos[0] if isinstance(eos, (list, tuple)) else eos),
            projection_dim=cfg["projection_dim"] if project else None)
        params = text_params(sd, module.layers)
        if project:
            params["text_projection"] = {"kernel": linear_kernel(root.take("text_projection.weight"))}
        else:  # the bare tower out of a checkpoint that also has the projection
            ignore += ("text_projection.",)
        example = jnp.zeros((1, module.max_length), jnp.int32)
    else:
        cfg = _sub_config(config, "vision_config", _VISION_DEFAULTS)
        sd, ignore = _tower(root, "vision_model", ("vision", "visual"))
        for key in ("image_size", "patch_size"):
            if not isinstance(cfg[key], int):
                raise ValueError(f"convert.clip: only square images and patches are supported, got {key}={cfg[key]}")
        module = CLIPVisionTransformer(
            image_size=cfg["image_size"], patch_size=cfg["patch_size"], num_channels=cfg["num_channels"],
            width=cfg["hidden_size"], layers=cfg["num_hidden_layers"], heads=cfg["num_attention_heads"],
            mlp_dim=cfg["intermediate_size"], hidden_act=cfg["hidden_act"], layer_norm_eps=cfg["layer_norm_eps"],
            projection_dim=cfg["projection_dim"] if project else None)
        params = vision_params(sd, module.layers)
        if project:
            params["visual_projection"] = {"kernel": linear_kernel(root.take("visual_projection.weight"))}
        else:
            ignore += ("visual_projection.",)
        example = jnp.zeros((1, module.image_size, module.image_size, module.num_channels), jnp.float32)
    root.finish(ignore=_IGNORE + ignore)
    _check_params(module, params, example, f"converted {name} params")
    return module, params


def _count_layers(sd: StateDict, prefix: str, suffix: str) -> int:
    n = 0
    while sd.has(f"{prefix}{n}.{suffix}"):
        n += 1
    if n == 0:
        raise KeyError(f"{sd.what}: no transformer layers found under '{sd._prefix}{prefix}'")  # noqa: SLF001
    return n


def clip_text_from_compvis(state_dict: Any, prefix: str = "cond_stage_model.transformer.",
                           heads: Optional[int] = None, hidden_act: str = "quick_gelu", **module_kwargs):
    """(module, params) of SD v1's CLIP text encoder (transformers CLIPTextModel keys under `prefix`).

    Head count is not stored in weights: the default width // 64 holds for every OpenAI CLIP.
    """
    root = StateDict(state_dict_of(state_dict), prefix, what="CompVis CLIP text encoder")
    sd = root.sub("text_model.") if root.has("text_model.embeddings.token_embedding.weight") else root
    vocab, width = sd.take("embeddings.token_embedding.weight").shape
    layers = _count_layers(sd, "encoder.layers.", "mlp.fc1.weight")
    kwargs = dict(vocab_size=vocab, width=width, layers=layers, heads=heads or width // 64,
                  max_length=sd.take("embeddings.position_embedding.weight").shape[0],
                  mlp_dim=sd.take("encoder.layers.0.mlp.fc1.weight").shape[0], hidden_act=hidden_act,
                  eos_token_id=vocab - 1)  # CLIP's end-of-text is its last id
    kwargs.update(module_kwargs)
    module = CLIPTextTransformer(**kwargs)
    params = text_params(sd, layers)
    root.finish(ignore=_IGNORE)
    _check_params(module, params, jnp.zeros((1, module.max_length), jnp.int32), "converted CLIP text params")
    return module, params


def openclip_text_from_compvis(state_dict: Any, prefix: str = "cond_stage_model.model.",
                               heads: Optional[int] = None, output_layer: int = -2, **module_kwargs):
    """(module, params) of SD v2's OpenCLIP text tower (`FrozenOpenCLIPEmbedder`, penultimate layer).

    OpenCLIP fuses q/k/v into `in_proj_weight` and uses exact GELU; pooling at the first end-of-text
    id (the largest id) matches its argmax rule. `text_projection` (width, proj) is used as is.
    """
    root = StateDict(state_dict_of(state_dict), prefix, what="CompVis OpenCLIP text encoder")
    vocab, width = root.take("token_embedding.weight").shape
    layers = _count_layers(root, "transformer.resblocks.", "mlp.c_fc.weight")
    params = {
        "token_embedding": {"embedding": root.take("token_embedding.weight")},
        "position_embedding": {"embedding": root.take("positional_embedding")},
        "final_layer_norm": root.norm("ln_final"),
    }
    for i in range(layers):
        blk = root.sub(f"transformer.resblocks.{i}.")
        qkv_w, qkv_b = blk.take("attn.in_proj_weight"), blk.take("attn.in_proj_bias")
        attn = {n: {"kernel": linear_kernel(w), "bias": b}
                for n, w, b in zip(("q_proj", "k_proj", "v_proj"), np.split(qkv_w, 3), np.split(qkv_b, 3))}
        attn["out_proj"] = blk.linear("attn.out_proj")
        params[f"layers_{i}"] = {"layer_norm1": blk.norm("ln_1"), "self_attn": attn,
                                 "layer_norm2": blk.norm("ln_2"),
                                 "mlp": {"fc1": blk.linear("mlp.c_fc"), "fc2": blk.linear("mlp.c_proj")}}
    projection_dim = None
    if root.has("text_projection"):
        proj = root.take("text_projection")
        params["text_projection"] = {"kernel": proj}
        projection_dim = proj.shape[1]
    kwargs = dict(vocab_size=vocab, width=width, layers=layers, heads=heads or width // 64,
                  max_length=params["position_embedding"]["embedding"].shape[0],
                  mlp_dim=params["layers_0"]["mlp"]["fc1"]["kernel"].shape[1], hidden_act="gelu",
                  eos_token_id=vocab - 1, output_layer=output_layer, projection_dim=projection_dim)
    kwargs.update(module_kwargs)
    module = CLIPTextTransformer(**kwargs)
    root.finish(ignore=_IGNORE + ("logit_scale", "visual."))
    _check_params(module, params, jnp.zeros((1, module.max_length), jnp.int32), "converted OpenCLIP text params")
    return module, params


def bert_embedder_from_compvis(state_dict: Any, prefix: str = "cond_stage_model.transformer.",
                               head_dim: int = 64, **module_kwargs):
    """(module, params) of the LDM paper's `BERTEmbedder` (x-transformers keys under `prefix`).

    The wrapper's `to_logits` head is never used for conditioning and is dropped.
    """
    root = StateDict(state_dict_of(state_dict), prefix, what="CompVis BERTEmbedder")
    layers = root.sub("attn_layers.layers.")
    n = _count_layers(layers, "", "0.weight")
    if n % 2:
        raise ValueError(f"CompVis BERTEmbedder: expected alternating attention/feed-forward layers, found {n}")
    params = {
        "token_embedding": {"embedding": root.take("token_emb.weight")},
        "position_embedding": {"embedding": root.take("pos_emb.emb.weight")},
        "final_layer_norm": root.norm("norm"),
    }
    for i in range(n // 2):
        a, f = layers.sub(f"{2 * i}."), layers.sub(f"{2 * i + 1}.")
        params[f"layers_{i}"] = {
            "layer_norm1": a.norm("0"),
            "self_attn": {"q_proj": a.linear("1.to_q"), "k_proj": a.linear("1.to_k"),
                          "v_proj": a.linear("1.to_v"), "out_proj": a.linear("1.to_out")},
            "layer_norm2": f.norm("0"),
            "mlp": {"fc1": f.linear("1.net.0.0"), "fc2": f.linear("1.net.2")},
        }
    vocab, width = params["token_embedding"]["embedding"].shape
    inner = params["layers_0"]["self_attn"]["q_proj"]["kernel"].shape[1]
    ff = params["layers_0"]["mlp"]["fc1"]["kernel"].shape[1]
    if inner % head_dim or ff % width:
        raise ValueError(f"CompVis BERTEmbedder: attention width {inner} / feed-forward {ff} do not fit "
                         f"head_dim {head_dim} / width {width}")
    kwargs = dict(vocab_size=vocab, width=width, depth=n // 2, heads=inner // head_dim, head_dim=head_dim,
                  ff_mult=ff // width, max_length=params["position_embedding"]["embedding"].shape[0])
    kwargs.update(module_kwargs)
    module = BERTEmbedder(**kwargs)
    root.finish(ignore=("to_logits.",))
    _check_params(module, params, jnp.zeros((1, module.max_length), jnp.int32), "converted BERTEmbedder params")
    return module, params
