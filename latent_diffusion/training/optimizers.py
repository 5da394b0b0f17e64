"""optax optimizers from config: warm-up, schedules, gradient clipping, gradient accumulation."""
from __future__ import annotations

import optax


def learning_rate_schedule(cfg) -> optax.Schedule:
    """Linear warm-up to cfg.lr, then 'constant', 'cosine' or 'linear' decay over cfg.decay_steps."""
    lr, warmup = float(cfg.lr), int(cfg.get("warmup_steps", 0))
    kind = cfg.get("schedule", "constant")
    decay_steps = int(cfg.get("decay_steps", 0) or 0)
    end = lr * float(cfg.get("end_lr_factor", 0.0))
    if kind == "constant":
        after = optax.constant_schedule(lr)
    elif kind in ("cosine", "linear"):
        if decay_steps <= 0:
            raise ValueError(f"optim.decay_steps must be > 0 for the {kind!r} schedule "
                             f"(got {decay_steps}); set --config.optim.decay_steps")
        after = (optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
                 if kind == "cosine" else optax.linear_schedule(lr, end, decay_steps))
    else:
        raise ValueError(f"optim.schedule must be 'constant', 'cosine' or 'linear', got {kind!r}")
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(cfg) -> optax.GradientTransformation:
    """The optimizer of one parameter group. `cfg.grad_accum_steps` > 1 wraps it in MultiSteps."""
    sched = learning_rate_schedule(cfg)
    name = cfg.get("name", "adamw")
    b1, b2, eps = float(cfg.get("b1", 0.9)), float(cfg.get("b2", 0.999)), float(cfg.get("eps", 1e-8))
    if name == "adam":
        opt = optax.adam(sched, b1=b1, b2=b2, eps=eps)
    elif name == "adamw":
        opt = optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=float(cfg.get("weight_decay", 0.0)))
    elif name == "sgd":
        opt = optax.sgd(sched, momentum=float(cfg.get("momentum", 0.0)) or None)
    else:
        raise ValueError(f"optim.name must be 'adam', 'adamw' or 'sgd', got {name!r}")
    chain = []
    clip = cfg.get("grad_clip_norm", None)
    if clip:
        chain.append(optax.clip_by_global_norm(float(clip)))
    chain.append(opt)
    tx = optax.chain(*chain)
    accum = int(cfg.get("grad_accum_steps", 1))
    if accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accum)
    elif accum < 1:
        raise ValueError(f"optim.grad_accum_steps must be >= 1, got {accum}")
    return tx


def did_update(opt_state, accum_steps: int):
    """True (traced) when this step's update was applied, i.e. not an accumulation-only step."""
    if accum_steps > 1:
        return optax.MultiSteps(optax.identity(), accum_steps).has_updated(opt_state)
    return True
