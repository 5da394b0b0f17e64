"""Fields every experiment shares: data, mesh, optimizer, EMA, checkpoints, logging."""
from __future__ import annotations

import ml_collections

from latent_diffusion import config_fields


def parse_arg(arg: str | None, known: dict) -> dict:
    """'tiny' or 'f=8' or 'f=8,tiny' -> {'tiny': True, 'f': 8}; unknown names fail at start."""
    out = dict(known)
    if not arg:
        return out
    for part in arg.split(","):
        part = part.strip()
        if not part:
            continue
        key, _, value = part.partition("=")
        if key not in known:
            raise ValueError(f"config argument {key!r} is not known; expected some of {sorted(known)}")
        default = known[key]
        if not value:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {key!r} needs a value ({key}=...); only booleans may stand alone")
            out[key] = True
        elif isinstance(default, bool):
            out[key] = _parse_bool(key, value)
        elif default is not None:
            try:
                out[key] = type(default)(value)
            except ValueError:
                raise ValueError(f"config argument {key}={value!r}: expected a value of type "
                                 f"{type(default).__name__}") from None
        else:
            out[key] = value
    return out


_BOOLS = {"true": True, "1": True, "false": False, "0": False}


def _parse_bool(key: str, value: str) -> bool:
    """'true'/'1' or 'false'/'0' (any case); anything else is an error naming the argument."""
    v = value.strip().lower()
    if v not in _BOOLS:
        raise ValueError(f"config argument {key}={value!r}: expected a boolean (true, false, 1 or 0)")
    return _BOOLS[v]


def optimizer(lr: float, **kw) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(dict(
        name="adamw", lr=lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, schedule="constant",
        warmup_steps=0, decay_steps=0, end_lr_factor=0.0, grad_clip_norm=0.0, grad_accum_steps=1))
    cfg.update(kw)
    return cfg


def data(**kw) -> ml_collections.ConfigDict:
    """The loader's fields with their defaults (latent_diffusion/config_fields.py: DATA); unknown keys fail."""
    return config_fields.config_dict(config_fields.DATA, "data", **kw)


def base(task: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = task
    c.seed = 0
    c.batch_size = 8                # global batch, split over all devices of all hosts
    c.eval_batch_size = 8
    c.num_train_steps = 1000
    c.num_eval_batches = 4          # 0 = the whole eval split
    c.log_every = 50
    c.eval_every = 500
    c.data = data()
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    c.partitioning = ml_collections.ConfigDict(dict(rules=(), min_shard_size=2 ** 14))
    c.checkpoint = ml_collections.ConfigDict(dict(every=500, max_to_keep=3, async_save=True))
    c.ema = ml_collections.ConfigDict(dict(enabled=False, decay=0.9999, warmup=True))
    return c
