"""Fine-tuning: a fresh LDM run's model params taken from imported weights (`config.init`).

Exactly one source: another of our LDM workdirs (`init.workdir`, its EMA params by default), an
original CompVis / Stable Diffusion checkpoint (`init.checkpoint`, with its yaml in
`init.compvis_config` for the UNet's architecture) or a diffusers UNet folder (`init.diffusers_unet`).
The loop calls `apply` only when it starts fresh: a resumed run reads its own checkpoint instead.
The loaded values replace the model params and the EMA; the optimizer state and step stay fresh.
A frozen CLIP text encoder is loaded by the task itself (conditioning.text.checkpoint), not here.
"""
from __future__ import annotations

import logging
import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from latent_diffusion import config_fields

log = logging.getLogger(__name__)

SOURCES = ("checkpoint", "diffusers_unet", "workdir")
INPUT_CONV = "unet/conv_in/kernel"
_MAX_LISTED = 20


def init_config(config) -> tuple[dict, str | None]:
    """(the init fields with defaults, the chosen source key or None); a config without `init` is empty."""
    cfg = config_fields.section(config.get("init", None) if hasattr(config, "get") else None, config_fields.INIT,
                                "init")
    chosen = [k for k in SOURCES if cfg[k]]
    if len(chosen) > 1:
        raise ValueError(f"set exactly one init source, got {', '.join(f'init.{k}={cfg[k]!r}' for k in chosen)}; "
                         "clear the others (--config.init.<key>='')")
    if cfg["compvis_config"] and cfg["checkpoint"] == "":
        raise ValueError("init.compvis_config is only used with init.checkpoint (a CompVis .ckpt/.safetensors); "
                         "set init.checkpoint or clear init.compvis_config")
    return cfg, (chosen[0] if chosen else None)


def apply(config, task, state):
    """`state` with its model params (and EMA) replaced by the weights `config.init` names; unchanged if none."""
    cfg, source = init_config(config)
    if source is None:
        return state
    if config.get("task", None) != "ldm":
        raise NotImplementedError(f"init.{source} (starting from imported weights) is supported for LDM runs "
                                  f"(task='ldm') only, not task={config.get('task', None)!r}; clear init.{source}")
    target = state.params["model"]
    if source == "workdir":
        loaded, what = _from_workdir(cfg, state)
    elif source == "checkpoint":
        loaded, what = _from_compvis(cfg, task, target)
    else:
        loaded, what = _from_diffusers(cfg, task)
    placed = place(loaded, target, allow_new_input_channels=bool(cfg["allow_new_input_channels"]), what=what,
                   complete=source == "workdir")
    shardings = jax.tree.map(lambda x: x.sharding, target)
    # Separate buffers for params and EMA: the train step donates the whole state.
    copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings)
    ema = copy(placed) if state.ema_params is not None else None
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(loaded))
    log.info("initialised %s model parameters from %s (roles: %s); EMA = these params, optimizer state fresh",
             f"{n:,}", what, ", ".join(sorted(loaded_roles(loaded))))
    return state.replace(params={**state.params, "model": placed}, ema_params=ema)


def loaded_roles(loaded: Mapping) -> dict:
    """{'unet': 1, 'cond/class_embedder': 1, ...}: the subtrees a source provides, for the log line."""
    out = {"unet": 1} if "unet" in loaded else {}
    for k in (loaded.get("cond") or {}):
        out[f"cond/{k}"] = 1
    return out


# --- placing ------------------------------------------------------------------------------------

