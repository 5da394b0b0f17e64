"""Does a config's step fit a chip, and how fast could it run: XLA's own answer, with no chip present.

The train step (and optionally the sampling loop) is built from shapes only (training/abstract.py),
laid out on a ('data', 'fsdp') mesh over the devices of a TPU topology description
(`jax.experimental.topologies.get_topology_desc`, from the `libtpu` wheel), and compiled for it. The
compiled program's `memory_analysis()` gives the per-chip bytes and `cost_analysis()` the FLOPs of one
chip's share of the step; the step time follows from the chip's peak bfloat16 FLOP/s at a stated MFU.

What this cannot see: the input pipeline and host time, the real interconnect (collectives are
costed by the compiler's model, not measured), fragmentation beyond XLA's own buffer assignment,
and run-time allocations outside the compiled step (checkpointing copies, the sampling jobs).
"""
from __future__ import annotations

import dataclasses
import functools

import jax

GiB = 2 ** 30

# Per chip: HBM bytes and peak dense bfloat16 FLOP/s (vendor figures).
CHIPS = {
    "v4": dict(hbm=32 * GiB, peak_bf16=275e12),
    "v5e": dict(hbm=16 * GiB, peak_bf16=197e12),
    "v5litepod": dict(hbm=16 * GiB, peak_bf16=197e12),
    "v5p": dict(hbm=95 * GiB, peak_bf16=459e12),
    "v6e": dict(hbm=32 * GiB, peak_bf16=918e12),
}


def chip_of(topology: str) -> dict:
    name = topology.split(":", 1)[0].lower()
    if name not in CHIPS:
        raise ValueError(f"unknown TPU generation {name!r} in --topology={topology}; known: {sorted(CHIPS)}")
    return CHIPS[name]


def topology_devices(topology: str):
    """The devices of a TPU topology such as 'v5e:16x16' or 'v4:4x4x4', with no TPU attached."""
    from jax.experimental import topologies
    try:
        return topologies.get_topology_desc(topology, "tpu").devices
    except Exception as e:  # pylint: disable=broad-except  (no libtpu, or a topology it does not know)
        raise RuntimeError(f"cannot describe TPU topology {topology!r} ({type(e).__name__}: {e}); compiling for "
                           "a TPU without one needs the libtpu wheel: pip install 'jax[tpu]==<this jax>'") from e


@dataclasses.dataclass
class Fit:
    """One compiled program's per-chip memory and cost."""
    name: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops: float  # one chip's share of one call, from XLA's cost analysis
    hbm: int
    peak: float

    error: str = ""  # the compiler's refusal, when it found the program too big for the chip

    @property
    def total_bytes(self) -> int:
        # Donated (aliased) inputs share their buffers with the outputs.
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return not self.error and self.total_bytes <= self.hbm

    def seconds_at(self, mfu: float) -> float:
        return self.flops / (self.peak * mfu)

    def table(self, mfu: float, samples: int, chips: int) -> str:
        g = lambda n: f"{n / GiB:8.2f} GiB"
        if self.error:
            return f"{self.name}: DOES NOT FIT; the TPU compiler says: {self.error}"
        t = self.seconds_at(mfu)
        return "\n".join([
            f"{self.name}: per chip",
            f"  arguments    {g(self.argument_bytes)}",
            f"  outputs      {g(self.output_bytes)}  (of which donated back to the arguments {g(self.alias_bytes)})",
            f"  temporaries  {g(self.temp_bytes)}",
            f"  code         {g(self.code_bytes)}",
            f"  total        {g(self.total_bytes)}  of {g(self.hbm)} HBM: {'fits' if self.fits else 'DOES NOT FIT'}",
            f"  FLOPs per chip per call {self.flops:.4g}; per sample {self.flops * chips / max(samples, 1):.4g}",
            f"  at {mfu:.0%} MFU: {t * 1e3:.1f} ms per call, {samples / chips / t:.2f} samples/s per chip",
        ])


def _fit(name: str, lowered, chip: dict) -> Fit:
    try:
        compiled = lowered.compile()
    except Exception as e:  # pylint: disable=broad-except  (JaxRuntimeError; only memory refusals are kept)
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        message = str(e).split("RESOURCE_EXHAUSTED:", 1)[-1].strip().splitlines()[0]
        return Fit(name, 0, 0, 0, 0, 0, 0.0, chip["hbm"], chip["peak_bf16"], error=message)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return Fit(name, int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes), int(mem.alias_size_in_bytes),
               int(mem.temp_size_in_bytes), int(mem.generated_code_size_in_bytes), float(cost.get("flops", 0.0)),
               chip["hbm"], chip["peak_bf16"])


def _with_sharding(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def global_batch_for(batch_size: int, num_devices: int) -> int:
    """The config's batch, raised to the next multiple of the device count where it is not one."""
    return -(-int(batch_size) // num_devices) * num_devices


def compile_ldm(config, devices, chip: dict, *, batch_size: int, sample_steps: int = 0,
                guidance_scale: float = 7.5) -> list[Fit]:
    """Fits of the LDM train step (and, with sample_steps, a DDIM sampling loop of that many steps)."""
    from latent_diffusion.training import abstract, partitioning
    from latent_diffusion.training.loop import _guard

    mesh = partitioning.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
    task, batch, frozen, state = abstract.abstract_ldm(config, mesh, batch_size)
    rules, min_size = config.partitioning.rules, config.partitioning.min_shard_size
    state_shd = partitioning.tree_shardings(state, mesh, rules, min_size)
    frozen_shd = partitioning.tree_shardings(frozen, mesh, rules, min_size)
    batch_shd = jax.tree.map(lambda _: partitioning.batch_sharding(mesh), batch)
    repl = partitioning.replicated(mesh)
    key = jax.eval_shape(lambda: jax.random.key(0))
    step = jax.jit(_guard(task.train_step), in_shardings=(state_shd, batch_shd, repl, frozen_shd),
                   out_shardings=(state_shd, repl), donate_argnums=(0,))
    fits = [_fit("train step", step.lower(_with_sharding(state, state_shd), batch, key, frozen), chip)]
    if sample_steps:
        from latent_diffusion.training.state import eval_params
        params = eval_params(state)
        params_shd = partitioning.tree_shardings(params, mesh, rules, min_size)
        sample = jax.jit(functools.partial(task.sample, sampler="ddim", steps=int(sample_steps),
                                           guidance_scale=guidance_scale),
                         in_shardings=(params_shd, frozen_shd, batch_shd, repl), out_shardings=batch_shd["image"])
        lowered = sample.lower(params, frozen, batch, key)
        fits.append(_fit(f"sampling ({sample_steps} DDIM steps, guidance {guidance_scale})", lowered, chip))
    return fits
