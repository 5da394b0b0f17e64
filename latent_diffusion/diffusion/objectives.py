"""Forward process, prediction-type conversions, training targets and loss weights."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from latent_diffusion.diffusion.schedules import NoiseSchedule

PREDICTION_TYPES = ("eps", "v", "x0")
WEIGHTINGS = ("simple", "min_snr")
# diffusers' names for the same parameterizations.
_ALIASES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def canonical_prediction_type(prediction_type: str) -> str:
    """'eps' / 'v' / 'x0', also accepting diffusers' 'epsilon' / 'v_prediction' / 'sample'."""
    p = _ALIASES.get(prediction_type, prediction_type)
    if p not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES} (or diffusers' "
                         f"{tuple(_ALIASES)}), got {prediction_type!r}")
    return p


def _per_example(values, t, ndim):
    """Gather values[t] for t of shape (B,) (or a scalar) and shape it to broadcast against NHWC."""
    v = values[t]
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def q_sample(schedule: NoiseSchedule, x0, t, noise):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    a = _per_example(schedule.sqrt_alphas_cumprod, t, x0.ndim).astype(x0.dtype)
    s = _per_example(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim).astype(x0.dtype)
    return a * x0 + s * noise


def predict_x0_and_eps(schedule: NoiseSchedule, x_t, t, model_out, prediction_type: str):
    """Both the clean-data and the noise estimate implied by a model output at (x_t, t)."""
    p = canonical_prediction_type(prediction_type)
    a = _per_example(schedule.sqrt_alphas_cumprod, t, x_t.ndim)
    s = _per_example(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
    if p == "eps":
        return (x_t - s * model_out) / a, model_out
    if p == "v":
        # v = a eps - s x0 and x_t = a x0 + s eps, with a^2 + s^2 = 1.
        return a * x_t - s * model_out, a * model_out + s * x_t
    return model_out, (x_t - a * model_out) / s


def target(prediction_type: str, x0, noise, t, schedule: NoiseSchedule | None = None):
    """What the network is trained to output; 'v' needs the schedule."""
    p = canonical_prediction_type(prediction_type)
    if p == "eps":
        return noise
    if p == "x0":
        return x0
    if schedule is None:
        raise ValueError("target(prediction_type='v', ...) needs the noise schedule: pass schedule=")
    a = _per_example(schedule.sqrt_alphas_cumprod, t, x0.ndim).astype(x0.dtype)
    s = _per_example(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim).astype(x0.dtype)
    return a * noise - s * x0


def loss_weight(schedule: NoiseSchedule, t, prediction_type: str = "eps", weighting: str = "simple",
                snr_gamma: float = 5.0):
    """Per-example weight, shape (B,). 'min_snr' is Hang et al. 2023 for each parameterization.

    Min-SNR-gamma weights the x0-space loss by min(snr, gamma); an eps loss already carries a
    factor snr and a v loss a factor (snr + 1), which the weight divides out.
    """
    p = canonical_prediction_type(prediction_type)
    if weighting == "simple":
        return jnp.ones(jnp.shape(t), jnp.float32)
    if weighting != "min_snr":
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    snr = schedule.snr(t).astype(jnp.float32)
    clipped = jnp.minimum(snr, snr_gamma)
    if p == "eps":
        return clipped / snr
    if p == "v":
        return clipped / (snr + 1.0)
    return clipped


def diffusion_loss(schedule: NoiseSchedule, model_out, x0, noise, t, prediction_type: str = "eps",
                   weighting: str = "simple", snr_gamma: float = 5.0):
    """Per-example weighted L2 loss, shape (B,): mean over all non-batch dims, in float32."""
    tgt = target(prediction_type, x0, noise, t, schedule).astype(jnp.float32)
    err = jnp.square(model_out.astype(jnp.float32) - tgt)
    per_example = err.reshape(err.shape[0], -1).mean(axis=1)
    return per_example * loss_weight(schedule, t, prediction_type, weighting, snr_gamma)


def sample_timesteps(rng, batch: int, num_timesteps: int = 1000):
    """Training timesteps, uniform over [0, T), int32 of shape (batch,)."""
    return jax.random.randint(rng, (batch,), 0, num_timesteps, dtype=jnp.int32)

