"""Samplers step for step against diffusers' schedulers, on one fixed model in numpy and JAX.

Tolerance: diffusers steps in float32 (alphas_cumprod accumulated in float32, DPM sigmas cast
to float32), we in float32 from a float64-built schedule; every trajectory entry must agree to
max |ours - diffusers| <= 1e-5 * max(1, max |diffusers|). The test model is a Gaussian-data
optimal denoiser plus a nonlinear term, so samples stay O(1) and the bound is ~1e-5 absolute.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

from latent_diffusion.diffusion import samplers, schedules
from latent_diffusion.diffusion.guidance import cfg_model_fn

RTOL = 1e-5
SHAPE = (2, 6, 6, 4)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
DIFFUSERS_PTYPE = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}

_rs = np.random.RandomState(0)
W = _rs.randn(4, 4) / 2
B = _rs.randn(4) * 0.1
ABAR64 = np.cumprod(1.0 - schedules.make_betas("scaled_linear"))
SCHED = schedules.make_schedule("scaled_linear")


def _model_np(ptype):
    def f(x, t):
        a = np.sqrt(ABAR64[t])[:, None, None, None]
        s = np.sqrt(1 - ABAR64[t])[:, None, None, None]
        wiggle = 0.1 * np.tanh(x @ W + B) * (1 + 0.5 * np.sin(t / 100.0))[:, None, None, None]
        base = {"eps": s * x, "v": 0.0 * x, "x0": a * x}[ptype]
        return base + wiggle + 0.05 * x.mean(axis=(1, 2), keepdims=True)  # mixes pixels (for inpainting)
    return f


def _model_jax(ptype):
    def f(x, t):
        a = SCHED.sqrt_alphas_cumprod[t][:, None, None, None]
        s = SCHED.sqrt_one_minus_alphas_cumprod[t][:, None, None, None]
        tf = t.astype(jnp.float32)
        wiggle = 0.1 * jnp.tanh(x @ jnp.asarray(W, jnp.float32) + jnp.asarray(B, jnp.float32))
        wiggle = wiggle * (1 + 0.5 * jnp.sin(tf / 100.0))[:, None, None, None]
        base = {"eps": s * x, "v": 0.0 * x, "x0": a * x}[ptype]
        return base + wiggle + 0.05 * x.mean(axis=(1, 2), keepdims=True)
    return f


def _x(seed=1, shape=SHAPE):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def _run_diffusers(scheduler, ptype, x, timesteps=None, step_kwargs=None, after_step=None):
    """Drive a diffusers scheduler as its pipelines do; returns the stacked prev_samples."""
    f = _model_np(ptype)
    xt, traj = torch.from_numpy(x), []
    for i, t in enumerate(scheduler.timesteps if timesteps is None else timesteps):
        out = f(xt.numpy().astype(np.float64), np.full(x.shape[0], int(t))).astype(np.float32)
        xt = scheduler.step(torch.from_numpy(out), t, xt, **(step_kwargs(i) if step_kwargs else {})).prev_sample
        if after_step is not None:
            xt = after_step(i, xt)
        traj.append(xt.numpy())
    return np.stack(traj)


def _assert_close(ours, ref):
    ours = np.asarray(ours)
    assert ours.shape == ref.shape
    err, scale = np.abs(ours - ref).max(), max(1.0, np.abs(ref).max())
    assert err <= RTOL * scale, f"max abs diff {err:.3g} > {RTOL} * {scale:.3g}"


@pytest.mark.parametrize("ptype,spacing,steps", [
    ("eps", "uniform", 20), ("v", "uniform", 20), ("x0", "uniform", 10),
    ("eps", "trailing", 20), ("v", "leading", 50)])
def test_ddim_matches_diffusers(ptype, spacing, steps):
    ref = DDIMScheduler(**SD, prediction_type=DIFFUSERS_PTYPE[ptype], clip_sample=False, set_alpha_to_one=False,
                        steps_offset=0 if spacing == "trailing" else 1,
                        timestep_spacing="leading" if spacing == "uniform" else spacing)
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(samplers.ddim_timesteps(steps, 1000, spacing, ref.config.steps_offset),
                                  ref.timesteps.numpy())
    x = _x()
    _, traj = samplers.ddim_sample(_model_jax(ptype), SCHED, jnp.asarray(x), steps, prediction_type=ptype,
                                   spacing=spacing, return_trajectory=True)
    _assert_close(traj, _run_diffusers(ref, ptype, x))


@pytest.mark.parametrize("ptype,eta,alpha_one", [("eps", 1.0, False), ("v", 0.5, True)])
def test_ddim_eta_matches_diffusers_with_same_noise(ptype, eta, alpha_one):
    steps = 15
    ref = DDIMScheduler(**SD, prediction_type=DIFFUSERS_PTYPE[ptype], clip_sample=False,
                        set_alpha_to_one=alpha_one, steps_offset=1)
    ref.set_timesteps(steps)
    x, z = _x(), np.random.RandomState(5).randn(steps, *SHAPE).astype(np.float32)
    _, traj = samplers.ddim_sample(_model_jax(ptype), SCHED, jnp.asarray(x), steps, prediction_type=ptype,
                                   eta=eta, noise=jnp.asarray(z), set_alpha_to_one=alpha_one,
                                   return_trajectory=True)
    want = _run_diffusers(ref, ptype, x, step_kwargs=lambda i: dict(eta=eta, variance_noise=torch.from_numpy(z[i])))
    _assert_close(traj, want)


def test_ddim_rng_noise_is_fold_in_per_step():
    steps, rng = 8, jax.random.PRNGKey(3)
    x = jnp.asarray(_x())
    z = jnp.stack([jax.random.normal(jax.random.fold_in(rng, i), SHAPE) for i in range(steps)])
    a = samplers.ddim_sample(_model_jax("eps"), SCHED, x, steps, eta=1.0, rng=rng)
    b = samplers.ddim_sample(_model_jax("eps"), SCHED, x, steps, eta=1.0, noise=z)
    c = samplers.ddim_sample(_model_jax("eps"), SCHED, x, steps, eta=1.0, rng=jax.random.PRNGKey(4))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-2
    with pytest.raises(ValueError, match="rng"):
        samplers.ddim_sample(_model_jax("eps"), SCHED, x, steps, eta=0.5)


def test_quadratic_spacing_is_compvis_quad():
    ts = samplers.ddim_timesteps(10, 1000, "quadratic")
    assert ts.tolist() == [801, 633, 484, 356, 247, 159, 89, 40, 10, 1]
    out = samplers.ddim_sample(_model_jax("eps"), SCHED, jnp.asarray(_x()), 10, spacing="quadratic")
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("ptype,steps", [("eps", 20), ("v", 12), ("eps", 1)])
def test_plms_matches_diffusers_pndm(ptype, steps):
    ref = PNDMScheduler(**SD, prediction_type=DIFFUSERS_PTYPE[ptype], skip_prk_steps=True, set_alpha_to_one=False,
                        steps_offset=1)
    ref.set_timesteps(steps)
    x = _x()
    _, traj = samplers.plms_sample(_model_jax(ptype), SCHED, jnp.asarray(x), steps, prediction_type=ptype,
                                   return_trajectory=True)
    _assert_close(traj, _run_diffusers(ref, ptype, x))


@pytest.mark.parametrize("ptype,steps,spacing,final", [
    ("eps", 10, "linspace", "zero"), ("v", 20, "linspace", "zero"), ("x0", 10, "leading", "zero"),
    ("eps", 20, "leading", "sigma_min"), ("v", 10, "trailing", "sigma_min")])
def test_dpm_solver_pp_2m_matches_diffusers(ptype, steps, spacing, final):
    ref = DPMSolverMultistepScheduler(**SD, prediction_type=DIFFUSERS_PTYPE[ptype], algorithm_type="dpmsolver++",
                                      solver_order=2, lower_order_final=True, timestep_spacing=spacing,
                                      final_sigmas_type=final)
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(samplers.dpm_timesteps(steps, 1000, spacing), ref.timesteps.numpy())
    x = _x()
    _, traj = samplers.dpm_solver_pp_2m_sample(_model_jax(ptype), SCHED, jnp.asarray(x), steps,
                                               prediction_type=ptype, spacing=spacing, final_sigmas_type=final,
                                               return_trajectory=True)
    _assert_close(traj, _run_diffusers(ref, ptype, x))


def test_img2img_start_step_matches_diffusers():
    steps, strength = 20, 0.6
    start = samplers.strength_to_start_step(steps, strength)
    assert start == 8
    x0, noise = _x(2), _x(3)
    for name, ref in [("ddim", DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1)),
                      ("dpm", DPMSolverMultistepScheduler(**SD, algorithm_type="dpmsolver++", solver_order=2))]:
        ref.set_timesteps(steps)
        ts = ref.timesteps[start:]
        if name == "dpm":
            ref.set_begin_index(start)
        x_start = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ts[:1])
        want = _run_diffusers(ref, "eps", x_start.numpy(), timesteps=ts)
        all_ts = samplers.ddim_timesteps(steps) if name == "ddim" else samplers.dpm_timesteps(steps)
        x_ours = samplers.noised_start(SCHED, jnp.asarray(x0), jnp.asarray(noise), all_ts, start)
        np.testing.assert_allclose(np.asarray(x_ours), x_start.numpy(), atol=1e-5)
        fn = samplers.ddim_sample if name == "ddim" else samplers.dpm_solver_pp_2m_sample
        _, traj = fn(_model_jax("eps"), SCHED, x_ours, steps, start_step=start, return_trajectory=True)
        _assert_close(traj, want)
    with pytest.raises(ValueError, match="start_step"):
        samplers.ddim_sample(_model_jax("eps"), SCHED, x_ours, steps, start_step=steps)


def test_inpaint_blend_matches_reference_loop():
    steps = 10
    x_T, x0, noise = _x(1), _x(2), _x(3)
    mask = np.zeros(SHAPE, np.float32)
    mask[:, :3] = 1.0  # keep the top half
    ref = DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    ref.set_timesteps(steps)
    ts = ref.timesteps

    def blend(i, x):  # diffusers' inpainting loop, with mask == 1 meaning "keep"
        known = (ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ts[i + 1:i + 2])
                 if i < steps - 1 else torch.from_numpy(x0))
        return torch.from_numpy(mask) * known + (1 - torch.from_numpy(mask)) * x

    want = _run_diffusers(ref, "eps", x_T, after_step=blend)
    fn = samplers.inpaint_blend_fn(SCHED, jnp.asarray(x0), jnp.asarray(mask), jnp.asarray(noise))
    out, traj = samplers.ddim_sample(_model_jax("eps"), SCHED, jnp.asarray(x_T), steps, blend_fn=fn,
                                     return_trajectory=True)
    _assert_close(traj, want)
    np.testing.assert_array_equal(np.asarray(out)[:, :3], x0[:, :3])
    plain = samplers.ddim_sample(_model_jax("eps"), SCHED, jnp.asarray(x_T), steps)
    assert np.abs(np.asarray(out)[:, 3:] - np.asarray(plain)[:, 3:]).max() > 1e-3  # the blend feeds back


def _cond_apply(calls):
    """A conditional model: x, t and a pytree condition (context and class label)."""
    base = _model_jax("eps")

    def apply(x, t, cond):
        calls.append(x.shape[0])
        shift = cond["context"].mean(axis=(1, 2))[:, None, None, None] + 0.1 * cond["y"][:, None, None, None]
        return base(x, t) + shift
    return apply


def _conds(b=SHAPE[0]):
    rs = np.random.RandomState(7)
    cond = {"context": jnp.asarray(rs.randn(b, 5, 8), jnp.float32), "y": jnp.arange(b, dtype=jnp.float32)}
    uncond = {"context": jnp.zeros((b, 5, 8)), "y": jnp.full((b,), 10.0)}
    return cond, uncond


def test_cfg_is_one_batched_call_equal_to_two_calls():
    calls = []
    apply = _cond_apply(calls)
    cond, uncond = _conds()
    x, t = jnp.asarray(_x()), jnp.array([500, 20], jnp.int32)
    for scale in (7.5, jnp.array([1.5, 3.0])):
        calls.clear()
        got = cfg_model_fn(apply, cond, uncond, scale)(x, t)
        assert calls == [2 * SHAPE[0]]
        c, u = apply(x, t, cond), apply(x, t, uncond)
        s = jnp.asarray(scale).reshape(-1, 1, 1, 1)
        np.testing.assert_allclose(np.asarray(got), np.asarray(u + s * (c - u)), atol=1e-5)
    calls.clear()
    got = cfg_model_fn(apply, cond, uncond, 1.0)(x, t)  # static 1.0: no unconditional half
    assert calls == [SHAPE[0]]
    np.testing.assert_allclose(np.asarray(got), np.asarray(apply(x, t, cond)), atol=0)
    with pytest.raises(ValueError, match="batch size"):
        cfg_model_fn(apply, cond, {"context": jnp.zeros((1, 5, 8)), "y": jnp.zeros((1,))}, 2.0)


@pytest.mark.parametrize("name", ["ddim", "plms", "dpm_solver_pp_2m"])
def test_jitted_sampler_compiles_once_per_shape_and_steps(name):
    traces = []
    apply = _cond_apply(traces)
    cond, uncond = _conds()
    sampler = samplers.SAMPLERS[name]

    @jax.jit
    def run(x, scale):
        return sampler(cfg_model_fn(apply, cond, uncond, scale), SCHED, x, 6)

    a = run(jnp.asarray(_x(1)), jnp.float32(2.0))
    b = run(jnp.asarray(_x(2)), jnp.float32(5.0))
    assert len(traces) == 1, "the model must be traced once: steps run inside one lax.scan, no recompiles"
    assert run._cache_size() == 1
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
    direct = sampler(cfg_model_fn(apply, cond, uncond, jnp.float32(5.0)), SCHED, jnp.asarray(_x(2)), 6)
    np.testing.assert_allclose(np.asarray(b), np.asarray(direct), atol=1e-5)
