"""Noise schedules against diffusers' DDPMScheduler and the closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import DDPMScheduler

from latent_diffusion.diffusion import schedules


@pytest.mark.parametrize("name,ours,beta_start,beta_end", [
    ("scaled_linear", "scaled_linear", 0.00085, 0.012),
    ("linear", "linear", 0.0001, 0.02),
    ("squaredcos_cap_v2", "cosine", 0.0001, 0.02),
])
def test_matches_diffusers(name, ours, beta_start, beta_end):
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=name, beta_start=beta_start, beta_end=beta_end)
    sched = schedules.make_schedule(ours, 1000, beta_start, beta_end)
    # diffusers builds betas and their cumulative product in float32, we in float64 and round
    # once, so the products differ by float32 accumulation error (~1e-7), not by formula.
    np.testing.assert_allclose(np.asarray(sched.betas), ref.betas.numpy(), rtol=2e-6, atol=1e-9)
    np.testing.assert_allclose(np.asarray(sched.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=2e-5, atol=1e-6)
    assert sched.num_timesteps == 1000 and sched.betas.dtype == jnp.float32


def test_cosine_alias_and_float64_derivation():
    betas = schedules.make_betas("squaredcos_cap_v2", 1000)
    np.testing.assert_array_equal(betas, schedules.make_betas("cosine", 1000))
    assert betas.dtype == np.float64 and betas.max() == 0.999  # the last step is clipped to max_beta
    s = schedules.make_schedule("cosine", dtype=jnp.float32)
    abar = np.cumprod(1.0 - betas)
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod), abar, rtol=1e-6, atol=1e-12)
    a, sig = np.asarray(s.sqrt_alphas_cumprod), np.asarray(s.sqrt_one_minus_alphas_cumprod)
    np.testing.assert_allclose(a ** 2 + sig ** 2, 1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(s.log_snr), np.log(abar / (1 - abar)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod_prev)[1:], np.asarray(s.alphas_cumprod)[:-1])
    assert float(s.alphas_cumprod_prev[0]) == 1.0


def test_scaled_linear_is_linear_in_sqrt_beta():
    b = schedules.make_betas("scaled_linear", 1000, 0.00085, 0.012)
    np.testing.assert_allclose(np.diff(np.sqrt(b)), (0.012 ** 0.5 - 0.00085 ** 0.5) / 999, rtol=1e-9)
    assert b[0] == pytest.approx(0.00085) and b[-1] == pytest.approx(0.012)
    # CompVis' "linear" is this schedule
    assert schedules.COMPVIS_NAMES["linear"] == "scaled_linear"


def test_schedule_is_a_pytree_through_jit():
    s = schedules.make_schedule("scaled_linear", 100)
    snr = jax.jit(lambda sch, t: sch.snr(t))(s, jnp.array([0, 50, 99]))
    abar = np.cumprod(1 - schedules.make_betas("scaled_linear", 100))[[0, 50, 99]]  # float64
    np.testing.assert_allclose(np.asarray(snr), abar / (1 - abar), rtol=1e-5)


def test_bad_names_and_betas_raise():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        schedules.make_betas("quadratic")
    with pytest.raises(ValueError, match="values in"):
        schedules.schedule_from_betas(np.array([0.1, 1.0]))