def _flat(tree: Mapping, prefix: str = "") -> dict:
    """{'a/b/c': leaf} for a nested dict of params."""
    return {prefix + k: v for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def _shape(x) -> tuple:
    return tuple(int(d) for d in x.shape)


def place(loaded: Mapping, target: Mapping, *, allow_new_input_channels: bool = False, what: str = "",
          complete: bool = False) -> dict:
    """`target` (the fresh model params) with every subtree `loaded` has replaced, laid out as target's leaves.

    Each top-level entry of `loaded` ('unet', or 'cond' with some of its sub-modules) must match the
    same subtree of `target` leaf for leaf in shape; otherwise one error lists every difference.
    `complete`: the source is a whole model (another of our runs), so none of target may be left out.
    """
    tflat = _flat(target)
    problems, new, padded, roots = [], {}, None, []
    for role, sub in loaded.items():
        if role == "cond":
            subtrees = {f"cond/{k}": v for k, v in sub.items()}
        else:
            subtrees = {role: sub}
        for root, tree in subtrees.items():
            roots.append(root)
            src = _flat(tree, root + "/") if isinstance(tree, Mapping) else {root: tree}
            mine = {p: v for p, v in tflat.items() if p == root or p.startswith(root + "/")}
            if not mine:
                problems.append(f"{root}: in the source but not in this config's model")
                continue
            for p in sorted(set(mine) - set(src)):
                problems.append(f"{p}: missing from the source (model needs {_shape(mine[p])})")
            for p in sorted(set(src) - set(mine)):
                problems.append(f"{p}: in the source {_shape(src[p])} but not in this config's model")
            for p in sorted(set(src) & set(mine)):
                s, t = _shape(src[p]), _shape(mine[p])
                if s == t:
                    new[p] = _put(src[p], mine[p])
                elif p == INPUT_CONV and _more_input_channels(s, t):
                    if allow_new_input_channels:
                        new[p] = _put(src[p], mine[p], pad_in=t[2] - s[2])
                        padded = (s[2], t[2])
                    else:
                        problems.append(f"{p}: source {s}, model {t}: the model takes {t[2] - s[2]} more input "
                                        "channels (a concatenated condition); set "
                                        "--config.init.allow_new_input_channels=True to copy the source's "
                                        "channels and start the new ones at zero")
                else:
                    problems.append(f"{p}: source {s}, model {t}")
    if complete:
        def covered(p):
            return any(p == r or p.startswith(r + "/") for r in roots)
        problems += [f"{p}: missing from the source (model needs {_shape(v)})" for p, v in sorted(tflat.items())
                     if not covered(p)]
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise ValueError(f"init: {len(problems)} parameter(s) of {what or 'the source'} do not fit the model built "
                         f"from this config:\n  {listed}{more}\nMake the config's unet / conditioning fields match "
                         "the source model's architecture (or pick a source of this architecture).")
    if padded:
        log.info("init: %s has %d input channels, the model %d: copied them into the first %d channels of %s "
                 "and set the other %d to zero", what, padded[0], padded[1], padded[0], INPUT_CONV,
                 padded[1] - padded[0])
    # Empty subtrees (a conditioner without params) stay in the tree.
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(target, sep="/", keep_empty_nodes=True),
                                         **new}, sep="/")


def _more_input_channels(s: tuple, t: tuple) -> bool:
    return len(s) == len(t) == 4 and s[:2] == t[:2] and s[3] == t[3] and s[2] < t[2]


def _put(value, like, pad_in: int = 0):
    """`value` cast to `like`'s dtype, zero-padded on the input-channel axis, on `like`'s sharding."""
    sharding, dtype = like.sharding, like.dtype
    pads = [(0, 0), (0, 0), (0, pad_in), (0, 0)] if pad_in else None
    if isinstance(value, jax.Array) and len(value.sharding.device_set) > 1:
        # From a restored run: already laid out over the mesh (maybe over several hosts).
        fn = (lambda a: jnp.pad(a.astype(dtype), pads)) if pads else (lambda a: a.astype(dtype))
        return jax.jit(fn, out_shardings=sharding)(value)
    host = np.asarray(value).astype(dtype)
    if pads:
        host = np.pad(host, pads)
    # Every host holds the whole converted array; each device takes its own slice.
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


# --- sources ------------------------------------------------------------------------------------

def _from_workdir(cfg: dict, state) -> tuple[dict, str]:
    from latent_diffusion.training import checkpointing, partitioning
    workdir = cfg["workdir"]
    meta = checkpointing.read_meta(workdir)
    if meta.get("stage") != "ldm":
        raise ValueError(f"init.workdir={workdir!r} holds a {meta.get('stage', 'non-LDM')!r} run, not an LDM; "
                         "point it at an LDM run (a first stage goes in first_stage.workdir)")
    mesh = jax.tree.leaves(state.params)[0].sharding.mesh
    # Default (FSDP) layout for the whole restored tree: memory as for our own state, not replicated.
    tree, meta = checkpointing.restore_state_tree(workdir, lambda a: partitioning.tree_shardings(a, mesh))
    step = meta.get("step", "?")
    ema = tree.get("ema_params")
    if cfg["use_ema"] and ema:
        return {k: v for k, v in ema.items()}, f"the EMA params of {workdir} (step {step})"
    if cfg["use_ema"]:
        log.warning("init.workdir=%s has no EMA params (ema.enabled was off); using its params", workdir)
    return dict(tree["params"]["model"]), f"the params of {workdir} (step {step})"


