"""DDIM, PLMS and DPM-Solver++ (2M) samplers: pure functions, one lax.scan over the steps.

Every sampler takes `model_fn(x, t) -> prediction` (t: int32 of shape (B,)), the schedule,
the starting latent `x_T` and static sampling options, and returns the final sample, or
(final, trajectory) with `return_trajectory=True`. Step tables (timesteps and coefficients)
are built outside the scan from the static number of steps, so a jitted sampler compiles
once per (shape, steps, options); values such as a guidance scale or eta may be traced.

Image-to-image: `start_step=k` starts at the k-th timestep of the schedule from an x_T
already noised to that timestep (`noised_start`). Inpainting by latent blending: `blend_fn(x, t)`
runs after every update with the timestep the new x belongs to (-1 once it is clean), see
`inpaint_blend_fn`.
"""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion.diffusion.objectives import canonical_prediction_type, predict_x0_and_eps, q_sample
from latent_diffusion.diffusion.schedules import NoiseSchedule

SPACINGS = ("uniform", "quadratic", "leading", "trailing", "linspace")


def _spaced(num_points: int, T: int, spacing: str, steps_offset: int) -> np.ndarray:
    """`num_points` descending training timesteps in [0, T)."""
    if spacing in ("uniform", "leading"):
        ts = np.arange(num_points) * (T // num_points) + steps_offset
    elif spacing == "quadratic":
        # CompVis ddim_discretize='quad': denser near t = 0.
        ts = (np.linspace(0, np.sqrt(T * 0.8), num_points) ** 2).astype(np.int64) + steps_offset
    elif spacing == "trailing":
        return np.round(np.arange(T, 0, -T / num_points)).astype(np.int64) - 1  # already descending
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, num_points).round().astype(np.int64)
    else:
        raise ValueError(f"timestep spacing must be one of {SPACINGS}, got {spacing!r}")
    return ts[::-1].astype(np.int64)


def _check_steps(num_steps, T):
    if not isinstance(num_steps, numbers.Integral) or not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be a Python int in [1, {T}] (the number of training "
                         f"timesteps), got {num_steps!r}")


def _check_start(start_step, num_steps):
    if not isinstance(start_step, numbers.Integral) or not 0 <= start_step < num_steps:
        raise ValueError(f"start_step must be a Python int in [0, {num_steps}) for {num_steps} steps, got "
                         f"{start_step!r}; use strength_to_start_step(num_steps, strength) with strength > 0")


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000, spacing: str = "uniform",
                   steps_offset: int = 1) -> np.ndarray:
    """DDIM / PLMS timesteps, descending. 'uniform' is CompVis' (diffusers 'leading', offset 1)."""
    _check_steps(num_steps, num_train_timesteps)
    ts = _spaced(num_steps, num_train_timesteps, spacing, steps_offset)
    if ts.min() < 0 or ts.max() >= num_train_timesteps:
        raise ValueError(f"spacing {spacing!r} with steps_offset={steps_offset} gives timesteps outside "
                         f"[0, {num_train_timesteps}): {ts.tolist()}; lower steps_offset")
    return ts


def dpm_timesteps(num_steps: int, num_train_timesteps: int = 1000, spacing: str = "linspace",
                  steps_offset: int = 0) -> np.ndarray:
    """DPM-Solver timesteps as diffusers spaces them: S + 1 points with the one at 0 dropped."""
    _check_steps(num_steps, num_train_timesteps)
    if spacing in ("linspace", "leading"):
        return _spaced(num_steps + 1, num_train_timesteps, spacing, steps_offset)[:-1]
    if spacing == "trailing":
        return _spaced(num_steps, num_train_timesteps, spacing, steps_offset)
    raise ValueError(f"DPM-Solver spacing must be 'linspace', 'leading' or 'trailing', got {spacing!r}")


