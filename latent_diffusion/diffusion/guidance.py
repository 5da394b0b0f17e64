"""Classifier-free guidance (Ho & Salimans 2022) as a sampler model function."""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp


def _concat(a, b):
    if jnp.shape(a)[:1] != jnp.shape(b)[:1]:
        raise ValueError(f"cond and uncond leaves need the same batch size, got shapes "
                         f"{jnp.shape(a)} and {jnp.shape(b)}; broadcast the null condition to the batch")
    return jnp.concatenate([a, b], axis=0)


def cfg_model_fn(apply_fn, cond, uncond, scale):
    """`model_fn(x, t)` = uncond + scale * (cond - uncond), both halves in ONE batched call.

    apply_fn(x, t, condition) -> prediction; `cond` and `uncond` are matching pytrees with a
    leading batch axis (text context vs. negative-prompt context, class labels vs. the null
    class, concat inputs). `scale` may be a traced scalar or a per-example (B,) array, so
    changing it does not recompile; a static Python 1.0 skips the unconditional half.
    """
    if isinstance(scale, numbers.Number) and scale == 1.0:
        return lambda x, t: apply_fn(x, t, cond)
    both = jax.tree_util.tree_map(_concat, cond, uncond)

    def model_fn(x, t):
        out = apply_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), both)
        out_c, out_u = jnp.split(out, 2, axis=0)
        s = jnp.asarray(scale, out.dtype)
        s = s.reshape(s.shape + (1,) * (out.ndim - s.ndim))  # per-example scales broadcast over HWC
        return out_u + s * (out_c - out_u)

    return model_fn