def _ema_unet(sd: dict, prefix: str) -> tuple[dict, bool]:
    """The state dict with the UNet's CompVis LitEma copy (`model_ema.*`, dots removed) in place of its weights."""
    unet_keys = [k for k in sd if k.startswith(prefix)]
    ema_key = {k: "model_ema." + k[len("model."):].replace(".", "") for k in unet_keys}
    present = [k for k in unet_keys if ema_key[k] in sd]
    if not present:
        return sd, False
    if len(present) != len(unet_keys):
        missing = [k for k in unet_keys if ema_key[k] not in sd][:5]
        raise ValueError(f"init.checkpoint has an EMA copy (model_ema.*) for only {len(present)} of "
                         f"{len(unet_keys)} UNet weights (e.g. none for {missing}); set "
                         "--config.init.use_ema=False to load the non-EMA weights")
    out = dict(sd)
    for k in unet_keys:
        out[k] = sd[ema_key[k]]
    return out, True


def _from_compvis(cfg: dict, task, target: Mapping) -> tuple[dict, str]:
    from latent_diffusion.convert import compvis
    from latent_diffusion.convert.common import state_dict_of
    path = cfg["checkpoint"]
    if not cfg["compvis_config"]:
        raise ValueError(f"init.checkpoint={path!r} needs init.compvis_config: the path of the checkpoint's "
                         "CompVis yaml (e.g. v1-inference.yaml), which gives the UNet's architecture")
    if not os.path.exists(path):
        raise FileNotFoundError(f"init.checkpoint: no file {path!r}")
    import yaml
    with open(cfg["compvis_config"]) as f:
        yaml_cfg = yaml.safe_load(f)
    sd = state_dict_of(path)
    if not any(k.startswith(compvis.UNET_PREFIX) for k in sd):
        raise ValueError(f"init.checkpoint={path!r} holds no UNet ('{compvis.UNET_PREFIX}*' keys); "
                         "a first-stage checkpoint goes in first_stage.checkpoint")
    what = f"the CompVis checkpoint {path}"
    if cfg["use_ema"]:
        sd, used = _ema_unet(sd, compvis.UNET_PREFIX)
        if used:
            what += " (its EMA weights)"
        else:
            log.info("init: %s has no model_ema.* copy; loading model.diffusion_model.* (an '-emaonly' "
                     "checkpoint holds the EMA weights there)", path)
    module, unet = compvis.unet_from_compvis(sd, yaml_cfg)
    check_heads(module, task.unet, what)
    loaded = {"unet": unet}
    if compvis.CLASS_EMBED_KEY in sd:
        if "class_embedder" in (target.get("cond") or {}):
            loaded["cond"] = {"class_embedder": compvis.class_embedder_from_compvis(sd)[1]}
        else:
            log.info("init: %s has a class embedder, but this config trains none; it is not loaded", path)
    return loaded, what


def _from_diffusers(cfg: dict, task) -> tuple[dict, str]:
    from latent_diffusion import convert
    from latent_diffusion.convert.common import DIFFUSERS_WEIGHTS, read_pretrained_folder
    folder = cfg["diffusers_unet"]
    if not os.path.isfile(os.path.join(folder, "config.json")) and os.path.isfile(
            os.path.join(folder, "unet", "config.json")):
        folder = os.path.join(folder, "unet")  # a whole pipeline folder
    hf_config, weights = read_pretrained_folder(folder, DIFFUSERS_WEIGHTS, "init.diffusers_unet")
    name = hf_config.get("_class_name")
    if name not in ("UNet2DConditionModel", "UNet2DModel"):
        raise ValueError(f"init.diffusers_unet: {folder} holds a {name!r}, not a UNet2DConditionModel or "
                         "UNet2DModel")
    what = f"the diffusers {name} in {folder}"
    module, unet = convert.from_diffusers(hf_config, weights)
    check_heads(module, task.unet, what)
    return {"unet": unet}, what


def check_heads(source, ours, what: str) -> None:
    """Head counts do not show in param shapes: refuse a source that splits attention differently."""
    levels = [(f"level {i}", ours.model_channels * m) for i, m in enumerate(ours.channel_mult)
              if 2 ** i in tuple(ours.attention_resolutions)]
    levels.append(("middle block", ours.model_channels * ours.channel_mult[-1]))
    for where, ch in levels:
        theirs, mine = source.heads_for(ch), ours.heads_for(ch)
        if theirs != mine:
            raise ValueError(f"init: {what} splits the attention at the {where} ({ch} channels) into {theirs[0]} "
                             f"heads of {theirs[1]}, this config into {mine[0]} of {mine[1]}; set "
                             f"--config.unet.num_heads={source.num_heads} --config.unet.num_head_channels="
                             f"{source.num_head_channels} --config.unet.legacy={source.legacy}")