def strength_to_start_step(num_steps: int, strength: float) -> int:
    """Image-to-image: the step to start at so that `strength` of the schedule is run (diffusers rule)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return max(num_steps - min(int(num_steps * strength), num_steps), 0)


def noised_start(schedule: NoiseSchedule, x0, noise, timesteps, start_step: int):
    """x at timesteps[start_step] for image-to-image: x0 pushed through q(x_t | x0)."""
    t = jnp.full((x0.shape[0],), int(timesteps[start_step]), jnp.int32)
    return q_sample(schedule, x0, t, noise)


def inpaint_blend_fn(schedule: NoiseSchedule, x0_known, mask, noise):
    """Latent-blending inpainting: where mask == 1 keep x0_known noised to the current t."""
    def blend(x, t):
        tb = jnp.full((x.shape[0],), jnp.maximum(t, 0), jnp.int32)
        known = jnp.where(t >= 0, q_sample(schedule, x0_known, tb, noise), x0_known)
        return mask * known + (1 - mask) * x
    return blend


def _next_of(ts: np.ndarray) -> np.ndarray:
    return np.append(ts[1:], -1)  # -1: past the last step, i.e. the final (clean) alpha


def _abar_at(schedule, ts, final):
    """alphas_cumprod at ts, with `final` where ts == -1."""
    abar = schedule.alphas_cumprod
    return jnp.where(jnp.asarray(ts) >= 0, abar[np.maximum(ts, 0)], final)


def _model_eval(model_fn, x, t):
    out = model_fn(x, jnp.full((x.shape[0],), t, jnp.int32))
    if out.shape != x.shape:
        raise ValueError(f"model_fn returned shape {out.shape} for an input of shape {x.shape}; "
                         "the samplers need a prediction shaped like x")
    return out.astype(x.dtype)


def _finish(scan_fn, carry, xs, return_trajectory):
    carry, traj = jax.lax.scan(scan_fn, carry, xs)
    x = carry[0] if isinstance(carry, tuple) else carry
    return (x, traj) if return_trajectory else x


def _blend(blend_fn, x, t_next):
    return x if blend_fn is None else blend_fn(x, t_next).astype(x.dtype)


def ddim_sample(model_fn, schedule: NoiseSchedule, x_T, num_steps: int, *, prediction_type: str = "eps",
                eta=0.0, rng=None, noise=None, spacing: str = "uniform", steps_offset: int = 1,
                set_alpha_to_one: bool = False, start_step: int = 0, blend_fn=None,
                return_trajectory: bool = False):
    """DDIM (Song et al. 2021) as CompVis ddim.py / diffusers DDIMScheduler.

    eta > 0 adds sigma_t * z per step, z = normal(fold_in(rng, step)) or `noise[step - start_step]`
    (shape (steps run,) + x_T.shape). The step after the last uses alpha_cumprod[0], or 1 with
    `set_alpha_to_one` (diffusers' flag). Each step goes to the next listed timestep, as CompVis
    does; diffusers' t - T // S agrees for 'uniform'/'leading' and 'trailing' when S divides T.
    """
    ptype = canonical_prediction_type(prediction_type)
    ts = ddim_timesteps(num_steps, schedule.num_timesteps, spacing, steps_offset)
    _check_start(start_step, num_steps)
    t_next = _next_of(ts)
    idx = np.arange(num_steps)[start_step:]
    stochastic = rng is not None or noise is not None
    if not stochastic and not (isinstance(eta, numbers.Number) and eta == 0):
        raise ValueError("ddim_sample with eta != 0 needs randomness: pass rng= or noise=")
    final = 1.0 if set_alpha_to_one else schedule.alphas_cumprod[0]
    a_t = schedule.alphas_cumprod[ts]
    a_prev = _abar_at(schedule, t_next, final)
    eta = jnp.asarray(eta, a_t.dtype)
    sigma = eta * jnp.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    c_x0, c_eps = jnp.sqrt(a_prev), jnp.sqrt(jnp.maximum(1 - a_prev - sigma ** 2, 0.0))

    def step(x, xs):
        i, t, tn, cx, ce, sg = xs[:6]
        x0, eps = predict_x0_and_eps(schedule, x, jnp.full((x.shape[0],), t), _model_eval(model_fn, x, t),
                                     ptype)
        x_new = cx * x0 + ce * eps
        if stochastic:
            z = xs[6] if noise is not None else jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
            x_new = x_new + sg * z
        x_new = _blend(blend_fn, x_new.astype(x.dtype), tn)
        return x_new, (x_new if return_trajectory else None)

    xs = [jnp.asarray(idx), jnp.asarray(ts[idx], jnp.int32), jnp.asarray(t_next[idx], jnp.int32),
          c_x0[idx], c_eps[idx], sigma[idx]]
    if noise is not None:
        if noise.shape != (len(idx),) + x_T.shape:
            raise ValueError(f"noise must have shape {(len(idx),) + x_T.shape} (steps run, *x_T.shape), "
                             f"got {noise.shape}")
        xs.append(noise)
    return _finish(step, x_T, tuple(xs), return_trajectory)


def _ab_coefficients(n_evals: int) -> np.ndarray:
    """Weights on [new, last, 2nd last, 3rd last] model outputs for each PLMS evaluation."""
    table = np.zeros((n_evals, 4))
    table[0, 0] = 1.0
    rows = {1: [0.5, 0.5], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12]}
    for k in range(1, n_evals):
        row = rows.get(k, [55 / 24, -59 / 24, 37 / 24, -9 / 24])
        table[k, :len(row)] = row
    return table


def plms_sample(model_fn, schedule: NoiseSchedule, x_T, num_steps: int, *, prediction_type: str = "eps",
                spacing: str = "uniform", steps_offset: int = 1, set_alpha_to_one: bool = False,
                start_step: int = 0, blend_fn=None, return_trajectory: bool = False):
    """PLMS (Liu et al. 2022) as CompVis plms.py / diffusers PNDMScheduler(skip_prk_steps=True).

    S steps take S + 1 model evaluations: the first step is a Heun-like pair (an Euler guess,
    then the average of both outputs), the rest Adams-Bashforth of order 2, 3, then 4. Like
    diffusers, outputs are combined in the model's parameterization and converted to eps at the
    step's (x, t). The trajectory has one entry per evaluation (the first is the Euler guess).
    With `start_step` the warm-up restarts at that step.
    """
    ptype = canonical_prediction_type(prediction_type)
    _check_start(start_step, num_steps)
    ts = ddim_timesteps(num_steps, schedule.num_timesteps, spacing, steps_offset)[start_step:]
    tn = _next_of(ts)
    n = len(ts)
    if n == 1:
        t_eval, t_from, t_to = ts, ts, tn
    else:
        t_eval = np.concatenate([ts[:2], ts[1:]])
        t_from = np.concatenate([ts[:1], ts])
        t_to = np.concatenate([tn[:1], tn])
    n_evals = len(t_eval)
    coef = jnp.asarray(_ab_coefficients(n_evals), schedule.alphas_cumprod.dtype)
    from_saved = np.arange(n_evals) == 1  # the Heun correction restarts from the first step's x
    store = np.arange(n_evals) != 1
    final = 1.0 if set_alpha_to_one else schedule.alphas_cumprod[0]
    a_to = _abar_at(schedule, t_to, final)

    def step(carry, xs):
        x, saved, h0, h1, h2 = carry
        t_e, t_f, t_t, c, use_saved, keep, a_next = xs
        out = _model_eval(model_fn, x, t_e)
        base = jnp.where(use_saved, saved, x)
        combined = c[0] * out + c[1] * h0 + c[2] * h1 + c[3] * h2
        x0, eps = predict_x0_and_eps(schedule, base, jnp.full((x.shape[0],), t_f), combined, ptype)
        x_new = (jnp.sqrt(a_next) * x0 + jnp.sqrt(1 - a_next) * eps).astype(x.dtype)
        x_new = _blend(blend_fn, x_new, t_t)
        hist = tuple(jnp.where(keep, new, old) for new, old in zip((out, h0, h1), (h0, h1, h2)))
        saved = jnp.where(use_saved, saved, x)  # keeps the x the first step started from
        return (x_new, saved) + hist, (x_new if return_trajectory else None)

    zeros = jnp.zeros_like(x_T)
    xs = (jnp.asarray(t_eval, jnp.int32), jnp.asarray(t_from, jnp.int32), jnp.asarray(t_to, jnp.int32), coef,
          jnp.asarray(from_saved), jnp.asarray(store), a_to)
    return _finish(step, (x_T, x_T, zeros, zeros, zeros), xs, return_trajectory)


def dpm_solver_pp_2m_sample(model_fn, schedule: NoiseSchedule, x_T, num_steps: int, *,
                            prediction_type: str = "eps", spacing: str = "linspace", steps_offset: int = 0,
                            lower_order_final: bool = True, final_sigmas_type: str = "zero",
                            start_step: int = 0, blend_fn=None, return_trajectory: bool = False):
    """DPM-Solver++(2M) (Lu et al. 2022) as diffusers DPMSolverMultistepScheduler(solver_order=2,
    algorithm_type='dpmsolver++', solver_type='midpoint').

    First order on the first step and, with `lower_order_final` and fewer than 15 steps (or a
    'zero' final sigma), on the last; second-order multistep in between.
    """
    ptype = canonical_prediction_type(prediction_type)
    if final_sigmas_type not in ("zero", "sigma_min"):
        raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
    ts_all = dpm_timesteps(num_steps, schedule.num_timesteps, spacing, steps_offset)
    _check_start(start_step, num_steps)
    idx = np.arange(num_steps)[start_step:]
    ts, tn = ts_all[idx], _next_of(ts_all)[idx]
    last_first_order = (lower_order_final and num_steps < 15) or final_sigmas_type == "zero"
    order2 = (idx > idx[0]) & ~((idx == num_steps - 1) & last_first_order)
    lam_all = 0.5 * schedule.log_snr
    lam_s0 = lam_all[ts]
    lam_s1 = jnp.concatenate([lam_s0[:1], lam_s0[:-1]])  # the first row is unused (first order)
    s_s0 = schedule.sqrt_one_minus_alphas_cumprod[ts]
    zero_final = final_sigmas_type == "zero"
    a0 = schedule.alphas_cumprod[0]
    is_final = tn < 0
    t_ok = np.maximum(tn, 0)
    a_t = jnp.where(is_final, 1.0 if zero_final else jnp.sqrt(a0), schedule.sqrt_alphas_cumprod[t_ok])
    s_t = jnp.where(is_final, 0.0 if zero_final else jnp.sqrt(1 - a0), schedule.sqrt_one_minus_alphas_cumprod[t_ok])
    lam_t = jnp.where(is_final, jnp.inf if zero_final else lam_all[0], lam_all[t_ok])
    h = lam_t - lam_s0
    phi = a_t * -jnp.expm1(-h)  # alpha_t (1 - e^-h); stays finite (alpha_t) when h = inf
    c_x = s_t / s_s0
    # midpoint form: D1 = (m0 - m1) / r0 with r0 = h_prev / h, weighted by phi / 2
    c_d1 = jnp.where(order2, 0.5 * phi * h / jnp.where(order2, lam_s0 - lam_s1, 1.0), 0.0)

    def step(carry, xs):
        x, m_prev = carry
        t, t_n, cx, cp, cd = xs
        x0, _ = predict_x0_and_eps(schedule, x, jnp.full((x.shape[0],), t), _model_eval(model_fn, x, t), ptype)
        x_new = (cx * x + cp * x0 + cd * (x0 - m_prev)).astype(x.dtype)
        x_new = _blend(blend_fn, x_new, t_n)
        return (x_new, x0.astype(x.dtype)), (x_new if return_trajectory else None)

    xs = (jnp.asarray(ts, jnp.int32), jnp.asarray(tn, jnp.int32), c_x, phi, c_d1)
    return _finish(step, (x_T, jnp.zeros_like(x_T)), xs, return_trajectory)


SAMPLERS = {"ddim": ddim_sample, "plms": plms_sample, "dpm_solver_pp_2m": dpm_solver_pp_2m_sample}
