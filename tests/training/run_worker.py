"""Subprocess entry for the multi-process and kill/resume tests: one training run, params saved to npz."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main():
    spec = json.loads(sys.argv[1])
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={spec['local_devices']}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    if spec.get("num_processes", 1) > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{spec['port']}",
                                   num_processes=spec["num_processes"], process_id=spec["process_id"],
                                   initialization_timeout=120)
    if spec.get("delay_s"):
        # One process late to the first step: compiling apart must not break the first collective.
        import time
        time.sleep(spec["delay_s"])
    import numpy as np
    from jax.experimental import multihost_utils
    from latent_diffusion.training.loop import train_and_evaluate
    from tests.training.helpers import tiny_ae_config

    cfg = tiny_ae_config(spec["data_dir"], steps=spec["steps"], sgd=spec.get("sgd", False))
    cfg.checkpoint.every = spec.get("checkpoint_every", 2)
    run = train_and_evaluate(cfg, spec["workdir"])
    params = multihost_utils.process_allgather(run.state.params, tiled=True)
    if jax.process_index() == 0 and spec.get("out"):
        flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
        np.savez(spec["out"], **flat)
    print("worker done", jax.process_index(), run.step, flush=True)


if __name__ == "__main__":
    main()
