"""CPU benchmark of the UNet: jitted train step (forward, backward, AdamW) and forward, one JSON line.

Usage: python bench/bench_unet.py [--steps 5] [--threads 2] [--small] [--peer] [--shared DIR]
The model is <shared>/cpu_bench_unet.json (a diffusers config) mapped through the
converter's config mapping; batch 8, latent 32x32x4, context 77x512, float32. `--peer` also
runs the PyTorch peer script in the same invocation, so the two figures are comparable.
<shared> is the shared/bench folder beside the repository (<repo>/../shared/bench) unless --shared says otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SHARED = os.path.normpath(os.path.join(REPO, "..", "shared", "bench"))


def shared_dir(path: str) -> str:
    """The benchmark reference folder (the benchmark UNet config and the PyTorch peer scripts)."""
    if not os.path.isfile(os.path.join(path, "cpu_bench_unet.json")):
        raise SystemExit(f"no cpu_bench_unet.json in {path}: expected the shared/bench folder beside the "
                         "repository; pass --shared /path/to/shared/bench")
    return path


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", default=DEFAULT_SHARED, help="the shared/bench folder (default: %(default)s)")
    p.add_argument("--config", default=None, help="a diffusers UNet config (default: <shared>/cpu_bench_unet.json)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--small", action="store_true", help="tiny model and batch, a smoke check in seconds")
    p.add_argument("--peer", action="store_true", help="also run the PyTorch peer script")
    return p.parse_args()


def limit_threads(n: int) -> None:
    """Pin the process (and the peer it starts) to n cores before XLA sizes its thread pool."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > n:
        os.sched_setaffinity(0, cpus[:n])


def median_time(f, n: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        f()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2]


def main():
    a = parse()
    if a.config is None or a.peer:
        a.shared = shared_dir(a.shared)
    a.config = a.config or os.path.join(a.shared, "cpu_bench_unet.json")
    if a.small and a.peer:
        raise SystemExit("--peer measures the full benchmark model; run it without --small")
    limit_threads(a.threads)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import optax

    sys.path.insert(0, REPO)
    from latent_diffusion.convert.unet import unet_config_from_diffusers
    from latent_diffusion.models.unet import UNet

    cfg = json.load(open(a.config))
    if a.small:
        cfg.update(block_out_channels=[32, 64], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                   up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], layers_per_block=1, sample_size=16)
        a.batch = min(a.batch, 2)
    model = UNet(**unet_config_from_diffusers(cfg))
    b, s, ctx_dim = a.batch, cfg["sample_size"], cfg["cross_attention_dim"]
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(k[0], (b, s, s, model.in_channels))
    t = jax.random.randint(k[1], (b,), 0, 1000)
    ctx = jax.random.normal(k[2], (b, 77, ctx_dim))
    params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x, t, ctx)["params"]
    n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
    opt = optax.adamw(1e-4, weight_decay=0.01)  # torch.optim.AdamW defaults
    opt_state = opt.init(params)

    def loss_fn(p):
        return jnp.mean((model.apply({"params": p}, x, t, ctx) - x) ** 2)

    @jax.jit
    def train_step(p, o):
        loss, g = jax.value_and_grad(loss_fn)(p)
        updates, o = opt.update(g, o, p)
        return optax.apply_updates(p, updates), o, loss

    forward = jax.jit(lambda p: model.apply({"params": p}, x, t, ctx))
    t0 = time.perf_counter()
    train_step = train_step.lower(params, opt_state).compile()
    forward = forward.lower(params).compile()
    compile_s = time.perf_counter() - t0
    state = [params, opt_state]

    def step():
        p, o, loss = train_step(*state)
        jax.block_until_ready(loss)
        state[:] = [p, o]

    train_s = median_time(step, a.steps)
    fwd_s = median_time(lambda: jax.block_until_ready(forward(state[0])), a.steps)
    print(json.dumps(dict(
        impl="jax", params_M=round(n_params / 1e6, 2), batch=b, train_step_s=round(train_s, 3),
        train_images_per_s=round(b / train_s, 2), forward_s=round(fwd_s, 3), compile_s=round(compile_s, 1),
        jax=jax.__version__, threads=a.threads, small=a.small)), flush=True)

    if a.peer:
        cmd = [sys.executable, os.path.join(a.shared, "peer_torch_unet.py"), "--steps", str(a.steps),
               "--threads", str(a.threads), "--batch", str(b)]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
