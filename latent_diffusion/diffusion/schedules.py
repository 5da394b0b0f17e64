"""Discrete-time variance-preserving noise schedules (betas over T training steps)."""
from __future__ import annotations

import math

import flax.struct
import jax.numpy as jnp
import numpy as np

# CompVis configs name the sqrt-linear schedule "linear" and the plain one "sqrt_linear".
COMPVIS_NAMES = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "cosine"}
_ALIASES = {"squaredcos_cap_v2": "cosine"}
SCHEDULES = ("scaled_linear", "linear", "cosine")


def make_betas(name: str = "scaled_linear", num_timesteps: int = 1000, beta_start: float = 0.00085,
               beta_end: float = 0.012, max_beta: float = 0.999) -> np.ndarray:
    """Betas in float64, named as diffusers names them ('squaredcos_cap_v2' is accepted for 'cosine')."""
    name = _ALIASES.get(name, name)
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if name == "scaled_linear":
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=np.float64) ** 2
    if name == "linear":
        return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    if name == "cosine":
        # Nichol & Dhariwal 2021, s = 0.008; betas clipped so the last steps stay invertible.
        steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        alpha_bar = np.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)
    raise ValueError(f"unknown beta schedule {name!r}; expected one of {SCHEDULES} "
                     f"(CompVis config names map via COMPVIS_NAMES: {COMPVIS_NAMES})")


@flax.struct.dataclass
class NoiseSchedule:
    """Per-timestep quantities of q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), t in [0, T)."""
    betas: jnp.ndarray
    alphas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    alphas_cumprod_prev: jnp.ndarray
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    log_snr: jnp.ndarray  # log(abar / (1 - abar)); DPM-Solver's lambda is half of it

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def snr(self, t):
        """Signal-to-noise ratio abar_t / (1 - abar_t) at integer timesteps t."""
        return jnp.exp(self.log_snr[t])


def schedule_from_betas(betas, dtype=jnp.float32) -> NoiseSchedule:
    """Derive every schedule quantity in float64, then store them as `dtype` arrays."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or np.any(betas <= 0) or np.any(betas >= 1):
        raise ValueError(f"betas must be a 1-D array with values in (0, 1), got shape {betas.shape} "
                         f"and range [{betas.min()}, {betas.max()}]")
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    fields = dict(
        betas=betas, alphas=alphas, alphas_cumprod=abar,
        alphas_cumprod_prev=np.concatenate([[1.0], abar[:-1]]),
        sqrt_alphas_cumprod=np.sqrt(abar), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
        log_snr=np.log(abar) - np.log1p(-abar))
    return NoiseSchedule(**{k: jnp.asarray(v, dtype=dtype) for k, v in fields.items()})


def make_schedule(name: str = "scaled_linear", num_timesteps: int = 1000, beta_start: float = 0.00085,
                  beta_end: float = 0.012, max_beta: float = 0.999, dtype=jnp.float32) -> NoiseSchedule:
    """The schedule used by training and sampling; defaults are the Stable/latent diffusion ones."""
    return schedule_from_betas(make_betas(name, num_timesteps, beta_start, beta_end, max_beta), dtype)
