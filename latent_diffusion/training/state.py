"""The train state shared by both stages, and EMA."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; checkpointed whole.

    params: trainable trees by role, e.g. {'model': ..., 'disc': ..., 'logvar': ...}.
    opt_state: one optimizer state per trainable role that has its own optimizer.
    ema_params: EMA of params['model'] (None when EMA is off).
    model_state: non-trainable collections, e.g. the discriminator's batch statistics.
    """
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any = None
    model_state: Any = flax.core.FrozenDict()


def eval_params(state: TrainState) -> Any:
    """The model params to evaluate and sample: the EMA where it is kept, else the trained ones."""
    return state.ema_params if state.ema_params is not None else state.params["model"]


def ema_decay(num_updates: jax.Array, max_decay: float, warmup: bool) -> jax.Array:
    """CompVis LitEma's decay: min(max_decay, (1 + n) / (10 + n)) with warm-up, else constant."""
    if not warmup:
        return jnp.asarray(max_decay, jnp.float32)
    n = num_updates.astype(jnp.float32)
    return jnp.minimum(max_decay, (1.0 + n) / (10.0 + n))


def ema_update(ema: Any, params: Any, decay: jax.Array) -> Any:
    return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p.astype(e.dtype) - e), ema, params)


def ema_step(ema: Any, params: Any, step: jax.Array, updated: Any, ema_cfg) -> Any:
    """The EMA after an optimizer step; unchanged (and None stays None) on accumulation-only steps."""
    if ema is None:
        return None
    decay = ema_decay(step, float(ema_cfg.decay), bool(ema_cfg.warmup))
    return jax.tree.map(lambda n, o: jnp.where(updated, n, o), ema_update(ema, params, decay), ema)


def tree_all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)
