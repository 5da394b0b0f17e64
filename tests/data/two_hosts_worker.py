"""Subprocess entry for test_two_hosts.py: one of two JAX processes reading one WebDataset shard set.

Reads train batches and assembles each into a global array over the 8-device mesh, resumes from the state
saved after `resume_at` steps, and runs one eval epoch through the training loop's
`_batches_every_host_has`; what it read goes to a json file for the test to compare.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main():
    spec = json.loads(sys.argv[1])
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={spec['local_devices']}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{spec['port']}", num_processes=2,
                               process_id=spec["process_id"], initialization_timeout=120)
    import numpy as np
    from latent_diffusion.data import loader, sources
    from latent_diffusion.training import partitioning
    from latent_diffusion.training.loop import _batches_every_host_has, compile_together

    cfg, gbs = spec["data"], spec["global_batch_size"]
    eval_split = loader.settings(cfg)["eval_split"]
    mesh = partitioning.make_mesh(-1, 1)
    means = jax.jit(lambda x: x.mean(axis=(1, 2, 3)), out_shardings=partitioning.replicated(mesh))
    compiled = []

    def on_mesh(local) -> int:
        """Assembles the host-local batch into global arrays; returns the first global row it landed in."""
        batch = partitioning.global_batch(local, mesh)
        image = batch["image"]
        assert image.shape == (gbs,) + local["image"].shape[1:], image.shape
        if not compiled:  # both processes compile first, then meet: the first collective then starts together
            compile_together(means, image, name="two_hosts:means")
            compiled.append(True)
        rows = sorted({r for s in image.addressable_shards for r in range(*s.index[0].indices(gbs))})
        assert rows == list(range(rows[0], rows[0] + len(local["image"]))), rows
        # Every host sees the whole batch's per-example means: its own rows hold its own examples.
        got = np.asarray(means(image))[rows[0]:rows[-1] + 1]
        np.testing.assert_allclose(got, local["image"].mean(axis=(1, 2, 3)), rtol=1e-5, atol=1e-6)
        return rows[0]

    def steps(it, n):
        out = []
        for _ in range(n):
            local = next(it)
            out.append({"keys": local["key"].tolist(), "captions": local["caption"].tolist(),
                        "row": on_mesh(local), "skipped": it.skipped, "by_cause": dict(it.skipped_by_cause),
                        "by_shard": dict(it.skipped_by_shard)})
        return out

    make = lambda split, **kw: loader.make_dataset(cfg, split, global_batch_size=gbs, seed=spec["seed"], **kw)
    index = sources.open_records(loader.settings(cfg), "train").index
    out = {"process_index": jax.process_index(), "process_count": jax.process_count(),
           "index": {"records": len(index.records), "dropped": index.dropped, "bad_shards": index.bad_shards}}

    # (a) the uninterrupted stream, with the state after `resume_at` steps; (b) a fresh iterator from that state.
    it = make("train", shuffle=True, num_epochs=None)
    k = spec["resume_at"]
    out["train"] = steps(it, k)
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
    out["train"] += steps(it, spec["steps"] - k)
    resumed = make("train", shuffle=True, num_epochs=None)
    resumed.set_state(state)
    out["resumed"] = steps(resumed, spec["steps"] - k)

    # (c) one eval epoch: this host's own batch count, then what every host has (as loop.evaluate reads it).
    out["eval_local_batches"] = sum(1 for _ in make(eval_split, shuffle=False, num_epochs=1))
    out["eval"] = []
    for local in _batches_every_host_has(make(eval_split, shuffle=False, num_epochs=1)):
        on_mesh(local)
        out["eval"].append(local["key"].tolist())
    with open(spec["out"], "w") as f:
        json.dump(out, f)
    print("worker done", jax.process_index(), flush=True)


if __name__ == "__main__":
    main()
