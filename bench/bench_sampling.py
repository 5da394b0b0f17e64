"""Sampling throughput: DDIM with classifier-free guidance, ours beside the diffusers peer; one JSON line.

Usage: python bench/bench_sampling.py --model {tiny,bench,sd1} [--batch 8] [--steps 50] [--guidance 7.5]
                                      [--repeats N] [--threads 2] [--peer] [--shared DIR]
                                      [--device {cpu,gpu}] [--dtype {float32,bfloat16}]

'tiny' is the UNet of configs/ldm_f8_laion.py:tiny (16x16x3 latents, context 77x64); 'bench' is
<shared>/cpu_bench_unet.json (32x32x4 latents, context 77x512). One sample call runs `--steps`
DDIM steps (eta 0, CompVis uniform spacing = diffusers 'leading' with steps_offset 1) from noise,
with cond and uncond in one batched UNet call, so each step evaluates 2B. Decoding latents to
pixels is not part of either side's timing. 'sd1' is the Stable Diffusion v1 UNet (64x64x4 latents,
context 77x768, 860M parameters), meant for `--device gpu`.

`--device gpu` runs JAX on its default accelerator and the peer on CUDA (no thread pinning; each timed
call ends with a device sync). `--dtype bfloat16` computes in bfloat16 on both sides: ours keeps float32
params and casts in each layer (flax `dtype`), the peer's module and inputs are cast to bfloat16.

Each side runs in its own subprocess so thread pools and libraries do not interfere: ours jits
`ddim_sample(cfg_model_fn(...))` (one lax.scan), the peer is diffusers UNet2DConditionModel +
DDIMScheduler in the usual Python loop under torch.no_grad. Both processes are pinned to `--threads`
cores (XLA sizes its CPU thread pool from the schedulable cores; torch also gets set_num_threads).
The peer runs with OMP_WAIT_POLICY=PASSIVE unless told otherwise: on a machine shared with other
jobs, OpenMP threads that spin at barriers lose their core and a 2-thread forward of the tiny UNet
became 10-100x slower in our runs; passive waiting costs little on an idle machine.
compile_s: tracing + XLA compilation (ours only); first_call_s: compile_s plus the first run
(the peer's first run); images_per_s = batch / median of `--repeats` timed calls after that.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_unet import DEFAULT_SHARED, REPO, limit_threads, shared_dir  # noqa: E402

# The tiny config's UNet (ldm_common.tiny_unet(3, 3, context_dim=64)) as a diffusers config:
# attention only at the second level (64 channels, 16-wide heads -> 4 heads, mid block included).
TINY_DIFFUSERS = {
    "sample_size": 16, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
    "block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 64,
    "attention_head_dim": 4,
}
# Stable Diffusion v1's UNet: diffusers' UNet2DConditionModel defaults, 64x64x4 latents, 768-d context.
SD1_DIFFUSERS = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "cross_attention_dim": 768}
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012)  # scaled_linear, 1000 steps
CONTEXT_LEN = 77


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("tiny", "bench", "sd1"), required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps per sample call")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default 3 for tiny, 2 for bench)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peer", action="store_true", help="also measure the diffusers peer in this invocation")
    p.add_argument("--shared", default=DEFAULT_SHARED, help="the shared/bench folder (default: %(default)s)")
    p.add_argument("--omp-wait-policy", default="PASSIVE", choices=("PASSIVE", "ACTIVE", "inherit"),
                   help="OMP_WAIT_POLICY for the peer process ('inherit': leave the environment as it is)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype, both sides")
    p.add_argument("--attention-impl", choices=("xla", "cudnn"), default="xla",
                   help="ours: jax.nn.dot_product_attention implementation ('cudnn': fused, GPU, 16-bit dtypes)")
    p.add_argument("--side", choices=("jax", "torch"), default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.batch < 1 or a.steps < 1 or a.guidance == 1.0:
        p.error("need --batch >= 1, --steps >= 1 and --guidance != 1 (1 would skip the unconditional half)")
    if a.repeats is None:
        a.repeats = 3 if a.model == "tiny" else 2
    return a


def diffusers_config(a) -> dict:
    if a.model == "tiny":
        return dict(TINY_DIFFUSERS)
    if a.model == "sd1":
        return dict(SD1_DIFFUSERS)
    with open(os.path.join(shared_dir(a.shared), "cpu_bench_unet.json")) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def timed_calls(run, n: int) -> tuple[float, list[float]]:
    """(first call seconds, times of the n calls after it)."""
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return first, times


def summary(a, n_params, first, times, **extra) -> dict:
    med = statistics.median(times)
    return dict(params=int(n_params), first_call_s=round(first, 2), sample_s=round(med, 4),
                times_s=[round(t, 3) for t in times], images_per_s=float(f"{a.batch / med:.4g}"), **extra)


def run_jax(a, cfg: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, REPO)
    from latent_diffusion.convert.unet import abstract_params, unet_config_from_diffusers
    from latent_diffusion.diffusion.guidance import cfg_model_fn
    from latent_diffusion.diffusion.samplers import ddim_sample
    from latent_diffusion.diffusion.schedules import make_schedule
    from latent_diffusion.models.unet import UNet

    if a.device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    impl = None if a.attention_impl == "xla" else a.attention_impl
    mapped = UNet(**unet_config_from_diffusers(cfg), dtype=jnp.dtype(a.dtype), attention_impl=impl)
    if a.model == "tiny":
        from configs import ldm_f8_laion
        from latent_diffusion.models import build
        module = build.unet(ldm_f8_laion.get_config("tiny").unet).clone(dtype=jnp.dtype(a.dtype), attention_impl=impl)
    else:
        module = mapped
    shapes = abstract_params(module)
    # The peer must be the same network: the converter's reading of its config gives our exact params.
    same = jax.tree_util.tree_map(lambda p: p.shape, abstract_params(mapped))
    if jax.tree_util.tree_map(lambda p: p.shape, shapes) != same:
        raise SystemExit(f"the diffusers config of '{a.model}' does not map to the benchmarked UNet")

    rng = np.random.default_rng(0)

    def fill(path, leaf):
        # Scaled so activations stay O(1) over the 50 steps; the values do not change the timing.
        base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
        fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 1
        return jnp.asarray(base + rng.standard_normal(leaf.shape, np.float32) / np.sqrt(fan_in), jnp.float32)

    params = jax.tree_util.tree_map_with_path(fill, shapes)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(shapes))
    s, b = cfg["sample_size"], a.batch
    x_T = jnp.asarray(rng.standard_normal((b, s, s, module.in_channels), np.float32))
    ctx = jnp.asarray(rng.standard_normal((b, CONTEXT_LEN, module.context_dim), np.float32))
    null = jnp.asarray(rng.standard_normal((b, CONTEXT_LEN, module.context_dim), np.float32))
    schedule = make_schedule("scaled_linear", 1000, **SCHEDULE)

    def sample(params, x_T, ctx, null):
        apply = lambda x, t, c: module.apply({"params": params}, x, t, c)
        return ddim_sample(cfg_model_fn(apply, ctx, null, a.guidance), schedule, x_T, a.steps,
                           spacing="uniform", steps_offset=1, set_alpha_to_one=False)

    t0 = time.perf_counter()
    compiled = jax.jit(sample).lower(params, x_T, ctx, null).compile()
    compile_s = time.perf_counter() - t0
    out = []
    run = lambda: out.append(jax.block_until_ready(compiled(params, x_T, ctx, null)))
    first, times = timed_calls(run, a.repeats)
    return summary(a, n_params, compile_s + first, times, compile_s=round(compile_s, 2),
                   finite=bool(np.isfinite(np.asarray(out[-1])).all()), jax=jax.__version__,
                   backend=str(jax.devices()[0].device_kind))


def run_torch(a, cfg: dict) -> dict:
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    dev = torch.device("cuda" if a.device == "gpu" else "cpu")
    dtype = getattr(torch, a.dtype)
    if a.device == "cpu":
        torch.set_num_threads(a.threads)
    model = UNet2DConditionModel(**cfg).eval().to(dev, dtype)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", set_alpha_to_one=False,
                              steps_offset=1, clip_sample=False, timestep_spacing="leading", **SCHEDULE)
    s, b = cfg["sample_size"], a.batch
    x_T = torch.randn(b, cfg["in_channels"], s, s).to(dev, dtype)
    both = torch.cat([torch.randn(b, CONTEXT_LEN, cfg["cross_attention_dim"]),
                      torch.randn(b, CONTEXT_LEN, cfg["cross_attention_dim"])]).to(dev, dtype)
    out = []

    @torch.no_grad()
    def run():
        scheduler.set_timesteps(a.steps)
        x = x_T
        for t in scheduler.timesteps:
            pred = model(torch.cat([x, x]), t, encoder_hidden_states=both).sample
            cond, uncond = pred.chunk(2)
            x = scheduler.step(uncond + a.guidance * (cond - uncond), t, x, eta=0.0).prev_sample
        if dev.type == "cuda":
            torch.cuda.synchronize()
        out.append(x)

    first, times = timed_calls(run, a.repeats)
    n_params = sum(p.numel() for p in model.parameters())
    return summary(a, n_params, first, times, finite=bool(torch.isfinite(out[-1]).all()),
                   torch=torch.__version__, backend=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                   omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "unset"))


def child(a, side: str) -> dict:
    """Runs one side in a fresh process and returns its JSON result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--model", a.model, "--batch", str(a.batch),
           "--steps", str(a.steps), "--guidance", str(a.guidance), "--repeats", str(a.repeats),
           "--threads", str(a.threads), "--shared", a.shared, "--device", a.device, "--dtype", a.dtype,
           "--attention-impl", a.attention_impl]
    env = dict(os.environ)
    if side == "torch" and a.omp_wait_policy != "inherit":
        env["OMP_WAIT_POLICY"] = a.omp_wait_policy  # read when torch loads its OpenMP runtime
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"the {side} side failed (exit {proc.returncode}); its output is above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    a = parse()
    if a.device == "cpu":
        limit_threads(a.threads)  # children inherit the affinity
    cfg = diffusers_config(a)
    if a.side is not None:
        result = run_jax(a, cfg) if a.side == "jax" else run_torch(a, cfg)
        print(json.dumps(result), flush=True)
        return
    load_before = os.getloadavg()[0]
    line = dict(bench="sampling", model=a.model, batch=a.batch, steps=a.steps, sampler="ddim eta=0",
                guidance=a.guidance, unet_batch=2 * a.batch, threads=a.threads, decode_included=False,
                device=a.device, dtype=a.dtype, attention_impl=a.attention_impl)
    line["jax"] = child(a, "jax")
    if a.peer:
        line["torch"] = child(a, "torch")
        if line["torch"]["params"] != line["jax"]["params"]:
            raise SystemExit(f"param counts differ: ours {line['jax']['params']}, peer "
                             f"{line['torch']['params']}; the two UNets are not the same network")
        # From the medians (not the rounded images/s): ours over the peer's images/s, > 1 when ours is faster.
        line["ratio_images_per_s"] = round(line["torch"]["sample_s"] / line["jax"]["sample_s"], 3)
    line["loadavg_1m_before"], line["loadavg_1m_after"] = round(load_before, 2), round(os.getloadavg()[0], 2)
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
