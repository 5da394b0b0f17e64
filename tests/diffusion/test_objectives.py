"""Forward process, targets, conversions and loss weights against closed-form numbers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from latent_diffusion.diffusion import objectives as obj
from latent_diffusion.diffusion import schedules

T_CHECK = np.array([0, 1, 250, 500, 999])


@pytest.fixture(scope="module")
def setup():
    sched = schedules.make_schedule("scaled_linear")
    abar = np.cumprod(1.0 - schedules.make_betas("scaled_linear"))  # float64 closed form
    rs = np.random.RandomState(0)
    x0 = rs.randn(len(T_CHECK), 4, 4, 3).astype(np.float32)
    noise = rs.randn(*x0.shape).astype(np.float32)
    return sched, abar, x0, noise


def test_q_sample_and_v_target_closed_form(setup):
    sched, abar, x0, noise = setup
    a = np.sqrt(abar[T_CHECK])[:, None, None, None]
    s = np.sqrt(1 - abar[T_CHECK])[:, None, None, None]
    t = jnp.asarray(T_CHECK, jnp.int32)
    np.testing.assert_allclose(np.asarray(obj.q_sample(sched, x0, t, noise)), a * x0 + s * noise, atol=1e-6)
    np.testing.assert_allclose(np.asarray(obj.target("v", x0, noise, t, sched)), a * noise - s * x0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(obj.target("eps", x0, noise, t)), noise)
    np.testing.assert_array_equal(np.asarray(obj.target("sample", x0, noise, t)), x0)
    # and diffusers' add_noise / get_velocity agree
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    tt = torch.from_numpy(T_CHECK)
    np.testing.assert_allclose(np.asarray(obj.q_sample(sched, x0, t, noise)),
                               ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(obj.target("v", x0, noise, t, sched)),
                               ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="schedule"):
        obj.target("v", x0, noise, t)


@pytest.mark.parametrize("ptype", ["eps", "v", "x0", "epsilon", "v_prediction"])
def test_prediction_conversions_invert_targets(setup, ptype):
    sched, _, x0, noise = setup
    t = jnp.asarray(T_CHECK, jnp.int32)
    x_t = obj.q_sample(sched, x0, t, noise)
    x0_hat, eps_hat = obj.predict_x0_and_eps(sched, x_t, t, obj.target(ptype, x0, noise, t, sched), ptype)
    # x0 from eps divides by sqrt(abar) ~ 0.068 at t = 999, eps from x0 by sqrt(1 - abar) ~ 0.029
    # at t = 0: float32 rounding of x_t is amplified by those factors.
    np.testing.assert_allclose(np.asarray(x0_hat), x0, atol=2e-4)
    np.testing.assert_allclose(np.asarray(eps_hat), noise, atol=2e-4)


def test_min_snr_weights_closed_form(setup):
    sched, abar, _, _ = setup
    t = jnp.asarray(T_CHECK, jnp.int32)
    snr = abar[T_CHECK] / (1 - abar[T_CHECK])
    g = 5.0
    assert snr[0] > g > snr[-1]  # both branches of the min are exercised
    for ptype, expect in [("eps", np.minimum(snr, g) / snr), ("v", np.minimum(snr, g) / (snr + 1)),
                          ("x0", np.minimum(snr, g))]:
        w = obj.loss_weight(sched, t, ptype, "min_snr", g)
        np.testing.assert_allclose(np.asarray(w), expect, rtol=1e-5)
    # hand-checked numbers: at t = 999 snr < gamma so the eps weight is exactly 1
    assert float(obj.loss_weight(sched, t, "eps", "min_snr")[-1]) == pytest.approx(1.0)
    assert float(obj.loss_weight(sched, t, "eps", "min_snr")[0]) == pytest.approx(5.0 / snr[0], rel=1e-5)
    np.testing.assert_array_equal(np.asarray(obj.loss_weight(sched, t, "v", "simple")), 1.0)
    with pytest.raises(ValueError, match="weighting"):
        obj.loss_weight(sched, t, "eps", "p2")


def test_min_snr_is_the_same_x0_loss_for_every_parameterization(setup):
    """min-SNR-gamma weights the x0-space error by min(snr, gamma), whatever the network predicts."""
    sched, abar, x0, noise = setup
    t_idx = np.array([10, 200, 400, 600, 900])
    t = jnp.asarray(t_idx, jnp.int32)
    x_t = obj.q_sample(sched, x0, t, noise)
    snr = abar[t_idx] / (1 - abar[t_idx])
    delta = 0.1 * np.random.RandomState(1).randn(*x0.shape).astype(np.float32)
    for ptype in ("eps", "v", "x0"):
        out = obj.target(ptype, x0, noise, t, sched) + delta
        x0_hat, _ = obj.predict_x0_and_eps(sched, x_t, t, out, ptype)
        x0_err = np.mean((np.asarray(x0_hat) - x0) ** 2, axis=(1, 2, 3))
        loss = obj.diffusion_loss(sched, out, x0, noise, t, ptype, "min_snr", 5.0)
        np.testing.assert_allclose(np.asarray(loss), np.minimum(snr, 5.0) * x0_err, rtol=2e-3)


def test_simple_loss_is_per_example_mse(setup):
    sched, _, x0, noise = setup
    t = jnp.asarray(T_CHECK, jnp.int32)
    out = noise + 0.5
    loss = obj.diffusion_loss(sched, out, x0, noise, t, "eps")
    assert loss.shape == (len(T_CHECK),) and loss.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(loss), 0.25, rtol=1e-6)


def test_sample_timesteps_and_ema_decay():
    from latent_diffusion.training.state import ema_decay
    t = obj.sample_timesteps(jax.random.PRNGKey(0), 4096, 1000)
    assert t.shape == (4096,) and t.dtype == jnp.int32
    assert int(t.min()) >= 0 and int(t.max()) <= 999 and int(t.max()) > 990 and int(t.min()) < 10
    assert abs(float(t.mean()) - 499.5) < 20
    np.testing.assert_allclose(np.asarray(ema_decay(jnp.array([0, 10, 100000]), 0.9999, True)),
                               [0.1, 11 / 20, 0.9999], rtol=1e-6)
    assert float(ema_decay(jnp.asarray(100000), 0.999, True)) == pytest.approx(0.999)


def test_bad_prediction_type_raises(setup):
    sched, _, x0, noise = setup
    with pytest.raises(ValueError, match="prediction_type"):
        obj.target("score", x0, noise, jnp.zeros(5, jnp.int32), sched)
