"""Parameter counts and sharded parameter shapes of a config's model, without allocating anything.

  python scripts/describe_model.py --config=configs/ldm_f8_laion.py --devices=8 --fsdp=8

Builds the task with an abstract first stage, runs `jax.eval_shape` on its init, lays the params
out on a ('data', 'fsdp') mesh of fake CPU devices with the config's partitioning rules, and
prints each component's parameter count and every parameter's global and per-device shape.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="config file, e.g. configs/ldm_f8_laion.py or ...:tiny")
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices of the mesh")
    p.add_argument("--fsdp", type=int, default=8, help="size of the mesh's fsdp axis")
    p.add_argument("--image_size", type=int, default=0, help="default: config.data.resolution")
    p.add_argument("--all", action="store_true", help="print every parameter, not only the 40 largest")
    a = p.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={a.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np

    from latent_diffusion.training import partitioning
    from latent_diffusion.training.abstract import abstract_ldm

    path, _, arg = a.config.partition(":")
    import importlib.util
    spec = importlib.util.spec_from_file_location("experiment_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    mesh = partitioning.make_mesh(a.devices // a.fsdp, a.fsdp)
    size = a.image_size or int(config.data.resolution)
    task, batch, frozen, state = abstract_ldm(config, mesh, mesh.size, size)
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    model = state.params["model"]
    rows = [("UNet", count(model["unet"])), ("trainable condition encoders", count(model["cond"])),
            ("frozen first stage", count(frozen["first_stage"]))]
    if "clip" in frozen:
        rows.append(("frozen CLIP text encoder", count(frozen["clip"])))
    print(f"config {a.config}: latents {task.latent_size((size, size))} x {task.first_stage.latent_channels}")
    for name, n in rows:
        print(f"  {name:32s} {n:>15,d}")
    print(f"  {'trained (UNet + encoders)':32s} {count(model):>15,d}")
    print(f"  {'total':32s} {sum(n for _, n in rows):>15,d}")
    specs = partitioning.param_specs(model, mesh, config.partitioning.rules, config.partitioning.min_shard_size)
    leaves = jax.tree_util.tree_leaves_with_path(model)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    table = []
    for (path, leaf), spec in zip(leaves, spec_leaves):
        shard = jax.sharding.NamedSharding(mesh, spec).shard_shape(leaf.shape)
        table.append((int(np.prod(leaf.shape)), jax.tree_util.keystr(path), leaf.shape, shard, spec))
    table.sort(key=lambda r: -r[0])
    per_device = sum(int(np.prod(r[3])) for r in table)
    print(f"mesh {dict(mesh.shape)}: trained params per device {per_device:,d} "
          f"({per_device * 4 / 2**20:.1f} MiB float32, optimizer state 2x that)")
    for n, name, shape, shard, spec in table if a.all else table[:40]:
        print(f"  {name:90s} {str(shape):22s} -> {str(shard):22s} {spec}")


if __name__ == "__main__":
    main()
