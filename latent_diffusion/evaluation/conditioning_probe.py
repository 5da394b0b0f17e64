"""How much an LDM uses its condition: held-out error per timestep bucket with the true, shuffled and
empty captions (or labels, layouts), and whether the training gradient reaches the condition encoder.

The error is reported twice. In the training objective's own space (eps, v or x0), and as the error of
the predicted clean latent x0, which is where the condition shows: at high noise the x0 estimate is
what decides the layout of the image, while an eps-prediction loss there scales x0 errors by
alpha_bar / (1 - alpha_bar) and hides them. `scripts/probe_conditioning.py` prints the table.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion.diffusion import objectives

CONDITIONS = ("true", "shuffled", "empty")


def _raw_variants(task, raw: dict, perm: np.ndarray) -> dict:
    """The batch's raw conditions, the same rolled to other examples, and the null ones."""
    shuffled = jax.tree.map(lambda a: a[perm], raw)
    return {"true": raw, "shuffled": shuffled, "empty": task.null_conditions(raw)}


def bucket_errors(task, model_params, frozen, batch, *, num_buckets: int = 10, num_draws: int = 4,
                  seed: int = 0) -> dict:
    """{condition: {'objective': (num_buckets,), 'x0': (num_buckets,)}} mean squared errors.

    Every example is noised at one timestep in the middle of each bucket of [0, T), with `num_draws`
    noise draws; 'shuffled' gives each example another example's condition (a roll by one), 'empty'
    the null condition of classifier-free guidance.
    """
    b = task.batch_size_of(batch)
    if b < 2:
        raise ValueError("bucket_errors needs at least two examples to shuffle conditions")
    T = task.schedule.num_timesteps
    ts = ((np.arange(num_buckets) + 0.5) * T / num_buckets).astype(np.int32)
    perm = np.roll(np.arange(b), 1)

    @jax.jit
    def errors(key):
        k_enc, k_noise = jax.random.split(key)
        x0 = task.latents_of(frozen, batch, k_enc)
        raw = task.raw_conditions(batch, frozen, key, drop=False)
        out = {}
        for name, r in _raw_variants(task, raw, perm).items():
            inputs = task.unet_inputs(model_params["cond"], frozen, r, x0.shape[1:3])
            obj, x0_err = [], []
            for i, t_val in enumerate(ts):
                t = jnp.full((b,), t_val, jnp.int32)
                noise = jax.random.normal(jax.random.fold_in(k_noise, i), x0.shape, x0.dtype)
                x_t = objectives.q_sample(task.schedule, x0, t, noise)
                pred = task.apply_unet(model_params["unet"], x_t, t, inputs)
                tgt = objectives.target(task.prediction_type, x0, noise, t, task.schedule)
                obj.append(jnp.mean(jnp.square(pred - tgt)))
                x0_hat, _ = objectives.predict_x0_and_eps(task.schedule, x_t, t, pred, task.prediction_type)
                x0_err.append(jnp.mean(jnp.square(x0_hat - x0)))
            out[name] = {"objective": jnp.stack(obj), "x0": jnp.stack(x0_err)}
        return out

    draws = [jax.device_get(errors(jax.random.key(seed * 1000 + d))) for d in range(num_draws)]
    return {name: {k: np.mean([d[name][k] for d in draws], axis=0) for k in ("objective", "x0")}
            for name in CONDITIONS}


def condition_gradient_norms(task, state_params, frozen, batch, rng) -> dict:
    """Global gradient norms of the training loss with respect to the UNet and to the condition encoder.

    A jointly trained text encoder whose gradient is zero (or NaN) learns nothing from the images.
    """
    import optax
    b = task.batch_size_of(batch)
    r_t, r_noise, r_rest = jax.random.split(rng, 3)
    t = objectives.sample_timesteps(r_t, b, task.schedule.num_timesteps)

    def loss(params):
        return jnp.mean(task.loss_terms(params, batch, r_rest, frozen, t, r_noise, drop=False,
                                        deterministic=True))

    grads = jax.grad(loss)(state_params)
    return {name: float(optax.global_norm(g)) for name, g in grads.items()}


def table(errors: dict, num_timesteps: int = 1000) -> str:
    """A text table: one row per timestep bucket, the x0 error of each condition and the gaps."""
    n = len(errors["true"]["x0"])
    lines = [f"{'t bucket':>11} | " + " ".join(f"{c + ' x0':>12}" for c in CONDITIONS)
             + f" | {'shuf/true':>9} {'empty/true':>10} | {'objective true':>14} {'shuffled':>9}"]
    for k in range(n):
        lo, hi = k * num_timesteps // n, (k + 1) * num_timesteps // n
        x = [errors[c]["x0"][k] for c in CONDITIONS]
        o = errors["true"]["objective"][k], errors["shuffled"]["objective"][k]
        lines.append(f"{lo:>5}-{hi - 1:<5} | " + " ".join(f"{v:12.5f}" for v in x)
                     + f" | {x[1] / x[0]:9.3f} {x[2] / x[0]:10.3f} | {o[0]:14.5f} {o[1]:9.5f}")
    mean = {c: float(np.mean(errors[c]["objective"])) for c in CONDITIONS}
    lines.append("objective averaged over buckets: " + ", ".join(f"{c} {v:.5f}" for c, v in mean.items()))
    return "\n".join(lines)
